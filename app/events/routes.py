from flask.views import MethodView

from app.events import services
from app.events.schemas import (
    EventAcceptedSchema,
    EventQuerySchema,
    EventSchema,
    EventSendSchema,
)
from app.http import Blueprint, current_principal, request_session

blp = Blueprint(
    "events",
    __name__,
    url_prefix="/api/v1/events",
    description="Events: they resume the executions waiting on them and start event triggers",
)
REF_PARAMETER = {
    "in": "path",
    "name": "ref",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    "description": "the event's id, or else the sender's id (the newest event with it)",
}


@blp.route("")
class Events(MethodView):
    @blp.doc(operationId="sendEvent")
    @blp.arguments(EventSendSchema())
    @blp.response(202, EventAcceptedSchema())
    @blp.alt_response(403, description="the role may not send events (admin, developer, operator)")
    @blp.alt_response(
        422, description="a malformed name or id, data that is no object or over 256 kB"
    )
    @blp.alt_response(503, description="the database cannot be reached: nothing was stored")
    def post(self, data):
        """Send an event: it resumes the waits it matches and starts the event triggers

        Everything happens in one transaction, answered 202 once committed. The same `id`
        within 24 hours is accepted once: a repeat answers 202 with the first event's id,
        `duplicate: true`, and empty `resumed` and `started`. A trigger that could not start
        its target (a reference the event lacks, an input its target refuses, a quota) has an
        entry with an `error` in `started`; the event and the other triggers still went
        through."""
        return services.accept(
            request_session(),
            current_principal(),
            data["name"],
            data["data"],
            data.get("id"),
        )

    @blp.doc(operationId="listEvents")
    @blp.arguments(EventQuerySchema(), location="query")
    @blp.response(200, EventSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List the organization's events, newest first, with what each resumed and started"""
        items, total = services.list_events(
            request_session(),
            current_principal(),
            **args,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]


@blp.route("/<ref>")
class EventByRef(MethodView):
    @blp.doc(operationId="getEvent", parameters=[REF_PARAMETER])
    @blp.response(200, EventSchema())
    @blp.alt_response(404, description="no such event in your organization")
    def get(self, ref):
        """Read an event by its id, or by the sender's id (the newest event with it)"""
        return services.present(services.get(request_session(), current_principal(), ref))
