"""Part 1: ``kube-oidc-gate check-token`` on real ID tokens from the provider.

The article's advice is to look at the token before touching the API server;
``check-token`` is that step with the API server's own rules. It runs here as
the installed command, with the article's four flags.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.e2e.harness import ADMINS, CLIENT_ID, GATE, OTHER_CLIENT_ID, OktaProvider
from tests.e2e.support import article_flags, id_token

pytestmark = pytest.mark.e2e


async def check_token(tmp_path: Path, token: str, flags: list[str]) -> tuple[int, str]:
    token_file = tmp_path / "id_token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    proc = await asyncio.create_subprocess_exec(
        str(GATE),
        "check-token",
        *flags,
        f"--token-file={token_file}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    assert token not in out.decode() + err.decode(), "the token must never be printed"
    return proc.returncode, out.decode()


def _accepted_user(out: str) -> dict[str, object]:
    """The JSON user printed after the ``result: accepted`` line."""
    tail = out.split("result: accepted by issuer ", 1)[1].split("\n", 1)[1]
    user: dict[str, object] = json.loads(tail)
    return user


@pytest.mark.parametrize("username", ["alice", "bob"], ids=["alice", "bob"])
async def test_real_id_token_prints_user_and_groups(
    okta: OktaProvider, tmp_path: Path, username: str
) -> None:
    token = await id_token(okta, username)
    code, out = await check_token(tmp_path, token, article_flags(okta.issuer))
    assert code == 0, out
    assert f"result: accepted by issuer {okta.issuer}\n" in out
    user = okta.users[username]
    # No --oidc-username-prefix, claim sub: kube-apiserver's default "<issuer>#".
    assert _accepted_user(out) == {
        "username": f"{okta.issuer}#{user.sub}",
        "groups": list(user.groups),
    }


async def test_token_of_another_app_names_the_audience_mismatch(
    okta: OktaProvider, tmp_path: Path
) -> None:
    token = await id_token(okta, "alice", client_id=OTHER_CLIENT_ID)
    code, out = await check_token(tmp_path, token, article_flags(okta.issuer))
    assert code == 1, out
    assert "result: rejected (audience_mismatch)" in out
    assert f'expected one of ["{CLIENT_ID}"], got ["{OTHER_CLIENT_ID}"]' in out
    assert ADMINS in out, "the decoded claims are shown to help the person"


@pytest.mark.parametrize(
    "wrong",
    [
        "{issuer}/",
        "{origin}/oauth2/ausAnotherServer",
        "{origin}",
    ],
    ids=["trailing-slash", "other-authorization-server", "org-authorization-server"],
)
async def test_wrong_issuer_url_names_both_urls(
    okta: OktaProvider, tmp_path: Path, wrong: str
) -> None:
    token = await id_token(okta, "alice")
    origin = okta.issuer.removesuffix("/oauth2/default")
    configured = wrong.format(issuer=okta.issuer, origin=origin)
    code, out = await check_token(tmp_path, token, article_flags(configured))
    assert code == 1, out
    # Same host as the configured issuer: a near miss, explained as such
    # (kube-apiserver would only say "not mine").
    assert "result: rejected (issuer_mismatch)" in out
    assert f'the token\'s iss is "{okta.issuer}"' in out
    assert f'the configured issuer is "{configured}"' in out
