"""Kubernetes' own ``TestToken`` table, run through check-token in both forms.

The cases live in ``tests/corpus/k8s_oidc_token.json`` (see its ``notes``): the
configuration as a ``jwt[]`` entry of an ``AuthenticationConfiguration``,
converted here to ``--oidc-*`` flags where the flags can say it, the claims,
and Kubernetes' expected answer. Each case is signed with keys generated for
this run, validated by the engine ``check-token`` runs (``explain`` without the
cache) and rendered as ``check-token`` prints it; the verdict must be
Kubernetes'. A case may be ``skipped`` (with the reason), say the file form
differs ``deliberate``-ly (with the reason, also in docs/configuration.md),
or be ``pending`` on the CEL runtime (strict xfail: it must start passing when
the new runtime lands, and then the mark must go).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.authn import Authenticator
from proxy.checktoken import render
from proxy.config import (
    AuthConfig,
    add_auth_arguments,
    auth_config_from_args,
    parse_authentication_config,
)
from proxy.errors import ConfigError
from proxy.jwk import parse_jwks
from proxy.keyset import ClaimSourceClient, StaticKeySet
from tests.keygen import SigningKey

CORPUS = Path(__file__).parent / "corpus" / "k8s_oidc_token.json"
TABLE: dict[str, Any] = json.loads(CORPUS.read_text())
#: Kubernetes' ``now``: 2009-11-10T23:00:00Z; ``valid`` and ``expired`` are ±1 h.
NOW = 1257894000
TIMES = {"$valid": NOW + 3600, "$expired": NOW - 3600}
PENDING = "cel runtime (issue 20a)"


def _generate(name: str) -> Any:
    if name.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP521R1())


#: Fresh stand-ins for Kubernetes' testdata/{rsa,ecdsa}_{1,2}.pem, never committed.
PRIVATE = {n: _generate(n) for n in ("rsa_1", "rsa_2", "ecdsa_1", "ecdsa_2")}


def _key(spec: dict[str, str]) -> SigningKey:
    priv = PRIVATE[spec["key"]]
    der = priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(
        kid=hashlib.sha256(der).hexdigest(), alg=spec["alg"], private_key=priv
    )


def _fill(value: Any, url: str) -> Any:
    if isinstance(value, str):
        return TIMES.get(value, value.replace("{{.URL}}", url))
    if isinstance(value, list):
        return [_fill(v, url) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, url) for k, v in value.items()}
    return value


def _sign(spec: dict[str, str], claims: dict[str, Any]) -> str:
    key = _key(spec)
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid}
    )


# --- the two configuration forms -----------------------------------------------


def _uses_cel(config: dict[str, Any]) -> bool:
    m = config["claimMappings"]
    return (
        any("expression" in (m.get(k) or {}) for k in ("username", "groups", "uid"))
        or bool(m.get("extra"))
        or bool(config.get("userValidationRules"))
        or any("expression" in r for r in config.get("claimValidationRules", []))
    )


def forms_of(case: dict[str, Any]) -> list[str]:
    """Where the case applies: the file always, flags when they can say it."""
    if "forms" in case:
        return list(case["forms"])
    config = case["config"]
    flags_ok = (
        not _uses_cel(config)
        and "uid" not in config["claimMappings"]
        and len(config["issuer"]["audiences"]) == 1
    )
    return ["file", "flags"] if flags_ok else ["file"]


def file_config(config: dict[str, Any], ca_pem: str | None) -> AuthConfig:
    jwt_entry = json.loads(json.dumps(config))
    if ca_pem is not None:
        jwt_entry["issuer"]["certificateAuthority"] = ca_pem
    doc = {
        "apiVersion": "apiserver.config.k8s.io/v1beta1",
        "kind": "AuthenticationConfiguration",
        "jwt": [jwt_entry],
    }
    return parse_authentication_config(json.dumps(doc), source="k8s-case")


def flags_config(
    config: dict[str, Any], algs: list[str] | None, ca_file: Path | None
) -> AuthConfig:
    issuer, m = config["issuer"], config["claimMappings"]
    argv = [
        "--oidc-issuer-url",
        issuer["url"],
        "--oidc-client-id",
        issuer["audiences"][0],
    ]
    username = m["username"]
    if "claim" in username:
        argv += ["--oidc-username-claim", username["claim"]]
    argv += ["--oidc-username-prefix", username.get("prefix") or "-"]
    if "groups" in m:
        argv += ["--oidc-groups-claim", m["groups"]["claim"]]
        if m["groups"].get("prefix"):
            argv += ["--oidc-groups-prefix", m["groups"]["prefix"]]
    for rule in config.get("claimValidationRules", []):
        argv += ["--oidc-required-claim", f"{rule['claim']}={rule['requiredValue']}"]
    if algs:
        argv += ["--oidc-signing-algs", ",".join(algs)]
    if ca_file is not None:
        argv += ["--oidc-ca-file", str(ca_file)]
    parser = argparse.ArgumentParser(prog="kube-oidc-gate")
    add_auth_arguments(parser)
    built = auth_config_from_args(parser.parse_args(argv))
    assert built is not None
    return built


# --- the local HTTPS claim source (Kubernetes' newClaimServer) ----------------------


@dataclass
class ClaimServer:
    url: str = ""
    ca_pem: str = ""
    responses: dict[str, Any] = field(default_factory=dict)
    signing: dict[str, str] = field(default_factory=dict)
    bearers: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def server(ca: trustme.CA) -> AsyncIterator[ClaimServer]:
    state = ClaimServer(ca_pem=ca.cert_pem.bytes().decode())

    async def answer(request: web.Request) -> web.StreamResponse:
        claim = request.match_info["claim"]
        state.bearers.append((claim, request.headers.get("Authorization")))
        if claim not in state.responses:
            return web.Response(status=404)
        body = _fill(state.responses[claim], state.url)
        return web.Response(text=_sign(state.signing, body))

    app = web.Application()
    app.router.add_get("/{claim}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"https://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


# --- the parametrisation ------------------------------------------------------------


def _params() -> Iterator[Any]:
    for case in TABLE["cases"]:
        for form in forms_of(case):
            marks: list[Any] = []
            if "skipped" in case:
                marks.append(pytest.mark.skip(reason=case["skipped"]))
            pending = case.get("pending", {})
            if form in pending:
                marks.append(pytest.mark.xfail(reason=pending[form], strict=True))
            yield pytest.param(case, form, id=f"{case['name']}[{form}]", marks=marks)


def expected(case: dict[str, Any], form: str) -> dict[str, Any]:
    """Kubernetes' answer, or ours where the file form differs on purpose."""
    if form == "file" and "fileForm" in case:
        override: dict[str, Any] = case["fileForm"]
        deliberate = override.get("deliberate")
        if deliberate is not None:
            assert deliberate["why"], case["name"]
            return {"reason": deliberate["reason"]}
        return dict(override["want"])
    return dict(case["want"])


