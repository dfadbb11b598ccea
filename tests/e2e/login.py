"""The authorization-code + PKCE login a user's kubelogin performs, without a browser.

kubelogin opens a browser at the issuer's authorize endpoint, the user signs
in and consents, the provider redirects to ``http://localhost:8000`` with a
code, and kubelogin exchanges the code (with the PKCE verifier, no client
secret: a native app) for tokens. ``login`` walks the same HTTP steps with an
aiohttp session: discovery, authorize, the login form, the consent form,
resume, then the token exchange. The final redirect to ``localhost:8000`` is
never followed; its ``code`` is read from the ``Location`` header, which is
all kubelogin's local listener does with it.

It imports nothing from pytest so the test credential plugin can use it too.
Every request runs under one overall timeout and the redirect chain is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Final
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp

__all__ = [
    "REDIRECT_URI",
    "LoginRefused",
    "Tokens",
    "login",
    "unverified_claims",
    "unverified_header",
]

#: The redirect URI of the article's Okta app (kubelogin's ``--listen-address``).
REDIRECT_URI: Final = "http://localhost:8000"
_MAX_STEPS: Final = 12


class LoginRefused(Exception):
    """The provider refused the login or the code exchange (the step is named)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tokens:
    """The token endpoint's answer; ``id_token`` is what kubectl sends."""

    id_token: str
    access_token: str
    expires_in: int
    scope: str

    def __repr__(self) -> str:
        return f"Tokens(scope={self.scope!r}, expires_in={self.expires_in})"


class _FormParser(HTMLParser):
    """The first ``<form>`` of a page: its action and its ``<input>`` names."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.inputs: dict[str, str] = {}
        self.input_types: dict[str, str] = {}
        self._in_form = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and not self._done and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and "name" in values:
            self.inputs[values["name"]] = values.get("value", "")
            self.input_types[values["name"]] = values.get("type", "text")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    )
    return decoded


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, not verified (for test assertions only)."""
    return _segment(token, 0)


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, not verified (for test assertions only)."""
    return _segment(token, 1)


async def login(
    issuer: str,
    *,
    client_id: str,
    username: str,
    password: str,
    redirect_uri: str = REDIRECT_URI,
    scope: str = "openid profile",
    timeout: float = 15.0,
) -> Tokens:
    """Log ``username`` in at ``issuer`` for ``client_id`` and return its tokens.

    Raises ``LoginRefused`` when the provider refuses a step (bad password,
    disabled user, an error redirect, a failed code exchange).
    """
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, an IP host
    async with (
        asyncio.timeout(timeout),
        aiohttp.ClientSession(cookie_jar=jar) as session,
    ):
        async with session.get(f"{issuer}/.well-known/openid-configuration") as resp:
            resp.raise_for_status()
            discovery = await resp.json(content_type=None)
        verifier = _b64url(secrets.token_bytes(48))
        state = _b64url(secrets.token_bytes(16))
        nonce = _b64url(secrets.token_bytes(16))
        query = urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": redirect_uri,
                "scope": scope,
                "state": state,
                "nonce": nonce,
                "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest()),
                "code_challenge_method": "S256",
            }
        )
        url = f"{discovery['authorization_endpoint']}?{query}"
        callback = await _authorize(session, url, redirect_uri, username, password)
        params = parse_qs(urlsplit(callback).query)
        if "error" in params:
            raise LoginRefused(
                f"login: authorize: {params['error'][0]}: {params.get('error_description', [''])[0]}"
            )
        if params.get("state") != [state]:
            raise LoginRefused("login: authorize: the state parameter does not match")
        if params.get("iss", [issuer]) != [issuer]:
            raise LoginRefused(
                f"login: authorize: iss parameter {params['iss'][0]} is not {issuer}"
            )
        code = params["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
            "code_verifier": verifier,
        }
        async with session.post(discovery["token_endpoint"], data=form) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise LoginRefused(
                    f"login: token: http {resp.status}: {body.get('error')}: {body.get('error_description')}"
                )
    if unverified_claims(body["id_token"]).get("nonce") != nonce:
        raise LoginRefused("login: token: the id_token's nonce does not match")
    return Tokens(
        id_token=body["id_token"],
        access_token=body["access_token"],
        expires_in=int(body["expires_in"]),
        scope=body.get("scope", ""),
    )


async def _authorize(
    session: aiohttp.ClientSession,
    url: str,
    redirect_uri: str,
    username: str,
    password: str,
) -> str:
    """Follow authorize → login → consent → resume; return the callback URL."""
    method, data = "GET", None
    for _ in range(_MAX_STEPS):
        async with session.request(
            method, url, data=data, allow_redirects=False
        ) as resp:
            status, location, text = (
                resp.status,
                resp.headers.get("Location"),
                await resp.text(),
            )
        if status in (301, 302, 303, 307) and location:
            url = urljoin(url, location)
            if url.startswith(redirect_uri):
                return url
            method, data = "GET", None
            continue
        if status != 200:
            parser = _FormParser()
            parser.feed(text)
            where = (
                "the login form"
                if "password" in parser.input_types.values()
                else url.split("?", 1)[0]
            )
            raise LoginRefused(f"login: {where} answered http {status}")
        parser = _FormParser()
        parser.feed(text)
        if parser.action is None:
            raise LoginRefused(f"login: no form at {url.split('?', 1)[0]}")
        fields = dict(parser.inputs)
        if "password" in parser.input_types.values():
            fields["username"] = username
            fields["password"] = password
        url, method, data = urljoin(url, parser.action), "POST", fields
    raise LoginRefused(
        f"login: more than {_MAX_STEPS} steps without reaching {redirect_uri}"
    )
