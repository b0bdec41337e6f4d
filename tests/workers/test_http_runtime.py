"""The `http` runtime: how answers map to outcomes, agent definition checks, and runs end to end.

Every request goes to a server on 127.0.0.1 started by the test. The session's worker has
RUNYARD_HTTP_ALLOW_HOSTS=127.0.0.1 (tests/conftest.py), so `localhost` stays refused.
"""

import shutil
import ssl
import subprocess
import threading
import time

import pytest

from tests.conftest import wait_for, wait_until
from tests.local_http import Reply, local_server
from workers.runtimes.http import CallFailed, outcome_of, post_json

ALLOW = ("127.0.0.1",)


@pytest.fixture
def server():
    with local_server() as running:
        yield running


def call(url, body=b"{}", headers=None, **options):
    options = {"timeout_seconds": 5, "max_bytes": 4096, "allow_hosts": ALLOW, **options}
    return post_json(url, body, headers or {}, **options)


# ---------------------------------------------------------------------------------------------
# Answers and outcomes, in the test process


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (429, True), (404, False), (400, False), (401, False)],
)
def test_error_statuses_are_runtime_errors_retryable_or_final(server, status, retryable):
    server.route("/x", Reply(status, {"detail": "nope"}))
    outcome = outcome_of(call(server.url("/x")))
    assert outcome.error_type == "runtime_error" and outcome.retryable is retryable
    assert f"answered {status}" in outcome.error_message and "nope" in outcome.error_message


def test_a_2xx_json_body_is_the_output_and_a_non_json_body_is_a_final_error(server):
    server.route("/ok", Reply(201, {"answer": 42}))
    assert outcome_of(call(server.url("/ok"))).output == {"answer": 42}
    server.route("/html", Reply(200, "<html>oops</html>"))
    outcome = outcome_of(call(server.url("/html")))
    assert outcome.error_type == "runtime_error" and not outcome.retryable
    assert "not JSON" in outcome.error_message and "<html>oops" in outcome.error_message


def test_redirects_307_keeps_the_post_303_turns_to_get(server):
    server.route("/a", Reply(307, headers={"Location": "/b"}))
    server.route("/b", Reply(303, headers={"Location": server.url("/c")}))
    server.route("/c", Reply(200, {"done": True}))
    answer = call(server.url("/a"), b'{"n": 1}')
    assert answer.url == server.url("/c") and answer.body == b'{"done": true}'
    assert [(r.method, r.path, r.body) for r in server.requests] == [
        ("POST", "/a", b'{"n": 1}'),
        ("POST", "/b", b'{"n": 1}'),
        ("GET", "/c", b""),
    ]


def test_credentials_are_not_carried_to_another_origin(server):
    server.route("/a", Reply(307, headers={"Location": server.url("/b", host="svc.test")}))
    server.route("/b", Reply(200, {}))
    call(
        server.url("/a"),
        headers={"Authorization": "Bearer secret", "X-Trace": "1"},
        allow_hosts=("127.0.0.1", "svc.test"),
        resolver=lambda host, port: ["127.0.0.1"],
    )
    first, second = server.requests
    assert first.headers["Authorization"] == "Bearer secret"
    assert "Authorization" not in second.headers and "X-Trace" not in second.headers


def test_redirect_loops_are_cut(server):
    server.route("/loop", Reply(302, headers={"Location": "/loop"}))
    with pytest.raises(CallFailed, match="more than 5 redirects") as failed:
        call(server.url("/loop"))
    assert not failed.value.retryable and len(server.requests) == 6


def test_a_slow_remote_times_out(server):
    server.route("/slow", Reply(200, {}, delay=3))
    started = time.monotonic()
    with pytest.raises(CallFailed) as failed:
        call(server.url("/slow"), timeout_seconds=0.5)
    assert failed.value.error_type == "timeout" and failed.value.retryable
    assert time.monotonic() - started < 2


def test_a_large_body_is_refused(server):
    server.route("/big", Reply(200, {"blob": "x" * 10_000}))
    with pytest.raises(CallFailed, match="at most 4096") as failed:
        call(server.url("/big"))
    assert failed.value.error_type == "output_too_large"


def test_nothing_listening_is_a_retryable_connection_error(server):
    port = server.port
    server.stop()
    with pytest.raises(CallFailed, match="cannot connect") as failed:
        call(f"http://127.0.0.1:{port}/gone")
    assert failed.value.error_type == "runtime_error" and failed.value.retryable


def test_a_cancel_stops_the_wait_for_the_answer(server):
    server.route("/slow", Reply(200, {}, delay=3))
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(CallFailed, match="cancelled while waiting") as failed:
        call(server.url("/slow"), cancelled=cancel.is_set)
    assert failed.value.error_type == "cancelled" and time.monotonic() - started < 2


