"""Composition: the engine, the front-end apps, the probe app, and serving them.

``start_engine`` builds what both modes share (one ``ClientSession``, the issuer
key sets and their refreshers, the authenticator); ``webhook_app`` (a
``proxy.http1`` server) and ``proxy_app`` (an aiohttp application, served
behind a ``proxy.http1`` fast lane for its short requests) put a front end on
it; ``probe_app`` is the separate plain-HTTP
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.audit.auditor import Auditor
from proxy.authn import Authenticator
from proxy.config import (
    DEFAULT_PROBE_ADDRESS,
    DEFAULT_WEBHOOK_PORT,
    AuthConfig,
)
from proxy.errors import ConfigError
from proxy.http1 import Server
from proxy.impersonate import LEAN_LANE, ProxySettings, add_proxy_routes
from proxy.introspection import Introspection
from proxy.keyset import ClaimSourceClient, IntrospectionHttpClient, KeySets
from proxy.kube import status_body
from proxy.log import REQUEST_ID, issuer_hash, new_request_id
from proxy.metrics import CONTENT_TYPE, FLUSH_INTERVAL, Metrics
from proxy.oktaapi import OktaApiClient
from proxy.oktagroups import OktaGroups
from proxy.upstream import Upstream
from proxy.webhook import WebhookSettings, webhook_server

__all__ = [
    "AUDITOR",
    "RELOAD_KEY_WAIT",
    "ConfigReloader",
    "ConnectionGuard",
    "Engine",
    "ServeSettings",
    "introspection_for",
    "listen_problems",
    "listening",
    "probe_app",
    "proxy_app",
    "serve",
    "start_engine",
    "webhook_app",
]

log = logging.getLogger(__name__)

#: After ``_drain`` has given in-flight requests the grace period, how long
#: aiohttp's own shutdown may still wait for a handler.
_CLEANUP_WAIT: Final = 1.0

#: The logger aiohttp's server writes to, with parser refusals made safe.
_HTTP_LOG: Final = logging.getLogger(__name__ + ".http")


def _redact_parser_errors(record: logging.LogRecord) -> bool:
    """Keep the class and status of a parser refusal, drop its text.

    aiohttp logs a request its HTTP parser refused (a header over the size
    limit, a malformed request line) at error level with the offending bytes
    in the exception message, and those bytes may be a bearer token. It is a
    client's mistake, not an operator's problem: one info line, no bytes.
    """
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg = "request refused by the http parser"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.__dict__["error"] = type(exc).__name__
        record.__dict__["status"] = exc.code
    return True


_HTTP_LOG.addFilter(_redact_parser_errors)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    #: How long an unread request body is drained after an early answer (413,
    #: 408) before the connection is closed; aiohttp's default is 10 s.
    lingering_time: float = 1.0
    #: Largest single request header (name or value) the HTTP parser accepts.
    #: aiohttp's default (8 KiB) would refuse a bearer token the engine accepts
    #: (up to 16 KiB); the sum of all headers is bounded by the proxy (431).
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

    async def close(self) -> None:
        """Stop the refreshers and the metrics flusher, then close the HTTP client."""
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
) -> Engine:
    """Build the engine and start fetching keys (returns at once; never fails on I/O)."""
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


@dataclass(slots=True)
class ConnectionGuard:
    """Closes connections that never complete a first request (slowloris).

    aiohttp bounds the wait for a request only after a keep-alive response; the
    first request on a connection may trickle in forever. The guard's site arms
    a timer per accepted connection (TLS handshake and headers included); the
    middleware disarms it once a request has fully arrived; a connection whose
    timer fires first is closed. aiohttp's protocol objects have no weak
    references, so ``pending`` holds them strongly, but never past the deadline.

    It also knows the handlers in flight (``inflight``), so that ``serve`` can
    give them the grace period and no more, and sets ``stopping`` when the
    drain begins, so long-running streams end themselves cleanly instead of
    holding the grace period and being cut.
    """

    pending: dict[Any, asyncio.TimerHandle] = field(default_factory=dict)
    closed: int = 0
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def arm(self, proto: Any, deadline: float) -> None:
        """Start the first-request deadline of a new connection."""
        loop = asyncio.get_running_loop()
        self.pending[proto] = loop.call_later(deadline, self.expire, proto)

    def expire(self, proto: Any) -> None:
        """Close ``proto``'s connection unless a request arrived meanwhile."""
        if self.pending.pop(proto, None) is None:
            return
        self.closed += 1
        log.info("connection closed: no complete request in time")
        proto.force_close()

    def request_arrived(self, request: web.Request) -> None:
        """Disarm the first-request deadline of the connection ``request`` came on."""
        if self.pending:
            timer = self.pending.pop(request.protocol, None)
            if timer is not None:
                timer.cancel()


