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

The parts: ``proxy.oktaevents`` reads deliveries and events and defines the
``Revoker``; ``proxy.oktaqueue`` holds the acknowledged events and their
workers; this module is the receiver (its listener, the secret, the rate
limit) and still exports every public name it had before the split.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Final

from proxy.config import Secret
from proxy.http1 import Answer, Limits, Request, Route, Server
from proxy.log import RefusalLimiter, RequestLog
from proxy.metrics import Metrics
from proxy.oktaevents import (
    DEFAULT_REVOCATION_LIFETIME,
    FORGETTING_EVENT_TYPES,
    KNOWN_EVENT_TYPES,
    REVOKING_EVENT_TYPES,
    BadDelivery,
    BadEvent,
    CallbackRevoker,
    CreateRevocation,
    HookSettings,
    OktaEvent,
    Revoker,
    count_event,
    parse_delivery,
    parse_event,
    revocation_name,
    type_label,
)
from proxy.oktaqueue import Job, RevocationQueue

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

_CHALLENGE_HEADER: Final = "x-okta-verification-challenge"


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
        self._secret = secret.reveal().encode()
        self.settings = settings = settings or HookSettings()
        self._metrics = metrics
        self._bucket = TokenBucket(settings.rate, settings.burst, clock=clock)
        self._queue = RevocationQueue(revoker, settings, metrics)
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
        self._queue.start()
        return await self.server.start(
            host, port, ssl_context=ssl_context, reuse_port=reuse_port
        )

    async def close(self, grace: float) -> None:
        """Stop listening, give queued events ``grace`` seconds, log the rest."""
        await self.server.drain(0)
        await self._queue.close(grace)

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
        except BadDelivery as bad:
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
            raise BadDelivery(
                415,
                'okta hook: Content-Type must be "application/json", got '
                f'"{request.content_type[:64]}"',
            )
        raw_events = parse_delivery(request.body, max_events=self.settings.max_events)
        jobs: list[Job] = []
        forgets: list[tuple[OktaEvent, str]] = []
        counts: list[tuple[str, str]] = []
        batch: set[str] = set()
        for raw in raw_events:
            event_type = raw.get("eventType") if isinstance(raw, dict) else None
            label = type_label(event_type)
            if (
                event_type not in REVOKING_EVENT_TYPES
                and event_type not in FORGETTING_EVENT_TYPES
            ):
                counts.append((label, "ignored"))
                continue
            try:
                event = parse_event(raw)
            except BadEvent as bad:
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
            if self._queue.seen(event.uuid) or event.uuid in batch:
                counts.append((label, "duplicate"))
                continue
            batch.add(event.uuid)
            if event_type in FORGETTING_EVENT_TYPES:
                forgets.extend((event, user) for user in event.users)
                continue
            several = len(event.users) > 1
            jobs.extend(
                Job(
                    event=event,
                    subject=user,
                    key=f"{event.uuid}:{user}" if several else event.uuid,
                )
                for user in event.users
            )
        room = self._queue.room()
        if len(jobs) > room:
            log.error(
                "okta hook: queue full, delivery refused for Okta to retry",
                extra={"events": len(jobs), "room": room},
            )
            raise BadDelivery(503, "okta hook: too many events waiting; retry")
        # Nothing below can fail the delivery: from here it is acknowledged.
        self._queue.accept(batch, jobs)
        for event, user in forgets:
            self._queue.forget(event, user)
        for label, outcome in counts:
            count_event(self._metrics, label, outcome)
        log.info(
            "okta hook: delivery accepted",
            extra={"events": len(raw_events), "queued": len(jobs)},
        )
        return _ACCEPTED

    # -- counting -----------------------------------------------------------

    def _count_answer(self, _handler: str, code: int, _seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.okta_hook_requests, str(code)).inc()

    def _refused(self, status: int, detail: str) -> None:
        if self._limiter.admit((("status", status),)):
            _REFUSAL_LOG.info(
                "okta hook: request refused", {"status": status, "detail": detail}
            )

    @property
    def pending(self) -> int:
        """Events queued or being processed now."""
        return self._queue.pending
