"""The Revocation collection in the API server: watch it, write to it.

``RevocationWatcher`` keeps a ``proxy.revocation.RevocationList`` equal to
the Revocation objects of one namespace, the way client-go's reflector does,
in every process (each ``--workers`` worker of each replica, webhook and
proxy alike):

- **list** (paged, ``limit=500``) then **watch** from the list's
  ``resourceVersion`` with ``allowWatchBookmarks=true``; every event (and
  bookmark) moves the resourceVersion on, and a watch the API server ends
  (``timeoutSeconds``) is renewed at once from there;
- **410 Gone** (the resourceVersion was compacted away), as the watch's HTTP
  status or as an ``ERROR`` event with code 410: a fresh list, which
  replaces the whole index (objects deleted meanwhile are lifted);
- **any other failure** (an error status, no connection, a broken stream, no
  event nor bookmark within ``idle_timeout``): retry after an exponential
  backoff with full jitter, ``backoff_initial`` doubling up to
  ``backoff_max``, reset by the next success.

Readiness (decided, and documented in docs/operations.md): before the first
complete list the process is **not ready** and the authenticator refuses
tokens as ``revocations_unavailable`` (fail closed). Once a list succeeded
the process stays ready while the watch is broken, and the last list read
stays in force: ``/readyz`` shows "revocation watch broken since ..." and
``kube_oidc_gate_revocation_watch_up`` drops to 0, so an alert can fire
without every replica leaving the Service at once when the API server
hiccups (which would stop all authentication, the very thing a webhook must
not do).

Expired objects (past ``spec.expiresAt``) are deleted by the watcher every
``expiry_interval`` (jittered, so replicas do not race in step; a 404 or 409
means another replica was first and is fine); the DELETED event then lifts
them here as everywhere.

``create_revocation`` is the one writer (``kube-oidc-gate revoke``, the Okta
event hook): with a ``name`` it is idempotent (409 AlreadyExists is
success), without one the API server generates it.

The client is the project's own (``proxy.upstream.Upstream``, its pool and
llhttp parser, credentials from the in-cluster service account or a
kubeconfig); anything with the same ``fetch`` and ``auth_items`` does
(``KubeClient``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from proxy.config import RevocationSettings
from proxy.errors import RevocationError, UpstreamError
from proxy.metrics import Metrics
from proxy.revocation import (
    GROUP,
    PLURAL,
    VERSION,
    Revocation,
    RevocationList,
    parse_revocation,
    revocation_object,
)
from proxy.upstream_pool import PooledResponse

__all__ = [
    "KubeClient",
    "RevocationWatcher",
    "collection_path",
    "create_revocation",
    "delete_revocation",
]

log = logging.getLogger(__name__)

#: Largest list page or single answer read.
_MAX_BODY: Final = 8 * 1024 * 1024
#: Largest single watch event (one line).
_MAX_EVENT: Final = 1024 * 1024
_PAGE: Final = 500
_JSON: Final = "application/json"


class KubeClient(Protocol):
    """What the watcher and the writer need of an API client (``Upstream``)."""

    @property
    def auth_items(self) -> tuple[tuple[str, str], ...]:
        """The client's own credential as header pairs."""
        ...

    async def fetch(
        self,
        method: str,
        path_qs: str,
        *,
        headers: Iterable[tuple[str, str]],
        body: bytes | None = None,
        connect_timeout: float,
        head_timeout: float | None = None,
    ) -> PooledResponse:
        """Send one request; the answer once its head arrived."""
        ...


def collection_path(namespace: str) -> str:
    """``/apis/kube-oidc-gate.io/v1alpha1/namespaces/NS/revocations``."""
    ns = urllib.parse.quote(namespace, safe="")
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"


def _headers(client: KubeClient, *, body: bool = False) -> list[tuple[str, str]]:
    headers = [("Accept", _JSON), ("User-Agent", "kube-oidc-gate")]
    if body:
        headers.append(("Content-Type", _JSON))
    headers.extend(client.auth_items)
    return headers


async def _call(
    client: KubeClient,
    method: str,
    path_qs: str,
    *,
    body: Mapping[str, Any] | None = None,
    request_timeout: float,
) -> tuple[int, Any]:
    """One request with a JSON answer: (status, decoded body or None)."""
    data = None if body is None else json.dumps(body).encode()
    try:
        async with asyncio.timeout(request_timeout):
            response = await client.fetch(
                method,
                path_qs,
                headers=_headers(client, body=data is not None),
                body=data,
                connect_timeout=request_timeout,
            )
            async with response:
                raw = await response.read(_MAX_BODY)
    except TimeoutError as err:
        raise UpstreamError("revocation: no answer in time", status=504) from err
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = None
    return response.status, decoded


