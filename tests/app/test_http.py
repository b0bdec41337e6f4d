"""The HTTP edges: spec and docs, health, the error shape, body limits."""

import json


def test_openapi_spec_and_docs_need_no_token(client):
    spec = client.get("/api/v1/openapi.json")
    assert spec.status_code == 200
    document = spec.get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in [
        "/api/v1/agents",
        "/api/v1/agents/{ref}",
        "/api/v1/agents/{ref}/executions",
        "/api/v1/executions/{execution_id}/logs",
        "/api/v1/me",
    ]:
        assert path in paths
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and b"swagger" in docs.data.lower()
    asset = client.get("/api/v1/swagger-ui/swagger-ui-bundle.js")
    assert asset.status_code == 200


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_metrics_are_prometheus_text(client):
    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"runyard_http_requests_total" in response.data


def test_malformed_json_is_400(client, org):
    response = client.post(
        "/api/v1/agents",
        data='{"name": "x",',
        headers={**org.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    body = response.get_json()
    assert body["code"] == 400 and body["status"] == "Bad Request" and body["message"]


def test_deeply_nested_json_is_400_not_500(client, org):
    nested = "[" * 100_000 + "]" * 100_000
    response = client.post(
        "/api/v1/agents",
        data=nested,
        headers={**org.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == 400


def test_oversized_body_is_413(client, org):
    body = json.dumps({"name": "x", "description": "y" * (1024 * 1024 + 1)})
    response = client.post(
        "/api/v1/agents", data=body, headers={**org.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.get_json()["code"] == 413


def test_unknown_route_and_method_use_the_error_shape(client, org):
    missing = client.get("/api/v1/nothing-here", headers=org.headers)
    assert missing.status_code == 404
    assert set(missing.get_json()) >= {"code", "status", "message", "errors"}
    wrong = client.put("/api/v1/agents", headers=org.headers)
    assert wrong.status_code == 405
    assert wrong.get_json()["code"] == 405
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}


def test_a_body_that_is_not_an_object_is_422(client, org):
    response = client.post("/api/v1/agents", json=[1, 2], headers=org.headers)
    assert response.status_code == 422


def test_a_body_that_is_not_json_is_415(client, org):
    response = client.post(
        "/api/v1/agents",
        data='{"name": "x"}',
        headers={**org.headers, "Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert "application/json" in response.get_json()["hint"]


def test_pagination_header_always_has_seven_keys(client, org):
    response = client.get("/api/v1/agents", headers=org.headers)
    assert set(json.loads(response.headers["X-Pagination"])) == {
        "total",
        "total_pages",
        "first_page",
        "last_page",
        "page",
        "previous_page",
        "next_page",
    }


def test_oversized_chunked_body_is_413_and_a_small_one_works(client, org):
    import io

    def post_chunked(body: bytes):
        return client.post(
            "/api/v1/agents",
            input_stream=io.BytesIO(body),
            headers={
                **org.headers,
                "Content-Type": "application/json",
                "Transfer-Encoding": "chunked",
            },
        )

    big = json.dumps({"name": "x", "description": "y" * (1024 * 1024 + 1)}).encode()
    response = post_chunked(big)
    assert response.status_code == 413 and response.get_json()["code"] == 413
    small = json.dumps(
        {"name": "chunked", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    ).encode()
    assert post_chunked(small).status_code == 201
