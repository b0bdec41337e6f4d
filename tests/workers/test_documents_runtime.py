"""Agents of every runtime read the documents their execution was handed, with real workers:
ctx.documents and ctx.document(id) in `python` and `script` agents, files in
RUNYARD_DOCUMENTS_DIR for `script` and `command` agents; from PostgreSQL and from a shared
directory (RUNYARD_DOCUMENTS_PATH)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import pytest

from app.config import current_config, use_config
from tests.conftest import celery_worker, wait_for
from tests.workers.test_runs import define, python_agent, run, script_agent
from workers.context_documents import HandedDocuments, safe_file_name

pytestmark = pytest.mark.worker

NOTES = "Ünïcode notes\nline two\n".encode()
BLOB = bytes(range(256)) * 4

SCRIPT = """
import hashlib, os

def main(input, ctx):
    directory = os.environ["RUNYARD_DOCUMENTS_DIR"]
    listed = ctx.documents
    try:
        ctx.document("00000000-0000-0000-0000-000000000000")
        refused = None
    except LookupError as exc:
        refused = str(exc)
    return {
        "documents": listed,
        "sha256": [hashlib.sha256(ctx.document(d["id"]).read()).hexdigest() for d in listed],
        "text": ctx.document(listed[0]["id"]).text() if listed else None,
        "files": sorted(os.listdir(directory)),
        "refused": refused,
    }
