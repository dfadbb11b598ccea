"""The generators through the real command line: kubeconfig webhook|user, apiserver-flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trustme
import yaml

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
    exec_ = yaml.safe_load(user.stdout)["users"][0]["user"]["exec"]
    assert exec_["command"] == "kubectl"
    assert exec_["args"][:2] == ["oidc-login", "get-token"]
    assert f"--oidc-issuer-url={ISS}" in exec_["args"]
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
