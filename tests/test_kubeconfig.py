"""Generated kubeconfigs and kube-apiserver settings, read back by their real readers.

The webhook kubeconfig is loaded by the ``kubernetes`` package's loader, the
user kubeconfig by the real kubectl (and compared with what the reference
article's ``kubectl config`` commands make), and the kube-apiserver settings
are parsed back with our own flag and file readers into the same config.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import jwt
import kubernetes.client
import kubernetes.config
import pytest
import trustme
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.cel import CompiledExpression
from proxy.config import (
    SUPPORTED_API_VERSIONS,
    AuthConfig,
    IssuerConfig,
    add_auth_arguments,
    auth_config_from_args,
    parse_authentication_config,
)
from proxy.devissuer import dev_auth_config
from proxy.errors import ConfigError
from proxy.kubeconfig import (
    EXEC_API_VERSION,
    KUBELOGIN_COMMAND,
    KUBELOGIN_INSTALL_HINT,
    WEBHOOK_APISERVER_FLAGS,
    apiserver_flags,
    authentication_configuration,
    default_context_name,
    proxy_kubeconfig,
    proxy_rbac,
    user_kubeconfig,
    webhook_kubeconfig,
)
from proxy.upstream import Upstream, UpstreamSettings
from tests.fakes.apiserver import serve_apiserver

KUBECTL = Path(sys.prefix) / "bin" / "kubectl"
ISSUER = "https://auth.example.com/oauth2/default"
SERVER = "https://k8s.example.com:6443"
needs_kubectl = pytest.mark.skipif(
    not KUBECTL.exists(), reason=f"no kubectl at {KUBECTL}"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class Files:
    """PEM files on disk, as the CLI flags name them."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.root = root
        self.ca = root / "ca.crt"
        ca.cert_pem.write_to_path(str(self.ca))
        leaf = ca.issue_cert("kube-apiserver")
        self.cert = root / "client.crt"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        self.key = root / "client.key"
        leaf.private_key_pem.write_to_path(str(self.key))

    def write(self, name: str, data: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> Files:
    return Files(tmp_path, ca)


def load_with_kubernetes(path: str, tmp_path: Path) -> kubernetes.client.Configuration:
    """Load ``path`` as the ``kubernetes`` client does (data files go to tmp)."""
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=path,
        client_configuration=cfg,
        temp_file_path=str(tmp_path / "loader"),
    )
    return cfg


def read(path: str | None) -> bytes:
    assert path is not None
    return Path(path).read_bytes()


def kubectl_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["HOME"] = str(home)
    return env


