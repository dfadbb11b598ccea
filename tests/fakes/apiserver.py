"""A fake Kubernetes API server for the proxy tests: TLS on 127.0.0.1, strict
about credentials, and enough API for kubectl.

It checks what a real API server checks on a proxied request:

- ``Authorization: Bearer <t>`` must name the proxy's credential (one of
  ``proxy_tokens``) or, for passthrough tests, a user token it knows itself
  (``user_tokens``); anything else is a 401 ``Status``;
- with the proxy's credential the request must impersonate someone
  (``Impersonate-User``; 403 otherwise, unless ``require_impersonation`` is
  off); every user, group, extra and uid it names must be one the proxy's
  account may impersonate under ``impersonation_rules`` (RBAC rules; default:
  what ``deploy/`` grants the gate's ServiceAccount), else a 403 in
  kube-apiserver's words; a malformed set (a group, extra or uid without a
  user, two users, two uids) is a 400; the user it acts for is derived the way
  kube-apiserver does (``system:serviceaccounts`` groups for a service
  account, ``system:authenticated`` added, extra keys lower-cased and
  percent-decoded): see ``apiserver_impersonation``. A user token
  (``user_tokens``) may impersonate only what ``user_impersonation_rules``
  grants its user (nothing by default);
- SubjectAccessReviews are only accepted with the proxy's own credential and
  *without* impersonation; the answer comes from ``sar_rules`` (a set of
  ``(requesting user, resource[/subresource], name)``, name ``*`` for any).

Every request is recorded (method, path, query, a copy of the headers, the
derived user) in ``requests``, so tests can assert what reached it.

Endpoints: discovery (``/api``, ``/apis``, resource lists), ``kubectl auth
whoami`` (``selfsubjectreviews``), pods list/get/watch (``emit`` pushes watch
events to every open watch; a ``Table`` is served when asked for; ``bookmark()``
sends BOOKMARK events to watches with ``allowWatchBookmarks=true``;
``gone_next_watch`` and ``compacted_rv`` make a watch ``410 Gone``, as a status
or as an ERROR event), a following
pod log (``log_lines`` queue; ``None`` ends it, ``ABORT`` resets the connection), exec over WebSocket with
``v5.channel.k8s.io`` framing running ``cat``, port-forward over WebSocket with
``v4.channel.k8s.io`` port-forward framing, or kubectl's SPDY/3.1 tunnelled in
WebSocket (``SPDY/3.1+portforward.k8s.io``, when ``spdy_dictionary`` is set;
see ``apiserver_spdy``), both echoing data upper-cased, a large
``configmaps`` list generated on the fly (``big_size`` bytes), and a POST that
streams the request body and answers with its length and digest.

The gate's own Revocation collection (``revocations``, a
``tests.fakes.apiserver_revocations.RevocationStore``) answers the proxy's
credential without impersonation, as RBAC on the gate's service account
would, and a user token (``user_tokens``) for ``kube-oidc-gate revoke``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trustme
from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from tests.fakes.apiserver_impersonation import (
    DEPLOY_RULES,
    GATE_SERVICE_ACCOUNT,
    Refused,
    Rule,
    impersonated_user,
)
from tests.fakes.apiserver_revocations import RevocationStore, add_revocation_routes
from tests.fakes.apiserver_spdy import SpdySession

__all__ = [
    "ABORT",
    "PROXY_USERNAME",
    "FakeAPIServer",
    "Recorded",
    "serve_apiserver",
]

_FAKE_KEY: web.AppKey[FakeAPIServer] = web.AppKey("fake_apiserver")
_USER_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("fake_user")

CREATED = "2026-01-01T00:00:00Z"
#: Who the proxy's credential authenticates as: the ServiceAccount ``deploy/``
#: binds the impersonation roles to.
PROXY_USERNAME = "system:serviceaccount:{}:{}".format(*GATE_SERVICE_ACCOUNT)
PROXY_GROUPS = [
    "system:serviceaccounts",
    f"system:serviceaccounts:{GATE_SERVICE_ACCOUNT[0]}",
    "system:authenticated",
]
#: Put on ``log_lines`` to make the log stream die mid-response (connection reset).
ABORT = "\x00abort"


@dataclass
class Recorded:
    """One request as the fake API server saw it."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    user: dict[str, Any] | None = None
    bearer: str | None = None


@dataclass
class _Watch:
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    table: bool = False
    bookmarks: bool = False


def status(
    code: int, reason: str, message: str, details: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=code)


def pod(name: str, namespace: str = "default", rv: int = 1) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "creationTimestamp": CREATED,
        },
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"},
    }


