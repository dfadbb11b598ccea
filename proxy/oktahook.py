"""Okta Event Hooks: a user disabled in Okta is revoked here in seconds (issue 22, part 3).

Okta calls an *event hook* (Admin console → Workflow → Event Hooks) with the
System Log events it was subscribed to. This module is that hook's receiver:
a listener of its own (``--okta-event-hook-address``), on ``proxy.http1`` like
the webhook, with the serving certificate of the front end (the same
``ssl.SSLContext``, so a reloaded certificate serves here too). It answers one
path, ``/okta/events`` (``HOOK_PATH``), and two methods:

- ``GET`` with ``X-Okta-Verification-Challenge``: Okta's one-time verification
  when the hook is created; answered ``{"verification": "<the header's value>"}``.
- ``POST`` of a delivery, ``{"eventType": "com.okta.event_hook", "data":
  {"events": [...]}}``: Okta batches events that happen close together. Each
  event has a ``uuid``, a ``published`` time, an ``eventType`` and ``target``
  (``[{"type": "User", "id": "00u...", ...}, ...]``).

Both need the shared secret Okta sends as the whole ``Authorization`` header
value (the hook's *Authentication field* / *secret*), compared in constant
time; anything else is 401 and nothing is stored.

What an event does. ``user.lifecycle.deactivate``, ``user.lifecycle.suspend``,
``user.session.clear``, ``user.account.lock`` and
``user.lifecycle.delete.initiated`` revoke every token of the target user
issued before the event's ``published`` time (Okta's user id is the ``sub`` of
its tokens): ``Revoker.revoke``, which part 2 stores as a ``Revocation`` object
that every replica watches. ``group.user_membership.remove`` drops the user's
cached verdicts (``Revoker.forget``: their groups changed). Any other type is
acknowledged and counted, never refused: Okta would retry it for nothing.

Okta's 3 s. Okta waits 3 s for an answer, retries once, then gives up and
writes a delivery failure to its System Log. A write to the API server can
take longer than that (a slow etcd, a rolling control plane), so a delivery is
checked, its events are put on a bounded queue, and the answer (200, empty) is
sent before any of them is processed; a few workers take events off the queue
and call the ``Revoker`` with a timeout and retries. Nothing acknowledged is
lost silently: an event whose revocation still fails after the retries, or is
still queued when the process stops, is logged at error level with its uuid,
type and user (enough for ``kube-oidc-gate revoke --sub``) and counted in
``kube_oidc_gate_okta_hook_events_total{outcome="failed"}``. When the queue
has no room for a whole batch, the batch is refused with 503 before anything
is taken: Okta's retry gets another chance, and nothing was acknowledged.

Replays. Okta delivers at least once (a retry after a slow answer repeats a
batch). A bounded LRU of the event uuids taken recently answers a replay to
this process without a second call; across processes and restarts the
``Revoker`` is idempotent per key (the uuid), which part 2 makes the object's
name.

Bounds: a body of at most ``max_body_bytes`` (413, by ``proxy.http1``), at
most ``max_events`` events a batch (413), a token bucket per listener (429
with ``Retry-After``) that only requests with the right secret draw from (so
a flood without it cannot spend Okta's budget), the server's head and body
timeouts, ``GET``/``POST`` on ``HOOK_PATH`` only (404, 405). Nothing a client
sent is logged but the event uuids, types and Okta user ids of authenticated
deliveries; the secret never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from proxy.config import Secret
from proxy.http1 import Answer, Limits, Request, Route, Server
from proxy.log import RefusalLimiter, RequestLog
from proxy.metrics import Metrics

__all__ = [
    "DEFAULT_REVOCATION_LIFETIME",
    "FORGETTING_EVENT_TYPES",
    "HOOK_PATH",
    "KNOWN_EVENT_TYPES",
    "REVOKING_EVENT_TYPES",
    "CallbackRevoker",
    "CreateRevocation",
    "HookSettings",
    "OktaEvent",
    "OktaHook",
    "Revoker",
    "TokenBucket",
    "revocation_name",
]

log = logging.getLogger(__name__)
_REFUSAL_LOG: Final = RequestLog(__name__)

#: The one path the hook answers; give Okta ``https://<host>:<port>/okta/events``.
HOOK_PATH: Final = "/okta/events"

#: Events after which none of the user's earlier tokens may be accepted.
REVOKING_EVENT_TYPES: Final = frozenset(
    {
        "user.lifecycle.deactivate",
        "user.lifecycle.suspend",
        "user.session.clear",
        "user.account.lock",
        "user.lifecycle.delete.initiated",
    }
)
#: Events after which the user's cached verdicts (their groups) are stale.
FORGETTING_EVENT_TYPES: Final = frozenset({"group.user_membership.remove"})

#: Event types that get a label of their own in the events metric; any other
#: is counted as ``other`` (a sender chooses the type: the label set stays
#: bounded whatever it sends).
KNOWN_EVENT_TYPES: Final = (
    REVOKING_EVENT_TYPES
    | FORGETTING_EVENT_TYPES
    | frozenset(
        {
            "group.user_membership.add",
            "user.account.unlock",
            "user.lifecycle.activate",
            "user.lifecycle.create",
            "user.lifecycle.reactivate",
            "user.lifecycle.unsuspend",
            "user.session.start",
        }
    )
)

#: The delivery's own ``eventType`` (the events inside have theirs).
_DELIVERY_TYPE: Final = "com.okta.event_hook"
_CHALLENGE_HEADER: Final = "x-okta-verification-challenge"
#: Longest event uuid taken (Okta's are 36 characters).
_MAX_UUID: Final = 128
#: Longest Okta user id taken (Okta's are 20 characters).
_MAX_SUBJECT: Final = 256

#: How long a ``Revocation`` made from an event is kept: the longest lifetime of
#: a token the gate accepts (Okta's ID tokens live one hour, its access tokens
#: at most a day). Past it, every token issued before the event has expired
#: anyway, and the gate deletes the object.
DEFAULT_REVOCATION_LIFETIME: Final = timedelta(hours=24)


class Revoker(Protocol):
    """Where the hook's decisions go (part 2's revocation list, in production)."""

    async def revoke(
        self, *, subject: str, issued_before: datetime, reason: str, key: str
    ) -> None:
        """Refuse ``subject``'s tokens issued before ``issued_before``.

        Idempotent per ``key`` (the Okta event uuid): a replay must not make a
        second revocation. Raises on failure; the hook retries, then logs.
        """

    def forget(self, subject: str) -> None:
        """Drop ``subject``'s cached verdicts (their group membership changed)."""


