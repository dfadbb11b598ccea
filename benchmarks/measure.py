"""Measuring: wrk runs against a started service, their median, the scenario's entry.

``measure`` runs one scenario; ``measure_interleaved`` runs several in
alternating rounds (A B C, A B C, ...) so that a change in the machine's load
falls on every peer a target compares. ``record`` appends a scenario's entry to
the run's report and prints its line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.context import Ctx
from benchmarks.drive import Load, run_wrk
from benchmarks.services import Service

__all__ = [
    "QUICK_SKIP",
    "Run",
    "load_fields",
    "measure",
    "measure_interleaved",
    "median_fields",
    "record",
    "skip",
]


def record(
    ctx: Ctx, name: str, group: str, description: str, **fields: Any
) -> dict[str, Any]:
    """Append a scenario's entry to the report (status "ok" unless ``fields`` say) and print it."""
    entry: dict[str, Any] = {
        "name": name,
        "group": group,
        "description": description,
        "status": "ok",
    }
    entry.update(fields)
    ctx.scenarios.append(entry)
    shown = entry.get("rps")
    extra = (
        f"{shown:,.0f} req/s" if isinstance(shown, float) else entry.get("reason", "")
    )
    print(f"  {name:32s} {entry['status']:8s} {extra}", flush=True)
    return entry


def skip(ctx: Ctx, name: str, group: str, description: str, reason: str) -> None:
    """Report a scenario that cannot run here, with why."""
    record(ctx, name, group, description, status="skipped", reason=reason)


def load_fields(result: dict[str, Any], load: Load) -> dict[str, Any]:
    """A wrk result as the report's fields (rps, latency in ms, errors, CPU, checks)."""
    lat = result["latency_us"]
    out = {
        "rps": round(result["rps"], 1),
        "requests": result["requests"],
        "duration_s": round(result["duration_us"] / 1e6, 3),
        "connections": load.connections,
        "threads": load.threads,
        "latency_ms": {
            k: round(lat[k] / 1000, 3)
            for k in ("p50", "p90", "p99", "p999", "mean", "max")
        },
        "non2xx": result["non2xx"],
        "socket_errors": result["socket_errors"],
    }
    if "server_cpu_us_per_request" in result:
        out["server_cpu_us_per_request"] = result["server_cpu_us_per_request"]
    if result.get("cpu_steal_share") is not None:
        out["cpu_steal_share"] = result["cpu_steal_share"]
    if result.get("checked"):
        out["checked"] = result["checked"]
        out["accepted"] = result["accepted"]
        out["refused"] = result["failures"]
    return out


#: Scenarios --quick leaves out: each runs exactly the harness code of another.
QUICK_SKIP = {
    "webhook-expired-replay-1": "webhook-badsig-replay-1",
    "proxy-expired-replay-2": "proxy-badsig-replay-2",
    "apache-expired-replay": "apache-badsig-replay",
    "apache-latency": "proxy-latency-1",
    "upstream-direct": "apache-cached",
}