def kubectl(home: Path, *args: str) -> str:
    done = subprocess.run(
        [str(KUBECTL), *args],
        env=kubectl_env(home),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------
# webhook kubeconfig
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_client_cert", [True, False], ids=["mtls", "ca-only"])
def test_webhook_kubeconfig_loads_with_the_kubernetes_loader(
    files: Files, tmp_path: Path, with_client_cert: bool
) -> None:
    url = "https://kube-oidc-gate.example.com:8443/authenticate"
    text = webhook_kubeconfig(
        url=url,
        ca_file=str(files.ca),
        client_cert=str(files.cert) if with_client_cert else None,
        client_key=str(files.key) if with_client_cert else None,
    )
    path = tmp_path / "webhook.kubeconfig"
    path.write_text(text)
    cfg = load_with_kubernetes(str(path), tmp_path)
    assert cfg.host == url
    assert read(cfg.ssl_ca_cert) == files.ca.read_bytes()
    if with_client_cert:
        assert read(cfg.cert_file) == files.cert.read_bytes()
        assert read(cfg.key_file) == files.key.read_bytes()
    else:
        assert cfg.cert_file is None
        assert cfg.key_file is None
    doc = yaml.safe_load(text)
    assert doc["current-context"] in [c["name"] for c in doc["contexts"]]
    assert doc["clusters"][0]["cluster"]["server"] == url


@pytest.mark.kubectl
@needs_kubectl
def test_kubectl_reads_the_webhook_kubeconfig(files: Files, tmp_path: Path) -> None:
    path = files.write(
        "webhook.kubeconfig",
        webhook_kubeconfig(
            url="https://10.0.0.5:8443/authenticate",
            ca_file=str(files.ca),
            client_cert=str(files.cert),
            client_key=str(files.key),
        ),
    )
    view = json.loads(
        kubectl(tmp_path, "config", "view", "--kubeconfig", path, "--raw", "-o", "json")
    )
    cluster = view["clusters"][0]["cluster"]
    assert cluster["server"] == "https://10.0.0.5:8443/authenticate"
    assert base64.b64decode(cluster["certificate-authority-data"]) == (
        files.ca.read_bytes()
    )
    user = view["users"][0]["user"]
    assert base64.b64decode(user["client-key-data"]) == files.key.read_bytes()


def test_webhook_kubeconfig_header_names_the_three_apiserver_flags(
    files: Files,
) -> None:
    text = webhook_kubeconfig(
        url="https://10.96.0.200/authenticate", ca_file=str(files.ca)
    )
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[1:] == [
        f"#   {flag}={value}" for flag, value in WEBHOOK_APISERVER_FLAGS
    ]
    assert [flag for flag, _ in WEBHOOK_APISERVER_FLAGS] == [
        "--authentication-token-webhook-config-file",
        "--authentication-token-webhook-version",
        "--authentication-token-webhook-cache-ttl",
    ]


def encrypted_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def other_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


GARBAGE_CERT = (
    b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
)


@pytest.mark.parametrize(
    ("change", "flag", "detail"),
    [
        ({"url": "http://gate.example.com/authenticate"}, "--url", "https"),
        ({"url": "https://gate.example.com:8443"}, "--url", "path"),
        ({"url": "https://gate.example.com:8443/"}, "--url", "path"),
        ({"url": "https:///authenticate"}, "--url", "host"),
        ({"url": "https://u:p@gate.example.com/authenticate"}, "--url", "password"),
        ({"url": "https://gate.example.com:99999/a"}, "--url", "does not parse"),
        ({"ca_file": "missing.crt"}, "--ca-file", "cannot read"),
        ({"ca_file": ("ca.txt", b"hello")}, "--ca-file", "no CERTIFICATE block"),
        ({"ca_file": ("ca.txt", GARBAGE_CERT)}, "--ca-file", "does not parse"),
        ({"client_key": None}, "--client-key", "is missing"),
        ({"client_cert": None}, "--client-cert", "is missing"),
        ({"client_key": ("k.pem", b"not a key")}, "--client-key", "not a PEM"),
        ({"client_key": ("k.pem", encrypted_key())}, "--client-key", "encrypted"),
        ({"client_key": ("k.pem", other_key())}, "--client-key", "do not match"),
        ({"client_cert": ("c.pem", other_key())}, "--client-cert", "no CERTIFICATE"),
    ],
    ids=[
        "http-url",
        "no-path",
        "root-path",
        "no-host",
        "credentials-in-url",
        "bad-port",
        "ca-missing",
        "ca-not-pem",
        "ca-garbage-block",
        "cert-without-key",
        "key-without-cert",
        "key-not-pem",
        "key-encrypted",
        "key-of-another-cert",
        "cert-is-a-key",
    ],
)
def test_webhook_kubeconfig_refuses_bad_input(
    files: Files, change: dict[str, Any], flag: str, detail: str
) -> None:
    kwargs: dict[str, Any] = {
        "url": "https://gate.example.com:8443/authenticate",
        "ca_file": str(files.ca),
        "client_cert": str(files.cert),
        "client_key": str(files.key),
    }
    for name, value in change.items():
        if isinstance(value, tuple):
            kwargs[name] = files.write(*value)
        elif name.endswith("_file") and value is not None:
            kwargs[name] = str(files.root / value)
        else:
            kwargs[name] = value
    with pytest.raises(ConfigError) as info:
        webhook_kubeconfig(**kwargs)
    message = str(info.value)
    assert flag in message
    assert detail in message
    assert "PRIVATE KEY" not in message


# ---------------------------------------------------------------------------
# user kubeconfig
# ---------------------------------------------------------------------------


def test_user_kubeconfig_runs_kubelogin_directly(files: Files) -> None:
    doc = yaml.safe_load(
        user_kubeconfig(
            server=SERVER,
            issuer_url=ISSUER,
            client_id="0oa1k8s",
            ca_file=str(files.ca),
            extra_scopes=("groups", "email"),
        )
    )
    name = "oidc@k8s.example.com:6443"
    assert doc["users"] == [
        {
            "name": name,
            "user": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": "kubectl-oidc_login",
                    "args": [
                        "get-token",
                        f"--oidc-issuer-url={ISSUER}",
                        "--oidc-client-id=0oa1k8s",
                        "--listen-address=localhost:8000",
                        "--oidc-extra-scope=groups",
                        "--oidc-extra-scope=email",
                    ],
                    "installHint": KUBELOGIN_INSTALL_HINT,
                    "interactiveMode": "IfAvailable",
                    "provideClusterInfo": False,
                }
            },
        }
    ]
    assert doc["contexts"] == [
        {
            "name": name,
            "context": {"cluster": name, "user": name, "namespace": "default"},
        }
    ]
    assert doc["current-context"] == name
    [cluster] = doc["clusters"]
    assert cluster["name"] == name
    assert cluster["cluster"]["server"] == SERVER
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == (
        files.ca.read_bytes()
    )


def test_user_kubeconfig_names_everything_after_the_context() -> None:
    doc = yaml.safe_load(
        user_kubeconfig(
            server=SERVER, issuer_url=ISSUER, client_id="cid", context_name="prod"
        )
    )
    assert doc["clusters"] == [{"name": "prod", "cluster": {"server": SERVER}}]
    assert doc["users"][0]["name"] == "prod"
    assert doc["contexts"][0] == {
        "name": "prod",
        "context": {"cluster": "prod", "user": "prod", "namespace": "default"},
    }
    assert doc["current-context"] == "prod"