GUARD: web.AppKey[ConnectionGuard] = web.AppKey("connection_guard", ConnectionGuard)
#: The proxy's auditor (``None``: no ``--audit-policy-file``).
AUDITOR: web.AppKey[Auditor | None] = web.AppKey("proxy_auditor")


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, minus the echo in its parser-error answers.

    A request aiohttp's parser refuses (say, an oversized ``Authorization``
    header) is answered 400 with the parser's message, which quotes the start of
    the offending line: part of a token. We answer with the status alone.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer ``status`` without quoting anything the client sent."""
        return super().handle_error(request, status, exc, None)


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections must send a first request within a deadline."""

    __slots__ = ("_deadline", "_guard", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        deadline: float,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host, self._port = host, port
        self._guard, self._deadline = guard, deadline
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        """``https://host:port`` as aiohttp names sites."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen, arming the guard's timer on every accepted connection."""
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard, deadline = self._guard, self._deadline

        def factory() -> asyncio.Protocol:
            # Built like web.Server builds its handlers, as our subclass.
            proto = _QuietHandler(server, loop=loop, **server._kwargs)
            guard.arm(proto, deadline)
            return proto

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            # The guard cannot close a connection still in its TLS handshake
            # (aiohttp's protocol has no transport yet): asyncio does, here.
            ssl_handshake_timeout=deadline if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )


def _front_middleware(guard: ConnectionGuard) -> Callable[..., Any]:
    """The one middleware of both front ends, on every request (404s included).

    It disarms the connection's first-request deadline, records the handler as
    in flight for the drain, binds a request id for the log lines, and turns
    an unexpected exception into a 500, never a pass. One middleware rather
    than one per concern: each layer costs a coroutine frame per request, which
    the cached token review (a few tens of microseconds in all) notices.
    """

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard.request_arrived(request)
        # The task aiohttp runs this request's handler in (one per request; not
        # ``request.task``, the connection's): the one the drain waits for.
        task = asyncio.current_task()
        if task is not None:
            guard.inflight.add(task)
        rid = request.headers.get("X-Request-Id", "")[:64] or new_request_id()
        token = REQUEST_ID.set(rid)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "unhandled error (likely a bug)", extra={"path": request.path}
            )
            return web.Response(
                status=500,
                body=status_body(500, "internal error"),
                content_type="application/json",
            )
        finally:
            REQUEST_ID.reset(token)
            if task is not None:
                guard.inflight.discard(task)

    return front


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
    auditor: Auditor | None = None,
) -> web.Application:
    """The impersonating proxy application (every method and path).

    ``auditor`` (``--audit-*``, issue 24) is stored under ``AUDITOR`` for the
    handler to call (``proxy.audit.auditor``'s contract); the caller owns its
    ``close()``.
    """
    guard = ConnectionGuard()
    app = web.Application(middlewares=[_front_middleware(guard)])
    app[GUARD] = guard
    app[AUDITOR] = auditor
    add_proxy_routes(
        app,
        authenticator=engine.authenticator,
        upstream=upstream,
        settings=settings,
        metrics=engine.metrics,
        stopping=guard.stopping,
    )
    return app


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
    main: web.Application | Server,
    probes: web.Application,
    settings: ServeSettings,
    ssl_context: ssl.SSLContext,
    *,
    on_ready: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return.

    ``main`` is the proxy (an aiohttp application) or the webhook (a
    ``proxy.http1`` server); either drains the same way. ``on_ready(secure_port,
    probe_port)`` is called once both listeners accept, with the ports actually
    bound (useful with port 0).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    listener = (
        _Http1Listener(main, settings, ssl_context)
        if isinstance(main, Server)
        else _AppListener(main, settings, ssl_context)
    )
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
    """The webhook's ``proxy.http1`` server behind the secure port."""

    def __init__(
        self, server: Server, settings: ServeSettings, ssl_context: ssl.SSLContext
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
    app: web.Application,
    settings: ServeSettings,
    ssl_context: ssl.SSLContext | None,
    **runner_options: Any,
) -> AsyncIterator[int]:
    """Serve ``app`` on ``settings``' secure port as ``serve`` does (its lean
    lane included, if it has one), without signals or probes; yield the port.

    For tests and embedding; ``runner_options`` go to aiohttp's ``AppRunner``.
    """
    listener = _AppListener(app, settings, ssl_context, runner_options)
    try:
        yield await listener.start()
        await listener.drain(settings.shutdown_grace_period)
    finally:
        await listener.cleanup()


