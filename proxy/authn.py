"""The one façade both front ends use: token → user, "not mine", or a typed error.

Three outcomes and no others (house rule 2):

- a ``UserInfo``: the token is valid for one of the configured issuers;
- ``None``: "not mine": the token's (unverified) ``iss`` names no configured
  issuer, so another authenticator may take it; no error, nothing cached;
- a ``TokenError``: the token claims to be from one of our issuers (or is not a
  JWT at all) and fails; its ``reason`` is counted and logged.

Routing by the unverified ``iss`` is safe because it only chooses which issuer's
keys and rules to apply: a forged ``iss`` just selects keys that will not verify
the signature, and the verified ``iss`` is compared again after the signature.

The result cache sits in front of everything. Metrics are recorded here so both
front ends count the same way: ``authentications{result,reason}`` per call and
the validation latency only for cache misses (a hit says nothing about cost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.admission import Admission
from proxy.cache import ResultCache, detached
from proxy.claims import map_claims
from proxy.config import AuthConfig, JWTAuthenticatorConfig
from proxy.errors import MalformedToken, Overloaded, TokenError
from proxy.kube import UserInfo
from proxy.log import fingerprint
from proxy.metrics import Metrics, null_tally
from proxy.tokens import KeyResolver, ParsedToken, peek, verify

__all__ = ["Authenticator", "Verdict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """Everything ``check-token`` shows a person about one token."""

    header: Mapping[str, Any] | None = None
    claims: Mapping[str, Any] | None = None
    issuer: str | None = None
    user: UserInfo | None = None
    error: TokenError | None = None
    not_mine: str | None = None


class Authenticator:
    """Validate tokens for every configured issuer, with a result cache in front."""

    def __init__(
        self,
        config: AuthConfig,
        keys: Mapping[str, KeyResolver],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._by_issuer: dict[str, JWTAuthenticatorConfig] = {
            a.issuer.url: a for a in config.authenticators
        }
        missing = [url for url in self._by_issuer if url not in keys]
        if missing:
            raise ValueError(f"authn: no key resolver for issuers {missing}")
        self._keys = keys
        self._metrics = metrics
        self._clock = clock
        self.cache = ResultCache(config.cache, clock=clock, monotonic=monotonic)
        self.admission = Admission(config.admission, monotonic=monotonic)
        # The counts of every request, bound once (``proxy.metrics.Tally``).
        if metrics is None:
            self._hits, self._misses, self._oks = (null_tally() for _ in range(3))
        else:
            self._hits = metrics.tally(metrics.cache_requests, "hit")
            self._misses = metrics.tally(metrics.cache_requests, "miss")
            self._oks = metrics.tally(metrics.authentications, "ok", "ok")
            metrics.on_flush(self._report_size)

    def _report_size(self) -> None:
        assert self._metrics is not None
        self._metrics.cache_size.set(len(self.cache))

    def _record(self, result: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.tally(
                self._metrics.authentications, result, reason
            ).count += 1

    async def _validate(
        self, parsed: ParsedToken
    ) -> tuple[str, UserInfo, float] | None:
        auth = self._by_issuer.get(parsed.unverified_issuer or "")
        if auth is None:
            return None
        claims = await verify(
            parsed,
            auth.issuer,
            self._keys[auth.issuer.url],
            now=self._clock(),
            leeway=self._config.leeway,
        )
        user = map_claims(auth, claims)
        return auth.issuer.url, user, float(claims["exp"])

    async def authenticate(self, token: str) -> UserInfo | None:
        """The user ``token`` maps to, ``None`` if not ours; raise ``TokenError``."""
        key, user = self.lookup(token)
        if user is not None:
            return user
        return await self.validate(token, key)

    def lookup(self, token: str) -> tuple[bytes, UserInfo | None]:
        """The remembered verdict, without waiting: the cache key and the user.

        A cached refusal is raised as ``TokenError``; ``(key, None)`` is a miss
        (a "not mine" is never cached), to be finished with ``validate``. The
        webhook answers a hit without creating a task; ``authenticate`` is both
        steps for callers that do not care.
        """
        cache = self.cache
        try:
            key = cache.key(token)
        except UnicodeEncodeError:
            # Lone surrogates: how aiohttp decodes header bytes that are not
            # UTF-8 (and what a JSON ``\ud800`` escape gives). No JWT has them,
            # and nothing downstream (hashing, fingerprints) can encode them.
            self._record("rejected", MalformedToken.reason)
            raise MalformedToken("token: not valid unicode text") from None
        hit = cache.verdict(key)
        if hit is None:
            return key, None
        self._hits.count += 1
        if isinstance(hit, UserInfo):
            self.admission.hit()
            self._oks.count += 1
            return key, hit
        self._record("rejected", hit.reason)
        # A fresh copy: raising the cached object itself would hang this
        # caller's frames on it for as long as it stays cached.
        raise detached(hit)

    async def validate(self, token: str, key: bytes) -> UserInfo | None:
        """Validate a token ``lookup`` found no verdict for, and remember the result."""
        cache = self.cache
        self._misses.count += 1
        admission = self.admission
        if not admission.ready():
            await self._wait_turn(admission)
        started = time.perf_counter()
        try:
            parsed = peek(token, max_bytes=self._config.max_token_bytes)
            outcome = await self._validate(parsed)
        except TokenError as err:
            self._observe(started, "temporary" if err.temporary else "rejected")
            self._record("error" if err.temporary else "rejected", err.reason)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "token refused",
                    extra={
                        "reason": err.reason,
                        "issuer": err.issuer,
                        "token": fingerprint(token),
                        "detail": str(err),
                    },
                )
            cache.put_error(key, err)
            if not err.temporary:
                admission.outcome(accepted=False)
            raise
        if outcome is None:
            admission.outcome(accepted=False)
            self._record("not_mine", "not_mine")
            return None
        admission.outcome(accepted=True)
        issuer, user, exp = outcome
        self._observe(started, "ok")
        self._oks.count += 1
        return cache.put_user(key, user, issuer=issuer, exp=exp)

    async def _wait_turn(self, admission: Admission) -> None:
        metrics = self._metrics
        try:
            await admission.wait()
        except Overloaded as err:
            self._record("error", err.reason)
            if metrics is not None:
                metrics.tally(metrics.new_token_waits, "shed").count += 1
            raise
        if metrics is not None:
            metrics.tally(metrics.new_token_waits, "waited").count += 1

    def _observe(self, started: float, result: str) -> None:
        if self._metrics is not None:
            self._metrics.histogram_tally(
                self._metrics.validation_latency, result
            ).observe(time.perf_counter() - started)

    async def explain(self, token: str) -> Verdict:
        """Validate without the cache and say everything learnt, for a person."""
        try:
            parsed = peek(token, max_bytes=self._config.max_token_bytes)
        except TokenError as err:
            return Verdict(error=err)
        iss = parsed.unverified_issuer
        header, claims = parsed.header, parsed.claims
        if iss not in self._by_issuer:
            configured = ", ".join(f'"{u}"' for u in self._by_issuer)
            shown = f'"{iss}"' if iss is not None else "no string iss claim"
            return Verdict(
                header=header,
                claims=claims,
                not_mine=(
                    f"token: issuer mismatch: the token's iss is {shown}, but the "
                    f"configured issuer(s) are [{configured}]; the iss claim must equal "
                    "--oidc-issuer-url / issuer.url exactly (scheme, host, path, no "
                    "trailing slash difference)"
                ),
            )
        try:
            outcome = await self._validate(parsed)
        except TokenError as err:
            return Verdict(header=header, claims=claims, issuer=iss, error=err)
        assert outcome is not None
        return Verdict(header=header, claims=claims, issuer=iss, user=outcome[1])

    def forget_issuer(self, issuer: str) -> None:
        """Forget cached acceptances of ``issuer``: called when it withdraws a key.

        Without this, a token signed by a withdrawn (perhaps compromised) key
        would stay accepted until its cache entry expired.
        """
        dropped = self.cache.forget_issuer(issuer)
        log.info("result cache purged", extra={"issuer": issuer, "entries": dropped})
