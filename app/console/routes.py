"""The console's pages under /ui/: sign-in, overview, executions. Pages read and act through the
same services as the API (never over HTTP), as the signed-in token's organization and role."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, redirect, render_template, request, url_for

from app.catalog import services as catalog
from app.chains import progress
from app.config import current_config
from app.console import auth, sessions, views
from app.errors import NotFound, RunyardError
from app.executions import cancels, reruns
from app.executions import services as executions
from app.executions.models import STATUSES
from app.flow import services as flow
from app.http import request_session
from app.stats import activity

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/ui",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
bp.before_request(auth.check_request)
views.install(bp)

# Log lines an execution's page shows (the API's /logs pages through the rest).
PAGE_LOG_LINES = 2000


@bp.errorhandler(RunyardError)
def error_page(error: RunyardError):
    return render_template("error.html", error=error), error.status_code


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        try:
            session_id, _ = sessions.open_session(request.form.get("token", ""))
        except RunyardError as exc:
            error = exc.message
        else:
            response = redirect(auth.safe_next(request.form.get("next")))
            hours = current_config().ui_session_hours
            auth.set_cookie(response, auth.COOKIE, session_id, int(hours * 3600))
            response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/ui/")
            return response
    page = render_template("login.html", error=error, next=request.values.get("next", ""))
    response = Response(page, status=401 if error else 200)
    auth.set_cookie(response, auth.LOGIN_CSRF_COOKIE, auth.csrf_token(), 3600)
    return response


@bp.post("/logout")
def logout():
    sessions.close(request.cookies.get(auth.COOKIE))
    response = redirect(url_for("console.login"))
    response.delete_cookie(auth.COOKIE, path="/ui/")
    return response


@bp.get("/")
def overview():
    session, principal = request_session(), auth.principal()
    recent, _ = executions.list_executions(
        session, principal, agent=None, status=None, since=None, until=None, offset=0, limit=10
    )
    running, running_total = executions.list_executions(
        session, principal, agent=None, status="running", since=None, until=None, offset=0, limit=10
    )
    failed, _ = executions.list_executions(
        session, principal, agent=None, status="failed", since=None, until=None, offset=0, limit=5
    )
    return render_template(
        "overview.html",
        recent=recent,
        running=running,
        running_total=running_total,
        failed=failed,
        charts=_activity_charts(session, principal),
        queues=flow.queues(session, principal),
    )


def _activity_charts(session, principal) -> list[dict[str, Any]]:
    """Executions per minute and failure rate, over the last hour (by minute) and the last day
    (by hour: executions per minute averaged over each hour)."""
    charts = []
    for name, heading, fmt, per in (
        ("1h", "Last hour, by minute", "%H:%M", 1),
        ("24h", "Last day, by hour", "%m-%d %H:00", 60),
    ):
        buckets = activity.series(session, principal, name)
        finished = sum(b.finished for b in buckets)
        failures = sum(b.failures for b in buckets)
        charts.append(
            {
                "name": name,
                "heading": heading,
                "finished": finished,
                "failures": failures,
                "rate": [(b.start.strftime(fmt), round(b.finished / per, 2)) for b in buckets],
                "failure_rate": [
                    (
                        b.start.strftime(fmt),
                        None if b.failure_rate is None else round(100 * b.failure_rate, 1),
                    )
                    for b in buckets
                ],
            }
        )
    return charts


@bp.get("/executions")
def execution_list():
    filters = views.execution_filters(request.args)
    if filters.pop("execution_id", None):  # q named an execution: go to it
        return redirect(url_for("console.execution_page", execution_id=request.args["q"].strip()))
    pager = views.Pager.from_args(request.args)
    items, total = executions.list_executions(
        request_session(),
        auth.principal(),
        until=None,
        offset=pager.offset,
        limit=pager.size,
        **filters,
    )
    pager.total = total
    return render_template(
        "executions.html", items=items, pager=pager, filters=request.args, statuses=STATUSES
    )


def _execution_context(execution_id: str) -> dict[str, Any]:
    session, principal = request_session(), auth.principal()
    execution = executions.present(executions.get(session, principal, execution_id))
    lines = executions.logs(
        session,
        principal,
        execution_id,
        level=None,
        q=None,
        after_seq=None,
        limit=PAGE_LOG_LINES,
    )
    return {
        "e": execution,
        "lines": lines,
        "attempts": executions.attempts(session, principal, execution_id),
        "journal": executions.journal(session, principal, execution_id),
        "live": execution["status"] in ("queued", "running", "waiting"),
        # A run through the catalog: the agent is another organization's (no page of ours).
        "catalog_owner": catalog.owner_elsewhere(session, principal, execution["agent_id"]),
    }


@bp.get("/executions/<execution_id>")
def execution_page(execution_id: str):
    return render_template("execution.html", **_execution_context(execution_id))


@bp.get("/executions/<execution_id>/live")
def execution_live(execution_id: str):
    """The part of the page that changes while the execution runs: htmx polls it every second
    and swaps it in; once the execution has ended the fragment carries no poll, so it stops."""
    return render_template("execution_live.html", **_execution_context(execution_id))


@bp.post("/executions/<execution_id>/cancel")
def execution_cancel(execution_id: str):
    cancels.cancel(
        request_session(), auth.principal(), execution_id, move_chains_on=progress.move_on
    )
    return redirect(url_for("console.execution_page", execution_id=execution_id), 303)


@bp.post("/executions/<execution_id>/rerun")
def execution_rerun(execution_id: str):
    new = reruns.rerun(request_session(), auth.principal(), execution_id, version=reruns.SAME)
    return redirect(url_for("console.execution_page", execution_id=new["id"]), 303)


@bp.route("/<path:unknown>")
def not_found(unknown: str):
    raise NotFound(f"no page /ui/{unknown}", hint="the menu above lists the pages")