@pytest.mark.parametrize(
    ("server", "name"),
    [
        ("https://k8s.example.com:6443", "oidc@k8s.example.com:6443"),
        ("https://Gate.Example.com", "oidc@gate.example.com"),
        ("https://gate.example.com/", "oidc@gate.example.com"),
        (
            "https://rancher.example.com/k8s/clusters/c-m-1/",
            "oidc@rancher.example.com/k8s/clusters/c-m-1",
        ),
        ("https://[fd00::1]:6443", "oidc@[fd00::1]:6443"),
        ("http://127.0.0.1:8001", "oidc@127.0.0.1:8001"),
    ],
    ids=["host-port", "host-lowercased", "root-path", "path", "ipv6", "loopback"],
)
def test_default_context_name_is_unique_per_server(server: str, name: str) -> None:
    assert default_context_name(server) == name
    doc = yaml.safe_load(
        user_kubeconfig(server=server, issuer_url=ISSUER, client_id="c")
    )
    assert doc["current-context"] == name


@pytest.mark.kubectl
@needs_kubectl
@pytest.mark.parametrize("with_ca", [True, False], ids=["ca", "no-ca"])
def test_kubectl_reads_it_as_the_articles_commands_write_it(
    files: Files, tmp_path: Path, with_ca: bool
) -> None:
    """Our file is what the article's ``kubectl config`` commands make, with
    kubelogin's binary run directly and an ``installHint`` kubectl keeps."""
    ours = files.write(
        "ours.kubeconfig",
        user_kubeconfig(
            server=SERVER,
            issuer_url=ISSUER,
            client_id="your-client-id",
            ca_file=str(files.ca) if with_ca else None,
            context_name="oidc",
        ),
    )
    theirs = str(tmp_path / "theirs.kubeconfig")
    k = ["--kubeconfig", theirs]
    cluster_flags = (
        ["--certificate-authority", str(files.ca), "--embed-certs=true"]
        if with_ca
        else []
    )
    kubectl(
        tmp_path, "config", *k, "set-cluster", "oidc", f"--server={SERVER}",
        *cluster_flags,
    )  # fmt: skip
    kubectl(
        tmp_path, "config", *k, "set-credentials", "oidc",
        "--exec-api-version=client.authentication.k8s.io/v1",
        "--exec-command=kubectl-oidc_login",
        "--exec-arg=get-token",
        f"--exec-arg=--oidc-issuer-url={ISSUER}",
        "--exec-arg=--oidc-client-id=your-client-id",
        "--exec-arg=--listen-address=localhost:8000",
        "--exec-interactive-mode=IfAvailable",
    )  # fmt: skip
    kubectl(
        tmp_path, "config", *k, "set-context", "oidc", "--cluster=oidc",
        "--user=oidc", "--namespace=default",
    )  # fmt: skip
    kubectl(tmp_path, "config", *k, "use-context", "oidc")

    def view(path: str) -> Any:
        return json.loads(
            kubectl(
                tmp_path, "config", "view", "--kubeconfig", path, "--raw", "-o", "json"
            )
        )

    mine = view(ours)
    # `kubectl config set-credentials` has no flag for installHint.
    assert mine["users"][0]["user"]["exec"].pop("installHint") == (
        KUBELOGIN_INSTALL_HINT
    )
    assert mine == view(theirs)


def fake_plugin(tmp_path: Path, token: str) -> tuple[Path, Path]:
    """An executable stand-in for kubelogin: records its argv, prints a credential."""
    record = tmp_path / "plugin-argv.json"
    script = tmp_path / "fake-kubectl"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
            with open({str(record)!r}, "w") as f:
                json.dump({{"argv": sys.argv[1:], "info": info}}, f)
            print(json.dumps({{
                "apiVersion": info["apiVersion"],
                "kind": "ExecCredential",
                "status": {{"token": {token!r}}},
            }}))
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, record


def expected_args(client_id: str) -> list[str]:
    return [
        "get-token",
        f"--oidc-issuer-url={ISSUER}",
        f"--oidc-client-id={client_id}",
        "--listen-address=localhost:8000",
    ]


@pytest.mark.slow
def test_kubernetes_loader_runs_the_exec_credential(
    files: Files, tmp_path: Path
) -> None:
    script, record = fake_plugin(tmp_path, "tok-123")
    path = files.write(
        "user.kubeconfig",
        user_kubeconfig(
            server=SERVER,
            issuer_url=ISSUER,
            client_id="cid",
            ca_file=str(files.ca),
            exec_command=str(script),
        ),
    )
    cfg = load_with_kubernetes(path, tmp_path)
    assert cfg.host == SERVER
    assert cfg.api_key["BearerToken"] == "Bearer tok-123"
    assert read(cfg.ssl_ca_cert) == files.ca.read_bytes()
    seen = json.loads(record.read_text())
    assert seen["argv"] == expected_args("cid")
    assert seen["info"]["apiVersion"] == EXEC_API_VERSION


