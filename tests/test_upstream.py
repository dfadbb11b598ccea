"""How the proxy reaches the API server: kubernetes loaders, TLS, credential
rotation, the one client (the pool) for ordinary requests and upgrades, and
the API server failing behind the real proxy (status, readiness, metrics).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.errors import ConfigError, UpstreamError
from proxy.impersonate import ProxySettings
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver import FakeAPIServer, serve_apiserver
from tests.fakes.apiserver_harness import (
    PROXY_TOKEN,
    WHOAMI,
    run_proxy,
    upstream_kubeconfig,
)
from tests.fakes.apiserver_raw import serve_raw_upgrade
from tests.fakes.issuer import FakeIssuer
from tests.support.running_gate import PODS, Gate, running_gate


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def started(settings: UpstreamSettings, **kw: Any) -> AsyncIterator[Upstream]:
    upstream = Upstream(settings, **kw)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def kubeconfig(
    path: Path, cluster: dict[str, Any], user: dict[str, Any], **extra: Any
) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------
# Loading


async def test_kubeconfig_gives_url_ca_and_credential(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with serve_apiserver(ca) as fake:
        config = upstream_kubeconfig(tmp_path / "kc", fake.url, fake.ca_pem)
        async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
            assert str(upstream.base_url) == fake.url
            assert upstream.auth_headers() == {"Authorization": f"Bearer {PROXY_TOKEN}"}
            assert PROXY_TOKEN not in repr(upstream)
            headers = [*upstream.auth_items, ("Impersonate-User", "someone")]
            response = await upstream.fetch(
                "GET", "/api", headers=headers, connect_timeout=5, head_timeout=5
            )
            async with response:
                assert response.status == 200
                assert json.loads(await response.read(1 << 20))["kind"] == "APIVersions"


async def test_kubeconfig_context_is_honoured(tmp_path: Path, ca: trustme.CA) -> None:
    config = kubeconfig(
        tmp_path / "kc",
        {
            "server": "https://127.0.0.1:1",
            "certificate-authority-data": b64(ca.cert_pem.bytes()),
        },
        {"token": "first"},
    )
    doc = yaml.safe_load(config.read_text())
    doc["clusters"].append(
        {
            "name": "other",
            "cluster": {
                "server": "https://127.0.0.2:2",
                **doc["clusters"][0]["cluster"],
            },
        }
    )
    doc["clusters"][1]["cluster"]["server"] = "https://127.0.0.2:2"
    doc["users"].append({"name": "other", "user": {"token": "second"}})
    doc["contexts"].append(
        {"name": "b", "context": {"cluster": "other", "user": "other"}}
    )
    config.write_text(yaml.safe_dump(doc))
    async with started(
        UpstreamSettings(kubeconfig=str(config), context="b")
    ) as upstream:
        assert str(upstream.base_url) == "https://127.0.0.2:2"
        assert upstream.auth_headers() == {"Authorization": "Bearer second"}


async def test_server_path_prefix_and_raw_paths_are_kept(
    tmp_path: Path, ca: trustme.CA
) -> None:
    config = kubeconfig(
        tmp_path / "kc",
        {
            "server": "https://127.0.0.1:6443/k8s/clusters/c-1/",
            "certificate-authority-data": b64(ca.cert_pem.bytes()),
        },
        {"token": "t"},
    )
    async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
        url = upstream.url("/api/v1/namespaces/a%2Fb/pods?labelSelector=x%3Dy&watch=1")
        assert str(url) == (
            "https://127.0.0.1:6443/k8s/clusters/c-1/api/v1/namespaces/a%2Fb/pods"
            "?labelSelector=x%3Dy&watch=1"
        )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-file", 'upstream: --kubeconfig "{tmp}/nope": no such file'),
        ("unknown-context", "upstream:"),
        ("plain-http-remote", "plain http"),
        ("proxy-url", "proxy-url"),
        ("in-cluster-no-env", "upstream: no --kubeconfig, and not in a pod"),
        ("in-cluster-no-token", "upstream: in-cluster service account: no token at"),
        ("bad-yaml", "not valid yaml near line"),
        ("not-a-mapping", "upstream:"),
    ],
    ids=[
        "missing-file",
        "unknown-context",
        "plain-http-remote",
        "proxy-url",
        "in-cluster-no-env",
        "in-cluster-no-token",
        "bad-yaml",
        "not-a-mapping",
    ],
)
async def test_unusable_configuration_is_a_config_error(
    tmp_path: Path, ca: trustme.CA, case: str, expected: str
) -> None:
    secret = "secret-token-do-not-print"
    ca_data = b64(ca.cert_pem.bytes())
    environ: dict[str, str] | None = None
    settings: UpstreamSettings
    if case == "missing-file":
        settings = UpstreamSettings(kubeconfig=str(tmp_path / "nope"))
    elif case == "unknown-context":
        config = kubeconfig(
            tmp_path / "kc", {"server": "https://x:1"}, {"token": secret}
        )
        settings = UpstreamSettings(kubeconfig=str(config), context="missing")
    elif case == "plain-http-remote":
        config = kubeconfig(
            tmp_path / "kc", {"server": "http://10.0.0.1:8080"}, {"token": secret}
        )
        settings = UpstreamSettings(kubeconfig=str(config))
    elif case == "bad-yaml":
        config = tmp_path / "kc"
        config.write_text(f'users:\n- name: u\n  user:\n    token: "{secret}\n  x: [\n')
        settings = UpstreamSettings(kubeconfig=str(config))
    elif case == "not-a-mapping":
        config = tmp_path / "kc"
        config.write_text(f"- {secret}\n")
        settings = UpstreamSettings(kubeconfig=str(config))
    elif case == "proxy-url":
        cluster = {"server": "https://x:1", "certificate-authority-data": ca_data}
        cluster["proxy-url"] = "http://proxy:3128"
        config = kubeconfig(tmp_path / "kc", cluster, {"token": secret})
        settings = UpstreamSettings(kubeconfig=str(config))
    else:
        (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())
        if case == "in-cluster-no-env":
            (tmp_path / "token").write_text(secret)
            environ = {}
        else:
            environ = {
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": "1",
            }
        settings = UpstreamSettings(
            token_file=str(tmp_path / "token"), ca_file=str(tmp_path / "ca.crt")
        )
    upstream = Upstream(settings, environ=environ)
    with pytest.raises(ConfigError) as info:
        await upstream.start()
    assert expected.format(tmp=tmp_path) in str(info.value)
    assert secret not in str(info.value)
    await upstream.close()


def _cert_user(ca: trustme.CA, organization: str) -> dict[str, str]:
    client = ca.issue_cert(
        "proxy", common_name="kube-oidc-gate", organization_name=organization
    )
    return {
        "client-certificate-data": b64(client.cert_chain_pems[0].bytes()),
        "client-key-data": b64(client.private_key_pem.bytes()),
    }


WARNING = "upstream credential is far more powerful than impersonation needs"


@pytest.mark.parametrize(
    ("credential", "groups"),
    [
        ("system:masters", ["system:masters"]),
        ("kubeadm:cluster-admins", ["kubeadm:cluster-admins"]),
        ("kube-oidc-gate:impersonators", None),
        ("token", None),
    ],
    ids=["masters-certificate", "kubeadm-admins-certificate", "other-group", "token"],
)
async def test_an_all_powerful_credential_is_warned_about_once(
    tmp_path: Path,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    credential: str,
    groups: list[str] | None,
) -> None:
    """Impersonation needs a few verbs; a credential that may do anything works
    just as well, so only this warning ever shows the mistake."""
    user = {"token": "t"} if credential == "token" else _cert_user(ca, credential)
    cluster = {
        "server": "https://127.0.0.1:1",
        "certificate-authority-data": b64(ca.cert_pem.bytes()),
    }
    config = kubeconfig(tmp_path / "kc", cluster, user)
    caplog.set_level(logging.WARNING, logger="proxy.upstream")
    async with started(UpstreamSettings(kubeconfig=str(config))):
        pass
    warned = [r for r in caplog.records if r.getMessage() == WARNING]
    if groups is None:
        assert warned == []
        return
    (record,) = warned
    assert record.levelno == logging.WARNING
    assert record.groups == groups  # type: ignore[attr-defined]
    assert "deploy/overlays/proxy/rbac.yaml" in record.hint  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Credential rotation


def _project_token(sa_dir: Path, token: str, generation: int) -> None:
    """Write the token the way the kubelet does: a new dir, then swap ``..data``."""
    data = sa_dir / f"..gen_{generation}"
    data.mkdir()
    (data / "token").write_text(token)
    link = sa_dir / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, sa_dir / "..data")
    if not (sa_dir / "token").is_symlink():
        (sa_dir / "token").symlink_to("..data/token")


@pytest.mark.slow
async def test_in_cluster_token_rotation_reaches_the_api_server(
    tmp_path: Path, ca: trustme.CA
) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(ca.cert_pem.bytes())
    _project_token(sa, "sa-token-1", 1)
    settings = UpstreamSettings(
        token_file=str(sa / "token"),
        ca_file=str(sa / "ca.crt"),
        credential_check_interval=0.05,
    )

    def in_cluster(fake: FakeAPIServer) -> Upstream:
        environ = {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(fake.port),
        }
        return Upstream(settings, environ=environ)

    async with run_proxy(tmp_path, ca, upstream=in_cluster) as stack:
        stack.fake.proxy_tokens = {"sa-token-1", "sa-token-2"}
        async with stack.client.post(
            stack.url + WHOAMI, headers=stack.bearer(), json={}
        ) as r:
            assert r.status == 201
        assert stack.fake.requests[-1].bearer == "sa-token-1"
        _project_token(sa, "sa-token-2", 2)
        async with asyncio.timeout(5):
            while stack.fake.requests[-1].bearer != "sa-token-2":
                await asyncio.sleep(0.05)
                async with stack.client.post(
                    stack.url + WHOAMI, headers=stack.bearer(), json={}
                ) as r:
                    assert r.status == 201
        assert stack.upstream.auth_headers() == {"Authorization": "Bearer sa-token-2"}
        stack.fake.proxy_tokens = {"sa-token-2"}
        async with stack.client.post(
            stack.url + WHOAMI, headers=stack.bearer(), json={}
        ) as r:
            assert r.status == 201


async def test_empty_token_file_keeps_the_last_token(
    tmp_path: Path, ca: trustme.CA
) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())
    token = tmp_path / "token"
    token.write_text("sa-1\n")
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
    }
    settings = UpstreamSettings(
        token_file=str(token),
        ca_file=str(tmp_path / "ca.crt"),
        credential_check_interval=60,
    )
    async with started(settings, environ=environ) as upstream:
        assert str(upstream.base_url) == "https://127.0.0.1:6443"
        assert upstream.auth_headers() == {"Authorization": "Bearer sa-1"}
        assert await upstream.refresh_credentials() is False
        token.write_text("")
        assert await upstream.refresh_credentials() is False
        assert upstream.auth_headers() == {"Authorization": "Bearer sa-1"}
        token.write_text("sa-2")
        assert await upstream.refresh_credentials() is True
        assert upstream.auth_headers() == {"Authorization": "Bearer sa-2"}
        token.unlink()
        assert await upstream.refresh_credentials() is False
        assert upstream.auth_headers() == {"Authorization": "Bearer sa-2"}


@pytest.mark.slow
async def test_kubeconfig_exec_plugin_credential_is_refreshed(
    tmp_path: Path, ca: trustme.CA
) -> None:
    credential = tmp_path / "cred.json"

    def publish(token: str) -> None:
        credential.write_text(
            '{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",'
            f' "status": {{"token": "{token}", "expirationTimestamp": "2000-01-01T00:00:00Z"}}}}'
        )

    publish("exec-1")
    config = kubeconfig(
        tmp_path / "kc",
        {
            "server": "https://127.0.0.1:6443",
            "certificate-authority-data": b64(ca.cert_pem.bytes()),
        },
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": "cat",
                "args": [str(credential)],
                "interactiveMode": "Never",
            }
        },
    )
    settings = UpstreamSettings(kubeconfig=str(config), credential_check_interval=60)
    async with started(settings) as upstream:
        assert upstream.auth_headers() == {"Authorization": "Bearer exec-1"}
        publish("exec-2")
        assert await upstream.refresh_credentials() is True
        assert upstream.auth_headers() == {"Authorization": "Bearer exec-2"}


# --------------------------------------------------------------------------
# TLS


async def test_client_certificate_from_kubeconfig_is_presented(
    tmp_path: Path, ca: trustme.CA
) -> None:
    client_ca = trustme.CA()
    cert = client_ca.issue_cert("kube-oidc-gate-proxy")
    async with serve_raw_upgrade(ca, token=None, client_ca=client_ca) as raw:
        config = kubeconfig(
            tmp_path / "kc",
            {"server": raw.url, "certificate-authority-data": b64(ca.cert_pem.bytes())},
            {
                "client-certificate-data": b64(cert.cert_chain_pems[0].bytes()),
                "client-key-data": b64(cert.private_key_pem.bytes()),
            },
        )
        async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
            assert upstream.auth_headers() == {}
            response = await upstream.upgrade(
                "POST",
                "/api/v1/namespaces/default/pods/p/portforward",
                headers=[],
                protocol="SPDY/3.1",
                connect_timeout=5,
                head_timeout=5,
            )
            await response.detach().close()
        assert response.status == 101
        (peer,) = raw.peer_certs
        assert peer is not None
        assert "kube-oidc-gate-proxy" in str(peer.get("subjectAltName"))


async def test_untrusted_server_certificate_is_502(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with serve_apiserver(ca) as fake:
        config = upstream_kubeconfig(
            tmp_path / "kc", fake.url, trustme.CA().cert_pem.bytes()
        )
        async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
            with pytest.raises(UpstreamError) as info:
                await upstream.fetch(
                    "GET", "/api", headers=[], connect_timeout=5, head_timeout=5
                )
            assert info.value.status == 502
            with pytest.raises(UpstreamError) as info:
                await upstream.upgrade(
                    "GET",
                    "/x",
                    headers=[],
                    protocol="websocket",
                    connect_timeout=5,
                    head_timeout=5,
                )
            assert info.value.status == 502


async def test_unreachable_server_is_503(tmp_path: Path, ca: trustme.CA) -> None:
    async with serve_apiserver(ca) as fake:
        url, pem = fake.url, fake.ca_pem
    config = upstream_kubeconfig(tmp_path / "kc", url, pem)
    async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
        with pytest.raises(UpstreamError) as info:
            await upstream.fetch(
                "GET", "/api", headers=[], connect_timeout=5, head_timeout=5
            )
        assert info.value.status == 503
        with pytest.raises(UpstreamError) as info:
            await upstream.upgrade(
                "GET",
                "/x",
                headers=[],
                protocol="websocket",
                connect_timeout=5,
                head_timeout=5,
            )
        assert info.value.status == 503


# --------------------------------------------------------------------------
# Upgrades through the pool (plain http on loopback)


@contextlib.asynccontextmanager
async def canned(answer: bytes | None) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server that reads one request head, records it and sends ``answer``
    (``None``: say nothing and wait), then closes."""
    heads: list[bytes] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            if answer is None:
                await asyncio.sleep(10)
            else:
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def _plain(tmp_path: Path, port: int, prefix: str = "") -> UpstreamSettings:
    config = kubeconfig(
        tmp_path / "kc", {"server": f"http://127.0.0.1:{port}{prefix}"}, {"token": "t"}
    )
    return UpstreamSettings(kubeconfig=str(config))


