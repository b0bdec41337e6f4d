from flask import Response, request
from flask.views import MethodView

from app.chains import progress
from app.durable import children
from app.executions import assignment, cancels, events, logs, reruns, services
from app.executions.schemas import (
    AssignedSubmitSchema,
    AttemptSchema,
    BatchSchema,
    BatchSubmitSchema,
    BulkRerunResultSchema,
    BulkRerunSchema,
    EventStreamHeadersSchema,
    ExecutionQuerySchema,
    ExecutionSchema,
    JournalEntrySchema,
    LogLineSchema,
    LogQuerySchema,
    LogSearchLineSchema,
    LogSearchQuerySchema,
    RerunSchema,
    SubmitSchema,
)
from app.executions.tracecontext import parse_traceparent
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("executions", __name__, url_prefix="/api/v1", description="Executions")

EXPORT_DESCRIPTION = (
    "the lines: a JSON array (the default format), or a streamed download with format=ndjson "
    "(a JSON object a line) or format=csv (a header, then seq,ts,level,message,fields,attempt)"
)


def _traceparent() -> str | None:
    return parse_traceparent(request.headers.get("traceparent"))


@blp.route("/agents/<ref>/executions")
class Submit(MethodView):
    @blp.doc(operationId="submitExecution")
    @blp.arguments(SubmitSchema())
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(404, description="no such agent or version")
    @blp.alt_response(
        409,
        description="the agent is archived, or its concurrency key is full and its "
        "concurrency.on_limit is reject: nothing stored",
    )
    @blp.alt_response(
        422,
        description="the input fails the input schema, or `documents` names one that is not "
        "the organization's (keyed /documents/<n>): nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, ref):
        """Run an agent: the execution is stored, queued and answered at once

        Past the organization's max_running or the agent's concurrency or rate_limit it waits,
        `queued`, and `waiting_for` says why. A W3C `traceparent` header is kept with the
        execution and handed to the runtime (ctx.traceparent, TRACEPARENT, the http runtime's
        header); a malformed one is ignored. Made with an execution's own token
        (RUNYARD_EXECUTION_TOKEN), the new execution is that execution's child."""
        principal = current_principal()
        if principal.execution_id is not None:
            child_id = children.start_over_api(principal, ref, data["input"], data.get("version"))
            return services.present(services.get(request_session(), principal, child_id))
        return services.submit(
            principal,
            ref,
            data["input"],
            version=data.get("version"),
            priority=data["priority"],
            traceparent=_traceparent(),
            documents=data.get("documents"),
        )


@blp.route("/agents/<ref>/executions/batch")
class SubmitBatch(MethodView):
    @blp.doc(operationId="submitExecutionBatch")
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
        description="an item's input fails the input schema, an item's `documents` names one "
        "that is not the organization's (keyed /items/<i>/documents/<n>), or the batch is "
        "larger than max_queued: nothing stored",
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
    @blp.doc(operationId="listExecutions")
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

    @blp.doc(operationId="submitExecutionByCapability")
    @blp.arguments(AssignedSubmitSchema())
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(
        409,
        description="no agent of the organization has the capability (with the provider and "
        "chain asked for), or the one chosen has a full concurrency key with on_limit reject: "
        "nothing stored",
    )
    @blp.alt_response(
        422,
        description="every agent with the capability refuses the input: `errors` keyed by "
        "agent name, each its input_schema's errors; nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data):
        """Run an input on whichever agent has the capability, the least loaded

        Among the organization's agents with the capability (and the provider and chain, when
        given) whose input_schema accepts the input, the one with the fewest executions queued
        and running runs it; equal loads take turns. The execution's `assigned_by` says who
        was considered. Made with an execution's own token, the new execution is that
        execution's child (as on submitExecution), without `assigned_by`."""
        principal = current_principal()
        if principal.execution_id is not None:
            agent, _ = assignment.choose(
                principal,
                data["capability"],
                data["input"],
                provider=data.get("provider"),
                chain=data.get("chain"),
            )
            child_id = children.start_over_api(principal, agent, data["input"], None)
            return services.present(services.get(request_session(), principal, child_id))
        return assignment.submit_by_capability(
            principal,
            data["capability"],
            data["input"],
            provider=data.get("provider"),
            chain=data.get("chain"),
            priority=data["priority"],
            traceparent=_traceparent(),
        )


@blp.route("/executions/<execution_id>")
class ExecutionById(MethodView):
    @blp.doc(operationId="getExecution")
    @blp.response(200, ExecutionSchema())
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, execution_id):
        """Read an execution, with the documents it was handed"""
        session = request_session()
        execution = services.get(session, current_principal(), execution_id)
        return services.present_in_full(session, execution)


@blp.route("/executions/<execution_id>/cancel")
class Cancel(MethodView):
    @blp.doc(operationId="cancelExecution")
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(404, description="no such execution in your organization")
    @blp.alt_response(409, description="the execution has finished")
    def post(self, execution_id):
        """Cancel: a queued execution never starts, a running one is asked to stop"""
        cancelled = cancels.cancel(
            request_session(),
            current_principal(),
            execution_id,
            # A queued chain step ended here: its chain moves on from here too.
            move_chains_on=progress.move_on,
        )
        return services.present(cancelled)


@blp.route("/executions/<execution_id>/journal")
class Journal(MethodView):
    @blp.doc(operationId="listExecutionJournal")
    @blp.response(200, JournalEntrySchema(many=True))
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, execution_id):
        """The durable calls an execution recorded, in order (steps, children, sleeps, event
        waits): what a replay answers from"""
        return services.journal(request_session(), current_principal(), execution_id)


