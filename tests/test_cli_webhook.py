"""The real command: ``kube-oidc-gate webhook`` and ``check-token`` as subprocesses."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.issuer import FakeIssuer
from tests.keygen import claims_for, jwks, new_key, sign
from tests.proc import ROOT, Proc
from tests.support.running_gate import wait_until
from tests.support.running_webhook import parse_review, review_body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def webhook_args(
    issuer: FakeIssuer,
    tmp_path: Path,
    port: int,
    *extra: str,
    probe_port: int | None = None,
) -> list[str]:
    return [
        "webhook",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-groups-claim", "groups",
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{probe_port or free_port()}",
        "--cert-dir", str(tmp_path / "certs"),
        "--shutdown-grace-period", "10",
        *extra,
    ]  # fmt: skip


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(tmp_path / "certs" / "kube-oidc-gate.crt")
    )


@pytest.mark.slow
async def test_dev_mode_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    with Proc(
        "webhook",
        "--dev",
        "--secure-port",
        str(port),
        "--cert-dir",
        str(tmp_path / "c"),
    ) as proc:
        text = proc.wait_for_stdout("probes:", timeout=20)
        curl = next(
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith("curl") and "--cacert" in line
        )
        argv = shlex.split(curl)
        body = argv[argv.index("-d") + 1]
        url = next(a for a in argv if a.startswith("https://"))
        ca = argv[argv.index("--cacert") + 1]
        ctx = ssl.create_default_context(cafile=ca)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.post(url, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            assert r.status == 200
            review = parse_review(await r.text())
        assert review.status.authenticated is True
        assert review.status.user.username == "dev:alice"
        assert review.status.user.groups == ["naxslabs-admins"]
        assert any(
            e.get("event")
            == "DEVELOPMENT ISSUER ENABLED: tokens are minted on request; never use --dev in production"
            for e in proc.logs()
        )
        token = json.loads(body)["spec"]["token"]
        assert all(token not in line for line in proc.stderr), (
            "the token never reaches the log"
        )
        assert proc.stop() == 0


@pytest.mark.slow
def test_dev_issuer_cannot_be_mixed_with_a_real_issuer(tmp_path: Path) -> None:
    with Proc(
        "webhook",
        "--dev",
        "--oidc-issuer-url",
        "https://idp.example.test",
        "--oidc-client-id",
        "k",
    ) as proc:
        assert proc.popen.wait(20) == 2
    assert "mutually exclusive" in "".join(proc.stderr)


@pytest.mark.slow
async def test_refusals_past_the_limit_are_counted_not_logged(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    port = free_port()
    good = issuer.token(groups=["naxslabs-admins"])
    forged = sign(new_key(), claims_for(issuer.url, "kubernetes"))
    with Proc(
        *webhook_args(issuer, tmp_path, port, "--refusal-log-limit", "2")
    ) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        await proc.await_log("serving", timeout=20)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(tmp_path))
        ) as s:
            for token in [forged] * 10 + [good] * 3:
                async with s.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                ) as r:
                    assert r.status == 200
                    review = parse_review(await r.text())
                    assert review.status.authenticated is (token == good)
        # The count of what was left out is said at the latest on the way out.
        assert proc.stop() == 0
    events = proc.logs()
    reviews = [e for e in events if e.get("event") == "token review"]
    rejected = [e for e in reviews if e["result"] == "rejected"]
    summaries = [e for e in events if e.get("event") == "refusals not logged"]
    assert [e["result"] for e in reviews].count("ok") == 3, "accepted: all logged"
    assert 2 <= len(rejected) < 10
    assert summaries
    assert {(e["result"], e["reason"], e["issuer"]) for e in summaries} == {
        ("rejected", rejected[0]["reason"], issuer.url)
    }
    assert len(rejected) + sum(e["not_logged"] for e in summaries) == 10
    assert all(forged not in line and good not in line for line in proc.stderr)


@pytest.mark.slow
def test_a_negative_refusal_log_limit_is_refused(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    with Proc(
        *webhook_args(issuer, tmp_path, free_port(), "--refusal-log-limit", "-1")
    ) as proc:
        assert proc.popen.wait(20) == 2
    assert "--refusal-log-limit must be >= 0, got -1" in "".join(proc.stderr)


@pytest.mark.slow
async def test_two_workers_share_the_port(issuer: FakeIssuer, tmp_path: Path) -> None:
    port, probe_port = free_port(), free_port()
    token = issuer.token(groups=["naxslabs-admins"])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with Proc(
        *webhook_args(issuer, tmp_path, port, "--workers", "2", probe_port=probe_port),
        env={"TMPDIR": str(tmp)},
    ) as proc:
        await proc.await_log("jwks keys loaded", count=2, timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", count=2, timeout=20)
        ctx = client_ssl(tmp_path)
        accepted = 0
        for _ in range(60):
            # A new connection each time, so the kernel can pick either process.
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
                ) as s,
                s.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                ) as r,
            ):
                if r.status == 503:
                    await asyncio.sleep(0.05)
                    continue
                assert parse_review(await r.text()).status.authenticated is True
                accepted += 1

        def answered_so_far() -> list[int]:
            return [
                e["pid"]
                for e in proc.logs()
                if e.get("event") == "token review" and e.get("result") == "ok"
            ]

        # Each worker's log writer thread writes a few milliseconds after the
        # answer went out: wait (bounded) for every accepted review's line.
        for _ in range(100):
            answered = answered_so_far()
            if len(answered) >= accepted:
                break
            await asyncio.sleep(0.05)
        assert len(answered) == accepted
        pids = set(answered)
        assert len(pids) == 2, f"answers came from {pids}"
        assert proc.pid not in pids, "the parent only supervises"
        # A scrape answered by either worker counts both workers' reviews.
        counted = await _scraped_ok_reviews(probe_port, len(answered))
        assert counted == len(answered)
        shared = [p.name for p in tmp.iterdir()]
        assert len(shared) == 1
        assert shared[0].startswith("kube-oidc-gate-metrics-")
        assert proc.stop() == 0
    assert list(tmp.iterdir()) == [], "the shared samples are removed at exit"


def _earlier_run_counted(directory: Path, accepted: int) -> None:
    """Leave sample files as an earlier run in ``directory`` would have (another
    process: prometheus_client picks its multiprocess store at import)."""
    script = (
        "from prometheus_client import Counter, Gauge\n"
        "c = Counter('kube_oidc_gate_authentications', '', ['result', 'reason'])\n"
        f"c.labels('ok', 'ok').inc({accepted})\n"
        "Gauge('kube_oidc_gate_g', '', multiprocess_mode='livesum').set(1)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
        check=True,
        timeout=60,
    )


@pytest.mark.slow
async def test_a_given_metrics_dir_starts_without_an_earlier_runs_counts(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    # A container restart keeps its emptyDir: the old files must not count.
    shared = tmp_path / "metrics"
    shared.mkdir()
    _earlier_run_counted(shared, 1000)
    (shared / "README").write_text("not ours", encoding="utf-8")
    assert len(list(shared.glob("*.db"))) == 2
    port, probe_port = free_port(), free_port()
    token = issuer.token(groups=["naxslabs-admins"])
    with Proc(
        *webhook_args(issuer, tmp_path, port, "--workers", "2", probe_port=probe_port),
        env={"PROMETHEUS_MULTIPROC_DIR": str(shared)},
    ) as proc:
        await proc.await_log("serving", count=2, timeout=20)
        ctx = client_ssl(tmp_path)
        accepted = 0
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
        ) as s:
            for _ in range(20):
                async with s.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                ) as r:
                    if r.status == 200:
                        accepted += 1
        assert accepted > 0
        assert await _scraped_ok_reviews(probe_port, accepted) == accepted
        (removed,) = [
            e
            for e in proc.logs()
            if e.get("event") == "metrics: removed an earlier run's sample files"
        ]
        assert removed["files"] == 2
        assert proc.stop() == 0
    assert (shared / "README").read_text(encoding="utf-8") == "not ours"


@pytest.mark.slow
def test_a_metrics_dir_that_is_not_a_directory_stops_the_start(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-dir"
    with Proc(
        "webhook", "--dev", env={"PROMETHEUS_MULTIPROC_DIR": str(missing)}
    ) as proc:
        assert proc.popen.wait(20) == 2
    assert f"PROMETHEUS_MULTIPROC_DIR='{missing}'" in "".join(proc.stderr)


async def _scraped_ok_reviews(probe_port: int, want: float) -> float:
    """The accepted reviews /metrics reports, once it reports ``want`` (or 5 s)."""
    counted = 0.0
    deadline = time.monotonic() + 5
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as s:
        while time.monotonic() < deadline:
            async with s.get(f"http://127.0.0.1:{probe_port}/metrics") as r:
                text = await r.text()
            counted = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "kube_oidc_gate_authentications_total"
                and sample.labels.get("result") == "ok"
            )
            if counted >= want:
                break
            await asyncio.sleep(0.1)
    return counted


@pytest.mark.slow
async def test_sigterm_lets_in_flight_reviews_finish(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    port = free_port()
    with Proc(*webhook_args(issuer, tmp_path, port)) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        ctx = client_ssl(tmp_path)
        rotated = issuer.rotate()
        # The refetch for the new kid is slow (and shorter than the 10 s grace
        # period): the review is in flight while the process drains.
        issuer.jwks_delay = 3.0
        fetched = issuer.counts["jwks"]
        token = issuer.token(rotated)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            pending = asyncio.create_task(
                s.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                )
            )
            # Not a sleep tuned to an idle machine: SIGTERM goes once the
            # review is known to wait on the refetch.
            await wait_until(
                lambda: issuer.counts["jwks"] > fetched,
                timeout=20,
                what="the review's refetch reached the issuer",
            )
            proc.popen.send_signal(signal.SIGTERM)
            resp = await asyncio.wait_for(pending, 20)
            assert resp.status == 200
            assert parse_review(await resp.text()).status.authenticated is True
            resp.release()
            with pytest.raises(aiohttp.ClientError):
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx)
                ) as fresh:
                    await fresh.post(
                        f"https://127.0.0.1:{port}/authenticate",
                        json=review_body(token),
                    )
        assert proc.popen.wait(30) == 0
    events = [e.get("event") for e in proc.logs()]
    assert events.index("shutting down") < events.index("token review"), (
        "the review was answered during the drain, not before SIGTERM"
    )


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


ISS = "https://login.example.test/oauth2/default"


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("offline")
    key = new_key("ES256")
    (d / "jwks.json").write_text(json.dumps(jwks(key)))
    files = {"jwks": str(d / "jwks.json")}
    cases = {
        "good": claims_for(
            ISS, "kubernetes", groups=["naxslabs-admins"], email="a@x.io"
        ),
        "aud": claims_for(ISS, "another-client"),
        "expired": claims_for(ISS, "kubernetes", lifetime=-60),
        "foreign": claims_for("https://evil.example.test", "kubernetes"),
        "slash": claims_for(ISS + "/", "kubernetes", groups=["g"]),
        "no-groups": claims_for(ISS, "kubernetes"),
    }
    for name, claims in cases.items():
        (d / name).write_text(sign(key, claims))
        files[name] = str(d / name)
    return files


AUTH = ["--oidc-issuer-url", ISS, "--oidc-client-id", "kubernetes", "--oidc-groups-claim", "groups",
        "--oidc-signing-algs", "ES256"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "code", "expect"),
    [
        (
            "good",
            0,
            r'"username": "https://login.example.test/oauth2/default#00u1alice"',
        ),
        (
            "aud",
            1,
            r'audience mismatch: expected one of \["kubernetes"\], got \["another-client"\]',
        ),
        ("expired", 1, r"result: rejected \(expired\)"),
        ("foreign", 1, r'the token.s iss is "https://evil.example.test"'),
        (
            "slash",
            1,
            r"result: rejected \(issuer_mismatch\)\ntoken: issuer mismatch: the "
            r'token.s iss is "https://login.example.test/oauth2/default/", the '
            r'configured issuer is "https://login.example.test/oauth2/default": they '
            r"differ by a trailing slash",
        ),
    ],
    ids=["accepted", "audience", "expired", "wrong-issuer", "near-miss-issuer"],
)
def test_check_token_offline(
    offline: dict[str, str], case: str, code: int, expect: str
) -> None:
    result = run_cli(
        "check-token",
        *AUTH,
        "--offline",
        "--jwks-file",
        offline["jwks"],
        "--token-file",
        offline[case],
    )
    assert result.returncode == code, result.stderr
    assert re.search(expect, result.stdout), result.stdout
    token = Path(offline[case]).read_text()
    assert token not in result.stdout + result.stderr


@pytest.mark.slow
def test_check_token_warns_when_the_groups_claim_is_missing(
    offline: dict[str, str],
) -> None:
    """Accepted (exit 0), but the seed article's first troubleshooting step,
    "is the groups claim there?", is answered without being asked.
    """
    args = ["check-token", *AUTH, "--offline", "--jwks-file", offline["jwks"]]
    missing = run_cli(*args, "--token-file", offline["no-groups"])
    assert missing.returncode == 0, missing.stderr
    warning = re.search(r"^warning: .*$", missing.stdout, re.MULTILINE)
    assert warning is not None, missing.stdout
    assert 'no "groups" claim' in warning.group(0)
    assert "Authorization Servers" in warning.group(0)
    present = run_cli(*args, "--token-file", offline["good"])
    assert present.returncode == 0
    assert "warning:" not in present.stdout


@pytest.mark.slow
def test_check_token_logs_only_warnings_as_text(offline: dict[str, str]) -> None:
    """A person at a terminal: the verdict on stdout, nothing routine on stderr."""
    result = run_cli(
        "check-token",
        *AUTH,
        "--offline",
        "--jwks-file",
        offline["jwks"],
        "--token-file",
        offline["good"],
    )
    assert result.returncode == 0
    assert result.stderr == ""


@pytest.mark.slow
def test_check_token_reads_stdin(offline: dict[str, str]) -> None:
    token = Path(offline["good"]).read_text()
    result = run_cli(
        "check-token",
        *AUTH,
        "--offline",
        "--jwks-file",
        offline["jwks"],
        "-",
        stdin=f"Bearer {token}\n",
    )
    assert result.returncode == 0, result.stderr
    assert '"naxslabs-admins"' in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check-token", *AUTH, "--offline"], "--offline needs --jwks-file"),
        (["check-token", "--oidc-issuer-url", ISS, "tok"], "--oidc-client-id"),
        (
            ["check-token", *AUTH, "--authentication-config", "/nonexistent", "tok"],
            "mutually exclusive",
        ),
        (
            [
                "check-token",
                "--oidc-issuer-url",
                "http://idp.example.test",
                "--oidc-client-id",
                "k",
                "tok",
            ],
            "https",
        ),
        (["check-token", *AUTH, "--oidc-signing-algs", "HS256", "tok"], "HS256"),
    ],
    ids=[
        "offline-without-jwks",
        "issuer-without-client",
        "both-forms",
        "plain-http",
        "symmetric-alg",
    ],
)
def test_usage_and_config_errors_exit_2(args: list[str], message: str) -> None:
    result = run_cli(*args, stdin="")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert message in result.stderr


@pytest.mark.slow
async def test_check_token_online_names_both_issuer_urls(issuer: FakeIssuer) -> None:
    issuer.wrong_issuer = "https://other.example.test/oauth2/default"
    token = issuer.token()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check-token", "--oidc-issuer-url", issuer.url, "--oidc-client-id", "kubernetes", token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    text = out.decode()
    # The failed fetch is worth a warning on stderr: as text, for a person.
    warned = err.decode().strip().splitlines()
    assert warned
    assert not any(line.startswith("{") for line in warned), warned
    assert "keys_unavailable" in text
    assert issuer.url in text
    assert "https://other.example.test/oauth2/default" in text


@pytest.mark.slow
async def test_sigterm_under_load_loses_no_answered_review(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """Two workers under load get SIGTERM: every answer that arrives is complete and right."""
    port = free_port()
    tokens = [
        issuer.token(sub=f"user{i}", groups=["naxslabs-admins"]) for i in range(50)
    ]
    with Proc(*webhook_args(issuer, tmp_path, port, "--workers", "2")) as proc:
        await proc.await_log("jwks keys loaded", count=2, timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", count=2, timeout=20)
        ctx = client_ssl(tmp_path)
        answered: list[str] = []
        refused = 0
        done = asyncio.Event()

        async def client(n: int) -> None:
            nonlocal refused
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx)
            ) as s:
                i = n
                while not done.is_set():
                    token = tokens[i % len(tokens)]
                    i += 1
                    try:
                        async with s.post(
                            f"https://127.0.0.1:{port}/authenticate",
                            json=review_body(token),
                        ) as r:
                            text = await r.text()
                    except (aiohttp.ClientError, OSError):
                        refused += (
                            1  # the listener is closed: a refusal, never a wrong answer
                        )
                        await asyncio.sleep(0.02)
                        continue
                    assert r.status == 200, text
                    review = parse_review(text)
                    assert review.status.authenticated is True
                    assert review.status.user.username.endswith(
                        f"#user{(i - 1) % len(tokens)}"
                    )
                    answered.append(review.status.user.username)

        clients = [asyncio.create_task(client(n)) for n in range(16)]
        # Load first (however long a loaded machine takes), then SIGTERM.
        await wait_until(
            lambda: len(answered) > 50, timeout=30, what="50 reviews answered"
        )
        before = len(answered)
        proc.popen.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.popen.wait, 30)
        await wait_until(
            lambda: refused > 0, timeout=20, what="a request refused after exit"
        )
        done.set()
        await asyncio.wait_for(asyncio.gather(*clients), 20)
        assert rc == 0
        assert before > 50, "there was load when SIGTERM arrived"
        assert refused > 0, "after SIGTERM new requests were refused"