BODY_CASES = [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nhello", 403, b"hello"),
    (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        400,
        b"abcde",
    ),
    (b"HTTP/1.1 500 Oops\r\nX-A: b\r\n\r\nuntil close", 500, b"until close"),
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        404,
        b"",
    ),
]


@pytest.mark.parametrize(
    ("answer", "code", "body"),
    BODY_CASES,
    ids=["content-length", "chunked", "until-close", "continue-then-final"],
)
async def test_non_101_answers_are_read(
    tmp_path: Path, answer: bytes, code: int, body: bytes
) -> None:
    async with (
        canned(answer) as (port, heads),
        started(_plain(tmp_path, port, "/prefix")) as up,
    ):
        response = await up.upgrade(
            "GET",
            "/api/v1/x?y=1",
            headers=[("X-A", "1")],
            protocol="websocket",
            connect_timeout=5,
            head_timeout=5,
            max_head_bytes=4096,
        )
        async with response:
            assert response.status == code
            assert await response.read(100) == body
        assert up.pool.idle_connections == 0  # an upgrade's connection is its own
    head = heads[0].decode()
    assert head == (
        f"GET /prefix/api/v1/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "X-A: 1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )  # no framing, no credential: the caller decides which one


@pytest.mark.slow
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b"SPDY nonsense\r\n\r\n", 502),
        (b"HTTP/1.1 101 Switching\r\nNo colon here\r\n\r\n", 502),
        (b"HTTP/1.1 101 Switching\r\n", 502),
        (b"HTTP/1.1 101 Switching\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 502),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\nspdy", 502),
        (b"HTTP/1.1 101 Switching\r\nConnection: Upgrade\r\n Upgrade: x\r\n\r\n", 502),
        (b"HTTP/1.1 101 Switching\nConnection: Upgrade\nUpgrade: x\n\n", 502),
        (b"HTTP/2.0 101 Switching\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n", 502),
        (None, 504),
    ],
    ids=[
        "bad-status-line",
        "bad-header",
        "closed-early",
        "head-too-large",
        "101-without-connection-upgrade",
        "obs-fold",
        "bare-lf",
        "http-2.0",
        "no-answer",
    ],
)
async def test_bad_upgrade_answers(
    tmp_path: Path, answer: bytes | None, code: int
) -> None:
    async with canned(answer) as (port, _), started(_plain(tmp_path, port)) as up:
        with pytest.raises(UpstreamError) as info:
            await up.upgrade(
                "GET",
                "/x",
                headers=[],
                protocol="websocket",
                connect_timeout=5,
                head_timeout=0.3,
                max_head_bytes=4096,
            )
        assert info.value.status == code
        assert up.pool.open_connections == 0


