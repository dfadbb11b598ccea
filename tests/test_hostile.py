"""The hostile corpus against the engine, the webhook and check-token.

Every case is refused with its own reason, no attacker-named URL is fetched, the
issuer sees no fetch at all, and no trace of any token reaches a log line.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from proxy.authn import Authenticator
from proxy.config import IssuerConfig
from proxy.errors import TokenError
from proxy.kube import UserInfo
from tests.fakes.issuer import FakeIssuer
from tests.helpers import DictResolver, auth_config, authenticator_config
from tests.hostile import ALGS, AUDIENCE, Case, corpus
from tests.keygen import jwks, new_key
from tests.proc import ROOT
from tests.support.running_webhook import (
    issuer_auth_config,
    review_body,
    running_webhook,
    wait_ready,
)

ISSUER = "https://idp.example.test/oauth2/default"
KEY = new_key("RS256")
CASES = corpus(ISSUER, KEY)


def secrets_of(token: str) -> list[str]:
    """The pieces of a token that must never be logged (long enough to be unique)."""
    return [p for p in token.split(".") if len(p) > 16] or (
        [token] if len(token) > 16 else []
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_engine_refuses_with_the_specific_reason(
    case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    resolver = DictResolver(KEY)
    cfg = auth_config(authenticator_config(ISSUER, algs=ALGS))
    auth = Authenticator(cfg, {ISSUER: resolver})
    try:
        result: object = await auth.authenticate(case.token)
    except TokenError as err:
        result = err
    if case.reason == "ok":
        assert isinstance(result, UserInfo)
    elif case.reason == "not_mine":
        assert result is None
    else:
        assert isinstance(result, TokenError), result
        assert result.reason == case.reason, str(result)
        for piece in secrets_of(case.token):
            assert piece not in str(result)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for piece in secrets_of(case.token):
        assert piece not in logged
    if case.reason != "unknown_kid":
        assert resolver.refreshes == 0, "only an unknown kid may ask the issuer again"


@pytest.fixture(scope="module")
def offline_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "jwks.json").write_text(json.dumps(jwks(KEY)))
    for i, case in enumerate(CASES):
        (d / f"{i}.jwt").write_text(case.token)
    return d


@pytest.mark.slow
def test_check_token_names_every_reason(offline_files: Path) -> None:
    # One interpreter for the whole corpus: the CLI's main() in a loop, so the
    # cost is the checks, not 60 interpreter start-ups.
    script = (
        "import sys, io, contextlib, json\n"
        "from proxy.cli import main\n"
        "out = {}\n"
        "for path in sys.argv[3:]:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        code = main(['check-token', '--oidc-issuer-url', sys.argv[1], '--oidc-client-id', 'kubernetes',\n"
        "                     '--oidc-groups-claim', 'groups', '--oidc-signing-algs', 'RS256,PS256,ES256',\n"
        "                     '--offline', '--jwks-file', sys.argv[2],\n"
        "                     '--token-file', path])\n"
        "    out[path] = [code, buf.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    files = [str(offline_files / f"{i}.jwt") for i in range(len(CASES))]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            ISSUER,
            str(offline_files / "jwks.json"),
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for i, case in enumerate(CASES):
        code, text = results[files[i]]
        if case.reason == "ok":
            assert code == 0, (case.name, text)
            continue
        assert code == 1, (case.name, text)
        assert f"result: rejected ({case.reason})" in text, (case.name, text)
        for piece in secrets_of(case.token):
            assert piece not in text, case.name
    for piece in (p for c in CASES for p in secrets_of(c.token)):
        assert piece not in proc.stderr


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    fake = FakeIssuer(KEY, tls=trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.mark.slow
async def test_webhook_refuses_the_corpus_without_fetching(
    issuer: FakeIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cases = corpus(issuer.url, KEY)
    cfg = issuer_auth_config(issuer.url, issuer.ca_pem)
    auth = cfg.authenticators[0]
    cfg = type(cfg)(
        authenticators=(
            type(auth)(
                issuer=IssuerConfig(
                    url=issuer.url,
                    certificate_authority=issuer.ca_pem,
                    audiences=(AUDIENCE,),
                    signing_algs=ALGS,
                ),
                claim_mappings=auth.claim_mappings,
            ),
        ),
        keyset=cfg.keyset,
    )
    async with running_webhook(cfg, tmp_path) as wh:
        await wait_ready(wh.engine)
        issuer.reset_counts()
        unknown_kids = 0
        for case in cases:
            status, text, _ = await wh.post(review_body(case.token))
            if len(case.token) >= 1024 * 1024:
                # The review itself is over the body limit: refused before parsing.
                assert status == 413, case.name
                assert "larger than" in text
                continue
            assert status == 200, (case.name, text)
            answer = json.loads(text)["status"]
            if case.reason == "ok":
                assert answer["authenticated"] is True
                continue
            assert answer["authenticated"] is False, case.name
            if case.reason == "not_mine":
                assert "error" not in answer, case.name
            else:
                assert answer["error"].startswith(case.reason + ":"), (
                    case.name,
                    answer,
                )
                for piece in secrets_of(case.token):
                    assert piece not in answer["error"]
            unknown_kids += case.reason == "unknown_kid"
        assert unknown_kids >= 3
        assert issuer.counts["jwks"] <= 1, (
            "unknown kids cost at most one fetch per cooldown"
        )
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "token review" in logged
    for piece in (p for c in cases for p in secrets_of(c.token)):
        assert piece not in logged
