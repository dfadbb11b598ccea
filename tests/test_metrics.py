"""Counting on the hot path: tallies reach the registry by every scrape and every second."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import start_engine
from proxy.authn import Authenticator
from proxy.metrics import Metrics, clear_multiprocess_dir, null_tally
from tests.fakes.issuer import FakeIssuer
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import claims_for, new_key, sign
from tests.support.running_webhook import issuer_auth_config, wait_ready
from tests.test_authn import sample
from tests.test_rotation import engine_for

OK = {"result": "ok", "reason": "ok"}


def _registry(metrics: Metrics, name: str, **labels: str) -> float:
    """The registry's value as it stands, without the flush a render does."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_tally_reaches_its_counter_at_the_flush_and_only_once() -> None:
    metrics = Metrics()
    tally = metrics.tally(metrics.authentications, "rejected", "expired")
    assert metrics.tally(metrics.authentications, "rejected", "expired") is tally
    for _ in range(5):
        tally.count += 1
    name = "kube_oidc_gate_authentications_total"
    labels = {"result": "rejected", "reason": "expired"}
    assert _registry(metrics, name, **labels) == 0
    metrics.flush()
    assert _registry(metrics, name, **labels) == 5
    assert tally.count == 0
    metrics.flush()
    assert _registry(metrics, name, **labels) == 5
    tally.count += 2
    # A render (a scrape) flushes first.
    assert sample(metrics, name, **labels) == 7


def test_a_null_tally_counts_into_nothing() -> None:
    tally = null_tally()
    tally.count += 3
    tally.flush()
    assert tally.count == 0


@pytest.mark.slow
async def test_the_authenticators_counts_and_cache_size_are_in_every_render() -> None:
    key = new_key("RS256")
    metrics = Metrics()
    auth = Authenticator(
        auth_config(authenticator_config()),
        {ISSUER: DictResolver(key)},
        metrics=metrics,
    )
    token = sign(key, claims_for(ISSUER))
    for _ in range(3):
        assert await auth.authenticate(token) is not None
    assert sample(metrics, "kube_oidc_gate_authentications_total", **OK) == 3
    assert (
        sample(metrics, "kube_oidc_gate_token_cache_requests_total", outcome="miss")
        == 1
    )
    assert (
        sample(metrics, "kube_oidc_gate_token_cache_requests_total", outcome="hit") == 2
    )
    # The gauge is read off the cache at the flush, not set per request.
    assert sample(metrics, "kube_oidc_gate_token_cache_entries") == 1
    auth.cache.clear()
    assert sample(metrics, "kube_oidc_gate_token_cache_entries") == 0


@pytest.mark.slow
async def test_a_serving_engine_flushes_without_a_scrape_and_at_close(
    issuer: FakeIssuer,
) -> None:
    # What another worker's scrape depends on: nothing here renders.
    engine = await engine_for(issuer)
    metrics = engine.metrics
    name = "kube_oidc_gate_authentications_total"
    try:
        assert await engine.authenticator.authenticate(issuer.token()) is not None
        assert _registry(metrics, name, **OK) == 0
        deadline = time.monotonic() + 5
        while _registry(metrics, name, **OK) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _registry(metrics, name, **OK) == 1
        assert await engine.authenticator.authenticate(issuer.token()) is not None
    finally:
        await engine.close()
    # The count of the last second is not lost when the worker stops.
    assert _registry(metrics, name, **OK) == 2
    assert engine.flusher is not None
    assert engine.flusher.done()


@pytest.mark.slow
async def test_a_short_flush_interval_is_honoured(issuer: FakeIssuer) -> None:
    engine = await start_engine(
        issuer_auth_config(issuer.url, None), metrics=Metrics(), flush_interval=0.05
    )
    try:
        await wait_ready(engine)
        tally = engine.metrics.tally(engine.metrics.http_requests, "x", "200")
        tally.count += 1
        await asyncio.sleep(0.3)
        assert (
            _registry(
                engine.metrics,
                "kube_oidc_gate_http_requests_total",
                handler="x",
                code="200",
            )
            == 1
        )
    finally:
        await engine.close()


@pytest.fixture(autouse=True)
def _no_multiprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests read one process's registry.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def _histogram_samples(metrics: Metrics, name: str) -> dict[tuple[str, str], float]:
    """Every sample of the histogram ``name``: (sample name, le) -> value."""
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if family.name == name
    }


def test_a_histogram_tally_renders_exactly_as_observe_would() -> None:
    """Bounds included (``le``), cumulative buckets, count and sum: compared with a
    twin fed by prometheus_client's own ``observe`` (fails if its layout changes)."""
    tallied, observed = Metrics(), Metrics()
    tally = tallied.histogram_tally(tallied.validation_latency, "ok")
    child = observed.child(observed.validation_latency, "ok")
    # On bounds, between them, below the first and beyond the last.
    values = [0.0, 0.0001, 0.00011, 0.0005, 0.0024, 0.0025, 1.0, 9.99, 10.0, 11.0, 60.0]
    for round_ in range(2):
        for v in values[round_::2]:
            tally.observe(v)
            child.observe(v)
        name = "kube_oidc_gate_validation_duration_seconds"
        mine = _histogram_samples(tallied, name)
        theirs = _histogram_samples(observed, name)
        assert {
            k: v for k, v in mine.items() if "created" not in k[0]
        } == pytest.approx({k: v for k, v in theirs.items() if "created" not in k[0]})
    assert mine[(f"{name}_bucket", "0.0001")] == 2
    assert mine[(f"{name}_bucket", "+Inf")] == len(values)
    assert mine[(f"{name}_count", "")] == len(values)


def test_a_histogram_tally_waits_for_the_flush() -> None:
    metrics = Metrics()
    tally = metrics.histogram_tally(metrics.http_duration, "authenticate")
    assert metrics.histogram_tally(metrics.http_duration, "authenticate") is tally
    tally.observe(0.002)
    name = "kube_oidc_gate_http_request_duration_seconds_count"
    assert _registry(metrics, name, handler="authenticate") == 0
    metrics.flush()
    assert _registry(metrics, name, handler="authenticate") == 1
    metrics.flush()
    assert _registry(metrics, name, handler="authenticate") == 1


def test_clearing_a_multiprocess_dir_removes_only_sample_files(tmp_path: Path) -> None:
    for name in (
        "counter_12.db",
        "gauge_livesum_12.db",
        "gauge_max_7.db",
        "histogram_3.db",
        "summary_1.db",
    ):
        (tmp_path / name).write_bytes(b"x")
    kept = ["notes.txt", "counter_x.db", "counter_12.db.bak", "mycounter_1.db"]
    for name in kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "histogram_9.db").mkdir()  # not a file: left alone
    assert clear_multiprocess_dir(str(tmp_path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*kept, "histogram_9.db"]
    )
    assert clear_multiprocess_dir(str(tmp_path)) == 0


def test_clearing_a_missing_multiprocess_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        clear_multiprocess_dir(str(tmp_path / "missing"))
