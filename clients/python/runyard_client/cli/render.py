"""How the CLI prints: JSON for scripts (`--json`, needs nothing but the standard library), and
tables, log lines and a progress bar for people (rich, from the `cli` extra)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from runyard_client.errors import RunyardError

COLUMNS: dict[str, list[str]] = {
    "agents": ["name", "current_version", "runtime.type", "tags", "description"],
    "executions": ["id", "agent_name", "agent_version", "status", "queued_at", "duration_ms"],
    "chains": ["name", "current_version", "description"],
    "schedules": ["name", "target", "cron", "timezone", "enabled", "next_fire_at"],
    "history": ["fire_time", "status", "execution_id", "chain_execution_id", "skipped_reason"],
    "changes": ["kind", "name", "action", "version"],
}
LEVEL_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}


def console(stderr: bool = False) -> Any:
    try:
        from rich.console import Console
    except ImportError as exc:
        raise RunyardError(
            "tables and progress need rich", hint="pip install 'runyard-client[cli]', or --json"
        ) from exc
    return Console(stderr=stderr, highlight=False)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")
    sys.stdout.flush()


def _cell(row: dict[str, Any], column: str) -> str:
    value: Any = row
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(kind: str, rows: Iterable[dict[str, Any]]) -> None:
    out = console()
    from rich.table import Table

    grid = Table(box=None, header_style="bold")
    for column in COLUMNS[kind]:
        grid.add_column(column.split(".")[0].upper().replace("_", " "), overflow="fold")
    count = 0
    for row in rows:
        grid.add_row(*(_cell(row, column) for column in COLUMNS[kind]))
        count += 1
    if count:
        out.print(grid)
    else:
        out.print(f"no {kind}", style="dim")


def document(value: Any) -> None:
    """One object, readably: its JSON, highlighted."""
    out = console()
    from rich.json import JSON

    out.print(JSON.from_data(value, default=str))


def log_line(out: Any, line: dict[str, Any]) -> None:
    from rich.text import Text  # `out` is a rich console: rich is there

    level = str(line.get("level", "info"))
    text = Text(f"{str(line.get('ts', ''))[11:23]} ", style="dim")
    text.append(f"{level.upper():<7} ", style=LEVEL_STYLES.get(level, ""))
    text.append(str(line.get("message", "")))
    if line.get("fields"):
        text.append(" " + json.dumps(line["fields"], separators=(",", ":")), style="cyan")
    out.print(text)


def error(exc: RunyardError) -> None:
    print(f"runyard: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
