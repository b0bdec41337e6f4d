from flask.views import MethodView

from app.http import Blueprint, current_principal, request_session
from app.stats import services
from app.stats.schemas import AgentStatsSchema, StatsQuerySchema

blp = Blueprint(
    "stats", __name__, url_prefix="/api/v1/agents", description="Agent statistics and health"
)


@blp.route("/<ref>/stats")
class AgentStats(MethodView):
    @blp.doc(operationId="getAgentStats")
    @blp.arguments(StatsQuerySchema(), location="query")
    @blp.response(200, AgentStatsSchema())
    @blp.alt_response(404, description="no such agent in your organization")
    def get(self, args, ref):
        """An agent's counts, success rate, percentiles and health over a window

        Finished executions are counted from per-minute and per-hour rollups that beat keeps
        (plus the last seconds read live), so the answer takes milliseconds whatever the
        agent's volume. Percentiles are within 9% of the exact value."""
        return services.agent_stats(request_session(), current_principal(), ref, args["window"])
