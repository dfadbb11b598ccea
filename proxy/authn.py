"""The one façade both front ends use: token → user, "not mine", or a typed error.

Three outcomes and no others (house rule 2):

- a ``UserInfo``: the token is valid for one of the configured issuers;
- ``None``: "not mine": the token's (unverified) ``iss`` names no configured
  issuer and shares no host with one, so another authenticator may take it;
  no error, nothing cached;
- a ``TokenError``: the token claims to be from one of our issuers (or is not a
  JWT at all) and fails; its ``reason`` is counted and logged.

A *near miss* is not "not mine": an ``iss`` on the host of a configured
issuer that differs by a trailing slash, the scheme, case, port or path is
refused as ``issuer_mismatch`` with both values (``IssuerMismatch``), because
that is almost always a configuration mistake (an Okta custom domain, a
slash) that kube-apiserver would report only as "invalid bearer token".
Deliberate difference from kube-apiserver, whose authenticator says "not
mine" there: in webhook mode the API server's other authenticators still get
their turn either way (an error from one authenticator does not stop the
union), so only the explanation changes.

Routing by the unverified ``iss`` is safe because it only chooses which issuer's
keys and rules to apply: a forged ``iss`` just selects keys that will not verify
the signature, and the verified ``iss`` is compared again after the signature.

Token introspection (``proxy.introspection``), for the issuers that have it,
runs last: after the signature, the claims and the mapping, so a token we
would refuse anyway never costs a call to the IdP. An acceptance that rests
on an introspection answer is kept in the result cache only while that
answer is fresh (at most ``--introspection-cache-ttl``), so a revoked token
is refused within that TTL whether or not its verdict was cached.

The revocation list (``proxy.revocation``, ``--revocation-namespace``) is
checked right after the signature (before any call to the IdP) and again on
every cache hit: two dictionary look-ups, one length test while the list is
empty. A revocation that arrives also drops the cached acceptances of its
subject at once (memory), and one that is lifted drops the cached refusals
(so the user is let in at once, not after ``failure_ttl``). Until the list
has been read once, tokens are refused as ``revocations_unavailable``
(temporary): fail closed.

The result cache sits in front of everything. Metrics are recorded here so both
front ends count the same way: ``authentications{result,reason}`` per call and
the validation latency only for cache misses (a hit says nothing about cost).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.admission import Admission
from proxy.cache import ResultCache, detached
from proxy.claims import map_claims
from proxy.config import AuthConfig, JWTAuthenticatorConfig
from proxy.distclaims import ClaimSourceFetcher, DistributedClaims
from proxy.errors import (
    IssuerMismatch,
    MalformedToken,
    Overloaded,
    RevocationsUnavailable,
    TokenError,
    TokenRevoked,
)
from proxy.introspection import Introspection, IntrospectionResult
from proxy.kube import UserInfo
from proxy.log import fingerprint
from proxy.metrics import Metrics, null_tally
from proxy.oktagroups import GroupsProvenance, OktaGroups
from proxy.revocation import Revocation, RevocationList, format_time
from proxy.tokens import KeyResolver, ParsedToken, peek, verify

__all__ = ["Authenticator", "Verdict", "near_miss", "revoked_error"]

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
    #: Where the groups came from when ``--okta-*`` applies to the issuer.
    groups_from: GroupsProvenance | None = None
    #: The introspection answer, when introspection is on for the issuer and
    #: was reached (the token passed every other check).
    introspection: IntrospectionResult | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    issuer: str
    user: UserInfo
    exp: float
    provenance: GroupsProvenance | None
    introspection: IntrospectionResult | None
    subject: str | None = None
    iat: float | None = None


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
        claim_sources: ClaimSourceFetcher | None = None,
        okta_groups: OktaGroups | None = None,
        introspection: Introspection | None = None,
        revocations: RevocationList | None = None,
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
        # Without a fetcher (check-token --offline), a token whose groups
        # live at a claim source is refused, never mapped without them.
        self._distributed = DistributedClaims(
            claim_sources, clock=clock, max_bytes=config.max_token_bytes
        )
        # Groups beyond a capped or absent claim (``proxy.oktagroups``);
        # without it (or with no fetcher) such a token is refused, never
        # mapped with a truncated list.
        if okta_groups is None and config.okta is not None:
            okta_groups = OktaGroups(config.okta, None)
        self._okta = okta_groups
        # Without a fetcher (check-token --offline) an introspected issuer's
        # tokens are refused as introspection_unavailable, never accepted
        # unchecked.
        if introspection is None and config.introspection is not None:
            introspection = Introspection(config.introspection, None, clock=clock)
        self._introspection = introspection
        self.cache = ResultCache(config.cache, clock=clock, monotonic=monotonic)
        self.revocations = revocations
        if revocations is not None:
            revocations.subscribe(
                added=self._revocation_added, lifted=self._revocation_lifted
            )
        #: Bumped by ``reconfigure``: verdicts reached under older rules are
        #: answered but not cached.
        self._generation = 0
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

    async def _validate_explained(
        self, parsed: ParsedToken, token: str
    ) -> _Outcome | None:
        iss = parsed.unverified_issuer
        auth = self._by_issuer.get(iss or "")
        if auth is None:
            if iss is not None:
                _refuse_near_miss(iss, self._by_issuer)
            return None
        keys = self._keys[auth.issuer.url]
        leeway = self._config.leeway
        claims = await verify(
            parsed, auth.issuer, keys, now=self._clock(), leeway=leeway
        )
        subject, iat = _subject_and_iat(claims)
        revocations = self.revocations
        if revocations is not None:
            if not revocations.synced:
                raise RevocationsUnavailable(
                    "token: the revocation list has not been read yet "
                    "(--revocation-namespace); retry",
                    issuer=auth.issuer.url,
                )
            found = revocations.revoked(auth.issuer.url, subject, iat)
            if found is not None:
                raise revoked_error(found, auth.issuer.url)
        claims = await self._distributed.expand(auth, claims, keys, leeway=leeway)
        provenance = None
        if self._okta is not None:
            claims, provenance = await self._okta.expand(auth, claims)
        user = map_claims(auth, claims)
        exp = float(claims["exp"])
        introspected = None
        if self._introspection is not None and self._introspection.applies(
            auth.issuer.url
        ):
            introspected = await self._introspection.check(
                auth.issuer.url, token, exp=exp
            )
        return _Outcome(
            auth.issuer.url, user, exp, provenance, introspected, subject, iat
        )

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
            revocations = self.revocations
            if revocations is not None and len(revocations):
                self._check_revoked(key, revocations)
            self.admission.hit()
            self._oks.count += 1
            return key, hit
        self._record("rejected", hit.reason)
        # A fresh copy: raising the cached object itself would hang this
        # caller's frames on it for as long as it stays cached.
        raise detached(hit)

    def _check_revoked(self, key: bytes, revocations: RevocationList) -> None:
        """Raise ``TokenRevoked`` if the cached acceptance under ``key`` is
        revoked now (it was cached before the revocation arrived)."""
        found = self.cache.subject(key)
        if found is None:
            return
        issuer, subject, iat = found
        revocation = revocations.revoked(issuer, subject, iat)
        if revocation is None:
            return
        self.cache.forget(key)
        self._record("rejected", TokenRevoked.reason)
        raise revoked_error(revocation, issuer)

    def _revocation_added(self, revocation: Revocation) -> None:
        dropped = self.cache.forget_subject(revocation.issuer, revocation.subject)
        log.info(
            "revocation in force",
            extra={
                "revocation": revocation.name,
                "issuer": revocation.issuer,
                "issued_before": format_time(revocation.issued_before),
                "cached_verdicts_dropped": dropped,
            },
        )

    def _revocation_lifted(self, revocation: Revocation) -> None:
        # Refusals are not kept per subject; a lifted revocation is rare.
        self.cache.forget_refusals()
        log.info(
            "revocation lifted",
            extra={"revocation": revocation.name},
        )

    def forget_subject(self, issuer: str | None, subject: str) -> int:
        """Drop the cached acceptances of ``subject`` (of ``issuer``; ``None``:
        any), so their next request is validated again; return how many.

        For callers that learn a user's rights changed (the Okta event hook's
        group membership removal) without revoking the user's tokens: the
        user's groups fetched from Okta's API go too, and a validation in
        flight does not store its verdict after this.
        """
        self._generation += 1
        if self._okta is not None:
            self._okta.forget_subject(subject)
        dropped = self.cache.forget_subject(issuer, subject)
        log.info("result cache purged", extra={"subject": subject, "entries": dropped})
        return dropped

    async def validate(self, token: str, key: bytes) -> UserInfo | None:
        """Validate a token ``lookup`` found no verdict for, and remember the result."""
        cache = self.cache
        self._misses.count += 1
        admission = self.admission
        if not admission.ready():
            await self._wait_turn(admission)
        started = time.perf_counter()
        generation = self._generation
        try:
            parsed = peek(token, max_bytes=self._config.max_token_bytes)
            outcome = await self._validate_explained(parsed, token)
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
            if generation == self._generation:
                cache.put_error(key, err)
            if not err.temporary:
                admission.outcome(accepted=False)
            raise
        if outcome is None:
            admission.outcome(accepted=False)
            self._record("not_mine", "not_mine")
            return None
        admission.outcome(accepted=True)
        self._observe(started, "ok")
        self._oks.count += 1
        if generation != self._generation:
            return outcome.user
        checked = outcome.introspection
        return cache.put_user(
            key,
            outcome.user,
            issuer=outcome.issuer,
            exp=outcome.exp,
            max_ttl=None if checked is None else checked.fresh_for,
            subject=outcome.subject,
            iat=outcome.iat,
        )

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
        if iss is not None and iss not in self._by_issuer:
            try:
                _refuse_near_miss(iss, self._by_issuer)
            except IssuerMismatch as mismatch:
                return Verdict(header=header, claims=claims, error=mismatch)
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
            outcome = await self._validate_explained(parsed, token)
        except TokenError as err:
            return Verdict(header=header, claims=claims, issuer=iss, error=err)
        assert outcome is not None
        return Verdict(
            header=header,
            claims=claims,
            issuer=iss,
            user=outcome.user,
            groups_from=outcome.provenance,
            introspection=outcome.introspection,
        )

    def claimed_issuer(self, token: str) -> str | None:
        """The token's unverified ``iss`` (a claim value: safe to log, never
        the token), for the log line of a "not mine"; ``None`` when it has
        no string ``iss`` or is not a JWT.
        """
        try:
            iss = peek(token, max_bytes=self._config.max_token_bytes).unverified_issuer
        except TokenError:
            return None
        return iss[:256] if iss is not None else None

    def reconfigure(
        self, config: AuthConfig, keys: Mapping[str, KeyResolver]
    ) -> list[str]:
        """Apply a reloaded configuration; return the issuer URLs whose settings changed.

        The swap is two assignments with no ``await`` between them, and a
        validation reads both before its first ``await``: a request in flight
        finishes under the rules it started with, the next one gets the new
        ones. Accepted verdicts of a changed or removed issuer are dropped (a
        new audience or rule may refuse them now); every cached refusal is
        dropped too, since refusals are not kept per issuer and a new issuer
        or audience may accept them now. The flag-only settings (leeway, the
        cache and admission bounds, Okta) are the process's and do not change.
        """
        by_issuer = {a.issuer.url: a for a in config.authenticators}
        missing = [url for url in by_issuer if url not in keys]
        if missing:
            raise ValueError(f"authn: no key resolver for issuers {missing}")
        old = self._by_issuer
        changed = sorted(
            u for u in old.keys() | by_issuer.keys() if old.get(u) != by_issuer.get(u)
        )
        self._by_issuer, self._keys = by_issuer, keys
        if changed:
            # A validation in flight finishes under the old rules; its verdict
            # must not land in the cache after the purge below.
            self._generation += 1
            for url in changed:
                self.cache.forget_issuer(url)
            self.cache.forget_refusals()
        return changed

    def forget_issuer(self, issuer: str) -> None:
        """Forget cached acceptances of ``issuer``: called when it withdraws a key.

        Without this, a token signed by a withdrawn (perhaps compromised) key
        would stay accepted until its cache entry expired.
        """
        dropped = self.cache.forget_issuer(issuer)
        log.info("result cache purged", extra={"issuer": issuer, "entries": dropped})


def _subject_and_iat(claims: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The verified ``sub`` (a string) and ``iat`` (a number), or ``None`` each."""
    sub = claims.get("sub")
    iat = claims.get("iat")
    return (
        sub if isinstance(sub, str) else None,
        float(iat)
        if isinstance(iat, (int, float)) and not isinstance(iat, bool)
        else None,
    )


