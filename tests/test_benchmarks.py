"""The benchmark harness: its --quick run works end to end and its report keeps its shape.

Figures are never asserted (a CI machine's numbers mean nothing); the shape of
the report, the presence of every scenario and the target bookkeeping are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import haproxy, nginx
from benchmarks.context import Settings, make_ctx, prepare_checks
from benchmarks.drive import Load
from benchmarks.measure import median_fields
from benchmarks.procs import Proc, cpu_ticks, free_port, start, steal_share, wait_http
from benchmarks.report import upstream_summary
from benchmarks.services import (
    NGINX_ROUTES,
    check_front,
    haproxy_peer,
    nginx_ceiling,
    nginx_upstream,
)
from benchmarks.targets import SPECIAL, TARGETS, Target, compute_targets

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
    "proxy-cold-2",
    "proxy-latency-1",
    "proxy-badsig-replay-2",
    "proxy-expired-replay-2",
    "proxy-stream-rss",
    "proxy-idle-watches",
    "apache-cached",
    "apache-latency",
    "apache-badsig-replay",
    "apache-expired-replay",
    "haproxy-cached",
    "haproxy-cold",
    "nginx-ceiling",
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
            if "server_cpu_us_per_request" in s:  # measured by run_wrk
                assert 0.0 <= s["cpu_steal_share"] <= 1.0, s
    assert any("cpu_steal_share" in s for s in report["scenarios"])
    upstream = report["upstream"]
    if nginx.missing() is None:
        assert upstream["shared"].startswith("nginx "), upstream
        assert upstream["fallback_reason"] is None
    else:
        assert upstream["shared"].startswith("aiohttp "), upstream
        assert upstream["fallback_reason"], upstream
    through_shared = [
        "upstream-direct-latency",
        "proxy-cached-1",
        "proxy-cached-2",
        "proxy-cold-2",
        "apache-cached",
        "haproxy-cached",
        "haproxy-cold",
        "nginx-ceiling",
    ]
    peers_here = nginx.missing() is None
    for name in ("haproxy-cached", "haproxy-cold"):
        want = "ok" if peers_here and haproxy.missing() is None else "skipped"
        assert by_name[name]["status"] == want, by_name[name]
    assert by_name["nginx-ceiling"]["status"] == ("ok" if peers_here else "skipped")
    for name in ("proxy-cached-2", "proxy-cold-2", "haproxy-cached", "haproxy-cold"):
        if by_name[name]["status"] == "ok":
            # Every request answered 200: no peer measured its refusals.
            assert by_name[name]["non2xx"] == 0, by_name[name]
    if by_name["proxy-cold-2"]["status"] == "ok":
        assert 0 < by_name["proxy-cold-2"]["cold_fraction"] <= 1
    for name in through_shared:
        if by_name[name]["status"] == "ok":
            assert by_name[name]["upstream"] == upstream["shared"], by_name[name]
    for name in ("proxy-stream-rss", "proxy-idle-watches"):
        if by_name[name]["status"] == "ok":
            assert by_name[name]["upstream"].startswith("aiohttp "), by_name[name]
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
    assert {t["target"] for t in targets} == {str(n) for n in range(1, 10)}
    for t in targets:
        assert set(t) >= {"target", "check", "value", "threshold", "op", "met"}
        assert t["met"] in (True, False, None)
        # A value is judged unless the run says why not (a quick run's small
        # token pool wraps, so its cold path is not judged).
        judged = t["met"] is not None or "invalid" in t
        assert (t["value"] is not None) == judged, t


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


def test_steal_is_the_hypervisors_share_of_the_machine(tmp_path: Path) -> None:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 0 0 0 50 7 0\ncpu0 1 2 3\n")
    before = cpu_ticks(str(stat))
    assert before == (50, 1000)  # guest time is inside user already
    stat.write_text("cpu  300 0 100 1100 0 0 0 500 9 0\n")
    assert steal_share(before, cpu_ticks(str(stat))) == 0.45  # 450 of 1,000 ticks
    assert steal_share(before, before) is None
    assert cpu_ticks(str(tmp_path / "absent")) == (0, 0)
    stat.write_text("intr 1 2 3\n")
    assert cpu_ticks(str(stat)) == (0, 0)
    real = cpu_ticks()
    assert 0 <= real[0] <= real[1]
    assert real[1] > 0


def _wrk_result(rps: float, steal: float | None) -> dict[str, Any]:
    latency = {k: 1000.0 for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    return {
        "rps": rps,
        "requests": int(rps * 5),
        "duration_us": 5_000_000,
        "latency_us": latency,
        "non2xx": 0,
        "socket_errors": 0,
        "server_cpu_us_per_request": 1e6 / rps,
        "cpu_steal_share": steal,
    }


def test_median_fields_report_the_median_round_and_every_round() -> None:
    """The flood's and every interleaved scenario's entry: the median round's own figures."""
    load = Load(url="https://127.0.0.1:1/", duration=5, tokens=Path("t"))
    done = [_wrk_result(900.0, 0.2), _wrk_result(1000.0, 0.0), _wrk_result(400.0, None)]
    fields = median_fields(done, load)
    assert fields["rps"] == 900.0
    assert fields["server_cpu_us_per_request"] == 1e6 / 900.0
    assert fields["cpu_steal_share"] == 0.2
    assert fields["rounds_rps"] == [900.0, 1000.0, 400.0]
    assert fields["rounds_steal_share"] == [0.2, 0.0, None]
    assert fields["requests_all_rounds"] == 4500 + 5000 + 2000
    single = median_fields(done[1:2], load)
    assert single["rps"] == 1000.0
    assert "rounds_rps" not in single


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
    ("cpu_two", "value", "met"),
    [(40.0, 1.8, True), (44.0, 1.636, False)],
    ids=["scales", "contends"],
)
def test_capacity_scaling_counts_the_second_core(
    cpu_two: float, value: float, met: bool
) -> None:
    """2 workers that each spend what 1 worker spends per request would do
    twice its work with a core each: 2 x 36 / 40 = 1.8.
    """
    scenarios = [
        _load("webhook-cached-1", 20000.0, server_cpu_us_per_request=36.0),
        _load("webhook-cached-2", 28000.0, server_cpu_us_per_request=cpu_two),
    ]
    t = _target(compute_targets(scenarios), "webhook cached, CPU capacity")
    assert (t["value"], t["met"], t["kind"], t["informational"]) == (
        value,
        met,
        "cpu_ratio",
        False,
    ), "T4 is judged on CPU per request (issue 25)"
    throughput = _target(compute_targets(scenarios), "webhook cached: 2 workers")
    assert throughput["value"] == 1.4, "the throughput ratio stays what it was"
    assert throughput["informational"] is True


