"""What auditing costs the proxy's handler, per request (issue 24).

``python -m benchmarks.audit_overhead [--policy FILE]`` times, in one process
and without a network:

- ``handle`` for a cached valid token up to the task it returns (the fast
  path: headers copied, target classified, the cache looked up), and for a
  cached refused token (answered without a task, access line included);
- with ``--policy``, the same two with an ``Auditor`` whose events go
  nowhere (the handler's share), ``begin`` + ``complete`` alone (one ordinary
  request's events), and the log backend's writer thread queueing, encoding
  and writing those events to ``/dev/null`` (its share).

Figures are the best of 15 rounds (the machine is shared: the least
disturbed round is the cost), in microseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy import http1
from proxy.authn import Authenticator
from proxy.impersonate import ProxySettings, proxy_server
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver_harness import mappings
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import claims_for, new_key, sign

__all__ = ["main"]

_ROUNDS = 15


def _time(fn: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(_ROUNDS):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return min(runs)


def _request(token: str) -> http1.Request:
    fields = [
        ("Host", "127.0.0.1:6443"),
        ("User-Agent", "kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef"),
        ("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
        ("Authorization", f"Bearer {token}"),
        ("Accept-Encoding", "gzip"),
    ]
    return http1.Request(
        "GET",
        "/api/v1/namespaces/default/pods?limit=500",
        {k.lower(): v for k, v in fields},
        b"",
        True,
        fields=fields,
        size=400,
    )


async def _measure(policy: str | None, n: int) -> dict[str, float]:
    key = new_key("RS256")
    authenticator = Authenticator(
        auth_config(authenticator_config(mappings=mappings())),
        {ISSUER: DictResolver(key)},
    )
    good = sign(key, claims_for(ISSUER, sub="alice", groups=["devs"]))
    bad = sign(key, claims_for(ISSUER, "other", sub="alice", groups=["devs"]))
    for token in (good, bad):
        _, user = authenticator.lookup(token)
        if user is None:
            # A refusal is cached too.
            with contextlib.suppress(Exception):
                await authenticator.authenticate(token)
    upstream = Upstream(UpstreamSettings(kubeconfig="/dev/null"))
    kwargs: dict[str, Any] = {}
    auditor = None
    if policy is not None:
        from proxy.audit.auditor import Auditor
        from proxy.audit.policy import load_policy

        # Events go nowhere: what the handler's thread spends is measured
        # here, the writer's share below.
        auditor = Auditor(load_policy(policy), [_Discard()])
        kwargs["auditor"] = auditor
    server = proxy_server(
        authenticator=authenticator,
        upstream=upstream,
        settings=ProxySettings(),
        metrics=None,
        **kwargs,
    )
    handle = server.default.handler  # type: ignore[union-attr]
    ok, refused = _request(good), _request(bad)

    def cached_ok() -> None:
        coro = handle(ok)
        assert asyncio.iscoroutine(coro)  # a cached valid token goes to its task
        coro.close()

    def cached_refused() -> None:
        answer = handle(refused)
        if asyncio.iscoroutine(answer):  # the refusal left the cache
            answer.close()

    out = {
        "handle, cached valid token (to its task)": _time(cached_ok, n),
        "handle, cached refused token (answered)": _time(cached_refused, n),
    }
    if auditor is not None:
        from proxy.audit.backend import LogBackend
        from proxy.kube import UserInfo

        user = UserInfo(username="oidc:alice", groups=("oidc:devs",))
        sink = _Discard()
        auditor.backends = (sink,)

        def events() -> None:
            ctx = auditor.begin(
                "GET",
                "/api/v1/namespaces/default/pods",
                "limit=500",
                user=user,
                source_ips=["127.0.0.1"],
                user_agent="kubectl",
            )
            if ctx is not None:
                ctx.complete(200)

        out["auditor begin + complete (one request's events)"] = _time(events, n)
        if sink.events:
            count = n * 2
            log = LogBackend("/dev/null", buffer_size=count)
            await log.start()
            start = time.perf_counter()
            for _ in range(n):
                log.emit(sink.events[0])
                log.emit(sink.events[-1])
            await log.close()
            took = (time.perf_counter() - start) / n * 1e6
            out["log backend: queue + JSON + write (one request's events)"] = took
    return out


class _Discard:
    """A backend that keeps the last two events and drops the rest."""

    name = "discard"

    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []

    def emit(self, event: Mapping[str, Any]) -> None:
        self.events = [*self.events[-1:], event]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    """Print the figures (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="an audit Policy file (auditing on)")
    parser.add_argument("-n", type=int, default=5000, help="calls per round")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    figures = asyncio.run(_measure(args.policy, args.n))
    for name, micros in figures.items():
        sys.stdout.write(f"{micros:8.2f} µs  {name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
