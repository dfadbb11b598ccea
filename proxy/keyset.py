"""Issuer keys: discovery, JWKS fetch, cache, and the unknown-``kid`` refetch.

One ``IssuerKeySet`` per issuer keeps that issuer's verification keys fresh in
the background and answers the verifier's ``KeyResolver`` questions (defined in
``proxy.tokens``; satisfied here structurally, so this module does not import
the verifier):

- ``lookup(kid)`` is synchronous and O(1): a dict built once per fetch.
- ``refresh_unknown(kid)`` runs when a token names a ``kid`` we do not hold,
  which is how a key rotation shows up. The ``kid`` is chosen by whoever sent
  the token, so the refetch is rate-limited: at most one per
  ``unknown_kid_cooldown`` per issuer, concurrent callers share one fetch, and
  a ``kid`` the issuer did not publish is remembered for ``unknown_kid_ttl``.
  A flood of random ``kid`` values therefore costs the issuer one fetch, not
  one per request (PyJWT's client and go-oidc v3 have no such limit).

Fetching (every cycle re-reads discovery, so a changed ``jwks_uri`` is
followed): ``GET <issuer>/.well-known/openid-configuration`` (or
``discovery_url``), whose ``issuer`` must equal the configured URL exactly,
then ``GET jwks_uri``. Only https, except to a loopback host; every request has
a timeout and a size limit. The JWKS response's ``Cache-Control: max-age``
(clamped) sets the cache lifetime, as Okta advises; the background task
refreshes at 80-90 % of it.

Availability over freshness: a failed fetch never drops the last good keys (an
IdP outage must not log everyone out); it is recorded in ``last_error`` and
retried with exponential backoff and jitter. ``ready`` means "keys were loaded
at least once" and is what ``/readyz`` reports. Start-up never fails because an
issuer is unreachable: the service runs, reports not-ready, and keeps trying.

The discovery document's ``introspection_endpoint`` (RFC 8414) is kept from
each fetch for ``IntrospectionHttpClient``, the third egress to an issuer: the
RFC 7662 ``POST`` that ``proxy.introspection`` decides to make, with
``client_secret_basic``, the issuer's CA bundle, a size limit and no redirects.

``ClaimSourceClient`` is the other egress to an issuer: the ``GET`` of a
distributed claim's endpoint (``proxy.distclaims`` decides whether to call it
and verifies the answer), on the same session, with the issuer's CA bundle, a
timeout, a size limit and no redirects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp

from proxy.config import (
    IntrospectionClient,
    IssuerConfig,
    KeySetSettings,
    is_loopback_host,
    url_problems,
)
from proxy.errors import (
    ClaimSourceUnavailable,
    DiscoveryError,
    IntrospectionUnavailable,
    KeySetError,
    KeysUnavailable,
    TokenError,
)
from proxy.jwk import VerificationKey, parse_jwks
from proxy.log import issuer_hash
from proxy.metrics import Metrics

__all__ = [
    "CLAIM_SOURCE_TIMEOUT",
    "ClaimSourceClient",
    "IntrospectionHttpClient",
    "IssuerKeySet",
    "KeySets",
    "StaticKeySet",
]

#: Whole-request timeout of one distributed-claim fetch: a token review waits
#: for it, and kube-apiserver's webhook client gives up after 10 s.
CLAIM_SOURCE_TIMEOUT: Final = 5.0

logger = logging.getLogger(__name__)

_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
#: The background refresh runs at this fraction of the cache lifetime (jittered,
#: so replicas do not fetch in step).
_REFRESH_FRACTION: Final = (0.8, 0.9)
#: Bound on remembered unknown kids; beyond it the oldest are forgotten (which
#: only costs a fetch, still under the cooldown).
_UNKNOWN_KID_MAX: Final = 10_000
_CHUNK_BYTES: Final = 64 * 1024
#: Floor of any background delay, so a zero interval in settings cannot spin.
_MIN_DELAY: Final = 0.01
_RANDOM: Final = random.SystemRandom()


@dataclass(frozen=True, slots=True)
class _KeyIndex:
    """Keys and their by-``kid`` index, swapped as one value after a fetch."""

    keys: tuple[VerificationKey, ...]
    by_kid: Mapping[str | None, tuple[VerificationKey, ...]]

    @classmethod
    def build(cls, keys: Iterable[VerificationKey]) -> _KeyIndex:
        all_keys = tuple(keys)
        groups: dict[str | None, list[VerificationKey]] = {}
        for key in all_keys:
            groups.setdefault(key.kid, []).append(key)
        return cls(all_keys, {kid: tuple(group) for kid, group in groups.items()})

    def lookup(self, kid: str | None) -> tuple[VerificationKey, ...]:
        if kid is None:
            return self.keys
        return self.by_kid.get(kid, ())


def _check_url(url: str, what: str, error: type[KeySetError]) -> None:
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


def _ssl_context(issuer: IssuerConfig) -> ssl.SSLContext | bool:
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


def _max_age(cache_control: str) -> float | None:
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


def _kid_key(kid: str | None) -> bytes:
    """Fixed-size memo key: a remembered kid costs 16 bytes, whatever its length."""
    if kid is None:
        return b""
    return hashlib.blake2b(kid.encode(errors="replace"), digest_size=16).digest()


def _clip(text: str | None, limit: int = 64) -> str | None:
    return None if text is None else text[:limit]


@dataclass(frozen=True, slots=True)
class _Fetched:
    keys: tuple[VerificationKey, ...]
    skipped: tuple[str, ...]
    lifetime: float
    introspection_endpoint: str | None = None


class IssuerKeySet:
    """The verification keys of one issuer, kept fresh in the background.

    Satisfies ``proxy.tokens.KeyResolver``. All state lives on one event loop;
    ``clock`` (monotonic) drives cooldowns and lifetimes, ``wall_clock`` only
    the reported ``last_success``, so tests can inject both.
    """

    def __init__(
        self,
        issuer: IssuerConfig,
        settings: KeySetSettings,
        *,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer = issuer
        self._settings = settings
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._label = issuer_hash(issuer.url)
        self._discovery_url = (
            issuer.discovery_url or issuer.url.removesuffix("/") + _DISCOVERY_PATH
        )
        self._ssl = _ssl_context(issuer)
        self._index = _KeyIndex.build(())
        #: The discovery document's ``introspection_endpoint`` (last fetch).
        self.introspection_endpoint: str | None = None
        self._loaded = False
        self._closed = False
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._last_status: int | None = None
        self._expires_at: float | None = None
        self._lifetime = settings.default_refresh_interval
        self._failures = 0
        self._fetch_count = 0
        self._skipped: tuple[str, ...] = ()
        self._last_forced: float | None = None
        self._unknown: dict[bytes, float] = {}
        self._inflight: asyncio.Task[KeySetError | None] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Set by every successful fetch, so the refresher re-plans from the
        #: newest lifetime (an unknown-kid refetch may bring a short max-age).
        self._fetched = asyncio.Event()
        #: Called with the issuer URL when a fetch withdraws keys we held, so
        #: results verified with a withdrawn key can be forgotten at once.
        self.on_keys_withdrawn: Callable[[str], None] | None = None
        if metrics is not None:
            metrics.issuer_ready.labels(issuer_hash=self._label).set(0)
            metrics.jwks_keys.labels(issuer_hash=self._label).set(0)

    # -- state ---------------------------------------------------------------

    @property
    def issuer(self) -> IssuerConfig:
        """The issuer settings this key set fetches with (compared on reload)."""
        return self._issuer

    @property
    def url(self) -> str:
        """The configured issuer URL (what tokens' ``iss`` must equal)."""
        return self._issuer.url

    @property
    def ready(self) -> bool:
        """Keys were loaded at least once (they stay usable through outages)."""
        return self._loaded

    @property
    def last_error(self) -> str | None:
        """The message of the latest failed fetch; None after a success."""
        return self._last_error

    @property
    def last_success(self) -> float | None:
        """Wall time (``wall_clock``) of the latest successful fetch."""
        return self._last_success

    @property
    def expires_at(self) -> float | None:
        """``clock`` time at which the cached key set's lifetime ends."""
        return self._expires_at

    @property
    def key_count(self) -> int:
        """Usable keys held now."""
        return len(self._index.keys)

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """Every usable key held now (for tools and ``check-token``)."""
        return self._index.keys

    @property
    def fetch_count(self) -> int:
        """Fetch cycles (discovery + JWKS) started, successful or not."""
        return self._fetch_count

    # -- KeyResolver ----------------------------------------------------------

    def lookup(self, kid: str | None) -> Sequence[VerificationKey]:
        """Keys whose ``kid`` equals ``kid`` (all keys for None); no I/O."""
        return self._index.lookup(kid)

    async def refresh_unknown(self, kid: str | None) -> Sequence[VerificationKey]:
        """Refetch for a ``kid`` we do not hold, rate-limited; then ``lookup``.

        Raises ``KeysUnavailable`` when the keys have never been loaded, so the
        token is answered "try again" rather than "invalid".
        """
        found = self._index.lookup(kid)
        if found:
            return found
        now = self._clock()
        memo = _kid_key(kid)
        if self._loaded:
            until = self._unknown.get(memo)
            if until is not None:
                if until > now:
                    return ()
                del self._unknown[memo]
        fetched = await self._fetch_for_unknown(kid, now)
        if not self._loaded:
            raise KeysUnavailable(
                f"jwks: keys for issuer {self.url} are not loaded yet: "
                f"{self._last_error or 'no fetch has completed'}",
                issuer=self.url,
            )
        found = self._index.lookup(kid)
        # Only a fetch that completed without the kid proves it unknown; a kid
        # turned away by the cooldown alone may be a genuinely new key.
        if not found and fetched:
            self._remember_unknown(memo, self._clock())
        if not found and self._last_error is not None:
            # The issuer is failing, so we cannot tell a new key from a bogus
            # one: answer "try again" (the API server retries and does not
            # cache it) rather than a refusal it would cache for minutes.
            raise KeysUnavailable(
                f"jwks: no key with kid {_clip(kid)!r} among the cached keys of issuer "
                f"{self.url}, and refreshing them fails: {self._last_error}",
                issuer=self.url,
            )
        return found

    async def _fetch_for_unknown(self, kid: str | None, now: float) -> bool:
        """Join the fetch in flight, or start one if the cooldown allows.

        True when a fetch ran for this caller and succeeded.
        """
        if self._closed:
            return False
        if self._inflight is None:
            last = self._last_forced
            if last is not None and now - last < self._settings.unknown_kid_cooldown:
                return False
            self._last_forced = now
            logger.info(
                "jwks refetch for unknown kid",
                extra={"issuer": self.url, "kid": _clip(kid)},
            )
        return await self._join() is None

    def _remember_unknown(self, memo: bytes, now: float) -> None:
        if len(self._unknown) >= _UNKNOWN_KID_MAX:
            self._unknown = {k: t for k, t in self._unknown.items() if t > now}
            if len(self._unknown) >= _UNKNOWN_KID_MAX:
                # Same TTL for all, so insertion order is expiry order.
                for old in list(self._unknown)[: _UNKNOWN_KID_MAX // 2]:
                    del self._unknown[old]
        self._unknown[memo] = now + self._settings.unknown_kid_ttl

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the background refresher; the first fetch begins at once.

        Never raises and never waits for the issuer: an unreachable issuer
        leaves the key set not ready while the refresher keeps retrying.
        """
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"jwks-refresh {self.url}"
            )

    async def close(self) -> None:
        """Cancel the refresher and any fetch in flight, and wait for them."""
        self._closed = True
        tasks = [t for t in (self._task, self._inflight) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh(self, force: bool = False) -> None:
        """Fetch now (shared with any fetch in flight); raise ``KeySetError``.

        Without ``force`` nothing happens while loaded keys are within their
        lifetime. For tests and tools; the service relies on the refresher.
        """
        if (
            not force
            and self._loaded
            and self._expires_at is not None
            and self._clock() < self._expires_at
        ):
            return
        error = await self._join()
        if error is not None:
            raise error

    async def _run(self) -> None:
        error = await self._join()
        while True:
            delay = self._next_delay(ok=error is None)
            self._fetched.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._fetched.wait()
            except TimeoutError:
                error = await self._join()
            else:
                # Another caller's fetch succeeded meanwhile: plan from its lifetime.
                error = None

    def _next_delay(self, *, ok: bool) -> float:
        if ok:
            delay = self._lifetime * _RANDOM.uniform(*_REFRESH_FRACTION)
        else:
            s = self._settings
            step = min(s.retry_max, s.retry_min * 2 ** min(self._failures - 1, 32))
            delay = _RANDOM.uniform(step / 2, step)
        return max(delay, _MIN_DELAY)

    # -- fetching ----------------------------------------------------------------

    async def _join(self) -> KeySetError | None:
        """Single flight: start a fetch cycle or wait for the one in flight.

        The cycle runs as its own task behind ``shield``, so a caller that is
        cancelled (its client went away) does not cancel the others' fetch.
        """
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._cycle(), name=f"jwks-fetch {self.url}"
            )
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[KeySetError | None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _cycle(self) -> KeySetError | None:
        self._fetch_count += 1
        self._last_status = None
        try:
            fetched = await self._fetch()
        except KeySetError as err:
            self._record_failure(err)
            return err
        except Exception as err:  # the refresher must survive a bug here
            logger.exception("jwks refresh crashed", extra={"issuer": self.url})
            wrapped = KeySetError(
                f"jwks: unexpected error refreshing keys of issuer {self.url}: "
                f"{type(err).__name__}: {err}"
            )
            self._record_failure(wrapped)
            return wrapped
        self._record_success(fetched)
        return None

    async def _fetch(self) -> _Fetched:
        url = self.url
        _check_url(url, "issuer url", DiscoveryError)
        where = self._discovery_url
        _check_url(where, "discovery url", DiscoveryError)
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
        _check_url(jwks_uri, "jwks_uri from discovery", DiscoveryError)
        document, cache_control = await self._get_json(jwks_uri, "key set", KeySetError)
        keys, skipped = parse_jwks(document, issuer=url)
        introspection = doc.get("introspection_endpoint")
        return _Fetched(
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
                self._last_status = resp.status
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
                async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
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
        s = self._settings
        max_age = _max_age(cache_control)
        if max_age is None:
            return s.default_refresh_interval
        return min(max(max_age, s.min_refresh_interval), s.max_refresh_interval)

    # -- bookkeeping ---------------------------------------------------------------

    def _record_success(self, fetched: _Fetched) -> None:
        before = {k.thumbprint for k in self._index.keys}
        withdrawn = before - {k.thumbprint for k in fetched.keys}
        self._index = _KeyIndex.build(fetched.keys)
        self.introspection_endpoint = fetched.introspection_endpoint
        self._loaded = True
        self._last_error = None
        self._failures = 0
        self._lifetime = fetched.lifetime
        self._expires_at = self._clock() + fetched.lifetime
        self._last_success = self._wall_clock()
        if fetched.skipped != self._skipped:
            for reason in fetched.skipped:
                logger.warning(
                    "jwks key skipped", extra={"issuer": self.url, "reason": reason}
                )
            self._skipped = fetched.skipped
        changed = before != {k.thumbprint for k in fetched.keys}
        (logger.info if changed else logger.debug)(
            "jwks keys loaded",
            extra={
                "issuer": self.url,
                "keys": len(fetched.keys),
                "kids": [_clip(k.kid) for k in fetched.keys],
                "lifetime": fetched.lifetime,
            },
        )
        if self._metrics is not None:
            m, label = self._metrics, self._label
            m.jwks_fetches.labels(issuer_hash=label, result="ok").inc()
            m.jwks_last_success.labels(issuer_hash=label).set(self._last_success)
            m.jwks_keys.labels(issuer_hash=label).set(len(fetched.keys))
            m.issuer_ready.labels(issuer_hash=label).set(1)
        self._fetched.set()
        if withdrawn and self.on_keys_withdrawn is not None:
            logger.info(
                "jwks keys withdrawn",
                extra={"issuer": self.url, "keys": len(withdrawn)},
            )
            self.on_keys_withdrawn(self.url)

    def _record_failure(self, err: KeySetError) -> None:
        self._last_error = str(err)
        self._failures += 1
        logger.warning(
            "jwks refresh failed",
            extra={
                "issuer": self.url,
                "status": self._last_status,
                "error": str(err),
                "keys_kept": len(self._index.keys),
                "failures": self._failures,
            },
        )
        if self._metrics is not None:
            self._metrics.jwks_fetches.labels(
                issuer_hash=self._label, result="error"
            ).inc()


class KeySets:
    """One ``IssuerKeySet`` per configured issuer URL, started and closed together.

    Issuer URLs are unique by configuration; a repeated URL shares the first
    entry's key set (its keys are the same document).
    """

    def __init__(
        self,
        issuers: Iterable[IssuerConfig],
        settings: KeySetSettings,
        *,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings, self._session, self._metrics = settings, session, metrics
        self._clock, self._wall_clock = clock, wall_clock
        self._sets: dict[str, IssuerKeySet] = self._build(issuers, {})

    def _build(
        self, issuers: Iterable[IssuerConfig], keep: Mapping[str, IssuerKeySet]
    ) -> dict[str, IssuerKeySet]:
        sets: dict[str, IssuerKeySet] = {}
        for issuer in issuers:
            if issuer.url in sets:
                continue
            same = keep.get(issuer.url)
            if same is not None and same.issuer == issuer:
                sets[issuer.url] = same
                continue
            sets[issuer.url] = IssuerKeySet(
                issuer,
                self._settings,
                session=self._session,
                metrics=self._metrics,
                clock=self._clock,
                wall_clock=self._wall_clock,
            )
        return sets

    async def stage(
        self, issuers: Iterable[IssuerConfig], *, wait: float
    ) -> dict[str, IssuerKeySet]:
        """Key sets for a new configuration (live reload), not yet in use.

        Unchanged issuers keep their key set (and its keys); a new issuer, or
        one whose settings changed (a CA, a discovery URL), gets a new one,
        started and given ``wait`` seconds to load its keys, so the swap does
        not turn its first requests into "keys not loaded".
        """
        sets = self._build(issuers, self._sets)
        fresh = [ks for url, ks in sets.items() if ks is not self._sets.get(url)]
        for key_set in fresh:
            await key_set.start()
        if fresh:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(
                        *(ks.refresh() for ks in fresh), return_exceptions=True
                    )
        return sets

    def swap(self, sets: dict[str, IssuerKeySet]) -> list[IssuerKeySet]:
        """Use ``sets`` from now on; return the retired key sets, for closing."""
        kept = {id(ks) for ks in sets.values()}
        retired = [ks for ks in self._sets.values() if id(ks) not in kept]
        self._sets = sets
        return retired

    def get(self, url: str) -> IssuerKeySet:
        """The key set of issuer ``url``; ``KeyError`` if it is not configured."""
        return self._sets[url]

    async def start(self) -> None:
        """Start every issuer's refresher (returns at once, never raises)."""
        for key_set in self._sets.values():
            await key_set.start()

    async def close(self) -> None:
        """Stop every refresher and wait for them."""
        await asyncio.gather(*(key_set.close() for key_set in self._sets.values()))

    def not_ready(self) -> list[str]:
        """Issuer URLs whose keys have never been loaded (for ``/readyz``)."""
        return [url for url, key_set in self._sets.items() if not key_set.ready]

    def __iter__(self) -> Iterator[IssuerKeySet]:
        return iter(self._sets.values())

    def __len__(self) -> int:
        return len(self._sets)


class StaticKeySet:
    """Fixed keys behind the same seam (``check-token --offline --jwks-file``).

    Always ready; ``refresh_unknown`` never fetches, because there is nothing
    to fetch from.
    """

    def __init__(self, keys: Iterable[VerificationKey], *, url: str = "") -> None:
        self._index = _KeyIndex.build(keys)
        self._url = url

    @property
    def url(self) -> str:
        """The issuer these keys stand for (may be empty)."""
        return self._url

    @property
    def ready(self) -> bool:
        """Always true: the keys were given."""
        return True

    @property
    def key_count(self) -> int:
        """Number of keys held."""
        return len(self._index.keys)

    def lookup(self, kid: str | None) -> Sequence[VerificationKey]:
        """Keys whose ``kid`` equals ``kid`` (all keys for None)."""
        return self._index.lookup(kid)

    async def refresh_unknown(self, kid: str | None) -> Sequence[VerificationKey]:
        """Same as ``lookup``: a static set cannot learn new keys."""
        return self._index.lookup(kid)


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
                ctx = _ssl_context(issuer)
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
                async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
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
                async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
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
