"""The production serving path, in-process, for tests that need the shipped listener.

``running_gate`` starts what ``kube-oidc-gate webhook`` or ``kube-oidc-gate
proxy`` starts (``start_engine``, ``webhook_app``/``proxy_app``, ``probe_app``,
``serve()`` with its TLS listener and connection guard) on 127.0.0.1, in front
of a ``FakeIssuer`` and, in proxy mode, a ``FakeAPIServer``. Unlike
``apiserver_harness.run_proxy`` (which mounts the proxy routes on a plain
``AppRunner``), the listener here is the real one, so aiohttp's parser limits,
the first-request deadline and the shutdown path are the shipped ones.

The fake API server gets one extra middleware, ``Faults``: answer every request
with a status (5xx), or reset the connection, until cleared. Nothing reaches
beyond loopback: the issuer and the API server are addressed by IP literal.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.typedefs import Handler
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import (
    Engine,
    ServeSettings,
    probe_app,
    proxy_app,
    serve,
    start_engine,
    webhook_app,
)
from proxy.certs import CertPair, server_context
from proxy.config import (
    AuthConfig,
    CacheSettings,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    KeySetSettings,
    PrefixedClaimOrExpression,
)
from proxy.http1 import Server
from proxy.impersonate import ProxySettings
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings
from proxy.webhook import WebhookSettings
from tests.fakes.apiserver import FakeAPIServer, status
from tests.fakes.apiserver_harness import PODS, upstream_kubeconfig
from tests.fakes.apiserver_impersonation import PROXY_OVERLAY_RULES
from tests.fakes.issuer import FakeIssuer
from tests.hostile import ALGS, AUDIENCE
from tests.keygen import SigningKey

__all__ = [
    "PODS",
    "Faults",
    "Gate",
    "gate_config",
    "metric",
    "normal_request",
    "running_gate",
    "secrets_of",
    "wait_until",
]


#: Fast retries so outage and recovery cases finish in well under a second.
FAST_KEYSET = KeySetSettings(retry_min=0.05, retry_max=0.2, fetch_timeout=2.0)


def secrets_of(token: str) -> list[str]:
    """The pieces of a token that must never be logged (long enough to be unique)."""
    return [p for p in token.split(".") if len(p) > 16] or (
        [token] if len(token) > 16 else []
    )


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample's value from the rendered registry (0 when absent)."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return 0.0


async def wait_until(
    check: Any, *, timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``check()`` (sync or async) until it is true; fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not true within {timeout}s: {what or check}") from None


def gate_config(
    issuer_url: str,
    *,
    keyset: KeySetSettings = FAST_KEYSET,
    cache: CacheSettings | None = None,
) -> AuthConfig:
    """One issuer, RS/PS/ES allowed, ``oidc:`` user and group prefixes."""
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=issuer_url, audiences=(AUDIENCE,), signing_algs=ALGS
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(claim="sub", prefix="oidc:"),
                    groups=PrefixedClaimOrExpression(claim="groups", prefix="oidc:"),
                ),
            ),
        ),
        keyset=keyset,
        cache=cache or CacheSettings(),
    )


@dataclass
class Faults:
    """Misbehaviour injected in front of the fake API server's own handlers."""

    status: int | None = None
    reset: bool = False
    seen: int = 0

    def clear(self) -> None:
        self.status = None
        self.reset = False

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if self.status is None and not self.reset:
            return await handler(request)
        self.seen += 1
        if self.reset:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        assert self.status is not None
        return status(self.status, "InternalError", "etcd is on fire")


