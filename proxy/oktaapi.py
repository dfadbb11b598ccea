"""Okta's API for a user's groups, over the app's one ``ClientSession``.

``OktaApiClient`` is ``proxy.oktagroups.OktaGroupsFetcher``: it reads
``GET {org}/api/v1/users/{id}/groups?limit=200`` and follows ``Link: <...>;
rel="next"`` (only on the org's own origin: the credential never leaves it),
returning each group's ``profile.name``.

Credentials (``--okta-*``, docs/okta.md), never logged, never in an
exception message or ``repr``:

- an API token file: ``Authorization: SSWS <token>``;
- an OAuth 2.0 API service app: a ``client_credentials`` grant at
  ``{org}/oauth2/v1/token`` with ``private_key_jwt`` client authentication
  (an assertion with ``iss`` = ``sub`` = client id, ``aud`` = the token
  endpoint, ``exp``, ``jti``), scopes ``okta.groups.read okta.users.read``;
  the access token is kept until a minute before it expires (or half its
  life, if shorter). New service apps require DPoP (RFC 9449) by default,
  so with ``dpop`` (the default) every token and API request carries a
  proof signed by a per-process P-256 key, with ``ath`` on API requests and
  the server's ``DPoP-Nonce`` when it asks for one (``use_dpop_nonce``);
  the API is then called with ``Authorization: DPoP <token>``. Okta's
  answer decides: a ``Bearer`` token is sent as a bearer.

The secret files are re-read when they change (size, mtime or inode), so a
rotated API token or key needs no restart; a new key drops the cached access
token.

Rate limits: Okta answers ``X-Rate-Limit-Remaining`` and ``X-Rate-Limit-Reset``
(Unix seconds, read against the answer's ``Date`` so clock skew does not
matter). When the remaining count reaches 0, or on a 429, requests to that
endpoint of that org wait until the reset if it falls before the fetch's
deadline, and fail at once (``GroupsUnavailable``) if it does not, rather
than spend the budget of the next minute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDictProxy

from proxy.config import (
    OKTA_API_SCOPES,
    AuthConfig,
    ClientKey,
    OktaGroupsConfig,
    Secret,
    parse_client_key,
)
from proxy.errors import GroupsUnavailable
from proxy.metrics import Metrics

__all__ = ["OktaApiClient", "SecretFile", "next_link"]

log = logging.getLogger(__name__)

#: Groups asked for per page: the most Okta's list-user-groups returns.
PAGE_SIZE: Final = 200
#: Largest page body read.
MAX_PAGE_BYTES: Final = 4 * 1024 * 1024
#: Longest a rate-limit reset is believed (Okta's windows are one minute).
MAX_RESET_WAIT: Final = 120.0
#: Most 429 answers retried within one fetch.
MAX_RETRIES: Final = 3
#: An access token is renewed this long before it expires.
TOKEN_EARLY: Final = 60.0
_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_LINK_NEXT: Final = re.compile(r'<([^>]*)>\s*;(?:[^,]*?;)?\s*rel="?next"?', re.I)


def next_link(values: list[str]) -> str | None:
    """The ``rel="next"`` URL of ``Link`` header values, or None."""
    for value in values:
        for part in value.split(","):
            found = _LINK_NEXT.search(part)
            if found:
                return found.group(1).strip()
    return None


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SecretFile:
    """A credential file, re-read when its size, mtime or inode changes."""

    def __init__(self, path: str, flag: str) -> None:
        self.path = path
        self._flag = flag
        self._stamp: tuple[int, int, int] | None = None
        self._value: Secret | None = None

    def __repr__(self) -> str:
        return f"SecretFile({self.path!r})"

    async def read(self) -> tuple[Secret, bool]:
        """The credential and whether it changed since the last read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp and self._value is not None:
                return self._value, False
            text = await asyncio.to_thread(self._load)
        except (OSError, UnicodeDecodeError) as err:
            raise GroupsUnavailable(
                f"okta: {self._flag} {json.dumps(self.path)} cannot be read: "
                f"{type(err).__name__}"
            ) from None
        if not text:
            raise GroupsUnavailable(
                f"okta: {self._flag} {json.dumps(self.path)} is empty"
            )
        changed = self._value is not None
        self._stamp, self._value = stamp, Secret(text)
        if changed:
            log.info("okta credential file re-read", extra={"file": self.path})
        return self._value, changed

    def _load(self) -> str:
        with open(self.path, "rb") as f:
            return f.read().decode("utf-8").strip()


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(slots=True)
class _AccessToken:
    value: Secret
    kind: str
    renew_at: float


