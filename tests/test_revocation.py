"""The revocation list (issue 22, part 2) through real parts.

- ``proxy.revocation`` as tables: parsing an object, matching a token
  (issuer optional; ``iat`` before, equal, after, missing; expired objects);
- the authenticator: a cached verdict is refused once a revocation arrives,
  and let in again when it is lifted; before the first list, fail closed;
- ``RevocationWatcher`` against the fake API server over loopback TLS, with
  the project's own ``Upstream`` from a kubeconfig: list, add, modify,
  delete, bookmarks, 410 as a status and as an ERROR event, a broken watch
  resumed with backoff, readiness before the first list and while broken,
  expired objects deleted (and the 404/409 races);
- ``create_revocation`` and ``kube-oidc-gate revoke``: the specific errors;
- ``kube-oidc-gate check-token --revocation-namespace``: names the object
  that refuses a token, or says none does, or that the list was not read;
- two replicas through the real CLI (a webhook with ``--workers 2`` and a
  proxy): ``revoke`` (the real CLI, a subprocess) and both refuse within 5 s;
  deleting the object lifts it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy import errors
from proxy.authn import Authenticator
from proxy.config import RevocationSettings
from proxy.metrics import Metrics
from proxy.revocation import (
    Revocation,
    RevocationList,
    format_time,
    parse_revocation,
    parse_time,
    revocation_object,
)
from proxy.revocation_api import (
    RevocationWatcher,
    create_revocation,
    delete_revocation,
)
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver import FakeAPIServer, serve_apiserver
from tests.fakes.apiserver_harness import WHOAMI, upstream_kubeconfig
from tests.fakes.issuer import FakeIssuer
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import claims_for, new_key, sign
from tests.proc import ROOT, Proc
from tests.support.running_webhook import parse_review, review_body
from tests.test_cli_webhook import free_port, webhook_args

NS = "kube-oidc-gate"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
OPERATOR_TOKEN = "operator-token"


def obj(
    name: str = "r1",
    *,
    sub: Any = "00u1alice",
    issuer: Any = None,
    before: Any = "2027-01-15T08:00:00Z",
    expires: Any = None,
    reason: Any = "left",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"subject": sub, "issuedBefore": before, "reason": reason}
    if issuer is not None:
        spec["issuer"] = issuer
    if expires is not None:
        spec["expiresAt"] = expires
    return {"metadata": {"name": name, "uid": f"u-{name}"}, "spec": spec}


# --- parsing and matching, as tables ----------------------------------------------

PARSED = [
    ("any-issuer", obj(), None, T0, None),
    ("one-issuer", obj(issuer=ISSUER), ISSUER, T0, None),
    ("offset", obj(before="2027-01-15T09:00:00+01:00"), None, T0, None),
    ("fraction", obj(before="2027-01-15T08:00:00.5Z"), None, T0 + 0.5, None),
    ("expiry", obj(expires="2027-01-16T08:00:00Z"), None, T0, T0 + 86400),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "issuer", "before", "expires"),
    [c[1:] for c in PARSED],
    ids=[c[0] for c in PARSED],
)
def test_parse(
    raw: dict[str, Any], issuer: str | None, before: float, expires: float | None
) -> None:
    got = parse_revocation(raw)
    assert (got.subject, got.issuer, got.issued_before, got.expires_at) == (
        "00u1alice",
        issuer,
        before,
        expires,
    )
    assert got.uid == "u-r1"


MALFORMED = [
    ("no-spec", {"metadata": {"name": "x"}}, "'spec' is missing"),
    ("no-name", {"spec": obj()["spec"]}, "'metadata.name'"),
    ("no-subject", obj(sub=None), "'spec.subject'"),
    ("empty-subject", obj(sub=" "), "'spec.subject'"),
    ("subject-number", obj(sub=7), "'spec.subject'"),
    ("empty-issuer", obj(issuer=""), "'spec.issuer'"),
    ("no-before", obj(before=None), "'spec.issuedBefore'"),
    ("before-garbage", obj(before="yesterday"), "'spec.issuedBefore'"),
    ("before-no-zone", obj(before="2027-01-15T08:00:00"), "time zone"),
    ("before-date-only", obj(before="2027-01-15"), "time zone"),
    ("expiry-garbage", obj(expires="soon"), "'spec.expiresAt'"),
    ("reason-list", obj(reason=["a"]), "'spec.reason'"),
    ("not-an-object", ["x"], "not a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "needle"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_objects_are_refused_with_the_field(raw: Any, needle: str) -> None:
    with pytest.raises(errors.RevocationError, match=needle):
        parse_revocation(raw)


MATCH = [
    # (id, revocation issuer, token issuer, token sub, iat, refused)
    ("any-issuer-before", None, ISSUER, "00u1alice", T0 - 1, True),
    ("any-issuer-other-issuer", None, "https://other.example", "00u1alice", T0 - 1, True),
    ("iat-equal-passes", None, ISSUER, "00u1alice", T0, False),
    ("iat-after-passes", None, ISSUER, "00u1alice", T0 + 1, False),
    ("iat-missing-refused", None, ISSUER, "00u1alice", None, True),
    ("other-subject", None, ISSUER, "00u1bob", T0 - 1, False),
    ("subject-missing", None, ISSUER, None, T0 - 1, False),
    ("issuer-matches", ISSUER, ISSUER, "00u1alice", T0 - 1, True),
    ("issuer-differs", ISSUER, "https://other.example", "00u1alice", T0 - 1, False),
    ("issuer-differs-no-iat", ISSUER, "https://other.example", "00u1alice", None, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rev_issuer", "issuer", "sub", "iat", "refused"),
    [c[1:] for c in MATCH],
    ids=[c[0] for c in MATCH],
)
def test_matching(
    rev_issuer: str | None,
    issuer: str,
    sub: str | None,
    iat: float | None,
    refused: bool,
) -> None:
    rev = Revocation(name="r", subject="00u1alice", issuer=rev_issuer, issued_before=T0)
    revocations = RevocationList()
    revocations.replace([rev])
    assert (revocations.revoked(issuer, sub, iat) is not None) is refused
    if sub is not None:
        assert rev.matches(issuer, sub, iat) is refused


def test_expired_objects_still_refuse_until_deleted() -> None:
    """Fail closed: the watcher deletes an expired object; until its DELETED
    event arrives it applies (a token it names cannot be unexpired anyway
    when expiresAt covers the longest token lifetime)."""
    rev = Revocation(name="r", subject="s", issued_before=T0, expires_at=T0 + 10)
    revocations = RevocationList()
    revocations.replace([rev])
    assert revocations.expired(T0 + 9) == []
    assert revocations.expired(T0 + 10) == [rev]
    assert revocations.revoked(ISSUER, "s", T0 - 1) is rev
    revocations.remove("r")
    assert revocations.revoked(ISSUER, "s", T0 - 1) is None
    assert Revocation(name="n", subject="s", issued_before=T0).expired(1e12) is False


def test_the_strongest_revocation_decides_and_listeners_hear_changes() -> None:
    added: list[str] = []
    lifted: list[str] = []
    revocations = RevocationList()
    revocations.subscribe(
        added=lambda r: added.append(r.name), lifted=lambda r: lifted.append(r.name)
    )
    early = Revocation(name="early", subject="s", issued_before=T0)
    late = Revocation(name="late", subject="s", issued_before=T0 + 100)
    revocations.put(early)
    revocations.put(late)
    assert revocations.revoked(ISSUER, "s", T0 + 50) is late
    revocations.remove("late")
    assert revocations.revoked(ISSUER, "s", T0 + 50) is None
    assert revocations.revoked(ISSUER, "s", T0 - 1) is early
    # Moving issuedBefore back lifts what the old version refused.
    revocations.put(replace(early, issued_before=T0 - 100))
    assert (added, lifted) == (["early", "late", "early"], ["late", "early"])
    revocations.replace([])
    assert len(revocations) == 0
    assert revocations.synced
    assert lifted[-1] == "early"


def test_times_are_rfc3339_rounded_up_and_the_body_is_valid() -> None:
    assert format_time(T0 + 0.2) == "2027-01-15T08:00:01Z"
    assert parse_time("2027-01-15T08:00:00z", "t") == T0
    body = revocation_object(
        subject="00u1alice",
        issuer=None,
        issued_before=T0,
        reason="r",
        expires_at=T0 + 3600,
    )
    assert body["metadata"] == {"generateName": "revoked-"}
    assert body["spec"] == {
        "subject": "00u1alice",
        "issuedBefore": "2027-01-15T08:00:00Z",
        "reason": "r",
        "expiresAt": "2027-01-15T09:00:00Z",
    }
    with pytest.raises(errors.RevocationError):
        revocation_object(
            subject="", issuer=None, issued_before=T0, reason="", expires_at=None
        )


# --- the authenticator ---------------------------------------------------------------


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    metrics.flush()
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_cached_verdict_is_refused_once_revoked_and_let_in_when_lifted() -> (
    None
):
    key = new_key("RS256")
    metrics = Metrics()
    revocations = RevocationList()
    authn = Authenticator(
        auth_config(authenticator_config()),
        {ISSUER: DictResolver(key)},
        metrics=metrics,
        revocations=revocations,
    )
    now = time.time()
    token = sign(key, claims_for(ISSUER, "kubernetes", now=now))
    bob = sign(key, claims_for(ISSUER, "kubernetes", sub="00u1bob", now=now))
    # Before the first list: fail closed, temporary (503 and a retry).
    with pytest.raises(errors.RevocationsUnavailable) as unread:
        await authn.authenticate(token)
    assert unread.value.temporary
    revocations.replace([])
    assert await authn.authenticate(token) is not None
    assert await authn.authenticate(bob) is not None
    assert len(authn.cache) == 2
    rev = Revocation(name="r", subject="00u1alice", issued_before=now + 1)
    revocations.put(rev)
    assert len(authn.cache) == 1  # alice's verdict dropped at once, bob's kept
    with pytest.raises(errors.TokenRevoked, match='Revocation "r"'):
        await authn.authenticate(token)
    with pytest.raises(errors.TokenRevoked):  # the remembered refusal
        await authn.authenticate(token)
    assert await authn.authenticate(bob) is not None
    # Lifted: let in at once (the remembered refusal is dropped with it).
    revocations.remove("r")
    user = await authn.authenticate(token)
    assert user is not None
    # A verdict that lands in the cache after the revocation arrived (a
    # validation in flight meanwhile) is refused on its hit.
    revocations.put(rev)
    slot, _ = authn.lookup(bob)  # any key: the entry is written by hand
    authn.cache.put_user(
        slot, user, issuer=ISSUER, exp=now + 600, subject="00u1alice", iat=now
    )
    with pytest.raises(errors.TokenRevoked):
        authn.lookup(bob)
    assert authn.cache.subject(slot) is None  # dropped on the way
    assert _sample(
        metrics, "kube_oidc_gate_authentications_total", result="rejected", reason="revoked"
    ) == 3  # fmt: skip
    # A token issued after issuedBefore (a new login) passes.
    revocations.replace([rev])
    later = sign(key, claims_for(ISSUER, "kubernetes", now=now + 5))
    assert await authn.authenticate(later) is not None


# --- the watcher against the fake API server ----------------------------------------


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait (bounded) until ``cond()``; return how long it took."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


FAST = RevocationSettings(
    namespace=NS,
    watch_timeout=30,
    idle_timeout=5,
    backoff_initial=0.05,
    backoff_max=0.4,
    request_timeout=3,
    expiry_interval=3600,
)


@dataclass
class Watching:
    fake: FakeAPIServer
    watcher: RevocationWatcher
    upstream: Upstream
    metrics: Metrics

    @property
    def revocations(self) -> RevocationList:
        return self.watcher.revocations


@asynccontextmanager
async def watching(
    tmp_path: Path,
    *,
    settings: RevocationSettings = FAST,
    prepare: Callable[[FakeAPIServer], None] | None = None,
    start: bool = True,
) -> AsyncIterator[Watching]:
    async with serve_apiserver(trustme.CA()) as fake:
        if prepare is not None:
            prepare(fake)
        kc = upstream_kubeconfig(tmp_path / "gate.kubeconfig", fake.url, fake.ca_pem)
        upstream = Upstream(UpstreamSettings(kubeconfig=str(kc)))
        await upstream.start()
        metrics = Metrics()
        watcher = RevocationWatcher(
            upstream, settings, RevocationList(), metrics=metrics, jitter=lambda: 1.0
        )
        if start:
            watcher.start()
        try:
            yield Watching(fake, watcher, upstream, metrics)
        finally:
            await watcher.close()
            await upstream.close()


@pytest.mark.slow
async def test_list_add_modify_delete_and_bookmarks(tmp_path: Path) -> None:
    def two(fake: FakeAPIServer) -> None:
        fake.revocations.put(NS, obj("r1"))
        fake.revocations.put("elsewhere", obj("other"))

    async with watching(tmp_path, prepare=two) as w:
        store = w.fake.revocations
        await until(lambda: w.revocations.synced)
        assert [r.name for r in w.revocations] == ["r1"]
        assert w.watcher.readiness() == ([], [])
        await until(lambda: bool(store.watches))
        store.put(NS, obj("r2", sub="00u1bob", issuer=ISSUER))
        await until(lambda: w.revocations.get("r2") is not None)
        assert w.revocations.revoked(ISSUER, "00u1bob", T0 - 1) is not None
        store.put(NS, obj("r2", sub="00u1bob", before="2027-01-15T07:00:00Z"))
        await until(lambda: w.revocations.revoked(ISSUER, "00u1bob", T0 - 1) is None)
        store.delete(NS, "r1")
        await until(lambda: w.revocations.get("r1") is None)
        assert _sample(w.metrics, "kube_oidc_gate_revocations") == 1
        assert _sample(w.metrics, "kube_oidc_gate_revocation_watch_up") == 1
        # A bookmark moves the resourceVersion on: the next watch starts there.
        store.rv += 50
        store.bookmark()
        await asyncio.sleep(0.1)
        store.break_watches()
        await until(lambda: sum(k == "watch" for k, _ in store.seen) >= 2)
        last_watch = [q for k, q in store.seen if k == "watch"][-1]
        assert f"resourceVersion={store.rv}" in last_watch
        assert "allowWatchBookmarks=true" in last_watch
        assert w.watcher.lists == 1  # resumed, not listed again
        assert w.watcher.restarts == {"unreachable": 1}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["status", "event"])
async def test_410_gone_lists_again(tmp_path: Path, how: str) -> None:
    settings = replace(FAST, watch_timeout=1)  # the API server ends each watch
    async with watching(tmp_path, settings=settings) as w:
        store = w.fake.revocations
        store.put(NS, obj("r1"))
        await until(lambda: w.revocations.get("r1") is not None)
        # Deleted while the watcher cannot see it (compacted away) ...
        del store.objects[(NS, "r1")]
        store.put(NS, obj("r3"))
        await until(lambda: w.revocations.get("r3") is not None)
        store.gone_next_watch = how
        # ... and a 410 on the next watch: a full list makes both right.
        await until(lambda: w.watcher.lists == 2, timeout=5)
        assert w.revocations.get("r1") is None
        assert w.revocations.get("r3") is not None
        assert w.watcher.restarts.get("expired") == 1
        assert w.watcher.restarts.get("closed", 0) >= 1
        assert _sample(
            w.metrics, "kube_oidc_gate_revocation_watch_restarts_total", reason="expired"
        ) == 1  # fmt: skip
        assert w.watcher.readiness() == ([], [])


@pytest.mark.slow
async def test_a_broken_watch_is_resumed_with_backoff_and_readiness_says_so(
    tmp_path: Path,
) -> None:
    async with watching(tmp_path) as w:
        store = w.fake.revocations
        await until(lambda: bool(store.watches))
        store.fail_next = 3
        broke = time.monotonic()
        store.break_watches()
        await until(lambda: w.watcher.broken_since is not None)
        problems, warnings = w.watcher.readiness()
        assert problems == []  # ready: the last list stays in force
        assert "revocation watch broken since" in warnings[0]
        assert _sample(w.metrics, "kube_oidc_gate_revocation_watch_up") == 0
        store.put(NS, obj("during"))
        await until(lambda: w.revocations.get("during") is not None)
        took = time.monotonic() - broke
        # Backoff with jitter 1.0: 0.05 + 0.1 + 0.2 + 0.4 (bounded) seconds.
        assert 0.7 <= took < 3.0, took
        assert w.watcher.restarts == {"unreachable": 1, "error": 3}
        assert w.watcher.broken_since is None
        assert w.watcher.readiness() == ([], [])
        assert _sample(w.metrics, "kube_oidc_gate_revocation_watch_up") == 1
        assert w.watcher.lists == 1
    print(f"broken watch resumed after {took:.2f}s (3 failed retries)")


async def test_not_ready_before_the_first_list(tmp_path: Path) -> None:
    def uninstalled(fake: FakeAPIServer) -> None:
        fake.revocations.installed = False

    async with watching(tmp_path, prepare=uninstalled) as w:
        await until(lambda: w.watcher.restarts.get("error", 0) >= 2)
        problems, _ = w.watcher.readiness()
        assert len(problems) == 1
        assert "not read yet: list: 404" in problems[0], problems
        assert not w.revocations.synced
        w.fake.revocations.installed = True
        await until(lambda: w.revocations.synced, timeout=3)
        assert w.watcher.readiness() == ([], [])


@pytest.mark.slow
async def test_a_silent_watch_is_restarted(tmp_path: Path) -> None:
    async with watching(tmp_path, settings=replace(FAST, idle_timeout=0.3)) as w:
        await until(lambda: w.watcher.restarts.get("idle", 0) >= 1, timeout=3)
        assert w.watcher.lists == 1


async def test_a_malformed_object_is_ignored_and_the_watch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with watching(tmp_path) as w:
        store = w.fake.revocations
        await until(lambda: bool(store.watches))
        store.put(NS, obj("bad", before="tomorrow"))
        store.put(NS, obj("good"))
        await until(lambda: w.revocations.get("good") is not None)
        assert w.revocations.get("bad") is None
        assert w.watcher.restarts == {}
    logged = [
        r for r in caplog.records if r.msg == "revocation object ignored: malformed"
    ]
    assert [r.__dict__["revocation"] for r in logged] == ["bad"]


@pytest.mark.slow
async def test_expired_objects_are_deleted_and_races_are_fine(tmp_path: Path) -> None:
    past = format_time(time.time() - 60)
    settings = replace(FAST, expiry_interval=0.2)
    async with watching(tmp_path, settings=settings) as w:
        store = w.fake.revocations
        store.put(NS, obj("old", expires=past))
        store.put(NS, obj("new", expires=format_time(time.time() + 3600)))
        await until(lambda: ("delete", "old") in store.seen, timeout=5)
        await until(lambda: w.revocations.get("old") is None)
        assert store.names() == ["new"]
        assert _sample(
            w.metrics, "kube_oidc_gate_revocation_deletes_total", result="deleted"
        ) == 1  # fmt: skip
        # Another replica was first (404), or the object was recreated (409).
        assert await delete_revocation(w.upstream, NS, "old") == "gone"
        assert await delete_revocation(w.upstream, NS, "new", uid="stale") == "gone"
        assert store.names() == ["new"]


# --- the writer ------------------------------------------------------------------


async def test_create_is_idempotent_by_name_and_errors_are_specific(
    tmp_path: Path,
) -> None:
    async with watching(tmp_path, start=False) as w:
        store = w.fake.revocations

        async def create(ns: str = NS, name: str | None = None) -> str:
            return await create_revocation(
                w.upstream,
                ns,
                subject="00u1alice",
                issuer=ISSUER,
                issued_before=T0,
                reason="okta: user.lifecycle.deactivate",
                expires_at=T0 + 86400,
                name=name,
            )

        generated = await create()
        assert generated.startswith("revoked-")
        assert len(generated) == 13
        assert await create(name="okta-evt-1") == "okta-evt-1"
        assert await create(name="okta-evt-1") == "okta-evt-1"  # a replay
        assert sorted(store.names()) == sorted([generated, "okta-evt-1"])
        with pytest.raises(errors.RevocationError, match="already exists"):
            await _conflict(w.upstream)
        with pytest.raises(errors.RevocationError, match="namespace 'nope' does not"):
            await create("nope")
        store.forbidden.add("proxy-sa-token-1")
        with pytest.raises(errors.RevocationError, match="RBAC denied") as denied:
            await create()
        assert denied.value.status == 403
        store.forbidden.clear()
        store.installed = False
        with pytest.raises(errors.RevocationError, match="CRD is not installed"):
            await create()


async def _conflict(upstream: Upstream) -> str:
    """A generated name that collides: not idempotent (no name was asked for)."""
    from proxy import revocation_api

    status, body = await revocation_api._call(
        upstream,
        "POST",
        revocation_api.collection_path(NS),
        body={**obj("okta-evt-1"), "apiVersion": "kube-oidc-gate.io/v1alpha1"},
        request_timeout=3,
    )
    raise revocation_api._write_error(status, body, NS, "create")


# --- the CLI: revoke, and two replicas ----------------------------------------------


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


async def revoke(*args: str) -> tuple[int, str, str, float]:
    """``kube-oidc-gate revoke ...`` as a subprocess, without blocking the loop
    (the fake API server runs in it); (code, stdout, stderr, when it returned)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "revoke", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env={**os.environ, **_env()},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic()


