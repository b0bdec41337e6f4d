"""The HTTP edge: authentication, the one error shape, JSON parsing limits."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import flask_smorest
import flask_smorest.error_handler
import marshmallow as ma
from flask import Flask, g, jsonify, request
from flask_smorest import Api
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from app import storable
from app.audit import services as audit
from app.db import DATABASE_ERRORS, db
from app.errors import (
    QuotaExceeded,
    RunyardError,
    Unavailable,
    UnsupportedMediaType,
)
from app.idempotency import services as idempotency
from app.orgs.services import Principal, authenticate

log = logging.getLogger(__name__)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
PUBLIC_PREFIXES = ("/api/v1/openapi.json", "/api/v1/docs", "/api/v1/swagger-ui")
SERVER_OWNED = {
    "id",
    "org_id",
    "status",
    "attempt",
    "attempts",
    "created_at",
    "updated_at",
    "queued_at",
    "started_at",
    "finished_at",
    "archived_at",
    "current_version",
    "agent_id",
    "agent_name",
    "agent_version",
    "output",
    "error",
    "resource_usage",
    "parent_execution_id",
    "children",
}


def current_principal() -> Principal:
    return g.principal


def _pointer_errors(messages: Any) -> dict[str, Any]:
    """webargs/marshmallow errors ({"json": {"a": {"b": [...]}}}) keyed by JSON pointer."""
    flat: dict[str, Any] = {}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                # marshmallow's "_schema" is the nested object itself ("Invalid input type.").
                walk(child, path if key == "_schema" else [*path, str(key)])
        else:
            key = "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)
            if path and path[-1] in SERVER_OWNED and node == ["Unknown field."]:
                node = ["Server-owned field: set by Runyard, not by the client."]
            flat[key] = node

    for location, errors in (messages or {}).items():
        if location == "json":
            walk(errors, [])
        else:  # query string, headers: keyed by parameter name
            for name, problem in errors.items():
                flat[name] = problem
    return flat


def _body(code: int, status: str, message: str, errors: dict | None = None, hint=None) -> dict:
    body: dict[str, Any] = {"code": code, "status": status, "message": message}
    body["errors"] = errors or {}
    if hint:
        body["hint"] = hint
    return body


SPEC_HINT = "GET /api/v1/openapi.json documents every route, its parameters and bodies"
# Every error carries a hint, also those the framework raises.
HTTP_HINTS = {
    400: "send one well-formed JSON document",
    405: "the Allow header lists the methods this route takes",
    413: "send a smaller body; the limit is RUNYARD_MAX_BODY_BYTES",
    422: "`errors` names each offending field; " + SPEC_HINT,
}


class ErrorSchema(flask_smorest.error_handler.ErrorSchema):
    """The one error shape, as documented in the spec (every error answer carries a hint)."""

    hint = ma.fields.String(metadata={"description": "what to do about it"})


IDEMPOTENCY_PARAMETER = "IdempotencyKey"


NULL_ONLY = {"type": "object", "nullable": True, "enum": [None]}


def _nullable_nested_is_null(_converter, _field, ret, **_kwargs) -> dict:
    """apispec writes a nullable nested schema (OpenAPI 3.0) as `anyOf: [{type: object,
    nullable: true}, {$ref}]`, whose first branch lets any object through: make it null only."""
    branches = ret.get("anyOf")
    if not branches or {"type": "object", "nullable": True} not in branches:
        return {}
    return {
        "anyOf": [
            NULL_ONLY if branch == {"type": "object", "nullable": True} else branch
            for branch in branches
        ]
    }


class RunyardApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def _init_spec(self, **kwargs):
        super()._init_spec(**kwargs)
        self.ma_plugin.converter.add_attribute_function(_nullable_nested_is_null)
        self.spec.components.parameter(
            IDEMPOTENCY_PARAMETER,
            "header",
            {
                "name": idempotency.HEADER,
                "required": False,
                # Printable, as check_key wants; ASCII, as a header carries it unchanged.
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[!-~]([ -~]*[!-~])?$",
                },
                "description": "Send the request again with the same key (within 24 hours, "
                "same body) and get the first answer again, with `Idempotency-Replayed: true`, "
                "instead of doing it twice. The same key with another body: 422. While the "
                "first request with the key is still running: 409, try again shortly. Keys "
                "belong to your organization; a 5xx or 429 answer leaves the key free.",
            },
        )

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        # Keep what the exception itself says in headers (Allow on a 405, for one).
        headers = {
            name: value for name, value in error.get_headers() if name.lower() != "content-type"
        }
        headers.update(data.get("headers") or {})
        errors = data.get("errors") or _pointer_errors(data.get("messages"))
        message = data.get("message") or _default_message(error, errors)
        hint = data.get("hint") or HTTP_HINTS.get(error.code, SPEC_HINT)
        return _body(error.code, error.name, message, errors, hint), error.code, headers


def _default_message(error: HTTPException, errors: dict) -> str:
    if error.code == 422 and errors:
        return "the request does not fit the schema: see errors"
    if error.code == 400 and errors:
        return "malformed request body: it is not valid JSON"
    if error.code == 413:
        return "request body too large (RUNYARD_MAX_BODY_BYTES)"
    return error.description or error.name


@dataclass(frozen=True)
class RawBody:
    """A route whose body is a file (any media type, not JSON; a document upload): read up to
    `max_bytes()` instead of RUNYARD_MAX_BODY_BYTES, and not checked as JSON. Past the limit
    it answers 413 with `too_large(size)` (size None when the body is chunked)."""

    max_bytes: Callable[[], int]
    too_large: Callable[[int | None], RunyardError]


RAW_BODIES = "runyard_raw_bodies"


def raw_bodies(app: Flask) -> dict[tuple[str, str], RawBody]:
    """(method, path) -> RawBody: the routes that take a file as their body."""
    return app.extensions.setdefault(RAW_BODIES, {})


def install(app: Flask, api: RunyardApi) -> None:
    # Before-request hooks run in the order they are installed: the token first (an idempotency
    # key belongs to the caller's organization), then the body checks, then the key (a refused
    # body is no answer to remember).
    _install_request_origin(app)
    _install_request_checks(app)
    error_response = _install_error_handlers(app, api)
    _install_idempotency(app, error_response)


REQUEST_ID_HEADER = "X-Request-Id"
# A caller's own request id is kept when it is a plain token; anything else gets a fresh one.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _install_request_origin(app: Flask) -> None:
    """Every request has an id (the caller's `X-Request-Id`, or a new one), answered in the same
    header and written with the audit events the request makes, beside the caller's address."""

    @app.before_request
    def request_origin():
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        audit.begin_origin(g.request_id, request.remote_addr)

    @app.after_request
    def answer_request_id(response):
        request_id = g.get("request_id")
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.teardown_request
    def forget_origin(_exc: BaseException | None):
        audit.end_origin()


def _install_request_checks(app: Flask) -> None:
    """Who calls (the token), and what a body may be (JSON, text PostgreSQL can store; a file
    on a RawBody route)."""
    files = raw_bodies(app)

    @app.before_request
    def require_token():
        path = request.path
        if path.startswith("/api/v1") and not path.startswith(PUBLIC_PREFIXES):
            g.principal = authenticate(request.headers.get("Authorization"))

    @app.before_request
    def require_json_body():
        if request.method not in BODY_METHODS or not request.path.startswith("/api/v1"):
            return
        raw = files.get((request.method, request.path))
        if raw is not None:
            # A file: its own limit (set before anything reads the body), any media type.
            max_bytes = raw.max_bytes()
            if (request.content_length or 0) > max_bytes:
                raise raw.too_large(request.content_length)
            request.max_content_length = max_bytes
            g.raw_body = True
            return
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        if ((request.content_length or 0) > 0 or chunked) and not request.is_json:
            raise UnsupportedMediaType(
                f"the body must be JSON, not {request.mimetype or 'untyped'}",
                hint="send the header 'Content-Type: application/json'",
            )

    @app.before_request
    def refuse_unstorable_text():
        """Text PostgreSQL cannot store (app/storable.py), by name or pointer, not as a 500.
        Before the idempotency key is claimed: the refusal is no answer to remember."""
        if not request.path.startswith("/api/v1"):
            return
        parameters = list((request.view_args or {}).items())
        # The query string is parsed only when there is one (a submit has none).
        if request.environ.get("QUERY_STRING"):
            parameters.extend(request.args.items(multi=True))
        problems = {
            name: [found]
            for name, value in parameters
            if isinstance(value, str) and (found := storable.problem(value))
        }
        if (
            request.method in BODY_METHODS
            and not g.get("raw_body")
            and storable.may_hold_unstorable(request.get_data(cache=True))
        ):
            problems.update(storable.document_problems(request.get_json(silent=True)))
        storable.refuse(problems)


def _install_error_handlers(app: Flask, api: RunyardApi) -> Callable[[Exception], Any]:
    """Every error answers in the one error shape; the handler of the unexpected ones is
    returned for the idempotency hooks, whose own failures answer the same way."""

    @app.errorhandler(RunyardError)
    def domain_error(error: RunyardError):
        body = _body(
            error.status_code,
            HTTP_STATUS_CODES.get(error.status_code, "Error"),
            error.message,
            error.errors,
            # A service that has nothing specific to say still answers with a hint.
            error.hint or HTTP_HINTS.get(error.status_code, SPEC_HINT),
        )
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else {}
        # A 429 says when to come back (Retry-After, RateLimit-*), and so does a full 503.
        headers.update(getattr(error, "headers", {}))
        if isinstance(error, QuotaExceeded):
            g.quota_refused = error.limit  # counted by /metrics (app/metrics.py)
        return jsonify(body), error.status_code, headers

    @app.errorhandler(RecursionError)
    def too_deep(_error: RecursionError):
        body = _body(400, "Bad Request", "JSON nested too deeply", hint=HTTP_HINTS[400])
        return jsonify(body), 400

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        if isinstance(error, HTTPException):
            return api.handle_http_exception(error)
        if _is_database_down(error):
            return domain_error(
                Unavailable(
                    "the database cannot be reached",
                    hint="check DATABASE_URL and that PostgreSQL is up; GET /readyz tells more",
                )
            )
        if _is_pool_exhausted(error):
            return domain_error(
                Unavailable(
                    "the server is too busy: no database connection came free in time",
                    hint="send the request again in a few seconds (with the same "
                    "Idempotency-Key, if it had one)",
                )
            )
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = _body(
            500,
            "Internal Server Error",
            "internal error; see server logs",
            hint="retry later; if it persists, tell the operators the time of the request",
        )
        return jsonify(body), 500

    return unexpected


def _install_idempotency(app: Flask, error_response) -> None:
    """`Idempotency-Key` on a POST under /api/v1: the request runs in one transaction that holds
    the key (app/idempotency/services.py) and commits together with its answer; a repeat gets
    the stored answer. Every POST there takes a key: the creates, and cancel, pause, resume and
    trigger, where the first answer is the idempotent one. Not /hooks/<id>: deliveries have
    their own replay protection."""

    @app.before_request
    def idempotent_begin():
        key = request.headers.get(idempotency.HEADER)
        if (
            key is None
            or request.method != "POST"
            or request.url_rule is None
            or not request.path.startswith("/api/v1/")
        ):
            return None
        idempotency.check_key(key)
        hashed = idempotency.request_hash(
            request.method, request.path, request.get_data(cache=True)
        )
        org_id = current_principal().org_id
        transaction = db.begin_request()
        try:
            replay = idempotency.claim(transaction.connection, org_id, key, hashed)
        except BaseException:
            transaction.rollback()
            raise
        if replay is None:
            g.idempotency = (transaction, org_id, key)
            return None
        transaction.rollback()  # it wrote nothing
        response = jsonify(replay.body) if replay.body is not None else app.response_class()
        response.status_code = replay.status
        response.headers[idempotency.REPLAYED_HEADER] = "true"
        return response

    @app.after_request
    def idempotent_finish(response):
        claimed = g.pop("idempotency", None)
        if claimed is None:
            return response
        transaction, org_id, key = claimed
        # The request's session first: what it did not commit must not ride on our commit.
        close_request_session()
        if response.status_code >= 500 or response.status_code == 429:
            # The key stays free for a retry: after an outage, or once the quota allows.
            transaction.rollback()
            return response
        try:
            idempotency.record(
                transaction.connection,
                org_id,
                key,
                response.status_code,
                response.get_json(silent=True),
            )
            transaction.commit()
        except Exception as exc:
            transaction.rollback()
            return app.make_response(error_response(exc))
        return response

    @app.teardown_request
    def idempotent_abandon(_exc: BaseException | None):
        """An exception no handler turned into an answer: undo the request."""
        claimed = g.pop("idempotency", None)
        if claimed is not None:
            close_request_session()
            claimed[0].rollback()


def _is_database_down(error: Exception) -> bool:
    """Also psycopg's own errors: the hot statements run on the driver connection directly."""
    import psycopg
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(error, OperationalError | psycopg.OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def _is_pool_exhausted(error: Exception) -> bool:
    """Every pooled connection stayed checked out for the pool timeout: many requests each
    holding one (keyed requests waiting on one busy key, say). An overload, not a bug."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(error, PoolTimeout)


class ChunkedBodyLimit:
    """WSGI middleware: a chunked request body over the limit answers 413.

    Werkzeug applies MAX_CONTENT_LENGTH to a chunked body by cutting it at the limit without a
    word, which then reads as malformed JSON (400). Read such a body here instead, up to one
    byte past the limit (a RawBody route's own), and hand the application a plain, sized body.
    """

    def __init__(
        self, wsgi_app, max_bytes: int, raw: dict[tuple[str, str], RawBody] | None = None
    ) -> None:
        self.wsgi_app = wsgi_app
        self.max_bytes = max_bytes
        self.raw = raw if raw is not None else {}

    def __call__(self, environ, start_response):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            raw = self.raw.get((environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")))
            max_bytes = self.max_bytes if raw is None else raw.max_bytes()
            body = environ["wsgi.input"].read(max_bytes + 1)
            if len(body) > max_bytes:
                refused = None if raw is None else raw.too_large(None)
                payload = json.dumps(
                    _body(
                        413,
                        "Request Entity Too Large",
                        refused.message
                        if refused
                        else "request body too large (RUNYARD_MAX_BODY_BYTES)",
                        hint=refused.hint if refused else HTTP_HINTS[413],
                    )
                ).encode()
                start_response(
                    "413 REQUEST ENTITY TOO LARGE",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
                )
                return [payload]
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
        return self.wsgi_app(environ, start_response)


def request_session():
    """The request's ORM session, opened on first use and closed when the request ends."""
    if "session" not in g:
        g.session = db.session()
    return g.session


def close_request_session(_exc: BaseException | None = None) -> None:
    session = g.pop("session", None)
    if session is not None:
        try:
            session.close()
        except DATABASE_ERRORS:
            # The connection died under the request (PostgreSQL restarted or stopped): the pool
            # discards it. Raised from a teardown, this skipped the request's other teardowns
            # and left its thread answering 503 to every later request.
            log.warning("the request's database connection was lost", exc_info=True)


PAGINATION_KEYS = (
    "total",
    "total_pages",
    "first_page",
    "last_page",
    "page",
    "previous_page",
    "next_page",
)


class Blueprint(flask_smorest.Blueprint):
    """Lists page by 20 up to 100, and X-Pagination always carries all seven keys (null where
    there is no such page), so clients need not test for their presence."""

    DEFAULT_PAGINATION_PARAMETERS = {"page": 1, "page_size": 20, "max_page_size": 100}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prepare_doc_cbks.append(self._prepare_idempotency_doc)

    def _prepare_idempotency_doc(self, doc, _doc_info, *, method, **_kwargs):
        """Every POST under /api/v1 takes an Idempotency-Key (see _install_idempotency)."""
        if method != "post" or not (self.url_prefix or "").startswith("/api/v1"):
            return doc
        doc.setdefault("parameters", []).append(IDEMPOTENCY_PARAMETER)
        responses = doc.setdefault("responses", {})
        for status in HTTPStatus.CONFLICT, HTTPStatus.UNPROCESSABLE_ENTITY:
            if status.value not in responses and str(status.value) not in responses:
                responses[status.value] = status.name
        return doc

    def _document_pagination_metadata(self, spec, resp_doc):
        """The header's value is JSON text: documented as such (`content`), not as an object."""
        metadata = {"type": "integer", "nullable": True}
        resp_doc.setdefault("headers", {})[self.PAGINATION_HEADER_NAME] = {
            "description": "Pagination metadata (JSON); keys without such a page are null",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": list(PAGINATION_KEYS),
                        "properties": {key: metadata for key in PAGINATION_KEYS},
                    }
                }
            },
        }

    @staticmethod
    def _make_pagination_metadata(page, page_size, item_count):
        metadata = flask_smorest.Blueprint._make_pagination_metadata(page, page_size, item_count)
        return {key: metadata.get(key) for key in PAGINATION_KEYS}
