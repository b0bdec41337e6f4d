from flask.views import MethodView

from app.agents import services
from app.agents.schemas import (
    AgentCreateSchema,
    AgentPatchSchema,
    AgentQuerySchema,
    AgentSchema,
    AgentVersionSchema,
)
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("agents", __name__, url_prefix="/api/v1/agents", description="Agents and versions")


@blp.route("")
class Agents(MethodView):
    @blp.doc(operationId="listAgents")
    @blp.arguments(AgentQuerySchema(), location="query")
    @blp.response(200, AgentSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List agents, newest first"""
        session = request_session()
        items, total = services.list_agents(
            session,
            current_principal(),
            q=args.get("q"),
            tag=args.get("tag"),
            capability=args.get("capability"),
            include_archived=args["archived"],
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.describe(session, agent) for agent in items]

    @blp.doc(operationId="createAgent")
    @blp.arguments(AgentCreateSchema())
    @blp.response(201, AgentSchema())
    @blp.alt_response(409, description="an agent of that name exists")
    def post(self, data):
        """Create an agent and its first version"""
        session = request_session()
        agent = services.create(session, current_principal(), data)
        session.commit()
        return services.describe(session, agent)


@blp.route("/<ref>")
class AgentByRef(MethodView):
    @blp.doc(operationId="getAgent")
    @blp.response(200, AgentSchema())
    @blp.alt_response(404, description="no such agent in your organization")
    def get(self, ref):
        """Read an agent by id or name"""
        session = request_session()
        return services.describe(session, services.resolve(session, current_principal(), ref))

    @blp.doc(operationId="updateAgent")
    @blp.arguments(AgentPatchSchema())
    @blp.response(200, AgentSchema())
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.alt_response(409, description="the agent is archived")
    def patch(self, data, ref):
        """Change an agent; a versioned change makes a new immutable version"""
        session = request_session()
        agent = services.update(session, current_principal(), ref, data)
        session.commit()
        return services.describe(session, agent)

    @blp.doc(operationId="archiveAgent")
    @blp.response(204)
    @blp.alt_response(404, description="no such agent in your organization")
    def delete(self, ref):
        """Archive an agent: its executions stay readable, new ones answer 409"""
        session = request_session()
        services.archive(session, current_principal(), ref)
        session.commit()


@blp.route("/<ref>/versions")
class AgentVersions(MethodView):
    @blp.doc(operationId="listAgentVersions")
    @blp.response(200, AgentVersionSchema(many=True))
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.paginate()
    def get(self, ref, pagination_parameters):
        """List an agent's versions, newest first"""
        items, total = services.list_versions(
            request_session(),
            current_principal(),
            ref,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<ref>/versions/<version>")
class AgentVersionByNumber(MethodView):
    @blp.doc(operationId="getAgentVersion")
    @blp.response(200, AgentVersionSchema())
    @blp.alt_response(404, description="no such agent or version")
    def get(self, ref, version):
        """Read one version with its full definition"""
        return services.get_version(request_session(), current_principal(), ref, version)
