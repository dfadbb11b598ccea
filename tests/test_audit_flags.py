"""The ``--audit-*`` flags of ``kube-oidc-gate proxy``: checked at start with
specific messages, and the Auditor built by the app factory (real CLI).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from proxy.cli import build_parser
from proxy.errors import ConfigError
from proxy.options.audit import audit_options_from_args, parse_duration
from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import upstream_kubeconfig
from tests.fakes.issuer import FakeIssuer
from tests.proc import Proc
from tests.test_cli_proxy import proxy_args
from tests.test_cli_webhook import free_port

POLICY = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: Metadata\n"


def options(*flags: str) -> object:
    ns = build_parser().parse_args(["proxy", *flags])
    return audit_options_from_args(ns)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_no_audit_flags_means_no_auditor() -> None:
    assert options() is None


def test_defaults_are_kube_apiservers(policy: Path) -> None:
    got = options("--audit-policy-file", str(policy), "--audit-log-path", "-")
    assert got is not None
    assert got.log_path == "-"  # type: ignore[attr-defined]
    assert got.log_max_size_mb == 0  # type: ignore[attr-defined]
    assert got.webhook_batch_max_size == 400  # type: ignore[attr-defined]
    assert got.webhook_batch_max_wait == 30.0  # type: ignore[attr-defined]
    assert got.webhook_initial_backoff == 10.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("flags", "wanted"),
    [
        (["--audit-log-path", "-"], "--audit-log-path needs --audit-policy-file"),
        (
            ["--audit-policy-file", "{policy}"],
            "--audit-policy-file needs --audit-log-path",
        ),
        (
            [
                "--audit-policy-file",
                "{policy}",
                "--audit-log-path",
                "-",
                "--audit-log-maxage",
                "-1",
            ],
            "--audit-log-maxage -1 can't be a negative number",
        ),
        (
            [
                "--audit-policy-file",
                "{policy}",
                "--audit-log-path",
                "-",
                "--audit-webhook-batch-max-size",
                "0",
            ],
            "--audit-webhook-batch-max-size must be >= 1",
        ),
        (
            [
                "--audit-policy-file",
                "{policy}",
                "--audit-log-path",
                "-",
                "--audit-webhook-initial-backoff",
                "0s",
            ],
            "--audit-webhook-initial-backoff must be > 0",
        ),
        (
            [
                "--audit-policy-file",
                "{policy}",
                "--audit-log-path",
                "{tmp}/audit.log",
                "--workers",
                "2",
            ],
            "cannot be shared by --workers 2 processes",
        ),
        (
            ["--audit-policy-file", "{policy}", "--audit-log-path", "{tmp}"],
            "is a directory",
        ),
        (
            [
                "--audit-policy-file",
                "{policy}",
                "--audit-webhook-config-file",
                "{tmp}/none.yaml",
            ],
            'audit: --audit-webhook-config-file "',
        ),
        (
            ["--audit-policy-file", "{tmp}/none.yaml", "--audit-log-path", "-"],
            "audit: --audit-policy-file",
        ),
    ],
    ids=[
        "backend-without-policy",
        "policy-without-backend",
        "negative-maxage",
        "zero-batch",
        "zero-backoff",
        "file-with-workers",
        "directory",
        "missing-webhook-config",
        "missing-policy",
    ],
)
def test_bad_audit_flags_are_refused_with_specific_messages(
    tmp_path: Path, policy: Path, flags: list[str], wanted: str
) -> None:
    args = [f.format(policy=policy, tmp=tmp_path) for f in flags]
    with pytest.raises(ConfigError) as caught:
        options(*args)
    assert any(wanted in p for p in caught.value.problems), caught.value.problems
    assert all(p.startswith("audit: ") for p in caught.value.problems)


def test_every_problem_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: X\n")
    with pytest.raises(ConfigError) as caught:
        options(
            "--audit-policy-file", str(bad),
            "--audit-log-path", "-",
            "--audit-log-maxsize", "-5",
        )  # fmt: skip
    assert len(caught.value.problems) == 2


# --------------------------------------------------------------------------
# The real command


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_the_proxy_command_builds_its_auditor_at_start(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path, policy: Path
) -> None:
    """The app factory starts the audit log (file created 0600 before the
    listener serves) and closes it on SIGTERM."""
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", apiserver.url, apiserver.ca_pem
    )
    log = tmp_path / "audit" / "audit.log"
    args = proxy_args(
        issuer,
        upstream,
        tmp_path,
        free_port(),
        "--audit-policy-file", str(policy),
        "--audit-log-path", str(log),
        "--audit-log-maxsize", "10",
    )  # fmt: skip
    with Proc(*args) as proc:
        await proc.await_log("serving", timeout=30)
        assert log.exists()
        assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
        proc.popen.terminate()
        assert await asyncio.to_thread(proc.popen.wait, 20) == 0


async def test_the_proxy_command_refuses_bad_audit_flags(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", "https://127.0.0.1:1", b"unused"
    )
    args = proxy_args(issuer, upstream, tmp_path, free_port(), "--audit-log-path", "-")
    with Proc(*args) as proc:
        rc = await asyncio.to_thread(proc.popen.wait, 30)
    assert rc == 2
    err = "".join(proc.stderr)
    assert "audit: --audit-log-path needs --audit-policy-file" in err
