"""The SSRF guard of `llmos push` / `llmos pull --from`: which targets are refused, and that nothing is sent first."""

from __future__ import annotations

import httpx
import pytest

from llmos.errors import InvalidInputError, PermissionDeniedError
from llmos.registry.netguard import check_target
from llmos.registry.remote import Remote

REFUSED = [
    "http://127.0.0.1:8470",
    "http://127.8.9.10",
    "http://localhost:8470",  # resolves to loopback
    "http://10.0.0.1",
    "http://172.16.0.1",
    "http://172.31.255.254",
    "http://192.168.1.1",
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://169.254.0.1",
    "http://100.64.0.1",  # carrier-grade NAT
    "http://0.0.0.0:8470",
    "http://224.0.0.1",
    "http://239.255.255.250",
    "http://240.0.0.1",
    "http://255.255.255.255",
    "http://192.0.2.1",  # documentation
    "http://[::1]:8470",
    "http://[::]",
    "http://[fc00::1]",
    "http://[fd12:3456::1]",
    "http://[fe80::1]",
    "http://[ff02::1]",
    "http://[2001:db8::1]",
    "http://[::ffff:169.254.169.254]",  # IPv4-mapped
    "http://[::ffff:10.0.0.1]",
    "http://[2002:a00:1::1]",  # 6to4 around 10.0.0.1
    "http://[64:ff9b::a9fe:a9fe]",  # NAT64 around 169.254.169.254
    "https://2130706433",  # decimal form of 127.0.0.1, resolved by the system
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_public_targets_are_refused(url: str) -> None:
    with pytest.raises(PermissionDeniedError, match="refusing to connect"):
        check_target(url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8470", "http://[::1]:1", "http://10.0.0.1", "http://localhost:9/prefix/"]
)
def test_allow_private_lifts_only_the_address_rule(url: str) -> None:
    target = check_target(url, allow_private=True)
    assert target.scheme == "http" and target.address


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://10.0.0.1:70/",
        "javascript:alert(1)",
        "example.com:8470",
        "http://user:secret@example.com/",
        "http://example.com/?q=1",
        "http://example.com/#frag",
        "http://",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "",
    ],
)
def test_malformed_urls_and_other_schemes_are_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(InvalidInputError):
        check_target(url, allow_private=True)


def fake_dns(table: dict[str, list[str]]) -> object:
    def resolve(host: str, _port: int) -> list[str]:
        return table[host]

    return resolve


def test_names_are_judged_by_every_address_they_resolve_to() -> None:
    resolve = fake_dns(
        {
            "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
            "internal.example": ["10.1.2.3"],
            "mixed.example": ["93.184.216.34", "169.254.169.254"],  # one bad answer is enough
            "v6-internal.example": ["fd00::5"],
        }
    )
    target = check_target("https://public.example:8443/llmos/", resolve=resolve)  # type: ignore[arg-type]
    assert (target.address, target.port, target.prefix) == ("93.184.216.34", 8443, "/llmos")
    assert target.connect_url == "https://93.184.216.34:8443/llmos"
    assert target.host_header == "public.example:8443"
    for host, shown in [("internal", "10.1.2.3"), ("mixed", "169.254.169.254"), ("v6-internal", "fd00::5")]:
        with pytest.raises(PermissionDeniedError, match=f"resolves to {shown}"):
            check_target(f"http://{host}.example", resolve=resolve)  # type: ignore[arg-type]


def test_the_guard_runs_before_any_request_is_sent() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    for url in ("http://169.254.169.254", "http://10.0.0.1:8470"):
        with pytest.raises(PermissionDeniedError):
            Remote(url, api_key="secret", transport=httpx.MockTransport(handler))
    assert sent == []


def test_connections_go_to_the_checked_address_without_redirects_and_with_the_original_host() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"location": "http://169.254.169.254/"})

    resolve = fake_dns({"models.example": ["93.184.216.34"]})
    remote = Remote(
        "http://models.example:8470",
        api_key="k-123",
        resolve=resolve,  # type: ignore[arg-type]
        transport=httpx.MockTransport(handler),
    )
    response = remote.request("GET", "/v1/registry/uploads/x")
    assert len(seen) == 1 and response.status_code == 302  # not followed
    assert seen[0].url.host == "93.184.216.34" and seen[0].headers["host"] == "models.example:8470"
    assert seen[0].headers["authorization"] == "Bearer k-123"
    with pytest.raises(InvalidInputError, match="redirect"):
        remote.check(response)
