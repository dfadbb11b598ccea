"""The report of a run: ``report.json``, the plot, the console summary, the log tails.

``assemble`` puts a run's scenarios and targets beside what ran them (the
machine, the versions, the settings); ``write_plot`` draws throughput and
p50/p99 per scenario, baselines and peers beside ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import apache, haproxy, nginx
from benchmarks.context import GATE, Ctx, Settings
from benchmarks.drive import wrk_path
from benchmarks.targets import compute_targets

__all__ = [
    "SCHEMA",
    "assemble",
    "keep_log_tails",
    "print_targets",
    "upstream_summary",
    "write_plot",
    "write_report",
]

SCHEMA = 1


def _versions() -> dict[str, str]:
    """What ran: Python, the libraries, the build of the service, wrk and the peers."""
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in (
        "aiohttp",
        "uvloop",
        "cryptography",
        "pyjwt",
        "cachetools",
        "kube-oidc-gate",
    ):
        with contextlib.suppress(Exception):
            out[pkg] = version(pkg)
    # Which build of the service ran: the mypyc-compiled wheel (``make bench``
    # runs it from build/compiled) or the plain sources.
    res = subprocess.run(
        [GATE, "--version"], check=False, capture_output=True, text=True, timeout=30
    )
    out["kube-oidc-gate build"] = (
        "compiled" if "(compiled: yes)" in res.stdout else "plain Python"
    )
    wrk = wrk_path()
    if wrk:
        res = subprocess.run(
            [wrk, "--version"], check=False, capture_output=True, text=True, timeout=5
        )
        out["wrk"] = (res.stdout or res.stderr).split("\n")[0].split(" [")[0]
    binary = apache.apache_binary()
    if binary:
        res = subprocess.run(
            [binary, "-v"], check=False, capture_output=True, text=True, timeout=5
        )
        out["apache"] = res.stdout.split("\n")[0].replace("Server version: ", "")
        with contextlib.suppress(Exception):
            res = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "libapache2-mod-auth-openidc"],
                check=False,
                capture_output=True,
                text=True,
                timeout=5,
            )
            if res.returncode == 0:
                out["mod_auth_openidc"] = res.stdout.strip()
    binary = nginx.nginx_binary()
    if binary:
        with contextlib.suppress(Exception):
            out["nginx"] = nginx.version(binary).removeprefix("nginx ")
    binary = haproxy.haproxy_binary()
    if binary:
        with contextlib.suppress(Exception):
            out["haproxy"] = haproxy.version(binary).removeprefix("HAProxy ")
    return out


def _machine() -> dict[str, Any]:
    """CPUs, memory and kernel: absolute figures follow them."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "versions": _versions(),
    }


def assemble(
    ctx: Ctx, settings: Settings, *, stamp: str, elapsed_s: float
) -> dict[str, Any]:
    """The report's document: header, machine, settings, scenarios and targets."""
    return {
        "schema": SCHEMA,
        "tool": "kube-oidc-gate benchmarks",
        "mode": "quick" if settings.quick else "full",
        "started": stamp,
        "elapsed_s": elapsed_s,
        "machine": _machine(),
        "settings": {k: v for k, v in vars(settings).items()},
        "upstream": ctx.upstream or None,
        "scenarios": ctx.scenarios,
        "targets": compute_targets(ctx.scenarios),
    }


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``out/report.json``, indented; returns its path."""
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """Throughput and p50/p99 per scenario, baselines and peer beside ours."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [s for s in report["scenarios"] if s.get("status") == "ok" and "rps" in s]
    if not rows:
        return False
    colors = {
        "baseline": "#7f7f7f",
        "webhook": "#1f77b4",
        "proxy": "#2ca02c",
        "peer": "#d62728",
        "resilience": "#9467bd",
    }
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(14, max(4, 0.38 * len(rows) + 1.5)), sharey=True
    )
    ys = range(len(rows))
    ax1.barh(
        ys,
        [r["rps"] for r in rows],
        color=[colors.get(r["group"], "#8c564b") for r in rows],
    )
    for y, r in zip(ys, rows, strict=True):
        ax1.text(r["rps"], y, f" {r['rps']:,.0f}", va="center", fontsize=7)
    ax1.set_yticks(list(ys), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("requests per second")
    ax1.set_title("throughput")
    p50 = [r["latency_ms"]["p50"] for r in rows]
    p99 = [r["latency_ms"]["p99"] for r in rows]
    ax2.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50", color="#17becf")
    ax2.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99", color="#bcbd22")
    ax2.set_xscale("log")
    ax2.set_xlabel("latency, ms (log)")
    ax2.set_title("latency")
    ax2.legend(loc="lower right", fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"kube-oidc-gate benchmarks ({report['mode']}): {m['nproc']} CPUs, Python {m['versions'].get('python')}, "
        f"aiohttp {m['versions'].get('aiohttp')}, uvloop {m['versions'].get('uvloop')}, "
        f"{m['versions'].get('kube-oidc-gate build', '?')} build; grey = baselines and the nginx ceiling, "
        "red = peers (Apache + mod_auth_openidc, HAProxy + jwt_verify)"
        f"\n{upstream_summary(report)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def upstream_summary(report: dict[str, Any]) -> str:
    """One line: what the proxy and Apache forwarded to (the plot title, the console)."""
    up = report.get("upstream") or {}
    if not up.get("shared"):
        return "upstream: not used in this run"
    line = f"upstream of proxy, Apache and upstream-direct: {up['shared']}"
    if up.get("fallback_reason"):
        line += f" (fallback: {up['fallback_reason']})"
    if up.get("streams_and_watches"):
        line += f"; stream and watches: {up['streams_and_watches']}"
    return line


def print_targets(targets: list[dict[str, Any]]) -> None:
    """The targets on the console, by target number; lower case when informational."""
    print("\ntargets:")
    for t in sorted(targets, key=lambda t: t["target"]):
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        if t.get("informational"):
            mark = mark.lower()
        print(
            f"  [{mark}] T{t['target']} {t['check']}: {t['value']} ({t['op']} {t['threshold']})"
        )
        if t.get("invalid"):
            print(f"         not judged: {t['invalid']}")


def keep_log_tails(work: Path, out: Path) -> None:
    """Copy the last 200 lines of every service log into ``out/logs``."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for log in work.glob("*.log"):
        # Keep the tail only: full runs write a JSON line per request.
        lines = log.read_text(errors="replace").splitlines()[-200:]
        (logs / log.name).write_text("\n".join(lines) + "\n")
