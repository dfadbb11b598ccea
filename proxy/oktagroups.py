"""Groups beyond the token: when Okta's groups claim is capped or absent, ask its API.

Okta puts at most 100 groups in a token's groups claim, and tokens of the org
authorization server may carry none ("minified"). kube-apiserver can do
nothing about that; Vault (``fetch_groups``/``groups_cap``) and Cloudflare
Access ask Okta's API, and so do we, for the issuers ``--okta-*`` names.

Where it sits in the pipeline (``proxy.authn``): after the signature, the
claims checks and distributed claims, before the claim mapping. When the
claim the groups mapping reads (``claimMappings.groups.claim``; ``groups``
for a CEL mapping) is absent or holds at least ``cap`` entries, the user's
groups are fetched (``GET {org}/api/v1/users/{sub}/groups``, every page),
each group's ``profile.name`` kept when ``filter`` matches it in full, and
the list *replaces* the claim. The mapping then applies the prefix as usual
and CEL rules see the full list. A claim under the cap is used as it is.

Failure policy: fail closed. If the API cannot answer within ``timeout``
and nothing fresh is cached, the token is refused with ``GroupsUnavailable``
(``groups_unavailable``, temporary: the webhook answers 503 and the API
server retries). A user never silently loses groups, nor keeps ones older
than ``cache_ttl``.

Cache and load: per (org, user) for ``cache_ttl``; a fetch per user is
single-flight (concurrent reviews of one user's tokens share it); at most
``concurrency`` fetches run at once. Rate limits are ``proxy.oktaapi``'s.

Pure apart from the injected ``OktaGroupsFetcher`` (``proxy.oktaapi``'s
client over the app's one ``ClientSession``): no aiohttp here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from proxy.config import JWTAuthenticatorConfig, OktaGroupsConfig
from proxy.errors import GroupsUnavailable, MissingClaim
from proxy.metrics import Metrics

__all__ = ["GroupsProvenance", "OktaGroups", "OktaGroupsFetcher"]

#: The claim read with a CEL groups mapping (Okta's conventional name).
DEFAULT_CLAIM = "groups"


class OktaGroupsFetcher(Protocol):
    """Where a user's groups come from (I/O lives behind this)."""

    async def user_groups(
        self, org_url: str, user_id: str, *, deadline: float
    ) -> list[str]:
        """Every group's ``profile.name``, all pages, before ``deadline``
        (``loop.time()``); raise ``GroupsUnavailable``.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupsProvenance:
    """Where a user's groups came from, for ``check-token`` (raw names, no prefix)."""

    source: Literal["token", "okta_api"]
    claim: str
    #: The token's claim as it was (None: absent).
    token_groups: tuple[str, ...] | None
    #: The API's answer after the filter (empty when ``source`` is token).
    api_groups: tuple[str, ...] = ()
    #: Groups the API returned before the filter.
    fetched: int = 0
    cached: bool = False
    org_url: str = ""
    cap: int = 0


def _as_names(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return None


class OktaGroups:
    """Fill a capped or absent groups claim from Okta's API (see module docs)."""

    def __init__(
        self,
        config: OktaGroupsConfig,
        fetcher: OktaGroupsFetcher | None,
        *,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._issuers = frozenset(config.issuers)
        self._fetcher = fetcher
        self._metrics = metrics
        self._monotonic = monotonic
        self._filter = re.compile(config.filter)
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[str, ...], int, float]]
        self._cache = OrderedDict()
        self._inflight: dict[
            tuple[str, str], asyncio.Task[tuple[tuple[str, ...], int]]
        ] = {}
        self._slots = asyncio.Semaphore(config.concurrency)

    def forget_subject(self, sub: str) -> None:
        """Drop the fetched groups of the user ``sub`` (in every org)."""
        for key in [k for k in self._cache if k[1] == sub]:
            del self._cache[key]

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tally(self._metrics.okta_groups_cache, outcome).count += 1

    async def expand(
        self, auth: JWTAuthenticatorConfig, claims: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any], GroupsProvenance | None]:
        """``claims`` with the groups claim replaced when it is capped or absent."""
        issuer = auth.issuer.url
        groups = auth.claim_mappings.groups
        if issuer not in self._issuers or groups is None:
            return claims, None
        claim = groups.claim or DEFAULT_CLAIM
        value = claims.get(claim)
        token_groups = None if value is None else _as_names(value)
        cap = self._config.cap
        if value is not None and (token_groups is None or len(token_groups) < cap):
            # Under the cap, or of a type the mapping will refuse: as it is.
            return claims, GroupsProvenance(
                source="token", claim=claim, token_groups=token_groups, cap=cap
            )
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise MissingClaim(
                'claims: "sub" is needed to ask Okta for the user\'s groups',
                claim="sub",
                issuer=issuer,
            )
        org = self._config.org_for(issuer)
        names, fetched, cached = await self._groups(org, sub, issuer)
        return {**claims, claim: list(names)}, GroupsProvenance(
            source="okta_api",
            claim=claim,
            token_groups=token_groups,
            api_groups=names,
            fetched=fetched,
            cached=cached,
            org_url=org,
            cap=cap,
        )

    async def _groups(
        self, org: str, sub: str, issuer: str
    ) -> tuple[tuple[str, ...], int, bool]:
        key = (org, sub)
        hit = self._cache.get(key)
        if hit is not None and hit[2] > self._monotonic():
            self._count("hit")
            return hit[0], hit[1], True
        task = self._inflight.get(key)
        if task is None:
            self._count("miss")
            task = asyncio.ensure_future(self._fetch(org, sub, issuer))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            self._count("shared")
        # Shielded: one caller giving up (its client went away) must not
        # cancel the fetch the others wait for.
        names, fetched = await asyncio.shield(task)
        return names, fetched, False

    async def _fetch(
        self, org: str, sub: str, issuer: str
    ) -> tuple[tuple[str, ...], int]:
        if self._fetcher is None:
            raise GroupsUnavailable(
                "okta: the groups claim is capped or absent and Okta's API is "
                "not asked here (offline)",
                issuer=issuer,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.timeout
        try:
            async with asyncio.timeout_at(deadline), self._slots:
                raw = await self._fetcher.user_groups(org, sub, deadline=deadline)
        except TimeoutError:
            raise GroupsUnavailable(
                f"okta: no answer from {org}'s groups API within "
                f"{self._config.timeout:g}s (--okta-groups-timeout)",
                issuer=issuer,
            ) from None
        except GroupsUnavailable as err:
            err.issuer = issuer
            raise
        names = self._keep(raw)
        self._remember((org, sub), names, len(raw))
        return names, len(raw)

    def _keep(self, raw: Sequence[str]) -> tuple[str, ...]:
        match = self._filter.fullmatch
        return tuple(dict.fromkeys(n for n in raw if match(n)))

    def _remember(self, key: tuple[str, str], names: tuple[str, ...], n: int) -> None:
        cache = self._cache
        cache[key] = (names, n, self._monotonic() + self._config.cache_ttl)
        cache.move_to_end(key)
        while len(cache) > self._config.cache_entries:
            cache.popitem(last=False)
