"""The Okta event hook receiver (issue 22, part 3), over real TLS on 127.0.0.1.

Every test talks HTTPS to a real ``OktaHook`` listener (a trustme CA and the
front end's ``ServingTLS`` context) with aiohttp's client, and sends bodies
shaped as Okta documents them: a delivery ``{"eventType":
"com.okta.event_hook", "data": {"events": [...]}}`` of System Log events. The
``Revoker`` is a recorder (what would be written to Kubernetes), sometimes
slow or failing on purpose. The last test starts the real CLI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy.certs import CertPair, ServingTLS
from proxy.config import Secret, okta_event_hook_from_args
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.oktahook import (
    HOOK_PATH,
    CallbackRevoker,
    HookSettings,
    OktaHook,
    revocation_name,
)
from tests.fakes.apiserver import FakeAPIServer, serve_apiserver
from tests.fakes.apiserver_harness import upstream_kubeconfig
from tests.proc import Proc
from tests.test_cli_webhook import free_port

SECRET = "Basic a3ViZS1vaWRjLWdhdGU6czNjcjN0LXZhbHVl"
CHALLENGE = "Me_rShK8JHsTnbyYrWXCEoMGbM_zsZ6k0hLPZ_Pg"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


# -- Okta's payloads ----------------------------------------------------------


def okta_event(
    event_type: str,
    user_id: str,
    *,
    uuid: str,
    published: str,
    extra_targets: list[dict[str, Any]] | None = None,
    result: str = "SUCCESS",
) -> dict[str, Any]:
    """One System Log event as an event hook delivers it (Okta's documented shape)."""
    return {
        "uuid": uuid,
        "published": published,
        "eventType": event_type,
        "version": "0",
        "displayMessage": "Deactivate Okta user",
        "severity": "INFO",
        "client": {
            "userAgent": {
                "rawUserAgent": "Mozilla/5.0 (X11; Linux x86_64)",
                "os": "Linux",
                "browser": "CHROME",
            },
            "zone": "null",
            "device": "Computer",
            "id": None,
            "ipAddress": "198.51.100.7",
            "geographicalContext": None,
        },
        "device": None,
        "actor": {
            "id": "00u1adminadminadmin7",
            "type": "User",
            "alternateId": "admin@example.com",
            "displayName": "Okta Admin",
            "detailEntry": None,
        },
        "outcome": {"result": result, "reason": None},
        "target": [
            {
                "id": user_id,
                "type": "User",
                "alternateId": f"{user_id}@example.com",
                "displayName": "Some User",
                "detailEntry": None,
            },
            *(extra_targets or []),
        ],
        "transaction": {"type": "WEB", "id": "YPx9yvqaJ1mPQwFfzM6cYAAADHE"},
        "debugContext": {"debugData": {"requestUri": "/api/v1/users/x/lifecycle"}},
        "legacyEventType": "core.user.config.user_deactivated",
        "authenticationContext": {
            "authenticationStep": 0,
            "externalSessionId": "102nE4TnOGtRdOaL1ZqeQ3xUw",
        },
        "securityContext": {},
        "insertionTimestamp": None,
    }


def delivery(*events: dict[str, Any]) -> dict[str, Any]:
    """A POST body of Okta's event hook (the envelope around the events)."""
    return {
        "eventType": "com.okta.event_hook",
        "eventTypeVersion": "1.0",
        "cloudEventsVersion": "0.1",
        "source": "https://example.okta.com/api/v1/eventHooks/whoabc123",
        "eventId": "b5a188b9-5ece-4636-b041-482ffda96311",
        "data": {"events": list(events)},
        "eventTime": "2026-03-02T14:28:12.000Z",
        "contentType": "application/json",
    }


# -- the parts ------------------------------------------------------------------


@dataclass
class Recorder:
    """A ``Revoker`` that records its calls; ``delay`` or ``failures`` on demand."""

    delay: float = 0.0
    failures: int = 0
    revoked: list[dict[str, Any]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    #: When set, every call waits for it first.
    gate: asyncio.Event | None = None
    calls: int = 0

    async def revoke(
        self, *, subject: str, issued_before: datetime, reason: str, key: str
    ) -> None:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("apiserver: 503 etcd leader changed")
        self.revoked.append(
            {
                "subject": subject,
                "issued_before": issued_before,
                "reason": reason,
                "key": key,
            }
        )

    def forget(self, subject: str) -> None:
        self.forgotten.append(subject)


@dataclass
class Hook:
    url: str
    hook: OktaHook
    recorder: Recorder
    metrics: Metrics
    session: aiohttp.ClientSession

    def events(self, event_type: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "kube_oidc_gate_okta_hook_events_total",
            {"event_type": event_type, "outcome": outcome},
        )
        return value or 0.0

    def answers(self, code: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "kube_oidc_gate_okta_hook_requests_total", {"code": str(code)}
        )
        return value or 0.0

    async def post(
        self, body: dict[str, Any] | bytes, *, secret: str | None = SECRET
    ) -> tuple[int, bytes, float]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if secret is not None:
            headers["Authorization"] = secret
        started = time.perf_counter()
        async with self.session.post(self.url, data=data, headers=headers) as r:
            return r.status, await r.read(), time.perf_counter() - started

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every queued event has been processed (bounded)."""
        deadline = time.monotonic() + timeout
        while self.hook.pending:
            assert time.monotonic() < deadline, "events still queued"
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def serving(ca: trustme.CA, tmp_path: Path) -> ServingTLS:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    key.write_bytes(leaf.private_key_pem.bytes())
    return ServingTLS(CertPair(str(cert), str(key)))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def settings() -> HookSettings:
    return HookSettings(retry_backoff=0.01)


@pytest.fixture
async def hook(
    ca: trustme.CA, serving: ServingTLS, settings: HookSettings
) -> AsyncIterator[Hook]:
    recorder = Recorder()
    metrics = Metrics()
    receiver = OktaHook(recorder, Secret(SECRET), settings, metrics=metrics)
    port = await receiver.start("127.0.0.1", 0, ssl_context=serving.context)
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(
        connector=connector, timeout=REQUEST_TIMEOUT
    ) as session:
        try:
            yield Hook(
                f"https://127.0.0.1:{port}{HOOK_PATH}",
                receiver,
                recorder,
                metrics,
                session,
            )
        finally:
            await receiver.close(0.5)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- verification -------------------------------------------------------------


async def test_the_verification_challenge_is_answered(hook: Hook) -> None:
    headers = {
        "Authorization": SECRET,
        "X-Okta-Verification-Challenge": CHALLENGE,
        "User-Agent": "Okta-Integrations",
        "Accept": "application/json",
    }
    async with hook.session.get(hook.url, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.json() == {"verification": CHALLENGE}


async def test_a_get_without_a_challenge_is_refused(hook: Hook) -> None:
    async with hook.session.get(hook.url, headers={"Authorization": SECRET}) as r:
        assert r.status == 400
        assert "X-Okta-Verification-Challenge" in (await r.json())["error"]


async def test_the_verification_needs_the_secret_too(hook: Hook) -> None:
    headers = {"X-Okta-Verification-Challenge": CHALLENGE}
    async with hook.session.get(hook.url, headers=headers) as r:
        assert r.status == 401
        assert CHALLENGE not in await r.text()


# -- deliveries -----------------------------------------------------------------


async def test_a_batch_of_okta_events_revokes_and_forgets_the_right_users(
    hook: Hook,
) -> None:
    group = {"id": "00g1admins0000000000", "type": "UserGroup", "alternateId": "x"}
    body = delivery(
        okta_event(
            "user.lifecycle.deactivate",
            "00u1alice00000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        ),
        okta_event(
            "user.lifecycle.suspend",
            "00u1bob0000000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8c",
            published="2026-03-02T14:28:11.901Z",
        ),
        okta_event(
            "user.session.clear",
            "00u1carol00000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8d",
            published="2026-03-02T14:28:12.004Z",
        ),
        okta_event(
            "user.account.lock",
            "00u1dave000000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8e",
            published="2026-03-02T14:28:12.100Z",
        ),
        okta_event(
            "user.lifecycle.delete.initiated",
            "00u1erin000000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8f",
            published="2026-03-02T14:28:12.200Z",
        ),
        okta_event(
            "group.user_membership.remove",
            "00u1frank00000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f90",
            published="2026-03-02T14:28:12.300Z",
            extra_targets=[group],
        ),
        okta_event(
            "user.lifecycle.activate",
            "00u1grace00000000000",
            uuid="7f2b1a62-74e5-11ee-8a5a-69d62fcd0f91",
            published="2026-03-02T14:28:12.400Z",
        ),
    )
    status, answer, _ = await hook.post(body)
    assert (status, answer) == (200, b"")
    await hook.settle()
    revoked = sorted(hook.recorder.revoked, key=lambda c: c["issued_before"])
    assert revoked == [
        {
            "subject": "00u1alice00000000000",
            "issued_before": datetime(2026, 3, 2, 14, 28, 11, 770000, tzinfo=UTC),
            "reason": "okta:user.lifecycle.deactivate",
            "key": "7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8b",
        },
        {
            "subject": "00u1bob0000000000000",
            "issued_before": at("2026-03-02T14:28:11.901+00:00"),
            "reason": "okta:user.lifecycle.suspend",
            "key": "7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8c",
        },
        {
            "subject": "00u1carol00000000000",
            "issued_before": at("2026-03-02T14:28:12.004+00:00"),
            "reason": "okta:user.session.clear",
            "key": "7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8d",
        },
        {
            "subject": "00u1dave000000000000",
            "issued_before": at("2026-03-02T14:28:12.100+00:00"),
            "reason": "okta:user.account.lock",
            "key": "7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8e",
        },
        {
            "subject": "00u1erin000000000000",
            "issued_before": at("2026-03-02T14:28:12.200+00:00"),
            "reason": "okta:user.lifecycle.delete.initiated",
            "key": "7f2b1a62-74e5-11ee-8a5a-69d62fcd0f8f",
        },
    ]
    assert hook.recorder.forgotten == ["00u1frank00000000000"]
    assert hook.events("user.lifecycle.deactivate", "revoked") == 1
    assert hook.events("group.user_membership.remove", "forgotten") == 1
    assert hook.events("user.lifecycle.activate", "ignored") == 1
    assert hook.answers(200) == 1


@pytest.mark.parametrize(
    ("event_type", "label"),
    [
        ("user.lifecycle.activate", "user.lifecycle.activate"),
        ("application.user_membership.add", "other"),
        ("x" * 300, "other"),
    ],
    ids=["known-type-own-label", "unknown-type-other", "huge-type-other"],
)
async def test_other_event_types_are_acknowledged_and_counted(
    hook: Hook, event_type: str, label: str
) -> None:
    body = delivery(
        okta_event(
            event_type,
            "00u1alice00000000000",
            uuid="0e3fe2b0-74e6-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        )
    )
    status, _, _ = await hook.post(body)
    assert status == 200
    await hook.settle()
    assert hook.recorder.calls == 0
    assert hook.recorder.forgotten == []
    assert hook.events(label, "ignored") == 1


async def test_a_failed_action_and_an_unusable_event_revoke_nobody(
    hook: Hook,
) -> None:
    failed = okta_event(
        "user.lifecycle.deactivate",
        "00u1alice00000000000",
        uuid="1d0b2c1e-74e6-11ee-8a5a-69d62fcd0f8b",
        published="2026-03-02T14:28:11.770Z",
        result="FAILURE",
    )
    no_time = okta_event(
        "user.lifecycle.suspend",
        "00u1bob0000000000000",
        uuid="1d0b2c1e-74e6-11ee-8a5a-69d62fcd0f8c",
        published="yesterday",
    )
    status, _, _ = await hook.post(delivery(failed, no_time))
    assert status == 200
    await hook.settle()
    assert hook.recorder.calls == 0
    assert hook.events("user.lifecycle.deactivate", "ignored") == 1
    assert hook.events("user.lifecycle.suspend", "invalid") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "secret",
    [None, "", "wrong", SECRET[:-1], SECRET + "=", SECRET.lower(), "Basic " + SECRET],
    ids=["missing", "empty", "wrong", "prefix", "longer", "case", "doubled-scheme"],
)
async def test_a_wrong_or_missing_secret_is_401_and_nothing_is_stored(
    hook: Hook, secret: str | None
) -> None:
    body = delivery(
        okta_event(
            "user.lifecycle.deactivate",
            "00u1alice00000000000",
            uuid="2a8f6e10-74e6-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        )
    )
    status, answer, _ = await hook.post(body, secret=secret)
    assert status == 401
    assert SECRET.encode() not in answer
    await asyncio.sleep(0.05)
    await hook.settle()
    assert hook.recorder.calls == 0
    assert hook.recorder.forgotten == []
    assert hook.answers(401) == 1
    # The same delivery with the secret is then taken: nothing was remembered.
    assert (await hook.post(body))[0] == 200
    await hook.settle()
    assert hook.recorder.calls == 1


async def test_a_replayed_delivery_makes_no_second_call(hook: Hook) -> None:
    body = delivery(
        okta_event(
            "user.lifecycle.deactivate",
            "00u1alice00000000000",
            uuid="3b9a7f20-74e6-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        ),
        okta_event(
            "group.user_membership.remove",
            "00u1bob0000000000000",
            uuid="3b9a7f20-74e6-11ee-8a5a-69d62fcd0f8c",
            published="2026-03-02T14:28:11.800Z",
        ),
    )
    for _ in range(3):
        assert (await hook.post(body))[0] == 200
        await hook.settle()
    assert hook.recorder.calls == 1
    assert hook.recorder.forgotten == ["00u1bob0000000000000"]
    assert hook.events("user.lifecycle.deactivate", "duplicate") == 2
    assert hook.events("group.user_membership.remove", "duplicate") == 2


async def test_the_same_event_twice_in_one_batch_is_taken_once(hook: Hook) -> None:
    event = okta_event(
        "user.account.lock",
        "00u1alice00000000000",
        uuid="4c0b8031-74e6-11ee-8a5a-69d62fcd0f8b",
        published="2026-03-02T14:28:11.770Z",
    )
    assert (await hook.post(delivery(event, event)))[0] == 200
    await hook.settle()
    assert hook.recorder.calls == 1


async def test_replays_after_a_restart_name_the_same_revocation() -> None:
    """Across processes the writer's idempotency by name is what holds."""
    made: list[dict[str, Any]] = []

    async def create(**kw: Any) -> None:
        made.append(kw)

    forgotten: list[str] = []
    published = at("2026-03-02T14:28:11.770+00:00")
    for _ in range(2):  # two processes, no shared memory
        revoker = CallbackRevoker(create, forgotten.append)
        await revoker.revoke(
            subject="00u1alice00000000000",
            issued_before=published,
            reason="okta:user.lifecycle.deactivate",
            key="5d1c9142-74e6-11ee-8a5a-69d62fcd0f8b",
        )
    assert made[0] == made[1]
    assert made[0] == {
        "subject": "00u1alice00000000000",
        "issuer": None,
        "issued_before": published,
        "reason": "okta:user.lifecycle.deactivate",
        "expires_at": published + timedelta(hours=24),
        "name": revocation_name("5d1c9142-74e6-11ee-8a5a-69d62fcd0f8b"),
    }
    assert made[0]["name"].startswith("okta-")
    assert len(made[0]["name"]) == 37


# -- bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"data": {"events": [', "okta hook: body is not valid JSON"),
        (b"[1, 2]", "okta hook: body must be a JSON object"),
        (b'{"data": {}}', "okta hook: data.events must be a list of events"),
        (b'{"data": {"events": {}}}', "okta hook: data.events must be a list"),
        (
            b'{"eventType": "com.okta.oauth2.tokens.transform", "data": {"events": []}}',
            'okta hook: eventType must be "com.okta.event_hook"',
        ),
    ],
    ids=["truncated", "not-an-object", "no-events", "events-not-list", "inline-hook"],
)
async def test_a_malformed_delivery_is_400_with_what_is_wrong(
    hook: Hook, body: bytes, message: str
) -> None:
    status, answer, _ = await hook.post(body)
    assert status == 400
    assert json.loads(answer)["error"].startswith(message)
    assert hook.recorder.calls == 0


