"""Distributed claims (OpenID Connect Core §5.6.2), resolved as kube-apiserver does.

A token may say that a claim lives elsewhere::

    "_claim_names":   {"groups": "src1"},
    "_claim_sources": {"src1": {"endpoint": "https://idp/groups",
                                "access_token": "..."}}

What kube-apiserver does, and so do we (``oidc.go``'s ``claimResolver`` and
go-oidc's ``Verify``):

- every token: ``_claim_names`` must be an object of strings and
  ``_claim_sources`` an object of objects; a name that points at no source
  (or at ``""``) is refused (go-oidc: "source does not exist");
- only the claim of a *claim* groups mapping (``--oidc-groups-claim``,
  ``claimMappings.groups.claim``) is resolved, never a CEL mapping's input;
- only when the token lacks that claim (a normal claim wins);
- ``_claim_names`` without ``_claim_sources`` is refused; a source without
  ``endpoint`` (an aggregated ``JWT``) is ignored, as Kubernetes ignores it;
- the endpoint is fetched with ``GET``, with ``Authorization: Bearer
  <access_token>`` from the source when it has one (never the presented
  token), and must answer 2xx with a compact JWS;
- that JWS is verified like an ID token of the same authenticator
  (signature, ``iss``, ``aud``, ``exp``, ``nbf``) and must hold the claim,
  whose value then stands in the token's claims (CEL rules see it).

Where we are stricter, on purpose (docs/configuration.md, docs/THREAT_MODEL.md):

- **egress**: the endpoint must be ``https`` on the issuer URL's own origin
  (scheme, host and port), with no user info; anything else is refused
  before any connection. Kubernetes fetches any URL a signed token names.
- **issuer**: the answer must be signed by the same issuer; Kubernetes
  would run discovery for whatever ``iss`` the answer claims.
- **bounds**: the fetch has a timeout and a size limit (the token size
  limit), follows no redirect, and a verified value is cached until the
  answer's ``exp`` (at most ``CACHE_SECONDS``), keyed by a hash of the
  endpoint and access token (neither is kept).

Pure apart from the injected ``ClaimSourceFetcher`` (``proxy.keyset``'s
``ClaimSourceClient`` over the app's one ``ClientSession``): no aiohttp here.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from proxy.config import IssuerConfig, JWTAuthenticatorConfig
from proxy.errors import ClaimSourceError, InvalidClaim, TokenError
from proxy.tokens import KeyResolver, peek, verify

__all__ = [
    "CACHE_ENTRIES",
    "CACHE_SECONDS",
    "ClaimSource",
    "ClaimSourceFetcher",
    "DistributedClaims",
    "claim_sources",
    "endpoint_problem",
]

#: Longest a resolved value is reused (never past the answer's ``exp``).
CACHE_SECONDS: Final = 300.0
#: Most resolved values remembered; the oldest goes first.
CACHE_ENTRIES: Final = 1024

_NAMES: Final = "_claim_names"
_SOURCES: Final = "_claim_sources"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimSource:
    """One ``_claim_sources`` entry; ``endpoint`` is ``""`` for an aggregated one."""

    name: str
    endpoint: str = ""
    access_token: str = ""

    def __repr__(self) -> str:
        return f"ClaimSource(name={self.name!r}, endpoint={self.endpoint!r})"


class ClaimSourceFetcher(Protocol):
    """Where a distributed claim's JWS comes from (I/O lives behind this)."""

    async def fetch(
        self, endpoint: str, access_token: str, *, issuer: IssuerConfig, max_bytes: int
    ) -> bytes:
        """The body of a 2xx answer to ``GET endpoint``; raise ``ClaimSourceError``."""
        ...


def _invalid(detail: str, issuer: str) -> InvalidClaim:
    return InvalidClaim(f"claims: {detail}", claim=_NAMES, issuer=issuer)


def claim_sources(claims: Mapping[str, Any], issuer: str) -> dict[str, ClaimSource]:
    """The token's claim → source map, checked as go-oidc checks every token."""
    names = claims.get(_NAMES)
    sources = claims.get(_SOURCES)
    if names is not None and not (
        isinstance(names, dict) and all(isinstance(v, str) for v in names.values())
    ):
        raise _invalid(f'"{_NAMES}" must be an object of strings', issuer)
    parsed: dict[str, ClaimSource] = {}
    if sources is not None:
        if not isinstance(sources, dict):
            raise _invalid(f'"{_SOURCES}" must be an object', issuer)
        for key, entry in sources.items():
            if not isinstance(entry, dict):
                raise _invalid(
                    f'"{_SOURCES}" entry "{key[:64]}" is not an object', issuer
                )
            fields = {f: entry.get(f, "") for f in ("endpoint", "access_token", "JWT")}
            if not all(isinstance(v, str) for v in fields.values()):
                raise _invalid(
                    f'"{_SOURCES}" entry "{key[:64]}": "endpoint", "access_token" '
                    'and "JWT" must be strings',
                    issuer,
                )
            parsed[key] = ClaimSource(
                name=key,
                endpoint=fields["endpoint"],
                access_token=fields["access_token"],
            )
    out: dict[str, ClaimSource] = {}
    for claim, source in (names or {}).items():
        if not source:
            raise _invalid(f'"{_NAMES}" names no source for "{claim[:64]}"', issuer)
        if source not in parsed:
            raise _invalid(
                f'"{_NAMES}" sends "{claim[:64]}" to source "{source[:64]}", '
                f'which "{_SOURCES}" does not have (source does not exist)',
                issuer,
            )
        out[claim] = parsed[source]
    return out