"""

# A command reads the files themselves: name -> sha256 of every file in the directory.
COMMAND = (
    "import hashlib, json, os\n"
    "directory = os.environ['RUNYARD_DOCUMENTS_DIR']\n"
    "out = {name: hashlib.sha256(open(os.path.join(directory, name), 'rb').read()).hexdigest()\n"
    "       for name in sorted(os.listdir(directory))}\n"
    "json.dump({'files': out}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))\n"
)


def upload(client, org, data: bytes, name: str, content_type: str = "text/plain") -> dict:
    response = client.post(
        "/api/v1/documents",
        query_string={"name": name},
        data=data,
        headers={**org.headers, "Content-Type": content_type},
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def shown(document: dict) -> dict:
    return {key: document[key] for key in ("id", "name", "content_type", "size")}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def two_documents(client, org) -> tuple[dict, dict]:
    return (
        upload(client, org, NOTES, "notes.txt", "text/plain; charset=utf-8"),
        upload(client, org, BLOB, "../odd/name.bin", "application/octet-stream"),
    )


def succeeded(client, org, agent: str, documents: list[str], **extra) -> dict:
    result = wait_for(client, org, run(client, org, agent, documents=documents, **extra))
    assert result["status"] == "succeeded", result
    assert [d["id"] for d in result["documents"]] == documents
    return result["output"]


def test_a_python_agent_reads_its_documents(live_client, live_org):
    python_agent(live_client, live_org, "reader", "read_documents")
    notes, blob = two_documents(live_client, live_org)
    output = succeeded(live_client, live_org, "reader", [notes["id"], blob["id"]])
    assert output["documents"] == [shown(notes), shown(blob)]
    assert output["sha256"] == [sha(NOTES), sha(BLOB)]
    assert output["text"] == NOTES.decode()
    assert "no document 00000000" in output["refused"]
    # Without documents: an empty list, and the agent runs as before.
    plain = wait_for(live_client, live_org, run(live_client, live_org, "reader"))
    assert plain["status"] == "succeeded", plain
    assert plain["output"]["documents"] == [] and plain["documents"] == []


def test_a_script_agent_reads_its_documents_and_finds_their_files(live_client, live_org):
    script_agent(live_client, live_org, "script-reader", SCRIPT)
    notes, blob = two_documents(live_client, live_org)
    # The same document twice over two names: each file under its own name.
    again = upload(live_client, live_org, b"other", "notes.txt")
    ids = [notes["id"], blob["id"], again["id"]]
    output = succeeded(live_client, live_org, "script-reader", ids)
    assert output["documents"] == [shown(notes), shown(blob), shown(again)]
    assert output["sha256"] == [sha(NOTES), sha(BLOB), sha(b"other")]
    assert output["text"] == NOTES.decode()
    assert output["files"] == sorted(["notes.txt", "_odd_name.bin", f"notes-{again['id'][:8]}.txt"])
    assert "no document 00000000" in output["refused"]
    plain = wait_for(live_client, live_org, run(live_client, live_org, "script-reader"))
    assert plain["status"] == "succeeded", plain
    assert plain["output"]["documents"] == [] and plain["output"]["files"] == []


def test_a_command_agent_finds_its_documents_as_files(live_client, live_org):
    define(
        live_client,
        live_org,
        "command-reader",
        {"type": "command", "argv": ["python3", "-c", COMMAND]},
    )
    notes, blob = two_documents(live_client, live_org)
    output = succeeded(live_client, live_org, "command-reader", [notes["id"], blob["id"]])
    assert output["files"] == {"notes.txt": sha(NOTES), "_odd_name.bin": sha(BLOB)}


def test_documents_on_a_shared_directory_reach_every_runtime(live_client, live_org, tmp_path):
    """RUNYARD_DOCUMENTS_PATH on the API (this process) and the worker alike."""
    shared = tmp_path / "shared-documents"
    configured = current_config()
    use_config(dataclasses.replace(configured, documents_path=shared))
    try:
        notes, blob = two_documents(live_client, live_org)
    finally:
        use_config(configured)
    assert sorted(path.name for path in shared.iterdir()) == sorted([notes["id"], blob["id"]])
    queue = f"documents-{uuid.uuid4().hex[:8]}"
    python_agent(live_client, live_org, "fs-reader", "read_documents", queue=queue)
    script_agent(live_client, live_org, "fs-script", SCRIPT, queue=queue)
    env = {"RUNYARD_DOCUMENTS_PATH": str(shared)}
    with celery_worker(tmp_path / "fs.log", queues=queue, concurrency=1, name="fs", env=env):
        ids = [notes["id"], blob["id"]]
        python = succeeded(live_client, live_org, "fs-reader", ids)
        script = succeeded(live_client, live_org, "fs-script", ids)
    assert python["sha256"] == script["sha256"] == [sha(NOTES), sha(BLOB)]


# ---------------------------------------------------------------------------------------------
# No worker: what the context reads, and when


class CountingSource:
    def __init__(self, documents: list[dict]) -> None:
        self.documents = documents
        self.calls: list[str] = []

    def attached(self) -> list[dict]:
        self.calls.append("attached")
        return self.documents

    def read(self, document_id: str) -> bytes:
        self.calls.append(f"read {document_id}")
        return b"bytes of " + document_id.encode()

    def save(self, document_id: str, path: Path) -> None:
        self.calls.append(f"save {document_id}")
        path.write_bytes(self.read(document_id))


def test_nothing_is_read_until_the_agent_asks_and_then_once():
    source = CountingSource(
        [{"id": "d1", "name": "a.txt", "content_type": "text/plain", "size": 10}]
    )
    handed = HandedDocuments(source)
    assert source.calls == []
    assert handed.listed() == source.documents and handed.listed() is not source.documents
    document = handed.open("d1")
    assert source.calls == ["attached"]
    assert document.read() == document.read() == b"bytes of d1" and document.text() == "bytes of d1"
    assert source.calls == ["attached", "read d1"]
    with pytest.raises(LookupError, match="no document d2"):
        handed.open("d2")
    assert HandedDocuments(None).listed() == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "_.._etc_passwd"),
        (".hidden", "hidden"),
        ("a\x00b\nc.txt", "a_b_c.txt"),
        ("", "document"),
        ("..", "document"),
        ("é" * 200 + ".txt", "é" * 98 + ".txt"),
    ],
)
def test_file_names_are_made_safe(name, expected):
    assert safe_file_name(name, "0123456789abcdef", set()) == expected


def test_file_names_are_unique_per_id():
    taken: set[str] = set()
    names = [
        safe_file_name("a.txt", document_id, taken)
        for document_id in ("11111111x", "22222222y", "22222222z")
    ]
    assert names == ["a.txt", "a-22222222.txt", "22222222z.txt"]
