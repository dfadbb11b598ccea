"""Groups beyond the token: Okta's API through a real loopback stand-in (TLS, real keys).

The stand-in (``tests.fakes.okta``) follows Okta's documented shapes: pages of
200 with ``Link`` headers, ``SSWS`` and bearer/DPoP checks, ``private_key_jwt``
validated as Okta does, 429 with reset headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from proxy import errors
from proxy.authn import Authenticator
from proxy.checktoken import check_token
from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    KeySetSettings,
    OktaGroupsConfig,
    PrefixedClaimOrExpression,
)
from proxy.metrics import Metrics
from proxy.oktaapi import OktaApiClient, next_link
from proxy.oktagroups import OktaGroups
from proxy.upstream import Upstream, UpstreamSettings
from tests.e2e.test_okta_kubectl import rbac_middleware
from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import WHOAMI, run_proxy, upstream_kubeconfig
from tests.fakes.issuer import FakeIssuer
from tests.fakes.okta import FakeOkta, serve_okta
from tests.helpers import ISSUER, DictResolver
from tests.keygen import claims_for, new_key, sign
from tests.proc import Proc
from tests.support.running_webhook import parse_review, review_body, running_webhook
from tests.test_cli_webhook import client_ssl, free_port, webhook_args

KEY = new_key("RS256")
CLIENT_ID = "kubernetes"
ALL = [f"group-{i:03d}" for i in range(250)]
USER = "00u1alice"


@pytest.fixture(scope="module")
def okta_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def okta(okta_ca: trustme.CA) -> AsyncIterator[FakeOkta]:
    async with serve_okta(okta_ca) as fake:
        fake.add_user(USER, ALL)
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def credentials(okta: FakeOkta, tmp_path: Path, mode: str) -> dict[str, Any]:
    """Write the secret file(s) of ``mode`` and register the app with the stand-in."""
    if mode == "ssws":
        path = tmp_path / "okta-token"
        path.write_text(okta.api_token + "\n")
        return {"api_token_file": str(path)}
    path = tmp_path / "okta-key"
    if mode == "app-ec-jwk":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(ec_key))
        jwk["kid"] = okta.client_kid = "kid-ec-1"
        path.write_text(json.dumps(jwk))
        okta.client_public_key = ec_key.public_key()
    else:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(_pem(rsa_key))
        okta.client_public_key = rsa_key.public_key()
    okta.require_dpop = mode != "app-bearer"
    return {
        "client_id": okta.client_id,
        "private_key_file": str(path),
        "dpop": okta.require_dpop,
    }


def okta_config(
    okta: FakeOkta,
    tmp_path: Path,
    mode: str = "ssws",
    *,
    issuer: str = ISSUER,
    ca_pem: str | None = None,
    prefix: str = "oidc:",
    **settings: Any,
) -> AuthConfig:
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=issuer,
                    audiences=(CLIENT_ID,),
                    certificate_authority=ca_pem or okta.ca_pem,
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(claim="sub", prefix="oidc:"),
                    groups=PrefixedClaimOrExpression(claim="groups", prefix=prefix),
                ),
            ),
        ),
        keyset=KeySetSettings(retry_min=0.05, retry_max=0.2, fetch_timeout=2.0),
        okta=OktaGroupsConfig(
            issuers=(issuer,),
            org_url=okta.url,
            **credentials(okta, tmp_path, mode),
            **settings,
        ),
    )


def engine(
    config: AuthConfig, session: aiohttp.ClientSession, metrics: Metrics | None = None
) -> Authenticator:
    assert config.okta is not None
    client = OktaApiClient(session, config, metrics=metrics)
    return Authenticator(
        config,
        {ISSUER: DictResolver(KEY)},
        metrics=metrics,
        okta_groups=OktaGroups(config.okta, client, metrics=metrics),
    )


_SERIAL = iter(range(10**9))


def token(groups: list[str] | None, sub: str = USER) -> str:
    extra: dict[str, Any] = {"n": next(_SERIAL)}  # a new token each time
    if groups is not None:
        extra["groups"] = groups
    return sign(KEY, claims_for(ISSUER, CLIENT_ID, sub=sub, **extra))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    metrics.flush()
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- pure pieces ------------------------------------------------------------------

LINKS = [
    ("next-after-self", ['<https://o/a?limit=2>; rel="self"', '<https://o/b>; rel="next"'], "https://o/b"),
    ("one-header", ['<https://o/a>; rel="self", <https://o/c>; rel="next"'], "https://o/c"),
    ("unquoted-rel", ["<https://o/d>; rel=next"], "https://o/d"),
    ("last-page", ['<https://o/a>; rel="self"'], None),
    ("none", [], None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "want"), [c[1:] for c in LINKS], ids=[c[0] for c in LINKS]
)
def test_next_link(values: list[str], want: str | None) -> None:
    assert next_link(values) == want


# --- through the stand-in ---------------------------------------------------------

MODES = ["ssws", "app-rsa-pem-dpop", "app-ec-jwk", "app-bearer"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_capped_claim_is_replaced_by_every_group(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession, mode: str
) -> None:
    metrics = Metrics()
    authn = engine(okta_config(okta, tmp_path, mode), session, metrics)
    user = await authn.authenticate(token(ALL[:100]))
    assert user is not None
    assert list(user.groups) == [f"oidc:{g}" for g in ALL]
    assert okta.counts["served"] == 2, "250 groups are two pages of 200"
    assert sample(metrics, "kube_oidc_gate_okta_api_group_pages_total") == 2
    want_token_calls = {"ssws": 0, "app-bearer": 1}.get(mode, 2)  # 2: DPoP nonce
    assert okta.counts["token"] == want_token_calls
    assert [e for e in okta.errors if not e.startswith("use_dpop_nonce")] == []
    # The access token is reused for the next user.
    okta.add_user("00u2bob", ["x"])
    bob = await authn.authenticate(token(None, sub="00u2bob"))
    assert bob is not None
    assert bob.groups == ("oidc:x",)
    assert okta.counts["token"] == want_token_calls
    ok = sample(
        metrics,
        "kube_oidc_gate_okta_api_requests_total",
        endpoint="groups",
        result="ok",
    )
    assert ok == 3


CASES = [
    # id, token's groups (None: no claim), filter, fetched?, expected (raw)
    ("minified-token", None, ".*", True, ALL),
    ("at-cap", ALL[:100], ".*", True, ALL),
    ("under-cap", ["a", "b"], ".*", False, ["a", "b"]),
    ("filter", ALL[:100], "group-2[0-9]{2}", True, ALL[200:]),
    ("filter-keeps-none", None, "admins", True, []),
]


@pytest.mark.parametrize(
    ("groups", "regex", "fetched", "want"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_when_and_what_is_fetched(
    okta: FakeOkta,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    groups: list[str] | None,
    regex: str,
    fetched: bool,
    want: list[str],
) -> None:
    authn = engine(okta_config(okta, tmp_path, filter=regex), session)
    user = await authn.authenticate(token(groups))
    assert user is not None
    assert list(user.groups) == [f"oidc:{g}" for g in want]
    assert (okta.counts["groups"] > 0) is fetched


async def test_api_down_fails_closed_unless_cached(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    authn = engine(okta_config(okta, tmp_path), session)
    assert await authn.authenticate(token(ALL[:100])) is not None
    okta.down = True
    # Cached for this user: a new token of theirs still gets every group.
    user = await authn.authenticate(token(ALL[:100]))
    assert user is not None
    assert len(user.groups) == 250
    okta.add_user("00u3carol", ALL)
    with pytest.raises(errors.GroupsUnavailable) as caught:
        await authn.authenticate(token(ALL[:100], sub="00u3carol"))
    assert caught.value.temporary
    assert caught.value.reason == "groups_unavailable"
    assert "503" in str(caught.value)
    assert okta.api_token not in str(caught.value)
    # Temporary refusals are not remembered: the API back, the same token passes.
    tok = token(None, sub="00u3carol")
    with pytest.raises(errors.GroupsUnavailable):
        await authn.authenticate(tok)
    okta.down = False
    assert await authn.authenticate(tok) is not None


@pytest.mark.slow
async def test_rate_limit_waits_for_the_reset_within_the_deadline(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    authn = engine(okta_config(okta, tmp_path, timeout=5.0), session)
    okta.throttle(1, reset_in=0.5)
    started = time.monotonic()
    user = await authn.authenticate(token(None))
    assert user is not None
    assert len(user.groups) == 250
    assert okta.counts["throttled"] == 1
    assert time.monotonic() - started >= 0.3


async def test_rate_limit_past_the_deadline_refuses_at_once(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    authn = engine(okta_config(okta, tmp_path, timeout=3.0), session)
    okta.throttle(5, reset_in=30)
    started = time.monotonic()
    with pytest.raises(errors.GroupsUnavailable, match="rate limited"):
        await authn.authenticate(token(None))
    assert time.monotonic() - started < 2.0
    # The next request does not hammer Okta before the reset either.
    okta.add_user("00u4dan", ["x"])
    with pytest.raises(errors.GroupsUnavailable, match="rate limited"):
        await authn.authenticate(token(None, sub="00u4dan"))
    assert okta.counts["throttled"] == 1


async def test_single_flight_per_user(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    metrics = Metrics()
    authn = engine(okta_config(okta, tmp_path), session, metrics)
    users = await asyncio.gather(*(authn.authenticate(token(None)) for _ in range(10)))
    assert all(u is not None and len(u.groups) == 250 for u in users)
    assert okta.counts["groups"] == 2, "one fetch of two pages for ten reviews"
    cache = "kube_oidc_gate_okta_groups_cache_requests_total"
    assert sample(metrics, cache, outcome="miss") == 1
    assert sample(metrics, cache, outcome="shared") == 9
    await authn.authenticate(token(None))
    assert sample(metrics, cache, outcome="hit") == 1


async def test_a_removed_membership_drops_the_users_fetched_groups(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Okta's group.user_membership.remove event (issue 22): fetched again at once."""
    okta.add_user("00u1someoneelse", ["other-team"])
    metrics = Metrics()
    authn = engine(okta_config(okta, tmp_path), session, metrics)
    assert await authn.authenticate(token(None)) is not None
    assert await authn.authenticate(token(None, sub="00u1someoneelse")) is not None
    fetches = okta.counts["groups"]
    authn.forget_subject(None, USER)
    assert await authn.authenticate(token(None)) is not None
    assert await authn.authenticate(token(None, sub="00u1someoneelse")) is not None
    cache = "kube_oidc_gate_okta_groups_cache_requests_total"
    assert okta.counts["groups"] == fetches + 2, "the user's two pages, again"
    assert sample(metrics, cache, outcome="hit") == 1, "the other user's groups stay"


