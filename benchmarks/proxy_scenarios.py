"""The proxy's scenario group: the proxy beside Apache, HAProxy and the nginx ceiling.

Every front end forwards to the same shared upstream (nginx when installed,
else the aiohttp stand-in, said aloud). The streamed body and the idle watches
go to the aiohttp upstream, which implements them. The proxy with 2 workers is
measured in alternating rounds beside HAProxy + ``jwt_verify`` and the nginx
ceiling (issue 25), and its 401s in alternating rounds beside Apache +
mod_auth_openidc's (issue 7), whose other scenarios are measured after it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from benchmarks import apache, haproxy, nginx
from benchmarks.context import SMALL_PATH, WATCH_PATH, Ctx
from benchmarks.measure import Run, measure, measure_interleaved, record, skip
from benchmarks.procs import rss_bytes
from benchmarks.services import (
    Service,
    apache_peer,
    cache_counts,
    check_front,
    client_ssl,
    gate_proxy,
    haproxy_peer,
    nginx_ceiling,
    proxy_missing,
    shared_upstream,
    upstream_server,
)

__all__ = ["APACHE", "HEAD_TO_HEAD", "PROXY", "UPSTREAM_DIRECT", "group_proxy"]

#: The upstream alone: what every proxy's figures are read against.
UPSTREAM_DIRECT = {
    "upstream-direct": "the upstream alone, plain http, no authentication",
    "upstream-direct-latency": "the upstream alone, 1 connection (latency)",
}
#: The proxy's own scenarios (skipped together when it cannot run).
PROXY = {
    "proxy-cached-1": "proxy, 1 worker, GET small object, cached token",
    "proxy-cached-2": "proxy, 2 workers, GET small object, cached token",
    "proxy-cold-2": "proxy, 2 workers, GET small object, a new token every request",
    "proxy-latency-1": "proxy, 1 worker, 1 connection (latency added)",
    "proxy-badsig-replay-2": "proxy, 2 workers, one bad-signature token replayed (401s)",
    "proxy-expired-replay-2": "proxy, 2 workers, one expired token replayed (401s)",
    "proxy-stream-rss": "proxy RSS growth while streaming a large response",
    "proxy-idle-watches": "proxy memory per idle watch",
}
#: The first peer (issue 7), skipped together when Apache is not installed.
APACHE = {
    "apache-cached": "Apache + mod_auth_openidc, GET small object (verifies every request)",
    "apache-latency": "Apache + mod_auth_openidc, 1 connection (latency)",
    "apache-badsig-replay": "Apache + mod_auth_openidc, one bad-signature token replayed (401s)",
    "apache-expired-replay": "Apache + mod_auth_openidc, one expired token replayed (401s)",
}

#: The proxy with 2 workers against the fastest JWT-checking proxy and the
#: ceiling (issue 25), measured in alternating rounds.
HEAD_TO_HEAD = {
    "haproxy-cached": (
        "peer",
        "HAProxy + jwt_verify, 2 threads, GET small object, the same token "
        "(verifies every request)",
    ),
    "haproxy-cold": (
        "peer",
        "HAProxy + jwt_verify, 2 threads, GET small object, a new token every request",
    ),
    "nginx-ceiling": (
        "baseline",
        "nginx TLS reverse proxy without authentication, 2 workers (a proxy's "
        "ceiling on this machine)",
    ),
}


def group_proxy(ctx: Ctx) -> None:
    """The proxy beside Apache + mod_auth_openidc, both in front of the same upstream.

    The shared upstream is nginx (as in issue 7) when installed: it costs the
    shared cores a fraction of what the aiohttp stand-in does, so it dilutes
    the proxy-versus-Apache ratios less. The streamed body and the idle
    watches always go to the aiohttp upstream, which implements them. Apache
    runs (idle) through the proxy's scenarios so that the 401s of a replayed
    bad token, which target 5 compares, are measured in alternating rounds.
    """
    g = "proxy"
    missing = proxy_missing()
    peer_missing = apache.missing()
    with (
        upstream_server(ctx) as aio,
        shared_upstream(ctx, aio) as up,
        contextlib.ExitStack() as stack,
    ):
        ctx.upstream["streams_and_watches"] = aio.label
        if missing is None or peer_missing is None:
            _upstream_direct(ctx, up)
        peer: Service | None = None
        if peer_missing is not None:
            for name, desc in APACHE.items():
                skip(ctx, name, "peer", desc, peer_missing)
        else:
            peer = stack.enter_context(apache_peer(ctx, up.url))
        if missing is not None:
            for name, desc in PROXY.items():
                skip(ctx, name, g, desc, missing)
            for name, (group, desc) in HEAD_TO_HEAD.items():
                skip(ctx, name, group, desc, missing)
            if peer is not None:
                _replays(ctx, up, None, peer)
        else:
            _proxy_scenarios(ctx, up, aio, peer)
        if peer is not None:
            _peer_scenarios(ctx, up, peer)


def _upstream_direct(ctx: Ctx, up: Service) -> None:
    """The upstream alone, throughput and latency (no front end, no authentication)."""
    _throughput_and_latency(
        ctx,
        up,
        "proxy",
        UPSTREAM_DIRECT,
        "upstream-direct",
        "upstream-direct-latency",
        rounds=1,
        upstream=up.label,
    )


def _throughput_and_latency(
    ctx: Ctx,
    svc: Service,
    group: str,
    texts: dict[str, str],
    throughput: str,
    latency: str,
    *,
    rounds: int,
    **extra: Any,
) -> None:
    """A small ``GET`` with the same token: ``rounds`` of full load, then 1 connection."""
    measure(
        ctx,
        svc,
        throughput,
        group,
        texts[throughput],
        path=SMALL_PATH,
        tokens=ctx.files["one"],
        mode="bearer",
        check="status",
        rounds=rounds,
        **extra,
    )
    measure(
        ctx,
        svc,
        latency,
        group,
        texts[latency],
        path=SMALL_PATH,
        tokens=ctx.files["one"],
        mode="bearer",
        connections=1,
        threads=1,
        duration=ctx.settings.latency_duration,
        **extra,
    )


def _peer_scenarios(ctx: Ctx, up: Service, peer: Service) -> None:
    """Apache + mod_auth_openidc: cached and latency (its 401s are in ``_replays``)."""
    _throughput_and_latency(
        ctx,
        peer,
        "peer",
        APACHE,
        "apache-cached",
        "apache-latency",
        rounds=ctx.settings.rounds,
        upstream=up.label,
    )


def _replays(ctx: Ctx, up: Service, px: Service | None, peer: Service | None) -> None:
    """The 401s of one replayed bad token: the proxy's (2 workers) and Apache's.

    Each kind of token is measured in ``rounds`` alternating rounds (proxy,
    Apache, proxy, ...) so that target 5 compares the same moments of the
    machine; either front end may be absent (not installed).
    """
    for kind, tokens in (("badsig", "badsig-one"), ("expired", "expired-one")):
        fronts = [
            (px, f"proxy-{kind}-replay-2", "proxy", PROXY, {"workers": 2}),
            (peer, f"apache-{kind}-replay", "peer", APACHE, {}),
        ]
        runs = [
            Run(
                svc=svc,
                name=name,
                group=group,
                description=texts[name],
                path=SMALL_PATH,
                tokens=ctx.files[tokens],
                mode="bearer",
                extra={**extra, "upstream": up.label},
            )
            for svc, name, group, texts, extra in fronts
            if svc is not None
        ]
        measure_interleaved(ctx, runs, ctx.settings.rounds)


def _proxy_scenarios(ctx: Ctx, up: Service, aio: Service, peer: Service | None) -> None:
    """The proxy with 1 worker, its stream and watches, then 2 workers head to head."""
    g = "proxy"
    s = ctx.settings
    desc = PROXY
    with gate_proxy(ctx, up.url, 1, "proxy-1") as px:
        _throughput_and_latency(
            ctx,
            px,
            g,
            desc,
            "proxy-cached-1",
            "proxy-latency-1",
            rounds=s.rounds,
            workers=1,
            upstream=up.label,
        )
        if up is aio:
            _stream_rss(ctx, px, aio, desc["proxy-stream-rss"])
            _idle_watches(ctx, px, aio, desc["proxy-idle-watches"])
    if up is not aio:
        # nginx serves neither: a proxy of its own in front of the aiohttp upstream.
        with gate_proxy(ctx, aio.url, 1, "proxy-1-aiohttp") as px:
            _stream_rss(ctx, px, aio, desc["proxy-stream-rss"])
            _idle_watches(ctx, px, aio, desc["proxy-idle-watches"])
    with gate_proxy(ctx, up.url, 2, "proxy-2") as px:
        _head_to_head(ctx, up, aio, px, desc)
        _replays(ctx, up, px, peer)


def _head_to_head(
    ctx: Ctx, up: Service, aio: Service, px: Service, desc: dict[str, str]
) -> None:
    """proxy-cached-2, proxy-cold-2, HAProxy and the nginx ceiling, interleaved.

    HAProxy and the ceiling forward to the same nginx; each is checked by
    ``check_front`` before it is measured, and one that fails its check is
    reported as an error instead of measured.
    """
    with contextlib.ExitStack() as stack:
        peers = _start_head_to_head_peers(ctx, stack, up, aio, px)
        runs = _head_to_head_runs(ctx, up, px, peers, desc)
        measure_interleaved(ctx, runs, ctx.settings.rounds)


def _start_head_to_head_peers(
    ctx: Ctx, stack: contextlib.ExitStack, up: Service, aio: Service, px: Service
) -> dict[str, Service]:
    """HAProxy and the ceiling, started and checked ("haproxy", "nginx" -> service).

    A peer that cannot start here is recorded as skipped, one that fails
    ``check_front`` as an error; neither is in the result.
    """
    peers: dict[str, Service] = {}
    why: str | None = None
    if up is aio:
        why = "needs the nginx upstream (its header echo checks the peer)"
    else:
        check_front(ctx, px)
    starters: list[
        tuple[
            str,
            str | None,
            Callable[[], contextlib.AbstractContextManager[Service]],
        ]
    ] = [
        ("haproxy", haproxy.missing(), lambda: haproxy_peer(ctx, up.url, 2)),
        ("nginx", nginx.missing(), lambda: nginx_ceiling(ctx, up.url, 2)),
    ]
    for kind, missing, cm in starters:
        reason = why or missing
        if reason is None:
            try:
                peers[kind] = stack.enter_context(cm())
            except RuntimeError as err:
                reason = f"refused: {err}"[:2000]
        if reason is not None:
            for name, (group, text) in HEAD_TO_HEAD.items():
                if name.startswith(kind):
                    status = "error" if reason.startswith("refused") else "skipped"
                    record(ctx, name, group, text, status=status, reason=reason)
    return peers


def _head_to_head_runs(
    ctx: Ctx, up: Service, px: Service, peers: dict[str, Service], desc: dict[str, str]
) -> list[Run]:
    """The runs in the order their rounds alternate (a peer that did not start left out).

    Each GETs the small object with a bearer token and expects 200; the runs
    with a new token on every request never warm up (a warm-up would spend
    their tokens), and the proxy's counts its cache misses.
    """
    hp, ceiling = peers.get("haproxy"), peers.get("nginx")
    proxy_extra = {"workers": 2, "upstream": up.label}
    hp_extra = {"threads_server": 2, "upstream": up.label, "peer": hp and hp.label}
    h2h = {name: text for name, (_, text) in HEAD_TO_HEAD.items()}
    # (service, name, group, description, a new token every request, extra)
    plan = [
        (px, "proxy-cached-2", "proxy", desc["proxy-cached-2"], False, proxy_extra),
        (hp, "haproxy-cached", "peer", h2h["haproxy-cached"], False, hp_extra),
        (
            ceiling,
            "nginx-ceiling",
            "baseline",
            h2h["nginx-ceiling"],
            False,
            proxy_extra,
        ),
        (px, "proxy-cold-2", "proxy", desc["proxy-cold-2"], True, proxy_extra),
        (hp, "haproxy-cold", "peer", h2h["haproxy-cold"], True, hp_extra),
    ]
    return [
        Run(
            svc=svc,
            name=name,
            group=group,
            description=text,
            path=SMALL_PATH,
            tokens=ctx.cold_files if new else ctx.files["one"],
            mode="bearer",
            check="status",
            warmup=not new,
            counts=(lambda: cache_counts(px)) if new and svc is px else None,
            extra=extra,
        )
        for svc, name, group, text, new, extra in plan
        if svc is not None
    ]


def _stream_rss(ctx: Ctx, px: Service, up: Service, description: str) -> None:
    """Stream ``stream_bytes`` through the proxy; report its peak RSS growth."""
    import asyncio

    import aiohttp

    total = ctx.settings.stream_bytes
    token = ctx.files["one"].read_text().split()[0]
    pids = px.proc.pids()
    rss0 = rss_bytes(pids)
    peak = rss0
    got = 0

    async def go() -> None:
        nonlocal peak, got
        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(ssl=client_ssl())
            ) as session,
            session.get(
                f"{px.url}/big?bytes={total}",
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            resp.raise_for_status()
            async for chunk in resp.content.iter_chunked(1 << 20):
                got += len(chunk)
                if got % (16 << 20) < len(chunk):
                    peak = max(peak, rss_bytes(pids))

    started = time.perf_counter()
    asyncio.run(go())
    elapsed = time.perf_counter() - started
    peak = max(peak, rss_bytes(pids))
    record(
        ctx,
        "proxy-stream-rss",
        "scale",
        description,
        upstream=up.label,
        bytes=got,
        complete=got == total,
        rss_before_mb=round(rss0 / 2**20, 1),
        rss_growth_mb=round((peak - rss0) / 2**20, 1),
        throughput_mb_s=round(got / 2**20 / elapsed, 1),
    )


def _idle_watches(ctx: Ctx, px: Service, up: Service, description: str) -> None:
    """Hold ``watches`` idle watches open through the proxy; report MB per watch."""
    import asyncio

    import aiohttp

    n = ctx.settings.watches
    token = ctx.files["one"].read_text().split()[0]
    pids = px.proc.pids()
    rss0 = rss_bytes(pids)
    result: dict[str, Any] = {}

    async def go() -> None:
        conn = aiohttp.TCPConnector(ssl=client_ssl(), limit=0)
        timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
            responses: list[aiohttp.ClientResponse] = []
            sem = asyncio.Semaphore(100)

            async def one() -> None:
                async with sem:
                    resp = await session.get(
                        f"{px.url}{WATCH_PATH}",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    await resp.content.readline()
                    responses.append(resp)

            results = await asyncio.gather(
                *(one() for _ in range(n)), return_exceptions=True
            )
            await asyncio.sleep(1.0)
            result["open"] = sum(1 for r in responses if not r.closed)
            result["errors"] = sum(1 for r in results if isinstance(r, BaseException))
            result["rss_open"] = rss_bytes(pids)
            for r in responses:
                r.close()

    asyncio.run(go())
    growth = result["rss_open"] - rss0
    record(
        ctx,
        "proxy-idle-watches",
        "scale",
        description,
        upstream=up.label,
        watches=n,
        held=result["open"],
        errors=result["errors"],
        rss_growth_mb=round(growth / 2**20, 1),
        mb_per_watch=round(growth / 2**20 / max(1, result["open"]), 4),
    )