@pytest.mark.kubectl
@needs_kubectl
async def test_kubectl_logs_in_with_the_exec_credential(
    files: Files, tmp_path: Path, ca: trustme.CA
) -> None:
    """kubectl runs the plugin, trusts the embedded CA and sends the token."""
    script, record = fake_plugin(tmp_path, "tok-456")
    seen: list[str] = []

    async def version(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"major": "1", "minor": "34", "gitVersion": "v1.34.0"})

    app = web.Application()
    app.router.add_get("/version", version)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    try:
        await site.start()
        port = runner.addresses[0][1]
        path = files.write(
            "user.kubeconfig",
            user_kubeconfig(
                server=f"https://127.0.0.1:{port}",
                issuer_url=ISSUER,
                client_id="cid",
                ca_file=str(files.ca),
                exec_command=str(script),
            ),
        )
        proc = await asyncio.create_subprocess_exec(
            str(KUBECTL), "--kubeconfig", path, "get", "--raw", "/version",
            env=kubectl_env(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["gitVersion"] == "v1.34.0"
    assert seen
    assert set(seen) == {"Bearer tok-456"}
    assert json.loads(record.read_text())["argv"] == expected_args("cid")


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"server": "http://k8s.example.com"}, "--server"),
        ({"server": "ftp://k8s.example.com"}, "--server"),
        ({"issuer_url": "http://auth.example.com"}, "--oidc-issuer-url"),
        ({"issuer_url": "https://auth.example.com/?x=1"}, "--oidc-issuer-url"),
        ({"issuer_url": "https://auth.example.com/#f"}, "--oidc-issuer-url"),
        (
            {"issuer_url": "https://auth.example.com/oauth2/default/"},
            "--oidc-issuer-url",
        ),
        ({"issuer_url": "https://auth.example.com/"}, "--oidc-issuer-url"),
        ({"client_id": ""}, "--oidc-client-id"),
        ({"context_name": ""}, "--context-name"),
        ({"context_name": " x"}, "--context-name"),
        ({"extra_scopes": ("a b",)}, "--oidc-extra-scope"),
        ({"extra_scopes": ("a,b",)}, "--oidc-extra-scope"),
        ({"ca_file": "/nonexistent/ca.crt"}, "--ca-file"),
    ],
    ids=[
        "http-server",
        "ftp-server",
        "http-issuer",
        "issuer-query",
        "issuer-fragment",
        "issuer-trailing-slash",
        "issuer-root-slash",
        "empty-client-id",
        "empty-context",
        "spaced-context",
        "scope-space",
        "scope-comma",
        "ca-missing",
    ],
)
def test_user_kubeconfig_refuses_bad_input(change: dict[str, Any], flag: str) -> None:
    kwargs: dict[str, Any] = {
        "server": SERVER,
        "issuer_url": ISSUER,
        "client_id": "cid",
        **change,
    }
    with pytest.raises(ConfigError, match=flag):
        user_kubeconfig(**kwargs)


def test_user_kubeconfig_allows_loopback_http() -> None:
    doc = yaml.safe_load(
        user_kubeconfig(
            server="http://127.0.0.1:8001",
            issuer_url="http://127.0.0.1:5556",
            client_id="kube-oidc-gate-dev",
        )
    )
    assert doc["clusters"][0]["cluster"]["server"] == "http://127.0.0.1:8001"


def test_issuer_trailing_slash_message_says_what_to_give() -> None:
    with pytest.raises(ConfigError) as info:
        user_kubeconfig(
            server=SERVER, issuer_url=ISSUER + "/", client_id="c", context_name="x"
        )
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config: --oidc-issuer-url: ")
    assert f"give --oidc-issuer-url={ISSUER}," in message
    assert "--allow-issuer-trailing-slash" in message


def test_issuer_trailing_slash_allowed_when_the_idp_has_one() -> None:
    auth0 = "https://tenant.auth0.com/"
    doc = yaml.safe_load(
        user_kubeconfig(
            server=SERVER,
            issuer_url=auth0,
            client_id="c",
            allow_issuer_trailing_slash=True,
        )
    )
    assert f"--oidc-issuer-url={auth0}" in doc["users"][0]["user"]["exec"]["args"]


# ---------------------------------------------------------------------------
# Merging user kubeconfigs with the real kubectl
# ---------------------------------------------------------------------------


