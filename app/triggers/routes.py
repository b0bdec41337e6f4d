from flask import request
from flask.views import MethodView

from app import runs
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session
from app.triggers import services
from app.triggers.schemas import DeliverySchema, TriggerCreateSchema, TriggerSchema

blp = Blueprint(
    "triggers",
    __name__,
    url_prefix="/api/v1/triggers",
    description="Webhook triggers (signed POST /hooks/<id>) and event triggers (on_event)",
)
hooks = Blueprint(
    "hooks",
    __name__,
    url_prefix="/hooks",
    description="Webhook deliveries: signed with the trigger's secret, no token",
)


@blp.route("")
class Triggers(MethodView):
    @blp.doc(operationId="listTriggers")
    @blp.response(200, TriggerSchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List webhook and event triggers, newest first (never their secrets)"""
        items, total = services.list_triggers(
            request_session(),
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]

    @blp.doc(operationId="createTrigger")
    @blp.arguments(TriggerCreateSchema())
    @blp.response(201, TriggerSchema())
    @blp.alt_response(409, description="a trigger of that name exists")
    @blp.alt_response(
        422,
        description="unknown target, malformed reference or filter, invalid input, or (with "
        "on_event) a reference to what an event does not hold",
    )
    @blp.alt_response(503, description="no key to encrypt its secret (RUNYARD_SECRET_KEYS)")
    def post(self, data):
        """Create a webhook trigger (the answer holds its secret, shown this once) or, with
        `on_event`, an event trigger

        An event trigger starts its target on each event of its name (and filter) sent to POST
        /api/v1/events; it has no secret and no URL. A failure to start it (a reference that
        finds nothing in the event, an input the target refuses, a quota) never fails the
        event: the event's `started` holds an entry with an `error` for it."""
        session = request_session()
        trigger, secret = services.create(session, current_principal(), data)
        session.commit()
        return services.present(trigger, secret)


@blp.route("/<ref>")
class TriggerByRef(MethodView):
    @blp.doc(operationId="getTrigger")
    @blp.response(200, TriggerSchema())
    @blp.alt_response(404, description="no such trigger in your organization")
    def get(self, ref):
        """Read a trigger by id or name (without its secret)"""
        return services.present(services.get(request_session(), current_principal(), ref))

    @blp.doc(operationId="deleteTrigger")
    @blp.response(204)
    @blp.alt_response(404, description="no such trigger in your organization")
    def delete(self, ref):
        """Delete a trigger: its URL answers 404 from then on"""
        session = request_session()
        services.delete(session, current_principal(), ref)
        session.commit()


@hooks.route("/<trigger_id>")
class Hook(MethodView):
    @hooks.doc(operationId="deliverHook")
    @hooks.response(202, DeliverySchema())
    @hooks.alt_response(400, description="the body is not JSON")
    @hooks.alt_response(401, description="bad or missing signature, stale timestamp, or a replay")
    @hooks.alt_response(404, description="no such trigger, or an event trigger (it has no URL)")
    @hooks.alt_response(
        409,
        description="the target chain, or the agent of one of its steps, is archived; or the "
        "target agent's concurrency key is full and its on_limit is reject (nothing stored)",
    )
    @hooks.alt_response(422, description="the event lacks a referenced value, or the input fails")
    @hooks.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    @hooks.alt_response(
        503, description="no key in RUNYARD_SECRET_KEYS decrypts the trigger's stored secret"
    )
    @hooks.doc(
        security=[],
        parameters=[
            {
                "in": "header",
                "name": services.SIGNED_HEADER,
                "required": False,
                "schema": {"type": "string"},
                "description": '`t=<Unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" '
                "with the secret>`, t within 5 minutes of the server's clock: the scheme to "
                "use (the timestamp is signed, so a captured request cannot be replayed later)",
            },
            {
                "in": "header",
                "name": services.SIGNATURE_HEADER,
                "required": False,
                "schema": {"type": "string"},
                "description": "older scheme, still accepted when Runyard-Signature is absent: "
                "`sha256=<hex HMAC-SHA256 of the raw body with the secret>`",
            },
            {
                "in": "header",
                "name": services.TIMESTAMP_HEADER,
                "required": False,
                "schema": {"type": "string"},
                "description": "with X-Runyard-Signature only: Unix seconds (or ISO 8601), "
                "within 5 minutes of the server",
            },
        ],
    )
    def post(self, trigger_id):
        """Deliver an event: the JSON body is `$.event` for the trigger's input

        Answers with `execution_id` for an agent target, `chain_execution_id` for a chain."""
        session = request_session()
        headers = (services.SIGNED_HEADER, services.SIGNATURE_HEADER, services.TIMESTAMP_HEADER)
        body, launched = services.deliver(
            session,
            trigger_id,
            request.get_data(cache=True),
            {name: request.headers.get(name) for name in headers},
        )
        session.commit()
        runs.publish_after_commit(launched)
        return body
