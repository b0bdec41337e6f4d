from flask import Response, request
from flask.views import MethodView

from app.chains import progress
from app.executions import events, services
from app.executions.schemas import (
    AttemptSchema,
    BatchSchema,
    BatchSubmitSchema,
    EventStreamHeadersSchema,
    ExecutionQuerySchema,
    ExecutionSchema,
    LogLineSchema,
    LogQuerySchema,
    SubmitSchema,
)
from app.executions.tracecontext import parse_traceparent
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("executions", __name__, url_prefix="/api/v1", description="Executions")


def _traceparent() -> str | None:
    return parse_traceparent(request.headers.get("traceparent"))


@blp.route("/agents/<ref>/executions")
class Submit(MethodView):
    @blp.arguments(SubmitSchema())
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(404, description="no such agent or version")
    @blp.alt_response(
        409,
        description="the agent is archived, or its concurrency key is full and its "
        "concurrency.on_limit is reject: nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, ref):
        """Run an agent: the execution is stored, queued and answered at once

        Past the organization's max_running or the agent's concurrency or rate_limit it waits,
        `queued`, and `waiting_for` says why. A W3C `traceparent` header is kept with the
        execution and handed to the runtime (ctx.traceparent, TRACEPARENT, the http runtime's
        header); a malformed one is ignored."""
        return services.submit(
            current_principal(),
            ref,
            data["input"],
            version=data.get("version"),
            priority=data["priority"],
            traceparent=_traceparent(),
        )


@blp.route("/agents/<ref>/executions/batch")
class SubmitBatch(MethodView):
    @blp.arguments(BatchSubmitSchema())
    @blp.response(202, BatchSchema())
    @blp.alt_response(404, description="no such agent or version")
    @blp.alt_response(
        409,
        description="the agent is archived, or its concurrency key is full and its "
        "concurrency.on_limit is reject: nothing stored",
    )
    @blp.alt_response(
        422,
        description="an item's input fails the input schema, or the batch is larger than "
        "max_queued: nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, ref):
        """Run an agent on many inputs: all stored and queued at once, or none

        Errors are keyed `/items/<i>/input/...`. Published to the broker in bulk; an
        `Idempotency-Key` covers the whole batch; a `traceparent` header goes with every item."""
        ids = services.submit_batch(
            current_principal(),
            ref,
            data["items"],
            version=data.get("version"),
            traceparent=_traceparent(),
        )
        return {"ids": ids}


@blp.route("/executions")
class Executions(MethodView):
    @blp.arguments(ExecutionQuerySchema(), location="query")
    @blp.response(200, ExecutionSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List executions, newest first"""
        items, total = services.list_executions(
            request_session(),
            current_principal(),
            agent=args.get("agent"),
            status=args.get("status"),
            since=args.get("since"),
            until=args.get("until"),
            chain_execution_id=args.get("chain_execution_id"),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]


@blp.route("/executions/<execution_id>")
class ExecutionById(MethodView):
    @blp.response(200, ExecutionSchema())
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, execution_id):
        """Read an execution"""
        return services.present(services.get(request_session(), current_principal(), execution_id))


@blp.route("/executions/<execution_id>/cancel")
class Cancel(MethodView):
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(404, description="no such execution in your organization")
    @blp.alt_response(409, description="the execution has finished")
    def post(self, execution_id):
        """Cancel: a queued execution never starts, a running one is asked to stop"""
        cancelled = services.cancel(
            request_session(),
            current_principal(),
            execution_id,
            # A queued chain step ended here: its chain moves on from here too.
            move_chains_on=progress.move_on,
        )
        return services.present(cancelled)


@blp.route("/executions/<execution_id>/attempts")
class Attempts(MethodView):
    @blp.response(200, AttemptSchema(many=True))
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, execution_id):
        """Every attempt of an execution, oldest first, each with its own error and worker"""
        return services.attempts(request_session(), current_principal(), execution_id)


@blp.route("/executions/<execution_id>/logs")
class Logs(MethodView):
    @blp.arguments(LogQuerySchema(), location="query")
    @blp.response(200, LogLineSchema(many=True))
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, args, execution_id):
        """Log lines in seq order: what the agent printed and logged through ctx.log"""
        return services.logs(
            request_session(),
            current_principal(),
            execution_id,
            level=args.get("level"),
            q=args.get("q"),
            after_seq=args.get("after_seq"),
            limit=args["limit"],
        )


@blp.route("/executions/<execution_id>/events")
class Events(MethodView):
    @blp.arguments(EventStreamHeadersSchema(), location="headers")
    @blp.response(200, content_type="text/event-stream")
    @blp.doc(responses=events.stream_doc(["log", "status", "end"]))
    @blp.alt_response(404, description="no such execution in your organization")
    @blp.alt_response(503, description=events.STREAMS_FULL, headers=events.STREAMS_FULL_HEADERS)
    def get(self, headers, execution_id):
        """Live events (Server-Sent Events): log lines, status changes, then `end`

        First what already happened: every log line (`event: log`, `id:` its seq, `data:` the
        line as /logs shows it) and the current `event: status` (`data`: `{"status", "attempt",
        "progress", "waiting_for"}`); then the same live, a status event on every change, and a
        last `event: end` (`data`: the execution as GET shows it), after which the server
        closes. `Last-Event-ID` resumes after that seq. A `: keepalive` comment line comes every
        RUNYARD_STREAM_KEEPALIVE_SECONDS (15) while nothing happens."""
        execution = services.get(request_session(), current_principal(), execution_id)
        stream = events.Stream(
            events.EXECUTION,
            execution.id,
            events.execution_events(
                execution.org_id, execution.id, headers.get("last_event_id", 0)
            ),
        )
        return Response(
            stream,
            mimetype="text/event-stream",
            # No proxy may buffer or cache a live stream (nginx reads X-Accel-Buffering).
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
