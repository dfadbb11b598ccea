"""The two other egresses to an issuer: distributed claims and introspection.

``ClaimSourceClient`` is the ``GET`` of a distributed claim's endpoint
(``proxy.distclaims`` decides whether to call it and verifies the answer);
``IntrospectionHttpClient`` is the RFC 7662 ``POST`` that
``proxy.introspection`` decides to make, with ``client_secret_basic``. Both
run on the app's one session, with the issuer's CA bundle, a timeout, a size
limit and no redirects. Re-exported by ``proxy.keyset``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Final

import aiohttp

from proxy.config import (
    IntrospectionClient,
    IssuerConfig,
    url_problems,
)
from proxy.errors import (
    ClaimSourceUnavailable,
    IntrospectionUnavailable,
    KeySetError,
    TokenError,
)
from proxy.jwksfetch import CHUNK_BYTES, issuer_ssl_context

__all__ = [
    "CLAIM_SOURCE_TIMEOUT",
    "INTROSPECTION_TIMEOUT",
    "ClaimSourceClient",
    "IntrospectionHttpClient",
]

#: Whole-request timeout of one distributed-claim fetch: a token review waits
#: for it, and kube-apiserver's webhook client gives up after 10 s.
CLAIM_SOURCE_TIMEOUT: Final = 5.0


class _IssuerContexts:
    """The TLS context of each issuer, made on first use: both clients below
    reach URLs on the issuer's origin and trust what its key fetches trust.
    """

    __slots__ = ("_made",)

    def __init__(self) -> None:
        self._made: dict[str, ssl.SSLContext | bool] = {}

    def get(
        self, issuer: IssuerConfig, unavailable: type[TokenError]
    ) -> ssl.SSLContext | bool:
        """The context, or ``unavailable`` (a temporary refusal) when the
        issuer's CA bundle cannot be loaded.
        """
        ctx = self._made.get(issuer.url)
        if ctx is None:
            try:
                ctx = issuer_ssl_context(issuer)
            except KeySetError as err:
                raise unavailable(str(err), issuer=issuer.url) from err
            self._made[issuer.url] = ctx
        return ctx


class ClaimSourceClient:
    """``GET`` a distributed claim's endpoint (``proxy.distclaims.ClaimSourceFetcher``).

    The caller has already applied the egress policy; this adds the bounds:
    ``timeout`` for the whole request, ``max_bytes`` for the body, no
    redirect (it could leave the issuer's origin), the issuer's CA bundle,
    and the source's ``access_token`` as the bearer only when it has one.
    """

    def __init__(
        self, session: aiohttp.ClientSession, *, timeout: float = CLAIM_SOURCE_TIMEOUT
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._ssl = _IssuerContexts()

    def _context(self, issuer: IssuerConfig) -> ssl.SSLContext | bool:
        return self._ssl.get(issuer, ClaimSourceUnavailable)

    async def fetch(
        self, endpoint: str, access_token: str, *, issuer: IssuerConfig, max_bytes: int
    ) -> bytes:
        """The body of a 2xx answer; ``ClaimSourceUnavailable`` for anything else."""
        headers = {"Accept": "application/jwt"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        where = f"claims: claim source {endpoint[:256]}"

        def fail(detail: str) -> ClaimSourceUnavailable:
            return ClaimSourceUnavailable(f"{where}: {detail}", issuer=issuer.url)

        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.get(
                    endpoint,
                    ssl=self._context(issuer),
                    headers=headers,
                    allow_redirects=False,
                ) as resp,
            ):
                # kube-apiserver takes 200-226 (http.StatusIMUsed) as success.
                if not 200 <= resp.status <= 226:
                    raise fail(f"answered http {resp.status}, expected 2xx")
                length = resp.content_length
                if length is not None and length > max_bytes:
                    raise fail(
                        f"answer is {length} bytes, over the limit of {max_bytes} bytes"
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > max_bytes:
                        raise fail(f"answer is over the limit of {max_bytes} bytes")
        except TimeoutError as err:
            raise fail(f"no answer within {self._timeout:g}s") from err
        except aiohttp.ClientError as err:
            raise fail(f"fetch failed: {type(err).__name__}: {err}") from err
        return bytes(body)


#: Whole-request timeout of one introspection call when none is given.
INTROSPECTION_TIMEOUT: Final = 5.0
#: Largest introspection answer read (RFC 7662 answers are small objects).
_INTROSPECTION_MAX_BYTES: Final = 64 * 1024


#: Most bytes of an error answer read for its OAuth ``error`` code.
_ERROR_BYTES: Final = 4096


def _oauth_error(body: bytes) -> str:
    """`` (error: description)`` of an OAuth error answer, or ``""``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return ""
    text = doc["error"][:64]
    detail = doc.get("error_description")
    if isinstance(detail, str) and detail:
        text += f": {detail[:200]}"
    return f" ({text})"


def _form(value: str) -> str:
    """RFC 6749 §2.3.1: the client id and secret are form-encoded before Basic."""
    return urllib.parse.quote_plus(value)


class IntrospectionHttpClient:
    """RFC 7662 ``POST`` to an issuer's introspection endpoint
    (``proxy.introspection.IntrospectionFetcher``).

    The endpoint is the client's ``endpoint`` if set, else the issuer's
    discovery document's ``introspection_endpoint`` as last fetched by its
    ``IssuerKeySet`` (``endpoint_for``). ``client_secret_basic`` client
    authentication; the token goes in the form body, never in a URL or log.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        issuers: Iterable[IssuerConfig],
        endpoint_for: Callable[[str], str | None],
        *,
        timeout: float = INTROSPECTION_TIMEOUT,
    ) -> None:
        self._session = session
        self._issuers = {i.url: i for i in issuers}
        self._endpoint_for = endpoint_for
        self._timeout = timeout
        self._ssl = _IssuerContexts()

    def _context(self, issuer: IssuerConfig) -> ssl.SSLContext | bool:
        return self._ssl.get(issuer, IntrospectionUnavailable)

    async def introspect(
        self, client: IntrospectionClient, token: str, *, hint: str
    ) -> tuple[bool, float | None]:
        """``active`` (and ``exp``, if given) of ``token``;
        ``IntrospectionUnavailable`` for anything but a 200 JSON object with a
        boolean ``active``.
        """
        issuer = self._issuers[client.issuer]
        endpoint = client.endpoint or self._endpoint_for(client.issuer)

        def fail(detail: str) -> IntrospectionUnavailable:
            return IntrospectionUnavailable(
                f"introspection: {detail}", issuer=client.issuer
            )

        if endpoint is None:
            raise fail(
                f"the discovery document of {client.issuer} has no "
                '"introspection_endpoint" (or was not fetched yet); give '
                "introspectionEndpoint in --introspection-config"
            )
        problems = url_problems(endpoint, allow_query=True)
        if problems:
            raise fail(f"introspection endpoint {endpoint[:256]}: {problems[0]}")
        basic = base64.b64encode(
            f"{_form(client.client_id)}:{_form(client.client_secret.reveal())}".encode()
        ).decode()
        where = f"endpoint {endpoint[:256]}"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.post(
                    endpoint,
                    data={"token": token, "token_type_hint": hint},
                    headers={
                        "Authorization": f"Basic {basic}",
                        "Accept": "application/json",
                    },
                    ssl=self._context(issuer),
                    allow_redirects=False,
                ) as resp,
            ):
                if resp.status in (401, 403):
                    raise fail(
                        f"{where} refused the client (http {resp.status}): check "
                        "the introspection client id and secret"
                    )
                if resp.status != 200:
                    said = _oauth_error(await resp.content.read(_ERROR_BYTES))
                    raise fail(
                        f"{where} answered http {resp.status}{said}, expected 200"
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > _INTROSPECTION_MAX_BYTES:
                        raise fail(
                            f"{where}: answer over {_INTROSPECTION_MAX_BYTES} bytes"
                        )
        except TimeoutError as err:
            raise fail(f"no answer from {where} within {self._timeout:g}s") from err
        except aiohttp.ClientError as err:
            raise fail(f"{where}: {type(err).__name__}: {err}") from err
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise fail(f"{where}: answer is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
            raise fail(f'{where}: answer has no boolean "active"')
        exp = doc.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return doc["active"], None
        return doc["active"], float(exp)