def _table(pods: list[dict[str, Any]], rv: str) -> dict[str, Any]:
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "",
                "priority": 0,
            },
            {
                "name": "Status",
                "type": "string",
                "format": "",
                "description": "",
                "priority": 0,
            },
        ],
        "rows": [
            {
                "cells": [p["metadata"]["name"], p["status"]["phase"]],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": p["metadata"],
                },
            }
            for p in pods
        ],
    }


class FakeAPIServer:
    """State and lifecycle of the fake API server (see the module docstring)."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.proxy_tokens: set[str] = {"proxy-sa-token-1"}
        self.user_tokens: dict[str, dict[str, Any]] = {}
        self.require_impersonation = True
        #: What the proxy's credential may impersonate, as RBAC rules
        #: (default: everything ``deploy/`` grants the gate's ServiceAccount).
        self.impersonation_rules: tuple[Rule, ...] = DEPLOY_RULES
        #: What the holder of a user token may impersonate (default: no one).
        self.user_impersonation_rules: dict[str, tuple[Rule, ...]] = {}
        self.sar_rules: set[tuple[str, str, str]] = set()
        self.sar_reviews: list[dict[str, Any]] = []
        self.requests: list[Recorded] = []
        self.pods: dict[str, dict[str, Any]] = {"p": pod("p")}
        self.rv = 10
        self.watches: list[_Watch] = []
        #: The next pods watch is answered 410 ("status"), or 200 then an
        #: ERROR event with code 410 ("event"), as for a compacted version.
        self.gone_next_watch: str | None = None
        #: A pods watch from a resourceVersion older than this is "too old":
        #: 200, then an ERROR event with code 410 (etcd compacted it).
        self.compacted_rv = 0
        self.watch_opened = asyncio.Event()
        self.watch_closed = asyncio.Event()
        self.log_lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.log_closed = asyncio.Event()
        self.big_size = 100 * 1024 * 1024
        #: Cut the connection after this many bytes of the big list (None: never).
        self.big_abort_after: int | None = None
        #: What ``exec`` of ``tar`` (``kubectl cp``) received on stdin.
        self.exec_stdin = bytearray()
        #: (bytes, sha256) of each ConfigMap created, as received.
        self.created: list[tuple[int, str]] = []
        self.delay = 0.0
        self.spdy_dictionary: bytes | None = None
        self.spdy_sessions: list[SpdySession] = []
        self.revocations = RevocationStore()
        self.port = 0
        self.app = make_apiserver_app(self)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("fake apiserver: not started")
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def emit(self, kind: str, name: str) -> None:
        """Create (ADDED), touch (MODIFIED) or remove (DELETED) a pod and tell watches."""
        self.rv += 1
        obj = pod(name, rv=self.rv)
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = obj
        for watch in self.watches:
            watch.queue.put_nowait({"type": kind, "object": obj})

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every pods watch
        that asked for them (``allowWatchBookmarks=true``)."""
        for watch in self.watches:
            if watch.bookmarks:
                watch.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(self.rv)},
                        },
                    }
                )

    def seen(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def start(self) -> None:
        if self._runner is not None:
            return
        # kube-apiserver (Go net/http) bounds header bytes (1 MiB), not their
        # number; aiohttp's default of 128 headers would refuse a user in 250
        # groups (one Impersonate-Group each).
        runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=0.1, max_headers=4096
        )
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        for watch in self.watches:
            watch.queue.put_nowait(None)
        for rwatch in self.revocations.watches:
            rwatch.queue.put_nowait(None)
        self.log_lines.put_nowait(None)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


# --------------------------------------------------------------------------
# Authentication, the way a real API server sees a proxied request


def _refused(refused: Refused) -> web.Response:
    return status(refused.code, refused.reason, refused.message, refused.details)


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    fake = request.app[_FAKE_KEY]
    auth = request.headers.getall("Authorization", [])
    bearer = None
    if len(auth) == 1 and auth[0].lower().startswith("bearer "):
        bearer = auth[0][7:].strip()
    record = Recorded(
        method=request.method,
        path=request.path,
        query=request.query_string,
        headers=CIMultiDict(request.headers),
        bearer=bearer,
    )
    fake.requests.append(record)
    if fake.delay:
        await asyncio.sleep(fake.delay)
    sar = request.path == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
    # The gate's own resources: its service account reads them as itself.
    own = request.path.startswith("/apis/kube-oidc-gate.io/")
    if bearer in fake.proxy_tokens:
        user = impersonated_user(
            request.headers, PROXY_USERNAME, fake.impersonation_rules
        )
        if isinstance(user, Refused):
            return _refused(user)
        if user is None and fake.require_impersonation and not (sar or own):
            return status(403, "Forbidden", "the proxy may only act for someone")
        if user is not None and sar:
            return status(403, "Forbidden", "reviews are made by the proxy itself")
        if user is None:
            user = {"username": PROXY_USERNAME, "groups": PROXY_GROUPS}
    elif bearer is not None and bearer in fake.user_tokens:
        user = dict(fake.user_tokens[bearer])
        acting = impersonated_user(
            request.headers,
            user["username"],
            fake.user_impersonation_rules.get(user["username"], ()),
        )
        if isinstance(acting, Refused):
            return _refused(acting)
        if acting is not None:
            user = acting
    else:
        return status(401, "Unauthorized", "Unauthorized")
    record.user = user
    request[_USER_KEY] = user
    return await handler(request)


