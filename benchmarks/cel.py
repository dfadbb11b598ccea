"""CEL compile and evaluation time per expression, with a JSON report and a plot.

    .venv/bin/python -m benchmarks.cel                 # about 10 seconds
    .venv/bin/python -m benchmarks.cel --quick         # CI: every expression, well under a second
    .venv/bin/python -m benchmarks.cel --baseline benchmarks/report/cel-celpy.json

It drives only ``proxy.cel``'s public interface (``compile_expression`` and
``CompiledExpression.evaluate``), the calls ``proxy.config`` makes once per
expression at start-up and ``proxy.claims`` makes once per expression for every
new token, so the same module measured the interpreter it replaced
(``benchmarks/report/cel-celpy.json``) and measures the runtime in use.

Each expression is one that ``AuthenticationConfiguration`` files use (the
Kubernetes documentation's examples and the rules of issue 20), evaluated
against one realistic set of claims (or the mapped user). ``compile_us`` is the
median of ``compile_expression`` calls after a first one (``first_compile_ms``,
reported separately, also builds what a runtime builds once per process);
``eval_us`` is the median over rounds of the mean of a tight loop of
``evaluate`` calls, conversion of the claims included; ``eval_shared_us`` the
same with one ``Variables`` per token shared by its expressions, as
``proxy.claims`` evaluates (``convert_claims_us`` is that conversion, paid once
per token; the interpreter it replaced had no such step). An expression the
runtime cannot compile or evaluate is reported with ``status: "error"`` and the
message, not dropped. ``--baseline`` puts another report's figures beside
these in the plot and in ``speedup`` (baseline time / this time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["EXPRESSIONS", "main", "run"]

REPO = Path(__file__).resolve().parent.parent
SCHEMA = 1

_NOW = 1_750_000_000
CLAIMS: dict[str, Any] = {
    "iss": "https://issuer.example.com",
    "sub": "00u1a2b3c4d5e6f7g8h9",
    "aud": ["kubernetes"],
    "exp": _NOW + 3600,
    "nbf": _NOW - 60,
    "iat": _NOW - 60,
    "email": "jane.doe@example.com",
    "email_verified": True,
    "hd": "example.com",
    "is_admin": True,
    "roles": "reader, writer,auditor",
    "other_roles": "deployer ,operator",
    "groups": [f"team-{i:02d}" for i in range(20)] + ["admins"],
    "kubernetes.io": {"namespace": "payments"},
}
USER: dict[str, Any] = {
    "username": "oidc:jane.doe@example.com",
    "uid": "00u1a2b3c4d5e6f7g8h9",
    "groups": [f"oidc:team-{i:02d}" for i in range(20)],
    "extra": {"example.org/foo": ["bar"]},
}


@dataclass(frozen=True, slots=True)
class Case:
    """One expression as a configuration file would hold it."""

    name: str
    variable: str
    source: str


EXPRESSIONS: tuple[Case, ...] = (
    Case("username-claim", "claims", "claims.email"),
    Case("username-prefixed", "claims", '"oidc:" + claims.sub'),
    Case("optional-or-value", "claims", "claims.?email_verified.orValue(false)"),
    Case("rule-lifetime", "claims", "claims.exp - claims.nbf <= 86400"),
    Case("rule-has", "claims", 'has(claims.hd) && claims.hd == "example.com"'),
    Case("groups-map-21", "claims", 'claims.groups.map(g, "oidc:" + g)'),
    Case(
        "groups-split-trim",
        "claims",
        '(claims.roles.split(",") + claims.other_roles.split(",")).map(r, r.trim())',
    ),
    Case("ternary-parenthesised", "claims", '(claims.is_admin) ? "true" : ""'),
    Case("escape-dot", "claims", "claims.kubernetes__dot__io.namespace"),
    Case("sets-intersects", "claims", 'sets.intersects(claims.groups, ["admins"])'),
    Case("user-not-in", "user", "!('bar' in user.groups)"),
    Case("user-prefix", "user", '!user.username.startsWith("system:")'),
    Case("user-all-20", "user", 'user.groups.all(g, !g.startsWith("system:"))'),
)


def _data(case: Case) -> dict[str, object]:
    return {"claims": CLAIMS} if case.variable == "claims" else {"user": USER}


def _median_loop(fn: Any, loops: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``loops`` calls, in µs."""
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        means.append((time.perf_counter() - started) / loops * 1e6)
    return statistics.median(means)


