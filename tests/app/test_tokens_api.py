"""Tokens over the API (admins only): issue (the secret shown once), list, revoke."""

import datetime as dt
import time

from sqlalchemy import text

from app.db import db
from app.orgs import services
from tests.app.test_quotas_live import _call, api_server
from tests.conftest import bearer, make_token

TOKENS = "/api/v1/tokens"
LISTED = {"id", "name", "role", "created_at", "expires_at", "last_used_at", "revoked_at"}


def _issue(client, org, **body) -> dict:
    response = client.post(
        TOKENS, json={"name": "ci", "role": "operator", **body}, headers=org.headers
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_an_admin_issues_a_token_shown_once_that_works(client, org):
    issued = _issue(client, org, expires_in_days=30)
    assert set(issued) == LISTED | {"token"}
    assert issued["role"] == "operator" and issued["revoked_at"] is None
    expires = dt.datetime.fromisoformat(issued["expires_at"])
    assert dt.timedelta(days=29) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    me = client.get("/api/v1/me", headers=bearer(issued["token"])).get_json()
    assert me["token"] == {"id": issued["id"], "name": "ci", "role": "operator"}
    listed = client.get(TOKENS, headers=org.headers)
    assert listed.status_code == 200 and "X-Pagination" in listed.headers
    body = listed.get_json()
    assert [set(token) for token in body] == [LISTED, LISTED]  # ci and the org's admin
    assert issued["token"] not in listed.get_data(as_text=True)
    assert "token_hash" not in listed.get_data(as_text=True)


def test_without_expiry_it_never_expires(client, org):
    assert _issue(client, org)["expires_at"] is None


def test_bad_bodies_are_422_by_pointer(client, org):
    for body, pointer in [
        ({"name": "x", "role": "owner"}, "/role"),
        ({"name": "", "role": "viewer"}, "/name"),
        ({"role": "viewer"}, "/name"),
        ({"name": "x", "role": "viewer", "expires_in_days": 0}, "/expires_in_days"),
        ({"name": "x", "role": "viewer", "expires_in_days": "7"}, "/expires_in_days"),
        ({"name": "x", "role": "viewer", "token": "mine"}, "/token"),
    ]:
        response = client.post(TOKENS, json=body, headers=org.headers)
        assert response.status_code == 422, body
        assert pointer in response.get_json()["errors"], (body, response.get_json())


def test_only_admins_manage_tokens(client, org):
    issued = _issue(client, org)
    for role in ("developer", "operator", "viewer"):
        headers = bearer(make_token(org, role))
        for method, path, body in [
            ("get", TOKENS, None),
            ("post", TOKENS, {"name": "x", "role": "viewer"}),
            ("delete", f"{TOKENS}/{issued['id']}", None),
        ]:
            response = getattr(client, method)(path, json=body, headers=headers)
            assert response.status_code == 403, (role, method)
            assert response.get_json()["hint"]


def test_revoking_is_401_at_once_and_idempotent(client, org):
    issued = _issue(client, org)
    assert client.get("/api/v1/me", headers=bearer(issued["token"])).status_code == 200
    path = f"{TOKENS}/{issued['id']}"
    assert client.delete(path, headers=org.headers).status_code == 204
    assert client.get("/api/v1/me", headers=bearer(issued["token"])).status_code == 401
    [row] = [
        t for t in client.get(TOKENS, headers=org.headers).get_json() if t["id"] == issued["id"]
    ]
    assert row["revoked_at"] is not None
    assert client.delete(path, headers=org.headers).status_code == 204
    [again] = [
        t for t in client.get(TOKENS, headers=org.headers).get_json() if t["id"] == issued["id"]
    ]
    assert again["revoked_at"] == row["revoked_at"]


def test_an_admin_may_revoke_its_own_token(client, org):
    me = client.get("/api/v1/me", headers=org.headers).get_json()["token"]
    assert client.delete(f"{TOKENS}/{me['id']}", headers=org.headers).status_code == 204
    assert client.get("/api/v1/me", headers=org.headers).status_code == 401


def test_another_organizations_token_is_404(client, org, other_org):
    theirs = client.get(TOKENS, headers=other_org.headers).get_json()[0]
    response = client.delete(f"{TOKENS}/{theirs['id']}", headers=org.headers)
    assert response.status_code == 404
    assert client.get("/api/v1/me", headers=other_org.headers).status_code == 200
    assert client.delete(f"{TOKENS}/not-a-uuid", headers=org.headers).status_code == 404
    ids = {token["id"] for token in client.get(TOKENS, headers=org.headers).get_json()}
    assert theirs["id"] not in ids


def _last_used(token_id):
    with db.hot() as conn:
        return conn.execute(
            text("SELECT last_used_at FROM api_tokens WHERE id = :id"), {"id": token_id}
        ).scalar()


def _set_last_used(token_id, seconds_ago: int) -> None:
    with db.hot() as conn:
        conn.execute(
            text(
                "UPDATE api_tokens SET last_used_at = now() - make_interval(secs => :ago) "
                "WHERE id = :id"
            ),
            {"id": token_id, "ago": seconds_ago},
        )


def test_last_used_at_is_stamped_at_most_once_a_minute(app, live_org):
    """Committed tokens: the stamp has a connection of its own (db.detached)."""
    client = app.test_client()
    issued = _issue(client, live_org)
    assert issued["last_used_at"] is None
    headers = bearer(issued["token"])
    client.get("/api/v1/me", headers=headers)
    assert _last_used(issued["id"]) is not None
    listed = {t["id"]: t for t in client.get(TOKENS, headers=live_org.headers).get_json()}
    assert listed[issued["id"]]["last_used_at"] is not None
    # Put the stamp 30 s back: neither this process (it stamped a moment ago) nor another one
    # (forgetting stands for a fresh process) writes again within the minute.
    _set_last_used(issued["id"], 30)
    thirty_back = _last_used(issued["id"])
    client.get("/api/v1/me", headers=headers)
    services.last_use.forget()
    client.get("/api/v1/me", headers=headers)
    assert _last_used(issued["id"]) == thirty_back
    # Once the stored stamp is over a minute old, the next process to see the token writes.
    _set_last_used(issued["id"], 61)
    services.last_use.forget()
    client.get("/api/v1/me", headers=headers)
    assert _last_used(issued["id"]) > thirty_back


def test_a_token_revoked_through_the_api_stops_working_on_a_live_server(live_org, app, tmp_path):
    """The live server caches token lookups for RUNYARD_TOKEN_CACHE_SECONDS (2 here): the
    revoke, made by this process, reaches it within that bound."""
    client = app.test_client()
    issued = _issue(client, live_org)
    headers = bearer(issued["token"])
    with api_server(tmp_path / "api.log", env={"RUNYARD_TOKEN_CACHE_SECONDS": "2"}) as base:
        assert _call(base, "/api/v1/me", None, headers) == 200  # now in the server's cache
        revoked = client.delete(f"{TOKENS}/{issued['id']}", headers=live_org.headers)
        assert revoked.status_code == 204
        started = time.monotonic()
        while _call(base, "/api/v1/me", None, headers) == 200:
            assert time.monotonic() - started < 2.5, "still accepted past the cache's bound"
            time.sleep(0.05)
        assert _call(base, "/api/v1/me", None, headers) == 401
