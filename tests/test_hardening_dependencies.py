"""Failing dependencies, one table per side: the issuer (webhook answers) and the
API server behind the proxy (proxy answers).

For every failure: the answer while it lasts, ``/readyz``, the metrics, and
recovery without a restart. No request is answered wrongly on the way: a
token is never accepted without keys, never refused for the issuer's fault
once keys were loaded, and an upstream failure is never a 200.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import CacheSettings, KeySetSettings
from proxy.impersonate import ProxySettings
from proxy.log import issuer_hash
from tests.fakes.issuer import FakeIssuer
from tests.hardening_harness import PODS, Gate, gate_config, running_gate, wait_until
from tests.keygen import new_key

#: Short lifetimes so an outage shows up, and ends, within a few fetch cycles.
KEYSET = KeySetSettings(
    retry_min=0.05,
    retry_max=0.1,
    fetch_timeout=0.3,
    min_refresh_interval=0.1,
    default_refresh_interval=0.2,
    max_refresh_interval=0.2,
    unknown_kid_cooldown=0.1,
    unknown_kid_ttl=0.1,
)
CACHE = CacheSettings(failure_ttl=0.1)


# --------------------------------------------------------------------------
# The issuer

Action = Callable[[FakeIssuer], Awaitable[None]]


async def _stop(i: FakeIssuer) -> None:
    await i.stop()


async def _start(i: FakeIssuer) -> None:
    await i.start()


def _set(**attrs: Any) -> Action:
    async def apply(i: FakeIssuer) -> None:
        for name, value in attrs.items():
            setattr(i, name, value)

    return apply


#: (name, break, fix, what /readyz says while broken)
ISSUER_FAILURES: list[tuple[str, Action, Action, str]] = [
    ("down", _stop, _start, "failed"),
    ("answers-503", _set(status=503), _set(status=200), "answered http 503"),
    ("slow-beyond-timeout", _set(delay=1.0), _set(delay=0.0), "timed out"),
    (
        "garbage-jwks",
        _set(jwks_body=b"<html>oops"),
        _set(jwks_body=None),
        "not valid JSON",
    ),
    (
        "oversized-jwks",
        _set(jwks_body=b" " * (600 * 1024)),
        _set(jwks_body=None),
        "over the limit",
    ),
    (
        "issuer-value-changed",
        _set(wrong_issuer="https://127.0.0.1/another"),
        _set(wrong_issuer=None),
        "names issuer",
    ),
]


def _fetch_errors(gate: Gate) -> float:
    return gate.value(
        "kube_oidc_gate_jwks_fetches_total",
        issuer_hash=issuer_hash(gate.issuer.url),
        result="error",
    )


def _ready_gauge(gate: Gate) -> float:
    return gate.value(
        "kube_oidc_gate_issuer_ready", issuer_hash=issuer_hash(gate.issuer.url)
    )


async def _accepted(gate: Gate, token: str) -> bool:
    status, answer = await gate.review(token)
    assert status == 200, answer
    return bool(answer["status"]["authenticated"])


@pytest.mark.parametrize("when", ["at-start", "later"])
@pytest.mark.parametrize(
    ("breaks", "fixes", "says"),
    [f[1:] for f in ISSUER_FAILURES],
    ids=[f[0] for f in ISSUER_FAILURES],
)
async def test_issuer_failure_answer_readiness_metrics_and_recovery(
    issuer: FakeIssuer,
    tmp_path: Path,
    breaks: Action,
    fixes: Action,
    says: str,
    when: str,
) -> None:
    config = gate_config(issuer.url, keyset=KEYSET, cache=CACHE)
    if when == "at-start":
        await breaks(issuer)
    async with running_gate(
        tmp_path, "webhook", issuer, config=config, ready=when == "later"
    ) as gate:
        if when == "later":
            await breaks(issuer)
        await wait_until(lambda: _fetch_errors(gate) >= 2, what="failed fetches")
        status, text = await gate.probe()
        if when == "at-start":
            # Never loaded: "try again", never a refusal the API server caches.
            async with gate.client.post(
                gate.url + "/authenticate",
                json={
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": gate.token()},
                },
            ) as r:
                assert r.status == 503
                assert r.headers["Retry-After"]
                assert (await r.json())["kind"] == "Status"
            assert status == 503
            assert "keys not loaded" in text
            assert _ready_gauge(gate) == 0
        else:
            # Loaded once: the last good keys keep verifying fresh tokens.
            assert await _accepted(gate, gate.token(jti="during-the-outage"))
            assert status == 200
            assert "warning" in text
            assert _ready_gauge(gate) == 1
        assert says in text, text

        await fixes(issuer)
        await wait_until(
            lambda: _probe_clean(gate), timeout=5, what="/readyz clean again"
        )
        assert _ready_gauge(gate) == 1
        assert await _accepted(gate, gate.token(jti="after-recovery"))


async def _probe_clean(gate: Gate) -> bool:
    status, text = await gate.probe()
    return status == 200 and "warning" not in text


async def test_key_set_without_the_needed_key(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    config = gate_config(issuer.url, keyset=KEYSET, cache=CACHE)
    old = issuer.keys[0]
    async with running_gate(tmp_path, "webhook", issuer, config=config) as gate:
        token = gate.token(old)
        assert await _accepted(gate, token)
        issuer.publish(new_key("RS256"))  # the key that signed it is withdrawn
        await gate.engine.keysets.get(issuer.url).refresh(force=True)
        status, answer = await gate.review(token)
        assert status == 200
        assert answer["status"]["authenticated"] is False
        assert answer["status"]["error"].startswith("unknown_kid:")
        assert (await gate.probe())[0] == 200, "the issuer is healthy"
        assert (
            gate.value(
                "kube_oidc_gate_authentications_total",
                result="rejected",
                reason="unknown_kid",
            )
            >= 1
        )
        issuer.add_key(old)  # published again: accepted again, no restart
        await wait_until(
            lambda: _accepted(gate, token), timeout=5, what="accepted again"
        )


# --------------------------------------------------------------------------
# The API server behind the proxy


class SwitchResolver(AbstractResolver):
    """Names resolve to ``answer`` (an IP literal), or fail like NXDOMAIN."""

    def __init__(self) -> None:
        self.answer: str | None = None
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if self.answer is None:
            raise OSError(socket.EAI_NONAME, f"test resolver: {host} does not exist")
        return [
            ResolveResult(
                hostname=host,
                host=self.answer,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@pytest.fixture
def no_system_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks the system resolver about a name."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if host is not None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise AssertionError(f"system DNS lookup of {host!r}") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


Step = Callable[[Gate, SwitchResolver], Awaitable[None]]


def _faults(**attrs: Any) -> Step:
    async def apply(gate: Gate, _: SwitchResolver) -> None:
        for name, value in attrs.items():
            setattr(gate.faults, name, value)

    return apply


def _fake(method: str, **attrs: Any) -> Step:
    async def apply(gate: Gate, _: SwitchResolver) -> None:
        assert gate.fake is not None
        for name, value in attrs.items():
            setattr(gate.fake, name, value)
        if method:
            await getattr(gate.fake, method)()

    return apply


def _dns(answer: str | None) -> Step:
    async def apply(_: Gate, resolver: SwitchResolver) -> None:
        resolver.answer = answer

    return apply


#: (name, break, fix, proxy status, upstream_requests label)
UPSTREAM_FAILURES: list[tuple[str, Step, Step, int, str]] = [
    ("down", _fake("stop"), _fake("start"), 503, "unavailable"),
    ("slow", _fake("", delay=3.0), _fake("", delay=0.0), 504, "timeout"),
    ("resets-connections", _faults(reset=True), _faults(reset=False), 502, "error"),
    ("answers-500", _faults(status=500), _faults(status=None), 500, "500"),
    ("answers-503", _faults(status=503), _faults(status=None), 503, "503"),
    ("dns-failure", _dns(None), _dns("127.0.0.1"), 503, "unavailable"),
]


async def _get(gate: Gate, token: str) -> tuple[int, dict[str, Any]]:
    async with gate.client.get(
        gate.url + PODS, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        return r.status, await r.json(content_type=None)


async def _exec(gate: Gate, token: str) -> int:
    try:
        ws = await gate.client.ws_connect(
            gate.url + PODS + "/p/exec?command=cat&stdin=true",
            protocols=["v5.channel.k8s.io"],
            headers={"Authorization": f"Bearer {token}"},
        )
    except aiohttp.WSServerHandshakeError as err:
        return err.status
    await ws.close()
    return 101


@pytest.mark.usefixtures("no_system_dns")
@pytest.mark.parametrize(
    ("breaks", "fixes", "code", "label"),
    [f[1:] for f in UPSTREAM_FAILURES],
    ids=[f[0] for f in UPSTREAM_FAILURES],
)
async def test_upstream_failure_status_readiness_metrics_and_recovery(
    issuer: FakeIssuer,
    tmp_path: Path,
    breaks: Step,
    fixes: Step,
    code: int,
    label: str,
) -> None:
    resolver = SwitchResolver()
    async with running_gate(
        tmp_path,
        "proxy",
        issuer,
        proxy_settings=ProxySettings(request_timeout=0.5, connect_timeout=0.5),
        # A name only the injected resolver knows; no query leaves the process.
        upstream_server="https://kube-api.hardening.invalid:{port}",
        upstream_tls_server_name="localhost",
        upstream_resolver=resolver,
    ) as gate:
        resolver.answer = "127.0.0.1"
        await breaks(gate, resolver)
        token = gate.token()
        status, body = await _get(gate, token)
        assert status == code, body
        assert body["kind"] == "Status"
        assert body["code"] == code
        assert await _exec(gate, token) == code
        assert gate.value("kube_oidc_gate_upstream_requests_total", code=label) == 2
        assert (await gate.probe())[0] == 200, "an API server outage is not ours"
        assert set(resolver.asked) <= {"kube-api.hardening.invalid"}

        await fixes(gate, resolver)
        status, body = await _get(gate, token)
        assert status == 200, body
        assert body["kind"] == "PodList"
        assert await _exec(gate, token) == 101
    assert "kube-api.hardening.invalid" in resolver.asked
