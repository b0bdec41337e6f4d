"""Bearer tokens, roles and tenancy, as API.md says."""

import datetime as dt

import pytest

from app.orgs.services import hash_token
from tests.conftest import bearer, make_token

AGENT = {"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}


def test_me_names_the_org_and_token(client, org):
    body = client.get("/api/v1/me", headers=org.headers).get_json()
    assert body["org"] == {"id": str(org.id), "name": org.name}
    assert body["token"]["role"] == "admin"
    assert body["token"]["name"] == "admin"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": ""}],
)
def test_missing_or_invalid_token_is_401(client, headers):
    response = client.get("/api/v1/agents", headers=headers)
    assert response.status_code == 401
    body = response.get_json()
    assert body["code"] == 401 and body["status"] == "Unauthorized" and body["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_tokens_are_stored_hashed(connection, org):
    from sqlalchemy import text

    stored = connection.execute(
        text("SELECT token_hash FROM api_tokens WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert stored == hash_token(org.token)
    assert org.token not in stored


def test_revoked_token_is_401(client, org, connection):
    from app.db import db
    from app.orgs import services
    from app.orgs.models import ApiToken

    token = make_token(org, "developer")
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 200
    with db.session() as session:
        row = session.query(ApiToken).filter_by(token_hash=hash_token(token)).one()
        services.revoke_token(session, row.id)
        session.commit()
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 401


def test_expired_token_is_401(client, org):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    token = make_token(org, "admin", expires_at=past)
    response = client.get("/api/v1/me", headers=bearer(token))
    assert response.status_code == 401
    assert "expired" in response.get_json()["message"]


def test_viewer_reads_but_cannot_write(client, org):
    viewer = bearer(make_token(org, "viewer"))
    assert client.get("/api/v1/agents", headers=viewer).status_code == 200
    response = client.post("/api/v1/agents", json=AGENT, headers=viewer)
    assert response.status_code == 403
    assert "viewer" in response.get_json()["message"]
    assert response.get_json()["hint"]


def test_operator_runs_but_cannot_define_agents(client, org):
    assert client.post("/api/v1/agents", json=AGENT, headers=org.headers).status_code == 201
    operator = bearer(make_token(org, "operator"))
    assert (
        client.post("/api/v1/agents", json={**AGENT, "name": "x"}, headers=operator).status_code
        == 403
    )
    submitted = client.post("/api/v1/agents/echo/executions", json={"input": {}}, headers=operator)
    assert submitted.status_code == 202
    viewer = bearer(make_token(org, "viewer"))
    refused = client.post("/api/v1/agents/echo/executions", json={"input": {}}, headers=viewer)
    assert refused.status_code == 403


def test_other_organizations_objects_are_404(client, org, other_org):
    created = client.post("/api/v1/agents", json=AGENT, headers=org.headers).get_json()
    execution = client.post(
        "/api/v1/agents/echo/executions", json={"input": {}}, headers=org.headers
    ).get_json()
    theirs = other_org.headers
    for method, path in [
        ("get", f"/api/v1/agents/{created['id']}"),
        ("get", "/api/v1/agents/echo"),
        ("patch", "/api/v1/agents/echo"),
        ("delete", "/api/v1/agents/echo"),
        ("get", "/api/v1/agents/echo/versions"),
        ("get", "/api/v1/agents/echo/versions/1.0.0"),
        ("post", "/api/v1/agents/echo/executions"),
        ("get", f"/api/v1/executions/{execution['id']}"),
        ("get", f"/api/v1/executions/{execution['id']}/logs"),
        ("post", f"/api/v1/executions/{execution['id']}/cancel"),
    ]:
        kwargs = {"json": {"input": {}}} if path.endswith("executions") else {}
        if method == "patch":
            kwargs = {"json": {"description": "mine now"}}
        response = getattr(client, method)(path, headers=theirs, **kwargs)
        assert response.status_code == 404, (method, path, response.get_json())
    assert client.get("/api/v1/agents", headers=theirs).get_json() == []
    assert client.get("/api/v1/executions", headers=theirs).get_json() == []
