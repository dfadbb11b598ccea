"""The generators through the real command line: kubeconfig webhook|user|proxy,
apiserver-flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.cli import build_parser
from proxy.config import parse_authentication_config
from tests.proc import ROOT

ISS = "https://example.okta.com/oauth2/default"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.slow
def test_kubeconfig_webhook_and_user(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    hook = cli(
        "kubeconfig",
        "webhook",
        "--url",
        "https://10.96.0.200:8443/authenticate",
        "--ca-file",
        str(ca_file),
    )
    assert hook.returncode == 0, hook.stderr
    doc = yaml.safe_load(hook.stdout)
    assert (
        doc["clusters"][0]["cluster"]["server"]
        == "https://10.96.0.200:8443/authenticate"
    )
    assert doc["current-context"]
    user = cli(
        "kubeconfig", "user", "--server", "https://gate.example.com:6443",
        "--oidc-issuer-url", ISS, "--oidc-client-id", "0oa1example", "--ca-file", str(ca_file),
    )  # fmt: skip
    assert user.returncode == 0, user.stderr
    doc = yaml.safe_load(user.stdout)
    assert doc["current-context"] == "oidc@gate.example.com:6443"
    exec_ = doc["users"][0]["user"]["exec"]
    assert exec_["command"] == "kubectl-oidc_login"
    assert exec_["args"][0] == "get-token"
    assert f"--oidc-issuer-url={ISS}" in exec_["args"]
    assert "kubectl krew install oidc-login" in exec_["installHint"]
    bad = cli(
        "kubeconfig",
        "webhook",
        "--url",
        "http://10.96.0.200/authenticate",
        "--ca-file",
        str(ca_file),
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ")


@pytest.mark.slow
def test_apiserver_flags_round_trip() -> None:
    flags = cli(
        "apiserver-flags", "--oidc-issuer-url", ISS, "--oidc-client-id", "0oa1example",
        "--oidc-groups-claim", "groups", "--oidc-required-claim", "hd=example.com",
    )  # fmt: skip
    assert flags.returncode == 0, flags.stderr
    lines = [line for line in flags.stdout.splitlines() if line.startswith("--")]
    assert f"--oidc-issuer-url={ISS}" in lines
    assert "--oidc-client-id=0oa1example" in lines
    assert "--oidc-groups-claim=groups" in lines
    config = cli(
        "apiserver-flags",
        "--format",
        "config",
        "--oidc-issuer-url",
        ISS,
        "--oidc-client-id",
        "0oa1example",
    )
    assert config.returncode == 0, config.stderr
    parsed = parse_authentication_config(config.stdout, source="stdout")
    assert parsed.authenticators[0].issuer.url == ISS
    assert parsed.authenticators[0].issuer.audiences == ("0oa1example",)


# ---------------------------------------------------------------------------
# kubeconfig user|webhook|proxy --help and refusals


def kubeconfig_parser(kind: str) -> argparse.ArgumentParser:
    def child(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found: argparse.ArgumentParser = action.choices[name]
                return found
        raise AssertionError(f"no subcommand {name}")

    return child(child(build_parser(), "kubeconfig"), kind)


@pytest.mark.parametrize("kind", ["user", "webhook", "proxy"])
def test_kubeconfig_help_explains_every_flag_and_its_default(kind: str) -> None:
    """Each flag says what it is for, and either that it is required or its
    default (what happens without it)."""
    for action in kubeconfig_parser(kind)._actions:
        if "--help" in action.option_strings:
            continue
        flag = action.option_strings[0]
        text = action.help or ""
        assert len(text) > 20, f"kubeconfig {kind} {flag}: no help"
        said = "Required." in text or "required unless" in text or "default" in text
        assert said, f"kubeconfig {kind} {flag}: neither required nor a default"
        if action.required:
            assert text.startswith("Required."), flag


@pytest.mark.slow
def test_kubeconfig_user_help_through_the_command() -> None:
    done = cli("kubeconfig", "user", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for expected in (
        "--oidc-issuer-url URL Required. The issuer kubelogin logs in to",
        "--oidc-client-id ID Required.",
        "--context-name NAME Name of the context and of its cluster and user "
        "entries (default: oidc@",
        "--allow-issuer-trailing-slash",
    ):
        assert expected in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        (
            ISS + "/",
            f"give --oidc-issuer-url={ISS}, or add --allow-issuer-trailing-slash",
        ),
        ("http://example.okta.com/oauth2/default", "URL scheme must be https"),
        ("https://example.okta.com/oauth2/default?x=1", "must not contain a query"),
    ],
    ids=["trailing-slash", "http", "query"],
)
def test_kubeconfig_user_refuses_an_unusable_issuer(issuer: str, expected: str) -> None:
    done = cli(
        "kubeconfig", "user", "--server", "https://gate.example.com",
        "--oidc-issuer-url", issuer, "--oidc-client-id", "0oa1example",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: config: --oidc-issuer-url: ")
    assert expected in line


@pytest.mark.slow
def test_kubeconfig_user_allows_a_loopback_http_issuer_and_a_real_slash() -> None:
    loopback = cli(
        "kubeconfig", "user", "--server", "https://gate.example.com",
        "--oidc-issuer-url", "http://127.0.0.1:5556", "--oidc-client-id", "dev",
    )  # fmt: skip
    assert loopback.returncode == 0, loopback.stderr
    auth0 = cli(
        "kubeconfig", "user", "--server", "https://gate.example.com",
        "--oidc-issuer-url", "https://tenant.auth0.com/", "--oidc-client-id", "c",
        "--allow-issuer-trailing-slash",
    )  # fmt: skip
    assert auth0.returncode == 0, auth0.stderr


@pytest.mark.slow
def test_kubeconfig_proxy_rbac_then_kubeconfig(tmp_path: Path) -> None:
    rbac = cli("kubeconfig", "proxy", "--print-rbac")
    assert rbac.returncode == 0, rbac.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rbac.stdout)]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert "kubectl -n kube-oidc-gate create token kube-oidc-gate" in rbac.stdout

    key = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "sub": "system:serviceaccount:kube-oidc-gate:kube-oidc-gate",
        "exp": int(time.time()) + 3600,
    }
    token_file = tmp_path / "proxy.token"
    token_file.write_text(jwt.encode(claims, key, algorithm="ES256") + "\n")
    made = cli(
        "kubeconfig", "proxy", "--server", "https://api.example.com:6443",
        "--token-file", str(token_file),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    doc = yaml.safe_load(made.stdout)
    assert doc["users"][0]["user"]["token"] == token_file.read_text().strip()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "kubeconfig proxy needs --server and --token-file"),
        (["--server", "https://api.example.com"], "needs --token-file;"),
        (
            ["--print-rbac", "--server", "https://api.example.com"],
            "--print-rbac prints only the RBAC objects: drop --server",
        ),
        (
            [
                "--server",
                "https://a",
                "--token-file",
                "t",
                "--authentication-config",
                "c",
            ],
            "--authentication-config is only used with --print-rbac",
        ),
    ],
    ids=["nothing", "no-token", "rbac-with-server", "config-without-rbac"],
)
def test_kubeconfig_proxy_refuses_flags_that_do_not_go_together(
    args: list[str], expected: str
) -> None:
    done = cli("kubeconfig", "proxy", *args)
    assert done.returncode == 2
    assert expected in done.stderr
