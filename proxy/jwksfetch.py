"""Fetching an issuer's keys: its discovery document, then the JWKS it names.

Every fetch re-reads discovery, so a changed ``jwks_uri`` is followed:
``GET <issuer>/.well-known/openid-configuration`` (or ``discovery_url``),
whose ``issuer`` must equal the configured URL exactly, then ``GET jwks_uri``.
Only https, except to a loopback host; every request has a timeout and a size
limit, and no redirect is followed. The JWKS response's ``Cache-Control:
max-age`` (clamped) sets the cache lifetime, as Okta advises. What to do with
the result (keep it, refresh it, keep the last good one on failure) is
``proxy.keyset``'s.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Final

import aiohttp

from proxy.config import (
    IssuerConfig,
    KeySetSettings,
    is_loopback_host,
)
from proxy.errors import (
    DiscoveryError,
    KeySetError,
)
from proxy.jwk import VerificationKey, parse_jwks

__all__ = [
    "CHUNK_BYTES",
    "DISCOVERY_PATH",
    "Fetched",
    "IssuerFetcher",
    "cache_max_age",
    "check_url",
    "issuer_ssl_context",
]

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
#: Bytes read at a time from an issuer's answer (each read checks the limit).
CHUNK_BYTES: Final = 64 * 1024


def check_url(url: str, what: str, error: type[KeySetError]) -> None:
    """https only; plain http only to a loopback host (tests, a local dev IdP)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as err:
        raise error(f"jwks: {what} {url} is not a valid url: {err}") from err
    scheme = parts.scheme.lower()
    if not host or scheme not in ("https", "http"):
        raise error(f"jwks: {what} {url} is not an absolute https url")
    if scheme == "http" and not is_loopback_host(host):
        raise error(
            f"jwks: {what} {url} must use https "
            "(plain http is allowed only for a loopback host)"
        )


def issuer_ssl_context(issuer: IssuerConfig) -> ssl.SSLContext | bool:
    """One context per issuer, made once; ``True`` means aiohttp's system CAs."""
    if not issuer.certificate_authority:
        return True
    try:
        return ssl.create_default_context(cadata=issuer.certificate_authority)
    except (ssl.SSLError, ValueError) as err:
        raise KeySetError(
            f"jwks: certificate authority of issuer {issuer.url} "
            f"cannot be loaded: {err}"
        ) from err


def cache_max_age(cache_control: str) -> float | None:
    """``max-age`` seconds, or None for no-cache, no-store, absent or invalid."""
    max_age: float | None = None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            return None
        if name == "max-age":
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                return None
            if seconds < 0:
                return None
            max_age = float(seconds)
    return max_age


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one fetch brought: usable keys, those skipped and why, the lifetime."""

    keys: tuple[VerificationKey, ...]
    skipped: tuple[str, ...]
    lifetime: float
    introspection_endpoint: str | None = None


class IssuerFetcher:
    """One issuer's discovery and key set fetches, over the app's session.

    ``last_status`` is the HTTP status of the last answer the latest fetch
    got (``None`` before any), for the failure's log line.
    """

    def __init__(
        self,
        issuer: IssuerConfig,
        settings: KeySetSettings,
        *,
        session: aiohttp.ClientSession,
    ) -> None:
        self._settings = settings
        self._session = session
        self.url = issuer.url
        self._discovery_url = (
            issuer.discovery_url or issuer.url.removesuffix("/") + DISCOVERY_PATH
        )
        self._ssl = issuer_ssl_context(issuer)
        self.last_status: int | None = None

    async def fetch(self) -> Fetched:
        """Discovery, then the key set it names: the keys and their lifetime."""
        self.last_status = None
        url = self.url
        check_url(url, "issuer url", DiscoveryError)
        where = self._discovery_url
        check_url(where, "discovery url", DiscoveryError)
        doc, _ = await self._get_json(where, "discovery document", DiscoveryError)
        if not isinstance(doc, dict):
            raise DiscoveryError(
                f"jwks: discovery document at {where} is not a JSON object"
            )
        got = doc.get("issuer")
        if not isinstance(got, str):
            raise DiscoveryError(
                f'jwks: discovery document at {where} has no "issuer" string, '
                f'expected "{url}"'
            )
        if got != url:
            hint = (
                ", they differ only by a trailing slash"
                if got.rstrip("/") == url.rstrip("/")
                else ""
            )
            raise DiscoveryError(
                f'jwks: discovery document at {where} names issuer "{got[:512]}", '
                f'expected "{url}" (the iss of tokens must equal '
                f"--oidc-issuer-url / issuer.url exactly{hint})"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise DiscoveryError(
                f'jwks: discovery document at {where} has no "jwks_uri" string'
            )
        check_url(jwks_uri, "jwks_uri from discovery", DiscoveryError)
        document, cache_control = await self._get_json(jwks_uri, "key set", KeySetError)
        keys, skipped = parse_jwks(document, issuer=url)
        introspection = doc.get("introspection_endpoint")
        return Fetched(
            keys=keys,
            skipped=skipped,
            lifetime=self._cache_lifetime(cache_control),
            introspection_endpoint=introspection
            if isinstance(introspection, str) and introspection
            else None,
        )

    async def _get_json(
        self, url: str, what: str, error: type[KeySetError]
    ) -> tuple[object, str]:
        """The decoded JSON body and the ``Cache-Control`` value of one GET."""
        limit = self._settings.max_document_bytes
        timeout = self._settings.fetch_timeout
        try:
            async with (
                asyncio.timeout(timeout),
                self._session.get(
                    url,
                    ssl=self._ssl,
                    headers={"Accept": "application/json"},
                    # A redirect could lead off https or off the issuer's host
                    # before we could check it; issuers publish direct URLs.
                    allow_redirects=False,
                ) as resp,
            ):
                self.last_status = resp.status
                if 300 <= resp.status < 400:
                    raise error(
                        f"jwks: {what} at {url} answered a redirect (http "
                        f"{resp.status}) to {resp.headers.get('Location', '?')[:200]}; "
                        "redirects are not followed: configure the final URL"
                    )
                if resp.status != 200:
                    raise error(
                        f"jwks: {what} at {url} answered http {resp.status}, "
                        "expected 200"
                    )
                length = resp.content_length
                if length is not None and length > limit:
                    raise error(
                        f"jwks: {what} at {url} is {length} bytes, "
                        f"over the limit of {limit}"
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > limit:
                        raise error(
                            f"jwks: {what} at {url} is over the limit of {limit} bytes"
                        )
                content_type = resp.content_type
                cache_control = ",".join(resp.headers.getall("Cache-Control", ()))
        except TimeoutError as err:
            raise error(
                f"jwks: {what} fetch from {url} timed out after {timeout:g}s"
            ) from err
        except aiohttp.ClientError as err:
            raise error(f"jwks: {what} fetch from {url} failed: {err}") from err
        try:
            return json.loads(body), cache_control
        except (ValueError, RecursionError) as err:
            raise error(
                f"jwks: {what} at {url} is not valid JSON "
                f"(content type {content_type}): {err}"
            ) from err

    def _cache_lifetime(self, cache_control: str) -> float:
        """``max-age`` clamped to the settings' bounds, else the default."""
        s = self._settings
        max_age = cache_max_age(cache_control)
        if max_age is None:
            return s.default_refresh_interval
        return min(max(max_age, s.min_refresh_interval), s.max_refresh_interval)