def revoked_error(revocation: Revocation, issuer: str) -> TokenRevoked:
    """The refusal of a token a Revocation object names (``revoked``)."""
    # The object's name, not the subject: refusal lines are logged at info,
    # where identities are not (kubectl get revocations NAME shows it).
    return TokenRevoked(
        f'token: revoked by Revocation "{revocation.name}" (its subject\'s tokens '
        f"issued before {format_time(revocation.issued_before)})",
        issuer=issuer,
    )


def near_miss(iss: str, configured: Iterable[str]) -> tuple[str, str] | None:
    """The configured issuer ``iss`` nearly is, and how they differ; ``None``
    when ``iss`` shares a host with none of them (a stranger: "not mine").

    Hosts compare case-insensitively (DNS does); among several issuers on
    the host, the one with the smallest difference wins (a slash before a
    path), so the message points at the likely intended one.
    """
    got = _split(iss)
    if got is None:
        return None
    best: tuple[int, str, str] | None = None
    for url in configured:
        want = _split(url)
        if want is None or want.hostname != got.hostname:
            continue
        rank, what = _difference(got, want, iss, url)
        if best is None or rank < best[0]:
            best = (rank, url, what)
    return None if best is None else (best[1], best[2])


def _split(url: str) -> urllib.parse.SplitResult | None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    return parts if parts.hostname else None


