"""The TokenReview webhook over real TLS on loopback, against a real test issuer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import AdmissionSettings
from proxy.webhook import WebhookSettings
from tests.fakes.issuer import FakeIssuer
from tests.keygen import claims_for, new_key, sign
from tests.support.running_webhook import (
    RunningWebhook,
    issuer_auth_config,
    parse_review,
    review_body,
    running_webhook,
    wait_ready,
)


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    fake = FakeIssuer(tls=trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def webhook(issuer: FakeIssuer, tmp_path: Path) -> AsyncIterator[RunningWebhook]:
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path
    ) as running:
        await wait_ready(running.engine)
        yield running


def token_for(issuer: FakeIssuer, **claims: Any) -> str:
    base = claims_for(issuer.url, "kubernetes", groups=["naxslabs-admins"])
    base.update(claims)
    return sign(issuer.keys[0], base)


def metric(running: RunningWebhook, text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v1beta1"])
async def test_valid_token_authenticates_in_the_version_received(
    webhook: RunningWebhook, issuer: FakeIssuer, version: str
) -> None:
    status, text, headers = await webhook.post(
        review_body(token_for(issuer), version=version)
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    review = parse_review(text)
    assert review.api_version == f"authentication.k8s.io/{version}"
    assert review.kind == "TokenReview"
    assert review.status.authenticated is True
    assert review.status.user.username == "oidc:00u1alice"
    assert review.status.user.groups == ["naxslabs-admins"]
    assert review.status.error is None


@pytest.mark.slow
async def test_uid_and_extra_are_lists_of_strings(
    webhook: RunningWebhook, issuer: FakeIssuer
) -> None:
    review = await webhook.review(token_for(issuer, jti="abc-123"))
    assert review.status.user.extra == {
        "authentication.kubernetes.io/credential-id": ["JTI=abc-123"]
    }


@pytest.mark.slow
async def test_token_of_another_issuer_is_a_plain_no(webhook: RunningWebhook) -> None:
    stranger = sign(new_key(), claims_for("https://elsewhere.test", "kubernetes"))
    review = await webhook.review(stranger)
    assert review.status.authenticated is False
    assert review.status.error is None
    assert review.status.user is None


REFUSALS = [
    ("expired", {"exp": 1_000_000, "iat": 999_000, "nbf": 999_000}, "expired"),
    ("audience", {"aud": "someone-else"}, "audience_mismatch"),
    ("no-exp", {"exp": None}, "claim_missing"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("claims", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_token_of_ours_that_fails_says_why(
    webhook: RunningWebhook, issuer: FakeIssuer, claims: dict[str, Any], reason: str
) -> None:
    base = claims_for(issuer.url, "kubernetes")
    for k, v in claims.items():
        if v is None:
            base.pop(k)
        else:
            base[k] = v
    token = sign(issuer.keys[0], base)
    review = await webhook.review(token)
    assert review.status.authenticated is False
    assert review.status.error.startswith(f"{reason}:")
    assert token not in review.status.error


@pytest.mark.slow
async def test_bad_signature_and_unknown_kid(
    webhook: RunningWebhook, issuer: FakeIssuer
) -> None:
    forged = sign(
        new_key("RS256", kid=issuer.keys[0].kid), claims_for(issuer.url, "kubernetes")
    )
    assert (await webhook.review(forged)).status.error.startswith("bad_signature:")
    unknown = sign(new_key("RS256"), claims_for(issuer.url, "kubernetes"))
    assert (await webhook.review(unknown)).status.error.startswith("unknown_kid:")


MALFORMED: list[tuple[str, Any, dict[str, str] | None, int, str]] = [
    ("not-json", b"{nope", None, 400, "not valid JSON"),
    ("array", b"[]", None, 400, "JSON object"),
    (
        "wrong-api-version",
        {"apiVersion": "v1", "kind": "TokenReview", "spec": {"token": "x"}},
        None,
        400,
        "apiVersion",
    ),
    (
        "wrong-kind",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "Pod",
            "spec": {"token": "x"},
        },
        None,
        400,
        "kind",
    ),
    (
        "no-spec",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"},
        None,
        400,
        "spec",
    ),
    (
        "empty-token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": ""},
        },
        None,
        400,
        "spec.token",
    ),
    (
        "bad-audiences",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": "x", "audiences": "a"},
        },
        None,
        400,
        "audiences",
    ),
    ("content-type", b"{}", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("too-large", b"{" + b" " * (2 * 1024 * 1024) + b"}", None, 413, "larger"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "headers", "code", "message"),
    [m[1:] for m in MALFORMED],
    ids=[m[0] for m in MALFORMED],
)
async def test_malformed_reviews_get_400s(
    webhook: RunningWebhook,
    body: Any,
    headers: dict[str, str] | None,
    code: int,
    message: str,
) -> None:
    status, text, _ = await webhook.post(body, headers=headers)
    assert status == code
    assert message in text
    assert '"kind": "Status"' in text


@pytest.mark.slow
async def test_refused_reviews_are_logged_up_to_the_limit_then_counted(
    issuer: FakeIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.webhook")
    settings = WebhookSettings(refusal_log_limit=1)
    forged = sign(new_key(), claims_for(issuer.url, "kubernetes"))
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path, settings=settings
    ) as wh:
        await wait_ready(wh.engine)
        for _ in range(5):
            status, _, _ = await wh.post("{}", headers={"Content-Type": "text/plain"})
            assert status == 415
            review = await wh.review(forged)
            assert review.status.authenticated is False
        good = await wh.review(token_for(issuer))
        assert good.status.authenticated is True

        def tally() -> dict[tuple[object, object], int]:
            out: dict[tuple[object, object], int] = {}
            for rec in caplog.records:
                fields = vars(rec)
                if rec.msg == "review refused":
                    key = ("bad_review", fields["status"])
                elif rec.msg == "token review" and fields["result"] != "ok":
                    key = (fields["result"], fields["reason"])
                elif rec.msg == "refusals not logged":
                    key = (fields["result"], fields.get("status", fields.get("reason")))
                    out[key] = out.get(key, 0) + fields["not_logged"]
                    continue
                else:
                    continue
                out[key] = out.get(key, 0) + 1
            return out

        # The counts come at the end of the period (1 s): wait for them, bounded.
        for _ in range(60):
            if tally() == {("bad_review", 415): 5, ("rejected", "unknown_kid"): 5}:
                break
            await asyncio.sleep(0.05)
        assert tally() == {("bad_review", 415): 5, ("rejected", "unknown_kid"): 5}
    full = [r for r in caplog.records if r.msg in ("review refused", "token review")]
    assert sum(vars(r).get("result") == "rejected" for r in full) < 5
    assert sum(r.msg == "review refused" for r in full) < 5
    assert sum(vars(r).get("result") == "ok" for r in full) == 1


@pytest.mark.slow
async def test_wrong_method(webhook: RunningWebhook) -> None:
    async with webhook.session.get(f"{webhook.url}/authenticate") as resp:
        assert resp.status == 405


@pytest.mark.slow
async def test_audience_aware_answers_intersect(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    settings = WebhookSettings(
        audiences=("https://kubernetes.default.svc", "kube-oidc-gate")
    )
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path, settings=settings
    ) as wh:
        await wait_ready(wh.engine)
        token = token_for(issuer)
        both = await wh.review(
            token, audiences=["https://kubernetes.default.svc", "other"]
        )
        assert both.status.authenticated is True
        assert both.status.audiences == ["https://kubernetes.default.svc"]
        none = await wh.review(token, audiences=["other"])
        assert none.status.authenticated is False
        assert none.status.error.startswith("audience_mismatch")
        unasked = await wh.review(token)
        assert unasked.status.audiences == [
            "https://kubernetes.default.svc",
            "kube-oidc-gate",
        ]


async def test_audience_agnostic_by_default(
    webhook: RunningWebhook, issuer: FakeIssuer
) -> None:
    review = await webhook.review(
        token_for(issuer), audiences=["https://kubernetes.default.svc"]
    )
    assert review.status.authenticated is True
    assert review.status.audiences is None


async def test_503_until_keys_are_loaded_then_ready(tmp_path: Path) -> None:
    issuer = FakeIssuer(tls=trustme.CA())
    await issuer.start()
    issuer.go_down(503)
    try:
        async with running_webhook(
            issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path
        ) as wh:
            status, _, headers = await wh.post(review_body(token_for(issuer)))
            assert status == 503
            assert headers["Retry-After"] == "5"
            code, body = await wh.probe("/readyz")
            assert code == 503
            assert issuer.url in body
            assert (await wh.probe("/healthz"))[0] == 200
            issuer.come_up()
            await wait_ready(wh.engine)
            assert (await wh.probe("/readyz"))[0] == 200
            assert (await wh.review(token_for(issuer))).status.authenticated is True
    finally:
        await issuer.stop()


@pytest.mark.slow
async def test_mutual_tls_refuses_clients_without_a_certificate(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    apiserver_cert = client_ca.issue_cert("kube-apiserver")
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem),
        tmp_path,
        client_ca=client_ca,
        client_cert=apiserver_cert,
    ) as wh:
        await wait_ready(wh.engine)
        assert (await wh.review(token_for(issuer))).status.authenticated is True
        anonymous = ssl.create_default_context()
        wh.server_ca.configure_trust(anonymous)
        stranger = ssl.create_default_context()
        wh.server_ca.configure_trust(stranger)
        trustme.CA().issue_cert("intruder").configure_cert(stranger)
        for ctx in (anonymous, stranger):
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx)
            ) as s:
                with pytest.raises(aiohttp.ClientError):
                    async with s.post(
                        f"{wh.url}/authenticate", json=review_body(token_for(issuer))
                    ) as r:
                        await r.read()


@pytest.mark.slow
async def test_tls_floor_is_1_2(webhook: RunningWebhook, tmp_path: Path) -> None:
    # The client cannot offer TLS 1.0/1.1 on this OpenSSL at all, so the floor is
    # asserted on the server context, and both allowed versions are shown to work.
    from proxy.certs import CertPair, server_context

    pem = tmp_path / "s.pem"
    webhook.server_ca.issue_cert(
        "127.0.0.1"
    ).private_key_and_cert_chain_pem.write_to_path(str(pem))
    assert (
        server_context(CertPair(str(pem), str(pem))).minimum_version
        == ssl.TLSVersion.TLSv1_2
    )
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context()
        webhook.server_ca.configure_trust(ctx)
        ctx.minimum_version = ctx.maximum_version = version
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(f"{webhook.url}/authenticate") as r,
        ):
            assert r.status == 405


@pytest.mark.slow
async def test_metrics_follow_the_answers(
    webhook: RunningWebhook, issuer: FakeIssuer
) -> None:
    token = token_for(issuer)
    for _ in range(3):
        await webhook.review(token)
    await webhook.review(sign(issuer.keys[0], claims_for(issuer.url, "nope")))
    await webhook.review(sign(new_key(), claims_for("https://elsewhere.test")))
    code, text = await webhook.probe("/metrics")
    assert code == 200
    assert (
        metric(webhook, text, "kube_oidc_gate_authentications_total", result="ok") == 3
    )
    assert (
        metric(
            webhook,
            text,
            "kube_oidc_gate_authentications_total",
            reason="audience_mismatch",
        )
        == 1
    )
    assert (
        metric(webhook, text, "kube_oidc_gate_authentications_total", result="not_mine")
        == 1
    )
    assert (
        metric(
            webhook, text, "kube_oidc_gate_token_cache_requests_total", outcome="hit"
        )
        == 2
    )
    assert (
        metric(
            webhook,
            text,
            "kube_oidc_gate_http_requests_total",
            handler="authenticate",
            code="200",
        )
        == 5
    )
    # Every answer timed; the two new tokens' validations timed too.
    duration = "kube_oidc_gate_http_request_duration_seconds"
    assert metric(webhook, text, f"{duration}_count", handler="authenticate") == 5
    assert 0 < metric(webhook, text, f"{duration}_sum", handler="authenticate") < 5
    validation = "kube_oidc_gate_validation_duration_seconds"
    assert metric(webhook, text, f"{validation}_count", result="ok") == 1
    assert metric(webhook, text, f"{validation}_count", result="rejected") == 1
    assert metric(webhook, text, "kube_oidc_gate_jwks_keys") == 1
    assert metric(webhook, text, "kube_oidc_gate_issuer_ready") == 1
    assert (
        0
        <= metric(webhook, text, "kube_oidc_gate_jwks_seconds_since_last_success")
        < 60
    )
    assert "kube_oidc_gate_jwks_seconds_since_last_success{" in text
    assert issuer.url not in text, "issuers appear only as hashes"
    assert token not in text


async def _tls_stream(
    wh: RunningWebhook,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = wh.url.removeprefix("https://").split(":")
    return await asyncio.open_connection(
        host, int(port), ssl=wh.client_ssl, server_hostname="127.0.0.1"
    )


@pytest.mark.slow
async def test_slow_headers_are_cut_off(issuer: FakeIssuer, tmp_path: Path) -> None:
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path, idle_timeout=0.5
    ) as wh:
        reader, writer = await _tls_stream(wh)
        writer.write(b"POST /authenticate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        started = asyncio.get_running_loop().time()
        for _ in range(20):  # a header line now and then, never the end of the headers
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except (ConnectionError, OSError):
                break
        data = await asyncio.wait_for(reader.read(), 5)
        assert data == b"", "closed without an answer"
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()


@pytest.mark.slow
async def test_slow_body_gets_408(issuer: FakeIssuer, tmp_path: Path) -> None:
    settings = WebhookSettings(body_timeout=0.5)
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path, settings=settings
    ) as wh:
        reader, writer = await _tls_stream(wh)
        writer.write(
            b"POST /authenticate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"apiVersion"'
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        writer.close()


@pytest.mark.slow
async def test_idle_keepalive_connection_survives_the_first_request_deadline(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with running_webhook(
        issuer_auth_config(issuer.url, issuer.ca_pem), tmp_path, idle_timeout=0.3
    ) as wh:
        await wait_ready(wh.engine)
        token = token_for(issuer)
        assert (await wh.review(token)).status.authenticated is True
        await asyncio.sleep(0.1)
        assert (await wh.review(token)).status.authenticated is True


@pytest.mark.slow
async def test_repeated_and_interleaved_tokens_get_their_own_user(
    webhook: RunningWebhook, issuer: FakeIssuer
) -> None:
    """The encoded answer is remembered per cached user: never another user's."""
    alice = token_for(issuer)
    bob = token_for(issuer, sub="00u2bob", groups=["viewers"])
    seen: list[tuple[str, list[str]]] = []
    bodies: dict[str, set[str]] = {"alice": set(), "bob": set()}
    for name, token in [("alice", alice), ("bob", bob)] * 3:
        status, text, _ = await webhook.post(review_body(token))
        assert status == 200
        bodies[name].add(text)
        user = parse_review(text).status.user
        seen.append((user.username, user.groups))
    assert (
        seen
        == [
            ("oidc:00u1alice", ["naxslabs-admins"]),
            ("oidc:00u2bob", ["viewers"]),
        ]
        * 3
    )
    # Byte for byte the same answer on every hit.
    assert len(bodies["alice"]) == 1
    assert len(bodies["bob"]) == 1


