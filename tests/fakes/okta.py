"""A loopback stand-in for Okta's API, following its documented shapes.

- ``GET /api/v1/users/{id}/groups?limit=N&after=CURSOR``: a JSON list of group
  objects (``id``, ``type``, ``profile.name``), at most 200 a page, with
  ``Link: <...>; rel="self"`` and ``rel="next"`` headers and the rate-limit
  headers (``X-Rate-Limit-Limit``/``-Remaining``/``-Reset``, Unix seconds);
  ``401`` with an Okta error body (``errorCode``, ``errorSummary``) unless
  the request carries ``SSWS <api token>``, or an access token this stand-in
  issued (``Bearer``, or ``DPoP`` with a valid proof bound to it: ``typ``
  ``dpop+jwt``, ``jwk``, signature, ``htm``, ``htu``, ``ath``, ``jti``);
- ``POST /oauth2/v1/token``: ``client_credentials`` with ``private_key_jwt``
  validated as Okta validates it (``client_assertion_type``, signed with the
  registered public key, ``iss`` = ``sub`` = client id, ``aud`` = this token
  endpoint's URL, ``exp`` present and at most an hour ahead, ``jti`` never
  reused), granted scopes only; with ``require_dpop`` (Okta's default for new
  service apps) a DPoP proof is required, and the first one without a nonce
  gets ``400 use_dpop_nonce`` with a ``DPoP-Nonce`` header, as Okta answers.

Knobs: ``users`` (id → group names), ``down`` (answer 503), ``throttle(n,
reset_in)`` (the next n group requests get 429 with a reset), ``counts``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["FakeOkta", "serve_okta"]

_OKTA: web.AppKey[FakeOkta] = web.AppKey("fake_okta")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (the ``jkt`` a DPoP token is bound to)."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps(
        {m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True
    )
    return _b64(hashlib.sha256(canonical.encode()).digest())


class FakeOkta:
    """State and lifecycle of the stand-in (see the module docstring)."""

    def __init__(self, tls: trustme.CA | None = None) -> None:
        self.ca = tls
        self.users: dict[str, list[str]] = {}
        self.api_token = "00okta-api-token-" + secrets.token_hex(8)
        self.client_id = "0oaservice" + secrets.token_hex(4)
        self.client_public_key: PublicKeyTypes | None = None
        self.client_kid: str | None = None
        self.granted_scopes = {"okta.groups.read", "okta.users.read"}
        self.require_dpop = True
        self.nonce = "nonce-" + secrets.token_hex(4)
        #: access token -> (token_type, jkt or "")
        self.issued: dict[str, tuple[str, str]] = {}
        self.seen_jti: set[str] = set()
        self.down = False
        self.delay = 0.0
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self._throttled = 0
        self._reset_in = 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ca is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> str | None:
        return self.ca.cert_pem.bytes().decode() if self.ca is not None else None

    def add_user(self, user_id: str, groups: list[str]) -> None:
        self.users[user_id] = groups

    def throttle(self, count: int, reset_in: float) -> None:
        self._throttled, self._reset_in = count, reset_in

    async def start(self) -> None:
        app = web.Application()
        app[_OKTA] = self
        app.router.add_get("/api/v1/users/{user}/groups", _groups)
        app.router.add_post("/oauth2/v1/token", _token)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        ctx = None
        if self.ca is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- checks ---------------------------------------------------------------

    def check_proof(
        self, proof: str, method: str, url: str, *, token: str | None = None
    ) -> tuple[str | None, str]:
        """(error, jkt) of a DPoP proof, as RFC 9449 §4.3 checks it."""
        try:
            header = jwt.get_unverified_header(proof)
            if header.get("typ") != "dpop+jwt" or not isinstance(
                header.get("jwk"), dict
            ):
                return "typ or jwk missing", ""
            if "d" in header["jwk"]:
                return "private key in jwk", ""
            key = jwt.PyJWK(header["jwk"]).key
            claims = jwt.decode(
                proof, key, algorithms=["ES256", "RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as err:
            return f"bad proof: {err}", ""
        if (
            claims.get("htm") != method
            or claims.get("htu") != url.split("?", maxsplit=1)[0]
        ):
            return "htm/htu mismatch", ""
        if abs(claims.get("iat", 0) - time.time()) > 60:
            return "iat", ""
        jti = claims.get("jti")
        if not isinstance(jti, str) or jti in self.seen_jti:
            return "jti missing or reused", ""
        self.seen_jti.add(jti)
        if token is not None:
            ath = _b64(hashlib.sha256(token.encode()).digest())
            if claims.get("ath") != ath:
                return "ath mismatch", ""
        elif claims.get("nonce") != self.nonce:
            return "use_dpop_nonce", ""
        return None, thumbprint(header["jwk"])

    def check_assertion(self, assertion: str, audience: str) -> str | None:
        if self.client_public_key is None:
            return "no service app registered"
        try:
            header = jwt.get_unverified_header(assertion)
            if self.client_kid is not None and header.get("kid") != self.client_kid:
                return "kid"
            claims = jwt.decode(
                assertion,
                self.client_public_key,  # type: ignore[arg-type]
                algorithms=["RS256", "ES256", "ES384"],
                audience=audience,
                issuer=self.client_id,
                options={"require": ["exp", "jti", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as err:
            return f"client assertion: {err}"
        if claims["sub"] != self.client_id:
            return "sub must equal the client id"
        if claims["exp"] > time.time() + 3600:
            return "exp more than an hour ahead"
        if claims["jti"] in self.seen_jti:
            return "jti reused"
        self.seen_jti.add(claims["jti"])
        return None


def _okta_error(status: int, code: str, summary: str) -> web.Response:
    return web.json_response(
        {"errorCode": code, "errorSummary": summary, "errorId": "oae1"}, status=status
    )


def _limits(okta: FakeOkta, *, remaining: int = 599) -> dict[str, str]:
    reset = math.ceil(time.time() + (okta._reset_in if remaining == 0 else 60))
    return {
        "X-Rate-Limit-Limit": "600",
        "X-Rate-Limit-Remaining": str(remaining),
        "X-Rate-Limit-Reset": str(reset),
    }


async def _groups(request: web.Request) -> web.StreamResponse:
    okta = request.app[_OKTA]
    okta.counts["groups"] += 1
    if okta.down:
        return _okta_error(503, "E0000009", "Internal Server Error")
    if okta._throttled > 0:
        okta._throttled -= 1
        okta.counts["throttled"] += 1
        return web.json_response(
            {"errorCode": "E0000047", "errorSummary": "API call exceeded rate limit"},
            status=429,
            headers=_limits(okta, remaining=0),
        )
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    ok = False
    if scheme == "SSWS":
        ok = secrets.compare_digest(value, okta.api_token)
    elif scheme in ("Bearer", "DPoP") and value in okta.issued:
        kind, jkt = okta.issued[value]
        if kind == "Bearer":
            ok = scheme == "Bearer"
        elif scheme == "DPoP":
            error, got = okta.check_proof(
                request.headers.get("DPoP", ""), "GET", str(request.url), token=value
            )
            if error is not None:
                okta.errors.append(error)
            ok = error is None and got == jkt
    if not ok:
        okta.counts["unauthorized"] += 1
        return _okta_error(401, "E0000011", "Invalid token provided")
    user = request.match_info["user"]
    if user not in okta.users:
        return _okta_error(404, "E0000007", f"Not found: Resource not found: {user}")
    okta.counts["served"] += 1
    groups = okta.users[user]
    limit = min(int(request.query.get("limit", "10000")), 200)
    start = int(request.query.get("after", "0"))
    page = groups[start : start + limit]
    base = f"{okta.url}/api/v1/users/{user}/groups"
    links = [f'<{base}?limit={limit}>; rel="self"']
    if start + limit < len(groups):
        links.append(f'<{base}?after={start + limit}&limit={limit}>; rel="next"')
    body = [
        {
            "id": f"00g{start + i:05d}",
            "type": "OKTA_GROUP",
            "profile": {"name": name, "description": None},
            "_links": {"logo": [], "users": {"href": f"{base}/x"}},
        }
        for i, name in enumerate(page)
    ]
    resp = web.json_response(body, headers=_limits(okta))
    for link in links:
        resp.headers.add("Link", link)
    return resp


async def _token(request: web.Request) -> web.StreamResponse:
    okta = request.app[_OKTA]
    okta.counts["token"] += 1
    form = await request.post()
    url = f"{okta.url}/oauth2/v1/token"

    def oauth_error(code: str, text: str, **headers: str) -> web.Response:
        okta.errors.append(f"{code}: {text}")
        return web.json_response(
            {"error": code, "error_description": text}, status=400, headers=headers
        )

    if form.get("grant_type") != "client_credentials":
        return oauth_error("unsupported_grant_type", "grant_type")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        return oauth_error("invalid_client", "client_assertion_type")
    problem = okta.check_assertion(str(form.get("client_assertion", "")), url)
    if problem is not None:
        return web.json_response(
            {"error": "invalid_client", "error_description": problem}, status=401
        )
    scopes = set(str(form.get("scope", "")).split())
    if not scopes or not scopes <= okta.granted_scopes:
        return oauth_error("invalid_scope", "scope not granted")
    jkt = ""
    if okta.require_dpop:
        proof = request.headers.get("DPoP")
        if not proof:
            return oauth_error(
                "invalid_dpop_proof", "The DPoP proof JWT header is missing."
            )
        error, jkt = okta.check_proof(proof, "POST", url)
        if error == "use_dpop_nonce":
            return oauth_error(
                "use_dpop_nonce",
                "Authorization server requires nonce in DPoP proof.",
                **{"DPoP-Nonce": okta.nonce},
            )
        if error is not None:
            return oauth_error("invalid_dpop_proof", error)
    token = secrets.token_urlsafe(24)
    kind = "DPoP" if okta.require_dpop else "Bearer"
    okta.issued[token] = (kind, jkt)
    return web.json_response(
        {
            "token_type": kind,
            "expires_in": 3600,
            "access_token": token,
            "scope": " ".join(sorted(scopes)),
        }
    )


@asynccontextmanager
async def serve_okta(tls: trustme.CA | None = None) -> AsyncIterator[FakeOkta]:
    """A started ``FakeOkta``, stopped on exit."""
    okta = FakeOkta(tls)
    await okta.start()
    try:
        yield okta
    finally:
        await okta.stop()
