from marshmallow import Schema, fields, validate

from app.documents.services import MAX_NAME_CHARS, MAX_PER_EXECUTION

NAME_DESCRIPTION = (
    "the file's name (1 to 255 characters), as agents see it; `script` and `command` agents "
    "find the file under this name, made safe, in RUNYARD_DOCUMENTS_DIR"
)


class UploadQuerySchema(Schema):
    name = fields.String(
        required=True,
        validate=validate.Length(min=1, max=MAX_NAME_CHARS),
        error_messages={"required": "required: the file's name, as in ?name=report.pdf"},
        metadata={"description": NAME_DESCRIPTION},
    )


class DocumentQuerySchema(Schema):
    q = fields.String(
        validate=validate.Length(min=1, max=MAX_NAME_CHARS),
        metadata={"description": "a part of the name, in any case"},
    )


class DocumentSchema(Schema):
    id = fields.UUID()
    name = fields.String(metadata={"description": NAME_DESCRIPTION})
    content_type = fields.String(
        metadata={
            "description": "the upload's Content-Type (type/subtype, lowercase, with its "
            "charset if it named one); the content is answered with it"
        }
    )
    size = fields.Integer(metadata={"description": "bytes"})
    sha256 = fields.String(metadata={"description": "hex SHA-256 of the bytes"})
    created_at = fields.DateTime()


class AttachedDocumentSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    content_type = fields.String()
    size = fields.Integer()


def documents_field() -> fields.List:
    """`documents` of a submit: the ids of documents to hand the execution."""
    return fields.List(
        fields.UUID(),
        validate=validate.Length(max=MAX_PER_EXECUTION),
        metadata={
            "uniqueItems": True,
            "description": f"ids of the organization's documents (POST /api/v1/documents) "
            f"to hand the execution, at most {MAX_PER_EXECUTION}, each once: ctx.documents, "
            "ctx.document(id), and files in RUNYARD_DOCUMENTS_DIR for `script` and `command` "
            "agents. An id that is not one of your documents refuses the submit (422 at "
            "/documents/<n>)",
        },
    )
