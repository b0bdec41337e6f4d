from flask.views import MethodView

from app import outbox
from app.db import db
from app.http import Blueprint, current_principal, request_session
from app.notifications import services
from app.notifications.schemas import (
    NotificationCreateSchema,
    NotificationDeliverySchema,
    NotificationPatchSchema,
    NotificationSchema,
    RedeliverSchema,
)

blp = Blueprint(
    "notifications",
    __name__,
    url_prefix="/api/v1/notifications",
    description="Outbound webhooks: the organization's events POSTed, signed, to a URL "
    "(roles admin and developer)",
)

NOT_FOUND = "no such notification in your organization"
FORBIDDEN = "the token's role is not admin or developer"


@blp.route("")
class Notifications(MethodView):
    @blp.response(200, NotificationSchema(many=True))
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.paginate()
    def get(self, pagination_parameters):
        """List notifications, newest first (never their secrets)"""
        items, total = services.list_notifications(
            request_session(),
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]

    @blp.arguments(NotificationCreateSchema())
    @blp.response(201, NotificationSchema())
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(409, description="a notification of that name exists")
    @blp.alt_response(
        422,
        description="an unknown event type or agent, or a URL that is not http(s) or whose "
        "address the guard refuses (by JSON pointer)",
    )
    @blp.alt_response(503, description="no key to encrypt its secret (RUNYARD_SECRET_KEYS)")
    def post(self, data):
        """Subscribe a URL to events; the answer holds the signing secret, shown this once

        Each event is POSTed as `{"id", "type", "created_at", "data"}` with the headers
        `Runyard-Event-Id` and `Runyard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
        "<t>.<raw body>" with the secret>`. A 2xx answer delivers it; anything else is retried
        with exponential backoff for 24 hours, then marked failed."""
        session = request_session()
        notification, secret = services.create(session, current_principal(), data)
        session.commit()
        return services.present(notification, secret)


@blp.route("/<notification_id>")
class NotificationById(MethodView):
    @blp.response(200, NotificationSchema())
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description=NOT_FOUND)
    def get(self, notification_id):
        """Read a notification (without its secret)"""
        return services.present(
            services.get(request_session(), current_principal(), notification_id)
        )

    @blp.arguments(NotificationPatchSchema())
    @blp.response(200, NotificationSchema())
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description=NOT_FOUND)
    @blp.alt_response(409, description="a notification of that name exists")
    @blp.alt_response(422, description="an unknown event type or agent, or a refused URL")
    def patch(self, data, notification_id):
        """Change the name, URL, events or filter; events written before keep their delivery"""
        session = request_session()
        notification = services.change(session, current_principal(), notification_id, data)
        session.commit()
        return services.present(notification)

    @blp.response(204)
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description=NOT_FOUND)
    def delete(self, notification_id):
        """Delete a notification, its delivery log and its deliveries not yet made"""
        session = request_session()
        services.delete(session, current_principal(), notification_id)
        session.commit()


@blp.route("/<notification_id>/deliveries")
class Deliveries(MethodView):
    @blp.response(200, NotificationDeliverySchema(many=True))
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description=NOT_FOUND)
    @blp.paginate()
    def get(self, notification_id, pagination_parameters):
        """The delivery log: each event and how its delivery went, newest first"""
        items, total = services.deliveries(
            request_session(),
            current_principal(),
            notification_id,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<notification_id>/deliveries/<event_id>/redeliver")
class Redeliver(MethodView):
    @blp.response(202, RedeliverSchema())
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description="no such notification or event in your organization")
    def post(self, notification_id, event_id):
        """Deliver an event again: pending, due now, with 24 hours of retries from now

        The body sent is the same as before (same id: receivers deduplicate by it)."""
        session = request_session()
        found = services.redeliver(session, current_principal(), notification_id, event_id)
        session.commit()
        db.after_commit(outbox.publish, [found])
        return {"event_id": found, "status": "pending"}
