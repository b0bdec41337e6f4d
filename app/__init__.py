"""Runyard's HTTP API. `create_app()` is what gunicorn serves (`runyard api`).

Nothing is imported at the top of this package: importing one of its lower modules (app.config,
app.executions.spec: what the agent runtimes import) must not load Flask, SQLAlchemy or psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from app.config import Config


def create_app(config: Config | None = None) -> Flask:
    from app.api import build_app

    return build_app(config)