class _AppListener:
    """The proxy's aiohttp application behind the secure port, guarded.

    An application with a ``LEAN_LANE`` (the proxy's) is served by a
    ``proxy.http1`` server that answers the lane's requests itself and hands
    every other connection to aiohttp's connection handler; both drain together.
    """

    def __init__(
        self,
        app: web.Application,
        settings: ServeSettings,
        ssl_context: ssl.SSLContext | None,
        runner_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._settings = settings
        self._ssl = ssl_context
        self._guard = app.get(GUARD) or ConnectionGuard()
        self._lane = app.get(LEAN_LANE)
        self._front: Server | None = None
        options: dict[str, Any] = {
            "access_log": None,
            "handle_signals": False,
            "shutdown_timeout": _CLEANUP_WAIT,
            "keepalive_timeout": settings.idle_timeout,
            "lingering_time": settings.lingering_time,
            "max_field_size": settings.max_field_bytes,
            "logger": _HTTP_LOG,
        }
        options.update(runner_options or {})
        self._runner = web.AppRunner(app, **options)

    async def start(self) -> int:
        settings = self._settings
        await self._runner.setup()
        if self._lane is not None:
            return await self._start_front()
        site = _GuardedSite(
            self._runner,
            settings.bind_address,
            settings.secure_port,
            guard=self._guard,
            deadline=settings.idle_timeout,
            ssl_context=self._ssl,
            reuse_port=settings.reuse_port,
        )
        await site.start()
        return _bound_port(self._runner)

    async def _start_front(self) -> int:
        settings = self._settings
        lane = self._lane
        server = self._runner.server
        assert lane is not None
        assert server is not None
        loop = asyncio.get_running_loop()

        def fallback() -> asyncio.Protocol:
            # Built like web.Server builds its handlers, as our subclass; the
            # connection arrives with a request already, so no first-request
            # guard is armed.
            return _QuietHandler(server, loop=loop, **server._kwargs)

        front = Server(
            {},
            default=lane.route,
            limits=replace(lane.limits, head_timeout=settings.idle_timeout),
            error_body=status_body,
            fallback=fallback,
            admit=lane.admit,
        )
        port = await front.start(
            settings.bind_address,
            settings.secure_port,
            ssl_context=self._ssl,
            reuse_port=settings.reuse_port,
        )
        self._front = front
        return port

    async def drain(self, grace: float) -> None:
        if self._front is None:
            await _drain(self._runner, self._guard, grace)
            return
        await asyncio.gather(
            self._front.drain(grace), _drain(self._runner, self._guard, grace)
        )

    async def cleanup(self) -> None:
        if self._front is not None:
            await self._front.drain(0)
        await self._runner.cleanup()


async def _drain(runner: web.AppRunner, guard: ConnectionGuard, grace: float) -> None:
    """Stop accepting, end streams, give in-flight requests ``grace``, cancel the rest.

    aiohttp's own shutdown waits ``shutdown_timeout`` for a handler and then as
    long again after cancelling the request's payload: a hung request would
    hold the process for twice the grace period, and a watch or exec stream
    (which never ends by itself) always would, only to be cut mid-response.
    """
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        # Idle keep-alive connections close now, busy ones after their answer.
        runner.server.pre_shutdown()
    guard.stopping.set()
    pending = set(guard.inflight)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=grace)
    if pending:
        log.warning(
            "grace period over: cancelling requests", extra={"requests": len(pending)}
        )
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=_CLEANUP_WAIT)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0