@pytest.mark.slow
@pytest.mark.parametrize(("case", "form"), list(_params()))
async def test_kubernetes_token_case(
    case: dict[str, Any], form: str, server: ClaimServer, tmp_path: Path
) -> None:
    distributed = "{{.URL}}" in json.dumps(case["config"])
    url = server.url
    config_data = _fill(case["config"], url)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(server.ca_pem)
    want = expected(case, form)

    def load() -> AuthConfig:
        if form == "file":
            return file_config(config_data, server.ca_pem if distributed else None)
        return flags_config(
            config_data, case.get("signingAlgs"), ca_file if distributed else None
        )

    if "initError" in want:
        with pytest.raises(ConfigError, match=re.escape(want["problem"])):
            load()
        return
    config = load()

    server.responses = case.get("claimResponses", {})
    server.signing = case["signingKey"]
    keys = parse_jwks(
        {"keys": [_key(k).public_jwk for k in case["pubKeys"]]}, issuer=url
    )[0]
    token = _sign(case["signingKey"], _fill(case["claims"], url))
    async with aiohttp.ClientSession() as session:
        authenticator = Authenticator(
            config,
            {a.issuer.url: StaticKeySet(keys) for a in config.authenticators},
            clock=lambda: float(NOW),
            claim_sources=ClaimSourceClient(session),
        )
        verdict = await authenticator.explain(token)
    out = io.StringIO()
    code = render(verdict, now=NOW, out=out)
    text = out.getvalue()

    if "user" in want:
        assert code == 0, text
        assert verdict.user is not None
        got = verdict.user.to_dict()
        wanted = want["user"]
        assert got["username"] == wanted["username"], text
        assert list(got.get("groups", [])) == wanted.get("groups", []), text
        assert got.get("uid", "") == wanted.get("uid", ""), text
        assert {k: list(v) for k, v in (got.get("extra") or {}).items()} == (
            wanted.get("extra", {})
        ), text
    elif want.get("skip"):
        assert code == 1
        assert "result: rejected (not_mine)" in text, text
    else:
        assert code == 1, text
        assert f"result: rejected ({want['reason']})" in text, text
    for claim, bearer in server.bearers:
        assert bearer == f"Bearer {claim}_token"


def test_every_case_is_accounted_for() -> None:
    """Counts for the closing note; and nothing silently dropped."""
    names = [c["name"] for c in TABLE["cases"]]
    assert len(names) == len(set(names)) == 61
    for case in TABLE["cases"]:
        assert "want" in case
        for form, reason in case.get("pending", {}).items():
            assert form in forms_of(case)
            assert reason == PENDING


def test_no_key_material_is_committed() -> None:
    text = CORPUS.read_text()
    assert "PRIVATE KEY" not in text
    assert '"d"' not in text
