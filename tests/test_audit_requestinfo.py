"""``proxy.audit.requestinfo`` against kube-apiserver's own tables.

``SUCCESS_CASES``, ``NON_RESOURCE_CASES``, ``RESOURCE_OR_NOT`` and
``FIELD_SELECTOR_CASES`` are ``TestGetAPIRequestInfo``,
``TestGetNonAPIRequestInfo`` and ``TestFieldSelectorParsing`` of
``k8s.io/apiserver/pkg/endpoints/request/requestinfo_test.go`` as data (its
``expectedAPIPrefix`` column is left out: the Go test does not check it, and
it says ``api`` for ``/apis/...`` rows). ``OUR_CASES`` add what the proxy
meets that the table lacks.
"""

from __future__ import annotations

import urllib.parse

import pytest

from proxy.audit.requestinfo import request_info

# method, url, verb, apiGroup, apiVersion, namespace, resource, subresource,
# name, parts
SUCCESS_CASES: list[tuple[str, str, str, str, str, str, str, str, str, list[str]]] = [
    # resource paths
    ("GET", "/api/v1/namespaces", "list", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("GET", "/api/v1/namespaces/other", "get", "", "v1", "other", "namespaces", "", "other", ["namespaces", "other"]),
    ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/pods", "list", "", "v1", "", "pods", "", "", ["pods"]),
    ("HEAD", "/api/v1/pods", "list", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", "", ["pods"]),
    ("PATCH", "/api/v1/namespaces/new-namespace", "patch", "", "v1", "", "namespaces", "", "new-namespace", ["namespaces", "new-namespace"]),
    # special verbs
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "", "v1", "other", "pods", "", "foo", ["pods", "foo", "subpath", "not", "a", "subresource"]),
    ("GET", "/api/v1/watch/pods", "watch", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=true", "watch", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=false", "list", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "", "v1", "other", "pods", "", "", ["pods"]),
    # subresource identification
    ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "", "v1", "other", "pods", "status", "foo", ["pods", "foo", "status"]),
    ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "", "v1", "other", "pods", "proxy", "foo", ["pods", "foo", "proxy", "subpath"]),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "", "v1", "other", "namespaces", "finalize", "other", ["namespaces", "other", "finalize"]),
    ("PUT", "/api/v1/namespaces/other/status", "update", "", "v1", "other", "namespaces", "status", "other", ["namespaces", "other", "status"]),
    # verb identification
    ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("POST", "/api/v1/namespaces/other/pods", "create", "", "v1", "other", "pods", "", "", ["pods"]),
    # deletecollection verb identification
    ("DELETE", "/api/v1/nodes", "deletecollection", "", "v1", "", "nodes", "", "", ["nodes"]),
    ("DELETE", "/api/v1/namespaces", "deletecollection", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "", "v1", "other", "pods", "", "", ["pods"]),
    ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    # api group identification
    ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    # api version identification
    ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "extensions", "v1beta3", "other", "pods", "", "", ["pods"]),
]  # fmt: skip

#: The Go table's ``errorCases``: not resource requests (and no error).
NON_RESOURCE_CASES = {
    "no resource path": "/",
    "just apiversion": "/api/version/",
    "just prefix, group, version": "/apis/group/version/",
    "apiversion with no resource": "/api/version/",
    "bad prefix": "/badprefix/version/resource",
    "missing api group": "/apis/version/resource",
}

RESOURCE_OR_NOT = {
    "simple groupless": ("/api/version/resource", True),
    "simple group": ("/apis/group/version/resource/name/subresource", True),
    "more steps": ("/api/version/resource/name/subresource", True),
    "group list": ("/apis/batch/v1/job", True),
    "group get": ("/apis/batch/v1/job/foo", True),
    "group subresource": ("/apis/batch/v1/job/foo/scale", True),
    "bad root": ("/not-api/version/resource", False),
    "group without enough steps": ("/apis/extensions/v1beta1", False),
    "group without enough steps 2": ("/apis/extensions/v1beta1/", False),
    "not enough steps": ("/api/version", False),
    "one step": ("/api", False),
    "zero step": ("/", False),
    "empty": ("", False),
}

