"""Run the real webhook (engine + app + TLS listeners) in-process on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from kubernetes.client import ApiClient, V1TokenReview, V1TokenReviewSpec
from multidict import CIMultiDictProxy

from proxy.app import Engine, ServeSettings, probe_app, serve, start_engine, webhook_app
from proxy.certs import CertPair, server_context
from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    KeySetSettings,
    PrefixedClaimOrExpression,
)
from proxy.metrics import Metrics
from proxy.webhook import WebhookSettings

_API = ApiClient()


def review_body(
    token: str, *, audiences: list[str] | None = None, version: str = "v1"
) -> dict[str, Any]:
    """A TokenReview built with the kubernetes package's own models."""
    review = V1TokenReview(
        api_version=f"authentication.k8s.io/{version}",
        kind="TokenReview",
        spec=V1TokenReviewSpec(token=token, audiences=audiences),
    )
    body: dict[str, Any] = _API.sanitize_for_serialization(review)  # type: ignore[no-untyped-call]
    return body


#: The kubernetes model of a TokenReview, loosely typed here: its fields are all
#: Optional, and each test asserts the shape it expects instead of narrowing.
Review = Any


def parse_review(text: str) -> Review:
    """Parse an answer with the kubernetes package's deserializer."""
    review = _API.deserialize(text, "V1TokenReview", "application/json")
    assert isinstance(review, V1TokenReview)
    return review


def issuer_auth_config(url: str, ca_pem: str | None, **keyset: Any) -> AuthConfig:
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=url, certificate_authority=ca_pem, audiences=("kubernetes",)
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(claim="sub", prefix="oidc:"),
                    groups=PrefixedClaimOrExpression(claim="groups", prefix=""),
                ),
            ),
        ),
        keyset=KeySetSettings(
            retry_min=0.05, retry_max=0.2, fetch_timeout=2.0, **keyset
        ),
    )


@dataclass
class RunningWebhook:
    url: str
    probe_url: str
    client_ssl: ssl.SSLContext
    engine: Engine
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]
    server_ca: trustme.CA
    session: aiohttp.ClientSession = field(init=False)

    async def post(
        self, body: Any, *, headers: dict[str, str] | None = None
    ) -> tuple[int, str, CIMultiDictProxy[str]]:
        data: Any = body if isinstance(body, bytes | str) else json.dumps(body)
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes) and len(data) > 1024 * 1024:
            data = io.BytesIO(data)
        async with self.session.post(
            f"{self.url}/authenticate",
            data=data,
            headers=headers or {"Content-Type": "application/json"},
        ) as resp:
            return resp.status, await resp.text(), resp.headers

    async def review(self, token: str, **kw: Any) -> Review:
        status, text, _ = await self.post(review_body(token, **kw))
        assert status == 200, text
        return parse_review(text)

    async def probe(self, path: str) -> tuple[int, str]:
        async with self.session.get(f"{self.probe_url}{path}") as resp:
            return resp.status, await resp.text()


@asynccontextmanager
async def running_webhook(
    config: AuthConfig,
    tmp_path: Path,
    *,
    settings: WebhookSettings | None = None,
    client_ca: trustme.CA | None = None,
    client_cert: trustme.LeafCert | None = None,
    idle_timeout: float = 75.0,
) -> AsyncIterator[RunningWebhook]:
    server_ca = trustme.CA()
    leaf = server_ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "server.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_ca_file = None
    if client_ca is not None:
        client_ca_file = str(tmp_path / "client-ca.pem")
        client_ca.cert_pem.write_to_path(client_ca_file)
    ctx = server_context(CertPair(str(pem), str(pem)), client_ca_file=client_ca_file)
    metrics = Metrics()
    engine = await start_engine(config, metrics=metrics)
    app = webhook_app(engine, settings or WebhookSettings())
    ports: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    serve_settings = ServeSettings(
        bind_address="127.0.0.1",
        secure_port=0,
        probe_host="127.0.0.1",
        probe_port=0,
        shutdown_grace_period=5,
        idle_timeout=idle_timeout,
    )
    task = asyncio.create_task(
        serve(
            app,
            probe_app(engine),
            serve_settings,
            ctx,
            on_ready=lambda a, b: ports.set_result((a, b)),
            stop=stop,
        )
    )
    port, probe_port = await asyncio.wait_for(ports, 10)
    client_ssl = ssl.create_default_context()
    server_ca.configure_trust(client_ssl)
    if client_cert is not None:
        client_cert.configure_cert(client_ssl)
    running = RunningWebhook(
        url=f"https://127.0.0.1:{port}",
        probe_url=f"http://127.0.0.1:{probe_port}",
        client_ssl=client_ssl,
        engine=engine,
        metrics=metrics,
        stop=stop,
        task=task,
        server_ca=server_ca,
    )
    running.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl)
    )
    try:
        yield running
    finally:
        await running.session.close()
        stop.set()
        await asyncio.wait_for(task, 15)
        await engine.close()


async def wait_ready(engine: Engine, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while engine.keysets.not_ready():
            await asyncio.sleep(0.02)
