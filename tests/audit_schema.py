"""A validator for ``audit.k8s.io/v1`` ``Event`` and ``EventList`` objects.

The ``kubernetes`` package (``kubernetes.client``) has no audit.k8s.io
models, so the field list, the required fields and the types of ``Event``,
``EventList`` and ``ObjectReference`` are ported from kube-apiserver's
``k8s.io/apiserver/pkg/apis/audit/v1/types.go``; the nested types the
package does have are checked against its models: ``user`` and
``impersonatedUser`` against ``V1UserInfo``, ``responseStatus`` against
``V1Status`` (their ``attribute_map`` and ``openapi_types``). Unknown fields
are errors: kube's strict decoding of our output would refuse them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import V1Status, V1UserInfo

__all__ = ["validate_event", "validate_event_list"]

LEVELS = {"None", "Metadata", "Request", "RequestResponse"}
STAGES = {"RequestReceived", "ResponseStarted", "ResponseComplete", "Panic"}
#: metav1.MicroTime's JSON form (RFC 3339, six fractional digits, UTC).
MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

Check = Callable[[Any, str], list[str]]


def _string(value: Any, where: str) -> list[str]:
    return [] if isinstance(value, str) else [f"{where}: not a string"]


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return []
    return [f"{where}: not a list of strings"]


def _string_map(value: Any, where: str) -> list[str]:
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return []
    return [f"{where}: not a map of strings"]


def _one_of(allowed: set[str]) -> Check:
    def check(value: Any, where: str) -> list[str]:
        return [] if value in allowed else [f"{where}: {value!r} not in {allowed}"]

    return check


def _micro_time(value: Any, where: str) -> list[str]:
    if isinstance(value, str) and MICRO_TIME.fullmatch(value):
        return []
    return [f"{where}: {value!r} is not a MicroTime"]


def _object(value: Any, where: str) -> list[str]:
    return [] if isinstance(value, dict | list) else [f"{where}: not an object"]


_OPENAPI: dict[str, Check] = {
    "str": _string,
    "int": lambda v, w: [] if type(v) is int else [f"{w}: not an int"],
    "List[str]": _strings,
    "Dict[str, List[str]]": lambda v, w: (
        []
        if isinstance(v, dict) and all(_strings(x, w) == [] for x in v.values())
        else [f"{w}: not a map of string lists"]
    ),
    "V1ListMeta": lambda v, w: [] if isinstance(v, dict) else [f"{w}: not a map"],
    "V1StatusDetails": lambda v, w: [] if isinstance(v, dict) else [f"{w}: not a map"],
}


def _model(model: type) -> Check:
    """Fields of a ``kubernetes.client`` model, by JSON name, with its types."""
    types: Mapping[str, str] = model.openapi_types  # type: ignore[attr-defined]
    names: Mapping[str, str] = model.attribute_map  # type: ignore[attr-defined]
    by_json = {names[python]: types[python] for python in names}

    def check(value: Any, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        problems: list[str] = []
        for key, item in value.items():
            kind = by_json.get(key)
            if kind is None:
                problems.append(f"{where}.{key}: not a field of {model.__name__}")
            else:
                problems += _OPENAPI[kind](item, f"{where}.{key}")
        return problems

    return check


#: ObjectReference: every field optional, all strings.
_OBJECT_REF = {
    k: _string
    for k in (
        "resource",
        "namespace",
        "name",
        "uid",
        "apiGroup",
        "apiVersion",
        "resourceVersion",
        "subresource",
    )
}


def _object_ref(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    problems: list[str] = []
    for key, item in value.items():
        if key not in _OBJECT_REF:
            problems.append(f"{where}.{key}: not a field of ObjectReference")
        else:
            problems += _OBJECT_REF[key](item, f"{where}.{key}")
    return problems


#: Event's fields (json name -> check, required), from types.go.
EVENT_FIELDS: dict[str, tuple[Check, bool]] = {
    "kind": (_one_of({"Event"}), True),
    "apiVersion": (_one_of({"audit.k8s.io/v1"}), True),
    "level": (_one_of(LEVELS), True),
    "auditID": (_string, True),
    "stage": (_one_of(STAGES), True),
    "requestURI": (_string, True),
    "verb": (_string, True),
    "user": (_model(V1UserInfo), True),
    "impersonatedUser": (_model(V1UserInfo), False),
    "sourceIPs": (_strings, False),
    "userAgent": (_string, False),
    "objectRef": (_object_ref, False),
    "responseStatus": (_model(V1Status), False),
    "requestObject": (_object, False),
    "responseObject": (_object, False),
    "requestReceivedTimestamp": (_micro_time, True),
    "stageTimestamp": (_micro_time, True),
    "annotations": (_string_map, False),
}


def validate_event(event: Any) -> list[str]:
    """Every problem of ``event`` (empty: a valid ``audit.k8s.io/v1`` Event)."""
    if not isinstance(event, dict):
        return ["event: not an object"]
    problems: list[str] = []
    for name, (check, required) in EVENT_FIELDS.items():
        if name not in event:
            if required:
                problems.append(f"event.{name}: required")
            continue
        problems += check(event[name], f"event.{name}")
    problems += [
        f"event.{k}: not a field of Event" for k in event if k not in EVENT_FIELDS
    ]
    if event.get("level") == "Metadata" and (
        "requestObject" in event or "responseObject" in event
    ):
        problems.append("event: objects recorded at level Metadata")
    if event.get("level") == "Request" and "responseObject" in event:
        problems.append("event: responseObject recorded at level Request")
    return problems


def validate_event_list(value: Any) -> list[str]:
    """Every problem of an ``EventList`` and of each of its items."""
    if not isinstance(value, dict):
        return ["list: not an object"]
    problems: list[str] = []
    if value.get("kind") != "EventList":
        problems.append("list.kind: not EventList")
    if value.get("apiVersion") != "audit.k8s.io/v1":
        problems.append("list.apiVersion: not audit.k8s.io/v1")
    extra = set(value) - {"kind", "apiVersion", "metadata", "items"}
    problems += [f"list.{k}: not a field of EventList" for k in sorted(extra)]
    items = value.get("items")
    if not isinstance(items, list):
        return [*problems, "list.items: required list"]
    for i, item in enumerate(items):
        problems += [f"items[{i}]: {p}" for p in validate_event(item)]
    return problems
