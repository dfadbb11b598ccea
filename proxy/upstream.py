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
import hashlib
import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml
from aiohttp.abc import AbstractResolver
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubernetes.client import Configuration
from kubernetes.config import ConfigException, load_kube_config
from kubernetes.config.incluster_config import InClusterConfigLoader
from yarl import URL

from proxy.config import is_loopback_host
from proxy.errors import ConfigError, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream_pool import BodySource, ConnectionPool, PooledResponse, Upgraded

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

#: Where the kubelet mounts the pod's service account (``--service-account-dir``).
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The pod's service-account token in it (rotated in place by the kubelet).
SERVICE_TOKEN_FILE: Final = SERVICE_ACCOUNT_DIR + "/token"
#: The cluster CA that comes with it.
SERVICE_CA_FILE: Final = SERVICE_ACCOUNT_DIR + "/ca.crt"

#: Why a client-certificate credential and ``--token-passthrough`` never meet.
_PASSTHROUGH_OVER_CERT: Final = (
    "--token-passthrough cannot be used when the upstream credential is a client "
    "certificate: the API server would authenticate forwarded requests as the "
    "proxy; give the proxy a token credential instead"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSettings:
    """Where the API server is and how the proxy proves who it is.

    ``kubeconfig`` unset means in-cluster (the pod's service account); set, it
    is read with ``context`` (unset: the file's ``current-context``).
    """

    #: Path of a kubeconfig; ``None`` means the in-cluster service account.
    kubeconfig: str | None = None
    #: kubeconfig context to use; ``None`` means the file's current-context.
    context: str | None = None
    #: In-cluster token file (re-read when it changes); injectable for tests.
    token_file: str = SERVICE_TOKEN_FILE
    #: In-cluster CA bundle.
    ca_file: str = SERVICE_CA_FILE
    #: Seconds between checks of the credential for rotation.
    credential_check_interval: float = 1.0
    #: Most connections to the API server at once; 0 means no limit. Every
    #: watch, log stream and exec holds one for its whole life, so a limit
    #: here caps concurrent streams (and ordinary requests wait behind them)
    #: rather than protecting the API server.
    max_connections: int = 0
    #: Seconds an idle pooled connection is kept for reuse.
    keepalive_timeout: float = 30.0
    #: The proxy forwards clients' own tokens (``--token-passthrough``): a
    #: credential that is a client certificate is refused, at start and on
    #: every reload, since kube-apiserver authenticates a certificate before a
    #: bearer token and the client would act as the proxy.
    token_passthrough: bool = False


@dataclass(slots=True, kw_only=True)
class _Target:
    """What the kubernetes loaders produced, reduced to what we use."""

    base_url: URL
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    server_name: str | None
    authorization: str | None
    token_file: str | None
    configuration: Any

    @property
    def tls_files(self) -> tuple[str, ...]:
        """The files the TLS context is built from (watched for rotation)."""
        if self.base_url.scheme != "https":
            return ()
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f)


_Signature = tuple[tuple[int, int, int, int] | None, ...]


def _stat_all(paths: Iterable[str]) -> _Signature:
    """The identity of each file (None: missing); blocking, call in a thread."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _digest_all(paths: Iterable[str]) -> str:
    """One digest of the files' contents (blocking, call in a thread).

    A projected service-account volume swaps every file at each token
    rotation, ``ca.crt`` included: a new inode, the same bytes. Comparing
    contents keeps that from rebuilding TLS and dropping idle connections.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            data = b"\x00missing"
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _kubeconfig_token_file(path: str, context: str | None) -> str | None:
    """The ``tokenFile`` of the kubeconfig user in use, resolved as kubectl does.

    The kubernetes loader reads it once; we re-read it when it changes. Any
    surprise in the file means "none": the loader has validated it already.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        name = context or doc.get("current-context")
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == name)
        user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
        # client-go: an inline token wins over tokenFile.
        token_file = None if user.get("token") else user.get("tokenFile")
    except Exception:  # noqa: BLE001 - "no token file" is the safe answer
        return None
    if not isinstance(token_file, str) or not token_file:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), token_file)


class _TokenFile:
    """A token file and the identity of the version last read from it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int, int] | None = None

    def read_if_changed(self) -> str | None:
        """The new token if the file changed since the last read, else ``None``.

        Blocking (stat and read): call it in a thread. An empty file keeps the
        old token: the kubelet never writes one, a half-written copy might.
        """
        st = os.stat(self.path)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return None
        with open(self.path, encoding="utf-8") as fh:
            token = fh.read().strip()
        if not token:
            log.warning("upstream token file is empty", extra={"path": self.path})
            return None
        self._signature = signature
        return token