def test_accepted_status_is_the_users_encoding_exactly() -> None:
    from types import MappingProxyType

    from proxy.kube import UserInfo
    from proxy.webhook import _accepted_status

    users = [
        UserInfo(username="u1", groups=("g1",)),
        UserInfo(username='q"uote\\ \u2603', uid="7", groups=()),
        UserInfo(
            username="x",
            extra=MappingProxyType({"k": ("a", "b"), "scopes.example.com": ("c",)}),
        ),
    ]
    for user in users:
        status = _accepted_status(user)
        assert json.loads(status) == {"authenticated": True, "user": user.to_dict()}
        # The same bytes a fresh encoding of the whole status gives.
        assert (
            status
            == json.dumps(
                {"authenticated": True, "user": user.to_dict()}, separators=(",", ":")
            ).encode()
        )
        # Encoded once: the second answer reuses the first encoding.
        assert user.to_json() is user.to_json()
    # An equal but distinct object is encoded afresh, and equally.
    twin = UserInfo(username="u1", groups=("g1",))
    assert twin == users[0]
    assert _accepted_status(twin) == _accepted_status(users[0])


async def _remembered_traffic(
    wh: RunningWebhook, token: str, stop: asyncio.Event, answered: list[int]
) -> None:
    for _ in range(10_000):
        if stop.is_set():
            return
        review = await wh.review(token)
        assert review.status.authenticated is True
        answered.append(1)