async def test_secret_file_is_reread_when_it_changes(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = okta_config(okta, tmp_path)
    authn = engine(config, session)
    assert await authn.authenticate(token(None)) is not None
    assert config.okta is not None
    assert config.okta.api_token_file is not None
    path = config.okta.api_token_file
    okta.api_token = "00rotated-token"
    with open(path, "w") as f:
        f.write(okta.api_token)
    later = time.time_ns() + 2_000_000_000
    os.utime(path, ns=(later, later))
    okta.add_user("00u5erin", ["x"])
    user = await authn.authenticate(token(None, sub="00u5erin"))
    assert user is not None
    assert user.groups == ("oidc:x",)
    assert okta.counts["unauthorized"] == 0


REFUSALS = [
    ("unregistered-key", "app-rsa-pem-dpop", "http 401"),
    ("unknown-user", "ssws", "404"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "needle"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
async def test_refusals(
    okta: FakeOkta,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    mode: str,
    needle: str,
) -> None:
    config = okta_config(okta, tmp_path, mode)
    if mode.startswith("app"):
        # A key Okta does not know signs the client assertion.
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        okta.client_public_key = other.public_key()
    sub = USER if mode.startswith("app") else "00u9nobody"
    with pytest.raises(errors.GroupsUnavailable, match=needle) as caught:
        await engine(config, session).authenticate(token(None, sub=sub))
    text = str(caught.value) + repr(caught.value)
    assert okta.api_token not in text
    assert "PRIVATE KEY" not in text


async def test_offline_refuses_a_capped_claim(okta: FakeOkta, tmp_path: Path) -> None:
    config = okta_config(okta, tmp_path)
    authn = Authenticator(config, {ISSUER: DictResolver(KEY)})
    with pytest.raises(errors.GroupsUnavailable, match="offline"):
        await authn.authenticate(token(ALL[:100]))
    assert await authn.authenticate(token(["a"])) is not None


# --- both front ends and check-token ----------------------------------------------


@pytest.mark.slow
async def test_webhook_gives_every_group_and_503_when_okta_is_down(
    okta: FakeOkta, tls_issuer: FakeIssuer, issuer_ca: trustme.CA, tmp_path: Path
) -> None:
    async with serve_okta(issuer_ca) as org:
        org.add_user(USER, ALL)
        config = okta_config(
            org, tmp_path, issuer=tls_issuer.url, ca_pem=tls_issuer.ca_pem, prefix=""
        )
        async with running_webhook(config, tmp_path) as hook:
            tok = tls_issuer.token(sub=USER, groups=ALL[:100])
            review = await hook.review(tok)
            assert review.status.authenticated is True
            assert review.status.user.groups == ALL
            org.down = True
            org.add_user("00u6fay", ALL)
            status, text, headers = await hook.post(
                review_body(tls_issuer.token(sub="00u6fay", groups=ALL[:100]))
            )
            assert status == 503, text
            assert "Retry-After" in headers
            refused = sample(
                hook.metrics,
                "kube_oidc_gate_authentications_total",
                result="error",
                reason="groups_unavailable",
            )
            assert refused == 1


async def test_proxy_impersonates_groups_beyond_the_first_100(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The fake API server sees ``Impersonate-Group`` for group 150: what an
    RBAC binding to a group beyond the first 100 needs (no real RBAC here).
    """
    authn = engine(okta_config(okta, tmp_path), session)
    async with run_proxy(tmp_path, trustme.CA(), authenticator=authn) as stack:
        headers = {"Authorization": f"Bearer {token(ALL[:100])}"}
        async with stack.client.post(f"{stack.url}{WHOAMI}", headers=headers) as r:
            assert r.status < 400, await r.text()
        seen = stack.fake.requests[-1]
        groups = seen.headers.getall("Impersonate-Group")
        assert "oidc:group-150" in groups
        assert len(groups) == 250


@pytest.mark.slow
async def test_check_token_says_where_each_group_came_from(
    tls_issuer: FakeIssuer, issuer_ca: trustme.CA, tmp_path: Path
) -> None:
    async with serve_okta(issuer_ca) as org:
        org.add_user(USER, ALL[1:])
        config = okta_config(
            org, tmp_path, issuer=tls_issuer.url, ca_pem=tls_issuer.ca_pem
        )
        out = io.StringIO()
        tok = tls_issuer.token(sub=USER, groups=ALL[:100])
        assert await check_token(config, tok, out=out) == 0
        text = out.getvalue()
        assert f"groups from: Okta's API at {org.url} (249 groups" in text
        assert "  group-001: token, okta api\n" in text
        assert "  group-150: okta api\n" in text
        assert "  group-000: token only, dropped" in text
        assert org.api_token not in text

        out = io.StringIO()
        assert (
            await check_token(config, tls_issuer.token(sub=USER, groups=["a"]), out=out)
            == 0
        )
        assert 'groups from: the token\'s "groups" claim (1 entries' in out.getvalue()


@pytest.mark.slow
async def test_two_workers_fetch_from_the_stand_in(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    async with serve_okta() as org:  # plain http on loopback, like ``issuer``
        org.add_user(USER, ALL)
        secret = tmp_path / "okta-token"
        secret.write_text(org.api_token)
        port = free_port()
        args = webhook_args(
            issuer, tmp_path, port, "--workers", "2",
            "--okta-groups-api-token-file", str(secret),
            "--okta-org-url", org.url,
        )  # fmt: skip
        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            ctx = client_ssl(tmp_path)
            answered = 0
            for _ in range(40):
                async with (
                    aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
                    ) as s,
                    s.post(
                        f"https://127.0.0.1:{port}/authenticate",
                        json=review_body(issuer.token(sub=USER, groups=ALL[:100])),
                    ) as r,
                ):
                    if r.status == 503:
                        await asyncio.sleep(0.05)
                        continue
                    review = parse_review(await r.text())
                    assert review.status.user.groups == ALL
                    answered += 1
            assert answered >= 10
            # Each worker has its own cache: at most one fetch (two pages) each.
            assert 2 <= org.counts["served"] <= 4
            logs = "".join(proc.stderr) + json.dumps(proc.logs())
            assert org.api_token not in logs


# --- configuration ----------------------------------------------------------------

OIDC = [
    "--oidc-issuer-url",
    "https://acme.okta.com/oauth2/default",
    "--oidc-client-id",
    "k",
]


def _argv(tmp_path: Path, *extra: str, groups: bool = True) -> list[str]:
    token_file = tmp_path / "token"
    token_file.write_text("00abc\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "bad-key").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "key.pem").write_bytes(_pem(key))
    out = [*OIDC, *(["--oidc-groups-claim", "groups"] if groups else [])]
    return out + [a.replace("DIR", str(tmp_path)) for a in extra]


@pytest.mark.slow
def test_flags_build_the_okta_settings(tmp_path: Path) -> None:
    from tests.test_config import from_argv

    config = from_argv(
        _argv(
            tmp_path,
            "--okta-api-client-id", "0oa1", "--okta-api-private-key-file", "DIR/key.pem",
            "--okta-groups-filter", "k8s-.*", "--okta-groups-cap", "50",
            "--no-okta-api-dpop",
        )
    )  # fmt: skip
    assert config is not None
    okta = config.okta
    assert okta is not None
    assert okta.issuers == ("https://acme.okta.com/oauth2/default",)
    assert okta.org_for(okta.issuers[0]) == "https://acme.okta.com"
    assert (okta.cap, okta.filter, okta.dpop, okta.cache_ttl) == (
        50,
        "k8s-.*",
        False,
        300,
    )
    assert "00abc" not in repr(config)


CONFIG_BAD = [
    ("both-credentials", ["--okta-groups-api-token-file", "DIR/token", "--okta-api-client-id", "x", "--okta-api-private-key-file", "DIR/key.pem"], "mutually exclusive"),
    ("client-without-key", ["--okta-api-client-id", "x"], "requires --okta-api-private-key-file"),
    ("key-without-client", ["--okta-api-private-key-file", "DIR/key.pem"], "requires --okta-api-client-id"),
    ("filter-without-credentials", ["--okta-groups-filter", "x"], "requires --okta-groups-api-token-file"),
    ("bad-regex", ["--okta-groups-api-token-file", "DIR/token", "--okta-groups-filter", "("], "not a valid regex"),
    ("empty-token-file", ["--okta-groups-api-token-file", "DIR/empty"], "the file is empty"),
    ("missing-token-file", ["--okta-groups-api-token-file", "DIR/none"], "no such file"),
    ("bad-key", ["--okta-api-client-id", "x", "--okta-api-private-key-file", "DIR/bad-key"], "not an unencrypted PEM"),
    ("org-url-path", ["--okta-groups-api-token-file", "DIR/token", "--okta-org-url", "https://acme.okta.com/x"], "no path"),
    ("cap-zero", ["--okta-groups-api-token-file", "DIR/token", "--okta-groups-cap", "0"], "--okta-groups-cap"),
    ("unknown-issuer", ["--okta-groups-api-token-file", "DIR/token", "--okta-groups-issuer", "https://other"], "no such issuer"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "needle"), [c[1:] for c in CONFIG_BAD], ids=[c[0] for c in CONFIG_BAD]
)
def test_flag_problems(tmp_path: Path, extra: list[str], needle: str) -> None:
    from tests.test_config import flag_problems

    problems = flag_problems(_argv(tmp_path, *extra))
    assert any(needle in p for p in problems), problems
    assert not any("00abc" in p for p in problems)


def test_issuer_without_groups_mapping_is_refused(tmp_path: Path) -> None:
    from tests.test_config import flag_problems

    argv = _argv(tmp_path, "--okta-groups-api-token-file", "DIR/token", groups=False)
    assert any("maps no groups" in p for p in flag_problems(argv))


@pytest.mark.slow
def test_file_form_names_the_okta_issuers(tmp_path: Path) -> None:
    from tests.test_config import flag_problems, from_argv

    entry = (
        "- issuer: {{url: {url}, audiences: [k]}}\n"
        "  claimMappings:\n"
        "    username: {{claim: sub, prefix: 'oidc:'}}\n"
        "    groups: {{claim: groups, prefix: 'oidc:'}}\n"
    )
    path = tmp_path / "auth.yaml"
    path.write_text(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: AuthenticationConfiguration\n"
        "jwt:\n"
        + entry.format(url="https://acme.okta.com")
        + entry.format(url="https://other.example.com")
    )
    _argv(tmp_path)
    base = ["--authentication-config", str(path)]
    creds = ["--okta-groups-api-token-file", str(tmp_path / "token")]
    problems = flag_problems([*base, *creds])
    assert any("--okta-groups-issuer" in p for p in problems), problems
    config = from_argv([*base, *creds, "--okta-groups-issuer", "https://acme.okta.com"])
    assert config is not None
    assert config.okta is not None
    assert config.okta.issuers == ("https://acme.okta.com",)


#: A ClusterRoleBinding to a group beyond the 100 a capped token carries.
BINDING_BEYOND_100 = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: pod-reader
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: group-150-reads-pods
subjects:
- kind: Group
  name: oidc:group-150
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: pod-reader
  apiGroup: rbac.authorization.k8s.io
"""


@pytest.mark.parametrize("with_okta", [True, False], ids=["okta-api", "token-only"])
async def test_an_rbac_binding_to_a_group_beyond_the_first_100_decides(
    okta: FakeOkta, tmp_path: Path, session: aiohttp.ClientSession, with_okta: bool
) -> None:
    """The API server (our fake, authorising by the RBAC manifest as the e2e
    suite does; this sandbox has no kube-apiserver) lets the user list pods
    only through group 150, which its capped token does not carry.
    """
    ca = trustme.CA()
    api = FakeAPIServer(ca)
    api.app.middlewares.append(rbac_middleware(BINDING_BEYOND_100))
    await api.start()
    try:
        config = okta_config(okta, tmp_path)
        if not with_okta:
            config = dataclasses.replace(config, okta=None)
        authn = (
            engine(config, session)
            if with_okta
            else Authenticator(config, {ISSUER: DictResolver(KEY)})
        )
        upstream = Upstream(
            UpstreamSettings(
                kubeconfig=str(
                    upstream_kubeconfig(
                        tmp_path / "upstream.kubeconfig", api.url, api.ca_pem
                    )
                )
            )
        )
        async with run_proxy(
            tmp_path, trustme.CA(), authenticator=authn, upstream=upstream
        ) as stack:
            headers = {"Authorization": f"Bearer {token(ALL[:100])}"}
            async with stack.client.get(
                f"{stack.url}/api/v1/namespaces/default/pods", headers=headers
            ) as r:
                status = r.status
                body = await r.text()
    finally:
        await api.stop()
    if with_okta:
        assert status == 200, body
    else:
        assert status == 403, body
        assert 'cannot list resource "pods"' in json.loads(body)["message"]
