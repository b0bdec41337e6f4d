import io
from urllib.parse import quote

from flask import Response, request, send_file
from flask.views import MethodView

from app.config import current_config
from app.documents import services, storage
from app.documents.schemas import DocumentQuerySchema, DocumentSchema, UploadQuerySchema
from app.http import Blueprint, RawBody, current_principal, raw_bodies, request_session
from app.idempotency.services import HEADER as IDEMPOTENCY_HEADER

blp = Blueprint(
    "documents",
    __name__,
    url_prefix="/api/v1/documents",
    description="Files handed to agents as context (ctx.documents)",
)

# The upload's body is the file itself: app/http.py reads it up to RUNYARD_MAX_DOCUMENT_MB and
# does not ask it to be JSON (registered with the app with this blueprint).
UPLOAD = ("POST", "/api/v1/documents")
UPLOAD_BODY = RawBody(
    max_bytes=lambda: current_config().max_document_bytes,
    too_large=lambda size: storage.DocumentTooLarge(current_config().max_document_bytes, size),
)


@blp.record_once
def _take_a_file_body(state) -> None:
    raw_bodies(state.app)[UPLOAD] = UPLOAD_BODY


BINARY = {"schema": {"type": "string", "format": "binary"}}
DOCUMENT_ID = {
    "in": "path",
    "name": "document_id",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "the document's id",
}
SUBMITTERS = "admin, developer, operator"


def _body():
    """The upload's bytes as a stream. With an Idempotency-Key the edge has read them already
    (it hashes the request): from that copy then."""
    if request.headers.get(IDEMPOTENCY_HEADER) is not None:
        return io.BytesIO(request.get_data(cache=True))
    return request.stream


def content_disposition(name: str) -> str:
    """`attachment` with the name: printable ASCII in `filename` (anything else, quotes and
    backslashes as `_`), the whole name in `filename*` (RFC 6266, UTF-8, percent-encoded)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    encoded = quote(name, safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


@blp.route("")
class Documents(MethodView):
    @blp.doc(operationId="listDocuments")
    @blp.arguments(DocumentQuerySchema(), location="query")
    @blp.response(200, DocumentSchema(many=True))
    @blp.paginate()
    def get(self, args, pagination_parameters):
        """List the organization's documents, newest first"""
        items, total = services.list_documents(
            request_session(),
            current_principal(),
            q=args.get("q"),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]

    @blp.doc(operationId="uploadDocument")
    @blp.arguments(UploadQuerySchema(), location="query")
    @blp.response(201, DocumentSchema())
    @blp.alt_response(403, description=f"the role may not upload ({SUBMITTERS} may)")
    @blp.alt_response(413, description="the file is over RUNYARD_MAX_DOCUMENT_MB (default 20 MiB)")
    @blp.alt_response(422, description="no name, or a Content-Type that is no media type")
    @blp.alt_response(503, description="RUNYARD_DOCUMENTS_PATH is set but cannot be written")
    @blp.doc(
        requestBody={
            "required": True,
            "description": "the file's bytes, sent as they are (not JSON, not a form), with "
            "its media type as the Content-Type (any type; application/octet-stream when "
            "unknown)",
            "content": {"application/octet-stream": BINARY},
        }
    )
    def post(self, args):
        """Upload a document: the body is the file, `name` its name

        Up to RUNYARD_MAX_DOCUMENT_MB (default 20 MiB). The bytes are kept in PostgreSQL, or in
        RUNYARD_DOCUMENTS_PATH when that is set. Hand it to executions by listing its id in a
        submit's `documents`."""
        session = request_session()
        document = services.upload(
            session,
            current_principal(),
            args["name"],
            (request.mimetype, request.mimetype_params.get("charset")),
            _body(),
        )
        session.commit()
        return services.present(document)


@blp.route("/<document_id>")
class DocumentById(MethodView):
    @blp.doc(operationId="getDocument", parameters=[DOCUMENT_ID])
    @blp.response(200, DocumentSchema())
    @blp.alt_response(404, description="no such document in your organization")
    def get(self, document_id):
        """Read a document's description (its bytes: GET .../content)"""
        return services.present(services.get(request_session(), current_principal(), document_id))

    @blp.doc(operationId="deleteDocument", parameters=[DOCUMENT_ID])
    @blp.response(204)
    @blp.alt_response(403, description=f"the role may not delete documents ({SUBMITTERS} may)")
    @blp.alt_response(404, description="no such document in your organization")
    @blp.alt_response(
        409, description="an execution that has not finished (queued, running, waiting) uses it"
    )
    def delete(self, document_id):
        """Delete a document; finished executions that used it no longer list it"""
        session = request_session()
        document = services.delete(session, current_principal(), document_id)
        session.commit()
        storage.remove(document.id)


@blp.route("/<document_id>/content")
class DocumentContent(MethodView):
    @blp.doc(operationId="getDocumentContent", parameters=[DOCUMENT_ID])
    @blp.response(200, content_type="application/octet-stream")
    @blp.doc(
        responses={
            "200": {
                "description": "the bytes, with the document's Content-Type, its name in "
                "Content-Disposition (attachment) and its sha256 as the ETag",
                "content": {"*/*": BINARY},
            }
        }
    )
    @blp.alt_response(404, description="no such document in your organization")
    def get(self, document_id):
        """Download a document's bytes"""
        found = services.content(request_session(), current_principal(), document_id)
        document = found.document
        if found.path is not None:
            response = send_file(found.path, mimetype=document.content_type, etag=False)
        else:
            response = Response(found.data, content_type=document.content_type)
        # As stored: send_file would add a charset of its own to a text type.
        response.headers["Content-Type"] = document.content_type
        response.headers["Content-Disposition"] = content_disposition(document.name)
        response.headers["ETag"] = f'"{document.sha256}"'
        # Served as a download of what the client said it is, never sniffed into something else.
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "private, no-cache"
        return response