class CreateRevocation(Protocol):
    """Store one revocation, idempotently by ``name`` (an existing one is success).

    Part 2's ``create_revocation(client, namespace, *, subject, issuer,
    issued_before, reason, expires_at, name)`` with its first two arguments
    bound (``functools.partial(create_revocation, client, namespace)``).
    """

    def __call__(
        self,
        *,
        subject: str,
        issuer: str | None,
        issued_before: datetime,
        reason: str,
        expires_at: datetime,
        name: str,
    ) -> Awaitable[object]:
        """Create the ``Revocation`` object ``name``, or find it there already."""


def revocation_name(key: str) -> str:
    """The Kubernetes object name for ``key``: the same for every replay.

    A hash, not the uuid itself, so the name is a valid DNS-1123 name whatever
    the key holds, and of a fixed length.
    """
    return "okta-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class CallbackRevoker:
    """The default ``Revoker``: two callables, so any writer can be plugged in.

    ``create`` is a ``CreateRevocation`` (part 2's writer with its client and
    namespace bound); ``forget`` drops a subject's cached verdicts (the
    authenticator's ``forget_subject``). The revocation names no issuer by
    default: an Okta user id is unique in its org and means nothing to other
    issuers; pass ``issuer`` to restrict it. ``expires_at`` is the event time
    plus ``lifetime``, the longest lifetime of a token the gate accepts.
    """

    __slots__ = ("_create", "_forget", "_issuer", "_lifetime")

    def __init__(
        self,
        create: CreateRevocation,
        forget: Callable[[str], None],
        *,
        issuer: str | None = None,
        lifetime: timedelta = DEFAULT_REVOCATION_LIFETIME,
    ) -> None:
        self._create = create
        self._forget = forget
        self._issuer = issuer
        self._lifetime = lifetime

    async def revoke(
        self, *, subject: str, issued_before: datetime, reason: str, key: str
    ) -> None:
        """Create the revocation named after ``key`` (``revocation_name``)."""
        await self._create(
            subject=subject,
            issuer=self._issuer,
            issued_before=issued_before,
            reason=reason,
            expires_at=issued_before + self._lifetime,
            name=revocation_name(key),
        )

    def forget(self, subject: str) -> None:
        """Call ``forget``."""
        self._forget(subject)


