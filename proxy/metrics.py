"""Prometheus metrics, owned by one ``Metrics`` object per app (no global registry).

Label values come from closed sets (result, reason code, HTTP code) or from
``issuer_hash``; never a user name, a token or a raw URL. A fresh registry per
``Metrics`` keeps tests independent and lets two apps live in one process.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "CONTENT_TYPE",
    "FLUSH_INTERVAL",
    "HistogramTally",
    "Metrics",
    "Tally",
    "clear_multiprocess_dir",
    "null_tally",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


#: Seconds between a serving process's flushes of its tallies (``Tally``).
FLUSH_INTERVAL = 1.0


class Tally:
    """One counter's increments, kept in a plain int until ``Metrics.flush``.

    Why: the hot paths count every request two or three times, and each
    ``Counter.inc`` of prometheus_client takes a lock and, with ``--workers N``,
    writes a memory-mapped file: 0.25 µs a call in one process, 0.8 µs with
    several, and about 4 µs of a new token's review in all. ``count += 1`` on
    a tally costs a few hundredths of that. The totals reach the registry
    before every scrape this process serves (``render``) and, so that a scrape
    answered by another worker sees them too, at least every
    ``FLUSH_INTERVAL`` seconds; a counter is read as a rate over minutes, so a
    second's delay changes nothing an alert or a graph shows.
    """

    __slots__ = ("_child", "count")

    def __init__(self, child: Any) -> None:
        self._child = child
        #: Increments since the last flush: add to it directly.
        self.count = 0

    def flush(self) -> None:
        """Add what was counted since the last flush to the counter."""
        n = self.count
        if n:
            self.count = 0
            if self._child is not None:
                self._child.inc(n)


class HistogramTally:
    """One histogram's observations, bucketed in plain ints until the flush.

    The same saving as ``Tally`` for the two latency histograms, whose
    ``observe`` walks the buckets in Python under a lock per bucket and sum.
    prometheus_client has no public call to add counts to a bucket, so the
    flush adds to the child's bucket and sum values directly (``_buckets``,
    ``_sum``, ``_upper_bounds``: its layout since 0.1; ``tests/test_metrics.py``
    renders the result and fails if that layout changes). A bucket holds the
    observations up to and including its bound, as ``observe`` files them.
    """

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        """Count one observation of ``amount`` (seconds)."""
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        """Add the observations since the last flush to the histogram."""
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._sum = self._sum, 0.0
        buckets = self._child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self._child._sum.inc(total)


def null_tally() -> Tally:
    """A tally that is never flushed into a counter (no ``Metrics`` given)."""
    return Tally(None)


#: The files prometheus_client writes in a multiprocess directory:
#: ``<type>_<pid>.db``, a gauge's type carrying its mode (``gauge_livesum``).
_SAMPLE_FILE: Final = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_\d+\.db")


def clear_multiprocess_dir(directory: str) -> int:
    """Remove an earlier run's sample files from ``directory``; return how many.

    prometheus_client requires a multiprocess directory to be wiped before
    the processes start: the files of exited processes are still summed (a
    pod whose container restarts keeps its ``emptyDir``), and a new process
    that gets an old pid (pid 1 in every container) would count on from its
    predecessor's file. Only files named as that library names them are
    removed; anything else in the directory is left alone. Raises
    ``OSError`` when ``directory`` is not a directory.
    """
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and _SAMPLE_FILE.fullmatch(
                entry.name
            ):
                os.unlink(entry.path)
                removed += 1
    return removed


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._tallies: dict[tuple[int, tuple[str, ...]], Tally] = {}
        self._histograms: dict[tuple[int, tuple[str, ...]], HistogramTally] = {}
        self._hooks: list[Callable[[], None]] = []
        r = self.registry
        # Registered area by area, in this order: the order of /metrics.
        self._engine_metrics(r)
        self._keys_metrics(r)
        self._serving_metrics(r)
        self._reloads_metrics(r)
        self._audit_metrics(r)
        self._okta_api_metrics(r)
        self._introspection_metrics(r)
        self._revocation_metrics(r)
        self._okta_hook_metrics(r)

    def _engine_metrics(self, r: CollectorRegistry) -> None:
        """The authenticator: results, validation time, result cache, new-token queue."""
        self.authentications = Counter(
            "kube_oidc_gate_authentications",
            "Authentication attempts by result (ok, not_mine, rejected, error) "
            "and reason code.",
            ["result", "reason"],
            registry=r,
        )
        self.validation_latency = Histogram(
            "kube_oidc_gate_validation_duration_seconds",
            "Time to validate a token that was not in the result cache.",
            ["result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "kube_oidc_gate_token_cache_requests",
            "Result cache look-ups by outcome (hit, miss).",
            ["outcome"],
            registry=r,
        )
        self.cache_size = Gauge(
            "kube_oidc_gate_token_cache_entries",
            "Entries in the result cache.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.new_token_waits = Counter(
            "kube_oidc_gate_new_token_waits",
            "New tokens that waited for their turn behind accepted cached users "
            "(waited), or were refused with 503 because the queue was full (shed).",
            ["outcome"],
            registry=r,
        )

    def _keys_metrics(self, r: CollectorRegistry) -> None:
        """The issuers' key sets: fetches, their age, the keys held, readiness."""
        self.jwks_fetches = Counter(
            "kube_oidc_gate_jwks_fetches",
            "Discovery and JWKS fetches by issuer hash and result.",
            ["issuer_hash", "result"],
            registry=r,
        )
        self.jwks_last_success = Gauge(
            "kube_oidc_gate_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful key set fetch, per issuer hash.",
            ["issuer_hash"],
            registry=r,
            multiprocess_mode="max",
        )
        self.jwks_age = Gauge(
            "kube_oidc_gate_jwks_seconds_since_last_success",
            "Seconds since the last successful key set fetch, per issuer hash "
            "(updated at each scrape; alert when it grows past the refresh interval).",
            ["issuer_hash"],
            registry=r,
            multiprocess_mode="min",
        )
        self.jwks_keys = Gauge(
            "kube_oidc_gate_jwks_keys",
            "Usable signing keys held, per issuer hash.",
            ["issuer_hash"],
            registry=r,
            multiprocess_mode="max",
        )
        self.issuer_ready = Gauge(
            "kube_oidc_gate_issuer_ready",
            "1 when the issuer's keys are loaded, 0 otherwise.",
            ["issuer_hash"],
            registry=r,
            multiprocess_mode="livemin",
        )

    def _serving_metrics(self, r: CollectorRegistry) -> None:
        """Both front ends' requests, and the proxy's upstream calls and streams."""
        self.http_requests = Counter(
            "kube_oidc_gate_http_requests",
            "HTTP requests served, by handler and status code.",
            ["handler", "code"],
            registry=r,
        )
        self.http_duration = Histogram(
            "kube_oidc_gate_http_request_duration_seconds",
            "Time to answer an HTTP request (until headers for streams).",
            ["handler"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "kube_oidc_gate_upstream_requests",
            "Requests proxied to the API server, by status code or error class.",
            ["code"],
            registry=r,
        )
        self.inflight_streams = Gauge(
            "kube_oidc_gate_inflight_streams",
            "Long-running proxied requests (watches, logs, exec, port-forward).",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def _reloads_metrics(self, r: CollectorRegistry) -> None:
        """Reloads of the authentication configuration and of the upstream's files."""
        # kube-apiserver's names (apiserver_authentication_config_controller_*)
        # with our prefix, so its dashboards and alerts carry over (issue 21).
        self.config_reloads = Counter(
            "kube_oidc_gate_authentication_config_controller_automatic_reloads",
            "Automatic reloads of the authentication configuration, by status "
            "(success, failure).",
            ["status"],
            registry=r,
        )
        self.config_reload_time = Gauge(
            "kube_oidc_gate_authentication_config_controller_automatic_reload_last_timestamp_seconds",
            "Unix time of the last automatic reload of the authentication "
            "configuration, by status (success, failure).",
            ["status"],
            registry=r,
            multiprocess_mode="max",
        )
        self.upstream_reloads = Counter(
            "kube_oidc_gate_upstream_reloads",
            "Reloads of the proxy's upstream kubeconfig or TLS files after a "
            "change, by status (success, failure: the last good one serves).",
            ["status"],
            registry=r,
        )
        # Both statuses exist from the start (at 0), so an alert on failures
        # has a series to compute an increase from before the first one.
        for status in ("success", "failure"):
            self.config_reloads.labels(status)
            self.upstream_reloads.labels(status)

    def _audit_metrics(self, r: CollectorRegistry) -> None:
        """Audit events written and lost (issue 24)."""
        # Issue 24: audit events, by backend (log, webhook).
        self.audit_events = Counter(
            "kube_oidc_gate_audit_events",
            "Audit events written (log) or accepted by the webhook, by backend.",
            ["backend"],
            registry=r,
        )
        self.audit_events_dropped = Counter(
            "kube_oidc_gate_audit_events_dropped",
            "Audit events lost, by backend: its buffer was full (the writer or "
            "the webhook is slower than the requests), the write failed, or the "
            "webhook refused or kept failing a batch. Requests are never delayed "
            "for auditing; this counter is the price.",
            ["backend"],
            registry=r,
        )

    def _okta_api_metrics(self, r: CollectorRegistry) -> None:
        """Okta's API, read for groups beyond the token."""
        self.okta_api_requests = Counter(
            "kube_oidc_gate_okta_api_requests",
            "Requests to Okta's API for groups beyond the token, by endpoint "
            "(groups, token) and result (ok, rate_limited, denied, http_error, "
            "unreachable, timeout).",
            ["endpoint", "result"],
            registry=r,
        )
        self.okta_api_pages = Counter(
            "kube_oidc_gate_okta_api_group_pages",
            "Pages of a user's groups read from Okta's API (200 groups a page).",
            registry=r,
        )
        self.okta_api_duration = Histogram(
            "kube_oidc_gate_okta_api_request_duration_seconds",
            "Time of one request to Okta's API, by endpoint (groups, token).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.okta_groups_cache = Counter(
            "kube_oidc_gate_okta_groups_cache_requests",
            "Look-ups of a user's fetched Okta groups: hit, miss (a fetch), "
            "shared (joined a fetch already under way for the user).",
            ["outcome"],
            registry=r,
        )

    def _introspection_metrics(self, r: CollectorRegistry) -> None:
        """Issuers' introspection endpoints (RFC 7662)."""
        self.introspection_requests = Counter(
            "kube_oidc_gate_introspection_requests",
            "Calls to issuers' introspection endpoints (RFC 7662) by result "
            "(active, inactive, error, timeout).",
            ["result"],
            registry=r,
        )
        self.introspection_duration = Histogram(
            "kube_oidc_gate_introspection_duration_seconds",
            "Time of one introspection call, by result.",
            ["result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.introspection_cache = Counter(
            "kube_oidc_gate_introspection_cache_requests",
            "Look-ups of a token's introspection answer: hit, miss (a call), "
            "shared (joined a call under way for the token), stale (an old "
            "answer used under --introspection-failure-policy allow-cached).",
            ["outcome"],
            registry=r,
        )

    def _revocation_metrics(self, r: CollectorRegistry) -> None:
        """The revocation list and its watch."""
        self.revocations = Gauge(
            "kube_oidc_gate_revocations",
            "Revocation objects in force (--revocation-namespace), as this "
            "process last read them.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.revocation_watch_up = Gauge(
            "kube_oidc_gate_revocation_watch_up",
            "1 while the watch of the revocation list is open (or being "
            "renewed after a normal end), 0 while it is broken or before the "
            "first list; the lowest of the workers.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.revocation_watch_restarts = Counter(
            "kube_oidc_gate_revocation_watch_restarts",
            "Restarts of the revocation watch by reason: closed (the API "
            "server ended it, normal), expired (410 Gone: a full list "
            "follows), error (an HTTP error status), unreachable (no answer, "
            "or the connection broke), idle (no event or bookmark in time), "
            "malformed (an unreadable event).",
            ["reason"],
            registry=r,
        )
        self.revocation_deletes = Counter(
            "kube_oidc_gate_revocation_deletes",
            "Deletions of expired Revocation objects by result (deleted, gone: "
            "another replica was first, denied, error).",
            ["result"],
            registry=r,
        )

    def _okta_hook_metrics(self, r: CollectorRegistry) -> None:
        """The Okta event hook listener."""
        self.okta_hook_requests = Counter(
            "kube_oidc_gate_okta_hook_requests",
            "Requests to the Okta event hook listener, by HTTP status code "
            "(401: wrong or missing secret).",
            ["code"],
            registry=r,
        )
        self.okta_hook_events = Counter(
            "kube_oidc_gate_okta_hook_events",
            "Okta events received, by event type (a fixed set, else other) and "
            "outcome (revoked, forgotten, ignored, duplicate, invalid, failed).",
            ["event_type", "outcome"],
            registry=r,
        )
        self.okta_hook_queue = Gauge(
            "kube_oidc_gate_okta_hook_queue_events",
            "Okta events acknowledged and waiting for their revocation to be stored.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised per label set.

        prometheus_client's ``labels()`` validates and hashes the values on every
        call (about a microsecond); the hot paths count every request, over
        closed label sets, so each child is looked up once.
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def tally(self, counter: Any, *values: str) -> Tally:
        """The ``Tally`` of ``counter.labels(*values)`` (one per label set).

        Hot paths bind theirs once and add to ``count``; the others look it
        up here each time, which is a dictionary lookup.
        """
        key = (id(counter), values)
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally(self.child(counter, *values))
        return found

    def histogram_tally(self, histogram: Any, *values: str) -> HistogramTally:
        """The ``HistogramTally`` of ``histogram.labels(*values)`` (one per label set)."""
        key = (id(histogram), values)
        found = self._histograms.get(key)
        if found is None:
            child = self.child(histogram, *values)
            found = self._histograms[key] = HistogramTally(child)
        return found

    def on_flush(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` at every flush: for gauges read off a live value."""
        self._hooks.append(hook)

    def flush(self) -> None:
        """Move every tally's counts into its counter and run the flush hooks."""
        for tally in list(self._tallies.values()):
            tally.flush()
        for histogram in list(self._histograms.values()):
            histogram.flush()
        for hook in self._hooks:
            hook()

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format, flushed first.

        With ``--workers N`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` before
        this library is imported; every worker then writes its samples there
        and any worker's ``/metrics`` answers with the sum over all of them, so
        a scrape that lands on either process sees the whole pod (the other
        workers' tallies as of their last flush, at most ``FLUSH_INTERVAL``
        seconds old).
        """
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
            return generate_latest(combined)
        return generate_latest(self.registry)