def endpoint_problem(endpoint: str, issuer_url: str) -> str | None:
    """Why we will not call ``endpoint`` for this issuer (None: we will)."""
    try:
        got = urllib.parse.urlsplit(endpoint)
        want = urllib.parse.urlsplit(issuer_url)
        got_port = got.port or 443
        want_port = want.port or 443
    except ValueError:
        return "it is not a valid URL"
    if got.scheme != "https" or not got.hostname:
        return "only absolute https URLs are called"
    if got.username is not None or got.password is not None:
        return "a URL with user info is never called"
    if want.scheme != "https" or (got.hostname, got_port) != (
        want.hostname,
        want_port,
    ):
        return (
            f"only the issuer's own origin (https://{want.hostname}:{want_port}) "
            "is called"
        )
    return None


class DistributedClaims:
    """Resolve the groups claim of tokens that distribute it (see module docs)."""

    def __init__(
        self,
        fetcher: ClaimSourceFetcher | None,
        *,
        clock: Callable[[], float],
        max_bytes: int,
    ) -> None:
        self._fetcher = fetcher
        self._clock = clock
        self._max_bytes = max_bytes
        self._cache: OrderedDict[bytes, tuple[object, float]] = OrderedDict()

    async def expand(
        self,
        auth: JWTAuthenticatorConfig,
        claims: Mapping[str, Any],
        keys: KeyResolver,
        *,
        leeway: float,
    ) -> Mapping[str, Any]:
        """``claims`` with the distributed groups claim filled in, if there is one."""
        issuer = auth.issuer.url
        sources = claim_sources(claims, issuer)
        groups = auth.claim_mappings.groups
        claim = groups.claim if groups is not None else None
        if not claim or claim in claims or _NAMES not in claims:
            return claims
        if _SOURCES not in claims:
            raise _invalid(
                f'"{_NAMES}" without "{_SOURCES}" (no claim sources)', issuer
            )
        source = sources.get(claim)
        if source is None or not source.endpoint:
            return claims
        value = await self._resolve(auth.issuer, claim, source, keys, leeway)
        return {**claims, claim: value}

    async def _resolve(
        self,
        issuer: IssuerConfig,
        claim: str,
        source: ClaimSource,
        keys: KeyResolver,
        leeway: float,
    ) -> object:
        where = f'claims: distributed claim "{claim[:64]}" from {source.endpoint[:256]}'
        problem = endpoint_problem(source.endpoint, issuer.url)
        if problem is not None:
            raise ClaimSourceError(
                f"{where}: refused by the egress policy: {problem}", issuer=issuer.url
            )
        memo = hashlib.sha256(
            "\0".join(
                (issuer.url, claim, source.endpoint, source.access_token)
            ).encode()
        ).digest()
        now = self._clock()
        hit = self._cache.get(memo)
        if hit is not None and hit[1] > now:
            return hit[0]
        if self._fetcher is None:
            raise ClaimSourceError(
                f"{where}: distributed claims are not fetched here (offline)",
                issuer=issuer.url,
            )
        body = await self._fetcher.fetch(
            source.endpoint,
            source.access_token,
            issuer=issuer,
            max_bytes=self._max_bytes,
        )
        try:
            parsed = peek(body.strip(), max_bytes=self._max_bytes)
            if parsed.unverified_issuer != issuer.url:
                raise ClaimSourceError(
                    f"{where}: the answer is not a JWT of issuer {issuer.url} "
                    "(answers of other issuers are never verified)",
                    issuer=issuer.url,
                )
            verified = await verify(parsed, issuer, keys, now=now, leeway=leeway)
            claim_sources(verified, issuer.url)
        except ClaimSourceError:
            raise
        except TokenError as err:
            raise ClaimSourceError(
                f"{where}: the answer does not verify: {err}", issuer=issuer.url
            ) from err
        if claim not in verified:
            raise ClaimSourceError(
                f"{where}: the verified answer does not contain the claim",
                issuer=issuer.url,
            )
        value = verified[claim]
        until = min(now + CACHE_SECONDS, float(verified["exp"]))
        self._cache[memo] = (value, until)
        self._cache.move_to_end(memo)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return value
