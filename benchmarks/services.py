"""The services under test and their peers: started, checked, stopped by PID.

Each is a context manager that yields a ``Service`` once it answers and stops
its process on the way out: the local issuer, the bare echo server (the
baseline), kube-oidc-gate's webhook and proxy, the aiohttp and nginx upstreams,
and the peers (Apache + mod_auth_openidc, HAProxy + ``jwt_verify``, the nginx
ceiling). The peers' configurations are written by ``apache.py``,
``haproxy.py`` and ``nginx.py``; ``check_front`` refuses to measure a front end
that lets through what it must refuse.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import apache, haproxy, mint, nginx
from benchmarks.context import (
    AUDIENCE,
    GATE,
    SMALL_PATH,
    UPSTREAM_CREDENTIAL,
    USERNAME_PREFIX,
    Ctx,
)
from benchmarks.procs import Proc, free_port, start, wait_http
from benchmarks.servers import SMALL_OBJECT

__all__ = [
    "NGINX_ROUTES",
    "Service",
    "apache_peer",
    "cache_counts",
    "check_front",
    "client_ssl",
    "echo_server",
    "gate_proxy",
    "haproxy_peer",
    "nginx_ceiling",
    "nginx_upstream",
    "proxy_missing",
    "shared_upstream",
    "start_issuer",
    "upstream_server",
    "webhook",
]


def start_issuer(ctx: Ctx) -> None:
    """Start the local issuer (serving key set ``a``) and wait for it."""
    port = int(ctx.issuer_url.rsplit(":", 1)[1])
    ctx.issuer = start(
        "issuer",
        [
            sys.executable,
            "-m",
            "benchmarks.servers",
            "issuer",
            "--port",
            str(port),
            "--tls-port",
            str(ctx.issuer_tls),
            "--cert",
            ctx.cert,
            "--key",
            ctx.key,
            "--keys-dir",
            str(ctx.work / "keys"),
            "--initial",
            "a",
        ],
        ctx.work,
    )
    wait_http(f"{ctx.issuer_url}/healthz", ctx.issuer, timeout=20)


def _auth_flags(ctx: Ctx) -> list[str]:
    return [
        "--oidc-issuer-url",
        ctx.issuer_url,
        "--oidc-client-id",
        AUDIENCE,
        "--oidc-username-prefix",
        USERNAME_PREFIX,
        "--oidc-groups-claim",
        "groups",
        "--jwks-unknown-kid-cooldown",
        str(ctx.settings.cooldown),
    ]


def _serving_flags(ctx: Ctx, port: int, probe: int, workers: int) -> list[str]:
    return [
        "--bind-address",
        "127.0.0.1",
        "--secure-port",
        str(port),
        "--probe-bind-address",
        f"127.0.0.1:{probe}",
        "--tls-cert-file",
        ctx.cert,
        "--tls-private-key-file",
        ctx.key,
        "--workers",
        str(workers),
        "--shutdown-grace-period",
        "2",
    ]


@dataclass
class Service:
    """A started server under test: its URL, its probe URL and its process."""

    name: str
    url: str
    proc: Proc
    probe_url: str = ""
    #: What serves, for the report's ``upstream`` fields ("nginx 1.22.1").
    label: str = ""

    def metrics(self) -> dict[str, float]:
        """Samples of the probe's /metrics (name{labels} -> value)."""
        if not self.probe_url:
            return {}
        with urllib.request.urlopen(f"{self.probe_url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


@contextlib.contextmanager
def echo_server(ctx: Ctx, processes: int) -> Iterator[Service]:
    port = free_port()
    procs = [
        start(
            f"echo-{processes}-{i}",
            [
                sys.executable,
                "-m",
                "benchmarks.servers",
                "echo",
                "--port",
                str(port),
                "--cert",
                ctx.cert,
                "--key",
                ctx.key,
            ],
            ctx.work,
        )
        for i in range(processes)
    ]
    try:
        for p in procs:
            wait_http(f"https://127.0.0.1:{port}/healthz", p, timeout=20)
        # Several processes: report them as one (CPU is summed over all of them).
        yield Service(f"echo-{processes}", f"https://127.0.0.1:{port}", _Group(procs))  # type: ignore[arg-type]
    finally:
        for p in procs:
            p.stop()


class _Group:
    """Looks like one ``Proc`` for CPU accounting over several processes."""

    def __init__(self, procs: list[Proc]) -> None:
        self._procs = procs

    def pids(self) -> list[int]:
        return [pid for p in self._procs for pid in p.pids()]

    @property
    def pid(self) -> int:
        return self._procs[0].pid


@contextlib.contextmanager
def webhook(ctx: Ctx, workers: int, name: str) -> Iterator[Service]:
    port, probe = free_port(), free_port()
    proc = start(
        name,
        [
            GATE,
            "webhook",
            *_auth_flags(ctx),
            *_serving_flags(ctx, port, probe, workers),
        ],
        ctx.work,
    )
    try:
        wait_http(f"http://127.0.0.1:{probe}/readyz", proc, timeout=30)
        _wait_children(proc, workers)
        yield Service(
            name, f"https://127.0.0.1:{port}", proc, f"http://127.0.0.1:{probe}"
        )
    finally:
        proc.stop()


def _wait_children(proc: Proc, workers: int, timeout: float = 20.0) -> None:
    """With --workers N, wait until N workers run (each must have bound the port)."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(proc.pids()) < workers + 1:
        time.sleep(0.05)
    time.sleep(0.5)


def proxy_missing() -> str | None:
    """Why the proxy scenarios cannot run yet, or None."""
    try:
        res = subprocess.run(
            [GATE, "proxy", "--help"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"kube-oidc-gate proxy --help failed: {err}"
    if "--kubeconfig" not in res.stdout:
        return (
            "kube-oidc-gate proxy has no --kubeconfig flag yet (proxy mode not wired)"
        )
    return None


def _kubeconfig(ctx: Ctx, upstream: str, name: str) -> Path:
    path = ctx.work / f"{name}.kubeconfig"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench", "cluster": {"server": upstream}}],
        "users": [{"name": "gate", "user": {"token": UPSTREAM_CREDENTIAL}}],
        "contexts": [
            {"name": "bench", "context": {"cluster": "bench", "user": "gate"}}
        ],
        "current-context": "bench",
    }
    path.write_text(json.dumps(doc))
    return path


@contextlib.contextmanager
def gate_proxy(ctx: Ctx, upstream: str, workers: int, name: str) -> Iterator[Service]:
    port, probe = free_port(), free_port()
    argv = [
        GATE,
        "proxy",
        *_auth_flags(ctx),
        *_serving_flags(ctx, port, probe, workers),
        "--kubeconfig",
        str(_kubeconfig(ctx, upstream, name)),
    ]
    proc = start(name, argv, ctx.work)
    try:
        wait_http(f"http://127.0.0.1:{probe}/readyz", proc, timeout=30)
        _wait_children(proc, workers)
        yield Service(
            name, f"https://127.0.0.1:{port}", proc, f"http://127.0.0.1:{probe}"
        )
    finally:
        proc.stop()


@contextlib.contextmanager
def upstream_server(ctx: Ctx) -> Iterator[Service]:
    port = free_port()
    proc = start(
        "upstream",
        [sys.executable, "-m", "benchmarks.servers", "upstream", "--port", str(port)],
        ctx.work,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=20)
        yield Service("upstream", f"http://127.0.0.1:{port}", proc, label=_aiohttp())
    finally:
        proc.stop()


def _aiohttp() -> str:
    from importlib.metadata import version

    return f"aiohttp {version('aiohttp')}"


#: What nginx answers: the aiohttp upstream's answers on the paths the
#: proxy-versus-Apache scenarios request (status, body bytes, content type).
NGINX_ROUTES = {
    SMALL_PATH: nginx.Route(body=SMALL_OBJECT, content_type="application/json"),
    "/healthz": nginx.Route(body=b"ok\n", content_type="text/plain; charset=utf-8"),
}


@contextlib.contextmanager
def nginx_upstream(ctx: Ctx) -> Iterator[Service]:
    """A private nginx on loopback answering ``NGINX_ROUTES`` (see benchmarks/nginx.py)."""
    binary = nginx.nginx_binary()
    assert binary is not None
    port = free_port()
    conf = nginx.write_config(ctx.work / "nginx", port=port, routes=NGINX_ROUTES)
    proc = start("nginx", nginx.argv(binary, conf), ctx.work)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=20)
        yield Service(
            "nginx", f"http://127.0.0.1:{port}", proc, label=nginx.version(binary)
        )
    finally:
        # SIGTERM is nginx's fast shutdown; its worker shares its process group.
        proc.stop(timeout=5)
        err = ctx.work / "nginx" / "error.log"
        if err.exists():
            shutil.copy(err, ctx.work / "nginx-error.log")


@contextlib.contextmanager
def shared_upstream(ctx: Ctx, fallback: Service) -> Iterator[Service]:
    """nginx when installed, else ``fallback`` (the aiohttp upstream), said aloud."""
    reason = nginx.missing()
    if reason is not None:
        print(f"  shared upstream: {fallback.label} ({reason})", flush=True)
        ctx.upstream.update(shared=fallback.label, fallback_reason=reason)
        yield fallback
        return
    with nginx_upstream(ctx) as up:
        print(f"  shared upstream: {up.label}", flush=True)
        ctx.upstream.update(shared=up.label, fallback_reason=None)
        yield up


@contextlib.contextmanager
def apache_peer(ctx: Ctx, upstream: str) -> Iterator[Service]:
    binary = apache.apache_binary()
    assert binary is not None
    port = free_port()
    conf = apache.write_config(
        ctx.work / "apache",
        port=port,
        cert=ctx.cert,
        key=ctx.key,
        jwks_url=f"https://127.0.0.1:{ctx.issuer_tls}/jwks.json",
        upstream=upstream,
    )
    proc = start("apache", [binary, "-f", str(conf), "-DFOREGROUND"], ctx.work)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", proc, timeout=20, status=401)
        yield Service("apache", f"https://127.0.0.1:{port}", proc)
    finally:
        # Its children can linger after SIGTERM; then its process group is killed.
        proc.stop(timeout=3)
        err = ctx.work / "apache" / "logs" / "error.log"
        if err.exists():
            shutil.copy(err, ctx.work / "apache-error.log")


def client_ssl() -> ssl.SSLContext:
    """A client context that trusts the run's self-signed certificate by not checking it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _fetch(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5, context=client_ssl()) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def check_front(ctx: Ctx, svc: Service, *, authenticates: bool = True) -> list[str]:
    """Refuse to measure a front end that would report inflated figures.

    A peer that let through a token it must refuse (a bad signature, an
    expired token, a wrong audience or issuer, another key's signature, an
    ``alg`` other than RS256, no token) would do less work per request than
    the proxy. It must also forward what the proxy forwards: the user in
    ``Impersonate-User`` and the upstream credential instead of the client's
    token (nginx answers both at ``nginx.HEADERS_PATH``). Raises
    RuntimeError, which fails the group, rather than report such a run;
    returns the causes it saw refused.
    """
    valid = ctx.files["one"].read_text().split()[0]
    status, body = _fetch(f"{svc.url}{nginx.HEADERS_PATH}", valid)
    user = f"{USERNAME_PREFIX}{ctx.valid_sub}" if authenticates else ""
    want = f"{user}\nBearer {UPSTREAM_CREDENTIAL}\n".encode()
    if status != 200 or body != want:
        raise RuntimeError(
            f"{svc.name}: a valid token got {status} {body[:200]!r}, not 200 {want!r}"
        )
    if not authenticates:
        return []
    let_through = {}
    for cause, token in {**ctx.refusable, "no token": None}.items():
        status, _ = _fetch(f"{svc.url}{SMALL_PATH}", token)
        if status != 401:
            let_through[cause] = status
    if let_through:
        raise RuntimeError(
            f"{svc.name} does not refuse what it must (cause: status): {let_through}"
        )
    return [*ctx.refusable, "no token"]


def _public_key_pem(key: mint.Key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@contextlib.contextmanager
def haproxy_peer(ctx: Ctx, upstream: str, threads: int) -> Iterator[Service]:
    """HAProxy + ``jwt_verify`` in front of ``upstream``, checked before it is measured."""
    binary = haproxy.haproxy_binary()
    assert binary is not None
    port = free_port()
    conf = haproxy.write_config(
        ctx.work / "haproxy",
        port=port,
        cert_pem=Path(ctx.cert).read_bytes() + Path(ctx.key).read_bytes(),
        public_key_pem=_public_key_pem(ctx.key_a),
        issuer=ctx.issuer_url,
        audience=AUDIENCE,
        username_prefix=USERNAME_PREFIX,
        upstream=upstream.partition("://")[2].rstrip("/"),
        credential=UPSTREAM_CREDENTIAL,
        threads=threads,
    )
    proc = start("haproxy", haproxy.argv(binary, conf), ctx.work)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", proc, timeout=20, status=401)
        svc = Service(
            f"haproxy-{threads}",
            f"https://127.0.0.1:{port}",
            proc,
            label=haproxy.version(binary),
        )
        check_front(ctx, svc)
        yield svc
    finally:
        proc.stop(timeout=5)


@contextlib.contextmanager
def nginx_ceiling(ctx: Ctx, upstream: str, workers: int) -> Iterator[Service]:
    """nginx as a TLS reverse proxy without authentication: a proxy's ceiling here."""
    binary = nginx.nginx_binary()
    assert binary is not None
    port = free_port()
    conf = nginx.write_proxy_config(
        ctx.work / "nginx-ceiling",
        port=port,
        cert=ctx.cert,
        key=ctx.key,
        upstream=upstream.partition("://")[2].rstrip("/"),
        credential=UPSTREAM_CREDENTIAL,
        workers=workers,
    )
    proc = start("nginx-ceiling", nginx.argv(binary, conf), ctx.work)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", proc, timeout=20)
        svc = Service(
            f"nginx-ceiling-{workers}",
            f"https://127.0.0.1:{port}",
            proc,
            label=nginx.version(binary),
        )
        check_front(ctx, svc, authenticates=False)
        yield svc
    finally:
        proc.stop(timeout=5)
        err = ctx.work / "nginx-ceiling" / "error.log"
        if err.exists():
            shutil.copy(err, ctx.work / "nginx-ceiling-error.log")


def cache_counts(svc: Service) -> tuple[float, float]:
    """The service's token-cache hits and misses so far (from its /metrics)."""
    m = svc.metrics()
    hit = m.get('kube_oidc_gate_token_cache_requests_total{outcome="hit"}', 0.0)
    miss = m.get('kube_oidc_gate_token_cache_requests_total{outcome="miss"}', 0.0)
    return hit, miss