REVOKE_ERRORS = [
    ("namespace-missing", ["--namespace", "nope"], "namespace 'nope' does not exist"),
    ("bad-before", ["--before", "yesterday"], "--before must be 'now' or an RFC 3339"),
    ("bad-duration", ["--expires-in", "forever"], "--expires-in must be a positive"),
]  # fmt: skip


@pytest.mark.slow
async def test_revoke_cli_creates_one_object_and_says_what_is_wrong(
    tmp_path: Path,
) -> None:
    async with serve_apiserver(trustme.CA()) as fake:
        fake.user_tokens[OPERATOR_TOKEN] = {"username": "operator", "groups": []}
        kc = upstream_kubeconfig(
            tmp_path / "operator.kubeconfig",
            fake.url,
            fake.ca_pem,
            token=OPERATOR_TOKEN,
        )
        base = ["--kubeconfig", str(kc), "--sub", "00u1alice"]
        code, out, err, _ = await revoke(
            *base, "--issuer", ISSUER, "--reason", "left", "--before",
            "2027-01-15T08:00:00Z", "--expires-in", "2h",
        )  # fmt: skip
        assert code == 0, err
        (stored,) = fake.revocations.objects.values()
        assert out == stored["metadata"]["name"] + "\n"
        assert stored["spec"] == {
            "subject": "00u1alice",
            "issuer": ISSUER,
            "issuedBefore": "2027-01-15T08:00:00Z",
            "reason": "left",
            "expiresAt": "2027-01-15T10:00:00Z",
        }
        for name, extra, needle in REVOKE_ERRORS:
            code, out, err, _ = await revoke(*base, *extra)
            assert (code, out) == (2, ""), name
            assert needle in err, (name, err)
        fake.revocations.forbidden.add(OPERATOR_TOKEN)
        code, _, err, _ = await revoke(*base)
        assert code == 2
        assert "RBAC denied" in err, err
        fake.revocations.installed = False
        fake.revocations.forbidden.clear()
        code, _, err, _ = await revoke(*base)
        assert code == 2
        assert "CRD is not installed" in err, err