def _runtime() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cel-expr-python", "cel-python", "lark", "kube-oidc-gate"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def measure(case: Case, *, quick: bool) -> dict[str, Any]:
    """Compile and evaluate one expression; its row of the report."""
    from proxy.cel import compile_expression
    from proxy.errors import ProxyError

    row: dict[str, Any] = {
        "name": case.name,
        "variable": case.variable,
        "expression": case.source,
    }
    path = f"bench.{case.name}"

    def compile_once() -> Any:
        return compile_expression(
            case.source, variables=(case.variable,), field_path=path
        )

    try:
        compiled = compile_once()
    except ProxyError as err:
        row.update(status="error", stage="compile", error=str(err))
        return row
    row["compile_us"] = round(
        _median_loop(compile_once, 3 if quick else 50, 3 if quick else 7), 2
    )
    data = _data(case)
    try:
        row["result"] = compiled.evaluate(data)
    except ProxyError as err:
        row.update(status="error", stage="evaluate", error=str(err))
        return row
    loops, rounds = (20, 3) if quick else (2000, 7)
    row["eval_us"] = round(
        _median_loop(lambda: compiled.evaluate(data), loops, rounds), 2
    )
    variables = _variables_class()
    if variables is not None:
        # As proxy.claims evaluates: the token's variables converted once,
        # shared by all of its expressions.
        shared = variables(data)
        compiled.evaluate(shared)
        row["eval_shared_us"] = round(
            _median_loop(lambda: compiled.evaluate(shared), loops, rounds), 2
        )
    row["status"] = "ok"
    return row


def _variables_class() -> Any:
    """``proxy.cel.Variables`` where the runtime has it (not the old interpreter)."""
    import proxy.cel

    return getattr(proxy.cel, "Variables", None)


def convert_us(*, quick: bool) -> float | None:
    """Converting one token's claims for the runtime, once per token (µs)."""
    variables = _variables_class()
    if variables is None:
        return None
    loops, rounds = (20, 3) if quick else (2000, 7)
    return round(
        _median_loop(
            lambda: variables({"claims": CLAIMS}).activation("claims"), loops, rounds
        ),
        2,
    )


def run(*, quick: bool) -> dict[str, Any]:
    """The report: the runtime's versions and one row per expression."""
    started = time.perf_counter()
    from proxy.cel import compile_expression

    first = time.perf_counter()
    compile_expression("claims.sub", variables=("claims",), field_path="bench.first")
    first_ms = (time.perf_counter() - first) * 1e3
    rows = [measure(case, quick=quick) for case in EXPRESSIONS]
    return {
        "schema": SCHEMA,
        "tool": "kube-oidc-gate CEL benchmark",
        "mode": "quick" if quick else "full",
        "started": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release()},
        "versions": _runtime(),
        "first_compile_ms": round(first_ms, 2),
        "convert_claims_us": convert_us(quick=quick),
        "expressions": rows,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


def _label(report: dict[str, Any]) -> str:
    v = report["versions"]
    if "cel-expr-python" in v and report.get("runtime") != "cel-python":
        return report.get("runtime") or f"cel-expr-python {v['cel-expr-python']}"
    return report.get("runtime") or f"cel-python {v.get('cel-python', '?')}"


