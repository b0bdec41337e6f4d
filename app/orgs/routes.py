from flask.views import MethodView

from app.http import Blueprint, current_principal
from app.orgs.schemas import MeSchema

blp = Blueprint("orgs", __name__, url_prefix="/api/v1", description="The caller")


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
