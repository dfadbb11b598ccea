"""How the proxy reaches the API server: address, TLS, its own credential, a pool.

Configuration comes from the ``kubernetes`` package's loaders, so a kubeconfig
means exactly what it means to kubectl (contexts, inline or file certificate
data, exec plugins) and in-cluster means what it means to every client-go
program: ``KUBERNETES_SERVICE_HOST``/``PORT``, the service account's CA and
token. The loaders run once, in a thread (an exec plugin may spawn a process),
inside ``start()``; what they produce is turned into one ``ssl.SSLContext`` and
one keep-alive pool (``proxy.upstream_pool``), owned here and closed in
``close()``.

Credentials rotate without a restart:

- in-cluster, the projected service-account token is rewritten by the kubelet
  (bound tokens live an hour and are refreshed well before); a background task
  ``stat``s the file every ``credential_check_interval`` seconds, in a thread,
  and re-reads it when its identity (inode, size, mtime) changes. The kubelet
  swaps a symlink, so the identity of the file the path resolves to is what
  changes;
- from a kubeconfig, the loader's own refresh hook is called on the same
  schedule; it re-runs an exec plugin when the credential it returned expires.
  A kubeconfig ``tokenFile`` is watched like the in-cluster token (issue 21);
- a client certificate and key (and the CA) on disk are watched the same way:
  when they change and the new pair loads (a key that does not match its
  certificate yet keeps the last good pair), new connections use it, idle
  pooled connections are closed and busy ones are not reused (issue 21);
- the kubeconfig file itself (a new server, CA, inline token or certificate
  data, another current context): ``reload_kubeconfig()``, called by the
  CLI's file watcher (``proxy.watch``) and on ``SIGHUP``, loads it with the
  same checks as at start. A file that does not load changes nothing (logged;
  the last good target serves); one that does gets a new pool: new requests
  go to the new server with the new TLS and credential, the old pool is
  retired (idle connections closed, busy ones finish their request, watch or
  tunnel and are closed, never reused).

``auth_headers()`` is synchronous and only returns what the background task
last read, so a request never waits for the disk.

Where the API server is and what the proxy presents are loaded and checked by
``proxy.upstream_target`` (whose public names are re-exported here); this
module owns the pool and the rotation.

One client sends every request: ``fetch()`` for ordinary and long-running
requests (watches, logs) and ``upgrade()`` for ``Connection: Upgrade`` ones
(exec, attach, port-forward), both through the keep-alive pool of
``proxy.upstream_pool``, whose answers llhttp parses; a ``101`` hands the
connection over for ``proxy.tunnel`` to relay.

Failures become ``UpstreamError`` with the status the proxy should answer: 503
when the API server cannot be reached (refused, unreachable), 504 when it does
not answer in time, 502 when it answers with something unusable (bad TLS, a
reset, a malformed response). Messages never contain a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable, Mapping

from aiohttp.abc import AbstractResolver
from yarl import URL

from proxy.errors import ConfigError, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream_pool import BodySource, ConnectionPool, PooledResponse, Upgraded
from proxy.upstream_target import (
    RBAC_FILE,
    SERVICE_ACCOUNT_DIR,
    SERVICE_CA_FILE,
    SERVICE_TOKEN_FILE,
    Signature,
    Target,
    TokenFile,
    UpstreamSettings,
    digest_all,
    load_target,
    normalise_authorization,
    ssl_context,
    stat_all,
    upstream_problems,
)

__all__ = [
    "RBAC_FILE",
    "SERVICE_ACCOUNT_DIR",
    "SERVICE_CA_FILE",
    "SERVICE_TOKEN_FILE",
    "PooledResponse",
    "Upgraded",
    "Upstream",
    "UpstreamSettings",
    "upstream_problems",
]

log = logging.getLogger(__name__)


class Upstream:
    """The API server as seen by the proxy: URL, TLS, pool and own credential."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        environ: Mapping[str, str] | None = None,
        resolver: AbstractResolver | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``environ`` replaces ``os.environ`` for the in-cluster loader and
        ``resolver`` the system's name resolution (tests: a DNS failure that
        never sends a query); ``metrics`` counts reloads of the kubeconfig and
        the TLS files.
        """
        self.settings = settings
        self._environ = environ
        self._resolver = resolver
        self._target: Target | None = None
        self._ssl: ssl.SSLContext | None = None
        self._authorization: str | None = None
        self._token_file: TokenFile | None = None
        self._tls_seen: Signature = ()
        self._tls_digest = ""
        self._refresher: asyncio.Task[None] | None = None
        self._base = ""
        self._prefix = ""
        self._pool: ConnectionPool | None = None
        self._retired: list[ConnectionPool] = []
        self._metrics = metrics

    def __repr__(self) -> str:
        url = self._target.base_url if self._target else None
        return f"Upstream(url={url!s})"

    @property
    def base_url(self) -> URL:
        """The API server's URL (scheme, host, port and any path prefix)."""
        return self._loaded().base_url

    @property
    def client_certificate(self) -> bool:
        """Whether the proxy proves who it is with a TLS client certificate.

        Every connection then carries the proxy's identity whatever the request
        says, and kube-apiserver tries client certificates before bearer
        tokens: a request forwarded with a client's own token would run as the
        proxy. Token passthrough is refused in that case.
        """
        return self._loaded().cert_file is not None

    def _loaded(self) -> Target:
        if self._target is None:
            raise RuntimeError("upstream: not started")
        return self._target

    async def start(self) -> None:
        """Load the configuration, build TLS and the pool, start rotation checks.

        Raises ``ConfigError`` when the configuration is unusable.
        """
        if self._pool is not None:
            return
        target = await asyncio.to_thread(load_target, self.settings, self._environ)
        await self._use(target)
        if (
            self.settings.kubeconfig is not None
            or self._token_file is not None
            or target.configuration is not None
            or target.tls_files
        ):
            self._refresher = asyncio.create_task(
                self._refresh_loop(), name="upstream-credential-refresh"
            )
        log.info(
            "upstream ready",
            extra={
                "upstream": str(target.base_url),
                "client_certificate": target.cert_file is not None,
                "bearer": target.authorization is not None,
            },
        )

    async def _prepared(
        self, target: Target
    ) -> tuple[ssl.SSLContext, Signature, str, TokenFile | None, str | None]:
        """TLS, file identities and contents, and credential for ``target``;
        nothing swapped."""
        seen = await asyncio.to_thread(stat_all, target.tls_files)
        digest = await asyncio.to_thread(digest_all, target.tls_files)
        ctx = await asyncio.to_thread(ssl_context, target)
        authorization = target.authorization
        token_file = None
        if target.token_file is not None:
            token_file = TokenFile(target.token_file)
            try:
                token = await asyncio.to_thread(token_file.read_if_changed)
            except OSError as err:  # read again on the next check
                log.warning(
                    "upstream credential refresh failed",
                    extra={"error": type(err).__name__, "detail": err.strerror},
                )
                token = None
            if token is not None:
                authorization = "Bearer " + token
        return ctx, seen, digest, token_file, authorization

    async def _use(self, target: Target) -> ConnectionPool | None:
        """Serve ``target`` from now on; return the pool it replaces.

        Everything that can fail (TLS files, the token file) is read first;
        the swap itself has no ``await``, so a request sees the old target or
        the new one whole: its credential and its pool match.
        """
        ctx, seen, digest, token_file, authorization = await self._prepared(target)
        url = target.base_url
        use_tls = url.scheme == "https"
        assert url.host is not None
        pool = ConnectionPool(
            host=url.host,
            port=url.port or (443 if use_tls else 80),
            ssl_context=ctx if use_tls else None,
            server_hostname=(target.server_name or url.host) if use_tls else None,
            resolver=self._resolver,
            limit=self.settings.max_connections,
            keepalive_timeout=self.settings.keepalive_timeout,
            host_header=url.host_port_subcomponent or url.host,
        )
        old, self._pool = self._pool, pool
        self._target = target
        self._ssl = ctx
        self._tls_seen = seen
        self._tls_digest = digest
        self._token_file = token_file
        self._authorization = authorization
        self._base = str(url).rstrip("/")
        self._prefix = url.raw_path.rstrip("/")
        return old

    def _count_reload(self, status: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_reloads.labels(status).inc()

    async def reload_kubeconfig(self) -> bool:
        """Load the kubeconfig again; ``True`` when new requests use what it says.

        Called when the file changes and on ``SIGHUP``. The same loaders and
        checks as at start; a file that does not load keeps the last good
        target (logged with the problem, which never quotes a credential).
        In-cluster (no kubeconfig) there is nothing to do.
        """
        if self.settings.kubeconfig is None or self._pool is None:
            return False
        try:
            target = await asyncio.to_thread(load_target, self.settings, self._environ)
            old = await self._use(target)
        except ConfigError as err:
            log.warning(
                "upstream kubeconfig not reloaded, the last good one is used",
                extra={"kubeconfig": self.settings.kubeconfig, "problem": str(err)},
            )
            self._count_reload("failure")
            return False
        retired = 0
        if old is not None:
            retired = old.retire()
            # Pools whose last connection has gone need no closing later.
            self._retired = [p for p in self._retired if p.open_connections]
            self._retired.append(old)
        self._count_reload("success")
        log.info(
            "upstream kubeconfig reloaded",
            extra={
                "upstream": str(target.base_url),
                "client_certificate": target.cert_file is not None,
                "bearer": self._authorization is not None,
                "idle_connections_closed": retired,
            },
        )
        return True

    async def close(self) -> None:
        """Stop the rotation checks and close the pool."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        retired, self._retired = self._retired, []
        for old in retired:
            await old.close()

    def auth_headers(self) -> dict[str, str]:
        """The proxy's own credential as headers (empty for client-cert only)."""
        if self._authorization is None:
            return {}
        return {"Authorization": self._authorization}

    @property
    def auth_items(self) -> tuple[tuple[str, str], ...]:
        """``auth_headers()`` as name-value pairs, without building a dict for
        every request.
        """
        authorization = self._authorization
        if authorization is None:
            return ()
        return (("Authorization", authorization),)

    async def refresh_credentials(self) -> bool:
        """Re-read a rotated credential now; ``True`` when it changed."""
        target = self._target
        new: str | None = None
        try:
            if self._token_file is not None:
                token = await asyncio.to_thread(self._token_file.read_if_changed)
                new = None if token is None else "Bearer " + token
            elif target is not None and target.configuration is not None:
                cfg = target.configuration
                raw = await asyncio.to_thread(
                    cfg.get_api_key_with_prefix, "BearerToken", "authorization"
                )
                new = normalise_authorization(raw)
        except OSError as err:
            log.warning(
                "upstream credential refresh failed",
                extra={"error": type(err).__name__, "detail": err.strerror},
            )
            return False
        if new is None or new == self._authorization or self._target is not target:
            return False
        self._authorization = new
        log.info("upstream credential reloaded")
        return True

    async def refresh_tls(self) -> bool:
        """Rebuild TLS if its files changed; ``True`` when new connections use it.

        A pair that does not load (a key written after its certificate, not
        there yet) keeps the last good context; the next change is tried again.
        """
        target, pool = self._target, self._pool
        if target is None or pool is None or not target.tls_files:
            return False
        seen = await asyncio.to_thread(stat_all, target.tls_files)
        if seen == self._tls_seen or self._target is not target:
            return False
        self._tls_seen = seen
        digest = await asyncio.to_thread(digest_all, target.tls_files)
        if digest == self._tls_digest or self._target is not target:
            return False  # new inodes, the same bytes: nothing to reload
        try:
            ctx = await asyncio.to_thread(ssl_context, target)
        except ConfigError as err:
            log.warning(
                "upstream tls not reloaded, the last good one is used",
                extra={"problem": str(err)},
            )
            self._count_reload("failure")
            return False
        if self._target is not target:  # the kubeconfig was reloaded meanwhile
            return False
        self._ssl = ctx
        self._tls_digest = digest
        retired = pool.replace_tls(ctx)
        self._count_reload("success")
        log.info(
            "upstream tls reloaded",
            extra={
                "client_certificate": target.cert_file is not None,
                "idle_connections_closed": retired,
            },
        )
        return True

    async def _refresh_loop(self) -> None:
        interval = max(self.settings.credential_check_interval, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_tls()
                await self.refresh_credentials()
            except Exception:  # the loop must survive a broken exec plugin
                log.exception("upstream credential refresh crashed")

    def url(self, path_qs: str) -> URL:
        """The upstream URL for a client's raw path and query (kept as sent)."""
        self._loaded()
        return URL(self._base + path_qs, encoded=True)

    @property
    def pool(self) -> ConnectionPool:
        """The lean keep-alive pool behind ``fetch`` (valid after ``start``)."""
        if self._pool is None:
            raise RuntimeError("upstream: not started")
        return self._pool

    def _pool_for(self, passthrough: bool) -> ConnectionPool:
        """The pool to send on; never a client-certificate one for a client's token.

        The proxy decides a request is passed through before it sends it, and
        a kubeconfig reload may swap the target in between. Checked here, in
        the same step as taking the pool (no ``await`` between), so a client's
        token never rides the proxy's certificate, which kube-apiserver would
        authenticate first (with the client's ``Impersonate-*`` headers).
        ``token_passthrough`` in the settings already refuses such a target;
        this holds for any caller.
        """
        pool = self.pool
        if passthrough and self._loaded().cert_file is not None:
            raise UpstreamError(
                "proxy: token passthrough refused: the upstream credential is a "
                "client certificate now",
                status=503,
            )
        return pool

    def target(self, path_qs: str) -> str:
        """The request target for a client's raw path and query, as
        ``url(path_qs).raw_path_qs`` gives it, without building a URL in the
        usual case.
        """
        if "#" in path_qs or path_qs.endswith("?"):
            return self.url(path_qs).raw_path_qs
        return self._prefix + path_qs

    async def fetch(
        self,
        method: str,
        path_qs: str,
        *,
        headers: Iterable[tuple[str, str]],
        body: bytes | BodySource | None = None,
        body_length: int | None = None,
        connect_timeout: float,
        head_timeout: float | None = None,
        max_head_bytes: int = 256 * 1024,
        passthrough: bool = False,
    ) -> PooledResponse:
        """Send a request through the pool (``proxy.upstream_pool``) and return
        the answer once its head has arrived; its body is read whole or piece
        by piece (a watch: no total limit, the caller bounds each piece).

        ``headers`` carry no framing: the pool writes it from ``body`` (and
        ``body_length``, a streamed body's exact length when known). Close
        the response when done (``async with``). Failures are
        ``UpstreamError`` with the status to answer; ``head_timeout`` unset
        leaves the bound to the caller's timeout. ``passthrough``: the request
        carries the client's own token (see ``_pool_for``).
        """
        return await self._pool_for(passthrough).send(
            method,
            self.target(path_qs),
            headers,
            body=body,
            body_length=body_length,
            connect_timeout=connect_timeout,
            head_timeout=head_timeout,
            max_head_bytes=max_head_bytes,
        )

    async def upgrade(
        self,
        method: str,
        path_qs: str,
        *,
        headers: Iterable[tuple[str, str]],
        protocol: str,
        connect_timeout: float,
        head_timeout: float | None = None,
        max_head_bytes: int = 256 * 1024,
        passthrough: bool = False,
    ) -> PooledResponse:
        """Ask for ``Upgrade: protocol`` on a fresh pooled connection; the
        answer once its head has arrived. ``detach()`` a ``101`` for
        ``proxy.tunnel``; any other status is an ordinary answer to read.

        ``headers`` are sent as given (the caller adds the credential it
        wants: the proxy's own, or the client's in passthrough mode);
        ``Host``, ``Connection``, ``Upgrade`` and the framing (none) are the
        pool's.
        """
        return await self._pool_for(passthrough).upgrade(
            method,
            self.target(path_qs),
            headers,
            protocol=protocol,
            connect_timeout=connect_timeout,
            head_timeout=head_timeout,
            max_head_bytes=max_head_bytes,
        )
