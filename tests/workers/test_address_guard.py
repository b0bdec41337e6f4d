"""The http runtime's address guard decides on resolved addresses, without connecting anywhere.

Names are resolved by an injected resolver: no test asks real DNS about an outside name, and
only the redirect and pinning tests connect at all, to a server on 127.0.0.1.
"""

import ipaddress
import re

import pytest

from app.address_guard import (
    AddressRefused,
    ResolutionFailed,
    checked_addresses,
    is_allowed,
    refusal_reason,
)
from tests.local_http import Reply, local_server
from workers.runtimes.http import CallFailed, post_json


def resolver_of(table: dict[str, list[str]]):
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise ResolutionFailed(f"cannot resolve {host!r}")
        return table[host]

    resolve.calls = calls
    return resolve


def never_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"an IP literal must not be looked up ({host})")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.10.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.254", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.10", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "IPv6 form of a loopback"),
        ("::ffff:10.1.2.3", "IPv6 form of a private"),
        ("::ffff:169.254.169.254", "IPv6 form of a cloud metadata"),
        ("64:ff9b::a00:1", "IPv6 form of a private"),
    ],
)
def test_non_public_addresses_are_refused(address, reason):
    assert refusal_reason(ipaddress.ip_address(address)) == reason
    with pytest.raises(AddressRefused) as refused:
        checked_addresses(address, 443, allow_hosts=(), resolver=never_resolve)
    assert reason in refused.value.message
    assert "not sent" in refused.value.message
    assert "RUNYARD_HTTP_ALLOW_HOSTS" in refused.value.hint


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert refusal_reason(ipaddress.ip_address(address)) is None
    assert checked_addresses(address, 443, allow_hosts=(), resolver=never_resolve) == [
        ipaddress.ip_address(address)
    ]


def test_a_name_resolving_to_a_private_address_is_refused():
    resolver = resolver_of({"intranet.example": ["10.1.2.3"]})
    with pytest.raises(AddressRefused) as refused:
        checked_addresses("intranet.example", 443, allow_hosts=(), resolver=resolver)
    assert refused.value.message == (
        "intranet.example resolves to 10.1.2.3, which is a private address: "
        "the request was not sent (only hosts listed in RUNYARD_HTTP_ALLOW_HOSTS may be non-public)"
    )


def test_one_bad_address_among_good_ones_refuses_the_host():
    resolver = resolver_of({"mixed.example": ["93.184.216.34", "2606:4700::1", "127.0.0.1"]})
    with pytest.raises(AddressRefused, match=re.escape("127.0.0.1, which is a loopback")):
        checked_addresses("mixed.example", 443, allow_hosts=(), resolver=resolver)


def test_a_public_name_passes_with_every_address():
    resolver = resolver_of({"api.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    assert checked_addresses("api.example", 443, allow_hosts=(), resolver=resolver) == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:2800:220:1::1"),
    ]


def test_allow_list_matches_the_exact_host_name_not_its_addresses():
    resolver = resolver_of({"localhost": ["127.0.0.1"], "svc.internal": ["10.0.0.7"]})
    allow = ("127.0.0.1", "SVC.Internal.")
    assert checked_addresses("svc.internal", 80, allow_hosts=allow, resolver=resolver) == [
        ipaddress.ip_address("10.0.0.7")
    ]
    assert checked_addresses("127.0.0.1", 80, allow_hosts=allow, resolver=never_resolve)
    # Same address, another name: not listed, so refused.
    with pytest.raises(AddressRefused, match=re.escape("localhost resolves to 127.0.0.1")):
        checked_addresses("localhost", 80, allow_hosts=allow, resolver=resolver)
    assert is_allowed("[::1]", ("::1",)) and not is_allowed("::2", ("::1",))


def test_a_name_that_does_not_resolve_is_a_resolution_failure():
    with pytest.raises(ResolutionFailed):
        checked_addresses("nowhere.example", 443, allow_hosts=(), resolver=resolver_of({}))


def test_a_redirect_to_a_loopback_name_is_refused_before_it_is_sent():
    with local_server() as server:
        second = server.url("/second", host="localhost")
        server.route("/first", Reply(307, headers={"Location": second}))
        server.route("/second", Reply(200, {"reached": True}))
        resolver = resolver_of({"localhost": ["127.0.0.1"]})
        with pytest.raises(CallFailed) as failed:
            post_json(
                server.url("/first"),
                b"{}",
                {},
                timeout_seconds=5,
                max_bytes=1024,
                allow_hosts=("127.0.0.1",),
                resolver=resolver,
            )
        assert failed.value.error_type == "runtime_error" and not failed.value.retryable
        assert (
            "localhost resolves to 127.0.0.1, which is a loopback address" in failed.value.message
        )
        assert "RUNYARD_HTTP_ALLOW_HOSTS" in failed.value.hint
        assert len(server.seen("/first")) == 1
        assert server.seen("/second") == []


def test_a_redirect_to_another_loopback_address_is_refused():
    with local_server() as server:
        server.route(
            "/first", Reply(302, headers={"Location": f"http://127.0.0.2:{server.port}/x"})
        )
        with pytest.raises(CallFailed, match=re.escape("127.0.0.2 is a loopback address")):
            post_json(
                server.url("/first"),
                b"{}",
                {},
                timeout_seconds=5,
                max_bytes=1024,
                allow_hosts=("127.0.0.1",),
                resolver=never_resolve,
            )
        assert [request.path for request in server.requests] == ["/first"]


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host():
    """DNS rebinding: a second lookup would answer 127.0.0.3 (where nothing listens)."""
    with local_server() as server:
        server.route("/pinned", Reply(200, {"ok": True}))
        answers = iter([["127.0.0.1"], ["127.0.0.3"]])
        calls = []

        def rebinding(host: str, port: int) -> list[str]:
            calls.append(host)
            return next(answers)

        answer = post_json(
            server.url("/pinned", host="svc.test"),
            b'{"a": 1}',
            {"X-Token": "t"},
            timeout_seconds=5,
            max_bytes=1024,
            allow_hosts=("svc.test",),
            resolver=rebinding,
        )
        assert answer.status == 200 and answer.body == b'{"ok": true}'
        assert calls == ["svc.test"]
        (request,) = server.seen("/pinned")
        assert request.headers["Host"] == f"svc.test:{server.port}"
        assert request.headers["X-Token"] == "t" and request.json() == {"a": 1}
