"""Agents that declare themselves: `@runyard_client.agent(...)` on a python function marks it
with its definition (runtime python, entrypoint module:function); `discover(PKG)` imports the
package and its submodules and returns every definition found, for `runyard agents sync`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from runyard_client.errors import RunyardError

F = TypeVar("F", bound=Callable[..., Any])
MARK = "__runyard_agent__"


def agent(
    name: str | None = None,
    *,
    input_schema: dict[str, Any] | None = None,
    output_schema: dict[str, Any] | None = None,
    description: str | None = None,
    timeout_seconds: int | None = None,
    retry: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    queue: str | None = None,
    capabilities: list[Any] | None = None,
    tags: list[str] | None = None,
    config: dict[str, Any] | None = None,
    concurrency: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    wallet_policy: dict[str, Any] | None = None,
) -> Callable[[F], F]:
    """Declare the decorated `function(input, ctx)` as an agent. The function is returned as it
    is: the worker calls it exactly as if it were not decorated."""

    def declare(function: F) -> F:
        if "." in function.__qualname__:
            raise TypeError(f"{function.__qualname__}: an agent is a module-level function")
        doc = inspect.getdoc(function)
        given = {
            "description": description or (doc.splitlines()[0] if doc else None),
            "input_schema": input_schema,
            "output_schema": output_schema,
            "timeout_seconds": timeout_seconds,
            "retry": retry,
            "limits": limits,
            "queue": queue,
            "capabilities": capabilities,
            "tags": tags,
            "config": config,
            "concurrency": concurrency,
            "rate_limit": rate_limit,
            "wallet_policy": wallet_policy,
        }
        definition = {
            "name": name or function.__name__.replace("_", "-"),
            "runtime": {
                "type": "python",
                "entrypoint": f"{function.__module__}:{function.__name__}",
            },
            **{key: value for key, value in given.items() if value is not None},
        }
        setattr(function, MARK, definition)
        return function

    return declare


def declared(function: Any) -> dict[str, Any] | None:
    return getattr(function, MARK, None)


def _modules(package: str) -> list[Any]:
    try:
        root = importlib.import_module(package)
    except ImportError as exc:
        raise RunyardError(
            f"cannot import {package}: {exc}", hint="is it on PYTHONPATH (or installed)?"
        ) from exc
    found = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}."):
        found.append(importlib.import_module(info.name))
    return found


def discover(*packages: str) -> list[dict[str, Any]]:
    """Every agent declared in these packages (and their submodules), in a stable order."""
    definitions: dict[str, dict[str, Any]] = {}
    for package in packages:
        for module in _modules(package):
            for _, value in inspect.getmembers(module, inspect.isfunction):
                definition = declared(value)
                # A function re-exported by another module is found once, where it lives.
                if definition is None or value.__module__ != module.__name__:
                    continue
                name = definition["name"]
                other = definitions.get(name)
                if other is not None and other["runtime"] != definition["runtime"]:
                    raise RunyardError(
                        f"two agents are called {name!r}: {other['runtime']['entrypoint']} "
                        f"and {definition['runtime']['entrypoint']}"
                    )
                definitions[name] = definition
    return [definitions[name] for name in sorted(definitions)]
