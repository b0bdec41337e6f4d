"""An agent's capabilities: what it can do, with which providers and chains, and on what
authority.

A capability is a name (`"nlp"`) or an object `{"name", "providers"?, "chains"?,
"authority"?}`; a name is the object `{"name": ...}` with authority `execute`. Definitions keep
them as given (a client that wrote names reads names back); the agent row keeps the current
version's names for the `?capability=` filter.
"""

from __future__ import annotations

from typing import Any

from app.errors import ValidationFailed

AUTHORITIES = ("observe", "propose", "execute")
DEFAULT_AUTHORITY = "execute"


def normalized(capability: str | dict[str, Any]) -> dict[str, Any]:
    """The object form, every field present."""
    if isinstance(capability, str):
        capability = {"name": capability}
    return {
        "name": capability["name"],
        "providers": list(capability.get("providers", [])),
        "chains": list(capability.get("chains", [])),
        "authority": capability.get("authority", DEFAULT_AUTHORITY),
    }


def names(capabilities: list[Any]) -> list[str]:
    return [normalized(capability)["name"] for capability in capabilities]


def find(capabilities: list[Any], name: str) -> dict[str, Any] | None:
    """The capability called `name`, in object form, or None."""
    for capability in capabilities:
        shaped = normalized(capability)
        if shaped["name"] == name:
            return shaped
    return None


def offers(
    capability: dict[str, Any], provider: str | None = None, chain: str | None = None
) -> bool:
    """Whether a capability (object form) names `provider` and `chain`, when they are given."""
    return (provider is None or provider in capability["providers"]) and (
        chain is None or chain in capability["chains"]
    )


def check_unique(capabilities: Any) -> None:
    """Two capabilities of one name would leave assignment to guess between them."""
    if not isinstance(capabilities, list):
        return
    seen: set[str] = set()
    errors: dict[str, list[str]] = {}
    for index, capability in enumerate(capabilities):
        name = capability.get("name") if isinstance(capability, dict) else capability
        if not isinstance(name, str):
            continue  # malformed: schemas/agent.json reports it
        if name in seen:
            errors[f"/capabilities/{index}"] = [f"{name!r} is named twice"]
        seen.add(name)
    if errors:
        raise ValidationFailed(
            "a capability is named twice",
            errors=errors,
            hint="give each capability once; list its providers and chains inside it",
        )


def removed(old: list[Any], new: list[Any]) -> list[str]:
    """What a new version no longer offers of the old one's: a capability, one of its providers
    or chains, or its authority lowered (breaking changes for whoever assigns work by them)."""
    gone = []
    now = {shaped["name"]: shaped for shaped in map(normalized, new)}
    for was in map(normalized, old):
        name = was["name"]
        if name not in now:
            gone.append(f"no longer offers {name!r}")
            continue
        for field in ("providers", "chains"):
            for value in sorted(set(was[field]) - set(now[name][field])):
                gone.append(f"{name!r} no longer offers {field[:-1]} {value!r}")
        was_authority, now_authority = was["authority"], now[name]["authority"]
        if AUTHORITIES.index(now_authority) < AUTHORITIES.index(was_authority):
            gone.append(f"{name!r} lowered authority {was_authority} -> {now_authority}")
    return gone