HeadersFor = Callable[[], Awaitable[dict[str, str]]]


class OktaApiClient:
    """Fetch a user's groups from Okta's API (``OktaGroupsFetcher``; module docs)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: AuthConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        okta = config.okta
        assert okta is not None
        self._session = session
        self._config: OktaGroupsConfig = okta
        self._metrics = metrics
        self._clock = clock
        self._ssl: dict[str, ssl.SSLContext | bool] = {}
        by_url = {a.issuer.url: a.issuer for a in config.authenticators}
        for url in okta.issuers:
            ca = by_url[url].certificate_authority
            org = okta.org_for(url)
            self._ssl[org] = ssl.create_default_context(cadata=ca) if ca else True
        self._resume_at: dict[tuple[str, str], float] = {}
        self._api_token = (
            SecretFile(okta.api_token_file, "--okta-groups-api-token-file")
            if okta.api_token_file
            else None
        )
        self._key_file = (
            SecretFile(okta.private_key_file, "--okta-api-private-key-file")
            if okta.private_key_file
            else None
        )
        self._client_key: tuple[ClientKey, str, str | None] | None = None
        self._tokens: dict[str, _AccessToken] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._nonces: dict[tuple[str, str, int], str] = {}
        self._dpop_key = ec.generate_private_key(ec.SECP256R1())
        self._dpop_jwk: dict[str, Any] = json.loads(
            jwt.algorithms.ECAlgorithm.to_jwk(self._dpop_key.public_key())
        )

    def __repr__(self) -> str:
        return f"OktaApiClient(issuers={self._config.issuers!r})"

    # -- groups ---------------------------------------------------------------

    async def user_groups(
        self, org_url: str, user_id: str, *, deadline: float
    ) -> list[str]:
        """Every group's ``profile.name``; ``GroupsUnavailable`` otherwise."""
        user = urllib.parse.quote(user_id, safe="")
        url: str | None = f"{org_url}/api/v1/users/{user}/groups?limit={PAGE_SIZE}"
        names: list[str] = []
        pages = 0
        while url is not None:
            pages += 1
            if pages > self._config.max_pages:
                raise GroupsUnavailable(
                    f"okta: the user has more than "
                    f"{self._config.max_pages * PAGE_SIZE} groups; not read"
                )
            answer = await self._authorized_get(org_url, url, deadline)
            if answer.status == 404:
                raise GroupsUnavailable(
                    f"okta: {org_url} knows no user with the token's sub (404)"
                )
            if answer.status != 200:
                raise GroupsUnavailable(
                    f"okta: {org_url}'s groups API answered http {answer.status}"
                    f"{_okta_error(answer.body)}"
                )
            names.extend(_page_names(answer.body, org_url))
            if self._metrics is not None:
                self._metrics.okta_api_pages.inc()
            url = next_link(answer.headers.getall("Link", []))
            if url is not None and _origin(url) != _origin(org_url):
                raise GroupsUnavailable(
                    f"okta: the next page is off {org_url}'s origin; not followed"
                )
        return names

    async def _authorized_get(self, org: str, url: str, deadline: float) -> _Answer:
        new_token = new_nonce = False
        while True:
            token = await self._access_token(org, deadline)

            async def headers(token: _AccessToken | None = token) -> dict[str, str]:
                return await self._api_headers(token, url)

            answer = await self._request(
                "GET", url, org, "groups", headers, deadline=deadline
            )
            if answer.status != 401 or token is None:
                return answer
            if not new_nonce and self._take_nonce(url, answer.headers, answer.body):
                new_nonce = True
                continue
            if new_token:
                return answer
            # Revoked or expired early: one fresh token, then give up.
            new_token = True
            self._tokens.pop(org, None)

    async def _api_headers(
        self, token: _AccessToken | None, url: str
    ) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if token is None:
            assert self._api_token is not None
            secret, _ = await self._api_token.read()
            headers["Authorization"] = f"SSWS {secret.reveal()}"
            return headers
        value = token.value.reveal()
        if token.kind.lower() == "dpop":
            headers["Authorization"] = f"DPoP {value}"
            ath = _b64(hashlib.sha256(value.encode()).digest())
            headers["DPoP"] = self._proof("GET", url, ath=ath)
        else:
            headers["Authorization"] = f"Bearer {value}"
        return headers

    # -- the service app's access token ---------------------------------------

    async def _access_token(self, org: str, deadline: float) -> _AccessToken | None:
        if self._key_file is None:
            return None
        key, changed = await self._key_file.read()
        if changed or self._client_key is None:
            try:
                self._client_key = parse_client_key(key.reveal())
            except ValueError as err:
                raise GroupsUnavailable(
                    f"okta: --okta-api-private-key-file: {err}"
                ) from None
            self._tokens.clear()
        now = asyncio.get_running_loop().time()
        held = self._tokens.get(org)
        if held is not None and held.renew_at > now:
            return held
        lock = self._token_locks.setdefault(org, asyncio.Lock())
        async with lock:
            held = self._tokens.get(org)
            if held is not None and held.renew_at > asyncio.get_running_loop().time():
                return held
            token = await self._request_token(org, deadline)
            self._tokens[org] = token
            return token

    async def _request_token(self, org: str, deadline: float) -> _AccessToken:
        url = f"{org}/oauth2/v1/token"
        config = self._config
        for _ in range(2):

            async def headers() -> dict[str, str]:
                out = {"Accept": "application/json"}
                if config.dpop:
                    out["DPoP"] = self._proof("POST", url)
                return out

            form = {
                "grant_type": "client_credentials",
                "scope": " ".join(OKTA_API_SCOPES),
                "client_assertion_type": _ASSERTION_TYPE,
                "client_assertion": self._assertion(url),
            }
            answer = await self._request(
                "POST", url, org, "token", headers, deadline=deadline, form=form
            )
            if answer.status == 400 and self._take_nonce(
                url, answer.headers, answer.body
            ):
                continue
            break
        if answer.status != 200:
            raise GroupsUnavailable(
                f"okta: the service app's token request to {url} answered http "
                f"{answer.status}{_okta_error(answer.body)}"
            )
        try:
            doc = json.loads(answer.body)
            value = doc["access_token"]
            kind = doc.get("token_type", "Bearer")
            life = float(doc.get("expires_in", 3600))
            if not (isinstance(value, str) and value and isinstance(kind, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise GroupsUnavailable(
                f"okta: the token endpoint {url} answered no usable access token"
            ) from None
        renew = asyncio.get_running_loop().time() + max(
            0.0, min(life - TOKEN_EARLY, life / 2)
        )
        return _AccessToken(value=Secret(value), kind=kind, renew_at=renew)

    def _assertion(self, audience: str) -> str:
        assert self._client_key is not None
        key, alg, kid = self._client_key
        now = int(self._clock())
        client_id = self._config.client_id
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        kid = self._config.key_id or kid
        header = {"kid": kid} if kid else None
        return jwt.encode(claims, key, algorithm=alg, headers=header)

    def _proof(self, method: str, url: str, *, ath: str | None = None) -> str:
        parts = urllib.parse.urlsplit(url)
        htu = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        claims: dict[str, Any] = {
            "htm": method,
            "htu": htu,
            "iat": int(self._clock()),
            "jti": uuid.uuid4().hex,
        }
        nonce = self._nonces.get(_origin(url))
        if nonce is not None:
            claims["nonce"] = nonce
        if ath is not None:
            claims["ath"] = ath
        return jwt.encode(
            claims,
            self._dpop_key,
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": self._dpop_jwk},
        )

    def _take_nonce(
        self, url: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> bool:
        """Remember a ``DPoP-Nonce`` the server asks us to use; True if new."""
        nonce = headers.get("DPoP-Nonce")
        asked = b"use_dpop_nonce" in body or "use_dpop_nonce" in headers.get(
            "WWW-Authenticate", ""
        )
        if not self._config.dpop or not nonce or not asked:
            return False
        origin = _origin(url)
        if self._nonces.get(origin) == nonce:
            return False
        self._nonces[origin] = nonce
        return True

    # -- one request, rate limits honoured ------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        org: str,
        endpoint: str,
        headers: HeadersFor,
        *,
        deadline: float,
        form: Mapping[str, str] | None = None,
    ) -> _Answer:
        loop = asyncio.get_running_loop()
        gate = (org, endpoint)
        for _ in range(MAX_RETRIES + 1):
            resume = self._resume_at.get(gate, 0.0)
            if resume > loop.time():
                if resume > deadline:
                    raise GroupsUnavailable(
                        f"okta: rate limited by {org} for another "
                        f"{resume - loop.time():.0f}s (X-Rate-Limit-Reset), past "
                        "the fetch's deadline"
                    )
                await asyncio.sleep(resume - loop.time())
            answer = await self._send(method, url, org, endpoint, headers, form=form)
            self._note_limits(gate, answer.headers, limited=answer.status == 429)
            if answer.status != 429:
                return answer
        raise GroupsUnavailable(
            f"okta: still rate limited by {org} after {MAX_RETRIES} retries"
        )

    async def _send(
        self,
        method: str,
        url: str,
        org: str,
        endpoint: str,
        headers: HeadersFor,
        *,
        form: Mapping[str, str] | None,
    ) -> _Answer:
        started = time.perf_counter()
        try:
            async with self._session.request(
                method,
                url,
                headers=await headers(),
                data=form,
                ssl=self._ssl.get(org, True),
                allow_redirects=False,
            ) as resp:
                body = await resp.content.read(MAX_PAGE_BYTES + 1)
                answer = _Answer(resp.status, resp.headers, body)
        except aiohttp.ClientError as err:
            self._count(endpoint, "unreachable")
            log.warning(
                "okta api unreachable",
                extra={"org": org, "endpoint": endpoint, "error": type(err).__name__},
            )
            raise GroupsUnavailable(
                f"okta: {org} unreachable: {type(err).__name__}"
            ) from None
        except TimeoutError:
            self._count(endpoint, "timeout")
            raise
        finally:
            if self._metrics is not None:
                self._metrics.histogram_tally(
                    self._metrics.okta_api_duration, endpoint
                ).observe(time.perf_counter() - started)
        if len(body) > MAX_PAGE_BYTES:
            self._count(endpoint, "http_error")
            raise GroupsUnavailable(f"okta: an answer of {org} is over the size limit")
        status = answer.status
        result = (
            "ok"
            if status == 200
            else "rate_limited"
            if status == 429
            else "denied"
            if status in (401, 403)
            else "http_error"
        )
        self._count(endpoint, result)
        if result != "ok":
            log.warning(
                "okta api refused",
                extra={"org": org, "endpoint": endpoint, "status": status},
            )
        return answer

    def _note_limits(
        self, gate: tuple[str, str], headers: CIMultiDictProxy[str], *, limited: bool
    ) -> None:
        remaining = _int(headers.get("X-Rate-Limit-Remaining"))
        reset = _int(headers.get("X-Rate-Limit-Reset"))
        if not limited and (remaining is None or remaining > 0):
            return
        server_now = self._clock()
        date = headers.get("Date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                server_now = email.utils.parsedate_to_datetime(date).timestamp()
        wait = 1.0 if reset is None else reset - server_now
        wait = min(max(wait, 0.0), MAX_RESET_WAIT) + 0.05
        loop = asyncio.get_running_loop()
        self._resume_at[gate] = loop.time() + wait
        log.info(
            "okta rate limit reached",
            extra={"org": gate[0], "endpoint": gate[1], "wait": round(wait, 2)},
        )

    def _count(self, endpoint: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.tally(
                self._metrics.okta_api_requests, endpoint, result
            ).count += 1


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _okta_error(body: bytes) -> str:
    """Okta's ``errorSummary`` / ``error_description`` (never a credential)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    for field in ("errorSummary", "error_description", "error"):
        value = doc.get(field)
        if isinstance(value, str) and value:
            return f": {value[:200]}"
    return ""


def _page_names(body: bytes, org: str) -> list[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise GroupsUnavailable(
            f"okta: {org} answered a page that is not JSON"
        ) from None
    if not isinstance(doc, list):
        raise GroupsUnavailable(f"okta: {org} answered a page that is not a list")
    names: list[str] = []
    for group in doc:
        profile = group.get("profile") if isinstance(group, dict) else None
        name = profile.get("name") if isinstance(profile, dict) else None
        if not isinstance(name, str):
            raise GroupsUnavailable(
                f"okta: {org} answered a group without a string profile.name"
            )
        names.append(name)
    return names
