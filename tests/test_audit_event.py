"""Audit events and the ``Auditor`` API the proxy's handler calls.

Every event produced here is checked with ``tests.audit_schema`` (the
``audit.k8s.io/v1`` types ported from kube-apiserver, nested types checked
against the ``kubernetes`` package's models, which lack audit.k8s.io).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.audit.auditor import Auditor
from proxy.audit.event import (
    body_object,
    micro_time,
    response_status,
    source_ips,
    stages_to_emit,
)
from proxy.audit.policy import RequestAuditConfig, parse_policy
from proxy.kube import UserInfo, status_body
from tests.audit_schema import validate_event, validate_event_list

ALICE = UserInfo(
    username="oidc:alice",
    uid="u-1",
    groups=("oidc:devs",),
)
BOB = UserInfo(username="bob", groups=("admins",))


class Capture:
    """A backend that keeps what it is given (the real ones: test_audit_backend)."""

    name = "capture"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def auditor(rules: list[dict[str, Any]], **policy: Any) -> tuple[Auditor, Capture]:
    capture = Capture()
    parsed = parse_policy(
        {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": rules, **policy},
        "test",
    )
    ticks = iter(range(1_000_000))
    return (
        Auditor(
            parsed,
            [capture],
            clock=lambda: 1_767_225_600.0 + next(ticks) * 0.001,
            max_object_bytes=1024,
        ),
        capture,
    )


def valid(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        assert validate_event(event) == [], event
        json.dumps(event)
    return events


def test_micro_time_is_kube_apiservers_form() -> None:
    moment = datetime(2026, 1, 31, 12, 0, 5, 123456, tzinfo=UTC).timestamp()
    assert micro_time(moment) == "2026-01-31T12:00:05.123456Z"
    assert micro_time(0.0) == "1970-01-01T00:00:00.000000Z"


def test_a_metadata_request_has_received_and_complete() -> None:
    aud, capture = auditor([{"level": "Metadata"}])
    ctx = aud.begin(
        "GET",
        "/api/v1/namespaces/default/pods/web",
        "",
        request_uri="/api/v1/namespaces/default/pods/web",
        user=ALICE,
        source_ips=["10.0.0.7"],
        user_agent="kubectl/v1.31.0",
    )
    assert ctx is not None
    assert re.fullmatch(r"[0-9a-f-]{36}", ctx.audit_id)
    assert not ctx.wants_request_body
    assert not ctx.wants_response_body
    ctx.complete(200, b'{"kind":"Pod"}', "application/json")
    ctx.complete(500)  # once only
    received, complete = valid(capture.events)
    assert received["stage"] == "RequestReceived"
    assert "responseStatus" not in received
    assert complete["stage"] == "ResponseComplete"
    assert complete["responseStatus"] == {"metadata": {}, "code": 200}
    for event in (received, complete):
        assert event["auditID"] == ctx.audit_id
        assert event["verb"] == "get"
        assert event["user"] == {
            "username": "oidc:alice",
            "uid": "u-1",
            "groups": ["oidc:devs", "system:authenticated"],
        }
        assert event["objectRef"] == {
            "resource": "pods",
            "namespace": "default",
            "name": "web",
            "apiVersion": "v1",
        }
        assert event["sourceIPs"] == ["10.0.0.7"]
        assert event["userAgent"] == "kubectl/v1.31.0"
        assert "responseObject" not in event
        assert event["requestReceivedTimestamp"] == "2026-01-01T00:00:00.000000Z"
    assert complete["stageTimestamp"] > received["stageTimestamp"]


def test_level_none_costs_nothing_and_emits_nothing() -> None:
    aud, capture = auditor([{"level": "None", "users": ["oidc:alice"]}])
    assert aud.begin("GET", "/api/v1/pods", "", user=ALICE) is None
    assert capture.events == []
    # Another user falls through every rule: None too.
    assert aud.begin("GET", "/api/v1/pods", "", user=BOB) is None


def test_request_response_records_json_bodies_and_drops_managed_fields() -> None:
    aud, capture = auditor(
        [{"level": "RequestResponse", "resources": [{"resources": ["configmaps"]}]}],
        omitManagedFields=True,
    )
    ctx = aud.begin("POST", "/api/v1/namespaces/ns/configmaps", "", user=ALICE)
    assert ctx is not None
    assert ctx.wants_request_body
    assert ctx.wants_response_body
    body = {"kind": "ConfigMap", "metadata": {"name": "c", "managedFields": [{}]}}
    ctx.request_body(json.dumps(body).encode(), "application/json")
    ctx.complete(201, json.dumps(body).encode(), "application/json; charset=utf-8")
    received, complete = valid(capture.events)
    assert "requestObject" not in received
    assert complete["requestObject"] == {"kind": "ConfigMap", "metadata": {"name": "c"}}
    assert complete["responseObject"] == complete["requestObject"]
    assert complete["verb"] == "create"
    assert complete["objectRef"] == {
        "resource": "configmaps",
        "namespace": "ns",
        "apiVersion": "v1",
    }


@pytest.mark.parametrize(
    ("body", "content_type", "note"),
    [
        (b"\x0a\x02k8s", "application/vnd.kubernetes.protobuf", "not a JSON body"),
        (b"{", "application/json", "not valid JSON"),
        (b'{"a":"' + b"x" * 2000 + b'"}', "application/json", "over the 1024-byte"),
    ],
    ids=["protobuf", "broken-json", "too-large"],
)
def test_bodies_not_recorded_say_why(body: bytes, content_type: str, note: str) -> None:
    aud, capture = auditor([{"level": "RequestResponse"}])
    ctx = aud.begin("PUT", "/api/v1/namespaces/ns/configmaps/c", "", user=ALICE)
    assert ctx is not None
    ctx.request_body(body, content_type)
    ctx.complete(200, body, content_type)
    complete = valid(capture.events)[-1]
    assert "requestObject" not in complete
    assert "responseObject" not in complete
    assert note in complete["annotations"]["kube-oidc-gate.io/request-object"]
    assert note in complete["annotations"]["kube-oidc-gate.io/response-object"]


def test_non_resource_requests_never_record_bodies() -> None:
    aud, capture = auditor([{"level": "RequestResponse"}])
    ctx = aud.begin("GET", "/version", "", user=ALICE)
    assert ctx is not None
    assert not ctx.wants_request_body
    ctx.complete(200, b'{"major":"1"}', "application/json")
    complete = valid(capture.events)[-1]
    assert "responseObject" not in complete
    assert "objectRef" not in complete
    assert complete["verb"] == "get"


def test_request_level_records_the_request_only() -> None:
    aud, capture = auditor([{"level": "Request"}])
    ctx = aud.begin(
        "PATCH", "/apis/apps/v1/namespaces/ns/deployments/d", "", user=ALICE
    )
    assert ctx is not None
    assert ctx.wants_request_body
    assert not ctx.wants_response_body
    ctx.request_body(b'{"spec":{"replicas":2}}', "application/merge-patch+json")
    ctx.complete(200, b'{"kind":"Deployment"}', "application/json")
    complete = valid(capture.events)[-1]
    assert complete["requestObject"] == {"spec": {"replicas": 2}}
    assert "responseObject" not in complete
    assert complete["objectRef"]["apiGroup"] == "apps"


def test_long_running_requests_get_response_started() -> None:
    aud, capture = auditor([{"level": "Metadata"}])
    ctx = aud.begin(
        "GET", "/api/v1/namespaces/ns/pods", "watch=true", user=ALICE, long_running=True
    )
    assert ctx is not None
    ctx.response_started(200)
    ctx.response_started(200)
    ctx.complete(200)
    stages = [e["stage"] for e in valid(capture.events)]
    assert stages == ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    assert capture.events[0]["verb"] == "watch"
    assert capture.events[0]["requestURI"] == "/api/v1/namespaces/ns/pods?watch=true"
    # An ordinary request has no ResponseStarted stage.
    plain = aud.begin("GET", "/api/v1/namespaces/ns/pods", "", user=ALICE)
    assert plain is not None
    plain.response_started(200)
    plain.complete(200)
    assert [e["stage"] for e in capture.events[3:]] == [
        "RequestReceived",
        "ResponseComplete",
    ]


def test_omitted_stages_are_not_emitted() -> None:
    aud, capture = auditor(
        [{"level": "Metadata", "omitStages": ["ResponseStarted"]}],
        omitStages=["RequestReceived"],
    )
    ctx = aud.begin("GET", "/api/v1/pods", "watch=1", user=ALICE, long_running=True)
    assert ctx is not None
    ctx.response_started(200)
    ctx.complete(200)
    assert [e["stage"] for e in valid(capture.events)] == ["ResponseComplete"]


def test_panic_replaces_the_end() -> None:
    aud, capture = auditor([{"level": "Metadata"}])
    ctx = aud.begin("DELETE", "/api/v1/namespaces/ns/pods", "", user=ALICE)
    assert ctx is not None
    ctx.panic()
    ctx.complete(200)
    _received, panic = valid(capture.events)
    assert panic["stage"] == "Panic"
    assert panic["verb"] == "deletecollection"
    assert panic["responseStatus"]["code"] == 500
    assert panic["responseStatus"]["status"] == "Failure"


def test_impersonated_user_from_the_stage_after_approval() -> None:
    aud, capture = auditor([{"level": "Metadata", "users": ["oidc:alice"]}])
    ctx = aud.begin("GET", "/api/v1/pods", "", user=ALICE)
    assert ctx is not None
    ctx.set_impersonated(BOB)
    ctx.complete(200)
    received, complete = valid(capture.events)
    assert "impersonatedUser" not in received
    assert complete["user"]["username"] == "oidc:alice"
    assert complete["impersonatedUser"] == {
        "username": "bob",
        "groups": ["admins", "system:authenticated"],
    }


def test_a_refused_token_is_audited_without_a_user() -> None:
    aud, capture = auditor(
        [
            {"level": "None", "userGroups": ["system:authenticated"]},
            {"level": "Metadata"},
        ]
    )
    ctx = aud.begin("GET", "/api/v1/pods", "", user=None, source_ips=["192.0.2.1"])
    assert ctx is not None
    ctx.annotate("kube-oidc-gate.io/refusal", "token_expired")
    ctx.complete(401, status_body(401, "Unauthorized"), "application/json")
    complete = valid(capture.events)[-1]
    assert complete["user"] == {}
    assert complete["responseStatus"] == {
        "metadata": {},
        "code": 401,
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
    }
    assert complete["annotations"] == {"kube-oidc-gate.io/refusal": "token_expired"}
    # An authenticated user matches the first rule: nothing recorded.
    assert aud.begin("GET", "/api/v1/pods", "", user=ALICE) is None


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("5b0c6d2e-aaaa-bbbb-cccc-1234567890ab", True),
        ("front-proxy-id-42", True),
        ("", False),
        ("has space", False),
        ("x" * 129, False),
        ("new\nline", False),
    ],
    ids=["uuid", "token", "empty", "space", "too-long", "newline"],
)
def test_a_trusted_audit_id_is_kept_when_sane(incoming: str, kept: bool) -> None:
    aud, capture = auditor([{"level": "Metadata"}])
    ctx = aud.begin("GET", "/api/v1/pods", "", user=ALICE, audit_id=incoming)
    assert ctx is not None
    assert (ctx.audit_id == incoming) is kept
    assert capture.events[0]["auditID"] == ctx.audit_id


def test_audit_ids_are_unique_per_request() -> None:
    aud, _ = auditor([{"level": "Metadata"}])
    ids = set()
    for _ in range(200):
        ctx = aud.begin("GET", "/api/v1/pods", "", user=ALICE)
        assert ctx is not None
        ids.add(ctx.audit_id)
    assert len(ids) == 200


@pytest.mark.parametrize(
    ("peer", "xff", "real", "trusted", "expected"),
    [
        ("10.0.0.9", ["1.2.3.4"], None, False, ["10.0.0.9"]),
        (
            "10.0.0.9",
            ["1.2.3.4, 5.6.7.8"],
            None,
            True,
            ["1.2.3.4", "5.6.7.8", "10.0.0.9"],
        ),
        ("10.0.0.9", ["1.2.3.4", "10.0.0.9"], None, True, ["1.2.3.4", "10.0.0.9"]),
        (
            "10.0.0.9",
            ["junk, 1.2.3.4"],
            "9.9.9.9",
            True,
            ["1.2.3.4", "9.9.9.9", "10.0.0.9"],
        ),
        ("10.0.0.9", ["1.2.3.4"], "1.2.3.4", True, ["1.2.3.4", "10.0.0.9"]),
        ("fe80::1%eth0", [], None, False, ["fe80::1"]),
        (None, [], None, False, []),
    ],
    ids=[
        "untrusted",
        "trusted",
        "peer-last",
        "real-ip",
        "real-ip-listed",
        "zone",
        "none",
    ],
)
def test_source_ips(
    peer: str | None,
    xff: list[str],
    real: str | None,
    trusted: bool,
    expected: list[str],
) -> None:
    got = source_ips(peer, forwarded_for=xff, real_ip=real, trusted=trusted)
    assert got == expected


def test_response_status_of_a_non_status_error_body() -> None:
    assert response_status(502, b"<html>", "text/html") == {"metadata": {}, "code": 502}
    assert response_status(404, b'{"kind":"Pod"}', "application/json") == {
        "metadata": {},
        "code": 404,
    }


@pytest.mark.parametrize(
    ("level", "omit", "long_running", "stages"),
    [
        ("None", (), False, ()),
        ("Metadata", (), False, ("RequestReceived", "ResponseComplete")),
        (
            "Metadata",
            (),
            True,
            ("RequestReceived", "ResponseStarted", "ResponseComplete"),
        ),
        (
            "Request",
            ("RequestReceived",),
            True,
            ("ResponseStarted", "ResponseComplete"),
        ),
        ("RequestResponse", ("ResponseComplete", "RequestReceived"), False, ()),
    ],
)
def test_stages_to_emit(
    level: str, omit: tuple[str, ...], long_running: bool, stages: tuple[str, ...]
) -> None:
    config = RequestAuditConfig(level=level, omit_stages=frozenset(omit))
    assert stages_to_emit(config, long_running=long_running) == stages


def test_body_object_of_a_list_drops_each_items_managed_fields() -> None:
    body = {
        "kind": "PodList",
        "items": [{"metadata": {"name": "a", "managedFields": []}}, "odd"],
    }
    obj, note = body_object(
        json.dumps(body).encode(), "application/json", omit_managed_fields=True
    )
    assert note is None
    assert obj == {"kind": "PodList", "items": [{"metadata": {"name": "a"}}, "odd"]}


def test_the_validator_refuses_what_kube_would() -> None:
    """A test that cannot fail is a defect: the schema catches bad events."""
    aud, capture = auditor([{"level": "Metadata"}])
    ctx = aud.begin("GET", "/api/v1/pods", "", user=ALICE)
    assert ctx is not None
    good = dict(capture.events[0])
    assert validate_event(good) == []
    assert validate_event({**good, "stageTimestamp": "2026-01-01T00:00:00Z"})
    assert validate_event({**good, "stage": "Done"})
    assert validate_event({**good, "user": {"name": "x"}})
    assert validate_event({**good, "responseStatus": {"code": "200"}})
    assert validate_event({**good, "objectRef": {"kind": "Pod"}})
    assert validate_event({**good, "requestObject": {"a": 1}})
    assert validate_event({k: v for k, v in good.items() if k != "auditID"})
    assert validate_event({**good, "extra": 1})
    assert validate_event_list({"kind": "EventList", "items": [good]}) == [
        "list.apiVersion: not audit.k8s.io/v1"
    ]