def _strangers(n: int) -> list[str]:
    """Tokens of an issuer nobody configured: "not ours", like most junk."""
    key = new_key("RS256")
    return [
        sign(key, claims_for("https://stranger.test", "kubernetes", sub=f"s{i}"))
        for i in range(n)
    ]


@asynccontextmanager
async def _remembering_webhook(
    issuer: FakeIssuer, tmp_path: Path, *, max_waiting: int = 1024
) -> AsyncIterator[tuple[RunningWebhook, str]]:
    """A webhook taking one new token per turn, and a token it has accepted."""
    config = dataclasses.replace(
        issuer_auth_config(issuer.url, issuer.ca_pem),
        admission=AdmissionSettings(per_turn=1, max_waiting=max_waiting),
    )
    async with running_webhook(config, tmp_path) as wh:
        await wait_ready(wh.engine)
        remembered = token_for(issuer)
        assert (await wh.review(remembered)).status.authenticated is True
        yield wh, remembered


async def _reviews_beside_remembered_traffic(
    wh: RunningWebhook, remembered: str, tokens: list[str]
) -> tuple[list[Any], int]:
    stop, answered = asyncio.Event(), list[int]()
    users = [
        asyncio.create_task(_remembered_traffic(wh, remembered, stop, answered))
        for _ in range(8)
    ]
    try:
        reviews = await asyncio.gather(*(wh.review(t) for t in tokens))
    finally:
        stop.set()
        await asyncio.gather(*users)
    return reviews, len(answered)


