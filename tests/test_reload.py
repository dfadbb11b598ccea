"""Live reload (issue 21): the serving pair and the client CA change without a restart.

Real TLS on 127.0.0.1 with trustme CAs: in process against ``ServingTLS``'s
listener context, and through the real CLI with ``--workers 2`` under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from cryptography import x509

from proxy.certs import CertPair, ServingTLS
from proxy.metrics import Metrics
from proxy.upstream import Upstream, UpstreamSettings
from proxy.watch import FileWatcher
from tests.fakes.issuer import FakeIssuer
from tests.proc import Proc
from tests.support.running_webhook import parse_review, review_body
from tests.test_cli_webhook import free_port


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, as kubelet and cert-manager do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_pair(cert: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    _write(cert_file, cert.cert_chain_pems[0].bytes())
    _write(key_file, cert.private_key_pem.bytes())


def _client(*cas: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def _ca_name(ca: trustme.CA) -> str:
    """The organizational unit trustme gives each CA: which CA issued a peer."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return str(cert.subject.rfc4514_string())


async def _served_by(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake, then return the issuer of the certificate the server sent."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        return str(x509.load_der_x509_certificate(der).issuer.rfc4514_string())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def _echo_server(tls: ServingTLS) -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=tls.context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_the_watcher_notices_rewrites_renames_and_deletions(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    calls: list[str] = []
    watcher = FileWatcher()
    watcher.add("pair", [str(a), str(b)], lambda: calls.append("pair"))
    assert await watcher.check() == []
    b.write_text("later")  # missing at start, written later: a change
    assert await watcher.check() == ["pair"]
    _write(a, b"2")  # a rename over it
    assert await watcher.check() == ["pair"]
    a.write_text("33")  # in place
    assert await watcher.check() == ["pair"]
    assert await watcher.check() == []
    assert await watcher.check(force=True) == ["pair"]  # SIGHUP
    assert calls == ["pair"] * 4


async def test_new_handshakes_get_the_new_pair_and_open_connections_finish(
    tmp_path: Path,
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(old_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    tls = ServingTLS(CertPair(str(cert_file), str(key_file)))
    both = _client(old_ca, new_ca)
    async with _echo_server(tls) as port:
        assert await _served_by(port, both) == _ca_name(old_ca)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=both)
        _write_pair(new_ca.issue_cert("127.0.0.1"), cert_file, key_file)
        assert tls.reload() is True
        assert await _served_by(port, both) == _ca_name(new_ca)
        # The connection made before the change still works, on the old pair.
        writer.write(b"still here\n")
        assert await reader.readline() == b"still here\n"
        writer.close()
        # A client that trusts only the old CA is refused now: the swap is real.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _served_by(port, _client(old_ca))


async def test_a_half_written_pair_keeps_the_last_good_one(tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(old_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    tls = ServingTLS(CertPair(str(cert_file), str(key_file)))
    both = _client(old_ca, new_ca)
    new = new_ca.issue_cert("127.0.0.1")
    async with _echo_server(tls) as port:
        _write(cert_file, new.cert_chain_pems[0].bytes())  # the key comes later
        assert tls.reload() is False
        assert await _served_by(port, both) == _ca_name(old_ca)
        cert_file.write_bytes(new.cert_chain_pems[0].bytes()[:100])  # truncated
        assert tls.reload() is False
        assert await _served_by(port, both) == _ca_name(old_ca)
        _write_pair(new, cert_file, key_file)
        assert tls.reload() is True
        assert await _served_by(port, both) == _ca_name(new_ca)


@pytest.mark.slow
async def test_the_client_ca_is_replaced_not_added_to(tmp_path: Path) -> None:
    server_ca, old_client_ca, new_client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca_file = tmp_path / "client-ca.crt"
    _write_pair(server_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    _write(ca_file, old_client_ca.cert_pem.bytes())
    tls = ServingTLS(
        CertPair(str(cert_file), str(key_file)), client_ca_file=str(ca_file)
    )
    old_client = _client(server_ca, cert=old_client_ca.issue_cert("apiserver"))
    new_client = _client(server_ca, cert=new_client_ca.issue_cert("apiserver"))

    async def echoes(ctx: ssl.SSLContext) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            writer.write(b"ping\n")
            # TLS 1.3: a refused client certificate shows after the handshake.
            return await reader.readline() == b"ping\n"
        except (ConnectionError, ssl.SSLError):
            return False
        finally:
            writer.close()

    async with _echo_server(tls) as port:
        assert await echoes(old_client) is True
        assert await echoes(new_client) is False
        _write(ca_file, new_client_ca.cert_pem.bytes())
        assert tls.reload() is True
        assert await echoes(new_client) is True
        assert await echoes(old_client) is False, "the old CA is gone, not kept"
        _write(ca_file, b"not a certificate\n")
        assert tls.reload() is False
        assert await echoes(new_client) is True


@pytest.mark.slow
async def test_two_workers_rotate_the_serving_pair_under_load(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """Cert written first, key 300 ms later, to a new CA: no request fails."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(old_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    port = free_port()
    args = [
        "webhook",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--tls-cert-file", str(cert_file),
        "--tls-private-key-file", str(key_file),
        "--workers", "2",
    ]  # fmt: skip
    token = issuer.token(groups=["devs"])
    both = _client(old_ca, new_ca)
    with Proc(*args) as proc:
        await proc.await_log("serving", count=2, timeout=20)
        await proc.await_log("jwks keys loaded", count=2, timeout=20)
        ok = failed = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal ok, failed
            # A new connection per request: each one is a new handshake.
            connector = aiohttp.TCPConnector(ssl=both, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while not stop.is_set():
                    try:
                        async with session.post(
                            f"https://127.0.0.1:{port}/authenticate",
                            json=review_body(token),
                        ) as r:
                            review = parse_review(await r.text())
                            assert review.status.authenticated is True
                            ok += 1
                    except (aiohttp.ClientError, AssertionError):
                        failed += 1

        clients = [asyncio.create_task(load()) for _ in range(4)]
        try:
            await asyncio.sleep(0.5)
            new = new_ca.issue_cert("127.0.0.1")
            _write(cert_file, new.cert_chain_pems[0].bytes())
            await asyncio.sleep(1.5)  # past a poll: the half pair is seen, refused
            assert await _served_by(port, both) == _ca_name(old_ca)
            _write(key_file, new.private_key_pem.bytes())
            changed = time.monotonic()
            deadline = changed + 5
            streak = 0
            while streak < 12 and time.monotonic() < deadline:
                # Both workers must have swapped: a run of new handshakes all new.
                new_one = await _served_by(port, both) == _ca_name(new_ca)
                streak = streak + 1 if new_one else 0
            took = time.monotonic() - changed
            assert streak >= 12, "both workers serve the new pair"
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        print(f"serving pair change to effect (both workers): {took:.2f}s")
        assert failed == 0, f"{failed} failed of {ok + failed}"
        assert ok > 50
        assert took < 2.5
        refusals = [
            e
            for e in proc.logs()
            if e.get("event", "").startswith("serving certificate not")
        ]
        assert len(refusals) >= 2, "each worker saw the half pair and kept the old"
        await proc.await_log("serving certificate reloaded", count=2, timeout=5)
        # SIGHUP reaches every worker through the parent, which lives on.
        os.kill(proc.pid, signal.SIGHUP)
        await proc.await_log("reloading on SIGHUP", count=2, timeout=5)
        await proc.await_log("serving certificate reloaded", count=4, timeout=5)
        assert proc.popen.poll() is None
        assert proc.stop() == 0


def _auth_file(
    issuers: list[str],
    *,
    audiences: str = "[kubernetes]",
    rule: bool = False,
) -> str:
    entries = []
    for n, url in enumerate(issuers):
        policy = (
            "    audienceMatchPolicy: MatchAny\n" if n == 0 and "," in audiences else ""
        )
        entry = (
            f"- issuer:\n"
            f"    url: {url}\n"
            f"    audiences: {audiences if n == 0 else '[kubernetes]'}\n"
            f"{policy}"
            f"  claimMappings:\n"
            f'    username: {{claim: sub, prefix: "i{n}:"}}\n'
        )
        if rule and n == 1:
            entry += (
                "  claimValidationRules:\n"
                "  - expression: \"claims.sub != '00u1mallory'\"\n"
                "    message: mallory is out\n"
            )
        entries.append(entry)
    return (
        "apiVersion: apiserver.config.k8s.io/v1\n"
        "kind: AuthenticationConfiguration\n"
        "jwt:\n" + "".join(entries)
    )


async def _scrape(probe: str, name: str) -> dict[str, float]:
    """Samples of metric ``name`` by their ``status`` label (all workers)."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{probe}/metrics") as r,
    ):
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            out[status] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.slow
async def test_two_workers_reload_the_authentication_config_under_load(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    from tests.fakes.issuer import serve_issuer

    path = tmp_path / "authentication.yaml"
    path.write_text(_auth_file([issuer.url]))
    port, probe_port = free_port(), free_port()
    args = [
        "webhook",
        "--authentication-config", str(path),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{probe_port}",
        "--cert-dir", str(tmp_path / "certs"),
        "--workers", "2",
    ]  # fmt: skip
    url = f"https://127.0.0.1:{port}/authenticate"
    probe = f"http://127.0.0.1:{probe_port}"
    steady = issuer.token()
    timings: dict[str, float] = {}
    async with serve_issuer() as second:
        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            ctx = ssl.create_default_context(
                cafile=str(tmp_path / "certs/kube-oidc-gate.crt")
            )
            ok = failed = 0
            stop = asyncio.Event()

            async def review(session: aiohttp.ClientSession, token: str) -> str | None:
                async with session.post(url, json=review_body(token)) as r:
                    status = parse_review(await r.text()).status
                    return status.user.username if status.authenticated else None

            async def load() -> None:
                nonlocal ok, failed
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    while not stop.is_set():
                        try:
                            assert await review(session, steady) == "i0:00u1alice"
                            ok += 1
                        except (aiohttp.ClientError, AssertionError):
                            failed += 1

            async def effective(
                what: str, text: str, token: str, want: str | None
            ) -> None:
                """Write ``text``; wait until a run of answers (both workers) is ``want``."""
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    _write(path, text.encode())
                    changed = time.monotonic()
                    streak = 0
                    while streak < 12 and time.monotonic() < changed + 6:
                        got = await review(session, token)
                        streak = streak + 1 if got == want else 0
                    timings[what] = time.monotonic() - changed
                    assert streak >= 12, f"{what}: got {got!r}, want {want!r}"

            clients = [asyncio.create_task(load()) for _ in range(3)]
            try:
                await asyncio.sleep(0.3)
                b_token = second.token()
                b_mallory = second.token(sub="00u1mallory")
                assert b_token  # not ours yet: "not mine"
                both = [issuer.url, second.url]
                await effective(
                    "add an issuer", _auth_file(both), b_token, "i1:00u1alice"
                )
                # Accepted now, and cached: the rule below must purge it.
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    for _ in range(6):
                        assert await review(session, b_mallory) == "i1:00u1mallory"
                other = issuer.token(audience="other")
                await effective(
                    "change an audience",
                    _auth_file(both, audiences="[kubernetes, other]"),
                    other,
                    "i0:00u1alice",
                )
                await effective(
                    "add a CEL rule",
                    _auth_file(both, audiences="[kubernetes, other]", rule=True),
                    b_mallory,
                    None,
                )
                good = _auth_file(both, audiences="[kubernetes, other]", rule=True)
                _write(
                    path,
                    good.replace(
                        "url: " + second.url, "url: http://idp.example.com"
                    ).encode(),
                )
                broken_at = time.monotonic()
                name = "kube_oidc_gate_authentication_config_controller_automatic_reloads_total"
                while time.monotonic() < broken_at + 6:
                    if (await _scrape(probe, name)).get("failure", 0) >= 2:
                        break
                    await asyncio.sleep(0.1)
                timings["broken file reported"] = time.monotonic() - broken_at
                assert (await _scrape(probe, name)) == {"success": 6, "failure": 2}
                stamps = await _scrape(
                    probe,
                    "kube_oidc_gate_authentication_config_controller_automatic_reload_last_timestamp_seconds",
                )
                assert stamps["failure"] > stamps["success"] > 0
                async with aiohttp.ClientSession() as s:
                    for _ in range(6):  # either worker answers: both say so
                        async with s.get(f"{probe}/readyz") as r:
                            assert r.status == 200
                            text = await r.text()
                            assert "the last reload failed" in text, text
                            assert "jwt[1].issuer.url" in text, text
                # The last good configuration still serves.
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    assert await review(session, b_token) == "i1:00u1alice"
                    assert await review(session, other) == "i0:00u1alice"
                _write(path, good.encode())
                fixed_at = time.monotonic()
                while time.monotonic() < fixed_at + 6:
                    if (await _scrape(probe, name)).get("success", 0) >= 8:
                        break
                    await asyncio.sleep(0.05)
                timings["fix the file"] = time.monotonic() - fixed_at
                await proc.await_log(
                    "authentication config reloaded", count=8, timeout=5
                )
                assert (await _scrape(probe, name)) == {"success": 8, "failure": 2}
                async with aiohttp.ClientSession() as s:
                    for _ in range(6):
                        async with s.get(f"{probe}/readyz") as r:
                            assert "reload failed" not in await r.text()
            finally:
                stop.set()
                await asyncio.gather(*clients)
            refused = [
                e
                for e in proc.logs()
                if e.get("event")
                == "authentication config not reloaded, the last good one serves"
            ]
            assert len(refused) == 2
            assert any("jwt[1].issuer.url" in p for p in refused[0]["problems"])
            assert failed == 0, f"{failed} failed of {ok + failed}"
            assert ok > 50
            assert proc.stop() == 0
    print(
        "authentication config change to effect (both workers):",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


@contextlib.asynccontextmanager
async def _whoami_server(
    server_cert: trustme.LeafCert, client_ca: trustme.CA | None, name: str = ""
) -> AsyncIterator[str]:
    """An https server answering with its ``name``, the client certificate's
    names and the bearer (``/slow``: the same, two seconds later)."""
    from aiohttp import web

    async def whoami(request: web.Request) -> web.Response:
        peer = (
            request.transport.get_extra_info("peercert") if request.transport else None
        )
        names = [v for (k, v) in (peer or {}).get("subjectAltName", ())]
        bearer = request.headers.get("Authorization", "")
        if request.path == "/slow":
            await asyncio.sleep(2)
        return web.Response(text=f"{name}@{','.join(names)}|{bearer}")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/slow", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _rotating_upstream_load(
    upstream: Upstream, want: str, rotate: Callable[[], Awaitable[None]]
) -> float:
    """4 clients fetch through ``upstream`` while ``rotate`` runs; return the
    seconds from its end until every answer contains ``want``. No failure."""
    stop = asyncio.Event()
    failures: list[BaseException] = []
    done = 0

    async def client() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with await upstream.fetch(
                    "GET",
                    "/whoami",
                    headers=upstream.auth_items,
                    connect_timeout=5,
                    head_timeout=5,
                ) as r:
                    assert r.status == 200
                    await r.read(1 << 16)
                    done += 1
            except Exception as err:  # counted, then asserted none
                failures.append(err)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)
        await rotate()
        changed = time.monotonic()
        streak = 0
        while streak < 20 and time.monotonic() < changed + 5:
            async with await upstream.fetch(
                "GET",
                "/whoami",
                headers=upstream.auth_items,
                connect_timeout=5,
                head_timeout=5,
            ) as r:
                body = (await r.read(1 << 16)).decode()
            streak = streak + 1 if want in body else 0
        took = time.monotonic() - changed
        assert streak >= 20, body
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == [], failures[:3]
    assert done > 50
    return took


@pytest.mark.slow
async def test_the_upstream_client_certificate_rotates_under_load(
    tmp_path: Path,
) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    old = client_ca.issue_cert("proxy-old")
    new = client_ca.issue_cert("proxy-new")
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"
    _write_pair(old, cert_file, key_file)
    async with _whoami_server(server_ca.issue_cert("127.0.0.1"), client_ca) as url:
        config = tmp_path / "kubeconfig"
        config.write_text(_kubeconfig(url, server_ca, {
            "client-certificate": str(cert_file), "client-key": str(key_file),
        }))  # fmt: skip
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        await upstream.start()
        try:

            async def rotate() -> None:
                _write(cert_file, new.cert_chain_pems[0].bytes())
                await asyncio.sleep(1.5)  # a poll sees the half pair: kept
                _write(key_file, new.private_key_pem.bytes())

            took = await _rotating_upstream_load(upstream, "proxy-new|", rotate)
        finally:
            await upstream.close()
    print(f"upstream client certificate change to effect: {took:.2f}s")
    assert took < 2.5


@pytest.mark.slow
async def test_a_kubeconfig_token_file_is_reread(tmp_path: Path) -> None:
    server_ca = trustme.CA()
    token_file = tmp_path / "token"
    _write(token_file, b"token-1\n")
    async with _whoami_server(server_ca.issue_cert("127.0.0.1"), None) as url:
        config = tmp_path / "kubeconfig"
        config.write_text(_kubeconfig(url, server_ca, {"tokenFile": "token"}))
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)))
        await upstream.start()
        try:
            assert upstream.auth_headers() == {"Authorization": "Bearer token-1"}

            async def rotate() -> None:
                _write(token_file, b"token-2\n")

            took = await _rotating_upstream_load(upstream, "|Bearer token-2", rotate)
        finally:
            await upstream.close()
    print(f"upstream token file change to effect: {took:.2f}s")
    assert took < 2.5


@pytest.mark.slow
async def test_a_rewritten_kubeconfig_moves_requests_to_the_new_server(
    tmp_path: Path,
) -> None:
    ca_a, ca_b = trustme.CA(), trustme.CA()
    async with (
        _whoami_server(ca_a.issue_cert("127.0.0.1"), None, "a") as url_a,
        _whoami_server(ca_b.issue_cert("127.0.0.1"), None, "b") as url_b,
    ):
        config = tmp_path / "kubeconfig"
        _write(config, _kubeconfig(url_a, ca_a, {"token": "token-a"}).encode())
        metrics = Metrics()
        upstream = Upstream(UpstreamSettings(kubeconfig=str(config)), metrics=metrics)
        await upstream.start()
        watcher = FileWatcher()
        watcher.add("upstream kubeconfig", [str(config)], upstream.reload_kubeconfig)
        watching = asyncio.create_task(watcher.run())
        try:

            async def slow_request() -> str:
                async with await upstream.fetch(
                    "GET", "/slow", headers=upstream.auth_items, connect_timeout=5
                ) as r:
                    return (await r.read(1 << 16)).decode()

            slow: list[asyncio.Task[str]] = []

            async def rotate() -> None:
                broken = [
                    b"clusters: [\n",  # not yaml
                    _kubeconfig(  # plain http to a remote host: refused at start
                        "http://192.0.2.1:80", ca_b, {"token": "token-b"}
                    ).encode(),
                ]
                for text in broken:
                    _write(config, text)
                    await asyncio.sleep(1.3)
                    assert str(upstream.base_url) == url_a
                    assert upstream.auth_headers() == {
                        "Authorization": "Bearer token-a"
                    }
                slow.append(asyncio.create_task(slow_request()))
                await asyncio.sleep(0.2)  # sent, its answer two seconds away
                _write(config, _kubeconfig(url_b, ca_b, {"token": "token-b"}).encode())

            took = await _rotating_upstream_load(upstream, "b@|Bearer token-b", rotate)
            # A request sent before the change finishes on the old server.
            assert await slow[0] == "a@|Bearer token-a"
            assert str(upstream.base_url) == url_b
            # SIGHUP (a poke) loads the same file again: still the new server.
            watcher.poke()
            await asyncio.sleep(0.3)
            assert str(upstream.base_url) == url_b

            def reloads(status: str) -> float:
                name = "kube_oidc_gate_upstream_reloads_total"
                value = metrics.registry.get_sample_value(name, {"status": status})
                return value or 0.0

            assert (reloads("failure"), reloads("success")) == (2.0, 2.0)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await upstream.close()
    print(f"upstream kubeconfig change to effect: {took:.2f}s")
    assert took < 2.5


def _kubeconfig(url: str, ca: trustme.CA, user: dict[str, str]) -> str:
    import base64

    import yaml

    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": url,
            "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode(),
        }}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    })  # fmt: skip


