"""Where the API server is and the proxy's own credential, as the loaders say.

The ``kubernetes`` package's loaders read a kubeconfig exactly as kubectl does
(contexts, inline or file certificate data, exec plugins) or the in-cluster
service account as every client-go program does; ``load_target`` runs them
(blocking: call it in a thread), checks what they produced and reduces it to a
``Target``. Beside it: the checks that run before anything loads
(``upstream_problems``), the TLS context of a target, and the file identities
and digests ``proxy.upstream.Upstream`` watches to rotate credentials without
a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubernetes.client import Configuration
from kubernetes.config import ConfigException, load_kube_config
from kubernetes.config.incluster_config import InClusterConfigLoader
from yarl import URL

from proxy.config import is_loopback_host
from proxy.errors import ConfigError

__all__ = [
    "RBAC_FILE",
    "SERVICE_ACCOUNT_DIR",
    "SERVICE_CA_FILE",
    "SERVICE_TOKEN_FILE",
    "Signature",
    "Target",
    "TokenFile",
    "UpstreamSettings",
    "digest_all",
    "load_target",
    "normalise_authorization",
    "ssl_context",
    "stat_all",
    "upstream_problems",
]

#: The logger of ``proxy.upstream``, whose part this was: operators and tests
#: filter on that name.
log = logging.getLogger("proxy.upstream")

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
class Target:
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


Signature = tuple[tuple[int, int, int, int] | None, ...]


def stat_all(paths: Iterable[str]) -> Signature:
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


def digest_all(paths: Iterable[str]) -> str:
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


class TokenFile:
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


def _warn_if_all_powerful(target: Target) -> None:
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


def load_target(
    settings: UpstreamSettings, environ: Mapping[str, str] | None
) -> Target:
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
    except ConfigException as config_err:
        raise ConfigError(f"upstream: {source}: {config_err}") from config_err
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
    target = Target(
        base_url=url,
        ca_file=cfg.ssl_ca_cert or None,
        cert_file=cfg.cert_file or None,
        key_file=cfg.key_file or None,
        verify=bool(cfg.verify_ssl),
        server_name=getattr(cfg, "tls_server_name", None) or None,
        authorization=normalise_authorization(raw),
        token_file=settings.token_file
        if settings.kubeconfig is None
        else _kubeconfig_token_file(settings.kubeconfig, settings.context),
        configuration=cfg if getattr(cfg, "refresh_api_key_hook", None) else None,
    )
    _warn_if_all_powerful(target)
    return target


def normalise_authorization(raw: object) -> str | None:
    """``Bearer <token>`` from what the loaders store (``bearer x`` in-cluster)."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    scheme, _, rest = raw.strip().partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return "Bearer " + rest.strip()
    return raw.strip()


def ssl_context(target: Target) -> ssl.SSLContext:
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