def admin_conf(files: Files, server: str) -> str:
    """A kubeadm ``admin.conf`` in shape: its cluster is called ``kubernetes``."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubernetes", "cluster": {"server": server}}],
        "users": [{"name": "kubernetes-admin", "user": {"token": "admin"}}],
        "contexts": [
            {
                "name": "kubernetes-admin@kubernetes",
                "context": {"cluster": "kubernetes", "user": "kubernetes-admin"},
            }
        ],
        "current-context": "kubernetes-admin@kubernetes",
    }
    return files.write("admin.conf", yaml.safe_dump(doc))


MERGE_CASES = {
    "named-contexts": ("prod-oidc", "staging-oidc", False),
    "default-names": (None, None, False),
    "after-kubeadm-admin-conf": ("prod", "staging", True),
}


@pytest.mark.kubectl
@needs_kubectl
@pytest.mark.parametrize(
    ("prod_name", "staging_name", "with_admin_conf"),
    MERGE_CASES.values(),
    ids=MERGE_CASES.keys(),
)
def test_merged_user_kubeconfigs_keep_each_context_on_its_server(
    files: Files,
    tmp_path: Path,
    prod_name: str | None,
    staging_name: str | None,
    with_admin_conf: bool,
) -> None:
    """``KUBECONFIG=a:b kubectl config view --flatten``, as the docs say to merge.

    kubectl keeps the first file's entry of each name: with the cluster named
    ``kubernetes`` in every file, staging's context used prod's server.
    """
    clusters = {
        "prod": ("https://prod.example.com:6443", trustme.CA(), "0oa-prod"),
        "staging": ("https://staging.example.com:6443", trustme.CA(), "0oa-staging"),
    }
    paths: list[str] = []
    if with_admin_conf:
        paths.append(admin_conf(files, "https://10.0.0.1:6443"))
    contexts: dict[str, tuple[str, bytes, str]] = {}
    for cluster, given in (("prod", prod_name), ("staging", staging_name)):
        server, cluster_ca, client_id = clusters[cluster]
        pem = cluster_ca.cert_pem.bytes()
        text = user_kubeconfig(
            server=server,
            issuer_url=ISSUER,
            client_id=client_id,
            ca_file=files.write(f"{cluster}-ca.crt", pem),
            context_name=given,
        )
        paths.append(files.write(f"{cluster}.kubeconfig", text))
        contexts[yaml.safe_load(text)["current-context"]] = (server, pem, client_id)
    env = {**kubectl_env(tmp_path), "KUBECONFIG": os.pathsep.join(paths)}
    merged = subprocess.run(
        [str(KUBECTL), "config", "view", "--flatten"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert merged.returncode == 0, merged.stderr
    path = files.write("merged.kubeconfig", merged.stdout)
    names = kubectl(
        tmp_path, "config", "get-contexts", "-o", "name", "--kubeconfig", path
    )
    expected_names = set(contexts) | (
        {"kubernetes-admin@kubernetes"} if with_admin_conf else set()
    )
    assert set(names.split()) == expected_names
    for context, (server, pem, client_id) in contexts.items():
        args = ["--kubeconfig", path, "--context", context, "--minify", "--raw"]
        view = json.loads(kubectl(tmp_path, "config", "view", *args, "-o", "json"))
        [cluster] = view["clusters"]
        assert cluster["cluster"]["server"] == server, context
        assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == pem
        [user] = view["users"]
        assert f"--oidc-client-id={client_id}" in user["user"]["exec"]["args"]


@pytest.mark.kubectl
@needs_kubectl
def test_kubectl_prints_the_install_hint_without_kubelogin(
    files: Files, tmp_path: Path
) -> None:
    """No kubelogin on PATH: kubectl's "not found" and our hint, not kubectl's
    ``unknown command "oidc-login"``."""
    path = files.write(
        "user.kubeconfig",
        user_kubeconfig(
            server="https://127.0.0.1:9", issuer_url=ISSUER, client_id="cid"
        ),
    )
    empty = tmp_path / "bin"
    empty.mkdir()
    done = subprocess.run(
        [str(KUBECTL), "--kubeconfig", path, "get", "--raw", "/version"],
        env={"HOME": str(tmp_path), "PATH": str(empty)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert f"executable {KUBELOGIN_COMMAND} not found" in done.stderr
    assert KUBELOGIN_INSTALL_HINT.strip() in done.stderr
    assert "unknown command" not in done.stderr


# ---------------------------------------------------------------------------
# The proxy's own kubeconfig and RBAC
# ---------------------------------------------------------------------------

SA = "system:serviceaccount:kube-oidc-gate:kube-oidc-gate"
NOW = 1_750_000_000


def sa_token(**claims: Any) -> str:
    """A token shaped like kube-apiserver's (signed by a key nobody checks here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    body = {"iss": "https://kubernetes.default.svc", "sub": SA, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm="ES256")


async def test_the_proxy_reaches_the_api_server_with_its_kubeconfig(
    files: Files, ca: trustme.CA
) -> None:
    """The file works as ``kube-oidc-gate proxy --kubeconfig``: the proxy's own
    upstream loader reads it and the API server sees the token."""
    token = sa_token(exp=int(time.time()) + 3600)
    async with serve_apiserver(ca) as fake:
        fake.proxy_tokens = {token}
        path = files.write(
            "proxy.kubeconfig",
            proxy_kubeconfig(
                server=fake.url,
                token_file=files.write("token", token + "\n"),
                ca_file=str(files.ca),
            ),
        )
        upstream = Upstream(UpstreamSettings(kubeconfig=path))
        await upstream.start()
        try:
            assert str(upstream.base_url) == fake.url
            response = await upstream.fetch(
                "GET",
                "/api",
                headers=[*upstream.auth_items, ("Impersonate-User", "okta:00u1")],
                connect_timeout=5,
                head_timeout=5,
            )
            async with response:
                assert response.status == 200
        finally:
            await upstream.close()
    assert fake.requests[-1].bearer == token


@pytest.mark.parametrize(
    ("exp", "note"),
    [(NOW + 3600, "expires at 2025-06-15 16:06 UTC"), (None, "does not expire")],
    ids=["bound-token", "secret-token"],
)
def test_proxy_kubeconfig_says_when_the_token_expires(
    files: Files, exp: int | None, note: str
) -> None:
    token = sa_token(exp=exp)
    text = proxy_kubeconfig(
        server=SERVER, token_file=files.write("token", token), now=NOW
    )
    header = "".join(line for line in text.splitlines() if line.startswith("#"))
    assert note in header
    assert "chmod 600" in header
    doc = yaml.safe_load(text)
    assert doc["users"][0]["user"] == {"token": token}
    assert doc["clusters"][0]["cluster"] == {"server": SERVER}