@pytest.fixture
def tls_pair(tmp_path):
    """A self-signed certificate for svc.test: the server's context and a client trusting it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    files = ["-keyout", str(key), "-out", str(cert), "-days", "1"]
    subject = ["-subj", "/CN=svc.test", "-addext", "subjectAltName=DNS:svc.test"]
    subprocess.run(
        ["openssl", "req", "-x509", *key_options, *files, *subject],
        check=True,
        capture_output=True,
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    return server_context, ssl.create_default_context(cafile=str(cert))


def test_https_to_a_pinned_address_checks_the_certificate_of_the_url_host(tls_pair):
    server_context, client_context = tls_pair
    with local_server(tls=server_context) as server:
        server.route("/x", Reply(200, {"secure": True}))
        options = {
            "allow_hosts": ("svc.test", "other.test"),
            "resolver": lambda host, port: ["127.0.0.1"],
            "tls_context": client_context,
        }
        answer = call(server.url("/x", host="svc.test"), **options)
        assert answer.body == b'{"secure": true}'
        assert server.server_names == ["svc.test"]
        assert server.requests[0].headers["Host"] == f"svc.test:{server.port}"
        # The same address under a name the certificate does not carry: refused, final.
        with pytest.raises(CallFailed, match=r"TLS certificate of other\.test refused") as failed:
            call(server.url("/x", host="other.test"), **options)
        assert not failed.value.retryable and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------
# Definition checks


def define(client, org, runtime, **extra):
    body = {"name": "remote", "runtime": runtime, **extra}
    return client.post("/api/v1/agents", json=body, headers=org.headers)


@pytest.mark.parametrize(
    ("runtime", "pointer"),
    [
        ({"type": "http", "url": "ftp://example.com/x"}, "/runtime/url"),
        ({"type": "http", "url": "https://user:pw@example.com/"}, "/runtime/url"),
        ({"type": "http", "url": "https://example.com:99999/"}, "/runtime/url"),
        ({"type": "http", "url": "https://:80/"}, "/runtime/url"),
        ({"type": "http"}, "/runtime"),
        (
            {"type": "http", "url": "https://e.com", "headers": {"Host": "x"}},
            "/runtime/headers/Host",
        ),
        (
            {"type": "http", "url": "https://e.com", "headers": {"X-A": "a\r\nB: c"}},
            "/runtime/headers/X-A",
        ),
        (
            {"type": "http", "url": "https://e.com", "timeout_seconds": 301},
            "/runtime/timeout_seconds",
        ),
        ({"type": "http", "url": "https://e.com", "extra": 1}, "/runtime"),
    ],
)
def test_bad_http_runtimes_are_422_with_a_pointer(client, org, runtime, pointer):
    response = define(client, org, runtime)
    assert response.status_code == 422, response.get_json()
    assert pointer in response.get_json()["errors"]


def test_the_call_may_not_outlast_the_execution(client, org):
    runtime = {"type": "http", "url": "https://api.example.com/run", "timeout_seconds": 60}
    response = define(client, org, runtime, timeout_seconds=30)
    assert response.status_code == 422
    assert response.get_json()["errors"] == {"/runtime/timeout_seconds": ["at most the agent's 30"]}
    assert define(client, org, runtime, timeout_seconds=60).status_code == 201
    lowered = client.patch(
        "/api/v1/agents/remote", json={"timeout_seconds": 10}, headers=org.headers
    )
    assert lowered.status_code == 422
    assert "/runtime/timeout_seconds" in lowered.get_json()["errors"]


# ---------------------------------------------------------------------------------------------
# End to end: the public API and the session's real worker


def http_agent(client, org, name, url, **extra):
    runtime = {"type": "http", "url": url, "headers": {"X-Agent": name}}
    runtime.update(extra.pop("runtime", {}))
    response = client.post(
        "/api/v1/agents", json={"name": name, "runtime": runtime, **extra}, headers=org.headers
    )
    assert response.status_code == 201, response.get_json()


def submit(client, org, agent, payload):
    response = client.post(
        f"/api/v1/agents/{agent}/executions", json={"input": payload}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


NO_WAIT_RETRIES = {"max_retries": 2, "backoff_seconds": 0, "jitter": False}
OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["total"],
    "properties": {"total": {"type": "integer"}},
}


@pytest.mark.worker
def test_http_agent_succeeds_with_its_output_checked(live_client, live_org, server):
    server.route("/sum", Reply(200, {"total": 3}))
    http_agent(live_client, live_org, "summer", server.url("/sum"), output_schema=OUTPUT_SCHEMA)
    execution_id = submit(live_client, live_org, "summer", {"numbers": [1, 2]})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"total": 3} and result["attempts"] == 1
    (request,) = server.seen("/sum")
    assert request.method == "POST" and request.headers["X-Agent"] == "summer"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Runyard-Execution-Token"].startswith("rye_")
    assert request.headers["Runyard-Api-Url"].startswith("http://")
    assert request.json() == {
        "input": {"numbers": [1, 2]},
        "execution_id": execution_id,
        "attempt": 1,
        "agent": {"name": "summer", "version": "1.0.0"},
    }
    usage = result["resource_usage"]
    assert set(usage) == {"cpu_seconds", "max_rss_mb", "wall_ms"} and usage["max_rss_mb"] > 0

    server.route("/sum", Reply(200, {"total": "three"}))
    result = wait_for(live_client, live_org, submit(live_client, live_org, "summer", {}))
    assert result["status"] == "failed" and result["error"]["type"] == "output_invalid"
    assert "/total" in result["error"]["message"]


@pytest.mark.worker
def test_5xx_is_retried_until_the_attempts_run_out(live_client, live_org, server):
    server.route("/down", Reply(500, {"error": "database on fire"}))
    http_agent(live_client, live_org, "down", server.url("/down"), retry=NO_WAIT_RETRIES)
    result = wait_for(live_client, live_org, submit(live_client, live_org, "down", {}))
    assert result["status"] == "failed" and result["attempts"] == 3
    assert result["error"]["type"] == "runtime_error"
    assert "answered 500" in result["error"]["message"]
    assert [r.json()["attempt"] for r in server.seen("/down")] == [1, 2, 3]


@pytest.mark.worker
def test_429_is_retried(live_client, live_org, server):
    server.route("/busy", Reply(429, {"error": "slow down"}), Reply(200, {"total": 1}))
    http_agent(live_client, live_org, "busy", server.url("/busy"), retry=NO_WAIT_RETRIES)
    result = wait_for(live_client, live_org, submit(live_client, live_org, "busy", {}))
    assert result["status"] == "succeeded" and result["attempts"] == 2, result
    assert result["output"] == {"total": 1}


@pytest.mark.worker
def test_404_is_final_whatever_the_retry_policy(live_client, live_org, server):
    server.route("/missing", Reply(404, {"error": "no such thing"}))
    http_agent(live_client, live_org, "missing", server.url("/missing"), retry=NO_WAIT_RETRIES)
    result = wait_for(live_client, live_org, submit(live_client, live_org, "missing", {}))
    assert result["status"] == "failed" and result["error"]["type"] == "runtime_error"
    assert "answered 404" in result["error"]["message"]
    assert result["attempts"] == 1 and len(server.seen("/missing")) == 1


@pytest.mark.worker
def test_bodies_that_are_not_a_json_object(live_client, live_org, server):
    server.route("/text", Reply(200, "plain text"))
    server.route("/list", Reply(200, [1, 2]))
    http_agent(live_client, live_org, "text", server.url("/text"))
    http_agent(live_client, live_org, "list", server.url("/list"))
    text = wait_for(live_client, live_org, submit(live_client, live_org, "text", {}))
    assert text["status"] == "failed" and text["error"]["type"] == "runtime_error"
    assert "not JSON" in text["error"]["message"]
    listed = wait_for(live_client, live_org, submit(live_client, live_org, "list", {}))
    assert listed["status"] == "failed" and listed["error"]["type"] == "output_invalid"
    assert "not a JSON object" in listed["error"]["message"]


@pytest.mark.worker
def test_a_remote_slower_than_the_runtime_timeout_times_out(live_client, live_org, server):
    server.route("/slow", Reply(200, {"total": 1}, delay=4))
    http_agent(live_client, live_org, "slow", server.url("/slow"), runtime={"timeout_seconds": 1})
    result = wait_for(live_client, live_org, submit(live_client, live_org, "slow", {}))
    assert result["status"] == "timed_out" and result["error"]["type"] == "timeout", result
    assert "within 1 s" in result["error"]["message"]
    # Cut at the runtime's 1 s, long before the remote's answer at 4 s.
    assert result["attempts"] == 1 and 900 <= result["resource_usage"]["wall_ms"] < 3000


@pytest.mark.worker
def test_a_loopback_host_not_allowed_is_refused_without_a_request(live_client, live_org, server):
    server.route("/hidden", Reply(200, {"total": 1}))
    http_agent(live_client, live_org, "hidden", server.url("/hidden", host="localhost"))
    result = wait_for(live_client, live_org, submit(live_client, live_org, "hidden", {}))
    assert result["status"] == "failed" and result["error"]["type"] == "runtime_error"
    assert "localhost resolves to" in result["error"]["message"]
    assert "loopback address: the request was not sent" in result["error"]["message"]
    assert "RUNYARD_HTTP_ALLOW_HOSTS" in result["error"]["message"]
    assert server.requests == []


@pytest.mark.worker
def test_a_cancel_stops_the_wait_for_a_slow_remote(live_client, live_org, server):
    server.route("/slow", Reply(200, {"total": 1}, delay=10))
    http_agent(live_client, live_org, "patient", server.url("/slow"))
    execution_id = submit(live_client, live_org, "patient", {})
    wait_until(lambda: server.seen("/slow"))
    response = live_client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
    )
    assert response.status_code == 202
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "cancelled" and result["error"]["type"] == "cancelled"
    assert result["resource_usage"]["wall_ms"] < 5000