async def check_token(*args: str) -> tuple[int, str, str]:
    """``kube-oidc-gate check-token ...`` as a subprocess: (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check-token", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env={**os.environ, **_env()},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_check_token_says_which_revocation_refuses_a_token(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """``check-token --revocation-namespace`` reads the list once, as a
    replica does, and names the object; without the flag it is not read."""
    async with serve_apiserver(trustme.CA()) as fake:
        gate_kc = upstream_kubeconfig(tmp_path / "gate.kc", fake.url, fake.ca_pem)
        auth = ["--oidc-issuer-url", issuer.url, "--oidc-client-id", "kubernetes"]
        listed = [*auth, "--revocation-namespace", NS, "--kubeconfig", str(gate_kc)]
        alice, bob = issuer.token(sub="00u1alice"), issuer.token(sub="00u1bob")
        fake.revocations.put(
            NS,
            obj(
                "offboarded",
                before=format_time(time.time() + 60),
                expires="2099-01-01T00:00:00Z",
                reason="left the company",
            ),
        )
        code, out, err = await check_token(*listed, alice)
        assert code == 1, err
        assert "result: rejected (revoked)\n" in out
        assert (
            f"revoked by Revocation {NS}/offboarded (subject '00u1alice', issuer "
            "any, tokens issued before "
        ) in out
        assert "reason 'left the company', expires 2099-01-01T00:00:00Z" in out
        assert f"kubectl delete revocation -n {NS} offboarded lifts it" in out
        code, out, err = await check_token(*listed, bob)
        assert code == 0, err
        assert f"revocations: none of the 1 in namespace {NS} names this token" in out
        # Without the flag the list is not consulted (the replicas still refuse).
        code, out, _ = await check_token(*auth, alice)
        assert code == 0
        assert "revocation" not in out.lower()
        # The list cannot be read: refused, as on a replica that never listed.
        fake.revocations.installed = False
        code, out, _ = await check_token(*listed, bob)
        assert code == 1
        assert "result: rejected (revocations_unavailable)\n" in out
        assert (
            f"revocations: not read, so every token is refused: revocation list "
            f"of namespace '{NS}': list: 404: the server could not find"
        ) in out
        for extra, needle in [
            (["--kubeconfig", str(gate_kc)], "give --revocation-namespace too"),
            (
                [*listed[2:], "--offline", "--jwks-file", "x"],
                "--offline makes no network request",
            ),
        ]:
            code, out, err = await check_token(*auth, *extra, alice)
            assert (code, out) == (2, ""), err
            assert needle in err, err


async def _review(url: str, ctx: ssl.SSLContext, token: str) -> str:
    """The webhook's verdict on ``token``: ``ok`` or the error's reason code."""
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.post(url, json=review_body(token)) as r,
    ):
        status = parse_review(await r.text()).status
    if status.authenticated:
        return "ok"
    return str(status.error).split(":", 1)[0]


async def _whoami(url: str, ctx: ssl.SSLContext, token: str) -> str:
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.post(url, json={}, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return "ok" if r.status == 201 else str(r.status)


async def _streak(ask: Callable[[], Any], want: str, *, n: int = 10) -> float:
    """Ask until ``n`` answers in a row are ``want`` (fresh connections, so every
    worker answers some); the time of the first of them, since now."""
    started = time.monotonic()
    first: float | None = None
    run = 0
    while run < n:
        if time.monotonic() - started > 10:
            raise AssertionError(f"no streak of {want!r} within 10s")
        got = await ask()
        if got == want:
            run += 1
            first = first if first is not None else time.monotonic() - started
        else:
            run, first = 0, None
    assert first is not None
    return first


async def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.1)


async def _reasons(probe: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{probe}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kube_oidc_gate_authentications_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.slow
async def test_two_replicas_refuse_a_revoked_user_within_seconds(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """A webhook with ``--workers 2`` and a proxy, both watching through the
    fake API server; ``revoke`` (the real CLI) and both refuse, then a
    delete lifts it."""
    async with serve_apiserver(trustme.CA()) as fake:
        fake.user_tokens[OPERATOR_TOKEN] = {"username": "operator", "groups": []}
        gate_kc = upstream_kubeconfig(tmp_path / "gate.kc", fake.url, fake.ca_pem)
        operator_kc = upstream_kubeconfig(
            tmp_path / "op.kc", fake.url, fake.ca_pem, token=OPERATOR_TOKEN
        )
        revocation = ["--revocation-namespace", NS, "--kubeconfig", str(gate_kc)]
        hook_port, hook_probe = free_port(), free_port()
        proxy_port, proxy_probe = free_port(), free_port()
        hook_args = webhook_args(
            issuer, tmp_path / "hook", hook_port, *revocation, "--workers", "2",
            probe_port=hook_probe,
        )  # fmt: skip
        proxy_args = [
            "proxy",
            "--oidc-issuer-url", issuer.url, "--oidc-client-id", "kubernetes",
            "--oidc-username-prefix", "oidc:",
            "--bind-address", "127.0.0.1", "--secure-port", str(proxy_port),
            "--probe-bind-address", f"127.0.0.1:{proxy_probe}",
            "--cert-dir", str(tmp_path / "proxy" / "certs"),
            *revocation,
        ]  # fmt: skip
        token = issuer.token(sub="00u1alice")
        other = issuer.token(sub="00u1bob")
        with Proc(*hook_args, env=_env()) as hook, Proc(*proxy_args, env=_env()) as px:
            await hook.await_log("revocation list read", count=2, timeout=30)
            await px.await_log("revocation list read", timeout=30)
            await hook.await_log("jwks keys loaded", count=2, timeout=20)
            await px.await_log("jwks keys loaded", timeout=20)
            hook_ctx = ssl.create_default_context(
                cafile=str(tmp_path / "hook" / "certs" / "kube-oidc-gate.crt")
            )
            px_ctx = ssl.create_default_context(
                cafile=str(tmp_path / "proxy" / "certs" / "kube-oidc-gate.crt")
            )
            hook_url = f"https://127.0.0.1:{hook_port}/authenticate"
            px_url = f"https://127.0.0.1:{proxy_port}{WHOAMI}"

            def ask_hook(t: str = token) -> Any:
                return _review(hook_url, hook_ctx, t)

            def ask_proxy(t: str = token) -> Any:
                return _whoami(px_url, px_ctx, t)

            # Accepted, and cached, on every worker of both replicas.
            await _streak(ask_hook, "ok")
            await _streak(ask_proxy, "ok")
            async with aiohttp.ClientSession() as s:
                for probe in (hook_probe, proxy_probe):
                    async with s.get(f"http://127.0.0.1:{probe}/readyz") as r:
                        assert r.status == 200, await r.text()
            ran = time.monotonic()
            code, out, err, returned = await revoke(
                "--kubeconfig", str(operator_kc), "--sub", "00u1alice",
                "--reason", "offboarded",
            )  # fmt: skip
            ran = returned - ran
            assert code == 0, err
            name = out.strip()
            assert fake.revocations.names() == [name]
            results = await asyncio.gather(
                _streak(ask_hook, "revoked"), _streak(ask_proxy, "401")
            )
            after = time.monotonic() - returned
            timings = {
                "revoke command (start to exit)": round(ran, 3),
                "webhook (2 workers)": round(results[0], 3),
                "proxy": round(results[1], 3),
                "both, 10 in a row each": round(after, 3),
            }
            assert max(results) < 5.0, timings
            assert await ask_hook(other) == "ok"
            assert await ask_proxy(other) == "ok"
            for probe in (hook_probe, proxy_probe):
                # Other workers' counts reach a scrape within a flush (1 s).
                url = f"http://127.0.0.1:{probe}"

                async def counted(at: str = url) -> bool:
                    return (await _reasons(at)).get("revoked", 0) >= 10

                await _eventually(counted)
            # kubectl delete lifts it.
            fake.revocations.delete(NS, name)
            lifted = time.monotonic()
            await asyncio.gather(_streak(ask_hook, "ok"), _streak(ask_proxy, "ok"))
            timings["lifted (both)"] = round(time.monotonic() - lifted, 3)
            await hook.await_log("revocation lifted", count=2, timeout=5)
            assert hook.stop() == 0
            assert px.stop() == 0
    print("revoke returned -> refused on every worker:", timings)


# --- readiness through /readyz, and the flags ----------------------------------------


@pytest.mark.slow
async def test_readyz_before_the_first_list_and_while_broken(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """The engine as the CLI builds it (``start_engine`` with a list, then
    ``start_revocation_watch`` from a kubeconfig), its probe app on loopback."""
    from aiohttp import web

    from proxy.app import probe_app, start_engine, start_revocation_watch
    from tests.support.running_webhook import issuer_auth_config

    async with serve_apiserver(trustme.CA()) as fake:
        fake.revocations.installed = False
        kc = upstream_kubeconfig(tmp_path / "gate.kc", fake.url, fake.ca_pem)
        engine = await start_engine(
            issuer_auth_config(issuer.url, None),
            metrics=Metrics(),
            revocations=RevocationList(),
        )
        runner = web.AppRunner(probe_app(engine))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            await start_revocation_watch(
                engine, replace(FAST, kubeconfig=str(kc), backoff_max=0.2)
            )
            await engine.keysets.get(issuer.url).refresh(force=True)

            async def readyz() -> tuple[int, str]:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"http://127.0.0.1:{port}/readyz") as r,
                ):
                    return r.status, await r.text()

            token = issuer.token(sub="00u1alice")
            with pytest.raises(errors.RevocationsUnavailable):
                await engine.authenticator.authenticate(token)
            status, text = await readyz()
            assert status == 503
            assert f"revocation list (namespace {NS}): not read yet" in text, text
            fake.revocations.installed = True
            watch = engine.revocation_watch
            assert watch is not None
            await until(lambda: watch.revocations.synced)
            status, text = await readyz()
            assert status == 200, text
            assert "warning" not in text
            assert await engine.authenticator.authenticate(token) is not None
            fake.revocations.fail_next = 1000
            fake.revocations.break_watches()
            await until(lambda: watch.broken_since is not None)
            status, text = await readyz()
            assert status == 200
            assert "revocation watch broken since" in text, text
            # Resumed: what was created meanwhile applies, to the cached verdict.
            fake.revocations.put(NS, obj("r", before=format_time(time.time() + 5)))
            fake.revocations.fail_next = 0
            await until(lambda: watch.revocations.get("r") is not None)
            with pytest.raises(errors.TokenRevoked):
                await engine.authenticator.authenticate(token)
            assert "broken" not in (await readyz())[1]
        finally:
            await runner.cleanup()
            await engine.close()


FLAGS = [
    ("off", ["webhook"], None),
    ("webhook", ["webhook", "--revocation-namespace", "gate", "--kubeconfig", "k"], "gate"),
    ("proxy", ["proxy", "--revocation-namespace", "gate"], "gate"),
    ("bad-namespace", ["webhook", "--revocation-namespace", "Gate_1"], "must be a namespace name"),
    ("kubeconfig-alone", ["webhook", "--kubeconfig", "k"], "give --revocation-namespace too"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "want"), [c[1:] for c in FLAGS], ids=[c[0] for c in FLAGS]
)
def test_revocation_flags(argv: list[str], want: str | None) -> None:
    from proxy.cli import build_parser
    from proxy.config import revocation_settings_from_args

    ns = build_parser().parse_args(argv)
    if want is None or want == "gate":
        got = revocation_settings_from_args(ns)
        assert (got.namespace if got else None) == want
        if got is not None and argv[0] == "webhook":
            assert got.kubeconfig == "k"
        return
    with pytest.raises(errors.ConfigError, match=want):
        revocation_settings_from_args(ns)