MAKE_TOKEN = "kubectl -n kube-oidc-gate create token kube-oidc-gate"


@pytest.mark.parametrize(
    ("token", "detail", "says_how"),
    [
        ("", "the file is empty", True),
        ("not-a-jwt", "not a service-account token", False),
        (sa_token(sub="system:serviceaccount:default:default"), "default:def", True),
        (sa_token(sub="okta:00u1"), '"okta:00u1"', True),
        (sa_token(exp=NOW - 1), "expired at 2025-06-15 15:06 UTC", True),
        (sa_token(exp="soon"), "exp is not a number", False),
    ],
    ids=["empty", "not-a-jwt", "other-account", "a-user-token", "expired", "bad-exp"],
)
def test_proxy_kubeconfig_refuses_a_token_it_cannot_use(
    files: Files, token: str, detail: str, says_how: bool
) -> None:
    path = files.write("token", token)
    with pytest.raises(ConfigError) as info:
        proxy_kubeconfig(server=SERVER, token_file=path, now=NOW)
    message = str(info.value)
    assert message.startswith("config: --token-file ")
    assert detail in message
    assert (MAKE_TOKEN in message) == says_how
    if token:
        assert token not in message


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"server": "http://k8s.example.com"}, "--server"),
        ({"namespace": ""}, "--namespace"),
        ({"service_account": "a:b"}, "--service-account"),
        ({"ca_file": "/nonexistent/ca.crt"}, "--ca-file"),
        ({"token_file": "/nonexistent/token"}, "--token-file"),
    ],
    ids=[
        "http-server",
        "empty-namespace",
        "colon-account",
        "ca-missing",
        "token-missing",
    ],
)
def test_proxy_kubeconfig_refuses_bad_input(
    files: Files, change: dict[str, Any], flag: str
) -> None:
    kwargs: dict[str, Any] = {
        "server": SERVER,
        "token_file": files.write("token", sa_token()),
        **change,
    }
    with pytest.raises(ConfigError, match=flag):
        proxy_kubeconfig(**kwargs)


def test_proxy_rbac_for_other_names_binds_that_account() -> None:
    docs = list(
        yaml.safe_load_all(proxy_rbac(namespace="gate", service_account="proxy"))
    )
    assert [d["kind"] for d in docs] == [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    account, role, binding = docs
    assert account["metadata"] == {"name": "proxy", "namespace": "gate"}
    assert role["metadata"]["name"] == "proxy-impersonator"
    assert binding["roleRef"]["name"] == "proxy-impersonator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "proxy", "namespace": "gate"}
    ]
    [_, extras] = role["rules"]
    assert extras["resources"] == [
        "uids",
        "userextras/authentication.kubernetes.io/credential-id",
    ]


# ---------------------------------------------------------------------------
# kube-apiserver settings
# ---------------------------------------------------------------------------


def from_flags(argv: list[str]) -> AuthConfig:
    parser = argparse.ArgumentParser()
    add_auth_arguments(parser)
    config = auth_config_from_args(parser.parse_args(argv))
    assert config is not None
    return config


def flag_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def comparable(value: Any, *, algs: bool = False) -> Any:
    """A config as plain values: CEL by source; where it came from left out.

    ``source`` (``jwt[0]`` or ``--oidc-*``) and the CEL ``field_path`` only
    label messages; the signing algorithms are compared only when asked,
    since the file format has no field for them.
    """
    if isinstance(value, AuthConfig):  # the authenticators; not the tunables
        return comparable(value.authenticators, algs=algs)
    if isinstance(value, CompiledExpression):
        return ("cel", value.source)
    if is_dataclass(value) and not isinstance(value, type):
        skip = {"source"} | (set() if algs else {"signing_algs"})
        out = {
            f.name: comparable(getattr(value, f.name), algs=algs)
            for f in fields(value)
            if f.name not in skip
        }
        if isinstance(value, IssuerConfig) and len(value.audiences) == 1:
            out["audience_match_policy"] = "MatchAny"  # "" means the same for one
        return out
    if isinstance(value, tuple | list):
        return [comparable(v, algs=algs) for v in value]
    return value


FLAG_CASES = {
    "article": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=your-client-id",
        "--oidc-username-claim=sub",
        "--oidc-groups-claim=groups",
    ],
    "defaults-only": [f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=c"],
    "no-prefix": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-username-prefix=-",
    ],
    "prefixes": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-username-prefix=oidc:",
        "--oidc-groups-claim=groups",
        "--oidc-groups-prefix=okta:",
    ],
    "email-default": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-username-claim=email",
    ],
    "email-issuer-prefix": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-username-claim=email",
        f"--oidc-username-prefix={ISSUER}#",
    ],
    "required-claims": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-required-claim=hd=example.com",
        "--oidc-required-claim=tier=gold=1,env=",
    ],
    "algs": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-signing-algs=ES256,RS256",
    ],
    "eddsa-dropped": [
        f"--oidc-issuer-url={ISSUER}",
        "--oidc-client-id=c",
        "--oidc-signing-algs=EdDSA,PS256",
    ],
}


