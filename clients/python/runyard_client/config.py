"""Where the client finds its server: arguments, else RUNYARD_URL / RUNYARD_TOKEN, else the
profile `runyard login` wrote to ~/.config/runyard/config.toml."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from runyard_client.errors import RunyardError

DEFAULT_PROFILE = "default"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "runyard" / "config.toml"


@dataclass(frozen=True)
class Profile:
    url: str
    token: str


def read_profiles(path: Path | None = None) -> dict[str, dict[str, str]]:
    path = path or config_path()
    if not path.exists():
        return {}
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    return {name: dict(values) for name, values in data.items() if isinstance(values, dict)}


def _toml_string(value: str) -> str:
    # A JSON string with only these escapes is also a TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def write_profile(
    url: str, token: str, name: str = DEFAULT_PROFILE, path: Path | None = None
) -> Path:
    """Save a profile, readable by its owner only (0600: it holds a token)."""
    path = path or config_path()
    profiles = read_profiles(path)
    profiles[name] = {"url": url, "token": token}
    text = "".join(
        f"[{_toml_string(profile)}]\n"
        + "".join(f"{key} = {_toml_string(value)}\n" for key, value in sorted(values.items()))
        + "\n"
        for profile, values in sorted(profiles.items())
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 before the token is written: never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)
    return path


def resolve(
    url: str | None = None, token: str | None = None, profile: str | None = None
) -> Profile:
    """Arguments first, then the environment, then the profile file."""
    name = profile or os.environ.get("RUNYARD_PROFILE") or DEFAULT_PROFILE
    saved = read_profiles().get(name, {})
    url = url or os.environ.get("RUNYARD_URL") or saved.get("url")
    token = token or os.environ.get("RUNYARD_TOKEN") or saved.get("token")
    if not url or not token:
        raise RunyardError(
            "no Runyard server configured",
            hint="`runyard login --url URL --token TOKEN`, or set RUNYARD_URL and RUNYARD_TOKEN "
            "(after `runyard up`: `set -a; . .runyard/env; set +a`)",
        )
    return Profile(url.rstrip("/"), token)
