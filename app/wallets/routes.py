from flask.views import MethodView

from app.http import Blueprint, current_principal, request_session
from app.wallets import decisions, services
from app.wallets.schemas import (
    DecisionQuerySchema,
    DecisionSchema,
    WalletCreateSchema,
    WalletSchema,
)

wallets = Blueprint(
    "wallets",
    __name__,
    url_prefix="/api/v1/agents",
    description="Agents' wallets, made by the wallet service (Thirdweb Engine compatible)",
)
blp = Blueprint(
    "decisions",
    __name__,
    url_prefix="/api/v1/decisions",
    description="Decisions: every transfer an agent asked for, how its policy judged it, and "
    "what became of it (never deleted)",
)
SERVICE_FAILED = (
    "the wallet service failed, refused or could not be reached (or none is configured): "
    "nothing was stored; `hint` says what to check"
)


@wallets.route("/<ref>/wallet")
class AgentWallet(MethodView):
    @wallets.doc(operationId="createAgentWallet")
    @wallets.arguments(WalletCreateSchema())
    @wallets.response(201, WalletSchema())
    @wallets.alt_response(403, description="the role may not make wallets (admin may)")
    @wallets.alt_response(404, description="no such agent in your organization")
    @wallets.alt_response(409, description="the agent has a wallet already, or is archived")
    @wallets.alt_response(502, description=SERVICE_FAILED)
    def post(self, data, ref):
        """Make the agent's wallet at the wallet service and store it (one per agent)"""
        session = request_session()
        wallet = services.create(session, current_principal(), ref, data.get("label"))
        session.commit()
        return services.present(wallet)

    @wallets.doc(operationId="getAgentWallet")
    @wallets.response(200, WalletSchema())
    @wallets.alt_response(404, description="no such agent in your organization, or no wallet")
    def get(self, ref):
        """Read the agent's wallet"""
        return services.present(services.get(request_session(), current_principal(), ref))


@blp.route("")
class Decisions(MethodView):
    @blp.doc(operationId="listDecisions")
    @blp.arguments(DecisionQuerySchema(), location="query")
    @blp.response(200, DecisionSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List the organization's decisions, newest first"""
        items, total = decisions.list_decisions(
            request_session(),
            current_principal(),
            **args,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [decisions.present(item) for item in items]


@blp.route("/<decision_id>")
class DecisionById(MethodView):
    @blp.doc(operationId="getDecision")
    @blp.response(200, DecisionSchema())
    @blp.alt_response(404, description="no such decision in your organization")
    def get(self, decision_id):
        """Read a decision"""
        return decisions.present(decisions.get(request_session(), current_principal(), decision_id))


ANSWER_RESPONSES = {
    403: "the role may not answer decisions (admin may)",
    404: "no such decision in your organization",
    409: "the decision is not awaiting approval (or, to approve, its execution has ended)",
}


@blp.route("/<decision_id>/approve")
class ApproveDecision(MethodView):
    @blp.doc(operationId="approveDecision")
    @blp.response(200, DecisionSchema())
    @blp.alt_response(403, description=ANSWER_RESPONSES[403])
    @blp.alt_response(404, description=ANSWER_RESPONSES[404])
    @blp.alt_response(409, description=ANSWER_RESPONSES[409])
    def post(self, decision_id):
        """Approve a decision awaiting approval: it is `queued`, and its execution resumes and
        sends it"""
        decision = decisions.answer(request_session(), current_principal(), decision_id, True)
        return decision.as_dict()


@blp.route("/<decision_id>/reject")
class RejectDecision(MethodView):
    @blp.doc(operationId="rejectDecision")
    @blp.response(200, DecisionSchema())
    @blp.alt_response(403, description=ANSWER_RESPONSES[403])
    @blp.alt_response(404, description=ANSWER_RESPONSES[404])
    @blp.alt_response(409, description=ANSWER_RESPONSES[409])
    def post(self, decision_id):
        """Reject a decision awaiting approval: it is `rejected`, and its execution resumes
        and finds it so"""
        decision = decisions.answer(request_session(), current_principal(), decision_id, False)
        return decision.as_dict()
