"""The scenario groups of the webhook side: echo, webhook, rotation, flood, logins, cache.

Each group starts the services it needs (``services.py``), measures them
(``measure.py``) and records one entry per scenario in ``ctx.scenarios``;
``GROUPS`` is the order ``run.py`` runs them in. The proxy's group, beside its
peers, is in ``proxy_scenarios.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from benchmarks.context import REVIEW, Ctx
from benchmarks.drive import Load, finish_wrk, run_wrk, start_wrk
from benchmarks.measure import load_fields, measure, median_fields, record
from benchmarks.proxy_scenarios import group_proxy
from benchmarks.services import cache_counts, echo_server, webhook

__all__ = [
    "GROUPS",
    "group_cache",
    "group_echo",
    "group_flood",
    "group_logins",
    "group_rotation",
    "group_webhook",
]


def group_echo(ctx: Ctx) -> None:
    """The baseline: a bare aiohttp + uvloop TokenReview echo, 1 and 2 processes."""
    for n in (1, 2):
        with echo_server(ctx, n) as svc:
            measure(
                ctx,
                svc,
                f"echo-{n}",
                "baseline",
                f"bare aiohttp+uvloop TokenReview echo over TLS, {n} process(es) (SO_REUSEPORT)",
                path=REVIEW,
                tokens=ctx.files["one"],
                rounds=ctx.settings.rounds,
                workers=n,
            )


def group_webhook(ctx: Ctx) -> None:
    """The webhook's cached, cold and refused paths (1 worker), and cached with 2."""
    g = "webhook"
    with webhook(ctx, 1, "webhook-1") as svc:
        measure(
            ctx,
            svc,
            "webhook-cached-1",
            g,
            "webhook, 1 worker, the same valid token on every request (cache hit)",
            path=REVIEW,
            tokens=ctx.files["one"],
            check="review",
            rounds=ctx.settings.rounds,
            workers=1,
        )
        hit0, miss0 = cache_counts(svc)
        entry = measure(
            ctx,
            svc,
            "webhook-cold-1",
            g,
            "webhook, 1 worker, a new valid token on every request (parse, signature, claims, mapping)",
            path=REVIEW,
            tokens=ctx.cold_files,
            check="review",
            rounds=len(ctx.cold_files),
            workers=1,
            warmup=False,
        )
        hit1, miss1 = cache_counts(svc)
        served = (hit1 - hit0) + (miss1 - miss0)
        entry["cold_fraction"] = round((miss1 - miss0) / served, 4) if served else None
        entry["token_pool_per_round"] = sum(1 for _ in ctx.cold_files[0].open())
        measure(
            ctx,
            svc,
            "webhook-badsig-replay-1",
            g,
            "webhook, 1 worker, one token with a bad signature replayed (failure cache)",
            path=REVIEW,
            tokens=ctx.files["badsig-one"],
            workers=1,
        )
        measure(
            ctx,
            svc,
            "webhook-expired-replay-1",
            g,
            "webhook, 1 worker, one expired token replayed (failure cache)",
            path=REVIEW,
            tokens=ctx.files["expired-one"],
            workers=1,
        )
        measure(
            ctx,
            svc,
            "webhook-badsig-distinct-1",
            g,
            "webhook, 1 worker, a different bad-signature token on every request (RSA each time)",
            path=REVIEW,
            tokens=ctx.files["badsig-many"],
            workers=1,
            warmup=False,
        )
    with webhook(ctx, 2, "webhook-2") as svc:
        measure(
            ctx,
            svc,
            "webhook-cached-2",
            g,
            "webhook, 2 workers, the same valid token on every request (cache hit)",
            path=REVIEW,
            tokens=ctx.files["one"],
            check="review",
            rounds=ctx.settings.rounds,
            workers=2,
        )


def group_rotation(ctx: Ctx) -> None:
    """Key rotation at full load: A only, then A+B, tokens switch to B, then B only."""
    s = ctx.settings
    duration = max(s.duration, 3.0)
    ctx.issuer_call("/admin/publish?set=a", method="POST")
    with webhook(ctx, 1, "webhook-rotation") as svc:
        t0 = time.time()
        switch_at = int(t0 + duration * 0.5) + 1
        load = Load(
            url=f"{svc.url}{REVIEW}",
            duration=duration + 1,
            connections=s.connections,
            threads=s.threads,
            tokens=ctx.files["rot-a"],
            next_tokens=ctx.files["rot-b"],
            switch_at=switch_at,
            check="review",
        )
        before = ctx.issuer_call("/admin/stats")
        wrk = start_wrk(load)
        _sleep_until(t0 + duration * 0.3)
        ctx.issuer_call("/admin/publish?set=ab", method="POST")
        _sleep_until(switch_at + duration * 0.2)
        ctx.issuer_call("/admin/publish?set=b", method="POST")
        result = finish_wrk(wrk, load)
        after = ctx.issuer_call("/admin/stats")
    ctx.issuer_call("/admin/publish?set=a", method="POST")
    fields = load_fields(result, load)
    record(
        ctx,
        "webhook-rotation-1",
        "resilience",
        "webhook, 1 worker: the issuer publishes A+B, tokens switch from key A to key B, A is withdrawn, at full load",
        **fields,
        failed_valid_requests=result["failures"],
        sent_after_switch=result["sent_after_switch"],
        jwks_fetches=after["jwks_http"] - before["jwks_http"],
    )


def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(min(delay, 60))