def _status_message(decoded: Any) -> str:
    if isinstance(decoded, Mapping) and isinstance(decoded.get("message"), str):
        return str(decoded["message"])[:300]
    return "no Status message"


def _write_error(
    status: int, decoded: Any, namespace: str, verb: str
) -> RevocationError:
    """A message a person can act on, per answer of the API server."""
    message = _status_message(decoded)
    details = decoded.get("details") if isinstance(decoded, Mapping) else None
    kind = details.get("kind") if isinstance(details, Mapping) else None
    if status == 401:
        text = (
            "revocation: the API server did not accept the credential "
            "(401 Unauthorized): check --kubeconfig / --context"
        )
    elif status == 403:
        text = (
            f"revocation: RBAC denied: {message}; the caller needs '{verb}' on "
            f"{PLURAL}.{GROUP} in namespace {namespace!r} (see "
            "deploy/components/revocation/revoker-role.yaml)"
        )
    elif status == 404 and kind == "namespaces":
        text = (
            f"revocation: namespace {namespace!r} does not exist: give the "
            "namespace the gate watches (its --revocation-namespace) with --namespace"
        )
    elif status == 404:
        text = (
            f"revocation: the Revocation CRD is not installed (the API server has "
            f"no {PLURAL}.{GROUP}/{VERSION}): kubectl apply -f "
            "deploy/components/revocation/crd.yaml"
        )
    elif status == 422:
        text = f"revocation: the API server refused the object as invalid: {message}"
    else:
        text = f"revocation: the API server answered {status}: {message}"
    return RevocationError(text, status=status)


async def create_revocation(
    client: KubeClient,
    namespace: str,
    *,
    subject: str,
    issuer: str | None,
    issued_before: float | datetime,
    reason: str,
    expires_at: float | datetime | None,
    name: str | None = None,
    request_timeout: float = 10.0,
) -> str:
    """Store one Revocation; return its name.

    With ``name`` the call is idempotent: an object of that name already
    there (409 AlreadyExists, a replayed event) is success, unchanged.
    Raises ``RevocationError`` with a specific message (RBAC, namespace,
    CRD), or when the API server cannot be reached.
    """
    body = revocation_object(
        subject=subject,
        issuer=issuer,
        issued_before=issued_before,
        reason=reason,
        expires_at=expires_at,
        name=name,
    )
    try:
        status, decoded = await _call(
            client,
            "POST",
            collection_path(namespace),
            body=body,
            request_timeout=request_timeout,
        )
    except UpstreamError as err:
        raise RevocationError(
            f"revocation: cannot reach the API server: {err}"
        ) from err
    if status in (200, 201):
        meta = decoded.get("metadata") if isinstance(decoded, Mapping) else None
        created = meta.get("name") if isinstance(meta, Mapping) else None
        if not isinstance(created, str):
            raise RevocationError(
                "revocation: the API server's answer has no metadata.name",
                status=status,
            )
        return created
    reason_code = decoded.get("reason") if isinstance(decoded, Mapping) else None
    if status == 409 and name is not None and reason_code == "AlreadyExists":
        return name
    raise _write_error(status, decoded, namespace, "create")


async def delete_revocation(
    client: KubeClient,
    namespace: str,
    name: str,
    *,
    uid: str = "",
    request_timeout: float = 10.0,
) -> str:
    """Delete one Revocation (only the one with ``uid``, when given).

    Returns ``deleted``, or ``gone`` when another replica (or a person) was
    first: 404, or 409 because the uid precondition no longer holds.
    """
    body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
    if uid:
        body["preconditions"] = {"uid": uid}
    path = collection_path(namespace) + "/" + urllib.parse.quote(name, safe="")
    try:
        status, decoded = await _call(
            client, "DELETE", path, body=body, request_timeout=request_timeout
        )
    except UpstreamError as err:
        raise RevocationError(
            f"revocation: cannot reach the API server: {err}"
        ) from err
    if status in (200, 202):
        return "deleted"
    if status in (404, 409):
        return "gone"
    raise _write_error(status, decoded, namespace, "delete")


class _Gone(Exception):
    """410: the resourceVersion is too old; list again."""


