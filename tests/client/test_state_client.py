"""runyard_client's `state` methods against the app in-process (httpx's WSGI transport, inside
the test's transaction)."""

from __future__ import annotations

import httpx
import pytest

import runyard_client


@pytest.fixture
def runyard(app, client, org):
    transport = httpx.WSGITransport(app=app)
    with runyard_client.Runyard("http://runyard.test", org.token, transport=transport) as c:
        c.agents.create(
            {"name": "keeper", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
        )
        yield c


def test_put_get_keys_delete_with_expected_versions(runyard):
    assert runyard.state.put("keeper", "cursor", {"page": 1})["version"] == 1
    entry = runyard.state.put("keeper", "cursor", {"page": 2}, expected_version=1)
    assert entry["version"] == 2 and entry["value"] == {"page": 2}
    assert runyard.state.get("keeper", "cursor")["value"] == {"page": 2}
    with pytest.raises(runyard_client.PreconditionFailed) as stale:
        runyard.state.put("keeper", "cursor", {"page": 9}, expected_version=1)
    assert stale.value.hint and "If-Match" in stale.value.errors
    with pytest.raises(runyard_client.PreconditionFailed):
        runyard.state.put("keeper", "cursor", None, expected_version=0)
    assert runyard.state.put("keeper", "empty", None, expected_version=0)["value"] is None
    assert [item["key"] for item in runyard.state.keys("keeper")] == ["cursor", "empty"]
    with pytest.raises(runyard_client.PreconditionFailed):
        runyard.state.delete("keeper", "cursor", expected_version=1)
    runyard.state.delete("keeper", "cursor", expected_version=2)
    with pytest.raises(runyard_client.NotFound):
        runyard.state.get("keeper", "cursor")
    with pytest.raises(runyard_client.ValidationError):
        runyard.state.put("keeper", "bad key", 1)


def test_dot_keys_are_sent_as_keys_not_path_steps(runyard):
    for key in (".", ".."):
        assert runyard.state.put("keeper", key, key)["key"] == key
        assert runyard.state.get("keeper", key)["value"] == key
    assert {item["key"] for item in runyard.state.keys("keeper")} == {".", ".."}
