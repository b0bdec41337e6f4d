from flask import Response, request
from flask.views import MethodView

from app.agents.schemas import DiffQuerySchema, RollbackSchema, VersionDiffSchema
from app.chains import events, launch, lifecycle, progress, reruns, services
from app.chains.schemas import (
    ChainCreateSchema,
    ChainExecutionQuerySchema,
    ChainExecutionSchema,
    ChainPatchSchema,
    ChainQuerySchema,
    ChainRerunSchema,
    ChainSchema,
    ChainSubmitSchema,
    ChainVersionSchema,
)
from app.executions.events import (
    STREAMS_FULL,
    STREAMS_FULL_HEADERS,
    Stream,
    stream_doc,
)
from app.executions.tracecontext import parse_traceparent
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("chains", __name__, url_prefix="/api/v1", description="Chains and their executions")


@blp.route("/chains")
class Chains(MethodView):
    @blp.arguments(ChainQuerySchema(), location="query")
    @blp.response(200, ChainSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List chains, newest first"""
        session = request_session()
        items, total = services.list_chains(
            session,
            current_principal(),
            include_archived=args["archived"],
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.describe(session, chain) for chain in items]

    @blp.arguments(ChainCreateSchema())
    @blp.response(201, ChainSchema())
    @blp.alt_response(409, description="a chain of that name exists")
    @blp.alt_response(
        422, description="the definition does not check; `errors` names the step and the field"
    )
    def post(self, data):
        """Create a chain and its first version, checked before anything runs"""
        session = request_session()
        chain = services.create(session, current_principal(), data)
        session.commit()
        return services.describe(session, chain)


@blp.route("/chains/<ref>")
class ChainByRef(MethodView):
    @blp.response(200, ChainSchema())
    @blp.alt_response(404, description="no such chain in your organization")
    def get(self, ref):
        """Read a chain by id or name"""
        session = request_session()
        return services.describe(session, services.resolve(session, current_principal(), ref))

    @blp.arguments(ChainPatchSchema())
    @blp.response(200, ChainSchema())
    @blp.alt_response(404, description="no such chain in your organization")
    @blp.alt_response(409, description="the chain is archived")
    def patch(self, data, ref):
        """Change a chain; a change to input_schema, steps or on_failure makes a new version"""
        session = request_session()
        changelog = data.pop("changelog", None)
        chain = services.update(session, current_principal(), ref, data, changelog=changelog)
        session.commit()
        return services.describe(session, chain)

    @blp.response(204)
    @blp.alt_response(404, description="no such chain in your organization")
    def delete(self, ref):
        """Archive a chain: its executions stay readable, new ones answer 409"""
        session = request_session()
        services.archive(session, current_principal(), ref)
        session.commit()


@blp.route("/chains/<ref>/versions")
class ChainVersions(MethodView):
    @blp.response(200, ChainVersionSchema(many=True))
    @blp.alt_response(404, description="no such chain in your organization")
    @blp.paginate()
    def get(self, ref, pagination_parameters):
        """List a chain's versions, newest first"""
        items, total = services.list_versions(
            request_session(),
            current_principal(),
            ref,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/chains/<ref>/versions/<version>")
class ChainVersionByNumber(MethodView):
    @blp.response(200, ChainVersionSchema())
    @blp.alt_response(404, description="no such chain or version")
    def get(self, ref, version):
        """Read one chain version"""
        return services.get_version(request_session(), current_principal(), ref, version)


@blp.route("/chains/<ref>/rollback")
class ChainRollback(MethodView):
    @blp.arguments(RollbackSchema())
    @blp.response(200, ChainSchema())
    @blp.alt_response(404, description="no such chain or version")
    @blp.alt_response(409, description="the chain is archived")
    def post(self, data, ref):
        """Make an earlier chain version current again

        No version is made; the next versioned PATCH is numbered after the highest version.
        """
        session = request_session()
        chain = lifecycle.rollback(session, current_principal(), ref, data["version"])
        session.commit()
        return services.describe(session, chain)


@blp.route("/chains/<ref>/versions/<version>/diff")
class ChainVersionDiff(MethodView):
    @blp.arguments(DiffQuerySchema(), location="query")
    @blp.response(200, VersionDiffSchema())
    @blp.alt_response(404, description="no such chain or version")
    def get(self, args, ref, version):
        """Compare two chain versions

        The RFC 6902 operations that turn version `against` into this one, and which of them
        can break a caller of `against` (its input_schema; see `breaking`).
        """
        return lifecycle.diff(
            request_session(), current_principal(), ref, version, args.get("against")
        )


@blp.route("/chains/<ref>/executions")
class ChainSubmit(MethodView):
    @blp.arguments(ChainSubmitSchema())
    @blp.response(202, ChainExecutionSchema())
    @blp.alt_response(404, description="no such chain or version")
    @blp.alt_response(409, description="the chain, or an agent of a step, is archived")
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, ref):
        """Run a chain: the chain execution is stored and its canvas published

        A W3C `traceparent` header is kept with every step's execution and handed to its
        runtime (a malformed one is ignored)."""
        session = request_session()
        execution = launch.submit(
            session,
            current_principal(),
            ref,
            data["input"],
            version=data.get("version"),
            priority=data["priority"],
            traceparent=parse_traceparent(request.headers.get("traceparent")),
        )
        return services.present(session, execution)


@blp.route("/chain-executions")
class ChainExecutions(MethodView):
    @blp.arguments(ChainExecutionQuerySchema(), location="query")
    @blp.response(200, ChainExecutionSchema(many=True))
    @blp.alt_response(404, description="the `chain` filter names no chain of yours")
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List chain executions, newest first"""
        session = request_session()
        items, total = services.list_executions(
            session,
            current_principal(),
            chain=args.get("chain"),
            status=args.get("status"),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(session, item) for item in items]


@blp.route("/chain-executions/<execution_id>")
class ChainExecutionById(MethodView):
    @blp.response(200, ChainExecutionSchema())
    @blp.alt_response(404, description="no such chain execution in your organization")
    def get(self, execution_id):
        """Read a chain execution with the status of every step"""
        session = request_session()
        return services.present(
            session, services.get_execution(session, current_principal(), execution_id)
        )


@blp.route("/chain-executions/<execution_id>/cancel")
class ChainCancel(MethodView):
    @blp.response(202, ChainExecutionSchema())
    @blp.alt_response(404, description="no such chain execution in your organization")
    @blp.alt_response(409, description="the chain execution has finished")
    def post(self, execution_id):
        """Cancel: running steps are stopped, steps not started are skipped"""
        session = request_session()
        return services.present(
            session, progress.cancel(session, current_principal(), execution_id)
        )


@blp.route("/chain-executions/<execution_id>/rerun")
class ChainRerun(MethodView):
    @blp.arguments(ChainRerunSchema())
    @blp.response(202, ChainExecutionSchema())
    @blp.alt_response(404, description="no such chain execution in your organization")
    @blp.alt_response(409, description="the original has not finished, or the chain is archived")
    @blp.alt_response(
        422,
        description="`from` names no step, or is `failed` when every step succeeded, or a "
        "step before the point did not succeed or was compensated",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, execution_id):
        """Rerun a finished chain execution from a step, reusing the outputs before it

        The steps before the point read `reused` (their outputs are the original's, no worker
        runs them, and they are not compensated here); the rest run with the original's chain
        and agent versions. The new chain execution carries `rerun_of`."""
        session = request_session()
        execution = reruns.rerun(session, current_principal(), execution_id, start=data["from"])
        return services.present(session, execution)


@blp.route("/chain-executions/<execution_id>/events")
class ChainEvents(MethodView):
    @blp.response(200, content_type="text/event-stream")
    @blp.doc(responses=stream_doc(["step", "compensation", "end"]))
    @blp.alt_response(404, description="no such chain execution in your organization")
    @blp.alt_response(503, description=STREAMS_FULL, headers=STREAMS_FULL_HEADERS)
    def get(self, execution_id):
        """Live events (Server-Sent Events) of a chain execution: its steps, then `end`

        `event: step` (`data`: the step as in the chain execution's `steps`) first for every
        step, then on every change of one; `event: compensation` likewise for `compensations`;
        a last `event: end` (`data`: the chain execution as GET shows it), after which the
        server closes. Changes show within about a second. A `: keepalive` comment line comes
        every RUNYARD_STREAM_KEEPALIVE_SECONDS (15) while nothing happens."""
        execution = services.get_execution(request_session(), current_principal(), execution_id)
        stream = Stream(
            events.CHAIN, execution.id, events.chain_events(execution.org_id, execution.id)
        )
        return Response(
            stream,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
