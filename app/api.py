"""The Flask application: the API's blueprints, the OpenAPI spec and docs, /healthz, /readyz
and /metrics (`app.create_app()` is what gunicorn serves)."""

from __future__ import annotations

import inspect

import swagger_ui_bundle
from flask import Flask, send_from_directory
from sqlalchemy import text

from app import broker, http
from app.config import Config, current_config, use_config
from app.db import db


class RunyardFlask(Flask):
    """Flask, with `ensure_sync` remembering which functions are plain `def`s.

    Flask asks it of every before/after/teardown hook and of every view layer (flask-smorest's
    decorators add one each), 17 times per submit, and inspect.iscoroutinefunction each time
    was about 2% of the API's CPU per request. The answer is per function, so it is kept per
    function (the one under a bound method: views are bound to a new instance per request)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plain: dict[object, bool] = {}

    def ensure_sync(self, func):
        key = getattr(func, "__func__", func)
        plain = self._plain.get(key)
        if plain is None:
            plain = not inspect.iscoroutinefunction(func)
            if len(self._plain) > 10_000:  # defined functions only come here; bounded anyway
                self._plain.clear()
            self._plain[key] = plain
        return func if plain else self.async_to_sync(func)


def build_app(config: Config | None = None) -> Flask:
    if config is not None:
        use_config(config)
    cfg = current_config()
    db.configure(cfg.require_database())

    app = RunyardFlask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=cfg.max_body_bytes,
        API_TITLE="Runyard",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        # Served from the swagger-ui-bundle package, so the docs work without internet access.
        OPENAPI_SWAGGER_UI_URL="/api/v1/swagger-ui/",
        API_SPEC_OPTIONS={
            "info": {
                "description": "Run versioned, typed agents on a pool of Celery workers. "
                "Every /api/v1 route but this spec and the docs takes "
                "`Authorization: Bearer <token>`. Errors share one shape: "
                "`{code, status, message, errors}`, `errors` keyed by JSON pointer "
                "(body fields) or parameter name (query). Lists take `page` and `page_size` "
                "(default 20, max 100) and answer an `X-Pagination` header.",
            },
            "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearerAuth": []}],
        },
    )
    api = http.RunyardApi(app)
    _register_blueprints(api)
    http.install(app, api)
    # The console's pages (/ui/): a plain Flask blueprint, outside the API's spec.
    from app.console.pages import bp as console_bp

    app.register_blueprint(console_bp)
    app.wsgi_app = http.ChunkedBodyLimit(app.wsgi_app, cfg.max_body_bytes, http.raw_bodies(app))
    app.teardown_appcontext(http.close_request_session)
    _operational_routes(app)
    # Imported here, not at the top: prometheus_client fixes its (multiprocess) mode on import,
    # and `runyard api` sets PROMETHEUS_MULTIPROC_DIR only after this package is loaded.
    from app import metrics

    metrics.install(app)
    return app


def _register_blueprints(api: http.RunyardApi) -> None:
    """The API's blueprints, in the order the OpenAPI document lists them (imported here, as
    the console's are: the routes import the services, which take the configuration)."""
    from app.agents.routes import blp as agents_blp
    from app.audit.routes import blp as audit_blp
    from app.catalog.routes import blp as catalog_blp
    from app.chains.routes import blp as chains_blp
    from app.documents.routes import blp as documents_blp
    from app.events.routes import blp as events_blp
    from app.executions.routes import blp as executions_blp
    from app.fleet.routes import blp as fleet_blp
    from app.flow.routes import blp as flow_blp
    from app.notifications.routes import blp as notifications_blp
    from app.orgs.routes import blp as orgs_blp
    from app.schedules.routes import blp as schedules_blp
    from app.secrets.routes import blp as secrets_blp
    from app.state.routes import blp as state_blp
    from app.stats.routes import blp as stats_blp
    from app.triggers.routes import blp as triggers_blp
    from app.triggers.routes import hooks as hooks_blp
    from app.wallets.routes import blp as decisions_blp
    from app.wallets.routes import wallets as wallets_blp

    for blueprint in (
        orgs_blp,
        agents_blp,
        executions_blp,
        chains_blp,
        fleet_blp,
        flow_blp,
        schedules_blp,
        triggers_blp,
        events_blp,
        notifications_blp,
        secrets_blp,
        hooks_blp,
        stats_blp,
        audit_blp,
        catalog_blp,
        state_blp,
        documents_blp,
        wallets_blp,
        decisions_blp,
    ):
        api.register_blueprint(blueprint)


READY_HINTS = {
    "database": "check DATABASE_URL and that PostgreSQL is up; requests that need it answer 503 "
    "meanwhile.",
    "broker": "check REDIS_URL (or RUNYARD_BROKER_URL) and that the broker is up; submits are "
    "still accepted and run once it is back.",
}


def _operational_routes(app: Flask) -> None:
    @app.get("/api/v1/swagger-ui/<path:filename>")
    def swagger_ui_asset(filename: str):
        return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        checks = {"database": _check_database(), "broker": _check_broker()}
        ready = all(value == "ok" for value in checks.values())
        if ready:
            return {"status": "ready", "checks": checks}
        failed = [name for name, value in checks.items() if value != "ok"]
        return {
            "code": 503,
            "status": "Service Unavailable",
            "message": f"not ready: {' and '.join(failed)} unreachable",
            "errors": checks,
            "hint": " ".join(READY_HINTS[name] for name in failed),
        }, 503


def _check_database() -> str:
    try:
        with db.hot() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        # The class only: /readyz needs no token, and messages name hosts and users.
        return f"error: {type(exc).__name__}"


def _check_broker() -> str:
    try:
        broker.ping(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        # The class only: /readyz needs no token, and messages name hosts and users.
        return f"error: {type(exc).__name__}"
