"""The real command: ``kube-oidc-gate proxy`` as a subprocess, kubectl through it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import (
    run_kubectl,
    start_kubectl,
    upstream_kubeconfig,
    write_kubectl_config,
)
from tests.fakes.issuer import FakeIssuer
from tests.proc import Proc
from tests.test_cli_webhook import free_port

pytestmark = pytest.mark.kubectl


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def proxy_args(
    issuer: FakeIssuer, upstream: Path, tmp_path: Path, port: int, *extra: str
) -> list[str]:
    return [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-username-claim", "email",
        "--oidc-groups-claim", "groups",
        "--kubeconfig", str(upstream),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--cert-dir", str(tmp_path / "certs"),
        "--shutdown-grace-period", "5",
        *extra,
    ]  # fmt: skip


async def test_kubectl_through_the_real_proxy_command(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", apiserver.url, apiserver.ca_pem
    )
    port = free_port()
    with Proc(*proxy_args(issuer, upstream, tmp_path, port)) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        ca = (tmp_path / "certs" / "kube-oidc-gate.crt").read_bytes()
        token = issuer.token(
            email="alice@example.com", email_verified=True, groups=["naxslabs-admins"]
        )
        kubeconfig = write_kubectl_config(
            tmp_path / "user.yaml", f"https://127.0.0.1:{port}", ca, token
        )
        code, out, err = await run_kubectl(
            ["auth", "whoami", "-o", "json"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code == 0, err
        info = json.loads(out)["status"]["userInfo"]
        assert info["username"] == "alice@example.com"
        assert "naxslabs-admins" in info["groups"]
        code, out, err = await run_kubectl(
            ["get", "pods"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code == 0, err
        code, _, err = await run_kubectl(
            ["get", "pods", "--as", "bob"], home=tmp_path, kubeconfig=kubeconfig
        )
        assert code != 0
        assert "Forbidden" in err or "forbidden" in err

        # A watch is open when SIGTERM arrives: it is ended cleanly, and the
        # process exits 0 within the grace period.
        watch = await start_kubectl(
            ["get", "pods", "-w"], home=tmp_path, kubeconfig=kubeconfig
        )
        await asyncio.sleep(1.0)
        proc.popen.terminate()
        rc = await asyncio.wait_for(watch.wait(), 15)
        assert rc is not None
        assert await asyncio.to_thread(proc.popen.wait, 15) == 0
    for seen in apiserver.requests:
        assert seen.headers.get("Authorization") == "Bearer proxy-sa-token-1"
        assert token not in json.dumps(dict(seen.headers))
    assert all(token not in line for line in proc.stderr)


async def test_proxy_refuses_a_bad_upstream_config(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    bad = tmp_path / "upstream.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with Proc(*proxy_args(issuer, bad, tmp_path, free_port())) as proc:
        rc = await asyncio.to_thread(proc.popen.wait, 20)
    assert rc == 2
    assert "".join(proc.stderr).startswith("error: ") or "error:" in "".join(
        proc.stderr
    )


async def test_passthrough_with_a_client_certificate_upstream_refuses_to_start(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    import base64

    import yaml

    client = trustme.CA().issue_cert("kube-oidc-gate")
    doc = yaml.safe_load(
        upstream_kubeconfig(
            tmp_path / "u.yaml", apiserver.url, apiserver.ca_pem, token=None
        ).read_text()
    )
    doc["users"][0]["user"] = {
        "client-certificate-data": base64.b64encode(
            client.cert_chain_pems[0].bytes()
        ).decode(),
        "client-key-data": base64.b64encode(client.private_key_pem.bytes()).decode(),
    }
    upstream = tmp_path / "cert-upstream.yaml"
    upstream.write_text(yaml.safe_dump(doc))
    with Proc(
        *proxy_args(issuer, upstream, tmp_path, free_port(), "--token-passthrough")
    ) as proc:
        rc = await asyncio.to_thread(proc.popen.wait, 20)
    assert rc == 2
    assert "--token-passthrough cannot be used" in "".join(proc.stderr)
