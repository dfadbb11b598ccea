"""``audit.k8s.io/v1`` ``Event`` objects, shaped as kube-apiserver writes them.

An event is a plain ``dict`` ready for ``json.dumps``: the backends write it
as one JSON line or post it in an ``EventList``; nothing else reads it. The
fields and their rules (``k8s.io/apiserver/pkg/apis/audit/v1/types.go``):

- ``level``, ``auditID``, ``stage``, ``requestURI`` (path and query as the
  client sent them), ``verb`` and ``user`` are always present; ``user`` is
  the OIDC identity the token mapped to, with ``system:authenticated`` added
  as the API server adds it, and ``{}`` for a request whose token was
  refused (kube-apiserver's event for a failed authentication has no user
  either);
- ``impersonatedUser``: the approved ``kubectl --as`` identity, from the
  stage after it was approved (kube-apiserver's impersonation filter runs
  after its audit filter, so its ``RequestReceived`` has none either);
- ``sourceIPs`` (``source_ips``), ``userAgent``, ``objectRef`` for every
  resource request (``proxy.audit.requestinfo``, empty fields left out),
  ``responseStatus`` (``{"metadata": {}, "code": N}``, plus ``status``,
  ``reason`` and ``message`` when the body was a ``Status``), ``annotations``;
- ``requestObject`` at level ``Request`` and above, ``responseObject`` at
  ``RequestResponse``: resource requests only, JSON bodies only (a
  ``Content-Type`` naming ``json``), at most ``max_object_bytes`` each
  (``DEFAULT_MAX_OBJECT_BYTES``, 64 KiB: a whole Deployment or ConfigMap,
  not a large list). A body that is not JSON, does not parse or is larger is
  left out and the event says why in the annotation
  ``kube-oidc-gate.io/request-object`` / ``.../response-object``. A watch's
  or log's streamed response is never recorded. ``omitManagedFields`` drops
  ``metadata.managedFields`` from the object and from a list's items;
- ``requestReceivedTimestamp`` and ``stageTimestamp``: UTC with six
  fractional digits and ``Z`` (``metav1.MicroTime``'s RFC 3339 form).

``stages_to_emit`` says which stages a request gets: ``RequestReceived``,
``ResponseStarted`` only for a long-running request (watch, logs, exec, ...),
``ResponseComplete`` (or ``Panic`` instead when the handler fails), minus the
policy's ``omitStages``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from proxy.audit.policy import LEVELS, RequestAuditConfig
from proxy.audit.requestinfo import RequestInfo
from proxy.kube import SYSTEM_AUTHENTICATED, UserInfo

__all__ = [
    "API_VERSION",
    "DEFAULT_MAX_OBJECT_BYTES",
    "REQUEST_OBJECT_NOTE",
    "RESPONSE_OBJECT_NOTE",
    "at_least",
    "body_object",
    "event_list",
    "micro_time",
    "new_event",
    "object_ref",
    "response_status",
    "source_ips",
    "stages_to_emit",
    "user_info",
]

API_VERSION: Final = "audit.k8s.io/v1"
#: Largest request or response body recorded as an object (module docstring).
DEFAULT_MAX_OBJECT_BYTES: Final = 64 * 1024
#: Annotations saying why a body was not recorded.
REQUEST_OBJECT_NOTE: Final = "kube-oidc-gate.io/request-object"
RESPONSE_OBJECT_NOTE: Final = "kube-oidc-gate.io/response-object"


#: The last second ``micro_time`` formatted, and its text up to the seconds:
#: a request's four timestamps mostly fall in one second, and ``strftime``
#: was a fifth of an event's cost.
_last_second: tuple[int, str] = (-1, "")


def micro_time(timestamp: float) -> str:
    """``metav1.MicroTime`` as JSON: ``2006-01-02T15:04:05.000000Z``."""
    global _last_second  # noqa: PLW0603 - a one-entry cache, loop thread only
    second = int(timestamp // 1)
    micros = round((timestamp - second) * 1e6)
    if micros >= 1_000_000:  # rounding up into the next second
        second, micros = second + 1, micros - 1_000_000
    cached, prefix = _last_second
    if cached != second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, prefix)
    return f"{prefix}.{micros:06d}Z"


def user_info(user: UserInfo | None) -> dict[str, Any]:
    """``authentication.k8s.io/v1`` ``UserInfo`` as the API server sees it
    (``system:authenticated`` added; empty fields left out).
    """
    if user is None:
        return {}
    out: dict[str, Any] = {"username": user.username}
    if user.uid:
        out["uid"] = user.uid
    groups = list(user.groups)
    if SYSTEM_AUTHENTICATED not in groups:
        groups.append(SYSTEM_AUTHENTICATED)
    out["groups"] = groups
    if user.extra:
        out["extra"] = {k: list(v) for k, v in user.extra.items()}
    return out


def object_ref(info: RequestInfo) -> dict[str, str] | None:
    """The ``objectRef`` of a resource request (kube's ``LogRequestMetadata``)."""
    if not info.is_resource_request:
        return None
    ref = {
        "resource": info.resource,
        "namespace": info.namespace,
        "name": info.name,
        "apiGroup": info.api_group,
        "apiVersion": info.api_version,
        "subresource": info.subresource,
    }
    return {k: v for k, v in ref.items() if v}


def _ips(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            try:
                out.append(str(ipaddress.ip_address(part.strip())))
            except ValueError:
                continue
    return out


def source_ips(
    peer: str | None,
    *,
    forwarded_for: Sequence[str] = (),
    real_ip: str | None = None,
    trusted: bool = False,
) -> list[str]:
    """``sourceIPs`` as kube's ``utilnet.SourceIPs`` lists them (the
    ``X-Forwarded-For`` addresses, ``X-Real-Ip`` unless already listed, then
    the peer unless it is the last one), except that the headers count only
    when ``trusted``: the peer is one of ``--trusted-proxies``. From anyone
    else they are ignored, as the proxy ignores them when forwarding.
    """
    ips: list[str] = []
    if trusted:
        ips = _ips(forwarded_for)
        if real_ip is not None:
            ips.extend(ip for ip in _ips([real_ip]) if ip not in ips)
    if peer is not None:
        address = _ips([peer.split("%", 1)[0]])
        if address and (not ips or ips[-1] != address[0]):
            ips.append(address[0])
    return ips


def response_status(
    code: int, body: bytes | None = None, content_type: str | None = None
) -> dict[str, Any]:
    """``responseStatus``: the code, and a ``Status`` body's own fields."""
    status: dict[str, Any] = {"metadata": {}, "code": code}
    if body and content_type and "json" in content_type.lower() and len(body) < 65536:
        try:
            parsed = json.loads(body)
        except ValueError:
            return status
        if isinstance(parsed, dict) and parsed.get("kind") == "Status":
            for key in ("status", "message", "reason"):
                if isinstance(parsed.get(key), str) and parsed[key]:
                    status[key] = parsed[key]
    return status


def _without_managed_fields(obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    metadata = out.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        out["metadata"] = {k: v for k, v in metadata.items() if k != "managedFields"}
    items = out.get("items")
    if isinstance(items, list):
        out["items"] = [_without_managed_fields(i) for i in items]
    return out


def body_object(
    body: bytes | None,
    content_type: str | None,
    *,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    omit_managed_fields: bool = False,
) -> tuple[Any, str | None]:
    """The body as an object to record, or ``None`` and why not (module docstring)."""
    if not body:
        return None, None
    if not content_type or "json" not in content_type.lower():
        return None, "omitted: not a JSON body"
    if len(body) > max_bytes:
        return None, f"omitted: {len(body)} bytes, over the {max_bytes}-byte limit"
    try:
        parsed = json.loads(body)
    except ValueError:
        return None, "omitted: not valid JSON"
    if omit_managed_fields:
        parsed = _without_managed_fields(parsed)
    return parsed, None


def stages_to_emit(
    config: RequestAuditConfig, *, long_running: bool
) -> tuple[str, ...]:
    """The stages a request that ends normally is recorded at (none at level
    ``None``); ``Panic`` replaces ``ResponseComplete`` if the handler fails.
    """
    if config.level == "None":
        return ()
    stages = ["RequestReceived"]
    if long_running:
        stages.append("ResponseStarted")
    stages.append("ResponseComplete")
    return tuple(s for s in stages if s not in config.omit_stages)


def at_least(level: str, wanted: str) -> bool:
    """Whether ``level`` records what ``wanted`` records."""
    return LEVELS.index(level) >= LEVELS.index(wanted)


def new_event(
    *,
    level: str,
    audit_id: str,
    stage: str,
    request_uri: str,
    verb: str,
    user: Mapping[str, Any],
    received: float,
    now: float,
    impersonated: Mapping[str, Any] | None = None,
    ips: Sequence[str] = (),
    user_agent: str = "",
    ref: Mapping[str, str] | None = None,
    status: Mapping[str, Any] | None = None,
    request_object: Any = None,
    response_object: Any = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One ``Event``, optional fields left out when empty (``omitempty``)."""
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": API_VERSION,
        "level": level,
        "auditID": audit_id,
        "stage": stage,
        "requestURI": request_uri,
        "verb": verb,
        "user": dict(user),
    }
    if impersonated:
        event["impersonatedUser"] = dict(impersonated)
    if ips:
        event["sourceIPs"] = list(ips)
    if user_agent:
        event["userAgent"] = user_agent
    if ref:
        event["objectRef"] = dict(ref)
    if status is not None:
        event["responseStatus"] = dict(status)
    if request_object is not None:
        event["requestObject"] = request_object
    if response_object is not None:
        event["responseObject"] = response_object
    event["requestReceivedTimestamp"] = micro_time(received)
    event["stageTimestamp"] = micro_time(now)
    if annotations:
        event["annotations"] = dict(annotations)
    return event


def event_list(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An ``EventList`` (what the webhook backend posts)."""
    return {
        "kind": "EventList",
        "apiVersion": API_VERSION,
        "metadata": {},
        "items": list(events),
    }
