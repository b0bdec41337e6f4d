"""`runyard up` writes .runyard/env for the shells and scripts that reach its servers."""

from __future__ import annotations

import stat
import subprocess

from app.up import write_env


def test_the_env_file_is_private_and_sources_back_exactly(tmp_path):
    values = {
        "DATABASE_URL": "postgresql+psycopg://postgres:@/runyard?host=/tmp/a b/pgdata",
        "RUNYARD_URL": "http://127.0.0.1:8000",
        "RUNYARD_TOKEN": "ry_it's-$secret",
    }
    path = write_env(tmp_path, values)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    script = (
        f'set -a; . "{path}"; set +a; '
        'printf "%s\\n" "$DATABASE_URL" "$RUNYARD_URL" "$RUNYARD_TOKEN"'
    )
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout.splitlines() == list(values.values())