def add_speedup(report: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Baseline time / this time, per expression and stage, where both ran."""
    before = {row["name"]: row for row in baseline["expressions"]}
    for row in report["expressions"]:
        old = before.get(row["name"])
        if old is None:
            continue
        speedup: dict[str, float | None] = {}
        for key in ("compile_us", "eval_us"):
            if key in row and key in old and row[key] > 0:
                speedup[key.removesuffix("_us")] = round(old[key] / row[key], 1)
            else:
                speedup[key.removesuffix("_us")] = None
        row["baseline"] = {
            "status": old.get("status"),
            "compile_us": old.get("compile_us"),
            "eval_us": old.get("eval_us"),
            "error": old.get("error"),
        }
        row["speedup"] = speedup


def write_plot(
    report: dict[str, Any], path: Path, baseline: dict[str, Any] | None
) -> bool:
    """Compile and evaluation time per expression (log scale), beside a baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["expressions"]
    names = [r["name"] for r in rows]
    old = {r["name"]: r for r in (baseline or {}).get("expressions", [])}
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.4 * len(rows) + 2), sharey=True)
    ys = range(len(rows))
    for ax, key, title in (
        (axes[0], "compile_us", "compile (start-up), µs"),
        (axes[1], "eval_us", "evaluate (per token), µs"),
    ):
        height = 0.4 if baseline else 0.8
        ours = [r.get(key, 0) for r in rows]
        ax.barh(
            [y + (0.2 if baseline else 0) for y in ys],
            ours,
            height=height,
            color="#2ca02c",
            label=_label(report),
        )
        if baseline:
            theirs = [old.get(n, {}).get(key, 0) for n in names]
            ax.barh(
                [y - 0.2 for y in ys],
                theirs,
                height=height,
                color="#7f7f7f",
                label=_label(baseline),
            )
            for y, n in zip(ys, names, strict=True):
                if old.get(n, {}).get("status") == "error":
                    ax.text(
                        0.01,
                        y - 0.2,
                        "error",
                        va="center",
                        fontsize=7,
                        transform=ax.get_yaxis_transform(),
                    )
        shared = [r.get("eval_shared_us") for r in rows]
        if key == "eval_us" and all(shared):
            ax.scatter(
                shared,
                [y + (0.2 if baseline else 0) for y in ys],
                marker="|",
                s=120,
                color="black",
                label="variables shared per token",
                zorder=3,
            )
        ax.set_xscale("log")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_yticks(list(ys), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"kube-oidc-gate CEL ({report['mode']}): Python {report['versions']['python']}, "
        f"{report['machine']['nproc']} CPUs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Measure, write ``cel.json`` (and ``cel.png``) under ``--out``, print a table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="Few loops (CI).")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Report directory (default benchmarks/results/cel-<time>).",
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="Another run's cel.json to compare."
    )
    parser.add_argument(
        "--runtime",
        default=None,
        help="Label of this run in the plot (default: the runtime's name).",
    )
    ns = parser.parse_args(argv)
    baseline = json.loads(ns.baseline.read_text()) if ns.baseline else None
    report = run(quick=ns.quick)
    if ns.runtime:
        report["runtime"] = ns.runtime
    if baseline is not None:
        add_speedup(report, baseline)
        report["baseline"] = {"file": str(ns.baseline), "runtime": _label(baseline)}
    out = ns.out or REPO / "benchmarks" / "results" / f"cel-{report['started']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cel.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = write_plot(report, out / "cel.png", baseline)
    print(f"first compile: {report['first_compile_ms']} ms")
    print(f"claims conversion per token: {report['convert_claims_us']} µs")
    print(
        f"{'expression':24} {'compile µs':>11} {'eval µs':>9} {'shared µs':>9}  status"
    )
    for row in report["expressions"]:
        print(
            f"{row['name']:24} {row.get('compile_us', '-'):>11} "
            f"{row.get('eval_us', '-'):>9} {row.get('eval_shared_us', '-'):>9}  "
            f"{row['status']}" + (f" ({row['error']})" if row["status"] != "ok" else "")
        )
    print(
        f"\nreport: {out / 'cel.json'}"
        + (f"\nplot:   {out / 'cel.png'}" if plotted else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
