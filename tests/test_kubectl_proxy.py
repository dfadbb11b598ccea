"""The real kubectl (``.venv/bin/kubectl``) through the proxy to the fake API server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from proxy.impersonate import ProxySettings
from tests.fakes.apiserver_harness import (
    PODS,
    PROXY_TOKEN,
    Stack,
    kubectl_path,
    run_kubectl,
    run_proxy,
    start_kubectl,
    write_kubectl_config,
)
from tests.fakes.apiserver_spdy import dictionary_from

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(kubectl_path() is None, reason="kubectl binary not installed"),
]

SAR = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Kube:
    stack: Stack
    home: Path
    config: Path

    async def run(
        self, *args: str, stdin: bytes | None = None, timeout: float = 20
    ) -> tuple[int, str, str]:
        return await run_kubectl(
            args, home=self.home, kubeconfig=self.config, stdin=stdin, timeout=timeout
        )

    async def start(
        self, *args: str, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        return await start_kubectl(
            args, home=self.home, kubeconfig=self.config, env=env
        )


async def _kube(
    tmp_path: Path, ca: trustme.CA, settings: ProxySettings
) -> AsyncIterator[Kube]:
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        config = write_kubectl_config(
            tmp_path / "kubeconfig", stack.url, ca.cert_pem.bytes(), stack.token()
        )
        yield Kube(stack=stack, home=tmp_path, config=config)


@pytest.fixture
async def kube(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Kube]:
    async for k in _kube(tmp_path, ca, ProxySettings()):
        yield k


@pytest.fixture
async def kube_as(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Kube]:
    async for k in _kube(tmp_path, ca, ProxySettings(allow_client_impersonation=True)):
        yield k


async def readline(proc: asyncio.subprocess.Process, timeout: float = 10) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await asyncio.wait_for(proc.wait(), 10)


async def test_whoami_shows_the_mapped_user_and_groups(kube: Kube) -> None:
    code, out, err = await kube.run("auth", "whoami")
    assert code == 0, err
    rows = {
        line.split(None, 1)[0]: line.split(None, 1)[1].strip()
        for line in out.splitlines()
    }
    assert rows["Username"] == "oidc:alice"
    assert rows["Groups"] == "[oidc:devs system:authenticated]"
    code, out, err = await kube.run("auth", "whoami", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["status"]["userInfo"] == {
        "username": "oidc:alice",
        "groups": ["oidc:devs", "system:authenticated"],
    }
    for seen in kube.stack.fake.requests:
        assert seen.bearer == PROXY_TOKEN
        assert seen.headers["Impersonate-User"] == "oidc:alice"


@pytest.mark.slow
async def test_get_pods(kube: Kube) -> None:
    code, out, err = await kube.run("get", "pods")
    assert code == 0, err
    assert out.split() == ["NAME", "STATUS", "p", "Running"]


@pytest.mark.slow
async def test_get_pods_watch_receives_events_while_streaming(kube: Kube) -> None:
    proc = await kube.start("get", "pods", "--watch", "-o", "name")
    try:
        assert await readline(proc) == "pod/p\n"
        await asyncio.wait_for(kube.stack.fake.watch_opened.wait(), 10)
        for name in ("q", "r"):
            kube.stack.fake.emit("ADDED", name)
            assert await readline(proc) == f"pod/{name}\n"
        assert proc.returncode is None
    finally:
        await stop(proc)
    await asyncio.wait_for(kube.stack.fake.watch_closed.wait(), 5)


async def test_logs_follow_streams_lines_as_they_come(kube: Kube) -> None:
    proc = await kube.start("logs", "-f", "p")
    try:
        assert await readline(proc) == "log line 0\n"
        kube.stack.fake.log_lines.put_nowait("second line")
        assert await readline(proc) == "second line\n"
        assert proc.returncode is None
        kube.stack.fake.log_lines.put_nowait(None)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        await stop(proc)


async def test_exec_cat_round_trips_stdin_over_websocket(kube: Kube) -> None:
    text = b"".join(b"line %d through kube-oidc-gate\n" % i for i in range(200))
    code, out, err = await kube.run("exec", "-i", "p", "--", "cat", stdin=text)
    assert code == 0, err
    assert out.encode() == text
    (seen,) = kube.stack.fake.seen("/api/v1/namespaces/default/pods/p/exec")
    assert seen.headers["Upgrade"].lower() == "websocket"
    assert "v5.channel.k8s.io" in seen.headers["Sec-WebSocket-Protocol"]
    assert seen.bearer == PROXY_TOKEN
    assert seen.headers["Impersonate-User"] == "oidc:alice"


async def test_as_is_refused_by_default(kube: Kube) -> None:
    code, _, err = await kube.run("auth", "whoami", "--as", "bob")
    assert code != 0
    code, _, err = await kube.run("get", "--raw", PODS, "--as", "bob")
    assert code != 0
    assert (
        "Error from server (Forbidden): impersonation is not allowed through this proxy"
        in err
    )
    assert kube.stack.fake.requests == []


async def test_as_allowed_by_subject_access_review(kube_as: Kube) -> None:
    kube_as.stack.fake.sar_rules |= {
        ("oidc:alice", "users", "bob"),
        ("oidc:alice", "groups", "admins"),
    }
    code, out, err = await kube_as.run(
        "auth", "whoami", "--as", "bob", "--as-group", "admins", "-o", "json"
    )
    assert code == 0, err
    info = json.loads(out)["status"]["userInfo"]
    # Who is behind the --as, as the API server's audit log sees it (issue 24).
    (original,) = info.pop("extra")["kube-oidc-gate.io/original-user"]
    assert json.loads(original)["username"] == "oidc:alice"
    assert info == {
        "username": "bob",
        "groups": ["admins", "system:authenticated"],
    }
    checked = {
        (
            r["spec"]["resourceAttributes"]["resource"],
            r["spec"]["resourceAttributes"]["name"],
        )
        for r in kube_as.stack.fake.sar_reviews
    }
    assert checked == {("users", "bob"), ("groups", "admins")}


async def test_as_denied_by_subject_access_review(kube_as: Kube) -> None:
    kube_as.stack.fake.sar_rules.add(("oidc:alice", "users", "bob"))
    code, _, err = await kube_as.run("get", "--raw", PODS, "--as", "carol")
    assert code != 0
    assert (
        'Error from server (Forbidden): forbidden: cannot impersonate users "carol"'
        in err
    )
    assert [r.path for r in kube_as.stack.fake.requests] == [SAR]


async def test_expired_token_is_unauthorized(kube: Kube) -> None:
    write_kubectl_config(
        kube.config,
        kube.stack.url,
        kube.stack.ca.cert_pem.bytes(),
        kube.stack.token(lifetime=-600),
    )
    code, _, err = await kube.run("get", "--raw", PODS)
    assert code != 0
    assert "You must be logged in to the server (Unauthorized)" in err
    assert kube.stack.fake.requests == []


async def test_upstream_down_is_reported(kube: Kube) -> None:
    await kube.stack.fake.stop()
    code, _, err = await kube.run("get", "--raw", PODS, "--request-timeout=5s")
    assert code != 0
    assert (
        "Error from server (ServiceUnavailable): the API server is unavailable" in err
    )
    code, _, err = await kube.run("get", "pods", "--request-timeout=5s")
    assert code != 0
    assert "(ServiceUnavailable)" in err


@pytest.mark.parametrize(
    ("transport", "env"),
    [("websocket", {}), ("spdy/3.1", {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"})],
    ids=["websocket-tunnelled-spdy", "spdy-upgrade"],
)
async def test_port_forward_carries_bytes_both_ways(
    kube: Kube, transport: str, env: dict[str, str]
) -> None:
    binary = kubectl_path()
    assert binary is not None
    dictionary = dictionary_from(binary)
    assert dictionary is not None, "no SPDY/3 header dictionary in the kubectl binary"
    kube.stack.fake.spdy_dictionary = dictionary
    proc = await kube.start("port-forward", "pod/p", ":8080", env=env)
    try:
        line = await readline(proc)
        assert line.startswith("Forwarding from 127.0.0.1:"), line
        local_port = int(line.split("127.0.0.1:", 1)[1].split()[0])
        for message in (b"hello pod\n", b"second connection\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
            writer.write(message)
            await writer.drain()
            assert (
                await asyncio.wait_for(reader.readexactly(len(message)), 10)
                == message.upper()
            )
            writer.close()
        assert proc.returncode is None
    finally:
        await stop(proc)
    (session,) = kube.stack.fake.spdy_sessions
    assert bytes(session.received) == b"hello pod\nsecond connection\n"
    assert {s.port for s in session.streams.values()} == {8080}
    (seen,) = kube.stack.fake.seen("/api/v1/namespaces/default/pods/p/portforward")
    assert seen.headers["Upgrade"].lower() == transport
    assert seen.bearer == PROXY_TOKEN
    assert seen.headers["Impersonate-User"] == "oidc:alice"


async def test_cp_streams_a_tar_into_the_pod_over_exec(
    kube: Kube, tmp_path: Path
) -> None:
    """``kubectl cp`` runs ``tar`` in the pod and streams the archive on stdin."""
    payload = os.urandom(3 * 1024 * 1024)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    code, _, err = await kube.run(
        "cp", str(source), "default/p:/tmp/payload.bin", timeout=60
    )
    assert code == 0, err
    execs = kube.stack.fake.seen("/api/v1/namespaces/default/pods/p/exec")
    assert [r.query.split("&")[0] for r in execs] == ["command=test", "command=tar"]
    assert {r.headers["Impersonate-User"] for r in execs} == {"oidc:alice"}
    with tarfile.open(fileobj=io.BytesIO(bytes(kube.stack.fake.exec_stdin))) as tar:
        (member,) = tar.getmembers()
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert hashlib.sha256(extracted.read()).digest() == (
            hashlib.sha256(payload).digest()
        )


@pytest.mark.slow
async def test_apply_of_a_5_mb_object_streams_through(
    kube: Kube, tmp_path: Path
) -> None:
    """A request body far above what the listener reads whole (64 KiB) is
    streamed to the API server under the length kubectl declared."""
    data = {f"k{i}": "v" * 1000 for i in range(5 * 1024)}
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "big", "namespace": "default"},
        "data": data,
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps(manifest))
    code, out, err = await kube.run(
        "apply", "--validate=false", "-f", str(path), timeout=60
    )
    assert code == 0, err
    assert "configmap/big created" in out
    ((size, _),) = kube.stack.fake.created
    assert size > 5 * 1024 * 1024
    (post,) = [
        r
        for r in kube.stack.fake.seen("/api/v1/namespaces/default/configmaps")
        if r.method == "POST"
    ]
    assert post.headers["Impersonate-User"] == "oidc:alice"
    assert int(post.headers["Content-Length"]) == size