async def test_error_body_is_capped(tmp_path: Path) -> None:
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 500\r\n\r\n" + b"x" * 500
    async with canned(answer) as (port, _), started(_plain(tmp_path, port)) as up:
        response = await up.upgrade(
            "GET", "/x", headers=[], protocol="websocket", connect_timeout=5
        )
        with pytest.raises(UpstreamError):
            await response.read(100)
        assert up.pool.open_connections == 0


async def test_a_101_hands_over_the_connection_with_the_bytes_after_the_head(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """What the pool hands over after ``101`` is the same connection: the
    bytes that came with the head first, then both ways, then the end.
    """
    async with serve_raw_upgrade(ca) as raw:
        config = upstream_kubeconfig(tmp_path / "kc", raw.url, ca.cert_pem.bytes())
        async with started(UpstreamSettings(kubeconfig=str(config))) as upstream:
            response = await upstream.upgrade(
                "POST",
                "/api/v1/namespaces/default/pods/p/exec?command=sh",
                headers=[*upstream.auth_items, ("X-Stream-Protocol-Version", "v4")],
                protocol="SPDY/3.1",
                connect_timeout=5,
                head_timeout=5,
            )
            assert response.status == 101
            assert response.headers["Upgrade"] == "SPDY/3.1"
            pipe = response.detach()
            async with asyncio.timeout(5):
                got = b""
                while len(got) < len(raw.greeting):
                    got += await pipe.read()
                assert got == raw.greeting
                pipe.write(b"hello")
                await pipe.drain()
                assert await pipe.read() == b"HELLO"
                pipe.write(b"BYE")
                assert await pipe.read() == b""
            await pipe.close()
            assert upstream.pool.open_connections == 0
    line, headers = raw.heads[0]
    assert line == "POST /api/v1/namespaces/default/pods/p/exec?command=sh HTTP/1.1"
    assert headers["Connection"] == "Upgrade"
    assert headers["Upgrade"] == "SPDY/3.1"
    assert "Content-Length" not in headers
    assert "Transfer-Encoding" not in headers


async def test_an_unexpected_101_to_an_ordinary_request_is_502(
    tmp_path: Path,
) -> None:
    answer = b"HTTP/1.1 101 Switching\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
    async with canned(answer) as (port, _), started(_plain(tmp_path, port)) as up:
        with pytest.raises(UpstreamError) as info:
            await up.fetch("GET", "/x", headers=[], connect_timeout=5, head_timeout=5)
        assert info.value.status == 502
        assert up.pool.open_connections == 0


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


@pytest.mark.slow
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