class _Broken(Exception):
    """The list or watch failed; ``reason`` is the restart metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RevocationWatcher:
    """List + watch one namespace's Revocations into a ``RevocationList``."""

    def __init__(
        self,
        client: KubeClient,
        settings: RevocationSettings,
        revocations: RevocationList,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._settings = settings
        self.revocations = revocations
        self._metrics = metrics
        self._clock = clock
        self._jitter = jitter
        self._path = collection_path(settings.namespace)
        self._rv = ""
        self._tasks: list[asyncio.Task[None]] = []
        #: Wall time the watch broke (``None``: healthy), and why.
        self.broken_since: float | None = None
        self.last_error: str | None = None
        #: Restarts by reason (what the metric counts), for tests and logs.
        self.restarts: dict[str, int] = {}
        #: Set after each complete list (tests wait on it).
        self.listed = asyncio.Event()
        self.lists = 0
        self._denied_logged = False
        if metrics is not None:
            metrics.revocation_watch_up.set(0)
            metrics.revocations.set(0)

    @property
    def namespace(self) -> str:
        """The namespace watched."""
        return self._settings.namespace

    def start(self) -> None:
        """Start the watch and the expiry sweep (background tasks)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self.run(), name="revocation-watch"),
            asyncio.create_task(self._expire_loop(), name="revocation-expiry"),
        ]

    async def close(self) -> None:
        """Stop both tasks."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def readiness(self) -> tuple[list[str], list[str]]:
        """(problems that make the process unready, warnings) for ``/readyz``."""
        where = f"revocation list (namespace {self.namespace})"
        if not self.revocations.synced:
            why = self.last_error or "first list in progress"
            return [f"{where}: not read yet: {why}"], []
        if self.broken_since is not None:
            age = int(self._clock() - self.broken_since)
            return [], [
                f"{where}: revocation watch broken since "
                f"{_iso(self.broken_since)} ({age}s): {self.last_error}; the "
                f"{len(self.revocations)} revocation(s) last read stay in force"
            ]
        return [], []

    # -- the loop --------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled (never raises otherwise)."""
        failures = 0
        while True:
            try:
                if not self._rv:
                    await self._list()
                await self._watch()
                failures = 0
                self._restart("closed", "the API server ended the watch")
            except _Gone:
                self._rv = ""
                self._restart("expired", "410 Gone: listing again")
                # A 410 right after a list would loop: back off from the second.
                failures += 1
                if failures > 1:
                    await asyncio.sleep(self._backoff(failures - 1))
            except _Broken as err:
                self._restart(err.reason, str(err))
                self._broken(str(err))
                failures += 1
                await asyncio.sleep(self._backoff(failures))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug must not end the watch for good
                log.exception("revocation watch failed (likely a bug)")
                self._restart("error", type(err).__name__)
                self._broken(f"internal error: {type(err).__name__}")
                failures += 1
                await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Full jitter over an exponential bound: uniform in [0, bound]."""
        s = self._settings
        bound = min(s.backoff_max, s.backoff_initial * 2.0 ** max(failures - 1, 0))
        return bound * self._jitter()

    def _restart(self, reason: str, detail: str) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.revocation_watch_restarts.labels(reason).inc()
        level = logging.DEBUG if reason == "closed" else logging.WARNING
        log.log(
            level,
            "revocation watch restarting",
            extra={"reason": reason, "detail": detail, "namespace": self.namespace},
        )

    def _broken(self, detail: str) -> None:
        self.last_error = detail
        if self.broken_since is None:
            self.broken_since = self._clock()
        if self._metrics is not None:
            self._metrics.revocation_watch_up.set(0)

    def _healthy(self) -> None:
        if self.broken_since is not None:
            log.info(
                "revocation watch resumed",
                extra={
                    "namespace": self.namespace,
                    "broken_for_s": round(self._clock() - self.broken_since, 3),
                },
            )
        self.broken_since = None
        self.last_error = None
        if self._metrics is not None:
            self._metrics.revocation_watch_up.set(1)

    def _count(self) -> None:
        if self._metrics is not None:
            self._metrics.revocations.set(len(self.revocations))

    async def _request(self, path_qs: str) -> tuple[int, Any]:
        try:
            return await _call(
                self._client,
                "GET",
                path_qs,
                request_timeout=self._settings.request_timeout,
            )
        except UpstreamError as err:
            raise _Broken("unreachable", str(err)) from err

    async def _list(self) -> None:
        items: list[Any] = []
        token = ""
        rv = ""
        while True:
            query = {"limit": str(_PAGE)}
            if token:
                query["continue"] = token
            status, decoded = await self._request(
                self._path + "?" + urllib.parse.urlencode(query)
            )
            if status == 410:
                raise _Gone
            if status != 200 or not isinstance(decoded, Mapping):
                raise _Broken("error", f"list: {status}: {_status_message(decoded)}")
            page = decoded.get("items")
            items.extend(page if isinstance(page, list) else [])
            meta = decoded.get("metadata")
            meta = meta if isinstance(meta, Mapping) else {}
            rv = str(meta.get("resourceVersion") or "")
            token = str(meta.get("continue") or "")
            if not token:
                break
        parsed = [r for r in (self._parse(obj) for obj in items) if r is not None]
        self.revocations.replace(parsed)
        self._rv = rv
        self.lists += 1
        self._healthy()
        self._count()
        self.listed.set()
        log.info(
            "revocation list read",
            extra={
                "namespace": self.namespace,
                "revocations": len(self.revocations),
                "resource_version": rv,
            },
        )

    def _parse(self, obj: object) -> Revocation | None:
        try:
            return parse_revocation(obj)
        except RevocationError as err:
            meta = obj.get("metadata") if isinstance(obj, Mapping) else None
            name = meta.get("name") if isinstance(meta, Mapping) else None
            log.warning(
                "revocation object ignored: malformed",
                extra={
                    "revocation": str(name)[:253],
                    "namespace": self.namespace,
                    "problem": str(err),
                },
            )
            return None

    async def _watch(self) -> None:
        s = self._settings
        timeout = max(int(s.watch_timeout * (0.8 + 0.4 * self._jitter())), 1)
        query = urllib.parse.urlencode(
            {
                "watch": "1",
                "allowWatchBookmarks": "true",
                "resourceVersion": self._rv,
                "timeoutSeconds": str(timeout),
            }
        )
        try:
            async with asyncio.timeout(s.request_timeout):
                response = await self._client.fetch(
                    "GET",
                    f"{self._path}?{query}",
                    headers=_headers(self._client),
                    connect_timeout=s.request_timeout,
                )
        except TimeoutError as err:
            raise _Broken("unreachable", "watch: no answer in time") from err
        except UpstreamError as err:
            raise _Broken("unreachable", f"watch: {err}") from err
        async with response:
            if response.status != 200:
                try:
                    raw = await response.read(_MAX_BODY)
                    decoded = json.loads(raw) if raw else None
                except (UpstreamError, ValueError):
                    decoded = None
                if response.status == 410:
                    raise _Gone
                raise _Broken(
                    "error", f"watch: {response.status}: {_status_message(decoded)}"
                )
            self._healthy()
            await self._events(response)

    async def _events(self, response: PooledResponse) -> None:
        buffer = b""
        idle = self._settings.idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await response.read_chunk()
            except TimeoutError as err:
                raise _Broken(
                    "idle", f"watch: no event nor bookmark in {idle:g}s"
                ) from err
            except UpstreamError as err:
                raise _Broken("unreachable", f"watch: {err}") from err
            if not chunk:
                return
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = buffer[:end], buffer[end + 1 :]
                if line.strip():
                    self._event(line)
            if len(buffer) > _MAX_EVENT:
                raise _Broken("malformed", "watch: an event is larger than 1 MiB")

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError as err:
            raise _Broken("malformed", "watch: an event is not JSON") from err
        if not isinstance(event, Mapping):
            raise _Broken("malformed", "watch: an event is not a JSON object")
        kind = event.get("type")
        obj = event.get("object")
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, Mapping) else None
            if code == 410:
                raise _Gone
            raise _Broken("error", f"watch: ERROR event: {_status_message(obj)}")
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping):
            raise _Broken("malformed", f"watch: a {kind} event without metadata")
        rv = meta.get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            revocation = self._parse(obj)
            if revocation is not None:
                self.revocations.put(revocation)
        elif kind == "DELETED":
            name = meta.get("name")
            if isinstance(name, str):
                self.revocations.remove(name)
        elif kind != "BOOKMARK":
            raise _Broken("malformed", f"watch: unknown event type {str(kind)[:32]!r}")
        if isinstance(rv, str) and rv:
            self._rv = rv
        self._count()

    # -- expiry ------------------------------------------------------------------

    async def _expire_loop(self) -> None:
        interval = self._settings.expiry_interval
        # The first sweep soon after start, spread over replicas and workers.
        await asyncio.sleep(min(interval, 5.0) * self._jitter())
        while True:
            try:
                await self.delete_expired()
            except asyncio.CancelledError:
                raise
            except Exception:  # the sweep must go on
                log.exception("revocation expiry sweep failed (likely a bug)")
            await asyncio.sleep(interval * (0.5 + self._jitter()))

    async def delete_expired(self) -> int:
        """Delete every object past its ``expiresAt``; return how many this
        process deleted (others may have been first)."""
        deleted = 0
        for revocation in self.revocations.expired(self._clock()):
            try:
                result = await delete_revocation(
                    self._client,
                    self.namespace,
                    revocation.name,
                    uid=revocation.uid,
                    request_timeout=self._settings.request_timeout,
                )
            except RevocationError as err:
                result = "denied" if err.status == 403 else "error"
                if result != "denied" or not self._denied_logged:
                    log.warning(
                        "expired revocation not deleted",
                        extra={"revocation": revocation.name, "problem": str(err)},
                    )
                self._denied_logged = self._denied_logged or result == "denied"
            if self._metrics is not None:
                self._metrics.revocation_deletes.labels(result).inc()
            if result == "deleted":
                deleted += 1
                log.info(
                    "expired revocation deleted",
                    extra={"revocation": revocation.name},
                )
        return deleted
