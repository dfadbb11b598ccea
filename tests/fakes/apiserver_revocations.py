"""The fake API server's Revocation collection (CRD ``revocations.kube-oidc-gate.io``).

What a real API server does for a namespaced custom resource, as far as the
gate's watcher and ``kube-oidc-gate revoke`` can tell:

- ``GET .../namespaces/NS/revocations``: a list with ``metadata.resourceVersion``
  (paged with ``limit``/``continue``);
- ``?watch=1&resourceVersion=RV``: the events after RV from the history, then
  live ones, as newline-delimited JSON, ended after ``timeoutSeconds``;
  ``allowWatchBookmarks=true`` lets ``bookmark()`` send BOOKMARK events;
- ``POST``: create (``generateName`` too), 409 ``AlreadyExists`` for a taken
  name, 404 with ``details.kind: namespaces`` for a missing namespace, 404
  without details while the CRD is not ``installed``, 403 for a bearer in
  ``forbidden``;
- ``DELETE .../revocations/NAME`` with ``preconditions.uid`` (409 on a
  mismatch, 404 when absent).

Switches for the watcher's failure paths: ``gone_next_watch`` ("status": the
next watch is answered 410; "event": 200 then an ERROR event with code 410),
``fail_next`` (that many list/watch requests answered 500), and
``break_watches()`` (every open watch connection is reset mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["COLLECTION", "RevocationStore", "add_revocation_routes"]

COLLECTION = "/apis/kube-oidc-gate.io/v1alpha1/namespaces/{ns}/revocations"
_ABORT = "abort"


def _status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


@dataclass
class _Watch:
    namespace: str
    queue: asyncio.Queue[dict[str, Any] | str | None] = field(
        default_factory=asyncio.Queue
    )
    bookmarks: bool = False


class RevocationStore:
    """State of the collection, with switches for the failure paths."""

    def __init__(self) -> None:
        self.namespaces: set[str] = {"kube-oidc-gate"}
        self.installed = True
        #: Bearer tokens that RBAC refuses for writes (403).
        self.forbidden: set[str] = set()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 100
        #: (resourceVersion, namespace, event) of every change, for watches
        #: that start from an older resourceVersion.
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.watches: list[_Watch] = []
        self.gone_next_watch: str | None = None
        self.fail_next = 0
        #: Requests seen: ("list"|"watch"|"create"|"delete", query or name).
        self.seen: list[tuple[str, str]] = []

    # -- direct changes (what kubectl apply/delete would do) --------------------

    def _emit(self, namespace: str, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": obj}
        self.history.append((self.rv, namespace, event))
        for watch in self.watches:
            if watch.namespace == namespace:
                watch.queue.put_nowait(event)

    def put(self, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj`` (by name) and tell the watches."""
        self.rv += 1
        meta = dict(obj.get("metadata") or {})
        name = meta["name"]
        old = self.objects.get((namespace, name))
        meta.setdefault("uid", f"uid-{name}-{self.rv}")
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["namespace"] = namespace
        meta["resourceVersion"] = str(self.rv)
        stored = {
            "apiVersion": "kube-oidc-gate.io/v1alpha1",
            "kind": "Revocation",
            **obj,
            "metadata": meta,
        }
        self.objects[(namespace, name)] = stored
        self._emit(namespace, "MODIFIED" if old else "ADDED", stored)
        return stored

    def delete(self, namespace: str, name: str) -> bool:
        """Delete by name and tell the watches; False if absent."""
        old = self.objects.pop((namespace, name), None)
        if old is None:
            return False
        self.rv += 1
        gone = json.loads(json.dumps(old))
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(namespace, "DELETED", gone)
        return True

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every watch asking."""
        for watch in self.watches:
            if watch.bookmarks:
                watch.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": "Revocation",
                            "apiVersion": "kube-oidc-gate.io/v1alpha1",
                            "metadata": {"resourceVersion": str(self.rv)},
                        },
                    }
                )

    def break_watches(self) -> int:
        """Reset every open watch connection mid-stream; return how many."""
        for watch in self.watches:
            watch.queue.put_nowait(_ABORT)
        return len(self.watches)

    def names(self, namespace: str = "kube-oidc-gate") -> list[str]:
        return sorted(n for ns, n in self.objects if ns == namespace)


# --------------------------------------------------------------------------
# Handlers


_STORE: web.AppKey[RevocationStore] = web.AppKey("fake_revocations", RevocationStore)


def _missing(store: RevocationStore, ns: str) -> web.Response | None:
    if not store.installed:
        return _status(
            404, "NotFound", "the server could not find the requested resource"
        )
    if ns not in store.namespaces:
        return _status(
            404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces"
        )
    return None


async def _collection(request: web.Request) -> web.StreamResponse:
    store = request.app[_STORE]
    ns = request.match_info["ns"]
    watching = request.query.get("watch", "").lower() in ("1", "true")
    store.seen.append(("watch" if watching else "list", request.query_string))
    if store.fail_next > 0:
        store.fail_next -= 1
        return _status(500, "InternalError", "etcd is having a bad day")
    if not store.installed:
        return _status(
            404, "NotFound", "the server could not find the requested resource"
        )
    if watching:
        return await _watch(request, store, ns)
    items = [o for (n, _), o in sorted(store.objects.items()) if n == ns]
    limit = int(request.query.get("limit", "0") or 0)
    start = int(request.query.get("continue", "0") or 0)
    page = items[start : start + limit] if limit else items[start:]
    more = bool(limit) and start + limit < len(items)
    meta: dict[str, Any] = {"resourceVersion": str(store.rv)}
    if more:
        meta["continue"] = str(start + limit)
    return web.json_response(
        {
            "apiVersion": "kube-oidc-gate.io/v1alpha1",
            "kind": "RevocationList",
            "metadata": meta,
            "items": page,
        }
    )


async def _watch(
    request: web.Request, store: RevocationStore, ns: str
) -> web.StreamResponse:
    gone, store.gone_next_watch = store.gone_next_watch, None
    if gone == "status":
        return _status(410, "Expired", "too old resource version")
    since = int(request.query.get("resourceVersion", "0") or 0)
    timeout = float(request.query.get("timeoutSeconds", "0") or 0) or None
    watch = _Watch(
        namespace=ns,
        bookmarks=request.query.get("allowWatchBookmarks") == "true",
    )
    if gone == "event":
        watch.queue.put_nowait(
            {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": "too old resource version: 1 (2)",
                    "reason": "Expired",
                    "code": 410,
                },
            }
        )
        watch.queue.put_nowait(None)
    else:
        for rv, where, past in store.history:
            if rv > since and where == ns:
                watch.queue.put_nowait(past)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    store.watches.append(watch)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0)
            try:
                event = await asyncio.wait_for(watch.queue.get(), left)
            except TimeoutError:
                break
            if event is None:
                break
            if event == _ABORT:
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the gate went away first
    finally:
        store.watches.remove(watch)
    return response


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


async def _create(request: web.Request) -> web.Response:
    store = request.app[_STORE]
    ns = request.match_info["ns"]
    store.seen.append(("create", ""))
    if _bearer(request) in store.forbidden:
        return _status(
            403,
            "Forbidden",
            f'revocations.kube-oidc-gate.io is forbidden: User "operator" cannot '
            f'create resource "revocations" in API group "kube-oidc-gate.io" in '
            f'the namespace "{ns}"',
        )
    missing = _missing(store, ns)
    if missing is not None:
        return missing
    obj = await request.json()
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if not isinstance(spec.get("subject"), str) or not spec.get("issuedBefore"):
        return _status(422, "Invalid", "spec.subject: Required value")
    name = meta.get("name")
    if not name:
        alphabet = string.ascii_lowercase + string.digits
        name = meta.get("generateName", "") + "".join(
            secrets.choice(alphabet) for _ in range(5)
        )
    if (ns, name) in store.objects:
        return _status(
            409,
            "AlreadyExists",
            f'revocations.kube-oidc-gate.io "{name}" already exists',
            name=name,
            kind="revocations",
        )
    stored = store.put(ns, {**obj, "metadata": {"name": name}})
    return web.json_response(stored, status=201)


async def _delete(request: web.Request) -> web.Response:
    store = request.app[_STORE]
    ns, name = request.match_info["ns"], request.match_info["name"]
    store.seen.append(("delete", name))
    missing = _missing(store, ns)
    if missing is not None:
        return missing
    found = store.objects.get((ns, name))
    if found is None:
        return _status(
            404,
            "NotFound",
            f'revocations.kube-oidc-gate.io "{name}" not found',
            name=name,
            kind="revocations",
        )
    body = await request.json() if request.can_read_body else {}
    uid = (body.get("preconditions") or {}).get("uid")
    if uid and uid != found["metadata"]["uid"]:
        return _status(409, "Conflict", "Precondition failed: UID in precondition")
    store.delete(ns, name)
    return web.json_response(
        {"kind": "Status", "apiVersion": "v1", "status": "Success"}, status=200
    )


def add_revocation_routes(app: web.Application, store: RevocationStore) -> None:
    """Route the collection to ``store`` (before the catch-all)."""
    app[_STORE] = store
    app.router.add_get(COLLECTION, _collection)
    app.router.add_post(COLLECTION, _create)
    app.router.add_delete(COLLECTION + "/{name}", _delete)