@blp.route("/executions/<execution_id>/attempts")
class Attempts(MethodView):
    @blp.doc(operationId="listExecutionAttempts")
    @blp.response(200, AttemptSchema(many=True))
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, execution_id):
        """Every attempt of an execution, oldest first, each with its own error and worker"""
        return services.attempts(request_session(), current_principal(), execution_id)


@blp.route("/executions/<execution_id>/logs")
class Logs(MethodView):
    @blp.doc(operationId="listExecutionLogs")
    @blp.arguments(LogQuerySchema(), location="query")
    @blp.response(200, LogLineSchema(many=True))
    @blp.alt_response(
        200,
        schema={"type": "string"},
        content_type="application/x-ndjson",
        description=EXPORT_DESCRIPTION,
        success=True,
    )
    @blp.alt_response(
        200,
        schema={"type": "string"},
        content_type="text/csv",
        description=EXPORT_DESCRIPTION,
        success=True,
    )
    @blp.alt_response(404, description="no such execution in your organization")
    def get(self, args, execution_id):
        """Log lines in seq order: what the agent printed and logged through ctx.log

        `format=ndjson` or `format=csv` streams every line instead (a download, no cap, pages
        of 5,000 lines read as it goes); the 404 comes before the first byte."""
        filters = {
            "level": args.get("level"),
            "q": args.get("q"),
            "after_seq": args.get("after_seq"),
        }
        if args["format"] == "json":
            return services.logs(
                request_session(),
                current_principal(),
                execution_id,
                limit=args["limit"],
                **filters,
            )
        execution = services.get(request_session(), current_principal(), execution_id)
        # Not stream_with_context: the stream reads in transactions of its own, and the
        # request's session (and its pooled connection) is closed before the first byte.
        return Response(
            logs.export(execution.id, args["format"], **filters),
            content_type=logs.EXPORT_MEDIA_TYPES[args["format"]],
            headers={
                "Content-Disposition": f'attachment; filename="{execution.id}-logs.'
                f'{args["format"]}"'
            },
        )


@blp.route("/logs")
class LogSearch(MethodView):
    @blp.doc(operationId="searchLogs")
    @blp.arguments(LogSearchQuerySchema(), location="query")
    @blp.response(200, LogSearchLineSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """Search the log lines of all the organization's executions, newest first

        X-Pagination's total counts up to 10,000 matching lines (pages stop there: narrow with
        since/until to go further back). An execution_id or agent of another organization
        matches nothing (an empty list, not a 404)."""
        items, total = logs.search(
            request_session(),
            current_principal(),
            **args,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/executions/<execution_id>/rerun")
class Rerun(MethodView):
    @blp.doc(operationId="rerunExecution")
    @blp.arguments(RerunSchema())
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(
        404, description="no such execution in your organization, or the agent lacks `version`"
    )
    @blp.alt_response(
        409,
        description="the original has not finished (queued or running), or its agent is "
        "archived, or its concurrency key is full under on_limit reject: nothing stored",
    )
    @blp.alt_response(422, description="the input fails the chosen version's input_schema")
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, execution_id):
        """Rerun a finished execution: a new execution, submitted as POST .../executions would

        Same input and version unless given; the new execution carries `rerun_of`. It obeys
        quotas, concurrency and rate limits (`waiting_for`) and takes an `Idempotency-Key`."""
        return reruns.rerun(
            request_session(),
            current_principal(),
            execution_id,
            payload=data.get("input"),
            version=data["version"],
            traceparent=_traceparent(),
        )


@blp.route("/executions/rerun")
class BulkRerun(MethodView):
    @blp.doc(operationId="rerunExecutions")
    @blp.arguments(BulkRerunSchema())
    @blp.response(202, BulkRerunResultSchema())
    @blp.alt_response(200, schema=BulkRerunResultSchema(), description="a dry run: the count")
    @blp.alt_response(404, description="an agent matched lacks `version`: nothing stored")
    @blp.alt_response(
        409, description="an agent matched is archived, or under on_limit reject: nothing stored"
    )
    @blp.alt_response(
        422,
        description="a bad filter (unknown or unfinished status, finished_after later than "
        "finished_before), or an original's input fails the chosen version's input_schema "
        "(keyed /executions/<id>/input/...): nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data):
        """Rerun every finished execution a filter matches, in one transaction

        `matched` counts every match; at most `max` (default 1000), those that finished first,
        are rerun, all or none, admitted by quotas as one batch. A dry run answers 200 with
        the count only."""
        result = reruns.rerun_matching(
            request_session(),
            current_principal(),
            reruns.describe_filter(data["filter"]),
            version=data["version"],
            dry_run=data["dry_run"],
            limit=data["limit"],
            traceparent=_traceparent(),
        )
        return result, 200 if data["dry_run"] else 202


@blp.route("/executions/<execution_id>/events")
class Events(MethodView):
    @blp.doc(operationId="streamExecutionEvents")
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
