from flask import request
from flask.views import MethodView

from app.catalog import services
from app.catalog.schemas import CatalogEntrySchema, CatalogQuerySchema, CatalogSubmitSchema
from app.executions.schemas import ExecutionSchema
from app.executions.tracecontext import parse_traceparent
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session

blp = Blueprint(
    "catalog",
    __name__,
    url_prefix="/api/v1/catalog",
    description="Public agents of every organization, run by any",
)


@blp.route("")
class Catalog(MethodView):
    @blp.doc(operationId="listCatalog")
    @blp.arguments(CatalogQuerySchema(), location="query")
    @blp.response(200, CatalogEntrySchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List the public agents of every organization, newest first"""
        items, total = services.list_public(
            request_session(),
            current_principal(),
            q=args.get("q"),
            capability=args.get("capability"),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<org>/<agent>/executions")
class CatalogRun(MethodView):
    @blp.doc(operationId="submitCatalogExecution")
    @blp.arguments(CatalogSubmitSchema())
    @blp.response(202, ExecutionSchema())
    @blp.alt_response(
        404,
        description="no such public agent (another's private one, archived or absent), or no "
        "such version",
    )
    @blp.alt_response(
        409,
        description="its concurrency key is full and its concurrency.on_limit is reject: "
        "nothing stored",
    )
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, data, org, agent):
        """Run another organization's public agent (or one of yours): the execution is yours

        It counts against your organization's quotas and limits (the agent's own concurrency
        and rate limit apply among your organization's runs of it), and you read it, its logs
        and its events as any of your executions. Its owner sees only how many runs the
        catalog made (`catalog_runs`), never their inputs or outputs."""
        return services.run(
            current_principal(),
            org,
            agent,
            data["input"],
            version=data.get("version"),
            priority=data["priority"],
            traceparent=parse_traceparent(request.headers.get("traceparent")),
            documents=data.get("documents"),
        )