# name, url, expected name, expected verb
FIELD_SELECTOR_CASES = [
    ("no selector", "/apis/group/version/resource", "", "list"),
    ("metadata.name selector", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "name1", "list"),
    ("metadata.name selector with watch", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "name1", "watch"),
    ("random selector", "/apis/group/version/resource?fieldSelector=foo=bar", "", "list"),
    ("invalid selector with metadata.name", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "", "list"),
    ("invalid selector with metadata.name with watch", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true", "", "watch"),
    ("invalid selector with metadata.name with watch false", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false", "", "list"),
]  # fmt: skip

# Ours: what kubectl sends through the proxy, and edges of the rules.
# method, url, verb, resource, subresource, name, namespace, resource request
OUR_CASES = [
    ("GET", "/api/v1/namespaces/ns/pods/p/log?follow=true", "get", "pods", "log", "p", "ns", True),
    ("POST", "/api/v1/namespaces/ns/pods/p/exec?command=ls", "create", "pods", "exec", "p", "ns", True),
    ("GET", "/api/v1/namespaces/ns/pods/p/exec?command=ls", "get", "pods", "exec", "p", "ns", True),
    ("POST", "/api/v1/namespaces/ns/pods/p/portforward", "create", "pods", "portforward", "p", "ns", True),
    ("GET", "/api/v1/namespaces/ns/pods?watch=", "watch", "pods", "", "", "ns", True),
    ("GET", "/api/v1/namespaces/ns/pods?watch=FALSE", "list", "pods", "", "", "ns", True),
    ("GET", "/api/v1/namespaces/ns/pods?watch=t", "watch", "pods", "", "", "ns", True),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3D%3Dp1", "list", "pods", "", "p1", "", True),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%21%3Dp1", "list", "pods", "", "", "", True),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3D..", "list", "pods", "", "", "", True),
    ("DELETE", "/api/v1/pods?fieldSelector=metadata.name%3Dp1", "deletecollection", "pods", "", "", "", True),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "create", "selfsubjectaccessreviews", "", "", "", True),
    ("OPTIONS", "/api/v1/pods", "", "pods", "", "", "", True),
    ("GET", "/api/v1/watch", "get", "", "", "", "", True),
    ("GET", "/version", "get", "", "", "", "", False),
    ("POST", "/logs/kubelet.log", "post", "", "", "", "", False),
    ("GET", "/apis", "get", "", "", "", "", False),
    ("GET", "/api/v1/namespaces/ns", "get", "namespaces", "", "ns", "ns", True),
]  # fmt: skip


def _split(url: str) -> tuple[str, str]:
    path, _, query = url.partition("?")
    return urllib.parse.unquote(path), query


@pytest.mark.parametrize(
    ("method", "url", "verb", "group", "version", "ns", "res", "sub", "name", "parts"),
    SUCCESS_CASES,
    ids=[f"{c[0]} {c[1]}" for c in SUCCESS_CASES],
)
def test_kube_apiserver_request_info_table(
    method: str,
    url: str,
    verb: str,
    group: str,
    version: str,
    ns: str,
    res: str,
    sub: str,
    name: str,
    parts: list[str],
) -> None:
    info = request_info(method, *_split(url))
    assert info.is_resource_request
    assert (
        info.verb,
        info.api_group,
        info.api_version,
        info.namespace,
        info.resource,
        info.subresource,
        info.name,
        list(info.parts),
    ) == (verb, group, version, ns, res, sub, name, parts)


@pytest.mark.parametrize(
    "url", NON_RESOURCE_CASES.values(), ids=list(NON_RESOURCE_CASES)
)
def test_kube_apiserver_error_cases_are_non_resource(url: str) -> None:
    info = request_info("GET", *_split(url))
    assert not info.is_resource_request
    assert info.verb == "get"


@pytest.mark.parametrize(
    ("url", "expected"), RESOURCE_OR_NOT.values(), ids=list(RESOURCE_OR_NOT)
)
def test_kube_apiserver_resource_or_not(url: str, expected: bool) -> None:
    assert request_info("GET", *_split(url)).is_resource_request is expected


@pytest.mark.parametrize(
    ("url", "name", "verb"),
    [c[1:] for c in FIELD_SELECTOR_CASES],
    ids=[c[0] for c in FIELD_SELECTOR_CASES],
)
def test_kube_apiserver_field_selector_table(url: str, name: str, verb: str) -> None:
    info = request_info("GET", *_split(url))
    assert (info.name, info.verb) == (name, verb)


@pytest.mark.parametrize(
    ("method", "url", "verb", "res", "sub", "name", "ns", "resource_request"),
    OUR_CASES,
    ids=[f"{c[0]} {c[1]}" for c in OUR_CASES],
)
def test_requests_the_proxy_meets(
    method: str,
    url: str,
    verb: str,
    res: str,
    sub: str,
    name: str,
    ns: str,
    resource_request: bool,
) -> None:
    info = request_info(method, *_split(url))
    assert (
        info.is_resource_request,
        info.verb,
        info.resource,
        info.subresource,
        info.name,
        info.namespace,
    ) == (resource_request, verb, res, sub, name, ns)