@pytest.mark.parametrize(
    ("status", "met"),
    [("ok", True), ("skipped", None), ("error", None)],
    ids=["ran", "skipped-is-not-measured", "error-is-not-measured"],
)
def test_skipped_scenarios_are_not_measured(status: str, met: bool | None) -> None:
    scenarios = [
        _load("echo-1", 10000.0, "baseline"),
        {**_load("webhook-cold-1", 8000.0), "status": status},
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


#: Scenarios a full run reports that --quick leaves out or a target reads.
FULL_ONLY = ["upstream-direct", "upstream-direct-latency", "webhook-logins-alone-1"]


def test_the_table_reads_scenarios_the_harness_reports() -> None:
    """A misspelt scenario name would leave its target "not measured" forever."""
    known = {*EXPECTED, *FULL_ONLY, "webhook-logins-beside-cached-1"}
    for t in TARGETS:
        assert t.numerator in known, t
        assert t.denominator in {*known, ""}, t
        # A ratio has both sides; of the others only the p50 reads a second.
        is_ratio = t.kind in ("ratio", "cpu_ratio")
        assert bool(t.denominator) == (is_ratio or t.kind == "p50_added"), t


def test_the_table_is_whole() -> None:
    """Every kind has its evaluator, every target 1-9 a row, every row its own label."""
    assert {t.kind for t in TARGETS} - {"ratio", "cpu_ratio"} == set(SPECIAL)
    assert {t.id for t in TARGETS} == {str(n) for n in range(1, 10)}
    assert len({t.check for t in TARGETS}) == len(TARGETS)
    for t in TARGETS:
        if t.kind in ("ratio", "cpu_ratio"):
            # The label says what the flag says (the console lower-cases it).
            assert t.informational == ("for information" in t.check), t
            assert isinstance(t.threshold, float), t
    assert {t.numerator for t in TARGETS if t.needs_new_tokens} == {
        "webhook-cold-1",
        "proxy-cold-2",
    }
    assert sum(t.needs_new_tokens for t in TARGETS) == 3


def test_one_evaluator_judges_any_table() -> None:
    """A new target is a row: the evaluator needs no change for it."""
    row = Target(
        id="10",
        check="webhook cold / webhook cached (example)",
        kind="ratio",
        numerator="webhook-cold-1",
        denominator="webhook-cached-1",
        threshold=0.5,
        needs_new_tokens=True,
    )
    scenarios = [
        _load("webhook-cached-1", 10000.0),
        _load("webhook-cold-1", 6000.0, cold_fraction=1.0),
    ]
    (t,) = compute_targets(scenarios, (row,))
    assert (t["target"], t["value"], t["met"], "invalid" in t) == (
        "10",
        0.6,
        True,
        False,
    )
    scenarios[1]["cold_fraction"] = 0.5
    (t,) = compute_targets(scenarios, (row,))
    assert (t["value"], t["met"]) == (0.6, None)
    assert "50.0% of the requests carried a new token" in t["invalid"]


@pytest.mark.parametrize(
    ("growth", "complete", "met"),
    [(10.0, True, True), (10.0, False, False), (50.0, True, False)],
    ids=["small", "incomplete", "at-the-bound"],
)
def test_stream_target(growth: float, complete: bool, met: bool) -> None:
    stream = _load(
        "proxy-stream-rss",
        0.0,
        "scale",
        rss_growth_mb=growth,
        complete=complete,
        bytes=1 << 20,
    )
    t = _target(compute_targets([stream]), "proxy RSS growth while streaming")
    assert (t["value"], t["threshold"], t["op"], t["met"]) == (growth, 50, "<", met)
    assert t["bytes"] == 1 << 20


def test_p50_added_target() -> None:
    direct = _load("upstream-direct-latency", 1.0, "proxy")
    through = {**_load("proxy-latency-1", 1.0, "proxy"), "latency_ms": {"p50": 1.8}}
    t = _target(compute_targets([direct, through]), "p50 latency added")
    assert (t["value"], t["met"], t["kind"]) == (0.8, True, "value")
    t = _target(compute_targets([through]), "p50 latency added")
    assert (t["value"], t["threshold"], t["met"]) == (None, 1.0, None)


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


@pytest.fixture
def both_upstreams(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The aiohttp upstream and the private nginx, each on its own loopback port."""
    binary = nginx.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    aio_port, nginx_port = free_port(), free_port()
    conf = nginx.write_config(tmp_path / "nginx", port=nginx_port, routes=NGINX_ROUTES)
    procs: list[Proc] = []
    try:
        procs.append(
            start(
                "upstream",
                [
                    sys.executable,
                    "-m",
                    "benchmarks.servers",
                    "upstream",
                    "--port",
                    str(aio_port),
                ],
                tmp_path,
            )
        )
        procs.append(start("nginx", nginx.argv(binary, conf), tmp_path))
        wait_http(f"http://127.0.0.1:{aio_port}/healthz", procs[0], timeout=20)
        wait_http(f"http://127.0.0.1:{nginx_port}/healthz", procs[1], timeout=20)
        yield f"http://127.0.0.1:{aio_port}", f"http://127.0.0.1:{nginx_port}"
    finally:
        for proc in procs:
            proc.stop(timeout=5)
    assert not (tmp_path / "nginx" / "nginx.pid").exists()


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NGINX_ROUTES), ids=sorted(NGINX_ROUTES))
def test_nginx_answers_as_the_aiohttp_upstream(
    both_upstreams: tuple[str, str], path: str
) -> None:
    aio, ngx = both_upstreams
    status, ctype, body = _get(f"{ngx}{path}")
    assert (status, ctype, body) == _get(f"{aio}{path}")
    assert status == 200


@pytest.mark.slow
def test_nginx_refuses_other_paths(both_upstreams: tuple[str, str]) -> None:
    _, ngx = both_upstreams
    assert _get(f"{ngx}/big?bytes=10")[0] == 404


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        (b"ok\n", "'ok\\n'"),
        (b"it's", "'it\\'s'"),
        (b"a\\b", "'a\\\\b'"),
    ],
    ids=["newline", "single-quote", "backslash"],
)
def test_nginx_config_escapes_the_body(
    tmp_path: Path, body: bytes, quoted: str
) -> None:
    route = nginx.Route(body=body, content_type="text/plain")
    conf = nginx.write_config(tmp_path, port=1, routes={"/x": route})
    assert f"return 200 {quoted};" in conf.read_text()


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/x", nginx.Route(body=b"$host", content_type="text/plain")),
        ("/x", nginx.Route(body=b"a\x00b", content_type="text/plain")),
        ("/x", nginx.Route(body=b"ok", content_type='text/plain"; x')),
        ("/x; deny all", nginx.Route(body=b"ok", content_type="text/plain")),
        ("x", nginx.Route(body=b"ok", content_type="text/plain")),
    ],
    ids=["dollar", "control-char", "quote-in-type", "semicolon-in-path", "relative"],
)
def test_nginx_config_refuses_what_it_cannot_say(
    tmp_path: Path, path: str, route: nginx.Route
) -> None:
    with pytest.raises(ValueError, match=r"^nginx: "):
        nginx.write_config(tmp_path, port=1, routes={path: route})


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (None, "upstream: not used in this run"),
        (
            {"shared": "nginx 1.22.1", "fallback_reason": None},
            "upstream of proxy, Apache and upstream-direct: nginx 1.22.1",
        ),
        (
            {
                "shared": "aiohttp 3.11.0",
                "fallback_reason": "nginx is not installed",
                "streams_and_watches": "aiohttp 3.11.0",
            },
            "upstream of proxy, Apache and upstream-direct: aiohttp 3.11.0 "
            "(fallback: nginx is not installed); stream and watches: aiohttp 3.11.0",
        ),
    ],
    ids=["not-used", "nginx", "fallback"],
)
def test_upstream_summary(upstream: dict[str, Any] | None, expected: str) -> None:
    assert upstream_summary({"upstream": upstream}) == expected


@pytest.mark.slow
def test_nginx_serves_an_escaped_body_byte_for_byte(tmp_path: Path) -> None:
    binary = nginx.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    body = b'it\'s a\\b\tc\r\nd "q" {x} ;# \xc3\xa9'
    port = free_port()
    routes = {
        "/healthz": nginx.Route(body=b"ok", content_type="text/plain"),
        "/x": nginx.Route(body=body, content_type="text/plain; charset=utf-8"),
    }
    conf = nginx.write_config(tmp_path / "nginx", port=port, routes=routes)
    proc = start("nginx", nginx.argv(binary, conf), tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=20)
        got = _get(f"http://127.0.0.1:{port}/x")
    finally:
        proc.stop(timeout=5)
    assert got == (200, "text/plain; charset=utf-8", body)


@pytest.mark.parametrize(
    ("fraction", "met"),
    [(1.0, True), (0.995, True), (0.8565, None)],
    ids=["all-new", "a-few-hits", "the-pool-wrapped"],
)
def test_t2_is_not_judged_on_a_run_whose_tokens_were_not_new(
    fraction: float, met: bool | None
) -> None:
    scenarios = [
        {**_load("echo-1", 10000.0, "baseline"), "server_cpu_us_per_request": 45.0},
        {
            **_load("webhook-cold-1", 8000.0),
            "server_cpu_us_per_request": 58.0,
            "cold_fraction": fraction,
        },
    ]
    targets = compute_targets(scenarios)
    for label in ("webhook cold", "CPU per request, echo / webhook cold"):
        t = _target(targets, label)
        assert t["met"] is met
        assert ("invalid" in t) is (met is None)
    if met is None:
        assert (
            "85.7% of the requests carried a new token"
            in _target(targets, "webhook cold")["invalid"]
        )


@pytest.mark.parametrize(
    ("target", "ours", "theirs", "rps", "threshold"),
    [
        ("7", "proxy-cached-2", "haproxy-cached", 14000.0, 1.0),
        ("8", "proxy-cold-2", "haproxy-cold", 11600.0, 0.6),
        ("9", "proxy-cached-2", "nginx-ceiling", 25000.0, 0.5),
        ("2", "webhook-cold-1", "echo-1", 20000.0, 0.75),
    ],
    ids=["T7-haproxy-same-token", "T8-haproxy-new-token", "T9-ceiling", "T2-raised"],
)
@pytest.mark.parametrize("above", [True, False], ids=["met", "missed"])
def test_issue_25_targets(
    target: str, ours: str, theirs: str, rps: float, threshold: float, above: bool
) -> None:
    mine = rps * threshold * (1.01 if above else 0.99)
    scenarios = [_load(theirs, rps, "peer"), _load(ours, mine, "proxy")]
    (t,) = [
        t
        for t in compute_targets(scenarios)
        if t["target"] == target and t["kind"] == "ratio"
    ]
    assert (t["numerator"], t["denominator"]) == (ours, theirs)
    assert (t["threshold"], t["met"], t["informational"]) == (threshold, above, False)


def test_t8_is_not_judged_when_the_proxy_saw_old_tokens() -> None:
    scenarios = [
        _load("haproxy-cold", 10000.0, "peer"),
        _load("proxy-cold-2", 7000.0, "proxy", cold_fraction=0.9),
    ]
    t = _target(compute_targets(scenarios), "proxy, a new token every request")
    assert t["met"] is None
    assert "90.0% of the requests carried a new token" in t["invalid"]


@pytest.fixture
def front_ctx(tmp_path: Path) -> Iterator[Any]:
    """A harness context with the check tokens, and the nginx upstream running."""
    if nginx.missing() is not None or haproxy.missing() is not None:
        pytest.skip("needs nginx and haproxy (Debian packages nginx haproxy)")
    ctx = make_ctx(Settings.make(True, None, None), tmp_path / "out")
    try:
        prepare_checks(ctx)
        with nginx_upstream(ctx) as up:
            yield ctx, up
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)


@pytest.mark.slow
def test_haproxy_peer_refuses_every_bad_token(front_ctx: Any) -> None:
    """The peer's own check passes, and every cause was tried against it."""
    ctx, up = front_ctx
    with haproxy_peer(ctx, up.url, 2) as peer:
        causes = check_front(ctx, peer)
        pid = peer.proc.pid
    assert set(causes) == {*ctx.refusable, "no token"}
    assert {"bad signature", "expired", "wrong audience", "alg none"} <= set(causes)
    assert peer.proc.popen.poll() is not None, f"haproxy {pid} still runs"


@pytest.mark.slow
def test_a_peer_that_skips_the_signature_is_not_measured(
    front_ctx: Any, tmp_path: Path
) -> None:
    """HAProxy without its ``jwt_verify`` line would report inflated figures:
    the readiness check refuses it, naming what it let through.
    """
    ctx, up = front_ctx
    with haproxy_peer(ctx, up.url, 1) as peer:
        conf = ctx.work / "haproxy" / "haproxy.cfg"
        text = conf.read_text()
    lines = [ln for ln in text.splitlines() if "jwt_verify" not in ln]
    assert len(lines) == len(text.splitlines()) - 1
    port = free_port()
    old_port = peer.url.rsplit(":", 1)[1]
    broken = tmp_path / "broken.cfg"
    broken.write_text("\n".join(lines).replace(f":{old_port} ", f":{port} ") + "\n")
    binary = haproxy.haproxy_binary()
    assert binary is not None
    proc = start("haproxy-broken", haproxy.argv(binary, broken), tmp_path)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", proc, timeout=20, status=401)
        svc = type(peer)("broken", f"https://127.0.0.1:{port}", proc)
        with pytest.raises(RuntimeError, match="does not refuse") as err:
            check_front(ctx, svc)
    finally:
        proc.stop(timeout=5)
    message = str(err.value)
    assert "'bad signature': 200" in message
    assert "'signed by another key': 200" in message
    assert "expired" not in message


@pytest.mark.slow
def test_nginx_ceiling_forwards_the_credential_and_checks_nothing(
    front_ctx: Any,
) -> None:
    ctx, up = front_ctx
    with nginx_ceiling(ctx, up.url, 2) as ceiling:
        assert check_front(ctx, ceiling, authenticates=False) == []
        with pytest.raises(RuntimeError, match="a valid token got 200"):
            check_front(ctx, ceiling)


@pytest.mark.slow
def test_cel_benchmark_quick_report(tmp_path: Path) -> None:
    """``benchmarks.cel --quick``: every expression compiles and evaluates, in seconds."""
    baseline = REPO / "benchmarks" / "report" / "cel-celpy.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cel",
            "--quick",
            "--out",
            str(tmp_path),
            "--baseline",
            str(baseline),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "cel.json").read_text())
    assert report["mode"] == "quick"
    assert "cel-expr-python" in report["versions"]
    rows = report["expressions"]
    assert rows
    for row in rows:
        assert row["status"] == "ok", row
        for key in ("compile_us", "eval_us", "eval_shared_us"):
            assert row[key] > 0
        assert set(row["speedup"]) == {"compile", "eval"}