def _difference(
    got: urllib.parse.SplitResult,
    want: urllib.parse.SplitResult,
    iss: str,
    url: str,
) -> tuple[int, str]:
    """(rank, words) of how two same-host issuer URLs differ; lower is nearer."""
    if iss.lower() == url.lower():
        return 0, "they differ in letter case"
    if iss.rstrip("/") == url.rstrip("/"):
        return 1, "they differ by a trailing slash"
    if got.scheme != want.scheme and iss.partition(":")[2] == url.partition(":")[2]:
        return 2, f"they differ in scheme ({got.scheme} vs {want.scheme})"
    if got.port != want.port and got.path.rstrip("/") == want.path.rstrip("/"):
        return 3, "they differ in port"
    return 4, "same host, different path (another authorization server?)"


def _refuse_near_miss(iss: str, configured: Iterable[str]) -> None:
    """Raise ``IssuerMismatch`` when ``iss`` is a near miss (see the module docs)."""
    found = near_miss(iss, configured)
    if found is None:
        return
    expected, what = found
    got = iss[:256]
    raise IssuerMismatch(
        f'token: issuer mismatch: the token\'s iss is "{got}", the configured issuer '
        f'is "{expected}": {what}; the iss claim must equal --oidc-issuer-url / '
        "issuer.url exactly (compare with the issuer in "
        f"{expected.rstrip('/')}/.well-known/openid-configuration)",
        issuer=expected,
        expected=expected,
        got=got,
        near_miss=True,
    )