#: What the proxy's own credential needs at most; named by the warning below.
RBAC_FILE: Final = "deploy/overlays/proxy/rbac.yaml"

#: Groups whose members may do anything: ``system:masters`` bypasses RBAC
#: altogether (no binding can be removed to revoke it), and kubeadm binds
#: ``kubeadm:cluster-admins`` (its ``admin.conf`` since 1.29) to cluster-admin.
_ALL_POWERFUL_GROUPS: Final = ("system:masters", "kubeadm:cluster-admins")


def upstream_problems(
    settings: UpstreamSettings, environ: Mapping[str, str] | None = None
) -> list[str]:
    """What makes the credential source unusable, found without loading it.

    The kubernetes loaders say "No configuration found" for a ``--kubeconfig``
    that does not exist and "Service host/port is not set" outside a pod; these
    checks say which flag, which path and what to do instead. They read no
    credential, so the CLI runs them before anything starts, beside every
    other flag's checks.
    """
    env = os.environ if environ is None else environ
    if settings.kubeconfig is not None:
        paths = [p for p in settings.kubeconfig.split(os.pathsep) if p]
        if any(os.path.exists(os.path.expanduser(p)) for p in paths):
            return []
        return [
            f"upstream: --kubeconfig {json.dumps(settings.kubeconfig)}: no such "
            "file; give the kubeconfig with the proxy's own credential for the "
            "API server, or leave --kubeconfig out in a pod to use its service "
            "account"
        ]
    if not env.get("KUBERNETES_SERVICE_HOST") or not env.get("KUBERNETES_SERVICE_PORT"):
        return [
            "upstream: no --kubeconfig, and not in a pod (KUBERNETES_SERVICE_HOST "
            "and KUBERNETES_SERVICE_PORT are unset): give --kubeconfig with the "
            "proxy's own credential for the API server; in a pod the mounted "
            "service-account token is used"
        ]
    if not os.path.isfile(settings.token_file):
        return [
            f"upstream: in-cluster service account: no token at "
            f"{settings.token_file}: mount it (automountServiceAccountToken: true, "
            "as deploy/overlays/proxy sets), point --service-account-dir at "
            "where it is mounted, or give --kubeconfig"
        ]
    return []


def _all_powerful_groups(cert_file: str) -> list[str]:
    """The all-powerful groups (subject ``O=``) of a client certificate file.

    Only the first certificate counts: it is the one presented. A file that
    does not parse yields nothing here; loading it for TLS reports that.
    """
    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return []
    groups = [
        str(attr.value)
        for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    ]
    return [g for g in groups if g in _ALL_POWERFUL_GROUPS]


def _warn_if_all_powerful(target: _Target) -> None:
    """Warn once at start when the proxy's credential can do anything.

    Impersonation needs only the ``impersonate`` verb on users, groups, uids
    and the mapped extras. A cluster-admin credential works just as well, so
    nothing else would ever show the mistake, but then a leak of the proxy's
    credential, or a request that reached the API server without impersonation
    headers, acts as cluster-admin.
    """
    if target.cert_file is None:
        return
    groups = _all_powerful_groups(target.cert_file)
    if groups:
        log.warning(
            "upstream credential is far more powerful than impersonation needs",
            extra={
                "groups": groups,
                "risk": "a client certificate in these groups may do anything in "
                "the cluster (system:masters even bypasses RBAC and cannot be "
                "revoked); whoever gets the proxy's credential gets that too",
                "hint": "give the proxy a credential with only the impersonation "
                f"rights of {RBAC_FILE}",
            },
        )