@dataclass(frozen=True, slots=True, kw_only=True)
class HookSettings:
    """The hook's bounds (defaults: far above what one Okta org sends)."""

    #: Largest delivery read (413 beyond). Okta's events are 1-3 KiB each.
    max_body_bytes: int = 1024 * 1024
    #: Most events in one delivery (413 beyond).
    max_events: int = 500
    #: Authenticated requests per second the bucket refills (429 beyond).
    rate: float = 10.0
    #: Requests the bucket holds (a burst of Okta's retries).
    burst: int = 50
    #: Events waiting for the ``Revoker``; a batch that does not fit gets 503.
    queue_size: int = 10_000
    #: Events processed at once.
    workers: int = 4
    #: Deadline of one ``Revoker.revoke`` call.
    revoke_timeout: float = 10.0
    #: Calls per event before it is logged and counted as failed.
    attempts: int = 3
    #: Seconds before the first retry; doubled for each next one.
    retry_backoff: float = 1.0
    #: Event uuids remembered to answer replays without a call.
    seen_size: int = 10_000
    #: A request head must arrive within this long (also the keep-alive idle).
    head_timeout: float = 30.0
    #: A body must arrive within this long of its head (408).
    body_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OktaEvent:
    """One event of a delivery, as far as the hook reads it."""

    uuid: str
    event_type: str
    published: datetime
    #: The ids of the event's ``User`` targets.
    users: tuple[str, ...]
    #: ``outcome.result`` (``SUCCESS`` when Okta sent none).
    result: str = "SUCCESS"