def group_flood(ctx: Ctx) -> None:
    """A flood of random-kid tokens beside valid traffic: issuer fetches and goodput.

    The valid load runs alone, then beside the flood, in ``rounds`` such
    pairs; each entry is its median round. One pair alone would compare two
    moments of a shared machine: its speed moves by a third from one load run
    to the next with no steal recorded (``webhook-cached-1``'s rounds spanned
    11,300-17,000 req/s in one run), and a single pair put target 6 anywhere
    from 0.62 to 0.90.
    """
    s = ctx.settings
    valid_conns = max(2, s.connections * 3 // 4)
    flood_conns = max(1, s.connections - valid_conns)
    with webhook(ctx, 1, "webhook-flood") as svc:
        url = f"{svc.url}{REVIEW}"
        alone = Load(
            url=url,
            duration=s.duration,
            connections=valid_conns,
            threads=1,
            tokens=ctx.files["one"],
            check="review",
        )
        flood = Load(
            url=url,
            duration=s.duration,
            connections=flood_conns,
            threads=1,
            tokens=ctx.files["random-kid"],
        )
        if s.warmup:
            run_wrk(dataclasses.replace(alone, duration=s.warmup, check=None))
        undisturbed: list[dict[str, Any]] = []
        valid: list[dict[str, Any]] = []
        flooded: list[dict[str, Any]] = []
        before = ctx.issuer_call("/admin/stats")
        started = time.monotonic()
        for _ in range(s.rounds):
            undisturbed.append(run_wrk(alone, svc.proc.pids()))
            fw = start_wrk(flood)
            valid.append(run_wrk(alone, svc.proc.pids()))
            flooded.append(finish_wrk(fw, flood))
        elapsed = time.monotonic() - started
        after = ctx.issuer_call("/admin/stats")
    record(
        ctx,
        "webhook-valid-undisturbed-1",
        "resilience",
        f"webhook, 1 worker, valid cached token on {valid_conns} connections, alone",
        **median_fields(undisturbed, alone),
    )
    fetches = after["jwks_http"] - before["jwks_http"]
    allowed = 1 + int(elapsed // s.cooldown)
    record(
        ctx,
        "webhook-valid-under-flood-1",
        "resilience",
        f"the same valid load while {flood_conns} more connections send random-kid tokens",
        **median_fields(valid, alone),
        flood_rps=median_fields(flooded, flood)["rps"],
        rounds_flood_rps=[round(r["rps"], 1) for r in flooded],
        flood_connections=flood_conns,
        jwks_fetches=fetches,
        jwks_fetches_allowed=allowed,
        cooldown_s=s.cooldown,
    )


def _logins(ctx: Ctx, name: str, description: str, beside: bool) -> None:
    """New valid tokens on all but one connection, alone or beside a remembered one."""
    s = ctx.settings
    with webhook(ctx, 1, name) as svc:
        url = f"{svc.url}{REVIEW}"
        logins = Load(
            url=url,
            duration=s.duration,
            connections=s.connections - 1,
            threads=1,
            tokens=ctx.cold_files[0],
            check="review",
        )
        remembered = Load(
            url=url,
            duration=s.duration,
            connections=1,
            threads=1,
            tokens=ctx.files["one"],
        )
        warm = start_wrk(remembered) if beside else None
        hit0, miss0 = cache_counts(svc)
        result = run_wrk(logins, svc.proc.pids())
        hit1, miss1 = cache_counts(svc)
        beside_rps = finish_wrk(warm, remembered)["rps"] if warm else None
    served = (hit1 - hit0) + (miss1 - miss0)
    record(
        ctx,
        name,
        "resilience",
        description,
        **load_fields(result, logins),
        remembered_rps=None if beside_rps is None else round(beside_rps, 1),
        cold_fraction=round((miss1 - miss0) / served, 4) if served else None,
    )


def group_logins(ctx: Ctx) -> None:
    """A wave of real logins beside a remembered client: not held back as a flood is."""
    n = ctx.settings.connections - 1
    _logins(
        ctx,
        "webhook-logins-alone-1",
        f"webhook, 1 worker, a new valid token on every request on {n} connections, alone",
        beside=False,
    )
    _logins(
        ctx,
        "webhook-logins-beside-cached-1",
        f"the same new valid tokens on {n} connections beside one connection of a cached token",
        beside=True,
    )


def group_cache(ctx: Ctx) -> None:
    """The result cache under N distinct tokens: bounded, and bytes per entry."""
    from proxy.cache import ResultCache
    from proxy.config import CacheSettings
    from proxy.kube import UserInfo

    n = ctx.settings.cache_entries
    bound = min(CacheSettings().max_entries, max(1, n // 2))
    cache = ResultCache(
        CacheSettings(max_entries=bound, success_ttl=300.0, failure_ttl=10.0)
    )
    exp = time.time() + 3600
    users = [
        UserInfo(username=f"oidc:00u{i:08d}alice", groups=("dev", "ops"))
        for i in range(bound)
    ]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    for i in range(n):
        token = f"header.payload-{i:012d}.signature"
        cache.put_user(
            cache.key(token), users[i % bound], issuer="https://issuer", exp=exp
        )
    elapsed = time.perf_counter() - started
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    size = len(cache)
    record(
        ctx,
        "cache-distinct-tokens",
        "scale",
        f"{n:,} distinct accepted tokens into a result cache bounded at {bound:,} entries",
        status="ok",
        tokens=n,
        bound=bound,
        entries=size,
        within_bound=size <= bound,
        bytes_per_entry=round(used / size, 1) if size else None,
        note="bytes per entry exclude the UserInfo (shared by every token of a user)",
        insert_us=round(elapsed / n * 1e6, 2),
    )
    del cache, users
    gc.collect()


#: Every scenario group, in the order a run measures them (``--only`` picks some).
GROUPS: dict[str, Callable[[Ctx], None]] = {
    "echo": group_echo,
    "webhook": group_webhook,
    "rotation": group_rotation,
    "flood": group_flood,
    "logins": group_logins,
    "cache": group_cache,
    "proxy": group_proxy,
}
