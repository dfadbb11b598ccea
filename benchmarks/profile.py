"""Profile a server under wrk load with py-spy and say where its time goes.

    .venv/bin/python -m benchmarks.profile webhook-cached
    .venv/bin/python -m benchmarks.profile webhook-cold --seconds 6
    .venv/bin/python -m benchmarks.profile proxy-cached

    .venv/bin/python -m benchmarks.profile proxy-cached --perf   # compiled code

The same services as ``benchmarks.run`` (local issuer, upstream, TLS), one
worker, 64 connections. py-spy samples the worker (``--rate`` per second,
each sample briefly pauses it) and this prints the share of
samples per function, self and inclusive, and writes the raw collapsed stacks
(flamegraph input) next to the report. Shares are of the samples taken while
the worker ran Python or C code called from Python; idle time is not sampled.

py-spy sees Python frames only, so the modules mypyc compiled (the request
path of the build the image ships) are invisible to it. ``--perf`` samples
with Linux ``perf`` and DWARF call graphs instead: every frame is native
there (the interpreter's, OpenSSL's, the kernel's, and each compiled
function as ``CPyDef_<module>___<function>``), and the summary gives the
share of samples per library and the inclusive share per compiled function.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.context import REPO, REVIEW, SMALL_PATH, Settings, make_ctx, prepare
from benchmarks.drive import Load, finish_wrk, start_wrk
from benchmarks.procs import stop_all
from benchmarks.services import (
    gate_proxy,
    shared_upstream,
    start_issuer,
    upstream_server,
    webhook,
)

__all__ = ["main", "summarize"]

TARGETS = (
    "webhook-cached",
    "webhook-cold",
    "webhook-random-kid",
    "proxy-cached",
    "proxy-cold",
    "proxy-badsig",
)


def _frame(raw: str) -> str:
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def summarize(collapsed: Path, top: int = 30) -> str:
    """Self and inclusive shares per function from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n"
    lines = [f"samples: {total}", "", "self:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in incl.most_common(top * 2)]
    return "\n".join(lines) + "\n"


#: A generator's symbol ends in ``_gen`` (a function) or ``_<Class>_gen`` (a
#: method), then mypyc's helper suffix.
_GENERATOR = re.compile(
    r"(?:_(_?[A-Z][A-Za-z0-9]*))?_gen(?:_+mypyc_generator_helper_+)?$"
)


def _perf_name(symbol: str) -> str:
    """``module.Class.method`` for a compiled function's symbol, else ``symbol``.

    mypyc names them ``CPyDef_<module>___<Class>___<method>`` or
    ``CPyDef_<module>___<function>``; a coroutine's body is
    ``CPyDef_<module>___<function>[_<Class>]_gen_____mypyc_generator_helper__``.
    """
    for prefix in ("CPyDef_", "CPyPy_"):
        if symbol.startswith(prefix):
            rest = symbol[len(prefix) :]
            break
    else:
        return symbol
    module, sep, tail = rest.partition("___")
    if not sep or not tail:
        return symbol
    generator = _GENERATOR.search(tail)
    if generator is not None:
        tail = tail[: generator.start()]
        if generator.group(1):
            # ``_serve__ProxyHandler``: the name, ``_``, then the class.
            return f"{module}.{generator.group(1)}.{tail}"
    if "___" in tail:
        cls, _, method = tail.partition("___")
        return f"{module}.{cls}.{method}"
    return f"{module}.{tail}"


def _library(frame: str) -> str:
    return frame.rpartition(" (")[2].rstrip(")").rsplit("/", 1)[-1]


def summarize_perf(script: str, top: int = 40) -> str:
    """Shares per library (self) and per compiled function (inclusive) from
    ``perf script`` output: one block per sample, leaf frame first.
    """
    libraries: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for block in script.split("\n\n"):
        frames = [
            line.split(None, 1)[1]
            for line in block.splitlines()
            if line.startswith(("\t", " ")) and len(line.split(None, 1)) == 2
        ]
        if not frames:
            continue
        total += 1
        # An inlined frame names no library: the one it was inlined into does.
        leaf = next((f for f in frames if _library(f) != "inlined"), frames[0])
        libraries[_library(leaf)] += 1
        symbols = {f.split("+0x")[0].split(" (")[0] for f in frames}
        names = {_perf_name(s) for s in symbols if s.startswith(("CPyDef_", "CPyPy_"))}
        for name in names:
            if not name.startswith("CPy"):
                inclusive[name] += 1
    if not total:
        return "no samples\n"
    lines = [f"samples: {total}", "", "self, by library:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in libraries.most_common(15)]
    lines += ["", "inclusive, by compiled function:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Start the target, load it, sample it, print the summary."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--seconds", type=float, default=5.0, help="Sampling time.")
    parser.add_argument("--rate", type=int, default=200, help="Samples per second.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--native",
        action="store_true",
        help="Sample C frames too (py-spy --native): time in OpenSSL, uvloop or "
        "a system call is then credited to it, not to the Python line calling it.",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="Sample with Linux perf and DWARF call graphs instead of py-spy: "
        "sees the mypyc-compiled functions (run it in build/compiled).",
    )
    ns = parser.parse_args(argv)
    if ns.perf:
        sampler = shutil.which("perf") or ""
        missing = "perf is not installed (Debian: linux-perf)"
    else:
        sampler = shutil.which("py-spy") or str(
            Path(sys.executable).with_name("py-spy")
        )
        missing = "py-spy is not installed (pip install py-spy)"
    if not sampler or not Path(sampler).exists():
        print(f"error: {missing}", file=sys.stderr)
        return 2
    seconds = min(max(ns.seconds, 1.0), 60.0)
    # A new token for every request of one worker (at most ~5,000/s here);
    # minting the full run's pool would take longer than the profile.
    settings = dataclasses.replace(
        Settings.make(False, seconds + 3, 1), cold_pool=int((seconds + 3) * 6000)
    )
    ctx = make_ctx(settings, ns.out)
    ns.out.mkdir(parents=True, exist_ok=True)
    raw = ns.out / f"profile-{ns.target}.txt"
    try:
        prepare(ctx)
        start_issuer(ctx)
        if ns.target.startswith("webhook"):
            tokens = {
                "webhook-cold": ctx.cold_files[0],
                "webhook-random-kid": ctx.files["random-kid"],
            }.get(ns.target, ctx.files["one"])
            with webhook(ctx, 1, "webhook-profile") as svc:
                _sample(
                    sampler,
                    svc.proc.pid,
                    f"{svc.url}{REVIEW}",
                    "review",
                    tokens,
                    seconds,
                    ns.rate,
                    raw,
                    native=ns.native,
                    perf=ns.perf,
                )
        else:
            tokens = {
                "proxy-cold": ctx.cold_files[0],
                "proxy-badsig": ctx.files["badsig-one"],
            }.get(ns.target, ctx.files["one"])
            # The upstream of the proxy scenarios: nginx when installed.
            with (
                upstream_server(ctx) as aio,
                shared_upstream(ctx, aio) as up,
                gate_proxy(ctx, up.url, 1, "proxy-profile") as px,
            ):
                _sample(
                    sampler,
                    px.proc.pid,
                    f"{px.url}{SMALL_PATH}",
                    "bearer",
                    tokens,
                    seconds,
                    ns.rate,
                    raw,
                    native=ns.native,
                    perf=ns.perf,
                )
    finally:
        stop_all()
        shutil.rmtree(ctx.work, ignore_errors=True)
    text = summarize_perf(raw.read_text()) if ns.perf else summarize(raw)
    (raw.with_suffix(".summary.txt")).write_text(text)
    print(text)
    print(f"raw stacks: {raw}")
    return 0


def _sample(
    sampler: str,
    pid: int,
    url: str,
    mode: str,
    tokens: Path,
    seconds: float,
    rate: int,
    raw: Path,
    *,
    native: bool = False,
    perf: bool = False,
) -> None:
    load = Load(url=url, duration=seconds + 2, mode=mode, tokens=tokens)
    wrk = start_wrk(load)
    try:
        time.sleep(1.0)
        if perf:
            _perf_record(sampler, pid, seconds, raw)
            return
        subprocess.run(
            [
                sampler,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(raw),
                *(["--native"] if native else []),
            ],
            check=True,
            capture_output=True,
            timeout=seconds + 30,
        )
    finally:
        result = finish_wrk(wrk, load)
    print(f"{result['rps']:,.0f} req/s under the sampler", flush=True)


def _perf_record(perf: str, pid: int, seconds: float, raw: Path) -> None:
    """``perf record`` of ``pid`` for ``seconds``, its ``perf script`` into ``raw``."""
    data = raw.with_suffix(".perf")
    subprocess.run(
        [
            perf,
            "record",
            "--freq",
            "499",
            "--call-graph",
            "dwarf,16384",
            "--pid",
            str(pid),
            "--output",
            str(data),
            "--",
            "sleep",
            str(int(seconds)),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )
    try:
        with raw.open("w") as out:
            subprocess.run(
                [perf, "script", "--input", str(data)],
                check=True,
                stdout=out,
                stderr=subprocess.DEVNULL,
                timeout=600,
            )
    finally:
        # DWARF unwinding stores a copy of the sampled stack with each sample,
        # and a stack may hold a token's bytes: only the symbols are kept.
        data.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