@dataclass(frozen=True, kw_only=True)
class Run:
    """One scenario to measure: what ``measure`` takes, for ``measure_interleaved``."""

    svc: Service
    name: str
    group: str
    description: str
    path: str
    #: One file, or one per round (the cold path must never repeat a token,
    #: and every round starts its file from the top).
    tokens: Path | list[Path]
    mode: str = "review"
    check: str | None = None
    connections: int | None = None
    threads: int | None = None
    duration: float | None = None
    warmup: bool = True
    #: Counts the service's cache hits and misses: with it, each round is
    #: bracketed by a count and the entry gets ``cold_fraction``.
    counts: Callable[[], tuple[float, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: Seconds for a worker's per-second tally to reach the shared counters.
_TALLY_SETTLE = 1.2


def _plan(
    ctx: Ctx, runs: list[Run], rounds: int, out: dict[str, dict[str, Any]]
) -> list[tuple[Run, list[Load]]]:
    """Each run's wrk loads, one per round; --quick's skips go straight to ``out``."""
    s = ctx.settings
    plans: list[tuple[Run, list[Load]]] = []
    for run in runs:
        if s.quick and run.name in QUICK_SKIP:
            reason = f"--quick: the same harness code as {QUICK_SKIP[run.name]}"
            out[run.name] = record(
                ctx,
                run.name,
                run.group,
                run.description,
                status="skipped",
                reason=reason,
            )
            continue
        files = run.tokens if isinstance(run.tokens, list) else [run.tokens] * rounds
        loads = [
            Load(
                url=f"{run.svc.url}{run.path}",
                duration=run.duration or s.duration,
                connections=run.connections or s.connections,
                threads=run.threads or s.threads,
                mode=run.mode,
                tokens=f,
                check=run.check,
            )
            for f in files[:rounds]
        ]
        plans.append((run, loads))
    return plans


def _warm_up(ctx: Ctx, plans: list[tuple[Run, list[Load]]]) -> None:
    """``settings.warmup`` seconds of each run's first load, results thrown away."""
    s = ctx.settings
    for run, loads in plans:
        if run.warmup and s.warmup > 0:
            first = loads[0]
            run_wrk(
                Load(
                    url=first.url,
                    duration=s.warmup,
                    connections=first.connections,
                    threads=first.threads,
                    mode=first.mode,
                    tokens=first.tokens,
                )
            )


def _rounds(
    plans: list[tuple[Run, list[Load]]],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[float]]]:
    """Every round of every run in turn: wrk's results and cache hits/misses per run."""
    results: dict[str, list[dict[str, Any]]] = {run.name: [] for run, _ in plans}
    hits_misses: dict[str, list[float]] = {run.name: [0.0, 0.0] for run, _ in plans}
    for r in range(max((len(loads) for _, loads in plans), default=0)):
        for run, loads in plans:
            if r >= len(loads):
                continue
            if run.counts is not None:
                time.sleep(_TALLY_SETTLE)
                hit0, miss0 = run.counts()
            results[run.name].append(run_wrk(loads[r], run.svc.proc.pids()))
            if run.counts is not None:
                time.sleep(_TALLY_SETTLE)
                hit1, miss1 = run.counts()
                hits_misses[run.name][0] += hit1 - hit0
                hits_misses[run.name][1] += miss1 - miss0
    return results, hits_misses


def median_fields(done: list[dict[str, Any]], load: Load) -> dict[str, Any]:
    """The median round by throughput as the report's fields, with every round's rps."""
    median = sorted(done, key=lambda r: r["rps"])[len(done) // 2]
    fields = load_fields(median, load)
    if len(done) > 1:
        fields["rounds_rps"] = [round(r["rps"], 1) for r in done]
        # The hypervisor's share of each round (see procs.cpu_ticks): a round
        # far off the others with a high share was slowed by the machine.
        fields["rounds_steal_share"] = [r.get("cpu_steal_share") for r in done]
        fields["requests_all_rounds"] = sum(r["requests"] for r in done)
    return fields


def _median_fields(
    run: Run, load: Load, done: list[dict[str, Any]], hits_misses: list[float]
) -> dict[str, Any]:
    """``median_fields``, and the cold fraction when the run counts its cache."""
    fields = median_fields(done, load)
    if run.counts is not None:
        hit, miss = hits_misses
        fields["cold_fraction"] = round(miss / (hit + miss), 4) if hit + miss else None
    return fields


def measure_interleaved(
    ctx: Ctx, runs: list[Run], rounds: int = 1
) -> dict[str, dict[str, Any]]:
    """Warm every run up, then run their rounds in turn (A B C, A B C, ...).

    Peers compared by a target are measured in alternation, so a change in
    the machine's load during the group falls on all of them instead of on
    whichever ran last. Each entry reports the median round by throughput.
    """
    out: dict[str, dict[str, Any]] = {}
    plans = _plan(ctx, runs, rounds, out)
    _warm_up(ctx, plans)
    results, hits_misses = _rounds(plans)
    for run, loads in plans:
        fields = _median_fields(run, loads[0], results[run.name], hits_misses[run.name])
        out[run.name] = record(
            ctx, run.name, run.group, run.description, **fields, **run.extra
        )
    return out


def measure(
    ctx: Ctx,
    svc: Service,
    name: str,
    group: str,
    description: str,
    *,
    path: str,
    tokens: Path | list[Path],
    mode: str = "review",
    check: str | None = None,
    connections: int | None = None,
    threads: int | None = None,
    duration: float | None = None,
    warmup: bool = True,
    rounds: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """Warm up, run wrk ``rounds`` times against ``svc``, record the median."""
    run = Run(
        svc=svc,
        name=name,
        group=group,
        description=description,
        path=path,
        tokens=tokens,
        mode=mode,
        check=check,
        connections=connections,
        threads=threads,
        duration=duration,
        warmup=warmup,
        extra=extra,
    )
    return measure_interleaved(ctx, [run], rounds)[name]
