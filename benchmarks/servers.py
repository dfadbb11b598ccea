"""The helper servers the benchmark starts, each in its own process on loopback.

``python -m benchmarks.servers echo|issuer|upstream ...``

- ``echo``: the baseline a webhook is measured against, the least an aiohttp +
  uvloop server can do for a TokenReview: read the body, parse the JSON, answer
  a fixed user as JSON, over the same TLS the webhook serves.
- ``issuer``: discovery and JWKS over plain http (loopback, for kube-oidc-gate)
  and the JWKS over https (mod_auth_openidc fetches keys only over https). The
  served key set is switched by ``POST /admin/publish?set=NAME`` (a key
  rotation); ``GET /admin/stats`` counts the fetches (the cost of a random-kid
  flood to the issuer).
- ``upstream``: a stand-in API server: a small object, a streamed body of any
  size, and watches that stay open and idle. The proxy-versus-Apache
  scenarios use nginx (``benchmarks.nginx``, the same small object) instead
  when it is installed; this one always serves the stream and the watches.

Kept free of ``proxy`` imports: the baseline must not share the code it is a
baseline for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from pathlib import Path

from aiohttp import web

__all__ = ["SMALL_OBJECT", "main"]

_USER = {
    "username": "oidc:00u1alice",
    "uid": "",
    "groups": ["dev", "ops"],
    "extra": {},
}


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _echo(request: web.Request) -> web.Response:
    review = json.loads(await request.read())
    token = review["spec"]["token"]
    if not isinstance(token, str):
        raise web.HTTPBadRequest
    body = json.dumps(
        {
            "apiVersion": review["apiVersion"],
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": {"token": ""},
            "status": {"authenticated": True, "user": _USER},
        },
        separators=(",", ":"),
    ).encode()
    return web.Response(body=body, content_type="application/json")


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _echo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/authenticate", _echo)
    app.router.add_get("/healthz", _ok)
    return app


class _Issuer:
    def __init__(self, url: str, keys_dir: Path, initial: str) -> None:
        self.url = url
        self.keys_dir = keys_dir
        self.current = initial
        self.stats = {"discovery": 0, "jwks_http": 0, "jwks_https": 0, "publishes": 0}

    async def discovery(self, request: web.Request) -> web.Response:
        self.stats["discovery"] += 1
        doc = {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks.json",
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        return web.json_response(doc)

    async def jwks(self, request: web.Request) -> web.Response:
        self.stats["jwks_https" if request.secure else "jwks_http"] += 1
        body = (self.keys_dir / f"{self.current}.json").read_bytes()
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def publish(self, request: web.Request) -> web.Response:
        name = request.query.get("set", "")
        if not name.isidentifier() or not (self.keys_dir / f"{name}.json").is_file():
            raise web.HTTPNotFound(text="no such key set\n")
        self.current = name
        self.stats["publishes"] += 1
        return web.json_response({"current": name})

    async def get_stats(self, _: web.Request) -> web.Response:
        return web.json_response({**self.stats, "current": self.current})


def _issuer_app(issuer: _Issuer) -> web.Application:
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", issuer.discovery)
    app.router.add_get("/jwks.json", issuer.jwks)
    app.router.add_post("/admin/publish", issuer.publish)
    app.router.add_get("/admin/stats", issuer.get_stats)
    app.router.add_get("/healthz", _ok)
    return app


#: The small object's body; nginx (``benchmarks.nginx``) answers the same bytes.
SMALL_OBJECT = json.dumps(
    {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "small", "namespace": "default", "resourceVersion": "1"},
        "data": {"greeting": "hello"},
    }
).encode()
_CHUNK = b"x" * (256 * 1024)


async def _small(_: web.Request) -> web.Response:
    return web.Response(body=SMALL_OBJECT, content_type="application/json")


async def _big(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "0"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = total
    await resp.prepare(request)
    left = total
    while left > 0:
        part = _CHUNK if left >= len(_CHUNK) else _CHUNK[:left]
        await resp.write(part)
        left -= len(part)
    await resp.write_eof()
    return resp


async def _watch(request: web.Request) -> web.StreamResponse:
    if request.query.get("watch") not in ("1", "true"):
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "items": []})
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1"}}\n')
    # Idle until the client goes away (at most an hour).
    for _ in range(3600):
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await asyncio.sleep(1)
    return resp


def _upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/configmaps/small", _small)
    app.router.add_get("/big", _big)
    app.router.add_get("/api/v1/namespaces/default/pods", _watch)
    app.router.add_get("/healthz", _ok)
    return app


async def _serve(
    app: web.Application, listeners: list[tuple[int, ssl.SSLContext | None]]
) -> None:
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    for port, ctx in listeners:
        site = web.TCPSite(
            runner, "127.0.0.1", port, ssl_context=ctx, reuse_port=True, backlog=1024
        )
        await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run one helper server until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    sub = parser.add_subparsers(dest="kind", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--cert")
    echo.add_argument("--key")
    iss = sub.add_parser("issuer")
    iss.add_argument("--port", type=int, required=True)
    iss.add_argument("--tls-port", type=int, default=0)
    iss.add_argument("--cert")
    iss.add_argument("--key")
    iss.add_argument("--keys-dir", required=True)
    iss.add_argument("--initial", default="current")
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    ns = parser.parse_args(argv)

    import uvloop

    if ns.kind == "echo":
        uvloop.run(_serve(_echo_app(), [(ns.port, _tls(ns.cert, ns.key))]))
    elif ns.kind == "issuer":
        issuer = _Issuer(f"http://127.0.0.1:{ns.port}", Path(ns.keys_dir), ns.initial)
        listeners: list[tuple[int, ssl.SSLContext | None]] = [(ns.port, None)]
        if ns.tls_port:
            listeners.append((ns.tls_port, _tls(ns.cert, ns.key)))
        uvloop.run(_serve(_issuer_app(issuer), listeners))
    else:
        uvloop.run(_serve(_upstream_app(), [(ns.port, None)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