# --------------------------------------------------------------------------
# Discovery, whoami, SubjectAccessReview


async def _api(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}
            ],
        }
    )


def _group(name: str) -> dict[str, Any]:
    version = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [version], "preferredVersion": version}


async def _apis(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [_group("authentication.k8s.io"), _group("authorization.k8s.io")],
        }
    )


def _resource(
    name: str, kind: str, verbs: list[str], namespaced: bool = True
) -> dict[str, Any]:
    return {
        "name": name,
        "singularName": "" if "/" in name else name.rstrip("s"),
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    }


async def _core_resources(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                _resource("pods", "Pod", ["get", "list", "watch", "create", "delete"]),
                _resource("pods/log", "Pod", ["get"]),
                _resource("pods/exec", "PodExecOptions", ["create", "get"]),
                _resource(
                    "pods/portforward", "PodPortForwardOptions", ["create", "get"]
                ),
                _resource("configmaps", "ConfigMap", ["get", "list", "create"]),
            ],
        }
    )


async def _authn_resources(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "authentication.k8s.io/v1",
            "resources": [
                _resource("selfsubjectreviews", "SelfSubjectReview", ["create"], False)
            ],
        }
    )


async def _authz_resources(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "authorization.k8s.io/v1",
            "resources": [
                _resource(
                    "subjectaccessreviews", "SubjectAccessReview", ["create"], False
                )
            ],
        }
    )


async def _whoami(request: web.Request) -> web.Response:
    user = request[_USER_KEY]
    return web.json_response(
        {
            "kind": "SelfSubjectReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "status": {"userInfo": user},
        },
        status=201,
    )


async def _subject_access_review(request: web.Request) -> web.Response:
    fake = request.app[_FAKE_KEY]
    review = await request.json()
    fake.sar_reviews.append(review)
    spec = review.get("spec", {})
    attrs = spec.get("resourceAttributes", {})
    resource = attrs.get("resource", "")
    if attrs.get("subresource"):
        resource += "/" + attrs["subresource"]
    who = spec.get("user", "")
    allowed = (who, resource, attrs.get("name", "")) in fake.sar_rules or (
        who,
        resource,
        "*",
    ) in fake.sar_rules
    review["status"] = {"allowed": allowed}
    return web.json_response(review, status=201)


# --------------------------------------------------------------------------
# Pods: list, get, watch, log


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


async def _pods(request: web.Request) -> web.StreamResponse:
    fake = request.app[_FAKE_KEY]
    if request.query.get("watch", "").lower() in ("1", "true"):
        return await _watch(request, fake)
    items = list(fake.pods.values())
    rv = str(fake.rv)
    if _wants_table(request):
        return web.json_response(_table(items, rv))
    return web.json_response(
        {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }
    )


def _expired(since: str, floor: int) -> dict[str, Any]:
    """The ERROR event kube-apiserver sends for a compacted resourceVersion."""
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {since} ({floor})",
            "reason": "Expired",
            "code": 410,
        },
    }


async def _watch(request: web.Request, fake: FakeAPIServer) -> web.StreamResponse:
    gone, fake.gone_next_watch = fake.gone_next_watch, None
    if gone == "status":
        return status(410, "Expired", "too old resource version")
    watch = _Watch(
        table=_wants_table(request),
        bookmarks=request.query.get("allowWatchBookmarks") == "true",
    )
    since = request.query.get("resourceVersion", "")
    if gone == "event" or (
        since not in ("", "0") and since.isdigit() and int(since) < fake.compacted_rv
    ):
        watch.queue.put_nowait(_expired(since, fake.compacted_rv))
        watch.queue.put_nowait(None)
    elif since in ("", "0"):
        for obj in fake.pods.values():
            watch.queue.put_nowait({"type": "ADDED", "object": obj})
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    fake.watches.append(watch)
    fake.watch_opened.set()
    try:
        while True:
            event = await watch.queue.get()
            if event is None:
                break
            if watch.table and event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                event = {
                    "type": event["type"],
                    "object": _table([event["object"]], str(fake.rv)),
                }
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
    finally:
        fake.watches.remove(watch)
        fake.watch_closed.set()
    return response


