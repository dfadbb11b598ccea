"""Token introspection (RFC 7662): is a verified token still active at its issuer?

A signed token stays valid until its ``exp``; kube-apiserver can do nothing
about a user disabled in between (kubernetes/kubernetes#71151 answered "use
the webhook authenticator"). For the issuers that have an introspection
client configured (``--oidc-introspection-*`` or ``--introspection-config``),
the gate asks the issuer's ``introspection_endpoint`` (from its discovery
document) with ``token_type_hint=id_token``; ``active: false`` refuses the
token as ``revoked`` (``TokenRevoked``).

Where it sits (``proxy.authn``): last, after the signature, the claims, the
claim mapping and its rules: the IdP is never asked about a token we would
refuse anyway, so junk tokens cannot be turned into load on the IdP.

Cost and freshness:

- an answer is reused per token (keyed hash, never the token) for
  ``cache_ttl`` (default 30 s) and never beyond the token's ``exp``; that is
  the longest a revoked token is still accepted by one replica;
- the result cache of ``proxy.authn`` keeps an acceptance no longer than the
  answer it rests on is fresh (``IntrospectionResult.fresh_for``), so the
  bound holds for cached verdicts too (decided over re-checking every hit:
  a hit stays a dictionary look-up, and a token's verdict is re-validated,
  signature and all, at most once per ``cache_ttl``);
- concurrent reviews of one token share one call (single flight); at most
  ``concurrency`` calls run at once; each has ``timeout``.

Failure policy (the IdP is down, slow, or answers nonsense):

- ``deny`` (default): refused with ``IntrospectionUnavailable``
  (``introspection_unavailable``, temporary: the webhook answers 503 and the
  API server retries);
- ``allow-cached``: the token's last ``active`` answer is used while it is at
  most ``max_staleness`` old (and the token's ``exp`` has not passed); the
  acceptance is then not kept in the result cache, so every request asks
  again and the first answer after the outage decides.

Pure apart from the injected ``IntrospectionFetcher``
(``proxy.keyset.IntrospectionHttpClient`` over the app's one session).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.config import IntrospectionClient, IntrospectionConfig
from proxy.errors import IntrospectionUnavailable, TokenRevoked
from proxy.metrics import Metrics

__all__ = ["Introspection", "IntrospectionFetcher", "IntrospectionResult"]


class IntrospectionFetcher(Protocol):
    """Where answers come from (the HTTP call lives behind this)."""

    async def introspect(
        self, client: IntrospectionClient, token: str, *, hint: str
    ) -> tuple[bool, float | None]:
        """``(active, exp or None)`` from the issuer's endpoint; raise
        ``IntrospectionUnavailable``.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class IntrospectionResult:
    """The answer a verdict rests on, for ``check-token`` and the result cache."""

    active: bool
    #: Answered from the per-token cache (no call made for this request).
    cached: bool
    #: Used under ``allow-cached`` because the endpoint gave no answer.
    stale: bool = False
    #: Seconds since the endpoint answered.
    age: float = 0.0
    #: Seconds the answer may still be reused; 0 when stale.
    fresh_for: float = 0.0


@dataclass(slots=True)
class _Entry:
    active: bool
    answered: float
    #: Wall-clock time after which the answer is void (the token's ``exp``).
    until: float


class Introspection:
    """Ask, cache and decide per token (see the module docs)."""

    def __init__(
        self,
        config: IntrospectionConfig,
        fetcher: IntrospectionFetcher | None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clients = {c.issuer: c for c in config.clients}
        self._fetcher = fetcher
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._secret = os.urandom(32)
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[_Entry]] = {}
        self._slots = asyncio.Semaphore(config.concurrency)

    @property
    def cache_ttl(self) -> float:
        """How long an answer is reused (the revocation delay's bound)."""
        return self._config.cache_ttl

    def applies(self, issuer: str) -> bool:
        """Whether tokens of ``issuer`` are introspected."""
        return issuer in self._clients

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tally(self._metrics.introspection_cache, outcome).count += 1

    def _key(self, token: str) -> bytes:
        return hashlib.blake2b(
            token.encode(), digest_size=16, key=self._secret
        ).digest()

    async def check(
        self, issuer: str, token: str, *, exp: float
    ) -> IntrospectionResult:
        """The answer for a verified ``token``; raise ``TokenRevoked`` or
        ``IntrospectionUnavailable``.
        """
        client = self._clients[issuer]
        key = self._key(token)
        now, wall = self._monotonic(), self._clock()
        ttl = self._config.cache_ttl
        entry = self._cache.get(key)
        if entry is not None and now - entry.answered < ttl and wall < entry.until:
            self._count("hit")
            return self._decide(entry, issuer, cached=True)
        task = self._inflight.get(key)
        if task is None:
            self._count("miss")
            task = asyncio.ensure_future(self._fetch(client, token, key, exp))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            self._count("shared")
        try:
            # Shielded: one caller giving up must not cancel the shared call.
            fresh = await asyncio.shield(task)
        except IntrospectionUnavailable:
            if self._config.failure_policy != "allow-cached" or entry is None:
                raise
            age = self._monotonic() - entry.answered
            if age > self._config.max_staleness or self._clock() >= entry.until:
                raise
            self._count("stale")
            if not entry.active:
                return self._decide(entry, issuer, cached=True)
            return IntrospectionResult(active=True, cached=True, stale=True, age=age)
        return self._decide(fresh, issuer, cached=False)

    def _decide(
        self, entry: _Entry, issuer: str, *, cached: bool
    ) -> IntrospectionResult:
        if not entry.active:
            raise TokenRevoked(
                f"token: the issuer's introspection endpoint says the token is not "
                f"active (revoked{', answer cached' if cached else ''})",
                issuer=issuer,
            )
        age = max(self._monotonic() - entry.answered, 0.0)
        fresh_for = min(self._config.cache_ttl - age, entry.until - self._clock())
        return IntrospectionResult(
            active=True, cached=cached, age=age, fresh_for=max(fresh_for, 0.0)
        )

    async def _fetch(
        self, client: IntrospectionClient, token: str, key: bytes, exp: float
    ) -> _Entry:
        if self._fetcher is None:
            raise IntrospectionUnavailable(
                "introspection: the issuer's introspection endpoint is not asked "
                "here (offline)",
                issuer=client.issuer,
            )
        timeout = self._config.timeout
        started = time.perf_counter()
        result = "error"
        try:
            async with asyncio.timeout(timeout), self._slots:
                active, answered_exp = await self._fetcher.introspect(
                    client, token, hint=self._config.token_type_hint
                )
            result = "active" if active else "inactive"
        except TimeoutError:
            result = "timeout"
            raise IntrospectionUnavailable(
                f"introspection: no answer from {client.issuer}'s introspection "
                f"endpoint within {timeout:g}s (--introspection-timeout)",
                issuer=client.issuer,
            ) from None
        except IntrospectionUnavailable as err:
            err.issuer = client.issuer
            raise
        finally:
            self._observe(result, time.perf_counter() - started)
        until = exp if answered_exp is None else min(exp, answered_exp)
        entry = _Entry(active=active, answered=self._monotonic(), until=until)
        self._remember(key, entry)
        return entry

    def _observe(self, result: str, seconds: float) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.tally(metrics.introspection_requests, result).count += 1
        metrics.histogram_tally(metrics.introspection_duration, result).observe(seconds)

    def _remember(self, key: bytes, entry: _Entry) -> None:
        cache = self._cache
        cache[key] = entry
        cache.move_to_end(key)
        while len(cache) > self._config.cache_entries:
            cache.popitem(last=False)
