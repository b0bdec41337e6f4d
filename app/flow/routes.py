from flask.views import MethodView

from app.flow import services
from app.flow.schemas import UsageSchema
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("flow", __name__, url_prefix="/api/v1", description="Limits and usage")


@blp.route("/usage")
class Usage(MethodView):
    @blp.doc(operationId="getUsage")
    @blp.response(200, UsageSchema())
    def get(self):
        """The organization's limits, what it uses of them, and its queues

        Any role may read it. Limits are set by whoever runs the installation
        (`runyard orgs limits`); a limit that is not set reads `null`. `queues` lists the
        queues holding the organization's executions not yet started, with the age of the
        oldest."""
        return services.usage(request_session(), current_principal())