def _load(settings: UpstreamSettings, environ: Mapping[str, str] | None) -> _Target:
    """Run the kubernetes loaders (blocking) and check what they produced."""
    problems = upstream_problems(settings, environ)
    if problems:
        raise ConfigError(problems)
    cfg = Configuration()
    source = settings.kubeconfig or "in-cluster service account"
    try:
        if settings.kubeconfig is None:
            loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=settings.token_file,
                cert_filename=settings.ca_file,
                try_refresh_token=False,
                environ=os.environ if environ is None else environ,
            )
            loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
        else:
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=settings.kubeconfig,
                context=settings.context,
                client_configuration=cfg,
                persist_config=False,
            )
    except ConfigException as err:
        raise ConfigError(f"upstream: {source}: {err}") from err
    except OSError as os_err:
        raise ConfigError(
            f"upstream: {source}: cannot read: {os_err.strerror}"
        ) from os_err
    except yaml.YAMLError as yaml_err:
        # PyYAML's message quotes the offending line, which may hold a token.
        mark = getattr(yaml_err, "problem_mark", None)
        where = f" near line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"upstream: {source}: not valid yaml{where}") from yaml_err
    except Exception as other:  # the loaders raise anything on odd input
        raise ConfigError(
            f"upstream: {source}: unusable ({type(other).__name__})"
        ) from other
    if getattr(cfg, "proxy", None):
        raise ConfigError(f"upstream: {source}: proxy-url is not supported")
    url = URL(str(cfg.host))
    if url.scheme not in ("https", "http") or not url.host:
        raise ConfigError(f"upstream: {source}: server must be an https url")
    if url.scheme == "http" and not is_loopback_host(url.host):
        raise ConfigError(
            f"upstream: {source}: plain http is only allowed to a loopback address"
        )
    if settings.token_passthrough and cfg.cert_file:
        raise ConfigError(f"config: {_PASSTHROUGH_OVER_CERT} ({source})")
    raw = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
    target = _Target(
        base_url=url,
        ca_file=cfg.ssl_ca_cert or None,
        cert_file=cfg.cert_file or None,
        key_file=cfg.key_file or None,
        verify=bool(cfg.verify_ssl),
        server_name=getattr(cfg, "tls_server_name", None) or None,
        authorization=_normalise_authorization(raw),
        token_file=settings.token_file
        if settings.kubeconfig is None
        else _kubeconfig_token_file(settings.kubeconfig, settings.context),
        configuration=cfg if getattr(cfg, "refresh_api_key_hook", None) else None,
    )
    _warn_if_all_powerful(target)
    return target


def _normalise_authorization(raw: object) -> str | None:
    """``Bearer <token>`` from what the loaders store (``bearer x`` in-cluster)."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    scheme, _, rest = raw.strip().partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return "Bearer " + rest.strip()
    return raw.strip()


def _ssl_context(target: _Target) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=target.ca_file)
        if target.cert_file:
            ctx.load_cert_chain(target.cert_file, target.key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"upstream: tls material: {err}") from err
    if not target.verify:
        log.warning("upstream tls verification disabled by the kubeconfig")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


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
        self._target: _Target | None = None
        self._ssl: ssl.SSLContext | None = None
        self._authorization: str | None = None
        self._token_file: _TokenFile | None = None
        self._tls_seen: _Signature = ()
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

    def _loaded(self) -> _Target:
        if self._target is None:
            raise RuntimeError("upstream: not started")
        return self._target

    async def start(self) -> None:
        """Load the configuration, build TLS and the pool, start rotation checks.

        Raises ``ConfigError`` when the configuration is unusable.
        """
        if self._pool is not None:
            return
        target = await asyncio.to_thread(_load, self.settings, self._environ)
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
        self, target: _Target
    ) -> tuple[ssl.SSLContext, _Signature, str, _TokenFile | None, str | None]:
        """TLS, file identities and contents, and credential for ``target``;
        nothing swapped."""
        seen = await asyncio.to_thread(_stat_all, target.tls_files)
        digest = await asyncio.to_thread(_digest_all, target.tls_files)
        ctx = await asyncio.to_thread(_ssl_context, target)
        authorization = target.authorization
        token_file = None
        if target.token_file is not None:
            token_file = _TokenFile(target.token_file)
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

    async def _use(self, target: _Target) -> ConnectionPool | None:
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
            target = await asyncio.to_thread(_load, self.settings, self._environ)
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
                new = _normalise_authorization(raw)
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
        seen = await asyncio.to_thread(_stat_all, target.tls_files)
        if seen == self._tls_seen or self._target is not target:
            return False
        self._tls_seen = seen
        digest = await asyncio.to_thread(_digest_all, target.tls_files)
        if digest == self._tls_digest or self._target is not target:
            return False  # new inodes, the same bytes: nothing to reload
        try:
            ctx = await asyncio.to_thread(_ssl_context, target)
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
