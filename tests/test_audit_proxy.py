"""Audit events for requests through the proxy (issue 24): the real kubectl and
aiohttp through the real listener to the fake API server, with a real
``Auditor`` writing a log file (or posting to a webhook that is down).

Every event a test reads is checked with ``tests.audit_schema`` (the
``audit.k8s.io/v1`` types, nested ones against the ``kubernetes`` models).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.audit.auditor import AuditOptions, Auditor
from proxy.audit.backend import WebhookBackend
from proxy.audit.policy import load_policy
from proxy.impersonate import ProxySettings
from proxy.kube import UserInfo
from proxy.metrics import Metrics
from tests.audit_schema import validate_event
from tests.fakes.apiserver_harness import (
    PODS,
    Stack,
    kubectl_path,
    run_kubectl,
    run_proxy,
    start_kubectl,
    upstream_kubeconfig,
    write_kubectl_config,
)
from tests.helpers import ISSUER
from tests.keygen import claims_for, new_key, sign
from tests.test_audit_backend import metric
from tests.test_cli_webhook import free_port

METADATA = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: Metadata
"""

needs_kubectl = pytest.mark.skipif(
    kubectl_path() is None, reason="kubectl binary not installed"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Audited:
    stack: Stack
    auditor: Auditor
    log: Path
    home: Path
    config: Path

    def events(self) -> list[dict[str, Any]]:
        """Every event written so far, each checked against the schema."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            event = json.loads(line)
            assert validate_event(event) == [], (validate_event(event), event)
            out.append(event)
        return out

    async def wait(
        self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> list[dict[str, Any]]:
        """The events once ``check`` holds for them (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if check(events):
                return events
            assert time.monotonic() < deadline, f"not in time; events: {events}"
            await asyncio.sleep(0.02)

    async def kubectl(
        self, *args: str, stdin: bytes | None = None
    ) -> tuple[int, str, str]:
        return await run_kubectl(
            args, home=self.home, kubeconfig=self.config, stdin=stdin, timeout=20
        )

    def upstream_ids(self, path: str) -> list[str]:
        """The ``Audit-ID`` of each request the API server got for ``path``."""
        return [
            r.headers.get("Audit-ID", "")
            for r in self.stack.fake.requests
            if r.path == path
        ]


def of(events: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [e for e in events if e["requestURI"].partition("?")[0] == path]


def stages(events: list[dict[str, Any]]) -> list[str]:
    return [e["stage"] for e in events]


@asynccontextmanager
async def audited_proxy(
    tmp_path: Path,
    ca: trustme.CA,
    policy: str = METADATA,
    settings: ProxySettings | None = None,
) -> AsyncIterator[Audited]:
    """A proxy auditing to a log file under ``policy``, and kubectl's config."""
    (tmp_path / "policy.yaml").write_text(policy)
    log = tmp_path / "audit.log"
    auditor = await Auditor.from_options(
        AuditOptions(
            policy=load_policy(str(tmp_path / "policy.yaml")), log_path=str(log)
        )
    )
    try:
        async with run_proxy(tmp_path, ca, settings=settings, auditor=auditor) as stack:
            config = write_kubectl_config(
                tmp_path / "kubeconfig", stack.url, ca.cert_pem.bytes(), stack.token()
            )
            yield Audited(stack, auditor, log, tmp_path, config)
    finally:
        await auditor.close()


@pytest.fixture
async def audited(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Audited]:
    async with audited_proxy(tmp_path, ca) as a:
        yield a


# --------------------------------------------------------------------------
# kubectl


@needs_kubectl
async def test_kubectl_get_is_audited_under_the_api_servers_audit_id(
    audited: Audited,
) -> None:
    code, out, err = await audited.kubectl("get", "pods")
    assert code == 0, err
    assert "Running" in out
    events = await audited.wait(lambda es: len(of(es, PODS)) == 2)
    received, complete = of(events, PODS)
    assert stages([received, complete]) == ["RequestReceived", "ResponseComplete"]
    assert complete["level"] == "Metadata"
    assert complete["verb"] == "list"
    assert complete["user"] == {
        "username": "oidc:alice",
        "groups": ["oidc:devs", "system:authenticated"],
    }
    assert "impersonatedUser" not in complete
    assert complete["sourceIPs"] == ["127.0.0.1"]
    assert complete["userAgent"].startswith("kubectl")
    assert complete["objectRef"] == {
        "resource": "pods",
        "namespace": "default",
        "apiVersion": "v1",
    }
    assert complete["responseStatus"] == {"metadata": {}, "code": 200}
    assert received["requestReceivedTimestamp"] == complete["requestReceivedTimestamp"]
    assert "responseStatus" not in received
    # The API server's record of this request shares the id.
    assert audited.upstream_ids(PODS) == [complete["auditID"]]
    assert received["auditID"] == complete["auditID"]
    uuid.UUID(complete["auditID"])
    # Discovery is audited too, each request under an id of its own.
    ids = {e["auditID"] for e in events}
    assert len(ids) == len(events) // 2 >= 2


@needs_kubectl
async def test_kubectl_get_watch_has_response_started(audited: Audited) -> None:
    proc = await start_kubectl(
        ["get", "pods", "--watch", "-o", "name"],
        home=audited.home,
        kubeconfig=audited.config,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line == b"pod/p\n"
        await asyncio.wait_for(audited.stack.fake.watch_opened.wait(), 10)

        def watch_events(es: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [e for e in of(es, PODS) if e["verb"] == "watch"]

        events = await audited.wait(lambda es: len(watch_events(es)) == 2)
        assert stages(watch_events(events)) == ["RequestReceived", "ResponseStarted"]
        started = watch_events(events)[1]
        assert started["responseStatus"]["code"] == 200
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
    events = await audited.wait(lambda es: len(watch_events(es)) == 3)
    watch = watch_events(events)
    assert stages(watch) == ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    assert len({e["auditID"] for e in watch}) == 1
    assert watch[2]["responseStatus"]["code"] == 200
    ids = [
        r.headers.get("Audit-ID")
        for r in audited.stack.fake.requests
        if r.path == PODS and "watch" in r.query
    ]
    assert ids == [watch[0]["auditID"]]


@needs_kubectl
async def test_kubectl_exec_is_audited_when_the_tunnel_opens_and_ends(
    audited: Audited,
) -> None:
    code, out, err = await audited.kubectl(
        "exec", "-i", "p", "--", "cat", stdin=b"hello\n"
    )
    assert code == 0, err
    assert out == "hello\n"
    path = "/api/v1/namespaces/default/pods/p/exec"
    events = await audited.wait(lambda es: len(of(es, path)) == 3)
    exec_events = of(events, path)
    assert stages(exec_events) == [
        "RequestReceived",
        "ResponseStarted",
        "ResponseComplete",
    ]
    assert [e.get("responseStatus", {}).get("code") for e in exec_events] == [
        None,
        101,
        101,
    ]
    assert exec_events[0]["objectRef"] == {
        "resource": "pods",
        "namespace": "default",
        "name": "p",
        "apiVersion": "v1",
        "subresource": "exec",
    }
    assert audited.upstream_ids(path) == [exec_events[0]["auditID"]]


@needs_kubectl
async def test_kubectl_as_records_the_oidc_user_and_the_impersonated_one(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with audited_proxy(
        tmp_path, ca, settings=ProxySettings(allow_client_impersonation=True)
    ) as audited:
        audited.stack.fake.sar_rules |= {
            ("oidc:alice", "users", "bob"),
            ("oidc:alice", "groups", "admins"),
        }
        code, _, err = await audited.kubectl(
            "get", "pods", "--as", "bob", "--as-group", "admins"
        )
        assert code == 0, err
        events = await audited.wait(lambda es: len(of(es, PODS)) == 2)
        received, complete = of(events, PODS)
        assert complete["user"]["username"] == "oidc:alice"
        assert complete["impersonatedUser"] == {
            "username": "bob",
            "groups": ["admins", "system:authenticated"],
        }
        # kube-apiserver's impersonation filter runs after its audit filter.
        assert "impersonatedUser" not in received
        (seen,) = [r for r in audited.stack.fake.requests if r.path == PODS]
        assert seen.user is not None
        assert seen.user["username"] == "bob"
        assert seen.headers["Audit-ID"] == complete["auditID"]
        # The proxy's own SubjectAccessReviews are not the user's requests.
        assert not of(events, "/apis/authorization.k8s.io/v1/subjectaccessreviews")


@needs_kubectl
async def test_kubectl_with_a_refused_token_is_audited_as_a_401(
    audited: Audited,
) -> None:
    stranger = sign(new_key("RS256"), claims_for(ISSUER, sub="mallory"))
    config = write_kubectl_config(
        audited.home / "stranger.kubeconfig",
        audited.stack.url,
        audited.stack.ca.cert_pem.bytes(),
        stranger,
    )
    code, _, err = await run_kubectl(
        ["get", "pods"], home=audited.home, kubeconfig=config, timeout=20
    )
    assert code != 0
    assert "the server has asked for the client to provide credentials" in err
    assert audited.stack.fake.requests == []
    # kubectl gives up at discovery, having retried it.
    events = await audited.wait(lambda es: len(of(es, "/api")) >= 2)
    complete = [e for e in events if e["stage"] == "ResponseComplete"]
    assert len(complete) == len(events) // 2
    for event in complete:
        assert event["user"] == {}
        assert event["userAgent"].startswith("kubectl")
        assert event["responseStatus"] == {
            "metadata": {},
            "code": 401,
            "status": "Failure",
            "reason": "Unauthorized",
            "message": "Unauthorized",
        }
        # The engine's reason code: a key the issuer never published.
        assert event["annotations"] == {"kube-oidc-gate.io/refusal": "unknown_kid"}


# --------------------------------------------------------------------------
# The Audit-ID header, both ways


async def test_a_refusal_answered_from_the_cache_is_audited_too(
    audited: Audited,
) -> None:
    stack = audited.stack
    expired = stack.token(exp=int(time.time()) - 600)
    ids = []
    for _ in range(3):  # a miss, then cached refusals answered without a task
        async with stack.client.get(
            stack.url + PODS, headers={"Authorization": f"Bearer {expired}"}
        ) as r:
            assert r.status == 401
            ids.append(r.headers["Audit-Id"])
    async with stack.client.get(stack.url + PODS) as r:
        assert r.status == 401
        ids.append(r.headers["Audit-Id"])
    events = await audited.wait(lambda es: len(of(es, PODS)) == 8)
    complete = [e for e in of(events, PODS) if e["stage"] == "ResponseComplete"]
    assert [e["auditID"] for e in complete] == ids
    assert len(set(ids)) == 4
    notes = [e["annotations"]["kube-oidc-gate.io/refusal"] for e in complete]
    assert notes == ["expired", "expired", "expired", "no bearer token"]


async def test_the_clients_audit_id_never_reaches_the_api_server(
    audited: Audited,
) -> None:
    stack = audited.stack
    async with stack.client.get(
        stack.url + PODS,
        headers={**stack.bearer(), "Audit-ID": "chosen-by-client", "audit-id": "2"},
    ) as r:
        assert r.status == 200
        echoed = r.headers.getall("Audit-Id")
    (seen,) = stack.fake.requests
    (ours,) = seen.headers.getall("Audit-ID")
    assert ours not in ("chosen-by-client", "2")
    assert echoed == [ours]
    events = await audited.wait(lambda es: len(of(es, PODS)) == 2)
    assert {e["auditID"] for e in events} == {ours}


@pytest.mark.parametrize("passthrough", [False, True])
async def test_without_auditing_no_audit_id_is_forwarded(
    tmp_path: Path, ca: trustme.CA, passthrough: bool
) -> None:
    settings = ProxySettings(token_passthrough=passthrough)
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        foreign = sign(new_key("RS256"), claims_for("https://elsewhere.example"))
        token = foreign if passthrough else stack.token()
        async with stack.client.get(
            stack.url + PODS,
            headers={"Authorization": f"Bearer {token}", "Audit-ID": "from-client"},
        ) as r:
            # The fake API server does not know the passed-through token.
            assert r.status == (401 if passthrough else 200)
            assert "Audit-Id" not in r.headers
        (seen,) = stack.fake.requests
        assert "Audit-ID" not in seen.headers


# --------------------------------------------------------------------------
# Policy: levels, rules, stages


POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: ["/api", "/api/*", "/apis", "/apis/*"]
  - level: None
    users: ["oidc:bob"]
  - level: RequestResponse
    resources:
      - group: ""
        resources: ["configmaps"]
  - level: Request
    verbs: ["get"]
  - level: Metadata
"""


async def test_the_policy_selects_what_is_written(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with audited_proxy(tmp_path, ca, POLICY) as audited:
        stack = audited.stack
        alice, bob = stack.bearer(), stack.bearer(sub="bob")
        configmaps = "/api/v1/namespaces/default/configmaps"
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
        for method, path, headers, body in (
            ("GET", "/api/v1", alice, None),  # level None: discovery
            ("GET", PODS, bob, None),  # level None: bob
            ("GET", PODS, alice, None),  # Metadata
            ("GET", PODS + "/p", alice, None),  # Request (no body to record)
            ("POST", configmaps, alice, json.dumps(cm).encode()),
        ):
            async with stack.client.request(
                method,
                stack.url + path,
                headers={**headers, "Content-Type": "application/json"},
                data=body,
            ) as r:
                assert r.status in (200, 201), await r.text()
                assert ("Audit-Id" in r.headers) == (
                    path != "/api/v1" and headers is alice
                )
        events = await audited.wait(lambda es: len(es) == 3)
        assert stages(events) == ["ResponseComplete"] * 3
        listed, got, created = events
        assert (listed["verb"], listed["level"]) == ("list", "Metadata")
        assert listed["user"]["username"] == "oidc:alice"
        assert (got["verb"], got["level"]) == ("get", "Request")
        assert "requestObject" not in got
        assert "responseObject" not in got
        assert (created["verb"], created["level"]) == ("create", "RequestResponse")
        assert created["requestObject"] == cm
        assert created["responseObject"]["metadata"]["uid"] == "u1"
        assert created["responseStatus"] == {"metadata": {}, "code": 201}
        # Bob's and the discovery request went upstream without an id of ours.
        unaudited = [r for r in stack.fake.requests if "Audit-ID" not in r.headers]
        assert {r.path for r in unaudited} == {"/api/v1", PODS}


async def test_a_streamed_request_body_is_not_recorded_and_says_so(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with audited_proxy(tmp_path, ca, POLICY) as audited:
        stack = audited.stack
        body = b'{"kind":"ConfigMap","data":{"k":"' + b"x" * 100_000 + b'"}}'
        async with stack.client.post(
            stack.url + "/api/v1/namespaces/default/configmaps",
            headers={**stack.bearer(), "Content-Type": "application/json"},
            data=body,
        ) as r:
            assert r.status == 201
        (event,) = await audited.wait(lambda es: len(es) == 1)
        assert "requestObject" not in event
        assert event["annotations"]["kube-oidc-gate.io/request-object"] == (
            "omitted: streamed request body"
        )
        # The answer is read whole but is larger than the recorded limit.
        assert "responseObject" not in event
        assert event["annotations"]["kube-oidc-gate.io/response-object"].startswith(
            "omitted"
        )


class _Broken:
    """An authenticator that fails unexpectedly (a bug, not a refusal)."""

    def lookup(self, token: str) -> tuple[bytes, UserInfo | None]:
        return b"", None

    async def validate(self, token: str, key: bytes) -> UserInfo | None:
        raise RuntimeError("boom")


async def test_an_unexpected_failure_is_a_panic_event(
    tmp_path: Path, ca: trustme.CA
) -> None:
    (tmp_path / "policy.yaml").write_text(METADATA)
    log = tmp_path / "audit.log"
    auditor = await Auditor.from_options(
        AuditOptions(
            policy=load_policy(str(tmp_path / "policy.yaml")), log_path=str(log)
        )
    )
    try:
        async with (
            run_proxy(tmp_path, ca, authenticator=_Broken(), auditor=auditor) as stack,
            stack.client.get(stack.url + PODS, headers=stack.bearer()) as r,
        ):
            assert r.status == 500
            audit_id = r.headers["Audit-Id"]
    finally:
        await auditor.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for event in events:
        assert validate_event(event) == []
    assert stages(events) == ["RequestReceived", "Panic"]
    assert events[1]["auditID"] == audit_id
    assert events[1]["responseStatus"]["code"] == 500


# --------------------------------------------------------------------------
# A down audit webhook costs the requests nothing


async def test_a_down_audit_webhook_does_not_slow_proxied_requests(
    tmp_path: Path, ca: trustme.CA
) -> None:
    (tmp_path / "policy.yaml").write_text(METADATA)
    metrics = Metrics()
    config = upstream_kubeconfig(
        tmp_path / "audit-webhook.yaml",
        f"https://127.0.0.1:{free_port()}/audit",
        ca.cert_pem.bytes(),
        token="audit-sink-token",
    )
    backend = WebhookBackend(
        str(config),
        metrics=metrics,
        buffer_size=50,
        batch_max_size=10,
        batch_max_wait=0.01,
        initial_backoff=0.05,
    )
    await backend.start()
    auditor = Auditor(load_policy(str(tmp_path / "policy.yaml")), [backend])
    rounds = 300
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        async with (
            run_proxy(tmp_path / "a", ca) as plain,
            run_proxy(tmp_path / "b", ca, auditor=auditor) as down,
        ):
            times: dict[str, list[float]] = {"plain": [], "down": []}
            headers = {"plain": plain.bearer(), "down": down.bearer()}
            for _ in range(rounds):  # interleaved: the machine's load is shared
                for name, stack in (("plain", plain), ("down", down)):
                    start = time.perf_counter()
                    async with stack.client.get(
                        stack.url + PODS, headers=headers[name]
                    ) as r:
                        assert r.status == 200
                        await r.read()
                    times[name].append(time.perf_counter() - start)
            p99 = {
                name: statistics.quantiles(ts, n=100)[98] for name, ts in times.items()
            }
            print(
                f"p99 plain {p99['plain'] * 1e3:.2f} ms, with a down webhook "
                f"{p99['down'] * 1e3:.2f} ms; dropped {backend.drops.count}"
            )
            assert p99["down"] < p99["plain"] * 2 + 0.01, p99
            assert len(down.fake.requests) == rounds
    finally:
        await auditor.close()
    dropped = metric(
        metrics, "kube_oidc_gate_audit_events_dropped_total", backend="webhook"
    )
    # Two events a request, none delivered: each one dropped, and counted.
    assert dropped == backend.drops.count == 2 * rounds
