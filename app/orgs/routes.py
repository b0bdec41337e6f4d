import uuid

from flask.views import MethodView

from app.errors import NotFound
from app.http import Blueprint, current_principal, request_session
from app.orgs import services
from app.orgs.schemas import IssuedTokenSchema, MeSchema, TokenCreateSchema, TokenSchema

blp = Blueprint("orgs", __name__, url_prefix="/api/v1", description="The caller and its tokens")

FORBIDDEN = "tokens are managed by admins only"
# How long a revoked token may still be accepted: the API processes' token cache.
REVOCATION = (
    "A revoked token answers 401 at once in the API process that revoked it and within "
    "RUNYARD_TOKEN_CACHE_SECONDS (default 5) in every other one; an expired token answers 401 "
    "from its expires_at on, everywhere."
)


@blp.route("/me")
class Me(MethodView):
    @blp.doc(operationId="getMe")
    @blp.response(200, MeSchema())
    def get(self):
        """Who the token belongs to: its organization and role"""
        principal = current_principal()
        return {
            "org": {"id": principal.org_id, "name": principal.org_name},
            "token": {
                "id": principal.token_id,
                "name": principal.token_name,
                "role": principal.role,
            },
        }


@blp.route("/tokens")
class Tokens(MethodView):
    @blp.doc(operationId="listTokens")
    @blp.response(200, TokenSchema(many=True))
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.paginate()
    def get(self, pagination_parameters):
        """List your organization's tokens, newest first (never their secrets)"""
        items, total = services.list_org_tokens(
            request_session(),
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items

    @blp.doc(operationId="createToken")
    @blp.arguments(TokenCreateSchema())
    @blp.response(201, IssuedTokenSchema())
    @blp.alt_response(403, description=FORBIDDEN)
    def post(self, data):
        """Issue a token; its secret is in this answer only"""
        session = request_session()
        row, secret = services.issue(
            session,
            current_principal(),
            name=data["name"],
            role=data["role"],
            expires_in_days=data.get("expires_in_days"),
        )
        session.commit()
        return {**{field: getattr(row, field) for field in TokenSchema().fields}, "token": secret}


@blp.route("/tokens/<token_id>")
class TokenById(MethodView):
    @blp.doc(operationId="revokeToken")
    @blp.response(204)
    @blp.alt_response(403, description=FORBIDDEN)
    @blp.alt_response(404, description="no such token in your organization")
    @blp.doc(description="Revoking a revoked token is no error (204 again). " + REVOCATION)
    def delete(self, token_id):
        """Revoke a token (an admin may revoke the one it calls with)"""
        session = request_session()
        services.revoke(session, current_principal(), _token_id(token_id))
        session.commit()


def _token_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise NotFound(f"no token {value!r}", hint="GET /api/v1/tokens lists them") from exc