class _BadDelivery(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BadEvent(Exception):
    """One event the hook cannot act on; the rest of the batch still counts."""


def _parse_delivery(body: bytes, *, max_events: int) -> list[Any]:
    """The ``data.events`` list of a delivery; raises ``_BadDelivery`` (400, 413)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise _BadDelivery(400, "okta hook: body is not valid JSON") from err
    if not isinstance(doc, dict):
        raise _BadDelivery(
            400, "okta hook: body must be a JSON object (an Okta event hook delivery)"
        )
    kind = doc.get("eventType", _DELIVERY_TYPE)
    if kind != _DELIVERY_TYPE:
        raise _BadDelivery(
            400,
            f'okta hook: eventType must be "{_DELIVERY_TYPE}", '
            f"got {json.dumps(kind)[:80]}",
        )
    data = doc.get("data")
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise _BadDelivery(400, "okta hook: data.events must be a list of events")
    if len(events) > max_events:
        raise _BadDelivery(
            413,
            f"okta hook: {len(events)} events in one delivery, more than the "
            f"{max_events} taken",
        )
    return events


def _text(event: dict[str, Any], field: str, limit: int) -> str:
    value = event.get(field)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _BadEvent(f'okta hook: event "{field}" must be a non-empty string')
    return value


def _event(raw: object) -> OktaEvent:
    if not isinstance(raw, dict):
        raise _BadEvent("okta hook: an event must be a JSON object")
    uuid = _text(raw, "uuid", _MAX_UUID)
    event_type = _text(raw, "eventType", 256)
    published_text = _text(raw, "published", 64)
    try:
        published = datetime.fromisoformat(published_text)
    except ValueError as err:
        raise _BadEvent(
            f'okta hook: event "published" is not an ISO 8601 time: '
            f"{json.dumps(published_text)}"
        ) from err
    if published.tzinfo is None:
        published = published.replace(tzinfo=UTC)
    targets = raw.get("target")
    if not isinstance(targets, list):
        raise _BadEvent('okta hook: event "target" must be a list')
    users = tuple(
        dict.fromkeys(
            t["id"]
            for t in targets
            if isinstance(t, dict)
            and t.get("type") == "User"
            and isinstance(t.get("id"), str)
            and 0 < len(t["id"]) <= _MAX_SUBJECT
        )
    )
    if not users:
        raise _BadEvent('okta hook: event has no "User" target with an "id"')
    outcome = raw.get("outcome")
    result = outcome.get("result") if isinstance(outcome, dict) else None
    return OktaEvent(
        uuid=uuid,
        event_type=event_type,
        published=published,
        users=users,
        result=result if isinstance(result, str) else "SUCCESS",
    )


def _type_label(event_type: object) -> str:
    if isinstance(event_type, str) and event_type in KNOWN_EVENT_TYPES:
        return event_type
    return "other"


class TokenBucket:
    """``rate`` requests a second on average, ``burst`` at once."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _error(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Answer:
    body = json.dumps({"error": message}).encode()
    return Answer(status, body, headers, status in (408, 413))


#: Okta wants an empty body with 200 or 204.
_ACCEPTED: Final = Answer(200, b"", content_type=None)


@dataclass(slots=True)
class _Job:
    event: OktaEvent
    subject: str
    key: str


class OktaHook:
    """The listener, its handler, its queue and its workers (see the module docs)."""

    def __init__(
        self,
        revoker: Revoker,
        secret: Secret,
        settings: HookSettings | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._revoker = revoker
        self._secret = secret.reveal().encode()
        self.settings = settings = settings or HookSettings()
        self._metrics = metrics
        self._bucket = TokenBucket(settings.rate, settings.burst, clock=clock)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(settings.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self._limiter = RefusalLimiter(_REFUSAL_LOG, limit=10)
        self.server = Server(
            {HOOK_PATH: Route(self._handle, frozenset({"GET", "POST"}))},
            limits=Limits(
                max_body_bytes=settings.max_body_bytes,
                head_timeout=settings.head_timeout,
                body_timeout=settings.body_timeout,
            ),
            error_body=lambda status, message: json.dumps({"error": message}).encode(),
            on_answer=self._count_answer,
        )

    # -- serving ------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool = False,
    ) -> int:
        """Start the workers and listen; return the port bound."""
        for i in range(self.settings.workers):
            self._workers.append(
                asyncio.create_task(self._work(), name=f"okta hook worker {i}")
            )
        return await self.server.start(
            host, port, ssl_context=ssl_context, reuse_port=reuse_port
        )

    async def close(self, grace: float) -> None:
        """Stop listening, give queued events ``grace`` seconds, log the rest."""
        await self.server.drain(0)
        if self._workers and not self._queue.empty():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._queue.join()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._failed(job, "not processed before shutdown", attempts=0)
        self._set_depth()

    # -- requests -----------------------------------------------------------

    def _handle(self, request: Request) -> Answer:
        if not self._authorized(request):
            self._refused(401, "okta hook: wrong or missing Authorization header")
            return _error(401, "okta hook: wrong or missing Authorization header")
        if not self._bucket.take():
            self._refused(429, "okta hook: too many requests")
            return _error(
                429, "okta hook: too many requests; retry", (("Retry-After", "1"),)
            )
        if request.method == "GET":
            return self._verify(request)
        try:
            return self._deliver(request)
        except _BadDelivery as bad:
            self._refused(bad.status, str(bad))
            return _error(bad.status, str(bad))

    def _authorized(self, request: Request) -> bool:
        sent = request.headers.get("authorization")
        # Latin-1 gives back the bytes as sent; compared whole, in constant time.
        return sent is not None and hmac.compare_digest(
            sent.encode("latin-1"), self._secret
        )

    def _verify(self, request: Request) -> Answer:
        challenge = request.headers.get(_CHALLENGE_HEADER)
        if not challenge:
            self._refused(400, "okta hook: GET without a verification challenge")
            return _error(
                400,
                "okta hook: a GET is Okta's verification request and needs the "
                "X-Okta-Verification-Challenge header",
            )
        log.info("okta hook: verification request answered")
        return Answer(200, json.dumps({"verification": challenge}).encode())

    def _deliver(self, request: Request) -> Answer:
        if request.content_type != "application/json":
            raise _BadDelivery(
                415,
                'okta hook: Content-Type must be "application/json", got '
                f'"{request.content_type[:64]}"',
            )
        raw_events = _parse_delivery(request.body, max_events=self.settings.max_events)
        jobs: list[_Job] = []
        forgets: list[tuple[OktaEvent, str]] = []
        counts: list[tuple[str, str]] = []
        batch: set[str] = set()
        for raw in raw_events:
            event_type = raw.get("eventType") if isinstance(raw, dict) else None
            label = _type_label(event_type)
            if (
                event_type not in REVOKING_EVENT_TYPES
                and event_type not in FORGETTING_EVENT_TYPES
            ):
                counts.append((label, "ignored"))
                continue
            try:
                event = _event(raw)
            except _BadEvent as bad:
                counts.append((label, "invalid"))
                log.warning(
                    "okta hook: event not usable",
                    extra={"event_type": label, "problem": str(bad)},
                )
                continue
            if event.result != "SUCCESS":
                counts.append((label, "ignored"))
                log.info(
                    "okta hook: event of a failed action ignored",
                    extra={"uuid": event.uuid, "event_type": label},
                )
                continue
            if event.uuid in self._seen or event.uuid in batch:
                counts.append((label, "duplicate"))
                continue
            batch.add(event.uuid)
            if event_type in FORGETTING_EVENT_TYPES:
                forgets.extend((event, user) for user in event.users)
                continue
            several = len(event.users) > 1
            jobs.extend(
                _Job(
                    event=event,
                    subject=user,
                    key=f"{event.uuid}:{user}" if several else event.uuid,
                )
                for user in event.users
            )
        room = self._queue.maxsize - self._queue.qsize()
        if len(jobs) > room:
            log.error(
                "okta hook: queue full, delivery refused for Okta to retry",
                extra={"events": len(jobs), "room": room},
            )
            raise _BadDelivery(503, "okta hook: too many events waiting; retry")
        # Nothing below can fail the delivery: from here it is acknowledged.
        for uuid in batch:
            self._remember(uuid)
        for job in jobs:
            self._queue.put_nowait(job)
        self._set_depth()
        for event, user in forgets:
            self._forget(event, user)
        for label, outcome in counts:
            self._count_event(label, outcome)
        log.info(
            "okta hook: delivery accepted",
            extra={"events": len(raw_events), "queued": len(jobs)},
        )
        return _ACCEPTED

    def _remember(self, uuid: str) -> None:
        seen = self._seen
        seen[uuid] = None
        seen.move_to_end(uuid)
        while len(seen) > self.settings.seen_size:
            seen.popitem(last=False)

    def _forget(self, event: OktaEvent, user: str) -> None:
        label = _type_label(event.event_type)
        try:
            self._revoker.forget(user)
        except Exception as err:  # noqa: BLE001 - counted and logged, never raised to Okta
            self._seen.pop(event.uuid, None)
            self._count_event(label, "failed")
            log.error(
                "okta hook: cached verdicts not dropped",
                extra={
                    "uuid": event.uuid,
                    "event_type": event.event_type,
                    "subject": user,
                    "error": f"{type(err).__name__}: {err}"[:300],
                },
            )
            return
        self._count_event(label, "forgotten")
        log.info(
            "okta hook: cached verdicts dropped",
            extra={"uuid": event.uuid, "event_type": event.event_type, "subject": user},
        )

    # -- the queue ----------------------------------------------------------

    async def _work(self) -> None:
        queue = self._queue
        while True:
            job = await queue.get()
            self._busy += 1
            try:
                await self._process(job)
            except asyncio.CancelledError:
                self._failed(job, "not processed before shutdown", attempts=0)
                raise
            finally:
                self._busy -= 1
                queue.task_done()
                self._set_depth()

    async def _process(self, job: _Job) -> None:
        settings = self.settings
        event = job.event
        reason = f"okta:{event.event_type}"
        problem = ""
        for attempt in range(1, settings.attempts + 1):
            try:
                async with asyncio.timeout(settings.revoke_timeout):
                    await self._revoker.revoke(
                        subject=job.subject,
                        issued_before=event.published,
                        reason=reason,
                        key=job.key,
                    )
            except TimeoutError:
                problem = f"no answer within {settings.revoke_timeout:g}s"
            except Exception as err:  # noqa: BLE001 - retried, then counted and logged
                problem = f"{type(err).__name__}: {err}"[:300]
            else:
                self._count_event(_type_label(event.event_type), "revoked")
                log.info(
                    "okta hook: user revoked",
                    extra={
                        "uuid": event.uuid,
                        "event_type": event.event_type,
                        "subject": job.subject,
                        "issued_before": event.published.isoformat(),
                        "attempts": attempt,
                    },
                )
                return
            if attempt < settings.attempts:
                log.warning(
                    "okta hook: revocation failed, retrying",
                    extra={"uuid": event.uuid, "attempt": attempt, "error": problem},
                )
                await asyncio.sleep(settings.retry_backoff * 2 ** (attempt - 1))
        self._failed(job, problem, attempts=settings.attempts)

    def _failed(self, job: _Job, problem: str, *, attempts: int) -> None:
        # Forgotten, so a redelivery (by hand, from Okta's System Log) is taken.
        self._seen.pop(job.event.uuid, None)
        self._count_event(_type_label(job.event.event_type), "failed")
        log.error(
            "okta hook: revocation not stored",
            extra={
                "uuid": job.event.uuid,
                "event_type": job.event.event_type,
                "subject": job.subject,
                "issued_before": job.event.published.isoformat(),
                "attempts": attempts,
                "error": problem,
                "hint": "revoke by hand: kube-oidc-gate revoke --sub SUBJECT "
                "--before ISSUED_BEFORE",
            },
        )

    # -- counting -----------------------------------------------------------

    def _count_answer(self, _handler: str, code: int, _seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.okta_hook_requests, str(code)).inc()

    def _count_event(self, label: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.okta_hook_events, label, outcome).inc()

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.okta_hook_queue.set(self._queue.qsize())

    def _refused(self, status: int, detail: str) -> None:
        if self._limiter.admit((("status", status),)):
            _REFUSAL_LOG.info(
                "okta hook: request refused", {"status": status, "detail": detail}
            )

    @property
    def pending(self) -> int:
        """Events queued or being processed now."""
        return self._queue.qsize() + self._busy
