"""What a request asks for, in kube-apiserver's own terms (``RequestInfo``).

An audit policy matches on verb, API group, namespace, resource, subresource
and name, and an audit event's ``objectRef`` carries them; both must mean what
they mean to kube-apiserver, so this is a port of its ``RequestInfoFactory``
(``k8s.io/apiserver/pkg/endpoints/request/requestinfo.go``) with the API
prefixes ``api`` (groupless) and ``apis``. ``tests/test_audit_requestinfo.py``
runs its ``requestinfo_test.go`` tables as data.

Rules, in kube-apiserver's order: fewer than three path segments, or a first
segment other than ``api``/``apis``, is a non-resource request whose verb is
the lower-case method; ``/apis`` needs a group too. ``proxy`` and ``watch``
right after the version are verbs (``proxy`` takes no subresource);
otherwise the method gives ``create``/``get``/``update``/``patch``/
``delete``. ``namespaces/<ns>/<resource>...`` moves the namespace out of the
parts unless the next segment is a namespace subresource (``status``,
``finalize``); a ``patch`` of ``namespaces/<ns>`` itself (server-side apply
creating it) has no namespace. The parts then read ``resource/name/subresource``. A ``get``
without a name is ``list``, or ``watch`` when the first ``watch`` query value
is anything but ``0``/``false`` (any case; ``watch=`` too, as Go's
conversion reads it); a ``fieldSelector`` that requires ``metadata.name=x``
names the object. A ``delete`` without a name is ``deletecollection``.

Deliberate differences: the path is taken as given (the caller passes the
percent-decoded path, as Go's ``URL.Path`` is); a list whose other query
parameters would not decode as ``ListOptions`` (``limit=abc``) still gets its
``fieldSelector`` name here, where kube-apiserver logs the decode error and
drops it; the label/field selector requirements newer releases attach for
authorization are not kept (audit does not use them).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Final

__all__ = ["RequestInfo", "request_info"]

_API_PREFIXES: Final = frozenset({"api", "apis"})
_GROUPLESS_PREFIXES: Final = frozenset({"api"})
_SPECIAL_VERBS: Final = frozenset({"proxy", "watch"})
_SPECIAL_VERBS_NO_SUBRESOURCES: Final = frozenset({"proxy"})
_NAMESPACE_SUBRESOURCES: Final = frozenset({"status", "finalize"})
_METHOD_VERBS: Final = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestInfo:
    """A request's Kubernetes attributes (kube-apiserver's ``RequestInfo``)."""

    is_resource_request: bool
    #: The URL path the attributes were read from.
    path: str
    #: The Kubernetes verb, or the lower-case method for non-resource requests.
    verb: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    #: ``resource/name/subresource/...`` after the namespace is taken out.
    parts: tuple[str, ...] = ()


def _split_path(path: str) -> list[str]:
    path = path.strip("/")
    return path.split("/") if path else []


def _watch_value(value: str) -> bool:
    """Go's ``Convert_Slice_string_To_bool``: only ``0`` and ``false`` are false."""
    return value.lower() not in ("0", "false")


def _split_selector(selector: str) -> list[str] | None:
    """The terms of a field selector split on unescaped commas (``\\,`` is a
    literal comma, as ``fields.ParseSelector`` reads it); ``None`` when a term
    is empty or has no operator, which kube-apiserver refuses.
    """
    terms: list[str] = []
    current: list[str] = []
    escaped = False
    for char in selector:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ",":
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    if any(not t or "=" not in t for t in terms):
        return None
    return terms


def _unescape(value: str) -> str:
    out: list[str] = []
    escaped = False
    for char in value:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


def _selector_name(selector: str) -> str:
    """The name ``metadata.name=x`` (or ``==``) requires, else ``""``.

    ``fields.Selector.RequiresExactMatch``: a term ``!=`` does not count; a
    name that is not a valid path segment (``.``, ``..``, one with ``/`` or
    ``%``) is ignored, as ``path.IsValidPathSegmentName`` refuses it.
    """
    if not selector:
        return ""
    terms = _split_selector(selector)
    if terms is None:
        return ""
    for term in terms:
        if "!=" in term:
            continue
        field, _, value = term.partition("==") if "==" in term else term.partition("=")
        if _unescape(field.strip()) != "metadata.name":
            continue
        name = _unescape(value.strip())
        if name in (".", "..") or "/" in name or "%" in name:
            return ""
        return name
    return ""


def request_info(method: str, path: str, query: str = "") -> RequestInfo:
    """The ``RequestInfo`` of ``method`` on ``path`` (percent-decoded) with the
    raw ``query`` string (module docstring for the rules).
    """
    method = method.upper()
    plain = RequestInfo(is_resource_request=False, path=path, verb=method.lower())
    parts = _split_path(path)
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return plain
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix not in _GROUPLESS_PREFIXES:
        if len(parts) < 3:
            return plain
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]
    if parts[0] in _SPECIAL_VERBS:
        if len(parts) < 2:
            # kube-apiserver answers an error and keeps what it knew.
            return RequestInfo(
                is_resource_request=True,
                path=path,
                verb=method.lower(),
                api_prefix=prefix,
                api_group=group,
                api_version=version,
            )
        verb, parts = parts[0], parts[1:]
    else:
        verb = _METHOD_VERBS.get(method, "")
    namespace = ""
    # A server-side apply that creates a namespace PATCHes
    # /namespaces/<new>: kube-apiserver gives it no namespace.
    if (
        parts[0] == "namespaces"
        and len(parts) > 1
        and not (len(parts) == 2 and verb == "patch")
    ):
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource = parts[0]
    name = parts[1] if len(parts) >= 2 else ""
    subresource = ""
    if len(parts) >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES:
        subresource = parts[2]
    if not name and verb == "get":
        verb = "list"
        # Parsed only when it can name either key (an escaped key is decoded
        # first, as Go's url.Query does): most lists carry just a limit.
        if "%" in query or "watch" in query or "fieldSelector" in query:
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
            watch = params.get("watch")
            if watch and _watch_value(watch[0]):
                verb = "watch"
            selectors = params.get("fieldSelector")
            if selectors:
                name = _selector_name(selectors[0])
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(
        is_resource_request=True,
        path=path,
        verb=verb,
        api_prefix=prefix,
        api_group=group,
        api_version=version,
        namespace=namespace,
        resource=resource,
        subresource=subresource,
        name=name,
        parts=tuple(parts),
    )
