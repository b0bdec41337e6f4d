from flask.views import MethodView

from app.http import Blueprint, current_principal, request_session
from app.secrets import services
from app.secrets.references import NAME_PATTERN
from app.secrets.schemas import NAME_DESCRIPTION, SecretPutSchema, SecretSchema

blp = Blueprint(
    "secrets",
    __name__,
    url_prefix="/api/v1/secrets",
    description='Write-only values that agents refer to as {"$secret": "<name>"}',
)
NAME_PARAMETER = {
    "in": "path",
    "name": "name",
    "required": True,
    "schema": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 63},
    "description": NAME_DESCRIPTION,
}


@blp.route("")
class Secrets(MethodView):
    @blp.response(200, SecretSchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List the organization's secrets by name: names and versions, never values"""
        items, total = services.list_secrets(
            request_session(),
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<name>")
class SecretByName(MethodView):
    @blp.arguments(SecretPutSchema())
    @blp.response(200, SecretSchema())
    @blp.alt_response(403, description="the role may not set secrets (admin, developer may)")
    @blp.alt_response(422, description="a name that does not match the pattern, or no value")
    @blp.alt_response(503, description="no encryption key is configured (RUNYARD_SECRET_KEYS)")
    @blp.doc(parameters=[NAME_PARAMETER])
    def put(self, data, name):
        """Set a secret's value (a new secret, or its next version); the value is never shown"""
        session = request_session()
        body = services.put(session, current_principal(), name, data["value"])
        session.commit()
        return body

    @blp.response(204)
    @blp.alt_response(403, description="the role may not delete secrets (admin, developer may)")
    @blp.alt_response(404, description="no such secret in your organization")
    @blp.doc(parameters=[NAME_PARAMETER])
    def delete(self, name):
        """Delete a secret: executions of agents still referring to it fail (secret_missing)"""
        session = request_session()
        services.delete(session, current_principal(), name)
        session.commit()
