"""Token introspection (RFC 7662) through real parts.

The IdP is ``tests.fakes.issuer.FakeIssuer`` over loopback TLS (a trustme
CA): its discovery document names ``introspection_endpoint`` and the endpoint
checks ``client_secret_basic``, answers ``active`` true or false, and can be
made slow or down. The engine is the one ``start_engine`` builds for both
front ends (real key sets, the real HTTP client), driven directly, through
the webhook, through the proxy and through ``check-token``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy import errors
from proxy.app import Engine, start_engine
from proxy.checktoken import check_token
from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IntrospectionClient,
    IntrospectionConfig,
    IssuerConfig,
    JWTAuthenticatorConfig,
    KeySetSettings,
    PrefixedClaimOrExpression,
    Secret,
)
from proxy.metrics import Metrics
from tests.fakes.apiserver_harness import WHOAMI, run_proxy
from tests.fakes.issuer import FakeIssuer
from tests.keygen import new_key, sign
from tests.support.running_webhook import review_body, running_webhook

CLIENT_ID = "gate-introspector"
SECRET = "s3cr:et+/="  # characters that client_secret_basic must form-encode
USER = "00u1alice"


def config_for(
    issuer: FakeIssuer, *, secret: str = SECRET, **settings: Any
) -> AuthConfig:
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=issuer.url,
                    audiences=("kubernetes",),
                    certificate_authority=issuer.ca_pem,
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(claim="sub", prefix="oidc:"),
                ),
            ),
        ),
        keyset=KeySetSettings(retry_min=0.05, retry_max=0.2, fetch_timeout=2.0),
        introspection=IntrospectionConfig(
            clients=(
                IntrospectionClient(
                    issuer=issuer.url, client_id=CLIENT_ID, client_secret=Secret(secret)
                ),
            ),
            **settings,
        ),
    )


@pytest.fixture
async def idp(tls_issuer: FakeIssuer) -> FakeIssuer:
    tls_issuer.enable_introspection(CLIENT_ID, SECRET)
    return tls_issuer


@asynccontextmanager
async def engine(config: AuthConfig) -> AsyncIterator[Engine]:
    started = await start_engine(config, metrics=Metrics())
    try:
        yield started
    finally:
        await started.close()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    metrics.flush()
    return metrics.registry.get_sample_value(name, labels) or 0.0


_SERIAL = iter(range(10**9))


def token(idp: FakeIssuer, **claims: Any) -> str:
    return idp.token(sub=USER, n=next(_SERIAL), **claims)


# --- through the engine -------------------------------------------------------------


@pytest.mark.slow
async def test_active_token_is_accepted_with_client_secret_basic(
    idp: FakeIssuer,
) -> None:
    async with engine(config_for(idp)) as eng:
        user = await eng.authenticator.authenticate(token(idp))
        assert user is not None
        assert user.username == "oidc:" + USER
    assert idp.counts["introspect"] == 1
    assert idp.introspected == ["id_token"]


@pytest.mark.slow
async def test_revoked_token_is_refused_within_the_ttl(idp: FakeIssuer) -> None:
    """The acceptance is cached (success TTL 300 s), yet the revocation is
    seen once the introspection answer is older than its TTL.
    """
    ttl = 0.5
    async with engine(config_for(idp, cache_ttl=ttl)) as eng:
        authn = eng.authenticator
        tok = token(idp)
        assert await authn.authenticate(tok) is not None
        idp.revoke(tok)
        revoked_at = time.monotonic()
        assert await authn.authenticate(tok) is not None  # within the TTL: cached
        refused: errors.TokenError | None = None
        while refused is None:
            try:
                await authn.authenticate(tok)
            except errors.TokenRevoked as err:
                refused = err
            assert time.monotonic() - revoked_at < ttl + 1.0
            await asyncio.sleep(0.02)
        assert refused.reason == "revoked"
        delay = time.monotonic() - revoked_at
        assert delay <= ttl + 0.1
        # The refusal is remembered: no further call for the revoked token.
        calls = idp.counts["introspect"]
        with pytest.raises(errors.TokenRevoked):
            await authn.authenticate(tok)
        assert idp.counts["introspect"] == calls
        metrics = eng.metrics
        assert (
            sample(
                metrics,
                "kube_oidc_gate_introspection_requests_total",
                result="inactive",
            )
            == 1
        )
        assert sample(
            metrics, "kube_oidc_gate_authentications_total", result="rejected",
            reason="revoked",
        ) >= 1  # fmt: skip


@pytest.mark.slow
async def test_a_token_refused_anyway_never_reaches_the_idp(idp: FakeIssuer) -> None:
    stranger = new_key("RS256")
    async with engine(config_for(idp)) as eng:
        await eng.authenticator.authenticate(token(idp))  # keys loaded
        bad = [
            sign(stranger, {"iss": idp.url, "aud": "kubernetes", "sub": "x",
                            "exp": int(time.time()) + 60}),
            token(idp, aud="someone-else"),
            token(idp, exp=int(time.time()) - 10),
        ]  # fmt: skip
        for tok in bad:
            with pytest.raises(errors.TokenError) as excinfo:
                await eng.authenticator.authenticate(tok)
            assert excinfo.value.reason != "revoked"
    assert idp.counts["introspect"] == 1


@pytest.mark.slow
async def test_single_flight_per_token(idp: FakeIssuer) -> None:
    idp.introspection_delay = 0.2
    async with engine(config_for(idp)) as eng:
        tok = token(idp)
        users = await asyncio.gather(
            *(eng.authenticator.authenticate(tok) for _ in range(20))
        )
        assert all(u is not None for u in users)
        assert idp.counts["introspect"] == 1
        shared = sample(
            eng.metrics, "kube_oidc_gate_introspection_cache_requests_total",
            outcome="shared",
        )  # fmt: skip
        assert shared >= 1


FAILURES = [
    ("down-503", {"introspection_status": 503}, "http 503"),
    ("slow", {"introspection_delay": 3.0}, "within 0.3s"),
    ("wrong-secret", {"introspection_client": (CLIENT_ID, "other")}, "client id and secret"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("state", "needle"), [c[1:] for c in FAILURES], ids=[c[0] for c in FAILURES]
)
async def test_deny_policy_refuses_as_temporary(
    idp: FakeIssuer, state: dict[str, Any], needle: str
) -> None:
    for name, value in state.items():
        setattr(idp, name, value)
    async with engine(config_for(idp, timeout=0.3)) as eng:
        started = time.monotonic()
        with pytest.raises(errors.IntrospectionUnavailable) as excinfo:
            await eng.authenticator.authenticate(token(idp))
        assert time.monotonic() - started < 2.0
    assert excinfo.value.temporary
    assert excinfo.value.reason == "introspection_unavailable"
    assert needle in str(excinfo.value)
    assert SECRET not in str(excinfo.value)


@pytest.mark.slow
async def test_allow_cached_uses_the_last_answer_within_the_staleness(
    idp: FakeIssuer,
) -> None:
    config = config_for(
        idp,
        failure_policy="allow-cached",
        cache_ttl=0.1,
        max_staleness=0.6,
        timeout=0.3,
    )
    async with engine(config) as eng:
        authn = eng.authenticator
        tok = token(idp)
        assert await authn.authenticate(tok) is not None
        idp.introspection_status = 503
        await asyncio.sleep(0.2)  # past the TTL, within the staleness
        assert await authn.authenticate(tok) is not None
        assert sample(
            eng.metrics, "kube_oidc_gate_introspection_cache_requests_total",
            outcome="stale",
        ) == 1  # fmt: skip
        # A token never introspected has no last answer: refused.
        with pytest.raises(errors.IntrospectionUnavailable):
            await authn.authenticate(token(idp))
        await asyncio.sleep(0.5)  # past the staleness
        with pytest.raises(errors.IntrospectionUnavailable):
            await authn.authenticate(tok)
        # The endpoint is back: the first answer decides.
        idp.introspection_status = 200
        idp.revoke(tok)
        with pytest.raises(errors.TokenRevoked):
            await authn.authenticate(tok)


async def test_no_introspection_endpoint_in_discovery(idp: FakeIssuer) -> None:
    idp.introspection_client = None  # discovery no longer names it
    async with engine(config_for(idp)) as eng:
        with pytest.raises(errors.IntrospectionUnavailable) as excinfo:
            await eng.authenticator.authenticate(token(idp))
    assert "introspection_endpoint" in str(excinfo.value)


async def test_explicit_endpoint_overrides_discovery(idp: FakeIssuer) -> None:
    config = config_for(idp)
    assert config.introspection is not None
    client = dataclasses.replace(
        config.introspection.clients[0], endpoint=idp.url + "/introspect"
    )
    idp.introspection_client = None
    config = dataclasses.replace(
        config,
        introspection=dataclasses.replace(config.introspection, clients=(client,)),
    )
    idp.enable_introspection(CLIENT_ID, SECRET)  # the endpoint still answers
    async with engine(config) as eng:
        assert await eng.authenticator.authenticate(token(idp)) is not None


# --- both front ends and check-token ------------------------------------------------


@pytest.mark.slow
async def test_webhook_refuses_a_revoked_token_and_answers_503_when_down(
    idp: FakeIssuer, tmp_path: Path
) -> None:
    async with running_webhook(config_for(idp, cache_ttl=0.3), tmp_path) as hook:
        tok = token(idp)
        review = await hook.review(tok)
        assert review.status.authenticated is True
        idp.revoke(tok)
        await asyncio.sleep(0.35)
        review = await hook.review(tok)
        assert review.status.authenticated is not True
        idp.introspection_status = 503
        status, text, headers = await hook.post(review_body(token(idp)))
        assert status == 503, text
        assert "Retry-After" in headers
        assert sample(
            hook.metrics, "kube_oidc_gate_authentications_total", result="error",
            reason="introspection_unavailable",
        ) == 1  # fmt: skip


@pytest.mark.slow
async def test_proxy_refuses_a_revoked_token(idp: FakeIssuer, tmp_path: Path) -> None:
    async with (
        engine(config_for(idp, cache_ttl=0.3)) as eng,
        run_proxy(tmp_path, trustme.CA(), authenticator=eng.authenticator) as stack,
    ):
        tok = token(idp)
        headers = {"Authorization": f"Bearer {tok}"}
        async with stack.client.post(f"{stack.url}{WHOAMI}", headers=headers) as r:
            assert r.status < 400, await r.text()
        idp.revoke(tok)
        await asyncio.sleep(0.35)
        async with stack.client.post(f"{stack.url}{WHOAMI}", headers=headers) as r:
            assert r.status == 401, await r.text()


async def test_check_token_says_the_introspection_result(idp: FakeIssuer) -> None:
    config = config_for(idp)
    tok = token(idp)
    out = io.StringIO()
    assert await check_token(config, tok, out=out) == 0
    assert "introspection: active" in out.getvalue()
    idp.revoke(tok)
    out = io.StringIO()
    assert await check_token(config, tok, out=out) == 1
    text = out.getvalue()
    assert "result: rejected (revoked)" in text
    assert "hint: " in text
    assert SECRET not in text


# --- configuration -------------------------------------------------------------------

ISSUER = "https://acme.okta.com/oauth2/default"
OIDC = ["--oidc-issuer-url", ISSUER, "--oidc-client-id", "k"]


def _files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "side.yaml").write_text(
        f"issuers:\n- url: {ISSUER}\n  clientID: {CLIENT_ID}\n"
        f"  clientSecretFile: {tmp_path / 'secret'}\n"
    )
    (tmp_path / "auth.yaml").write_text(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: AuthenticationConfiguration\n"
        f"jwt:\n- issuer: {{url: {ISSUER}, audiences: [k]}}\n"
        "  claimMappings:\n    username: {claim: sub, prefix: ''}\n"
    )


def _argv(tmp_path: Path, args: list[str]) -> list[str]:
    _files(tmp_path)
    return [a.replace("DIR", str(tmp_path)) for a in args]


GOOD = [
    ("legacy-flags", [*OIDC, "--oidc-introspection-client-id", CLIENT_ID,
                      "--oidc-introspection-client-secret-file", "DIR/secret"], "deny", 30.0),
    ("side-file", ["--authentication-config", "DIR/auth.yaml", "--introspection-config",
                   "DIR/side.yaml", "--introspection-failure-policy", "allow-cached",
                   "--introspection-cache-ttl", "10"], "allow-cached", 10.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "policy", "ttl"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD]
)
def test_flags_build_the_settings(
    tmp_path: Path, args: list[str], policy: str, ttl: float
) -> None:
    from tests.test_config import from_argv

    config = from_argv(_argv(tmp_path, args))
    assert config is not None
    settings = config.introspection
    assert settings is not None
    client = settings.client_for(ISSUER)
    assert client is not None
    assert client.client_id == CLIENT_ID
    assert client.client_secret.reveal() == SECRET
    assert (settings.failure_policy, settings.cache_ttl) == (policy, ttl)
    assert SECRET not in repr(config)


BAD = [
    ("id-without-secret", [*OIDC, "--oidc-introspection-client-id", "x"], "requires --oidc-introspection-client-secret-file"),
    ("secret-without-id", [*OIDC, "--oidc-introspection-client-secret-file", "DIR/secret"], "requires --oidc-introspection-client-id"),
    ("empty-secret", [*OIDC, "--oidc-introspection-client-id", "x", "--oidc-introspection-client-secret-file", "DIR/empty"], "the file is empty"),
    ("missing-secret", [*OIDC, "--oidc-introspection-client-id", "x", "--oidc-introspection-client-secret-file", "DIR/none"], "no such file"),
    ("tuning-without-client", [*OIDC, "--introspection-cache-ttl", "5"], "requires --oidc-introspection-client-id or --introspection-config"),
    ("both-forms", [*OIDC, "--oidc-introspection-client-id", "x", "--introspection-config", "DIR/side.yaml"], "mutually exclusive"),
    ("legacy-with-file-form", ["--authentication-config", "DIR/auth.yaml", "--oidc-introspection-client-id", "x", "--oidc-introspection-client-secret-file", "DIR/secret"], "use --introspection-config"),
    ("unknown-issuer", [*OIDC[:1], "https://other.example.com", *OIDC[2:], "--introspection-config", "DIR/side.yaml"], "is not configured"),
    ("staleness-under-ttl", [*OIDC, "--introspection-config", "DIR/side.yaml", "--introspection-failure-policy", "allow-cached", "--introspection-max-staleness", "5"], "must be at least --introspection-cache-ttl"),
    ("negative-ttl", [*OIDC, "--introspection-config", "DIR/side.yaml", "--introspection-cache-ttl", "-1"], "--introspection-cache-ttl"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_flag_problems(tmp_path: Path, args: list[str], needle: str) -> None:
    from tests.test_config import flag_problems

    problems = flag_problems(_argv(tmp_path, args))
    assert any(needle in p for p in problems), problems
    assert not any(SECRET in p for p in problems)


SIDE_BAD = [
    ("not-a-list", "issuers: {}\n", '"issuers" must be a non-empty list'),
    ("other-top-level", "clients: []\n", 'one field, "issuers"'),
    ("unknown-field", f"issuers:\n- {{url: {ISSUER}, clientID: a, clientSecretFile: DIR/secret, secret: x}}\n", 'unknown field "secret"'),
    ("missing-client-id", f"issuers:\n- {{url: {ISSUER}, clientSecretFile: DIR/secret}}\n", '"clientID" is required'),
    ("http-endpoint", f"issuers:\n- {{url: {ISSUER}, clientID: a, clientSecretFile: DIR/secret, introspectionEndpoint: 'http://idp.example.com/i'}}\n", "introspectionEndpoint"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "needle"), [c[1:] for c in SIDE_BAD], ids=[c[0] for c in SIDE_BAD]
)
def test_side_file_problems(tmp_path: Path, text: str, needle: str) -> None:
    from tests.test_config import flag_problems

    argv = _argv(tmp_path, [*OIDC, "--introspection-config", "DIR/bad.yaml"])
    (tmp_path / "bad.yaml").write_text(text.replace("DIR", str(tmp_path)))
    problems = flag_problems(argv)
    assert any(needle in p for p in problems), problems