async def _pod(request: web.Request) -> web.Response:
    fake = request.app[_FAKE_KEY]
    found = fake.pods.get(request.match_info["name"])
    if found is None:
        return status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
    return web.json_response(found)


async def _log(request: web.Request) -> web.StreamResponse:
    fake = request.app[_FAKE_KEY]
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        await response.write(b"log line 0\n")
        if request.query.get("follow", "").lower() in ("1", "true"):
            while True:
                line = await fake.log_lines.get()
                if line is None:
                    break
                if line == ABORT and request.transport is not None:
                    request.transport.abort()
                    return response
                await response.write(line.encode() + b"\n")
        await response.write_eof()
    finally:
        fake.log_closed.set()
    return response


# --------------------------------------------------------------------------
# exec and port-forward over WebSocket


async def _exec(request: web.Request) -> web.StreamResponse:
    """``cat`` with v5.channel.k8s.io framing: stdin (0) is echoed on stdout (1);
    the v5 close frame for stdin (255, 0) ends it with a Success status (3).
    ``tar`` (what ``kubectl cp`` runs) keeps stdin instead (``exec_stdin``).
    """
    fake = request.app[_FAKE_KEY]
    command = request.query.getall("command", [""])[0]
    keep = command == "tar"
    ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
    await ws.prepare(request)
    if request.query.get("stdin") != "true":
        # Nothing to read (``kubectl cp`` first runs ``test -d DEST``): the
        # command ends at once; ``test`` says "not a directory".
        result: dict[str, Any] = {"metadata": {}, "status": "Success"}
        if command == "test":
            result = {
                "metadata": {},
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "1"}]},
            }
        await ws.send_bytes(b"\x03" + json.dumps(result).encode())
        await ws.close()
        return ws
    async for msg in ws:
        if msg.type != WSMsgType.BINARY or not msg.data:
            continue
        channel, payload = msg.data[0], msg.data[1:]
        if channel == 0 and keep:
            fake.exec_stdin += payload
        elif channel == 0:
            await ws.send_bytes(b"\x01" + payload)
        elif channel == 255 and payload[:1] == b"\x00":
            break
    await ws.send_bytes(
        b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode()
    )
    await ws.close()
    return ws


SPDY_TUNNEL = "SPDY/3.1+portforward.k8s.io"


async def _portforward(request: web.Request) -> web.StreamResponse:
    fake = request.app[_FAKE_KEY]
    offered = {
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
    }
    upgrade = request.headers.get("Upgrade", "").lower()
    if SPDY_TUNNEL in offered or upgrade.startswith("spdy/"):
        if fake.spdy_dictionary is None:
            return status(400, "BadRequest", "spdy is not available in this fake")
        if upgrade.startswith("spdy/"):
            return await _portforward_raw_spdy(request, fake, fake.spdy_dictionary)
        return await _portforward_spdy(request, fake, fake.spdy_dictionary)
    return await _portforward_channels(request)


class _Hijacked(asyncio.Protocol):
    """The connection after a raw SPDY upgrade: bytes go to a queue. aiohttp's
    protocol still hears about the close so its bookkeeping stays right."""

    def __init__(self, previous: asyncio.BaseProtocol) -> None:
        self.previous = previous
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def eof_received(self) -> bool | None:
        self.queue.put_nowait(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)
        self.previous.connection_lost(exc)


async def _portforward_raw_spdy(
    request: web.Request, fake: FakeAPIServer, dictionary: bytes
) -> web.StreamResponse:
    """kubectl's fallback: ``Upgrade: SPDY/3.1`` (aiohttp would not switch
    protocols for it, so the transport is taken over here)."""
    transport = request.transport
    assert isinstance(transport, asyncio.Transport)
    hijacked = _Hijacked(transport.get_protocol())
    transport.set_protocol(hijacked)
    transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
    )

    async def send(data: bytes) -> None:
        transport.write(data)

    session = SpdySession(dictionary=dictionary, send=send)
    fake.spdy_sessions.append(session)
    while (data := await hijacked.queue.get()) is not None:
        await session.feed(data)
        if session.ended:
            break
    transport.close()
    response = web.Response(status=101)
    response.force_close()
    return response


