"""Run every benchmark scenario and write a JSON report and a PNG plot.

    .venv/bin/python -m benchmarks.run            # the full run (about 10 minutes)
    .venv/bin/python -m benchmarks.run --quick    # every code path, a few seconds each

Everything runs on loopback, started here and stopped by PID: a local issuer
(discovery + JWKS over http, the JWKS also over https for Apache), the bare
aiohttp + uvloop echo server (the baseline), kube-oidc-gate's webhook, and its
proxy and Apache + mod_auth_openidc (when installed) in front of the same local
nginx, as issue 7 specifies. Without nginx the aiohttp stand-in upstream takes
its place (the report says which served each scenario); that one also serves
the streamed body and the idle watches, which nginx does not implement.
``wrk`` drives the load (64 connections, 2 threads) with ``load.lua``.

Only ratios measured in the same run mean anything: absolute figures follow the
machine and whatever else runs on it. The report says which issue-7 targets a
run met; a scenario that cannot run here is listed with its reason.

The parts: ``context.py`` (sizes, keys, tokens), ``services.py`` (the servers
under test and the peers), ``measure.py`` (wrk rounds and their median),
``scenarios.py`` and ``proxy_scenarios.py`` (the scenario groups),
``targets.py`` (the targets as a table and their evaluator) and ``report.py``
(report.json, the plot); this module is the command line that runs them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from pathlib import Path

from benchmarks.context import REPO, Ctx, Settings, make_ctx, prepare
from benchmarks.drive import wrk_path
from benchmarks.measure import record
from benchmarks.procs import stop_all
from benchmarks.report import (
    assemble,
    keep_log_tails,
    print_targets,
    upstream_summary,
    write_plot,
    write_report,
)
from benchmarks.scenarios import GROUPS
from benchmarks.services import start_issuer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Tiny durations and sizes (CI): every code path, seconds in all.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Report directory (default benchmarks/results/<time>).",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="Seconds per load run (default 8; 1 with --quick).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="Runs of each headline scenario, median reported (default 3; 1 with --quick).",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"Comma-separated groups to run (of {', '.join(GROUPS)}).",
    )
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="Keep the temporary directory (logs, tokens, configs).",
    )
    return parser


def _refusal(ns: argparse.Namespace) -> str | None:
    """Why the command line cannot run, or None."""
    if wrk_path() is None:
        return "wrk is not installed (Debian: apt-get install -y wrk)"
    if ns.rounds is not None and not 1 <= ns.rounds <= 9:
        return "--rounds must be between 1 and 9"
    if ns.duration is not None and not 0.5 <= ns.duration <= 60:
        return "--duration must be between 0.5 and 60 seconds"
    unknown = [g for g in _only(ns) if g not in GROUPS]
    if unknown:
        return f"unknown groups {unknown}"
    return None


def _only(ns: argparse.Namespace) -> list[str]:
    return [g.strip() for g in ns.only.split(",") if g.strip()]


def _run_groups(ctx: Ctx, only: list[str]) -> int:
    """Every selected group in turn; returns how many failed (each recorded as an error)."""
    errors = 0
    for name, fn in GROUPS.items():
        if only and name not in only:
            continue
        print(f"[{name}]", flush=True)
        group_started = time.perf_counter()
        try:
            fn(ctx)
        except Exception as err:
            errors += 1
            record(
                ctx,
                f"{name}-group",
                name,
                "the scenario group failed",
                status="error",
                reason=f"{type(err).__name__}: {err}"[:2000],
            )
        print(f"  ({time.perf_counter() - group_started:.1f}s)", flush=True)
    return errors


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every scenario ran (targets met or not)."""
    ns = _parser().parse_args(argv)
    refusal = _refusal(ns)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    settings = Settings.make(ns.quick, ns.duration, ns.rounds)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ns.out or REPO / "benchmarks" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    ctx = make_ctx(settings, out)
    work = ctx.work
    t0 = time.perf_counter()
    print(
        f"benchmarks ({'quick' if ns.quick else 'full'}): work dir {work}", flush=True
    )
    try:
        prepare(ctx)
        start_issuer(ctx)
        errors = _run_groups(ctx, _only(ns))
    finally:
        stop_all()
    report = assemble(
        ctx, settings, stamp=stamp, elapsed_s=round(time.perf_counter() - t0, 1)
    )
    path = write_report(report, out)
    plotted = write_plot(report, out / "report.png")
    print_targets(report["targets"])
    print(f"\n{upstream_summary(report)}")
    print(f"\nreport: {path}" + (f"\nplot:   {out / 'report.png'}" if plotted else ""))
    print(f"elapsed {report['elapsed_s']}s")
    keep_log_tails(work, out)
    if not ns.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