@pytest.mark.slow
async def test_a_new_issuer_ca_is_used_after_a_reload(tls_issuer: FakeIssuer) -> None:
    """``--oidc-ca-file`` / ``certificateAuthority`` rotated: the keys load over it."""
    from dataclasses import replace

    from proxy.app import ConfigReloader, start_engine
    from proxy.config import JWTAuthenticatorConfig
    from proxy.metrics import Metrics
    from tests.helpers import auth_config, authenticator_config

    good = authenticator_config(tls_issuer.url)

    def issuer_with(pem: str | None) -> JWTAuthenticatorConfig:
        return replace(good, issuer=replace(good.issuer, certificate_authority=pem))

    stale = auth_config(issuer_with(trustme.CA().cert_pem.bytes().decode()))
    fresh = auth_config(issuer_with(tls_issuer.ca_pem))
    engine = await start_engine(stale, metrics=Metrics())
    try:
        old = engine.keysets.get(tls_issuer.url)
        await asyncio.sleep(0.3)
        assert not old.ready, "the old CA does not verify the issuer"
        token = tls_issuer.token()
        started = time.monotonic()
        assert await ConfigReloader(engine, lambda: fresh).reload() is True
        took = time.monotonic() - started
        assert engine.keysets.get(tls_issuer.url).ready
        assert engine.keysets.get(tls_issuer.url) is not old
        user = await engine.authenticator.authenticate(token)
        assert user is not None
        assert user.username == f"{tls_issuer.url}#00u1alice"
        rendered = engine.metrics.render().decode()
        assert (
            'kube_oidc_gate_authentication_config_controller_automatic_reloads_total{status="success"} 1.0'
            in rendered
        )
    finally:
        await engine.close()
    print(f"issuer CA reload (keys fetched over the new CA, then swapped): {took:.2f}s")


