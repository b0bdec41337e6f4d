from flask.views import MethodView

from app.fleet import services
from app.fleet.schemas import WorkerSchema
from app.http import Blueprint, current_principal

blp = Blueprint("fleet", __name__, url_prefix="/api/v1", description="Workers")


@blp.route("/workers")
class Workers(MethodView):
    @blp.doc(operationId="listWorkers")
    @blp.response(200, WorkerSchema(many=True))
    @blp.alt_response(503, description="the broker cannot be reached")
    @blp.paginate()
    def get(self, pagination_parameters):
        """List live workers: name, queues, concurrency, active executions, last heartbeat

        Any role may read it. Workers are shared infrastructure, not objects of an
        organization: the list shows names, queues and counts only, never an execution.

        "Live" means the worker answered Celery's remote-control inspection (`active_queues`,
        `stats`, `active`, broadcast at once over the broker; each ends after 1 s without a new
        reply). Each API process keeps the answer for 3 s and serves it to every caller; while
        one caller refreshes a stale answer, the others get the previous one. So a worker
        appears or disappears within about 4 s, and the route waits on the broker at most once
        per process every 3 s. Sorted by name.
        """
        items, total = services.list_workers(
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items
