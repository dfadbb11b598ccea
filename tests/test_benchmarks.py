"""The benchmark harness: its --quick run works end to end and its report keeps its shape.

Figures are never asserted (a CI machine's numbers mean nothing); the shape of
the report, the presence of every scenario and the target bookkeeping are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run import compute_targets

REPO = Path(__file__).resolve().parent.parent

#: Scenarios a --quick run always reports (ok, or skipped with a reason).
EXPECTED = [
    "echo-1",
    "echo-2",
    "webhook-cached-1",
    "webhook-cold-1",
    "webhook-badsig-replay-1",
    "webhook-expired-replay-1",
    "webhook-badsig-distinct-1",
    "webhook-cached-2",
    "webhook-rotation-1",
    "webhook-valid-undisturbed-1",
    "webhook-valid-under-flood-1",
    "cache-distinct-tokens",
    "proxy-cached-1",
    "proxy-cached-2",
    "proxy-latency-1",
    "proxy-badsig-replay-2",
    "proxy-expired-replay-2",
    "proxy-stream-rss",
    "proxy-idle-watches",
    "apache-cached",
    "apache-latency",
    "apache-badsig-replay",
    "apache-expired-replay",
]
#: Scenarios that never depend on optional software: they must have run.
ALWAYS_OK = [
    "echo-1",
    "echo-2",
    "webhook-cached-1",
    "webhook-cold-1",
    "webhook-cached-2",
    "webhook-rotation-1",
    "webhook-valid-under-flood-1",
    "cache-distinct-tokens",
]


@pytest.fixture(scope="module")
def quick_report(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (Debian package wrk)")
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    return report, out


@pytest.mark.slow
def test_quick_report_header(quick_report: tuple[dict[str, Any], Path]) -> None:
    report, out = quick_report
    assert report["schema"] == 1
    assert report["mode"] == "quick"
    machine = report["machine"]
    assert isinstance(machine["nproc"], int)
    assert machine["nproc"] >= 1
    for pkg in ("python", "aiohttp", "uvloop", "cryptography", "wrk"):
        assert machine["versions"][pkg], pkg
    assert report["settings"]["quick"] is True
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_report_scenarios(quick_report: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_report
    by_name = {s["name"]: s for s in report["scenarios"]}
    assert [s for s in report["scenarios"] if s["status"] == "error"] == []
    assert sorted(n for n in EXPECTED if n not in by_name) == []
    for name in ALWAYS_OK:
        assert by_name[name]["status"] == "ok", by_name[name]
    for s in report["scenarios"]:
        assert s["status"] in ("ok", "skipped"), s
        assert s["group"]
        assert s["description"]
        if s["status"] == "skipped":
            assert s["reason"], s
        if s["status"] == "ok" and "rps" in s:
            assert s["requests"] > 0, s
            assert s["rps"] > 0, s
            assert set(s["latency_ms"]) >= {"p50", "p90", "p99"}
            assert s["socket_errors"] == 0, s
    cold = by_name["webhook-cold-1"]
    assert 0 < cold["cold_fraction"] <= 1
    assert cold["accepted"] == cold["checked"]
    rotation = by_name["webhook-rotation-1"]
    assert rotation["sent_after_switch"] > 0
    assert by_name["cache-distinct-tokens"]["bytes_per_entry"] > 0


@pytest.mark.slow
def test_quick_report_targets(quick_report: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_report
    targets = report["targets"]
    assert {t["target"] for t in targets} == {"1", "2", "3", "4", "5", "6"}
    for t in targets:
        assert set(t) >= {"target", "check", "value", "threshold", "op", "met"}
        assert t["met"] in (True, False, None)
        assert (t["value"] is None) == (t["met"] is None), t


def _load(
    name: str, rps: float, group: str = "webhook", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "group": group,
        "description": name,
        "status": "ok",
        "rps": rps,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        **extra,
    }


def _target(targets: list[dict[str, Any]], check_prefix: str) -> dict[str, Any]:
    (found,) = [t for t in targets if t["check"].startswith(check_prefix)]
    return found


@pytest.mark.parametrize(
    ("webhook_rps", "met"),
    [(9500.0, True), (9000.0, True), (8999.0, False), (None, None)],
    ids=["above", "at-threshold", "below", "not-measured"],
)
def test_ratio_targets(webhook_rps: float | None, met: bool | None) -> None:
    scenarios = [_load("echo-1", 10000.0, "baseline")]
    if webhook_rps is not None:
        scenarios.append(_load("webhook-cached-1", webhook_rps))
    t = _target(compute_targets(scenarios), "webhook cached, 1 worker")
    assert t["met"] is met
    assert t["value"] == (
        None if webhook_rps is None else round(webhook_rps / 10000.0, 3)
    )


@pytest.mark.parametrize(
    ("status", "met"),
    [("ok", True), ("skipped", None), ("error", None)],
    ids=["ran", "skipped-is-not-measured", "error-is-not-measured"],
)
def test_skipped_scenarios_are_not_measured(status: str, met: bool | None) -> None:
    scenarios = [
        _load("echo-1", 10000.0, "baseline"),
        {**_load("webhook-cold-1", 6000.0), "status": status},
    ]
    assert _target(compute_targets(scenarios), "webhook cold")["met"] is met


@pytest.mark.parametrize(
    ("failed", "after_switch", "met"),
    [(0, 100, True), (1, 100, False), (0, 0, False)],
    ids=["none-failed", "one-failed", "never-switched"],
)
def test_rotation_target(failed: int, after_switch: int, met: bool) -> None:
    rot = _load(
        "webhook-rotation-1",
        5000.0,
        "resilience",
        failed_valid_requests=failed,
        sent_after_switch=after_switch,
        non2xx=0,
    )
    t = _target(compute_targets([rot]), "valid requests failed during a key rotation")
    assert t["met"] is met


@pytest.mark.parametrize(
    ("fetches", "allowed", "met"),
    [(1, 1, True), (2, 1, False)],
    ids=["one-per-cooldown", "more-than-allowed"],
)
def test_flood_fetch_target(fetches: int, allowed: int, met: bool) -> None:
    flood = _load(
        "webhook-valid-under-flood-1",
        5000.0,
        "resilience",
        jwks_fetches=fetches,
        jwks_fetches_allowed=allowed,
    )
    t = _target(compute_targets([flood]), "JWKS fetches caused by the random-kid flood")
    assert t["met"] is met