@pytest.mark.slow
async def test_two_proxy_workers_reload_pair_config_and_upstream_token_under_load(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """The proxy front end: the same reloads, and its upstream token, live."""
    from tests.fakes.apiserver import FakeAPIServer
    from tests.fakes.apiserver_harness import WHOAMI

    def auth_file(prefix: str) -> bytes:
        return (
            "apiVersion: apiserver.config.k8s.io/v1\n"
            "kind: AuthenticationConfiguration\n"
            "jwt:\n"
            f"- issuer: {{url: '{issuer.url}', audiences: [kubernetes]}}\n"
            f"  claimMappings: {{username: {{claim: sub, prefix: '{prefix}'}}}}\n"
        ).encode()

    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(old_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    config, token_file = tmp_path / "auth.yaml", tmp_path / "proxy-token"
    _write(config, auth_file("p1:"))
    _write(token_file, b"proxy-token-1\n")
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    fake.proxy_tokens = {"proxy-token-1"}
    kubeconfig = tmp_path / "upstream.yaml"
    kubeconfig.write_text(
        _kubeconfig(fake.url, fake.ca, {"tokenFile": str(token_file)})
    )
    port = free_port()
    args = [
        "proxy",
        "--authentication-config", str(config),
        "--kubeconfig", str(kubeconfig),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--tls-cert-file", str(cert_file),
        "--tls-private-key-file", str(key_file),
        "--workers", "2",
    ]  # fmt: skip
    url = f"https://127.0.0.1:{port}{WHOAMI}"
    user_token = issuer.token()
    both = _client(old_ca, new_ca)
    timings: dict[str, float] = {}
    try:
        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            ok = failed = 0
            stop = asyncio.Event()

            async def whoami(session: aiohttp.ClientSession) -> str:
                async with session.post(
                    url, json={}, headers={"Authorization": f"Bearer {user_token}"}
                ) as r:
                    assert r.status == 201, r.status
                    return str((await r.json())["status"]["userInfo"]["username"])

            async def load() -> None:
                nonlocal ok, failed
                connector = aiohttp.TCPConnector(ssl=both, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    while not stop.is_set():
                        try:
                            assert await whoami(session) in (
                                "p1:00u1alice",
                                "p2:00u1alice",
                            )
                            ok += 1
                        except (aiohttp.ClientError, AssertionError):
                            failed += 1

            async def until(
                what: str, done: Callable[[aiohttp.ClientSession], Awaitable[bool]]
            ) -> None:
                connector = aiohttp.TCPConnector(ssl=both, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    changed = time.monotonic()
                    streak = 0
                    while streak < 12 and time.monotonic() < changed + 6:
                        streak = streak + 1 if await done(session) else 0
                    timings[what] = time.monotonic() - changed
                    assert streak >= 12, what

            clients = [asyncio.create_task(load()) for _ in range(3)]
            try:
                await asyncio.sleep(0.3)
                new = new_ca.issue_cert("127.0.0.1")
                _write(cert_file, new.cert_chain_pems[0].bytes())
                await asyncio.sleep(1.2)
                _write(key_file, new.private_key_pem.bytes())

                async def new_pair(_: aiohttp.ClientSession) -> bool:
                    return await _served_by(port, both) == _ca_name(new_ca)

                await until("serving pair", new_pair)

                fake.proxy_tokens = {"proxy-token-1", "proxy-token-2"}
                _write(token_file, b"proxy-token-2\n")

                async def new_token(session: aiohttp.ClientSession) -> bool:
                    await whoami(session)
                    return fake.requests[-1].bearer == "proxy-token-2"

                await until("upstream token", new_token)
                await asyncio.sleep(0.2)  # requests in flight with the old one end
                fake.proxy_tokens = {"proxy-token-2"}  # the old one is revoked

                _write(config, auth_file("p2:"))

                async def new_prefix(session: aiohttp.ClientSession) -> bool:
                    return await whoami(session) == "p2:00u1alice"

                await until("authentication config", new_prefix)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert failed == 0, f"{failed} failed of {ok + failed}"
            assert ok > 50
            assert proc.stop() == 0
    finally:
        await fake.stop()
    print(
        "proxy --workers 2, change to effect:",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


async def _streak(done: Callable[[], Awaitable[bool]], *, within: float = 6) -> float:
    """Seconds until ``done()`` holds 12 times in a row (new connections, so
    both workers answer some); fails if it does not within ``within``."""
    changed = time.monotonic()
    streak = 0
    while streak < 12 and time.monotonic() < changed + within:
        streak = streak + 1 if await done() else 0
    assert streak >= 12
    return time.monotonic() - changed


@pytest.mark.slow
async def test_two_workers_reload_the_client_ca(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """Webhook ``--client-ca-file`` through the real CLI: a bundle with the new
    CA added under load (0 failures), then the old CA taken out."""
    server_ca, old_ca, new_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(server_ca.issue_cert("127.0.0.1"), cert_file, key_file)
    ca_file = tmp_path / "client-ca.crt"
    _write(ca_file, old_ca.cert_pem.bytes())
    port = free_port()
    args = [
        "webhook",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--tls-cert-file", str(cert_file),
        "--tls-private-key-file", str(key_file),
        "--client-ca-file", str(ca_file),
        "--workers", "2",
    ]  # fmt: skip
    token = issuer.token(groups=["devs"])
    old_client = _client(server_ca, cert=old_ca.issue_cert("apiserver"))
    new_client = _client(server_ca, cert=new_ca.issue_cert("apiserver"))

    async def answered(ctx: ssl.SSLContext) -> bool:
        connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                ) as r:
                    review = parse_review(await r.text())
                    return review.status.authenticated is True
            except aiohttp.ClientError:
                return False

    timings: dict[str, float] = {}
    with Proc(*args) as proc:
        await proc.await_log("serving", count=2, timeout=20)
        await proc.await_log("jwks keys loaded", count=2, timeout=20)
        assert await answered(old_client) is True
        assert await answered(new_client) is False
        ok = failed = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal ok, failed
            while not stop.is_set():
                if await answered(old_client):
                    ok += 1
                else:
                    failed += 1

        clients = [asyncio.create_task(load()) for _ in range(3)]
        try:
            await asyncio.sleep(0.5)
            _write(ca_file, old_ca.cert_pem.bytes() + new_ca.cert_pem.bytes())

            async def new_accepted() -> bool:
                return await answered(new_client)

            timings["new CA added"] = await _streak(new_accepted)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert failed == 0, f"{failed} failed of {ok + failed}"
        assert ok > 20
        _write(ca_file, new_ca.cert_pem.bytes())

        async def old_refused() -> bool:
            return not await answered(old_client)

        timings["old CA removed"] = await _streak(old_refused)
        assert await answered(new_client) is True
        assert proc.stop() == 0
    print(
        "client CA change to effect (webhook --workers 2):",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


@pytest.mark.slow
async def test_two_proxy_workers_reload_the_upstream_certificate_and_kubeconfig(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    """The real proxy with ``--workers 2`` under load: the upstream client
    certificate rotated on disk, then the kubeconfig rewritten to a second API
    server with another CA and a token (a broken write first): 0 failures."""
    server_ca, client_ca, ca_b = trustme.CA(), trustme.CA(), trustme.CA()
    old, new = client_ca.issue_cert("proxy-old"), client_ca.issue_cert("proxy-new")
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    _write_pair(old, client_cert, client_key)
    serving = trustme.CA()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(serving.issue_cert("127.0.0.1"), cert_file, key_file)
    kubeconfig = tmp_path / "upstream.yaml"
    port, probe = free_port(), f"127.0.0.1:{free_port()}"
    args = [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--kubeconfig", str(kubeconfig),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", probe,
        "--tls-cert-file", str(cert_file),
        "--tls-private-key-file", str(key_file),
        "--workers", "2",
    ]  # fmt: skip
    user_token = issuer.token()
    client = _client(serving)
    timings: dict[str, float] = {}
    async with (
        _whoami_server(server_ca.issue_cert("127.0.0.1"), client_ca, "a") as url_a,
        _whoami_server(ca_b.issue_cert("127.0.0.1"), None, "b") as url_b,
    ):
        _write(
            kubeconfig,
            _kubeconfig(url_a, server_ca, {
                "client-certificate": str(client_cert),
                "client-key": str(client_key),
            }).encode(),
        )  # fmt: skip
        expected = {"a@proxy-old|", "a@proxy-new|", "b@|Bearer token-b"}

        async def whoami() -> str:
            connector = aiohttp.TCPConnector(ssl=client, force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(
                    f"https://127.0.0.1:{port}/whoami",
                    headers={"Authorization": f"Bearer {user_token}"},
                ) as r,
            ):
                assert r.status == 200, r.status
                return await r.text()

        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            assert await whoami() == "a@proxy-old|"
            ok = failed = 0
            stop = asyncio.Event()

            async def load() -> None:
                nonlocal ok, failed
                while not stop.is_set():
                    try:
                        assert await whoami() in expected
                        ok += 1
                    except (aiohttp.ClientError, AssertionError):
                        failed += 1

            clients = [asyncio.create_task(load()) for _ in range(3)]
            try:
                await asyncio.sleep(0.5)
                _write(client_cert, new.cert_chain_pems[0].bytes())
                await asyncio.sleep(1.3)  # a poll sees the half pair: kept
                _write(client_key, new.private_key_pem.bytes())

                async def new_certificate() -> bool:
                    return await whoami() == "a@proxy-new|"

                timings["upstream client certificate"] = await _streak(new_certificate)
                _write(kubeconfig, b"clusters: [\n")  # broken: nothing changes
                await asyncio.sleep(1.3)
                assert await whoami() == "a@proxy-new|"
                _write(
                    kubeconfig,
                    _kubeconfig(url_b, ca_b, {"token": "token-b"}).encode(),
                )

                async def new_server() -> bool:
                    return await whoami() == "b@|Bearer token-b"

                timings["kubeconfig"] = await _streak(new_server)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert failed == 0, f"{failed} failed of {ok + failed}"
            assert ok > 20
            await proc.await_log("upstream tls reloaded", count=2, timeout=5)
            await proc.await_log("upstream kubeconfig reloaded", count=2, timeout=5)
            refusals = [
                e
                for e in proc.logs()
                if e.get("event", "").startswith("upstream kubeconfig not")
            ]
            assert len(refusals) >= 2, "each worker refused the broken file"
            # Both workers: a new pair and a new kubeconfig each, the broken
            # file (and the half pair, when a poll saw it) refused each.
            reloads = await _scrape(
                f"http://{probe}", "kube_oidc_gate_upstream_reloads_total"
            )
            assert reloads["success"] == 4, reloads
            assert reloads["failure"] >= 2, reloads
            assert proc.stop() == 0
    print(
        "proxy --workers 2, upstream change to effect:",
        {k: round(v, 2) for k, v in timings.items()},
    )
    assert all(t < 3.0 for t in timings.values()), timings


@pytest.mark.slow
async def test_two_workers_reload_the_issuer_ca(tmp_path: Path) -> None:
    """``--oidc-ca-file`` through the real CLI with ``--workers 2``: the issuer
    moves to a certificate of another CA and a new signing key; once the CA
    file says so, both workers fetch the new keys over it. Logins with the old
    key never fail meanwhile (the cached keys serve)."""
    old_ca, new_ca, serving = trustme.CA(), trustme.CA(), trustme.CA()
    issuer = FakeIssuer(tls=old_ca)
    await issuer.start()
    ca_file = tmp_path / "issuer-ca.crt"
    _write(ca_file, old_ca.cert_pem.bytes())
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write_pair(serving.issue_cert("127.0.0.1"), cert_file, key_file)
    port = free_port()
    args = [
        "webhook",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-ca-file", str(ca_file),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{free_port()}",
        "--tls-cert-file", str(cert_file),
        "--tls-private-key-file", str(key_file),
        "--workers", "2",
    ]  # fmt: skip
    client = _client(serving)

    async def answered(token: str) -> bool:
        connector = aiohttp.TCPConnector(ssl=client, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.post(
                    f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
                ) as r:
                    if r.status != 200:  # 503: keys not fetched (yet)
                        return False
                    review = parse_review(await r.text())
                    return review.status.authenticated is True
            except aiohttp.ClientError:
                return False

    old_token = issuer.token()
    try:
        with Proc(*args) as proc:
            await proc.await_log("serving", count=2, timeout=20)
            await proc.await_log("jwks keys loaded", count=2, timeout=20)
            ok = failed = 0
            stop = asyncio.Event()

            async def load() -> None:
                nonlocal ok, failed
                while not stop.is_set():
                    if await answered(old_token):
                        ok += 1
                    else:
                        failed += 1

            clients = [asyncio.create_task(load()) for _ in range(3)]
            try:
                await asyncio.sleep(0.5)
                await issuer.stop()
                issuer.ca = new_ca
                new_key = issuer.rotate()
                await issuer.start()
                new_token = issuer.token(new_key)
                _write(ca_file, new_ca.cert_pem.bytes())

                async def new_key_works() -> bool:
                    return await answered(new_token)

                took = await _streak(new_key_works)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert failed == 0, f"{failed} failed of {ok + failed}"
            assert ok > 20
            await proc.await_log("authentication config reloaded", count=2, timeout=5)
            assert proc.stop() == 0
    finally:
        await issuer.stop()
    print(f"issuer CA change to effect (webhook --workers 2): {took:.2f}s")
    assert took < 3.0


# --------------------------------------------------------------------------
# Token passthrough across upstream reloads


@pytest.mark.slow
async def test_passthrough_keeps_the_clients_token_across_upstream_reloads(
    tmp_path: Path,
) -> None:
    """``--token-passthrough`` under load while the upstream credential
    reloads: a kubeconfig switched to a client certificate is refused (the API
    server would authenticate passed-through requests as the proxy), then the
    proxy's token rotates. Passed-through requests carry the client's token
    and nothing else throughout; impersonated ones the proxy's current one."""
    from proxy.errors import UpstreamError
    from proxy.impersonate import ProxySettings
    from tests.fakes.apiserver import FakeAPIServer
    from tests.fakes.apiserver_harness import WHOAMI, run_proxy
    from tests.keygen import claims_for, new_key, sign

    ca, client_ca = trustme.CA(), trustme.CA()
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    _write_pair(client_ca.issue_cert("proxy"), client_cert, client_key)
    token_file, config = tmp_path / "proxy-token", tmp_path / "upstream.yaml"
    _write(token_file, b"proxy-token-1\n")
    metrics = Metrics()

    def upstream(fake: FakeAPIServer) -> Upstream:
        _write(
            config,
            _kubeconfig(fake.url, fake.ca, {"tokenFile": str(token_file)}).encode(),
        )
        settings = UpstreamSettings(kubeconfig=str(config), token_passthrough=True)
        return Upstream(settings, metrics=metrics)

    settings = ProxySettings(token_passthrough=True)
    async with run_proxy(tmp_path, ca, settings=settings, upstream=upstream) as stack:
        fake = stack.fake
        fake.proxy_tokens = {"proxy-token-1"}
        foreign = sign(new_key(), claims_for("https://other.test", sub="carol"))
        fake.user_tokens[foreign] = {"username": "carol", "groups": ["team"]}
        ours = stack.bearer()
        watcher = FileWatcher(interval=0.2)
        watcher.add(
            "upstream kubeconfig", [str(config)], stack.upstream.reload_kubeconfig
        )
        watching = asyncio.create_task(watcher.run())
        sent = 0
        problems: list[str] = []
        passed = impersonated = 0
        stop = asyncio.Event()

        async def one(passthrough: bool) -> str | None:
            """One request; the proxy token it reached the API server with."""
            nonlocal sent, passed, impersonated
            sent += 1
            n = sent
            auth = {"Authorization": f"Bearer {foreign}"} if passthrough else ours
            async with stack.client.post(
                f"{stack.url}{WHOAMI}?n={n}", headers=auth, json={}
            ) as r:
                body = await r.json()
            seen = next((q for q in fake.requests if q.query == f"n={n}"), None)
            if r.status != 201 or seen is None:
                problems.append(f"{passthrough=}: {r.status} {body}")
                return None
            user = body["status"]["userInfo"]["username"]
            if passthrough:
                passed += 1
                if (seen.bearer, user) != (foreign, "carol"):
                    problems.append(f"passthrough went out as {user}")
                if "Impersonate-User" in seen.headers:
                    problems.append("passthrough was impersonated")
                return None
            impersonated += 1
            if user != "oidc:alice" or seen.bearer not in fake.proxy_tokens:
                problems.append(f"impersonation went out as {user}")
            return seen.bearer

        async def load(passthrough: bool) -> None:
            while not stop.is_set():
                await one(passthrough)

        clients = [asyncio.create_task(load(i % 2 == 0)) for i in range(4)]
        try:
            await asyncio.sleep(0.3)
            _write(config, _kubeconfig(fake.url, fake.ca, {
                "client-certificate": str(client_cert),
                "client-key": str(client_key),
            }).encode())  # fmt: skip
            await asyncio.sleep(0.8)
            assert stack.upstream.client_certificate is False
            failures = metrics.registry.get_sample_value(
                "kube_oidc_gate_upstream_reloads_total", {"status": "failure"}
            )
            assert failures == 1.0
            fake.proxy_tokens = {"proxy-token-1", "proxy-token-2"}
            _write(token_file, b"proxy-token-2\n")
            changed = time.monotonic()
            streak = 0
            while streak < 10 and time.monotonic() < changed + 5:
                streak = streak + 1 if await one(False) == "proxy-token-2" else 0
            took = time.monotonic() - changed
            assert streak >= 10
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        assert problems == [], problems[:3]
        assert min(passed, impersonated) > 20, (passed, impersonated)
        # The settings refuse a certificate; whoever builds an Upstream
        # without them still never sends a client's token over one.
        bare = Upstream(UpstreamSettings(kubeconfig=str(config)))
        await bare.start()
        try:
            assert bare.client_certificate is True
            with pytest.raises(UpstreamError) as refused:
                await bare.fetch(
                    "GET", "/api", headers=[], connect_timeout=5, passthrough=True
                )
            assert refused.value.status == 503
        finally:
            await bare.close()
    print(f"proxy token change to effect with passthrough flowing: {took:.2f}s")
