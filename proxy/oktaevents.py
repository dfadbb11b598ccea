"""What Okta's event hook sends, read: deliveries, events, and where they go.

The receiver (``proxy.oktahook``) hands a delivery's body to
``parse_delivery`` and each event of a type it acts on to ``parse_event``;
both raise with a message fit for the answer to Okta, never quoting more than
a short field. The ``Revoker`` is where the decisions go (``CallbackRevoker``
over part 2's writer in production); ``HookSettings`` are the bounds of the
receiver and of its queue (``proxy.oktaqueue``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from proxy.metrics import Metrics

__all__ = [
    "DEFAULT_REVOCATION_LIFETIME",
    "FORGETTING_EVENT_TYPES",
    "KNOWN_EVENT_TYPES",
    "REVOKING_EVENT_TYPES",
    "BadDelivery",
    "BadEvent",
    "CallbackRevoker",
    "CreateRevocation",
    "HookSettings",
    "OktaEvent",
    "Revoker",
    "count_event",
    "parse_delivery",
    "parse_event",
    "revocation_name",
    "type_label",
]

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


class BadDelivery(Exception):
    """A delivery refused whole, with the status to answer (400, 413, 415, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadEvent(Exception):
    """One event the hook cannot act on; the rest of the batch still counts."""


def parse_delivery(body: bytes, *, max_events: int) -> list[Any]:
    """The ``data.events`` list of a delivery; raises ``BadDelivery`` (400, 413)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise BadDelivery(400, "okta hook: body is not valid JSON") from err
    if not isinstance(doc, dict):
        raise BadDelivery(
            400, "okta hook: body must be a JSON object (an Okta event hook delivery)"
        )
    kind = doc.get("eventType", _DELIVERY_TYPE)
    if kind != _DELIVERY_TYPE:
        raise BadDelivery(
            400,
            f'okta hook: eventType must be "{_DELIVERY_TYPE}", '
            f"got {json.dumps(kind)[:80]}",
        )
    data = doc.get("data")
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise BadDelivery(400, "okta hook: data.events must be a list of events")
    if len(events) > max_events:
        raise BadDelivery(
            413,
            f"okta hook: {len(events)} events in one delivery, more than the "
            f"{max_events} taken",
        )
    return events


def _text(event: dict[str, Any], field: str, limit: int) -> str:
    value = event.get(field)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadEvent(f'okta hook: event "{field}" must be a non-empty string')
    return value


def parse_event(raw: object) -> OktaEvent:
    if not isinstance(raw, dict):
        raise BadEvent("okta hook: an event must be a JSON object")
    uuid = _text(raw, "uuid", _MAX_UUID)
    event_type = _text(raw, "eventType", 256)
    published_text = _text(raw, "published", 64)
    try:
        published = datetime.fromisoformat(published_text)
    except ValueError as err:
        raise BadEvent(
            f'okta hook: event "published" is not an ISO 8601 time: '
            f"{json.dumps(published_text)}"
        ) from err
    if published.tzinfo is None:
        published = published.replace(tzinfo=UTC)
    targets = raw.get("target")
    if not isinstance(targets, list):
        raise BadEvent('okta hook: event "target" must be a list')
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
        raise BadEvent('okta hook: event has no "User" target with an "id"')
    outcome = raw.get("outcome")
    result = outcome.get("result") if isinstance(outcome, dict) else None
    return OktaEvent(
        uuid=uuid,
        event_type=event_type,
        published=published,
        users=users,
        result=result if isinstance(result, str) else "SUCCESS",
    )


def type_label(event_type: object) -> str:
    """The metric label of an event type: its name if known, else ``other``."""
    if isinstance(event_type, str) and event_type in KNOWN_EVENT_TYPES:
        return event_type
    return "other"


def count_event(metrics: Metrics | None, label: str, outcome: str) -> None:
    """Count one event by type label and outcome (when there are metrics)."""
    if metrics is not None:
        metrics.child(metrics.okta_hook_events, label, outcome).inc()
