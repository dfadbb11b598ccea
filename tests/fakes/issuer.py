"""A fake OpenID issuer for tests: discovery + JWKS on 127.0.0.1, misbehaving on demand.

``make_issuer_app(issuer)`` is the aiohttp application; ``FakeIssuer`` is the
controller that owns its state and can serve it over plain http or TLS (a
``trustme`` CA), stop listening and listen again on the same port. Tests change
its behaviour by setting attributes or calling the helpers:

- keys: ``publish``, ``add_key`` (rotation step 1: new key published first),
  ``withdraw`` (step 3: old key removed), ``rotate`` (add new, keep old);
- outages: ``go_down(503)`` / ``come_up()`` answer errors; ``stop()`` /
  ``start()`` stop and resume listening;
- ``jwks_status`` / ``jwks_delay``: the same for the JWKS path only (discovery
  stays healthy);
- ``delay`` (seconds before answering), ``wrong_issuer`` (discovery names
  another issuer), ``jwks_uri`` (override), ``jwks_body`` / ``discovery_body``
  (raw bytes: garbage, oversized), ``chunked`` (no Content-Length),
  ``cache_control``;
- introspection (RFC 7662): ``enable_introspection(client_id, secret)`` adds
  ``introspection_endpoint`` to discovery and serves ``POST /introspect``,
  which checks ``client_secret_basic`` (401 otherwise) and answers
  ``active: false`` for tokens in ``revoked``; ``introspection_status`` /
  ``introspection_delay`` make it fail or slow; ``introspected`` records the
  ``token_type_hint`` of each call;
- ``counts["discovery"]`` / ``counts["jwks"]`` / ``counts["introspect"]``
  count requests per path.

Every route answers from the controller's state at request time, so a change
takes effect on the next fetch.

``loopback_session()`` is a client session that cannot leave the machine: its
resolver refuses every name, so a regression that fetches from a configured
``https://issuer.example.com`` fails fast instead of touching the network.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.keygen import SigningKey, claims_for, jwks, new_key, sign

__all__ = [
    "FakeIssuer",
    "LoopbackOnlyResolver",
    "loopback_session",
    "make_issuer_app",
    "serve_issuer",
]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"
INTROSPECT_PATH = "/introspect"

_ISSUER_KEY: web.AppKey[FakeIssuer] = web.AppKey("fake_issuer")


class FakeIssuer:
    """State and lifecycle of one fake issuer (see the module docstring)."""

    def __init__(
        self,
        *keys: SigningKey,
        tls: trustme.CA | None = None,
        prefix: str = "",
    ) -> None:
        self.keys: list[SigningKey] = list(keys) if keys else [new_key("RS256")]
        self.ca = tls
        self.prefix = prefix.rstrip("/")
        self.counts: collections.Counter[str] = collections.Counter()
        self.status: int = 200
        self.delay: float = 0.0
        self.jwks_status: int = 200
        self.jwks_delay: float = 0.0
        self.wrong_issuer: str | None = None
        self.jwks_uri: str | None = None
        self.jwks_body: bytes | None = None
        self.discovery_body: bytes | None = None
        self.content_type = "application/json"
        self.chunked = False
        self.cache_control: str | None = None
        self.introspection_client: tuple[str, str] | None = None
        self.revoked: set[str] = set()
        self.introspection_status = 200
        self.introspection_delay = 0.0
        self.introspected: list[str] = []
        self.port = 0
        self.app = make_issuer_app(self)
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()

    # -- addresses -------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "http" if self.ca is None else "https"

    @property
    def url(self) -> str:
        """The issuer URL (what ``iss`` and the discovery ``issuer`` say)."""
        if not self.port:
            raise RuntimeError("fake issuer: not started yet")
        return f"{self.scheme}://127.0.0.1:{self.port}{self.prefix}"

    @property
    def discovery_url(self) -> str:
        return self.url + DISCOVERY_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def ca_pem(self) -> str | None:
        """PEM of the CA that signed the TLS certificate (for ``IssuerConfig``)."""
        return None if self.ca is None else self.ca.cert_pem.bytes().decode()

    # -- keys --------------------------------------------------------------------

    def publish(self, *keys: SigningKey) -> None:
        """Replace the published keys."""
        self.keys = list(keys)

    def add_key(self, key: SigningKey) -> None:
        """Publish ``key`` first, keeping the others (rotation, step 1)."""
        self.keys.insert(0, key)

    def rotate(self, alg: str = "RS256") -> SigningKey:
        """Make a new key, publish it beside the old ones, and return it."""
        key = new_key(alg)
        self.add_key(key)
        return key

    def withdraw(self, kid: str) -> None:
        """Stop publishing the key ``kid`` (rotation, last step)."""
        self.keys = [k for k in self.keys if k.kid != kid]

    def token(self, key: SigningKey | None = None, **claims: Any) -> str:
        """A token signed by ``key`` (default: the first published key)."""
        signer = key or self.keys[0]
        return sign(signer, claims_for(self.url, **claims))

    # -- behaviour ---------------------------------------------------------------

    def enable_introspection(self, client_id: str, secret: str) -> None:
        """Publish ``introspection_endpoint``; accept this client's Basic auth."""
        self.introspection_client = (client_id, secret)

    def revoke(self, token: str) -> None:
        """From now on, introspection says ``active: false`` for ``token``."""
        self.revoked.add(token)

    def go_down(self, status: int = 503) -> None:
        """Answer every request with ``status`` (still listening)."""
        self.status = status

    def come_up(self) -> None:
        self.status = 200

    def reset_counts(self) -> None:
        self.counts.clear()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same one after)."""
        if self._runner is not None:
            return
        self._released = asyncio.Event()
        runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=0.1
        )
        await runner.setup()
        ssl_context: ssl.SSLContext | None = None
        if self.ca is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ssl_context)
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening (connections are refused until ``start``)."""
        self._released.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, cut short when the server stops."""
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._released.wait()
            except TimeoutError:
                pass


async def _respond(
    request: web.Request, issuer: FakeIssuer, body: bytes
) -> web.StreamResponse:
    headers = {"Content-Type": issuer.content_type}
    if issuer.cache_control is not None and request.path.endswith(JWKS_PATH):
        headers["Cache-Control"] = issuer.cache_control
    if not issuer.chunked:
        return web.Response(body=body, headers=headers)
    resp = web.StreamResponse(headers=headers)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for start in range(0, len(body), 16 * 1024):
        await resp.write(body[start : start + 16 * 1024])
    await resp.write_eof()
    return resp


async def _discovery(request: web.Request) -> web.StreamResponse:
    issuer = request.app[_ISSUER_KEY]
    issuer.counts["discovery"] += 1
    await issuer._pause(issuer.delay)
    if issuer.status != 200:
        return web.Response(status=issuer.status, text="issuer is down")
    body = issuer.discovery_body
    if body is None:
        doc = {
            "issuer": issuer.wrong_issuer or issuer.url,
            "jwks_uri": issuer.jwks_uri or issuer.jwks_url,
            "authorization_endpoint": issuer.url + "/authorize",
            "token_endpoint": issuer.url + "/token",
            **(
                {"introspection_endpoint": issuer.url + INTROSPECT_PATH}
                if issuer.introspection_client is not None
                else {}
            ),
            "id_token_signing_alg_values_supported": sorted(
                {k.alg for k in issuer.keys}
            ),
        }
        body = json.dumps(doc).encode()
    return await _respond(request, issuer, body)


async def _jwks(request: web.Request) -> web.StreamResponse:
    issuer = request.app[_ISSUER_KEY]
    issuer.counts["jwks"] += 1
    await issuer._pause(issuer.delay + issuer.jwks_delay)
    status = issuer.status if issuer.status != 200 else issuer.jwks_status
    if status != 200:
        return web.Response(status=status, text="issuer is down")
    body = issuer.jwks_body
    if body is None:
        body = json.dumps(jwks(*issuer.keys)).encode()
    return await _respond(request, issuer, body)


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, secret = base64.b64decode(value).decode().partition(":")
    except ValueError:
        return None
    return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(secret)


async def _introspect(request: web.Request) -> web.Response:
    issuer = request.app[_ISSUER_KEY]
    issuer.counts["introspect"] += 1
    await issuer._pause(issuer.introspection_delay)
    if issuer.introspection_status != 200:
        return web.Response(status=issuer.introspection_status, text="down")
    if _basic(request.headers.get("Authorization", "")) != issuer.introspection_client:
        return web.json_response({"error": "invalid_client"}, status=401)
    form = await request.post()
    token = form.get("token")
    if not isinstance(token, str):
        return web.json_response({"error": "invalid_request"}, status=400)
    issuer.introspected.append(str(form.get("token_type_hint", "")))
    if token in issuer.revoked:
        return web.json_response({"active": False})
    return web.json_response({"active": True, "iss": issuer.url})


def make_issuer_app(issuer: FakeIssuer) -> web.Application:
    """The issuer's routes, answering from ``issuer``'s state at request time."""
    app = web.Application()
    app[_ISSUER_KEY] = issuer
    app.router.add_get(issuer.prefix + DISCOVERY_PATH, _discovery)
    app.router.add_get(issuer.prefix + JWKS_PATH, _jwks)
    app.router.add_post(issuer.prefix + INTROSPECT_PATH, _introspect)
    return app


@asynccontextmanager
async def serve_issuer(
    *keys: SigningKey, tls: trustme.CA | None = None, prefix: str = ""
) -> AsyncIterator[FakeIssuer]:
    """A started ``FakeIssuer``, stopped on exit."""
    issuer = FakeIssuer(*keys, tls=tls, prefix=prefix)
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.stop()


class LoopbackOnlyResolver(AbstractResolver):
    """Resolves no name at all: tests reach the fakes by IP literal 127.0.0.1."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise OSError(f"test resolver: refusing to resolve {host!r} (loopback only)")

    async def close(self) -> None:
        return None


def loopback_session() -> aiohttp.ClientSession:
    """A client session whose requests can only reach IP literals (127.0.0.1)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver())
    )
