"""Documents over the API: upload, list, read, download, delete, the limits, roles, tenancy, the
filesystem store, and attaching them to submits (no worker: tests/workers/test_documents_runtime.py
runs agents that read them)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid

import pytest
from sqlalchemy import text

from app.config import current_config, use_config
from tests.conftest import bearer, make_token

TEXT = "Ünïcode notes\nsecond line\n".encode()
AGENT = {
    "name": "reader",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {"type": "object"},
}


def upload(client, org, data=TEXT, name="notes.txt", content_type="text/plain", headers=None):
    query = {} if name is None else {"name": name}
    return client.post(
        "/api/v1/documents",
        query_string=query,
        data=data,
        headers={**(headers or org.headers), "Content-Type": content_type},
    )


def uploaded(client, org, **kwargs) -> dict:
    response = upload(client, org, **kwargs)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def make_agent(client, org):
    response = client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def submit(client, org, documents, headers=None):
    return client.post(
        "/api/v1/agents/reader/executions",
        json={"input": {}, "documents": documents},
        headers=headers or org.headers,
    )


def executions_of(connection, org) -> int:
    return connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar_one()


@pytest.fixture
def small_limit():
    """RUNYARD_MAX_DOCUMENT_MB=2: twice RUNYARD_MAX_BODY_BYTES, the other routes' limit."""
    configured = current_config()
    use_config(dataclasses.replace(configured, max_document_mb=2))
    yield 2 * 1024 * 1024
    use_config(configured)


@pytest.fixture
def on_disk(tmp_path):
    configured = current_config()
    use_config(dataclasses.replace(configured, documents_path=tmp_path / "documents"))
    yield tmp_path / "documents"
    use_config(configured)


# ---------------------------------------------------------------------------------------------
# Upload, read, list, delete


def test_upload_answers_201_with_what_the_document_is(client, org, connection):
    response = upload(client, org, content_type="text/plain; charset=UTF-8")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert set(body) == {"id", "name", "content_type", "size", "sha256", "created_at"}
    assert body["name"] == "notes.txt" and body["size"] == len(TEXT)
    assert body["content_type"] == "text/plain; charset=utf-8"
    assert body["sha256"] == hashlib.sha256(TEXT).hexdigest()
    stored = connection.execute(
        text("SELECT content, org_id, created_by_token_name FROM documents WHERE id = :id"),
        {"id": body["id"]},
    ).one()
    assert bytes(stored.content) == TEXT and stored.org_id == org.id
    assert stored.created_by_token_name == "admin"
    assert client.get(f"/api/v1/documents/{body['id']}", headers=org.headers).get_json() == body


def test_the_content_comes_back_as_uploaded(client, org):
    name = 'report "final" ü.txt'
    document = uploaded(client, org, name=name)
    response = client.get(f"/api/v1/documents/{document['id']}/content", headers=org.headers)
    assert response.status_code == 200
    assert response.data == TEXT
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["ETag"] == f'"{document["sha256"]}"'
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="report _final_ _.txt"')
    assert "filename*=UTF-8''report%20%22final%22%20%C3%BC.txt" in disposition


def test_a_name_with_line_breaks_is_quoted_safely_in_the_header(client, org):
    document = uploaded(client, org, name="evil\r\nSet-Cookie: x=1.txt")
    response = client.get(f"/api/v1/documents/{document['id']}/content", headers=org.headers)
    assert response.status_code == 200 and "Set-Cookie" not in response.headers
    assert "%0D%0ASet-Cookie" in response.headers["Content-Disposition"]


def test_any_media_type_is_a_file_even_json(client, org):
    """The JSON checks of other bodies (a NUL escape, nesting) do not apply to a file."""
    raw = b'{"a": "\\u0000", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    document = uploaded(client, org, data=raw, name="data.json", content_type="application/json")
    assert document["content_type"] == "application/json" and document["size"] == len(raw)
    binary = uploaded(client, org, data=bytes(range(256)), name="blob", content_type="")
    assert binary["content_type"] == "application/octet-stream"
    content = client.get(f"/api/v1/documents/{binary['id']}/content", headers=org.headers)
    assert content.data == bytes(range(256))


