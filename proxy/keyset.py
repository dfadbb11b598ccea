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

Fetching is ``proxy.jwksfetch`` (discovery, then ``jwks_uri``; every cycle
re-reads discovery, so a changed ``jwks_uri`` is followed). The JWKS
response's ``Cache-Control: max-age`` (clamped) sets the cache lifetime; the
background task refreshes at 80-90 % of it.

Availability over freshness: a failed fetch never drops the last good keys (an
IdP outage must not log everyone out); it is recorded in ``last_error`` and
retried with exponential backoff and jitter. ``ready`` means "keys were loaded
at least once" and is what ``/readyz`` reports. Start-up never fails because an
issuer is unreachable: the service runs, reports not-ready, and keeps trying.

The discovery document's ``introspection_endpoint`` (RFC 8414) is kept from
each fetch for ``IntrospectionHttpClient``. That client and
``ClaimSourceClient``, the other two egresses to an issuer, live in
``proxy.issuerclients`` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp

from proxy.config import (
    IssuerConfig,
    KeySetSettings,
)
from proxy.errors import (
    KeySetError,
    KeysUnavailable,
)
from proxy.issuerclients import (
    CLAIM_SOURCE_TIMEOUT,
    ClaimSourceClient,
    IntrospectionHttpClient,
)
from proxy.jwk import VerificationKey
from proxy.jwksfetch import Fetched, IssuerFetcher
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


logger = logging.getLogger(__name__)

#: The background refresh runs at this fraction of the cache lifetime (jittered,
#: so replicas do not fetch in step).
_REFRESH_FRACTION: Final = (0.8, 0.9)
#: Bound on remembered unknown kids; beyond it the oldest are forgotten (which
#: only costs a fetch, still under the cooldown).
_UNKNOWN_KID_MAX: Final = 10_000
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


def _kid_key(kid: str | None) -> bytes:
    """Fixed-size memo key: a remembered kid costs 16 bytes, whatever its length."""
    if kid is None:
        return b""
    return hashlib.blake2b(kid.encode(errors="replace"), digest_size=16).digest()


def _clip(text: str | None, limit: int = 64) -> str | None:
    return None if text is None else text[:limit]


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
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._label = issuer_hash(issuer.url)
        self._fetcher = IssuerFetcher(issuer, settings, session=session)
        self._index = _KeyIndex.build(())
        #: The discovery document's ``introspection_endpoint`` (last fetch).
        self.introspection_endpoint: str | None = None
        self._loaded = False
        self._closed = False
        self._last_error: str | None = None
        self._last_success: float | None = None
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
        try:
            fetched = await self._fetcher.fetch()
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

    # -- bookkeeping ---------------------------------------------------------------

    def _record_success(self, fetched: Fetched) -> None:
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
                "status": self._fetcher.last_status,
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
