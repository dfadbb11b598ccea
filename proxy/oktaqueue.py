"""Acknowledged Okta events, and the workers that store their revocations.

Okta waits 3 s for an answer; a write to the API server may take longer. So
the receiver (``proxy.oktahook``) only checks a delivery and hands its events
here (``accept``), and answers; a few workers then call the ``Revoker`` with
a timeout and retries. Nothing acknowledged is lost silently: an event whose
revocation still fails after the retries, or is still queued at shutdown, is
logged at error level with what ``kube-oidc-gate revoke`` needs, and counted
as ``failed``. The event uuids taken recently are remembered (a bounded LRU)
so a replay is answered without a second call; a failed one is forgotten, so
a redelivery is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.metrics import Metrics
from proxy.oktaevents import HookSettings, OktaEvent, Revoker, count_event, type_label

__all__ = ["Job", "RevocationQueue"]

#: The logger of ``proxy.oktahook``, whose part this was: operators and tests
#: filter on that name.
log = logging.getLogger("proxy.oktahook")


@dataclass(slots=True)
class Job:
    """One user's revocation for one event (``key``: the revocation's name)."""

    event: OktaEvent
    subject: str
    key: str


class RevocationQueue:
    """The bounded queue of ``Job``s, its workers and the uuids seen."""

    def __init__(
        self, revoker: Revoker, settings: HookSettings, metrics: Metrics | None
    ) -> None:
        self._revoker = revoker
        self.settings = settings
        self._metrics = metrics
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._queue: asyncio.Queue[Job] = asyncio.Queue(settings.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0

    def start(self) -> None:
        """Start the workers."""
        for i in range(self.settings.workers):
            self._workers.append(
                asyncio.create_task(self._work(), name=f"okta hook worker {i}")
            )

    async def close(self, grace: float) -> None:
        """Give queued events ``grace`` seconds, then log and count the rest."""
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

    def seen(self, uuid: str) -> bool:
        """Whether the event ``uuid`` was taken recently (a replay)."""
        return uuid in self._seen

    def room(self) -> int:
        """Jobs the queue can take now."""
        return self._queue.maxsize - self._queue.qsize()

    def accept(self, uuids: Iterable[str], jobs: Iterable[Job]) -> None:
        """Take a checked delivery's events: remember them, queue their jobs.

        The caller made sure the jobs fit (``room``): from here the delivery
        is acknowledged.
        """
        for uuid in uuids:
            self._remember(uuid)
        for job in jobs:
            self._queue.put_nowait(job)
        self._set_depth()

    @property
    def pending(self) -> int:
        """Events queued or being processed now."""
        return self._queue.qsize() + self._busy

    def _remember(self, uuid: str) -> None:
        seen = self._seen
        seen[uuid] = None
        seen.move_to_end(uuid)
        while len(seen) > self.settings.seen_size:
            seen.popitem(last=False)

    def forget(self, event: OktaEvent, user: str) -> None:
        """Drop ``user``'s cached verdicts now (a group change), logged and counted."""
        label = type_label(event.event_type)
        try:
            self._revoker.forget(user)
        except Exception as err:  # noqa: BLE001 - counted and logged, never raised to Okta
            self._seen.pop(event.uuid, None)
            count_event(self._metrics, label, "failed")
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
        count_event(self._metrics, label, "forgotten")
        log.info(
            "okta hook: cached verdicts dropped",
            extra={"uuid": event.uuid, "event_type": event.event_type, "subject": user},
        )

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

    async def _process(self, job: Job) -> None:
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
                count_event(self._metrics, type_label(event.event_type), "revoked")
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

    def _failed(self, job: Job, problem: str, *, attempts: int) -> None:
        # Forgotten, so a redelivery (by hand, from Okta's System Log) is taken.
        self._seen.pop(job.event.uuid, None)
        count_event(self._metrics, type_label(job.event.event_type), "failed")
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

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.okta_hook_queue.set(self._queue.qsize())
