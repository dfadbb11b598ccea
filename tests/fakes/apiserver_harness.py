"""The proxy under test, wired end to end on 127.0.0.1: fake API server <- proxy
(TLS, real ``Upstream`` from a kubeconfig, real ``Authenticator``) <- client.

``run_proxy`` yields a ``Stack``: ``stack.token(...)`` signs a real token the
proxy accepts, ``stack.client`` is an aiohttp session trusting the test CA,
``stack.fake`` is the fake API server, ``stack.url`` the proxy. The identity
mapping is ``oidc:`` + ``sub`` for the user and ``oidc:`` + each of ``groups``.

``write_kubectl_config`` and ``run_kubectl`` drive the real kubectl binary
(``.venv/bin/kubectl``) against the proxy with ``HOME`` in a temporary dir.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import trustme
import yaml

from proxy.app import ServeSettings, listening
from proxy.audit.auditor import Auditor
from proxy.authn import Authenticator
from proxy.config import ClaimMappings, PrefixedClaimOrExpression
from proxy.http1 import Server
from proxy.impersonate import ProxySettings, TokenAuthenticator, proxy_server
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver import FakeAPIServer, serve_apiserver
from tests.fakes.apiserver_impersonation import PROXY_OVERLAY_RULES
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import SigningKey, claims_for, new_key, sign

__all__ = [
    "PROXY_TOKEN",
    "Stack",
    "kubectl_path",
    "mappings",
    "run_kubectl",
    "run_proxy",
    "upstream_kubeconfig",
    "write_kubectl_config",
]

PROXY_TOKEN = "proxy-sa-token-1"
#: Paths the proxy tests request.
WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
PODS = "/api/v1/namespaces/default/pods"


def mappings(user_prefix: str = "oidc:", group_prefix: str = "oidc:") -> ClaimMappings:
    return ClaimMappings(
        username=PrefixedClaimOrExpression(claim="sub", prefix=user_prefix),
        groups=PrefixedClaimOrExpression(claim="groups", prefix=group_prefix),
    )


def upstream_kubeconfig(
    path: Path, server: str, ca_pem: bytes, *, token: str | None = PROXY_TOKEN
) -> Path:
    """A kubeconfig the proxy uses to reach ``server`` (inline CA, a token)."""
    user: dict[str, Any] = {}
    if token is not None:
        user["token"] = token
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fake",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "proxy", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "proxy"}}],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Stack:
    url: str
    fake: FakeAPIServer
    upstream: Upstream
    key: SigningKey
    ca: trustme.CA
    client: aiohttp.ClientSession
    metrics: Metrics
    settings: ProxySettings
    extra: dict[str, Any] = field(default_factory=dict)

    def token(
        self, sub: str = "alice", groups: Sequence[str] = ("devs",), **claims: Any
    ) -> str:
        return sign(
            self.key, claims_for(ISSUER, sub=sub, groups=list(groups), **claims)
        )

    def bearer(self, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kw)}"}


def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@asynccontextmanager
async def serve_app(server: Server, ca: trustme.CA | None) -> AsyncIterator[str]:
    """Serve the proxy's listener as production does (``proxy.app.listening``)."""
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
    settings = ServeSettings(
        bind_address="127.0.0.1", secure_port=0, shutdown_grace_period=0.1
    )
    async with listening(server, settings, ctx) as port:
        yield f"{'https' if ctx else 'http'}://127.0.0.1:{port}"


@asynccontextmanager
async def run_proxy(
    tmp_path: Path,
    ca: trustme.CA,
    *,
    settings: ProxySettings | None = None,
    upstream: Upstream | Callable[[FakeAPIServer], Upstream] | None = None,
    tls: bool = True,
    claim_mappings: ClaimMappings | None = None,
    authenticator: TokenAuthenticator | None = None,
    auditor: Auditor | None = None,
) -> AsyncIterator[Stack]:
    """Fake API server + proxy in front of it + a client session, all started.

    ``upstream`` replaces the default (a kubeconfig naming the fake API server);
    a callable gets the started fake API server and returns the ``Upstream``.
    ``auditor`` audits the proxy's requests (the caller starts and closes it).
    """
    settings = settings or ProxySettings()
    key = new_key("RS256")
    metrics = Metrics()
    if authenticator is None:
        authenticator = Authenticator(
            auth_config(authenticator_config(mappings=claim_mappings or mappings())),
            {ISSUER: DictResolver(key)},
            metrics=metrics,
        )
    async with serve_apiserver(ca) as fake:
        if not settings.allow_client_impersonation:
            # Deployed without the client-impersonation component.
            fake.impersonation_rules = PROXY_OVERLAY_RULES
        if upstream is None:
            config = upstream_kubeconfig(
                tmp_path / "upstream.kubeconfig", fake.url, fake.ca_pem
            )
            upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        elif not isinstance(upstream, Upstream):
            upstream = upstream(fake)
        await upstream.start()
        try:
            server = proxy_server(
                authenticator=authenticator,
                upstream=upstream,
                settings=settings,
                metrics=metrics,
                auditor=auditor,
            )
            async with (
                serve_app(server, ca if tls else None) as url,
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=client_ssl(ca)),
                    auto_decompress=False,
                ) as client,
            ):
                yield Stack(
                    url=url,
                    fake=fake,
                    upstream=upstream,
                    key=key,
                    ca=ca,
                    client=client,
                    metrics=metrics,
                    settings=settings,
                )
        finally:
            await upstream.close()


# --------------------------------------------------------------------------
# kubectl


def kubectl_path() -> str | None:
    here = Path(sys.executable).parent / "kubectl"
    if here.exists():
        return str(here)
    return shutil.which("kubectl")


def write_kubectl_config(path: Path, server: str, ca_pem: bytes, token: str) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "gate",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "me", "user": {"token": token}}],
        "contexts": [
            {
                "name": "gate",
                "context": {"cluster": "gate", "user": "me", "namespace": "default"},
            }
        ],
        "current-context": "gate",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def kubectl_env(home: Path, kubeconfig: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "KUBECONFIG": str(kubeconfig),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NO_PROXY": "*",
    }


async def run_kubectl(
    args: Sequence[str],
    *,
    home: Path,
    kubeconfig: Path,
    stdin: bytes | None = None,
    timeout: float = 20.0,
) -> tuple[int, str, str]:
    """Run kubectl to completion (without blocking the loop the proxy runs on)."""
    binary = kubectl_path()
    assert binary is not None
    proc = await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdin=asyncio.subprocess.PIPE
        if stdin is not None
        else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=kubectl_env(home, kubeconfig),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"kubectl {' '.join(args)} timed out\nstdout: {out.decode()}\nstderr: {err.decode()}"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_kubectl(
    args: Sequence[str],
    *,
    home: Path,
    kubeconfig: Path,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    binary = kubectl_path()
    assert binary is not None
    return await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**kubectl_env(home, kubeconfig), **(env or {})},
    )