@dataclass
class Gate:
    """A running webhook or proxy and everything around it."""

    mode: str
    url: str
    probe_url: str
    engine: Engine
    metrics: Metrics
    issuer: FakeIssuer
    client: aiohttp.ClientSession
    client_ssl: ssl.SSLContext
    stop: asyncio.Event
    task: asyncio.Task[None]
    fake: FakeAPIServer | None = None
    upstream: Upstream | None = None
    faults: Faults = field(default_factory=Faults)

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("https://").split(":")
        return host, int(port)

    def token(self, key: SigningKey | None = None, **claims: Any) -> str:
        claims.setdefault("groups", ["devs"])
        return self.issuer.token(key, **claims)

    def value(self, name: str, **labels: str) -> float:
        return metric(self.metrics, name, **labels)

    async def probe(self, path: str = "/readyz") -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.probe_url + path) as r:
            return r.status, await r.text()

    async def review(self, token: str) -> tuple[int, dict[str, Any]]:
        """POST a v1 TokenReview; the HTTP status and the JSON answer."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        async with self.client.post(self.url + "/authenticate", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def get(
        self, path: str = PODS, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        async with self.client.get(self.url + path, headers=headers) as r:
            return r.status, await r.text()

    async def open_tls(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.host_port
        return await asyncio.open_connection(
            host, port, ssl=self.client_ssl, server_hostname=host
        )


@asynccontextmanager
async def running_gate(
    tmp_path: Path,
    mode: Literal["webhook", "proxy"],
    issuer: FakeIssuer,
    *,
    config: AuthConfig | None = None,
    proxy_settings: ProxySettings | None = None,
    webhook_settings: WebhookSettings | None = None,
    serve_settings: Mapping[str, Any] | None = None,
    upstream_server: str | None = None,
    upstream_tls_server_name: str | None = None,
    upstream_resolver: AbstractResolver | None = None,
    ready: bool = True,
    ca: trustme.CA | None = None,
) -> AsyncIterator[Gate]:
    """Serve ``mode`` the way the CLI does, on loopback, until the block ends.

    ``upstream_server`` replaces the fake API server's URL in the proxy's
    kubeconfig (``{port}`` is the fake's port), with ``upstream_tls_server_name``
    as its ``tls-server-name`` and ``upstream_resolver`` as the ``Upstream``'s
    name resolver. ``ca`` signs the serving certificate (shared, one client
    can talk to several gates).
    """
    ca = ca or trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "gate.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    server_ssl = server_context(CertPair(str(pem), str(pem)))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    metrics = Metrics()
    engine = await start_engine(config or gate_config(issuer.url), metrics=metrics)
    fake: FakeAPIServer | None = None
    upstream: Upstream | None = None
    faults = Faults()
    try:
        if mode == "proxy":
            fake = FakeAPIServer(ca)
            fake.app.middlewares.insert(0, faults.middleware)
            if not (proxy_settings or ProxySettings()).allow_client_impersonation:
                # Deployed without the client-impersonation component.
                fake.impersonation_rules = PROXY_OVERLAY_RULES
            await fake.start()
            kubeconfig = upstream_kubeconfig(
                tmp_path / "upstream.kubeconfig",
                (upstream_server or fake.url).format(port=fake.port),
                fake.ca_pem,
            )
            if upstream_tls_server_name is not None:
                text = kubeconfig.read_text().replace(
                    "    server:",
                    f"    tls-server-name: {upstream_tls_server_name}\n    server:",
                )
                kubeconfig.write_text(text)
            upstream = Upstream(
                UpstreamSettings(kubeconfig=str(kubeconfig)),
                resolver=upstream_resolver,
            )
            await upstream.start()
            app: Server = proxy_app(engine, upstream, proxy_settings or ProxySettings())
        else:
            app = webhook_app(engine, webhook_settings or WebhookSettings())
        settings = replace(
            ServeSettings(
                bind_address="127.0.0.1",
                secure_port=0,
                probe_host="127.0.0.1",
                probe_port=0,
                shutdown_grace_period=2.0,
            ),
            **(serve_settings or {}),
        )
        loop = asyncio.get_running_loop()
        ports: asyncio.Future[tuple[int, int]] = loop.create_future()
        stop = asyncio.Event()
        task = asyncio.create_task(
            serve(
                app,
                probe_app(engine),
                settings,
                server_ssl,
                on_ready=lambda a, b: ports.set_result((a, b)),
                stop=stop,
            )
        )
        port, probe_port = await asyncio.wait_for(ports, 10)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl),
            timeout=aiohttp.ClientTimeout(total=20),
        ) as client:
            gate = Gate(
                mode=mode,
                url=f"https://127.0.0.1:{port}",
                probe_url=f"http://127.0.0.1:{probe_port}",
                engine=engine,
                metrics=metrics,
                issuer=issuer,
                client=client,
                client_ssl=client_ssl,
                stop=stop,
                task=task,
                fake=fake,
                upstream=upstream,
                faults=faults,
            )
            if ready:
                await wait_until(
                    lambda: not engine.keysets.not_ready(),
                    timeout=10,
                    what="issuer keys loaded",
                )
            try:
                yield gate
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    finally:
        if upstream is not None:
            await upstream.close()
        if fake is not None:
            await fake.stop()
        await engine.close()


async def normal_request(gate: Gate) -> None:
    """One ordinary review or proxied GET, answered correctly within 10 s."""
    async with asyncio.timeout(10):
        if gate.mode == "webhook":
            status, answer = await gate.review(gate.token())
            assert status == 200
            assert answer["status"]["authenticated"] is True
        else:
            status, _ = await gate.get(
                headers={"Authorization": f"Bearer {gate.token()}"}
            )
            assert status == 200