def test_an_upload_past_the_json_limit_but_under_the_document_limit_is_taken(client, org):
    data = b"x" * (current_config().max_body_bytes + 10)
    document = uploaded(client, org, data=data, name="big.bin")
    assert document["size"] == len(data)
    # Other routes keep their own limit.
    big = {"input": {"blob": "x" * (current_config().max_body_bytes + 1)}}
    response = client.post("/api/v1/agents/reader/executions", json=big, headers=org.headers)
    assert response.status_code == 413


def test_an_upload_over_the_limit_is_413_with_a_hint(client, org, connection, small_limit):
    response = upload(client, org, data=b"x" * (small_limit + 1))
    body = response.get_json()
    assert response.status_code == 413, body
    assert "RUNYARD_MAX_DOCUMENT_MB" in body["message"] and "RUNYARD_DOCUMENTS_PATH" in body["hint"]
    assert set(body) >= {"code", "status", "message", "errors", "hint"}
    at_the_limit = upload(client, org, data=b"x" * small_limit)
    assert at_the_limit.status_code == 201
    count = connection.execute(text("SELECT count(*) FROM documents")).scalar_one()
    assert count == 1


def test_a_chunked_upload_over_the_limit_is_413_and_under_it_is_taken(client, org, small_limit):
    def post_chunked(body: bytes):
        return client.post(
            "/api/v1/documents?name=streamed.bin",
            input_stream=io.BytesIO(body),
            headers={**org.headers, "Transfer-Encoding": "chunked"},
        )

    refused = post_chunked(b"x" * (small_limit + 1))
    assert refused.status_code == 413, refused.get_json()
    assert "RUNYARD_DOCUMENTS_PATH" in refused.get_json()["hint"]
    # Past the JSON routes' limit, under the document's.
    taken = post_chunked(b"x" * (current_config().max_body_bytes // 2 * 3))
    assert taken.status_code == 201, taken.get_json()


def test_a_missing_name_is_422_with_a_hint(client, org):
    response = upload(client, org, name=None)
    body = response.get_json()
    assert response.status_code == 422 and "name" in body["errors"] and body["hint"]
    empty = upload(client, org, name="")
    assert empty.status_code == 422 and "name" in empty.get_json()["errors"]


def test_a_content_type_that_is_no_media_type_is_422(client, org):
    response = upload(client, org, content_type="not a type")
    body = response.get_json()
    assert response.status_code == 422 and "Content-Type" in body["errors"] and body["hint"]


def test_the_list_is_newest_first_paginated_and_filtered_by_name(client, org, connection):
    names = ("Invoice-2024.pdf", "notes.txt", "invoice_2025.pdf", "100%_done.txt")
    for age, name in enumerate(reversed(names)):
        document = uploaded(client, org, name=name)
        # One transaction, one now(): made apart by hand.
        connection.execute(
            text(
                "UPDATE documents SET created_at = now() - make_interval(mins => :age) "
                "WHERE id = :id"
            ),
            {"age": age, "id": document["id"]},
        )
    listed = client.get("/api/v1/documents", headers=org.headers)
    assert listed.status_code == 200
    assert [d["name"] for d in listed.get_json()] == [
        "100%_done.txt",
        "invoice_2025.pdf",
        "notes.txt",
        "Invoice-2024.pdf",
    ]
    assert json.loads(listed.headers["X-Pagination"])["total"] == 4
    found = client.get("/api/v1/documents?q=INVOICE", headers=org.headers).get_json()
    assert [d["name"] for d in found] == ["invoice_2025.pdf", "Invoice-2024.pdf"]
    # % and _ are the characters themselves, not patterns.
    found = client.get("/api/v1/documents?q=0%25_", headers=org.headers).get_json()
    assert [d["name"] for d in found] == ["100%_done.txt"]
    paged = client.get("/api/v1/documents?page=2&page_size=3", headers=org.headers).get_json()
    assert [d["name"] for d in paged] == ["Invoice-2024.pdf"]


def test_delete_is_204_then_404_and_both_are_audited(client, org, connection):
    document = uploaded(client, org)
    path = f"/api/v1/documents/{document['id']}"
    assert client.delete(path, headers=org.headers).status_code == 204
    for response in (
        client.get(path, headers=org.headers),
        client.get(f"{path}/content", headers=org.headers),
        client.delete(path, headers=org.headers),
    ):
        assert response.status_code == 404 and response.get_json()["hint"]
    events = client.get(
        "/api/v1/audit", query_string={"object_type": "document"}, headers=org.headers
    ).get_json()
    assert [event["action"] for event in events] == ["document.delete", "document.upload"]
    changes = {(op["op"], op["path"]): op["value"] for op in events[1]["changes"]}
    assert changes == {
        ("add", "/content_type"): "text/plain",
        ("add", "/size"): len(TEXT),
        ("add", "/sha256"): document["sha256"],
    }
    assert events[1]["object"] == {"type": "document", "id": document["id"], "name": "notes.txt"}
    assert {op["path"] for op in events[0]["changes"]} == {"/size", "/sha256"}
    stored = connection.execute(
        text("SELECT coalesce(body, draft_head || draft_mid) FROM audit_events")
    ).scalars()
    assert not any("second line" in event for event in stored)


def test_a_malformed_id_is_404(client, org):
    for path in ("/api/v1/documents/not-a-uuid", f"/api/v1/documents/{uuid.uuid4()}/content"):
        response = client.get(path, headers=org.headers)
        assert response.status_code == 404 and response.get_json()["hint"]


@pytest.mark.parametrize("role", ["viewer"])
def test_a_reader_reads_but_may_not_upload_or_delete(client, org, role):
    document = uploaded(client, org)
    headers = bearer(make_token(org, role))
    refused = upload(client, org, headers=headers)
    assert refused.status_code == 403 and refused.get_json()["hint"]
    gone = client.delete(f"/api/v1/documents/{document['id']}", headers=headers)
    assert gone.status_code == 403 and gone.get_json()["hint"]
    assert client.get("/api/v1/documents", headers=headers).get_json()[0]["id"] == document["id"]
    content = client.get(f"/api/v1/documents/{document['id']}/content", headers=headers)
    assert content.status_code == 200 and content.data == TEXT


@pytest.mark.parametrize("role", ["operator", "developer"])
def test_those_who_submit_may_upload_and_delete(client, org, role):
    headers = bearer(make_token(org, role))
    document = uploaded(client, org, headers=headers)
    gone = client.delete(f"/api/v1/documents/{document['id']}", headers=headers)
    assert gone.status_code == 204


def test_another_organization_gets_404_and_sees_none(client, org, other_org):
    document = uploaded(client, org)
    path = f"/api/v1/documents/{document['id']}"
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        response = client.open(path + suffix, method=method, headers=other_org.headers)
        assert response.status_code == 404, (method, suffix)
    assert client.get("/api/v1/documents", headers=other_org.headers).get_json() == []
    assert client.get(path, headers=org.headers).status_code == 200


def test_an_idempotent_upload_is_stored_once(client, org, connection):
    headers = {**org.headers, "Idempotency-Key": "upload-once"}
    first = uploaded(client, org, headers=headers)
    again = upload(client, org, headers=headers)
    assert again.status_code == 201 and again.headers.get("Idempotency-Replayed") == "true"
    assert again.get_json()["id"] == first["id"]
    count = connection.execute(text("SELECT count(*) FROM documents")).scalar_one()
    assert count == 1


def test_on_a_filesystem_the_bytes_are_a_file_named_by_id(client, org, connection, on_disk):
    document = uploaded(client, org)
    stored = on_disk / document["id"]
    assert stored.read_bytes() == TEXT
    assert [path.name for path in on_disk.iterdir()] == [document["id"]]
    content = connection.execute(
        text("SELECT content FROM documents WHERE id = :id"), {"id": document["id"]}
    ).scalar_one()
    assert content is None
    response = client.get(f"/api/v1/documents/{document['id']}/content", headers=org.headers)
    assert response.status_code == 200 and response.data == TEXT
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["ETag"] == f'"{document["sha256"]}"'
    assert client.delete(f"/api/v1/documents/{document['id']}", headers=org.headers).status_code
    assert not stored.exists()


def test_on_a_filesystem_a_refused_upload_leaves_no_file(client, org, on_disk, small_limit):
    response = upload(client, org, data=b"x" * (small_limit + 1))
    assert response.status_code == 413
    # A body longer than it said (past the edge's checks): cut short while read, file removed.
    from app.documents import storage

    with pytest.raises(storage.DocumentTooLarge):
        storage.receive(io.BytesIO(b"x" * (small_limit + 1)), small_limit)
    assert list(on_disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Attached to executions


def test_a_submit_hands_documents_and_the_execution_lists_them(client, org):
    make_agent(client, org)
    first = uploaded(client, org, name="a.txt")
    second = uploaded(client, org, name="b.pdf", content_type="application/pdf")
    response = submit(client, org, [second["id"], first["id"]])
    assert response.status_code == 202, response.get_json()
    shown = [
        {key: d[key] for key in ("id", "name", "content_type", "size")} for d in (second, first)
    ]
    assert response.get_json()["documents"] == shown
    execution_id = response.get_json()["id"]
    read = client.get(f"/api/v1/executions/{execution_id}", headers=org.headers).get_json()
    assert read["documents"] == shown
    # Lists do not read them (one more read per execution).
    [listed] = client.get("/api/v1/executions", headers=org.headers).get_json()
    assert "documents" not in listed


def test_an_execution_without_documents_lists_none(client, org):
    make_agent(client, org)
    response = client.post(
        "/api/v1/agents/reader/executions", json={"input": {}}, headers=org.headers
    )
    assert response.get_json()["documents"] == []
    read = client.get(f"/api/v1/executions/{response.get_json()['id']}", headers=org.headers)
    assert read.get_json()["documents"] == []


def test_an_unknown_document_is_422_by_pointer_and_nothing_is_queued(
    client, org, other_org, connection
):
    make_agent(client, org)
    ours = uploaded(client, org)
    theirs = uploaded(client, other_org)
    unknown = str(uuid.uuid4())
    response = submit(client, org, [ours["id"], unknown, theirs["id"]])
    body = response.get_json()
    assert response.status_code == 422, body
    assert set(body["errors"]) == {"/documents/1", "/documents/2"} and body["hint"]
    assert executions_of(connection, org) == 0
    malformed = submit(client, org, ["not-an-id"])
    assert malformed.status_code == 422 and "/documents/0" in malformed.get_json()["errors"]
    twice = submit(client, org, [ours["id"], ours["id"]])
    assert twice.status_code == 422 and "/documents/1" in twice.get_json()["errors"]
    too_many = submit(client, org, [str(uuid.uuid4()) for _ in range(51)])
    assert too_many.status_code == 422 and "/documents" in too_many.get_json()["errors"]
    assert executions_of(connection, org) == 0
    assert (
        connection.execute(
            text(
                "SELECT count(*) FROM audit_events WHERE org_id = :o AND "
                "action = 'execution.submit'"
            ),
            {"o": org.id},
        ).scalar_one()
        == 0
    )


def test_a_document_used_by_an_unfinished_execution_cannot_be_deleted(client, org, connection):
    make_agent(client, org)
    document = uploaded(client, org)
    execution = submit(client, org, [document["id"]]).get_json()
    path = f"/api/v1/documents/{document['id']}"
    for status in unfinished_statuses(connection):
        connection.execute(
            text("UPDATE executions SET status = :s WHERE id = :id"),
            {"s": status, "id": execution["id"]},
        )
        refused = client.delete(path, headers=org.headers)
        body = refused.get_json()
        assert refused.status_code == 409, (status, body)
        assert execution["id"] in body["message"] and execution["id"] in body["hint"]
    connection.execute(
        text("UPDATE executions SET status = 'succeeded', finished_at = now() WHERE id = :id"),
        {"id": execution["id"]},
    )
    assert client.delete(path, headers=org.headers).status_code == 204
    read = client.get(f"/api/v1/executions/{execution['id']}", headers=org.headers).get_json()
    assert read["documents"] == []


def unfinished_statuses(connection) -> list[str]:
    """queued and running, and waiting where the schema has it (durable executions)."""
    allowed = connection.execute(
        text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'ck_executions_status'"
        )
    ).scalar_one()
    return [status for status in ("queued", "running", "waiting") if f"'{status}'" in allowed]


def test_a_cancelled_execution_frees_its_documents(client, org):
    make_agent(client, org)
    document = uploaded(client, org)
    execution = submit(client, org, [document["id"]]).get_json()
    path = f"/api/v1/documents/{document['id']}"
    assert client.delete(path, headers=org.headers).status_code == 409
    cancelled = client.post(f"/api/v1/executions/{execution['id']}/cancel", headers=org.headers)
    assert cancelled.status_code == 202
    assert client.delete(path, headers=org.headers).status_code == 204


def test_a_batch_hands_each_item_its_documents(client, org, connection):
    make_agent(client, org)
    one = uploaded(client, org, name="one.txt")
    two = uploaded(client, org, name="two.txt")
    response = client.post(
        "/api/v1/agents/reader/executions/batch",
        json={"items": [{"input": {}, "documents": [one["id"], two["id"]]}, {"input": {}}]},
        headers=org.headers,
    )
    assert response.status_code == 202, response.get_json()
    first, second = response.get_json()["ids"]
    read = client.get(f"/api/v1/executions/{first}", headers=org.headers).get_json()
    assert [d["name"] for d in read["documents"]] == ["one.txt", "two.txt"]
    read = client.get(f"/api/v1/executions/{second}", headers=org.headers).get_json()
    assert read["documents"] == []
    refused = client.post(
        "/api/v1/agents/reader/executions/batch",
        json={"items": [{"input": {}}, {"input": {}, "documents": [str(uuid.uuid4())]}]},
        headers=org.headers,
    )
    assert refused.status_code == 422
    assert list(refused.get_json()["errors"]) == ["/items/1/documents/0"]
    assert executions_of(connection, org) == 2


def test_an_idempotent_submit_with_documents_links_them_once(client, org, connection):
    make_agent(client, org)
    document = uploaded(client, org)
    headers = {**org.headers, "Idempotency-Key": "submit-with-documents"}
    first = submit(client, org, [document["id"]], headers=headers).get_json()
    again = submit(client, org, [document["id"]], headers=headers)
    assert again.headers.get("Idempotency-Replayed") == "true"
    assert again.get_json()["id"] == first["id"] and again.get_json()["documents"]
    links = connection.execute(text("SELECT count(*) FROM execution_documents")).scalar_one()
    assert links == 1


def test_the_catalog_run_hands_the_callers_documents(client, org, other_org):
    make_agent(client, org)
    client.patch("/api/v1/agents/reader", json={"visibility": "public"}, headers=org.headers)
    mine = uploaded(client, other_org)
    path = f"/api/v1/catalog/{org.name}/reader/executions"
    response = client.post(
        path, json={"input": {}, "documents": [mine["id"]]}, headers=other_org.headers
    )
    assert response.status_code == 202, response.get_json()
    assert [d["id"] for d in response.get_json()["documents"]] == [mine["id"]]
    # The owner's documents are not the caller's.
    owners = uploaded(client, org)
    refused = client.post(
        path, json={"input": {}, "documents": [owners["id"]]}, headers=other_org.headers
    )
    assert refused.status_code == 422 and "/documents/0" in refused.get_json()["errors"]


def test_a_submit_without_documents_runs_no_statement_more():
    """The submit's hot path: no connection is even touched (None here) when none are given."""
    from app.documents.services import attaching

    execution_id = uuid.uuid4()
    with attaching(None, uuid.uuid4(), {execution_id: []}) as handed:
        pass
    assert handed == {}
