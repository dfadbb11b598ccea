"""Composition: the engine, the front-end apps, the probe app, and serving them.

``start_engine`` builds what both modes share (one ``ClientSession``, the issuer
key sets and their refreshers, the authenticator); ``webhook_app`` and
``proxy_app`` put a front end on it, each a ``proxy.http1`` server (llhttp):
one HTTP stack for every request either front end takes; ``probe_app`` is the
separate plain-HTTP
listener for ``/healthz``, ``/readyz`` and ``/metrics`` (it never sees a token,
so it needs no TLS, and kubelet probes can reach it without certificates).

``serve`` runs the listeners until SIGTERM/SIGINT and then shuts down the way
kube-apiserver does: stop accepting, let in-flight requests finish within the
grace period, close, exit 0. With ``--workers N`` the CLI forks N processes that
each call ``serve`` with ``reuse_port`` (SO_REUSEPORT): the kernel spreads
connections, and each process has its own caches and key sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Final

import aiohttp
from aiohttp import web

from proxy.audit.auditor import Auditor
from proxy.authn import Authenticator
from proxy.config import (
    DEFAULT_PROBE_ADDRESS,
    DEFAULT_WEBHOOK_PORT,
    AuthConfig,
    RevocationSettings,
)
from proxy.errors import ConfigError
from proxy.http1 import Server
from proxy.impersonate import ProxySettings, proxy_server
from proxy.introspection import Introspection
from proxy.keyset import ClaimSourceClient, IntrospectionHttpClient, KeySets
from proxy.log import issuer_hash
from proxy.metrics import CONTENT_TYPE, FLUSH_INTERVAL, Metrics
from proxy.oktaapi import OktaApiClient
from proxy.oktagroups import OktaGroups
from proxy.revocation import RevocationList
from proxy.revocation_api import RevocationWatcher
from proxy.upstream import Upstream, UpstreamSettings
from proxy.webhook import WebhookSettings, webhook_server

__all__ = [
    "RELOAD_KEY_WAIT",
    "ConfigReloader",
    "Engine",
    "ServeSettings",
    "introspection_for",
    "listen_problems",
    "listening",
    "probe_app",
    "proxy_app",
    "serve",
    "start_engine",
    "start_revocation_watch",
    "webhook_app",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeSettings:
    """Where and how the listeners run (the CLI's serving flags)."""

    bind_address: str = "0.0.0.0"  # noqa: S104 - a server listens on all interfaces by default
    secure_port: int = DEFAULT_WEBHOOK_PORT
    probe_host: str = DEFAULT_PROBE_ADDRESS.rpartition(":")[0]
    probe_port: int = int(DEFAULT_PROBE_ADDRESS.rpartition(":")[2])
    #: Time in-flight requests get to finish after SIGTERM.
    shutdown_grace_period: float = 30.0
    #: A connection must complete a request's headers within this long of
    #: opening (or of its previous response): the slowloris bound.
    idle_timeout: float = 75.0
    #: Largest single request header (name and value) the proxy's listener
    #: accepts (431 beyond): above a bearer token the engine accepts (up to
    #: 16 KiB); the sum of all headers is bounded by ``max_header_bytes``.
    max_field_bytes: int = 20 * 1024
    reuse_port: bool = False


@dataclass(slots=True)
class Engine:
    """What both modes share; ``close`` releases it in the right order."""

    authenticator: Authenticator
    keysets: KeySets
    session: aiohttp.ClientSession
    metrics: Metrics
    owns_session: bool = True
    flusher: asyncio.Task[None] | None = None
    #: The configuration serving now (the last good one after a failed reload).
    config: AuthConfig | None = None
    #: Why the last automatic reload was refused, for ``/readyz``; None once
    #: a reload succeeds.
    reload_problem: str | None = None
    #: The revocation list's watch (``--revocation-namespace``) and its client.
    revocation_watch: RevocationWatcher | None = None
    revocation_client: Upstream | None = None

    async def close(self) -> None:
        """Stop the refreshers and the metrics flusher, then close the HTTP client."""
        if self.revocation_watch is not None:
            await self.revocation_watch.close()
        if self.revocation_client is not None:
            await self.revocation_client.close()
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        # The last counts, so a worker that stops leaves them in the registry.
        self.metrics.flush()
        await self.keysets.close()
        if self.owns_session:
            await self.session.close()


async def _flush_metrics(metrics: Metrics, interval: float) -> None:
    """Flush the tallies every ``interval``: other workers' scrapes read them.

    With ``--workers N`` every worker writes its counters to the shared
    directory and any worker may answer a scrape; one that only flushed when
    it served a scrape itself would leave its counts out of the others'.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            metrics.flush()
        except Exception:  # counting must not stop for a bug
            log.exception("metrics flush failed (likely a bug)")


async def start_engine(
    config: AuthConfig,
    *,
    metrics: Metrics,
    session: aiohttp.ClientSession | None = None,
    flush_interval: float = FLUSH_INTERVAL,
    revocations: RevocationList | None = None,
) -> Engine:
    """Build the engine and start fetching keys (returns at once; never fails on I/O).

    With ``revocations`` the authenticator refuses what it lists (and, until
    its first list, every token: see ``start_revocation_watch``).
    """
    owns = session is None
    if session is None:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.keyset.fetch_timeout),
            headers={"User-Agent": "kube-oidc-gate"},
        )
    keysets = KeySets(
        [a.issuer for a in config.authenticators],
        config.keyset,
        session=session,
        metrics=metrics,
    )
    authenticator = Authenticator(
        config,
        {
            url: keysets.get(url)
            for url in {a.issuer.url for a in config.authenticators}
        },
        metrics=metrics,
        claim_sources=ClaimSourceClient(session),
        okta_groups=None
        if config.okta is None
        else OktaGroups(
            config.okta,
            OktaApiClient(session, config, metrics=metrics),
            metrics=metrics,
        ),
        introspection=introspection_for(config, keysets, session, metrics=metrics),
        revocations=revocations,
    )
    for key_set in keysets:
        key_set.on_keys_withdrawn = authenticator.forget_issuer
    await keysets.start()
    return Engine(
        authenticator=authenticator,
        keysets=keysets,
        session=session,
        metrics=metrics,
        owns_session=owns,
        flusher=asyncio.create_task(_flush_metrics(metrics, flush_interval)),
        config=config,
    )


#: How long a reload waits for a new or changed issuer's first keys before
#: swapping anyway (its tokens then wait for the refresher, as at start).
RELOAD_KEY_WAIT: Final = 5.0


class ConfigReloader:
    """Live reload of the authentication configuration, kube-apiserver's way.

    A file that loads (every check of a start passes) replaces the engine's
    issuers, audiences, mappings and rules at once for the next request; one
    that does not changes nothing, and its problems, all of them, are logged,
    counted (``..._automatic_reloads_total{status="failure"}``) and shown in
    ``/readyz`` detail, which stays ready: the last good configuration serves.
    New or changed issuers get their keys fetched before the swap; retired
    key sets are closed after it. ``load`` reads the files (run in a thread:
    it parses YAML and compiles CEL), so ``--oidc-ca-file`` reloads the same way.
    """

    __slots__ = ("_engine", "_load", "_lock", "_wait")

    def __init__(
        self,
        engine: Engine,
        load: Callable[[], AuthConfig],
        *,
        wait: float = RELOAD_KEY_WAIT,
    ) -> None:
        self._engine = engine
        self._load = load
        self._wait = wait
        self._lock = asyncio.Lock()

    def _count(self, status: str) -> None:
        metrics = self._engine.metrics
        metrics.config_reloads.labels(status).inc()
        metrics.config_reload_time.labels(status).set(time.time())

    async def reload(self) -> bool:
        """Load the configuration again; True if it now serves."""
        async with self._lock:
            engine = self._engine
            try:
                config = await asyncio.to_thread(self._load)
            except ConfigError as err:
                self._count("failure")
                problems = list(err.problems)
                engine.reload_problem = "; ".join(problems)
                log.warning(
                    "authentication config not reloaded, the last good one serves",
                    extra={"problems": problems},
                )
                return False
            sets = await engine.keysets.stage(
                [a.issuer for a in config.authenticators], wait=self._wait
            )
            keys = {a.issuer.url: sets[a.issuer.url] for a in config.authenticators}
            for key_set in sets.values():
                key_set.on_keys_withdrawn = engine.authenticator.forget_issuer
            # No await between these two: the next request sees both or neither.
            retired = engine.keysets.swap(sets)
            changed = engine.authenticator.reconfigure(config, keys)
            engine.config = config
            engine.reload_problem = None
            self._count("success")
            log.info(
                "authentication config reloaded",
                extra={
                    "issuers": len(config.authenticators),
                    "changed_issuers": changed,
                },
            )
            for key_set in retired:
                await key_set.close()
            return True


async def start_revocation_watch(
    engine: Engine,
    settings: RevocationSettings,
    *,
    client: Upstream | None = None,
) -> RevocationWatcher:
    """Watch the Revocation objects of ``settings.namespace`` into the engine's
    list (``proxy.revocation_api``); ``engine.close`` stops it.

    The client is an ``Upstream`` of its own (in-cluster service account or
    ``--kubeconfig``), even in proxy mode: one long-lived watch connection
    that the proxy's pool limits and kubeconfig reloads never touch. Raises
    ``ConfigError`` when the credential does not load.
    """
    revocations = engine.authenticator.revocations
    if revocations is None:
        raise RuntimeError("app: start_engine was given no revocation list")
    if client is None:
        client = Upstream(
            UpstreamSettings(kubeconfig=settings.kubeconfig, context=settings.context),
            metrics=engine.metrics,
        )
        await client.start()
        engine.revocation_client = client
    watcher = RevocationWatcher(client, settings, revocations, metrics=engine.metrics)
    engine.revocation_watch = watcher
    watcher.start()
    return watcher


def introspection_for(
    config: AuthConfig,
    keysets: KeySets,
    session: aiohttp.ClientSession,
    *,
    metrics: Metrics | None = None,
) -> Introspection | None:
    """The introspection engine over ``session``, endpoints from discovery."""
    settings = config.introspection
    if settings is None:
        return None

    def endpoint_for(url: str) -> str | None:
        return keysets.get(url).introspection_endpoint

    client = IntrospectionHttpClient(
        session,
        [a.issuer for a in config.authenticators],
        endpoint_for,
        timeout=settings.timeout,
    )
    return Introspection(settings, client, metrics=metrics)


def webhook_app(engine: Engine, settings: WebhookSettings) -> Server:
    """The TokenReview webhook's listener (``POST /authenticate``, ``proxy.http1``).

    ``serve`` sets its head timeout (slowloris, idle keep-alive) from
    ``ServeSettings.idle_timeout`` when it starts listening.
    """
    return webhook_server(engine.authenticator, settings, metrics=engine.metrics)


def proxy_app(
    engine: Engine,
    upstream: Upstream,
    settings: ProxySettings,
    *,
    max_field_bytes: int | None = 20 * 1024,
    auditor: Auditor | None = None,
) -> Server:
    """The impersonating proxy's listener (every method and path, ``proxy.http1``).

    ``auditor`` (``--audit-*``, issue 24) audits every request it serves; the
    caller owns its ``close()``.
    """
    return proxy_server(
        authenticator=engine.authenticator,
        upstream=upstream,
        settings=settings,
        metrics=engine.metrics,
        max_field_bytes=max_field_bytes,
        auditor=auditor,
    )


def probe_app(
    engine: Engine,
    *,
    extra_checks: Callable[[], list[str]] | None = None,
) -> web.Application:
    """``/healthz`` (alive), ``/readyz`` (keys loaded; names what is not), ``/metrics``."""
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        problems = [
            f"issuer {ks.url}: keys not loaded: {ks.last_error or 'first fetch in progress'}"
            for ks in engine.keysets
            if not ks.ready
        ]
        # Cached keys still verify tokens, so a failing refresh keeps us ready;
        # it is shown here (and in metrics) so an outage is visible early.
        warnings = [
            f"issuer {ks.url}: serving cached keys; last refresh failed: {ks.last_error}"
            for ks in engine.keysets
            if ks.ready and ks.last_error
        ]
        if engine.revocation_watch is not None:
            unready, degraded = engine.revocation_watch.readiness()
            problems.extend(unready)
            warnings.extend(degraded)
        if engine.reload_problem is not None:
            warnings.append(
                "authentication config: the last reload failed, the last good "
                f"configuration serves: {engine.reload_problem}"
            )
        if extra_checks is not None:
            problems.extend(extra_checks())
        if problems:
            text = "not ready:\n" + "".join(f"- {p}\n" for p in problems + warnings)
            return web.Response(status=503, text=text)
        text = f"ok (up {int(time.time() - started)}s)\n"
        return web.Response(text=text + "".join(f"- warning: {w}\n" for w in warnings))

    async def metrics(_: web.Request) -> web.Response:
        now = time.time()
        for ks in engine.keysets:
            if ks.last_success is not None:
                engine.metrics.jwks_age.labels(issuer_hash(ks.url)).set(
                    now - ks.last_success
                )
        return web.Response(
            body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    main: Server,
    probes: web.Application,
    settings: ServeSettings,
    ssl_context: ssl.SSLContext,
    *,
    on_ready: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return.

    ``main`` is the proxy's or the webhook's ``proxy.http1`` server; both
    drain the same way. ``on_ready(secure_port,
    probe_port)`` is called once both listeners accept, with the ports actually
    bound (useful with port 0).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    listener = _Http1Listener(main, settings, ssl_context)
    probe_runner = web.AppRunner(probes, access_log=None, handle_signals=False)
    await probe_runner.setup()
    try:
        try:
            port = await listener.start()
        except OSError as err:
            raise _listen_error(err, settings, probe=False) from err
        probe_site = web.TCPSite(
            probe_runner,
            settings.probe_host,
            settings.probe_port,
            reuse_port=settings.reuse_port or None,
        )
        try:
            await probe_site.start()
        except OSError as err:
            raise _listen_error(err, settings, probe=True) from err
        ports = (port, _bound_port(probe_runner))
        log.info(
            "serving",
            extra={
                "secure_port": ports[0],
                "probe_port": ports[1],
                "bind": settings.bind_address,
            },
        )
        if on_ready is not None:
            on_ready(*ports)
        await stop.wait()
        log.info(
            "shutting down", extra={"grace_period_s": settings.shutdown_grace_period}
        )
        await listener.drain(settings.shutdown_grace_period)
    finally:
        await listener.cleanup()
        await probe_runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _listen_error(err: OSError, settings: ServeSettings, *, probe: bool) -> ConfigError:
    """One line for a listener that cannot bind: the address, its flag, what to do.

    Without it the operator gets a traceback (one process) or nothing at all
    (``--workers N``: the worker's exit code only).
    """
    if probe:
        host, port = settings.probe_host, settings.probe_port
        flags = change = "--probe-bind-address"
    else:
        host, port = settings.bind_address, settings.secure_port
        flags, change = "--bind-address/--secure-port", "--secure-port"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    where = f"listen: {address} ({flags})"
    if err.errno == errno.EADDRINUSE:
        text = (
            f"{where} is already in use: stop what listens there, or choose "
            f"another port with {change}"
        )
    elif err.errno == errno.EADDRNOTAVAIL:
        text = (
            f"{where}: {host} is not an address of this machine: give one of its "
            "addresses, or 0.0.0.0 for all"
        )
    elif err.errno == errno.EACCES:
        text = (
            f"{where}: permission denied: a port below 1024 needs root or "
            f"CAP_NET_BIND_SERVICE; choose a port of 1024 or above with {change}"
        )
    elif isinstance(err, socket.gaierror):
        text = f"{where}: {host!r} does not resolve to an address of this machine"
    else:
        text = f"{where}: {(err.strerror or str(err)).lower()}"
    return ConfigError(text)


def listen_problems(settings: ServeSettings) -> list[str]:
    """Bind both listeners' addresses once, without serving, and report failures.

    The CLI calls this before any worker starts, so a taken port stops the
    start with one line and exit code 2 whatever ``--workers`` is. It also
    catches what the workers' own binds cannot: with ``--workers N`` they bind
    with ``SO_REUSEPORT``, which the kernel lets join another process's
    ``SO_REUSEPORT`` listener of the same user, so a second gate started by
    mistake on the same port would silently share its connections. This bind
    uses ``SO_REUSEADDR`` only (an earlier run's ``TIME_WAIT`` connections do
    not block it), which any listener on the address refuses. Port 0 (any
    free port) is not checked.
    """
    problems: list[str] = []
    for probe, host, port in (
        (False, settings.bind_address, settings.secure_port),
        (True, settings.probe_host, settings.probe_port),
    ):
        if port == 0:
            continue
        try:
            _try_bind(host, port)
        except OSError as err:
            problems.extend(_listen_error(err, settings, probe=probe).problems)
    return problems


def _try_bind(host: str, port: int) -> None:
    """Bind (and close) a socket on every address ``host`` resolves to, as
    ``loop.create_server`` would bind them."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


class _Http1Listener:
    """A front end's ``proxy.http1`` server behind the secure port."""

    def __init__(
        self,
        server: Server,
        settings: ServeSettings,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._server = server
        self._settings = settings
        self._ssl = ssl_context
        server.limits = replace(server.limits, head_timeout=settings.idle_timeout)

    async def start(self) -> int:
        settings = self._settings
        return await self._server.start(
            settings.bind_address,
            settings.secure_port,
            ssl_context=self._ssl,
            reuse_port=settings.reuse_port,
        )

    async def drain(self, grace: float) -> None:
        await self._server.drain(grace)

    async def cleanup(self) -> None:
        await self._server.drain(0)


@contextlib.asynccontextmanager
async def listening(
    server: Server,
    settings: ServeSettings,
    ssl_context: ssl.SSLContext | None,
) -> AsyncIterator[int]:
    """Serve ``server`` on ``settings``' secure port as ``serve`` does, without
    signals or probes; yield the port. For tests and embedding.
    """
    listener = _Http1Listener(server, settings, ssl_context)
    try:
        yield await listener.start()
        await listener.drain(settings.shutdown_grace_period)
    finally:
        await listener.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0
