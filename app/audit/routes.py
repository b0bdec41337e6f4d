from flask.views import MethodView

from app.audit import services
from app.audit.schemas import AuditEventSchema, AuditQuerySchema
from app.http import Blueprint, current_principal, request_session

blp = Blueprint("audit", __name__, url_prefix="/api/v1", description="The audit trail")


@blp.route("/audit")
class Audit(MethodView):
    @blp.arguments(AuditQuerySchema(), location="query")
    @blp.response(200, AuditEventSchema(many=True))
    @blp.alt_response(403, description="only an admin reads the audit trail")
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """The organization's audit trail, newest first (admin)

        One event per state-changing request or admin command, hash-chained per organization:
        `runyard audit verify ORG` checks the chain."""
        principal = current_principal()
        principal.require("audit:read")
        items, total = services.list_events(
            request_session(),
            principal.org_id,
            **args,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items
