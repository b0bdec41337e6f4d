from flask.views import MethodView

from app.agents import lifecycle, services
from app.agents.schemas import (
    AgentCreateSchema,
    AgentPatchSchema,
    AgentQuerySchema,
    AgentSchema,
    AgentVersionSchema,
    DiffQuerySchema,
    RollbackSchema,
    VersionDiffSchema,
)
from app.chains.lifecycle import update_agent
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("agents", __name__, url_prefix="/api/v1/agents", description="Agents and versions")


@blp.route("")
class Agents(MethodView):
    @blp.arguments(AgentQuerySchema(), location="query")
    @blp.response(200, AgentSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List agents, newest first"""
        session, principal = request_session(), current_principal()
        items, total = services.list_agents(
            session,
            principal,
            q=args.get("q"),
            tag=args.get("tag"),
            capability=args.get("capability"),
            include_archived=args["archived"],
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.describe(session, agent, principal.role) for agent in items]

    @blp.arguments(AgentCreateSchema())
    @blp.response(201, AgentSchema())
    @blp.alt_response(409, description="an agent of that name exists")
    def post(self, data):
        """Create an agent and its first version"""
        session, principal = request_session(), current_principal()
        agent = services.create(session, principal, data)
        session.commit()
        return services.describe(session, agent, principal.role)


@blp.route("/<ref>")
class AgentByRef(MethodView):
    @blp.response(200, AgentSchema())
    @blp.alt_response(404, description="no such agent in your organization")
    def get(self, ref):
        """Read an agent by id or name"""
        session, principal = request_session(), current_principal()
        agent = services.resolve(session, principal, ref)
        return services.describe(session, agent, principal.role)

    @blp.arguments(AgentPatchSchema())
    @blp.response(200, AgentSchema())
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.alt_response(
        409,
        description="the agent is archived, or the new version would break a chain that runs "
        "the agent unpinned (`errors` key `chain:<name>`) or refuse an input of one of its "
        "latest 100 succeeded executions (`execution:<id>`); `force: true` goes ahead",
    )
    def patch(self, data, ref):
        """Change an agent; a versioned change makes a new immutable version"""
        session, principal = request_session(), current_principal()
        agent = update_agent(session, principal, ref, data)
        session.commit()
        return services.describe(session, agent, principal.role)

    @blp.response(204)
    @blp.alt_response(404, description="no such agent in your organization")
    def delete(self, ref):
        """Archive an agent: its executions stay readable, new ones answer 409"""
        session = request_session()
        services.archive(session, current_principal(), ref)
        session.commit()


@blp.route("/<ref>/versions")
class AgentVersions(MethodView):
    @blp.response(200, AgentVersionSchema(many=True))
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.paginate()
    def get(self, ref, pagination_parameters):
        """List an agent's versions, newest first"""
        principal = current_principal()
        items, total = services.list_versions(
            request_session(),
            principal,
            ref,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present_version(item, principal.role) for item in items]


@blp.route("/<ref>/versions/<version>")
class AgentVersionByNumber(MethodView):
    @blp.response(200, AgentVersionSchema())
    @blp.alt_response(404, description="no such agent or version")
    def get(self, ref, version):
        """Read one version with its full definition"""
        principal = current_principal()
        found = services.get_version(request_session(), principal, ref, version)
        return services.present_version(found, principal.role)


@blp.route("/<ref>/rollback")
class AgentRollback(MethodView):
    @blp.arguments(RollbackSchema())
    @blp.response(200, AgentSchema())
    @blp.alt_response(404, description="no such agent or version")
    @blp.alt_response(409, description="the agent is archived")
    def post(self, data, ref):
        """Make an earlier version current again

        No version is made; the next versioned PATCH is numbered after the highest version.
        """
        session, principal = request_session(), current_principal()
        agent = lifecycle.rollback(session, principal, ref, data["version"])
        session.commit()
        return services.describe(session, agent, principal.role)


@blp.route("/<ref>/versions/<version>/diff")
class AgentVersionDiff(MethodView):
    @blp.arguments(DiffQuerySchema(), location="query")
    @blp.response(200, VersionDiffSchema())
    @blp.alt_response(404, description="no such agent or version")
    def get(self, args, ref, version):
        """Compare two versions

        The RFC 6902 operations that turn version `against` into this one, and which of them
        can break a caller of `against` (see `breaking`).
        """
        return lifecycle.diff(
            request_session(), current_principal(), ref, version, args.get("against")
        )
