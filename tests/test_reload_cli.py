"""Live reload (issue 21) through the real command with ``--workers 2``.

What ``tests/test_reload.py`` leaves to a real process: the in-cluster
service-account token as the kubelet rotates it (a projected volume's
``..data`` symlink swap), watches and exec tunnels open while the kubeconfig
moves to another API server, and the ``--cert-dir`` pair renewed by the
running process. Every test runs the CLI as a subprocess against fakes on
127.0.0.1, under load from several clients, and prints the measured time from
the file change to its effect. A configuration file that turns invalid
changes nothing and fails the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import ssl
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import PODS, WHOAMI
from tests.fakes.issuer import FakeIssuer
from tests.proc import Proc
from tests.support.running_webhook import review_body
from tests.test_cli_webhook import free_port
from tests.test_reload import _client, _kubeconfig, _write, _write_pair


async def _streak(done: Callable[[], Awaitable[bool]], *, within: float = 6) -> float:
    """When ``done()`` began to hold 12 times in a row (new connections, so
    both workers answer some), as ``time.monotonic()``; fails if it does not
    within ``within``. The change took effect in every worker by then."""
    changed = time.monotonic()
    streak, began = 0, changed
    while streak < 12 and time.monotonic() < changed + within:
        started = time.monotonic()
        if await done():
            began = started if streak == 0 else began
            streak += 1
        else:
            streak = 0
    assert streak >= 12, f"not 12 in a row within {within}s"
    return began


def _project(sa_dir: Path, files: dict[str, bytes], generation: int) -> None:
    """Write a projected volume the way the kubelet's AtomicWriter does.

    The files go into a new timestamped directory; ``..data_tmp`` is made to
    point at it and renamed over ``..data`` (the one atomic step); each
    visible name is a symlink through ``..data``, made once; the previous
    directory is removed.
    """
    old = (sa_dir / "..data").resolve() if (sa_dir / "..data").exists() else None
    data = sa_dir / f"..2026_01_01_00_00_{generation:02d}.{generation:09d}"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    link = sa_dir / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(sa_dir / "..data")
    for name in files:
        if not (sa_dir / name).is_symlink():
            (sa_dir / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(old)


def _serving(tmp_path: Path) -> tuple[trustme.CA, list[str]]:
    """A serving pair for the proxy and the flags that give it."""
    ca = trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(ca.issue_cert("127.0.0.1"), cert_file, key_file)
    flags = ["--tls-cert-file", str(cert_file), "--tls-private-key-file", str(key_file)]
    return ca, flags


@pytest.mark.slow
async def test_two_proxy_workers_follow_the_kubelets_service_account_rotation(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """In-cluster (no ``--kubeconfig``): the token rotated twice by a
    ``..data`` swap under load from 3 clients; the API server accepts only
    the current token shortly after each rotation. 0 failures; ``ca.crt``
    swapped along with the token but unchanged does not rebuild TLS."""
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    sa = tmp_path / "serviceaccount"
    sa.mkdir()

    def project(token: str, generation: int) -> None:
        _project(
            sa,
            {"token": token.encode(), "ca.crt": fake.ca_pem, "namespace": b"gate"},
            generation,
        )

    project("sa-token-1", 1)
    fake.proxy_tokens = {"sa-token-1"}
    serving, tls_flags = _serving(tmp_path)
    port = free_port()
    args = [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--service-account-dir", str(sa),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        *tls_flags,
        "--workers", "2",
    ]  # fmt: skip
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(fake.port),
    }
    user = {"Authorization": f"Bearer {issuer.token()}"}
    client = _client(serving)
    sent = 0

    async def bearer_upstream() -> str | None:
        """One request on a new connection; the token it reached the API server with."""
        nonlocal sent
        sent += 1
        n = sent
        connector = aiohttp.TCPConnector(ssl=client, force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                f"https://127.0.0.1:{port}{WHOAMI}?n={n}", headers=user, json={}
            ) as r,
        ):
            await r.read()
            if r.status != 201:
                return None
        seen = next((q for q in fake.requests if q.query == f"n={n}"), None)
        return None if seen is None else seen.bearer

    timings: dict[str, float] = {}
    try:
        with Proc(*args, env=env) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            assert await bearer_upstream() == "sa-token-1"
            ok = failed = 0
            stop = asyncio.Event()

            async def load() -> None:
                nonlocal ok, failed
                while not stop.is_set():
                    try:
                        if await bearer_upstream() in fake.proxy_tokens:
                            ok += 1
                        else:
                            failed += 1
                    except aiohttp.ClientError:
                        failed += 1

            clients = [asyncio.create_task(load()) for _ in range(3)]
            try:
                await asyncio.sleep(0.5)
                for generation in (2, 3):
                    token, previous = (
                        f"sa-token-{generation}",
                        f"sa-token-{generation - 1}",
                    )
                    fake.proxy_tokens = {previous, token}
                    project(token, generation)
                    changed = time.monotonic()

                    async def rotated(token: str = token) -> bool:
                        return await bearer_upstream() == token

                    took = await _streak(rotated) - changed
                    timings[f"rotation {generation - 1}"] = took
                    await asyncio.sleep(0.2)  # requests in flight with the old one end
                    fake.proxy_tokens = {token}  # the old token is revoked
                    await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert failed == 0, f"{failed} failed of {ok + failed}"
            assert ok > 50
            assert fake.requests[-1].bearer == "sa-token-3"
            await proc.await_log("upstream credential reloaded", count=4, timeout=5)
            events = [e.get("event") for e in proc.logs()]
            assert "upstream tls reloaded" not in events, "ca.crt did not change"
            assert proc.stop() == 0
    finally:
        await fake.stop()
    print(
        "in-cluster token rotation to effect (proxy --workers 2):",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


@pytest.mark.slow
async def test_watches_and_tunnels_in_flight_finish_on_the_old_api_server(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """A ``kubectl get -w``-style watch and an exec tunnel are open when the
    kubeconfig moves to another API server (another CA and credential), with
    ``--workers 2`` under load. New requests go to the new server; the watch
    keeps delivering the old server's events and the tunnel keeps echoing on
    their old connections until each ends cleanly, from either side."""

    fake_a, fake_b = FakeAPIServer(trustme.CA()), FakeAPIServer(trustme.CA())
    await fake_a.start()
    await fake_b.start()
    fake_a.proxy_tokens, fake_b.proxy_tokens = {"token-a"}, {"token-b"}
    kubeconfig = tmp_path / "upstream.yaml"
    _write(
        kubeconfig, _kubeconfig(fake_a.url, fake_a.ca, {"token": "token-a"}).encode()
    )
    serving, tls_flags = _serving(tmp_path)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    args = [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--kubeconfig", str(kubeconfig),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        *tls_flags,
        "--workers", "2",
    ]  # fmt: skip
    user = {"Authorization": f"Bearer {issuer.token()}"}
    client = _client(serving)
    sent = 0

    async def answered_by() -> str:
        """One request on a new connection: ``a`` or ``b``, the server that saw it."""
        nonlocal sent
        sent += 1
        n = sent
        connector = aiohttp.TCPConnector(ssl=client, force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"{base}{WHOAMI}?n={n}", headers=user, json={}) as r,
        ):
            await r.read()
            assert r.status == 201, r.status
        by = [name for name, fake in (("a", fake_a), ("b", fake_b))
              if any(q.query == f"n={n}" for q in fake.requests)]  # fmt: skip
        assert len(by) == 1, by
        return by[0]

    async def event(stream: aiohttp.ClientResponse) -> dict[str, object]:
        line = await asyncio.wait_for(stream.content.readline(), 5)
        assert line, "the watch ended early"
        parsed: dict[str, object] = json.loads(line)
        return parsed

    async def echo(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        await ws.send_bytes(b"\x00" + data)
        out = b""
        while out != data:
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type == WSMsgType.BINARY, msg
            assert msg.data[0] == 1
            out += msg.data[1:]

    timings: dict[str, float] = {}
    try:
        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client)
            ) as session:
                watch = await session.get(
                    f"{base}{PODS}", params={"watch": "true"}, headers=user
                )
                assert watch.status == 200
                assert (await event(watch))["type"] == "ADDED"
                ws = await session.ws_connect(
                    f"{base}{PODS}/p/exec?command=cat&stdin=true&stdout=true",
                    protocols=["v5.channel.k8s.io"],
                    headers=user,
                )
                await echo(ws, b"before")
                ok = failed = 0
                stop = asyncio.Event()

                async def load() -> None:
                    nonlocal ok, failed
                    while not stop.is_set():
                        try:
                            await answered_by()
                            ok += 1
                        except (aiohttp.ClientError, AssertionError):
                            failed += 1

                clients = [asyncio.create_task(load()) for _ in range(3)]
                try:
                    await asyncio.sleep(0.5)
                    _write(
                        kubeconfig,
                        _kubeconfig(
                            fake_b.url, fake_b.ca, {"token": "token-b"}
                        ).encode(),
                    )
                    changed = time.monotonic()

                    async def moved() -> bool:
                        return await answered_by() == "b"

                    timings["kubeconfig"] = await _streak(moved) - changed
                    # The streams opened before the change still flow, on A.
                    fake_a.emit("ADDED", "after-switch")
                    got = await event(watch)
                    assert got["type"] == "ADDED"
                    assert got["object"]["metadata"]["name"] == "after-switch"  # type: ignore[index]
                    await echo(ws, b"after the switch")
                    await asyncio.sleep(0.3)
                finally:
                    stop.set()
                    await asyncio.gather(*clients)
                assert failed == 0, f"{failed} failed of {ok + failed}"
                assert ok > 20
                # A new watch goes to B.
                async with session.get(
                    f"{base}{PODS}", params={"watch": "true"}, headers=user
                ) as new_watch:
                    assert (await event(new_watch))["type"] == "ADDED"
                    assert len(fake_b.watches) == 1
                    assert len(fake_a.watches) == 1
                # The old ones end cleanly: the exec when its stdin closes...
                await ws.send_bytes(b"\xff\x00")
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.data[0] == 3
                assert json.loads(msg.data[1:])["status"] == "Success"
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
                await ws.close()
                # ... and the watch when A ends it: a whole chunked body.
                fake_a.watches[0].queue.put_nowait(None)
                rest = await asyncio.wait_for(watch.content.read(), 5)
                assert rest == b""
                assert watch.content.is_eof()
                watch.release()
                assert fake_b.seen(f"{PODS}/p/exec") == []
                assert fake_a.seen(f"{PODS}/p/exec")[0].bearer == "token-a"
            assert proc.stop() == 0
    finally:
        await fake_a.stop()
        await fake_b.stop()
    print(
        "kubeconfig switch with a watch and an exec open (proxy --workers 2):",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


class _Exchange:
    """One review over a raw TLS connection: the certificate the server sent
    and whether the answer authenticated the token. Kept open for more."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader, self.writer = reader, writer
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.served = x509.load_der_x509_certificate(der)

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> _Exchange:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5
        )
        return cls(reader, writer)

    async def review(self, token: str) -> bool:
        body = json.dumps(review_body(token)).encode()
        self.writer.write(
            b"POST /authenticate HTTP/1.1\r\nHost: gate\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = await asyncio.wait_for(self.reader.readexactly(length), 5)
        authenticated = json.loads(answer)["status"].get("authenticated") is True
        return head.startswith(b"HTTP/1.1 200 ") and authenticated

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def _unverified() -> ssl.SSLContext:
    """A client that records what it is served and checks it afterwards: a
    self-signed pair renewed is a new CA, which a client can only trust once
    it has read the new file."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.slow
async def test_two_workers_renew_the_generated_cert_dir_pair(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """``--cert-dir`` with an 18-second pair and ``--workers 2`` under load from
    3 clients: the running process renews it twice (one worker writes each
    time), new handshakes get the new pair and verify against the new file,
    a connection made before keeps working on the old one; a pair put in the
    directory by someone else is served too. 0 failed reviews."""
    cert_dir = tmp_path / "certs"
    crt = cert_dir / "kube-oidc-gate.crt"
    port = free_port()
    args = [
        "webhook",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--cert-dir", str(cert_dir),
        "--cert-dir-validity", "18",
        "--workers", "2",
    ]  # fmt: skip
    token = issuer.token()
    written: list[tuple[float, bytes]] = []  # (first seen, file content)
    served: set[bytes] = set()
    stop = asyncio.Event()

    async def watch_file() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                data = crt.read_bytes()
                if data and (not written or written[-1][1] != data):
                    written.append((time.monotonic(), data))
            await asyncio.sleep(0.01)

    async def review_on_new_connection() -> bool:
        exchange = await _Exchange.open(port, _unverified())
        try:
            served.add(exchange.served.public_bytes(serialization.Encoding.PEM))
            return await exchange.review(token)
        finally:
            await exchange.close()

    async def new_file_served() -> bool:
        """A strict client that trusts the file as it is now."""
        strict = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        strict.load_verify_locations(cadata=crt.read_text())
        try:
            exchange = await _Exchange.open(port, strict)
        except ssl.SSLCertVerificationError:  # the previous pair, still
            return False
        try:
            return await exchange.review(token)
        finally:
            await exchange.close()

    async def nth_write(n: int) -> float:
        async with asyncio.timeout(30):
            while len(written) < n:
                await asyncio.sleep(0.01)
        return written[n - 1][0]

    timings: dict[str, float] = {}
    with Proc(*args) as proc:
        await proc.await_log("serving", count=2, timeout=20)
        await proc.await_log("jwks keys loaded", count=2, timeout=20)
        watcher = asyncio.create_task(watch_file())
        await nth_write(1)
        first = written[0][1]
        kept = await _Exchange.open(
            port, ssl.create_default_context(cadata=first.decode())
        )
        assert await kept.review(token)
        ok = failed = 0

        async def load() -> None:
            nonlocal ok, failed
            while not stop.is_set():
                try:
                    if await review_on_new_connection():
                        ok += 1
                    else:
                        failed += 1
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                    failed += 1

        clients = [asyncio.create_task(load()) for _ in range(3)]
        try:
            for n in (2, 3):
                changed = await nth_write(n)
                # Within 10 s: the pair lives 18 s and is renewed with 6 s
                # left, so the next renewal is 12 s away; a loaded machine
                # needs seconds for 12 fresh TLS connections in a row.
                took = await _streak(new_file_served, within=10) - changed
                timings[f"renewal {n - 1}"] = took
                if n == 2:
                    # The connection made before the renewal still works, on
                    # the first pair.
                    assert await kept.review(token)
                    assert kept.served.public_bytes(serialization.Encoding.PEM) == first
                    await kept.close()
            # Someone else's pair in the directory: loaded like a renewal.
            external_ca = trustme.CA()
            external = external_ca.issue_cert("127.0.0.1")
            _write(cert_dir / "kube-oidc-gate.key", external.private_key_pem.bytes())
            _write(crt, external.cert_chain_pems[0].bytes())
            changed = time.monotonic()
            strict = _client(external_ca)

            async def external_served() -> bool:
                try:
                    exchange = await _Exchange.open(port, strict)
                except ssl.SSLCertVerificationError:
                    return False
                try:
                    return await exchange.review(token)
                finally:
                    await exchange.close()

            took = await _streak(external_served, within=10) - changed
            timings["external pair"] = took
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients, watcher)
        assert failed == 0, f"{failed} failed of {ok + failed}"
        assert ok > 30
        # Only pairs that were in the file were ever served.
        in_file = {data for _, data in written}
        assert served <= in_file, "a pair never written was served"
        assert len(served) >= 3
        # Each renewal written once, by one worker.
        renewed = [
            e
            for e in proc.logs()
            if e.get("event") == "self-signed certificate renewed"
        ]
        assert len(renewed) == 2, renewed
        assert crt.read_bytes() == external.cert_chain_pems[0].bytes()
        assert proc.stop() == 0
    print(
        "--cert-dir pair renewal to effect (webhook --workers 2):",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


@pytest.mark.slow
def test_the_new_flags_refuse_what_cannot_work(tmp_path: Path) -> None:
    """``--cert-dir-validity`` too short to renew in time, and
    ``--service-account-dir`` beside ``--kubeconfig``: named at start."""
    from tests.test_cli_startup import run_cli

    kubeconfig = tmp_path / "upstream.yaml"
    kubeconfig.write_text(_kubeconfig("https://127.0.0.1:1", trustme.CA(), {}))
    code, lines = run_cli(
        "proxy",
        "--oidc-issuer-url", "https://idp.example.test",
        "--oidc-client-id", "kubernetes",
        "--kubeconfig", str(kubeconfig),
        "--service-account-dir", str(tmp_path),
        "--cert-dir", str(tmp_path / "certs"),
        "--cert-dir-validity", "2",
    )  # fmt: skip
    assert code == 2
    listed = "\n".join(lines)
    assert "--cert-dir-validity must be at least 6 seconds, got 2" in listed
    assert "give either it or --kubeconfig, not both" in listed
    assert not (tmp_path / "certs").exists()


@pytest.mark.slow
def test_the_generated_pair_is_renewed_by_one_writer(tmp_path: Path) -> None:
    """``SelfSigned`` on its own: reused while fresh, renewed (a new key) once
    a third is left, and of two processes due at once only one writes."""
    import multiprocessing

    from proxy.certs import ensure_self_signed, self_signed

    generated = self_signed(
        str(tmp_path), ["127.0.0.1"], validity=dt.timedelta(seconds=3)
    )
    key = Path(generated.pair.key_file)
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_bytes()
    assert generated.renew_if_due() is False  # two thirds left
    assert (
        ensure_self_signed(
            str(tmp_path), ["127.0.0.1"], validity=dt.timedelta(seconds=3)
        )
        == generated.pair
    )
    assert key.read_bytes() == first, "reused at start while fresh"
    time.sleep(max(0.0, generated.due_at() - time.time()) + 0.1)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        wrote = pool.map(_renew, [generated, generated])
    assert sorted(wrote) == [False, True]
    assert key.read_bytes() != first
    assert key.stat().st_mode & 0o777 == 0o600


def _renew(generated: object) -> bool:
    from proxy.certs import SelfSigned

    assert isinstance(generated, SelfSigned)
    return generated.renew_if_due()


def serving_args(tmp_path: Path, port: int, grace: float) -> list[str]:
    return [
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--cert-dir", str(tmp_path / "certs"),
        "--shutdown-grace-period", str(grace),
    ]  # fmt: skip


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(tmp_path / "certs" / "kube-oidc-gate.crt")
    )


# --------------------------------------------------------------------------
# Configuration is read once


def auth_file(issuer_url: str, prefix: str, *, broken_second: bool = False) -> str:
    text = textwrap.dedent(
        f"""\
        apiVersion: apiserver.config.k8s.io/v1
        kind: AuthenticationConfiguration
        jwt:
        - issuer:
            url: {issuer_url}
            audiences: [kubernetes]
          claimMappings:
            username: {{claim: sub, prefix: "{prefix}"}}
        """
    )
    if broken_second:
        text += textwrap.dedent(
            """\
            - issuer:
                url: http://idp.example.com
              claimMappings:
                username: {claim: sub}
            """
        )
    return text


async def _username(session: aiohttp.ClientSession, url: str, token: str) -> str:
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    async with session.post(url + "/authenticate", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["status"]["authenticated"] is True
    return str(answer["status"]["user"]["username"])


@pytest.mark.slow
async def test_a_broken_config_file_changes_nothing_and_fails_the_next_start(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    path = tmp_path / "authentication.yaml"
    path.write_text(auth_file(issuer.url, "loaded:"))
    port = free_port()
    args = ["webhook", "--authentication-config", str(path)]
    args += serving_args(tmp_path, port, 2)
    url = f"https://127.0.0.1:{port}"
    token = issuer.token()
    with Proc(*args) as proc:
        await proc.await_log("jwks keys loaded", timeout=20)
        # Keys can load before the listener is up: wait for both.
        await proc.await_log("serving", timeout=20)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(tmp_path))
        ) as s:
            assert await _username(s, url, token) == "loaded:00u1alice"
            # Half valid: a new prefix for the first issuer, a broken second one.
            # The live reload (issue 21) refuses the whole file, never half.
            path.write_text(auth_file(issuer.url, "changed:", broken_second=True))
            await proc.await_log(
                "authentication config not reloaded, the last good one serves",
                timeout=5,
            )
            for _ in range(5):
                assert await _username(s, url, token) == "loaded:00u1alice"
        assert not any(
            e.get("event") == "authentication config reloaded" for e in proc.logs()
        )
        assert proc.stop() == 0
    with Proc(*args) as restarted:
        rc = await asyncio.to_thread(restarted.popen.wait, 20)
    err = "".join(restarted.stderr)
    assert rc == 2
    assert err.startswith("error: 3 problems:\n"), err
    for field in (
        "jwt[1].issuer.url",
        "jwt[1].issuer.audiences",
        "jwt[1].claimMappings.username.prefix",
    ):
        assert field in err, field
