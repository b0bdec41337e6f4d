"""The client's documents: upload (bytes or a path), read, list, download, hand to a run,
delete, against a real server and worker."""

from __future__ import annotations

import hashlib

import pytest

import runyard_client

pytestmark = pytest.mark.worker


def test_upload_hand_to_a_run_and_delete(runyard, tmp_path):
    runyard.agents.create(
        {
            "name": "reader",
            "runtime": {"type": "python", "entrypoint": "tests.agents:read_documents"},
        }
    )
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nfirst\n")
    from_path = runyard.upload_document(notes)
    assert from_path["name"] == "notes.md" and from_path["content_type"] == "text/markdown"
    from_bytes = runyard.documents.upload(b"\x00\x01binary", name="blob.bin")
    assert from_bytes["content_type"] == "application/octet-stream" and from_bytes["size"] == 8
    with pytest.raises(ValueError, match="name"):
        runyard.documents.upload(b"x")

    assert runyard.documents.get(from_path["id"]) == from_path
    assert [d["id"] for d in runyard.documents.list(q="NOTES")] == [from_path["id"]]
    assert runyard.documents.content(from_bytes["id"]) == b"\x00\x01binary"

    output = runyard.run("reader", {}, documents=[from_path["id"], from_bytes["id"]], timeout=30)
    assert output["text"] == "# Notes\nfirst\n"
    assert output["sha256"][1] == hashlib.sha256(b"\x00\x01binary").hexdigest()

    queued = runyard.executions.submit("reader", {}, documents=[from_bytes["id"]])
    assert [d["id"] for d in queued["documents"]] == [from_bytes["id"]]
    runyard.executions.wait(queued["id"], timeout=30)
    runyard.documents.delete(from_bytes["id"])
    with pytest.raises(runyard_client.NotFound):
        runyard.documents.get(from_bytes["id"])
    with pytest.raises(runyard_client.Unprocessable) as refused:
        runyard.executions.submit("reader", {}, documents=[from_bytes["id"]])
    assert "/documents/0" in refused.value.errors