@pytest.mark.parametrize("argv", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_flags_round_trip_through_the_flag_parser(
    argv: list[str], files: Files
) -> None:
    config = from_flags(argv)
    text = apiserver_flags(config)
    assert "cannot express" not in text
    again = from_flags(flag_lines(text))
    if "EdDSA" in str(argv):
        assert "EdDSA is left out" in text
        assert again.authenticators[0].issuer.signing_algs == ("PS256",)
        assert comparable(again) == comparable(config)
    else:
        assert again == config


def test_the_articles_flags_come_out_as_the_article_wrote_them() -> None:
    text = apiserver_flags(from_flags(FLAG_CASES["article"]))
    assert flag_lines(text) == FLAG_CASES["article"]


def test_flags_with_a_ca_name_its_file_and_show_its_content(files: Files) -> None:
    config = from_flags(
        [
            f"--oidc-issuer-url={ISSUER}",
            "--oidc-client-id=c",
            f"--oidc-ca-file={files.ca}",
        ]
    )
    text = apiserver_flags(config, ca_file_path=str(files.ca))
    assert f"--oidc-ca-file={files.ca}" in flag_lines(text)
    commented = "\n".join(
        line.removeprefix("# ") for line in text.splitlines() if line.startswith("#")
    )
    assert files.ca.read_text().strip() in commented
    assert from_flags(flag_lines(text)) == config
    default = apiserver_flags(config)
    assert "--oidc-ca-file=/etc/kubernetes/pki/oidc-ca.crt" in flag_lines(default)


def file_config(jwt_yaml: str) -> AuthConfig:
    text = (
        "apiVersion: apiserver.config.k8s.io/v1\n"
        "kind: AuthenticationConfiguration\n"
        "jwt:\n" + jwt_yaml
    )
    return parse_authentication_config(text, source="test.yaml")


ISSUER_BLOCK = f"""\
- issuer:
    url: {ISSUER}
    audiences: [c]
"""

NOT_FLAGS = {
    "two-issuers": (
        ISSUER_BLOCK
        + "  claimMappings: {username: {claim: sub, prefix: ''}}\n"
        + "- issuer: {url: 'https://other.example.com', audiences: [c]}\n"
        + "  claimMappings: {username: {claim: sub, prefix: 'o:'}}\n",
        "2 issuers",
    ),
    "discovery-url": (
        f"""\
- issuer:
    url: {ISSUER}
    discoveryURL: https://idp.internal/.well-known/openid-configuration
    audiences: [c]
  claimMappings: {{username: {{claim: sub, prefix: ''}}}}
""",
        "discoveryURL",
    ),
    "two-audiences": (
        f"""\
- issuer:
    url: {ISSUER}
    audiences: [a, b]
    audienceMatchPolicy: MatchAny
  claimMappings: {{username: {{claim: sub, prefix: ''}}}}
""",
        "2 audiences",
    ),
    "username-expression": (
        ISSUER_BLOCK
        + "  claimMappings: {username: {expression: \"'u:' + claims.sub\"}}\n",
        "username is a CEL expression",
    ),
    "dash-prefix": (
        ISSUER_BLOCK + "  claimMappings: {username: {claim: sub, prefix: '-'}}\n",
        'prefix is "-"',
    ),
    "groups-expression": (
        ISSUER_BLOCK
        + "  claimMappings:\n"
        + "    username: {claim: sub, prefix: ''}\n"
        + "    groups: {expression: 'claims.roles'}\n",
        "groups is a CEL expression",
    ),
    "uid": (
        ISSUER_BLOCK
        + "  claimMappings:\n"
        + "    username: {claim: sub, prefix: ''}\n"
        + "    uid: {claim: oid}\n",
        "uid",
    ),
    "extra": (
        ISSUER_BLOCK
        + "  claimMappings:\n"
        + "    username: {claim: sub, prefix: ''}\n"
        + "    extra: [{key: example.com/tenant, valueExpression: claims.tid}]\n",
        "extra",
    ),
    "cel-claim-rule": (
        ISSUER_BLOCK
        + "  claimValidationRules: [{expression: 'claims.exp - claims.iat <= 3600',"
        + " message: too long}]\n"
        + "  claimMappings: {username: {claim: sub, prefix: ''}}\n",
        "claimValidationRules[0] is a CEL expression",
    ),
    "comma-required-value": (
        ISSUER_BLOCK
        + "  claimValidationRules: [{claim: hd, requiredValue: 'a,b'}]\n"
        + "  claimMappings: {username: {claim: sub, prefix: ''}}\n",
        "comma",
    ),
    "user-rule": (
        ISSUER_BLOCK
        + "  claimMappings: {username: {claim: sub, prefix: ''}}\n"
        + "  userValidationRules: [{expression: \"!user.username.startsWith('system:')\","
        + " message: no system users}]\n",
        "userValidationRules",
    ),
}


@pytest.mark.parametrize(
    ("jwt_yaml", "reason"), NOT_FLAGS.values(), ids=NOT_FLAGS.keys()
)
def test_flags_explain_why_not_and_give_the_file_instead(
    jwt_yaml: str, reason: str
) -> None:
    config = file_config(jwt_yaml)
    text = apiserver_flags(config)
    assert flag_lines(text)[0].startswith("apiVersion:")
    assert not [line for line in flag_lines(text) if line.startswith("--oidc-")]
    explanation = " ".join(
        line.removeprefix("#").strip()
        for line in text.splitlines()
        if line.startswith("#")
    )
    assert "cannot express" in explanation
    assert reason in explanation
    again = parse_authentication_config(text, source="out.yaml")
    assert comparable(again, algs=True) == comparable(config, algs=True)


def test_a_file_config_the_flags_can_express_becomes_flags() -> None:
    config = file_config(
        ISSUER_BLOCK
        + "  claimValidationRules: [{claim: hd, requiredValue: example.com}]\n"
        + "  claimMappings:\n"
        + "    username: {claim: email, prefix: ''}\n"
        + "    groups: {claim: groups, prefix: 'okta:'}\n"
    )
    text = apiserver_flags(config)
    again = from_flags(flag_lines(text))
    # The file form accepts every algorithm kube-apiserver has (no EdDSA there).
    assert "EdDSA" not in again.authenticators[0].issuer.signing_algs
    assert set(again.authenticators[0].issuer.signing_algs) == set(
        config.authenticators[0].issuer.signing_algs
    ) - {"EdDSA"}
    assert comparable(again) == comparable(config)


RICH = f"""\
- issuer:
    url: {ISSUER}
    discoveryURL: https://idp.internal/.well-known/openid-configuration
    audiences: [a, b]
    audienceMatchPolicy: MatchAny
  claimValidationRules:
  - claim: hd
    requiredValue: example.com
  - expression: 'claims.exp - claims.iat <= 86400'
    message: token lives too long
  claimMappings:
    username:
      expression: "claims.?preferred_username.orValue(claims.sub)"
    groups:
      claim: groups
      prefix: 'okta:'
    uid:
      expression: claims.sub
    extra:
    - key: example.com/tenant
      valueExpression: claims.tid
  userValidationRules:
  - expression: "!user.username.startsWith('system:')"
    message: no system users
- issuer:
    url: https://other.example.com
    audiences: [k]
  claimMappings:
    username: {{claim: email, prefix: ''}}
    uid: {{claim: oid}}
"""


@pytest.mark.parametrize("api_version", SUPPORTED_API_VERSIONS)
def test_authentication_configuration_round_trips_a_rich_file(
    api_version: str,
) -> None:
    config = file_config(RICH)
    text = authentication_configuration(config, api_version)
    assert yaml.safe_load(text)["apiVersion"] == api_version
    again = parse_authentication_config(text, source="out.yaml")
    assert comparable(again, algs=True) == comparable(config, algs=True)


@pytest.mark.parametrize("argv", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_authentication_configuration_round_trips_flag_configs(
    argv: list[str],
) -> None:
    config = from_flags(argv)
    text = authentication_configuration(config)
    again = parse_authentication_config(text, source="out.yaml")
    assert comparable(again) == comparable(config)
    # The legacy defaulting is written out: the file format has none.
    username = yaml.safe_load(text)["jwt"][0]["claimMappings"]["username"]
    assert username["prefix"] == config.authenticators[0].claim_mappings.username.prefix
    # Limiting the algorithms is something only the flags can say: it is noted.
    assert "has no algorithm field" in text


def test_authentication_configuration_inlines_the_ca(files: Files) -> None:
    config = from_flags(
        [
            f"--oidc-issuer-url={ISSUER}",
            "--oidc-client-id=c",
            f"--oidc-ca-file={files.ca}",
        ]
    )
    text = authentication_configuration(config)
    assert "certificateAuthority: |" in text
    issuer = yaml.safe_load(text)["jwt"][0]["issuer"]
    assert issuer["certificateAuthority"] == files.ca.read_text()
    again = parse_authentication_config(text, source="out.yaml")
    assert comparable(again) == comparable(config)


def test_dev_config_notes_that_kube_apiserver_needs_https() -> None:
    config = dev_auth_config("http://127.0.0.1:5556", "kube-oidc-gate-dev")
    for text in (apiserver_flags(config), authentication_configuration(config)):
        comments = " ".join(
            line.removeprefix("#").strip()
            for line in text.splitlines()
            if line.startswith("#")
        )
        assert "requires an https issuer URL" in comments
    assert flag_lines(apiserver_flags(config)) == [
        "--oidc-issuer-url=http://127.0.0.1:5556",
        "--oidc-client-id=kube-oidc-gate-dev",
        "--oidc-username-claim=sub",
        "--oidc-username-prefix=dev:",
        "--oidc-groups-claim=groups",
    ]


@pytest.mark.parametrize(
    "api_version",
    ["apiserver.config.k8s.io/v2", "v1", ""],
    ids=["future", "bare", "empty"],
)
def test_authentication_configuration_refuses_unknown_api_versions(
    api_version: str,
) -> None:
    with pytest.raises(ConfigError, match="unsupported"):
        authentication_configuration(
            from_flags(FLAG_CASES["article"]), api_version=api_version
        )