@pytest.mark.slow
async def test_during_a_junk_flood_new_tokens_wait_their_turn_and_all_pass(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with _remembering_webhook(issuer, tmp_path) as (wh, remembered):
        logins = [token_for(issuer, sub=f"new{i}") for i in range(10)]
        reviews, answered = await _reviews_beside_remembered_traffic(
            wh, remembered, _strangers(40) + logins
        )
        assert [r.status.authenticated for r in reviews[:40]] == [False] * 40
        assert [r.status.user.username for r in reviews[40:]] == [
            f"oidc:new{i}" for i in range(10)
        ]
        assert answered, "the remembered user was answered meanwhile"
        text = wh.metrics.render().decode()
        waited = metric(
            wh, text, "kube_oidc_gate_new_token_waits_total", outcome="waited"
        )
        assert waited > 0


@pytest.mark.slow
async def test_a_wave_of_logins_beside_remembered_users_does_not_wait(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with _remembering_webhook(issuer, tmp_path) as (wh, remembered):
        logins = [token_for(issuer, sub=f"new{i}") for i in range(40)]
        reviews, _ = await _reviews_beside_remembered_traffic(wh, remembered, logins)
        assert all(r.status.authenticated for r in reviews)
        text = wh.metrics.render().decode()
        assert (
            metric(wh, text, "kube_oidc_gate_new_token_waits_total", outcome="waited")
            == 0
        )


@pytest.mark.slow
async def test_a_full_turn_queue_answers_503_and_a_retry_passes(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with _remembering_webhook(issuer, tmp_path, max_waiting=1) as (
        wh,
        remembered,
    ):
        for junk in _strangers(5):
            assert (await wh.review(junk)).status.authenticated is False
        news = [token_for(issuer, sub=f"new{i}") for i in range(12)]
        bodies = [review_body(t) for t in news]
        answers = await asyncio.gather(
            wh.review(remembered), *(wh.post(b) for b in bodies)
        )
        shed = [a for a in answers[1:] if a[0] == 503]
        assert shed, "twelve at once with room for one waiting: some are refused"
        for _, text, headers in shed:
            assert "too many new tokens are waiting for their turn" in text
            assert headers["Retry-After"] == "5"
        text = wh.metrics.render().decode()
        assert metric(
            wh, text, "kube_oidc_gate_new_token_waits_total", outcome="shed"
        ) == len(shed)
        for token in news:  # not remembered as refused: every retry passes
            assert (await wh.review(token)).status.authenticated is True


@pytest.mark.slow
async def test_a_near_miss_issuer_is_explained_and_a_stranger_is_logged_with_its_iss(
    issuer: FakeIssuer, webhook: RunningWebhook, caplog: pytest.LogCaptureFixture
) -> None:
    """kube-apiserver logs only "invalid bearer token" for both: the answer's
    ``status.error`` (which it logs) names the near miss with both values, and
    our log line says which issuer a stranger's token claims.
    """
    caplog.set_level(logging.INFO, logger="proxy.webhook")
    near = issuer.url + "/"
    review = await webhook.review(
        sign(issuer.keys[0], claims_for(near, "kubernetes", groups=["g"]))
    )
    assert review.status.authenticated is False
    assert review.status.error.startswith("issuer_mismatch: ")
    assert f'"{near}"' in review.status.error
    assert f'"{issuer.url}"' in review.status.error
    stranger = sign(new_key(), claims_for("https://elsewhere.test", "kubernetes"))
    review = await webhook.review(stranger)
    assert review.status.authenticated is False
    assert not review.status.error
    lines = [vars(r) for r in caplog.records if r.msg == "token review"]
    assert [(f["result"], f["reason"]) for f in lines] == [
        ("rejected", "issuer_mismatch"),
        ("not_mine", "not_mine"),
    ]
    assert near in lines[0]["detail"]
    assert issuer.url in lines[0]["detail"]
    assert (
        lines[1]["detail"]
        == 'token: iss "https://elsewhere.test" is not a configured issuer'
    )
    assert all(stranger not in str(f) for f in lines)


async def test_webhook_refuses_lone_surrogate_token_with_400(tmp_path: Path) -> None:
    config = issuer_auth_config("https://127.0.0.1:1/never", None)
    async with running_webhook(config, tmp_path) as webhook:
        body = (
            '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview",'
            '"spec":{"token":"e30.e30.\\ud800"}}'
        )
        status, text, _ = await webhook.post(body)
        assert status == 400, text
        assert json.loads(text)["kind"] == "Status"