@pytest.mark.parametrize(
    "settings", [HookSettings(max_body_bytes=4096, max_events=3)], ids=["small"]
)
async def test_an_oversize_body_or_batch_is_413(hook: Hook) -> None:
    big = delivery(
        okta_event(
            "user.lifecycle.deactivate",
            "00u1alice00000000000",
            uuid="6e2da253-74e6-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        )
    )
    big["padding"] = "x" * 5000
    status, _, _ = await hook.post(big)
    assert status == 413
    many = delivery(
        *(
            okta_event(
                "user.lifecycle.deactivate",
                f"00u1user{i:012d}",
                uuid=f"6e2da253-74e6-11ee-8a5a-69d62fcd{i:04d}",
                published="2026-03-02T14:28:11.770Z",
            )
            for i in range(4)
        )
    )
    for event in many["data"]["events"]:
        event["client"] = event["actor"] = event["debugContext"] = None
    status, answer, _ = await hook.post(many)
    assert status == 413
    assert "4 events in one delivery" in json.loads(answer)["error"]
    await hook.settle()
    assert hook.recorder.calls == 0
    assert hook.answers(413) == 2


@pytest.mark.parametrize(
    "settings", [HookSettings(rate=0.001, burst=3)], ids=["burst-3"]
)
async def test_the_rate_limit_answers_429_and_only_okta_spends_it(
    hook: Hook,
) -> None:
    body = delivery()
    # Requests without the secret do not spend the bucket...
    for _ in range(5):
        assert (await hook.post(body, secret="forged"))[0] == 401
    # ...so Okta still gets its burst, then 429.
    assert [(await hook.post(body))[0] for _ in range(4)] == [200, 200, 200, 429]
    headers = {"Authorization": SECRET, "Content-Type": "application/json"}
    async with hook.session.post(hook.url, data=b"{}", headers=headers) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
    assert hook.answers(429) == 2


@pytest.mark.parametrize(
    "settings",
    [HookSettings(revoke_timeout=30.0, retry_backoff=0.01)],
    ids=["slow-writer"],
)
async def test_the_answer_comes_within_3s_when_the_writer_is_slow(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    hook.recorder.delay = 10.0
    body = delivery(
        okta_event(
            "user.lifecycle.deactivate",
            "00u1alice00000000000",
            uuid="7f3eb364-74e6-11ee-8a5a-69d62fcd0f8b",
            published="2026-03-02T14:28:11.770Z",
        )
    )
    status, _, seconds = await hook.post(body)
    assert status == 200
    assert seconds < 3.0, f"answered after {seconds:.2f}s, Okta gives up at 3s"
    async with asyncio.timeout(5):
        await hook.recorder.started.wait()
    assert hook.hook.pending == 1
    # Stopping with the writer still busy: logged and counted, never silent.
    with caplog.at_level(logging.ERROR, logger="proxy.oktahook"):
        await hook.hook.close(0.05)
    assert hook.events("user.lifecycle.deactivate", "failed") == 1
    (record,) = [
        r for r in caplog.records if r.msg == "okta hook: revocation not stored"
    ]
    assert record.__dict__["uuid"] == "7f3eb364-74e6-11ee-8a5a-69d62fcd0f8b"
    assert record.__dict__["subject"] == "00u1alice00000000000"


async def test_a_failing_writer_is_retried_then_logged_and_counted(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    uuid = "8a4fc475-74e6-11ee-8a5a-69d62fcd0f8b"
    body = delivery(
        okta_event(
            "user.lifecycle.suspend",
            "00u1alice00000000000",
            uuid=uuid,
            published="2026-03-02T14:28:11.770Z",
        )
    )
    hook.recorder.failures = 2
    assert (await hook.post(body))[0] == 200
    await hook.settle()
    assert len(hook.recorder.revoked) == 1  # the third attempt
    assert hook.events("user.lifecycle.suspend", "revoked") == 1

    other = json.loads(json.dumps(body).replace(uuid, uuid[:-1] + "c"))
    hook.recorder.failures = 3
    with caplog.at_level(logging.ERROR, logger="proxy.oktahook"):
        assert (await hook.post(other))[0] == 200
        await hook.settle()
    assert hook.events("user.lifecycle.suspend", "failed") == 1
    assert any(r.msg == "okta hook: revocation not stored" for r in caplog.records)
    assert SECRET not in caplog.text
    # A failed event is not remembered: delivered again, it is taken again.
    assert (await hook.post(other))[0] == 200
    await hook.settle()
    assert len(hook.recorder.revoked) == 2


@pytest.mark.parametrize(
    "settings",
    [HookSettings(workers=1, queue_size=1, revoke_timeout=30.0)],
    ids=["queue-of-1"],
)
async def test_a_full_queue_refuses_the_batch_before_taking_anything(
    hook: Hook,
) -> None:
    hook.recorder.gate = gate = asyncio.Event()

    def body(n: int) -> dict[str, Any]:
        return delivery(
            okta_event(
                "user.lifecycle.deactivate",
                f"00u1user{n:012d}",
                uuid=f"9b50d586-74e6-11ee-8a5a-69d62fcd{n:04d}",
                published="2026-03-02T14:28:11.770Z",
            )
        )

    assert (await hook.post(body(1)))[0] == 200
    async with asyncio.timeout(5):
        await hook.recorder.started.wait()  # the worker holds event 1
    assert (await hook.post(body(2)))[0] == 200  # event 2 waits in the queue
    status, answer, _ = await hook.post(body(3))
    assert status == 503
    assert "retry" in json.loads(answer)["error"]
    assert hook.hook.pending == 2
    assert hook.answers(503) == 1
    # Nothing of it was taken: Okta's retry is, once there is room.
    gate.set()
    await hook.settle()
    assert (await hook.post(body(3)))[0] == 200
    await hook.settle()
    assert sorted(c["subject"] for c in hook.recorder.revoked) == [
        f"00u1user{n:012d}" for n in (1, 2, 3)
    ]


async def test_only_get_and_post_on_the_hook_path(hook: Hook) -> None:
    headers = {"Authorization": SECRET}
    async with hook.session.put(hook.url, data=b"{}", headers=headers) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, POST"
    other = hook.url.replace(HOOK_PATH, "/okta/event")
    async with hook.session.post(other, data=b"{}", headers=headers) as r:
        assert r.status == 404
    async with hook.session.post(
        hook.url, data=b"{}", headers={**headers, "Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415


async def test_a_reloaded_serving_certificate_serves_the_hook_too(
    hook: Hook, serving: ServingTLS, tmp_path: Path
) -> None:
    other_ca = trustme.CA()
    leaf = other_ca.issue_cert("127.0.0.1")
    (tmp_path / "tls.crt").write_bytes(leaf.cert_chain_pems[0].bytes())
    (tmp_path / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    assert serving.reload()
    headers = {"Authorization": SECRET, "X-Okta-Verification-Challenge": CHALLENGE}
    connector = aiohttp.TCPConnector(ssl=client_context(other_ca))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as fresh,
        fresh.get(hook.url, headers=headers) as r,
    ):
        assert r.status == 200
        assert await r.json() == {"verification": CHALLENGE}


# -- configuration and the real command -------------------------------------------


def _ns(**kw: Any) -> Any:
    import argparse

    return argparse.Namespace(**kw)


def test_the_flags_need_each_other(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    config = okta_event_hook_from_args(
        _ns(
            okta_event_hook_address="127.0.0.1:0",
            okta_event_hook_secret_file=str(secret),
            revocation_namespace="kube-oidc-gate",
        )
    )
    assert config is not None
    assert (config.host, config.port) == ("127.0.0.1", 0)
    assert config.secret.reveal() == SECRET
    assert SECRET not in repr(config)
    assert okta_event_hook_from_args(_ns(okta_event_hook_address=None)) is None
    with pytest.raises(ConfigError) as caught:
        okta_event_hook_from_args(
            _ns(
                okta_event_hook_address="nowhere",
                okta_event_hook_secret_file=str(tmp_path / "missing"),
                revocation_namespace=None,
            )
        )
    assert len(caught.value.problems) == 3
    text = str(caught.value)
    assert "--okta-event-hook-address must be HOST:PORT" in text
    assert "--okta-event-hook-secret-file" in text
    assert "no such file" in text
    assert "--revocation-namespace" in text


@pytest.mark.slow
async def test_the_cli_serves_the_hook_beside_the_webhook(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """The hook on the real CLI, end to end: Okta's verification, then a
    deactivation stored as a Revocation object in the API server."""
    async with serve_apiserver(ca) as fake:
        await _cli_hook(ca, tmp_path, fake)


async def _cli_hook(ca: trustme.CA, tmp_path: Path, fake: FakeAPIServer) -> None:
    kubeconfig = upstream_kubeconfig(tmp_path / "kubeconfig", fake.url, fake.ca_pem)
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    key.write_bytes(leaf.private_key_pem.bytes())
    secret = tmp_path / "okta-hook-secret"
    secret.write_text(SECRET + "\n")
    apiserver_ca = tmp_path / "apiserver-ca.crt"
    apiserver_ca.write_bytes(trustme.CA().cert_pem.bytes())
    with Proc(
        "webhook",
        "--oidc-issuer-url", "https://idp.example.test",
        "--oidc-client-id", "kubernetes",
        "--bind-address", "127.0.0.1",
        "--secure-port", str(free_port()),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--tls-cert-file", str(cert),
        "--tls-private-key-file", str(key),
        # Only kube-apiserver may ask the webhook; Okta has no client certificate.
        "--client-ca-file", str(apiserver_ca),
        "--okta-event-hook-address", "127.0.0.1:0",
        "--okta-event-hook-secret-file", str(secret),
        "--revocation-namespace", "kube-oidc-gate",
        "--kubeconfig", str(kubeconfig),
        "--shutdown-grace-period", "2",
    ) as proc:  # fmt: skip
        (line,) = await proc.await_log("okta event hook listening", timeout=30)
        port = line["port"]
        assert port > 0
        url = f"https://127.0.0.1:{port}{HOOK_PATH}"
        connector = aiohttp.TCPConnector(ssl=client_context(ca))
        headers = {"Authorization": SECRET, "X-Okta-Verification-Challenge": CHALLENGE}
        async with aiohttp.ClientSession(
            connector=connector, timeout=REQUEST_TIMEOUT
        ) as session:
            async with session.get(url, headers=headers) as r:
                assert r.status == 200
                assert await r.json() == {"verification": CHALLENGE}
            async with session.get(url, headers={**headers, "Authorization": "x"}) as r:
                assert r.status == 401
            # Now: an event a day old would be past its expiry, and deleted.
            published = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            event = okta_event(
                "user.lifecycle.deactivate",
                "00u1carol00000000000",
                uuid="0f6c4c1e-0000-4000-8000-000000000001",
                published=published,
            )
            for _ in range(2):  # a replay stores nothing more
                async with session.post(
                    url, json=delivery(event), headers={"Authorization": SECRET}
                ) as r:
                    assert r.status == 200
            async with asyncio.timeout(10):
                while not fake.revocations.names():
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            (name,) = fake.revocations.names()
            stored = fake.revocations.objects[("kube-oidc-gate", name)]
            assert stored["spec"]["subject"] == "00u1carol00000000000"
            assert stored["spec"]["reason"] == "okta:user.lifecycle.deactivate"
            assert stored["spec"]["issuedBefore"].startswith(published[:19])
        assert proc.stop() == 0
    assert all(SECRET not in entry for entry in proc.stderr)