async def _portforward_spdy(
    request: web.Request, fake: FakeAPIServer, dictionary: bytes
) -> web.StreamResponse:
    """kubectl's port-forward: SPDY/3.1 tunnelled in WebSocket binary messages."""
    ws = web.WebSocketResponse(protocols=(SPDY_TUNNEL,))
    await ws.prepare(request)
    session = SpdySession(dictionary=dictionary, send=ws.send_bytes)
    fake.spdy_sessions.append(session)
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await session.feed(msg.data)
            if session.ended:
                break
    await ws.close()
    return ws


async def _portforward_channels(request: web.Request) -> web.StreamResponse:
    """v4.channel.k8s.io port-forward framing: channel 2i carries data for the
    i-th ``port`` and 2i+1 its errors; the server's first frame on each channel
    is the port as two little-endian bytes. Data is echoed upper-cased.
    """
    ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
    await ws.prepare(request)
    ports = [int(p) for p in request.query.getall("port", [])]
    for index, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        await ws.send_bytes(bytes([2 * index]) + prefix)
        await ws.send_bytes(bytes([2 * index + 1]) + prefix)
    async for msg in ws:
        if msg.type != WSMsgType.BINARY or not msg.data:
            continue
        channel, payload = msg.data[0], msg.data[1:]
        if channel % 2 == 0 and channel // 2 < len(ports):
            await ws.send_bytes(bytes([channel]) + payload.upper())
    return ws


# --------------------------------------------------------------------------
# Big responses and streamed request bodies


async def _configmaps(request: web.Request) -> web.StreamResponse:
    """A ConfigMapList of ``big_size`` bytes, generated as it is sent."""
    fake = request.app[_FAKE_KEY]
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    head = b'{"kind":"ConfigMapList","apiVersion":"v1","metadata":{},"items":['
    tail = b"]}"
    item = b'{"metadata":{"name":"cm"},"data":{"k":"' + b"x" * 4000 + b'"}},'
    sent = len(head)
    await response.write(head)
    batch = item * 16
    while sent + len(batch) + len(tail) + 64 <= fake.big_size:
        await response.write(batch)
        sent += len(batch)
        if fake.big_abort_after is not None and sent >= fake.big_abort_after:
            assert request.transport is not None
            request.transport.abort()
            return response
    await response.write(b'{"metadata":{"name":"last"}}' + tail)
    await response.write_eof()
    return response


async def _create_configmap(request: web.Request) -> web.Response:
    """Stream the body through a digest; a ConfigMap sent as JSON (kubectl
    ``apply``/``create``) is answered with itself, anything else with the digest.
    """
    fake = request.app[_FAKE_KEY]
    digest = hashlib.sha256()
    size = 0
    head = bytearray()
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
        if len(head) < 64 * 1024 * 1024:
            head += chunk
    fake.created.append((size, digest.hexdigest()))
    try:
        obj = json.loads(head)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("kind") == "ConfigMap":
        obj.setdefault("metadata", {}).update(
            namespace=request.match_info["ns"], uid="u1", resourceVersion="1"
        )
        return web.json_response(obj, status=201)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()}, status=201)


async def _not_found(request: web.Request) -> web.Response:
    return status(404, "NotFound", "the server could not find the requested resource")


def make_apiserver_app(fake: FakeAPIServer) -> web.Application:
    app = web.Application(middlewares=[_authenticate])
    app[_FAKE_KEY] = fake
    r = app.router
    r.add_get("/api", _api)
    r.add_get("/apis", _apis)
    r.add_get("/api/v1", _core_resources)
    r.add_get("/apis/authentication.k8s.io/v1", _authn_resources)
    r.add_get("/apis/authorization.k8s.io/v1", _authz_resources)
    r.add_post("/apis/authentication.k8s.io/v1/selfsubjectreviews", _whoami)
    r.add_post(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews", _subject_access_review
    )
    r.add_get("/api/v1/namespaces/{ns}/pods", _pods)
    r.add_get("/api/v1/namespaces/{ns}/pods/{name}", _pod)
    r.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", _log)
    r.add_route("*", "/api/v1/namespaces/{ns}/pods/{name}/exec", _exec)
    r.add_route("*", "/api/v1/namespaces/{ns}/pods/{name}/portforward", _portforward)
    r.add_get("/api/v1/namespaces/{ns}/configmaps", _configmaps)
    r.add_post("/api/v1/namespaces/{ns}/configmaps", _create_configmap)
    add_revocation_routes(app, fake.revocations)
    r.add_route("*", "/{tail:.*}", _not_found)
    return app


@asynccontextmanager
async def serve_apiserver(ca: trustme.CA) -> AsyncIterator[FakeAPIServer]:
    """A started ``FakeAPIServer``, stopped on exit."""
    fake = FakeAPIServer(ca)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
