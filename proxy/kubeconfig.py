"""Files other programs read: kubeconfigs and kube-apiserver's own OIDC settings.

``kube-oidc-gate kubeconfig`` prints these so a team never writes them by hand:

- ``webhook_kubeconfig``: the file kube-apiserver's
  ``--authentication-token-webhook-config-file`` names. It is a kubeconfig in
  which the *cluster* is the webhook (its URL and the CA that signed its
  serving certificate) and the *user* is kube-apiserver itself (the client
  certificate it presents when ``--client-ca-file`` is set).
- ``user_kubeconfig``: the end user's kubeconfig, with kubelogin's
  ``get-token`` exec credential (the reference article's ``kubectl oidc-login
  get-token``, run as the plugin binary ``kubectl-oidc_login`` itself), so a
  team distributes one file and every user logs in with a browser. Its
  context, cluster and user entries all carry one name, unique per server by
  default, so files for several clusters merge without one entry shadowing
  another's (kubectl keeps the first file's entry of a name and drops the
  rest, silently).
- ``proxy_kubeconfig`` / ``proxy_rbac``: the proxy's own credential when it
  runs outside the cluster (a service-account token), and the RBAC that gives
  that service account exactly the impersonation rights of
  ``deploy/overlays/proxy/rbac.yaml``.
- ``apiserver_flags`` / ``authentication_configuration``: for a team moving to
  a cluster whose API server can validate the tokens itself. The flags exist
  only for what the legacy ``--oidc-*`` form can say (one issuer, claim
  mappings, ``claim``/``requiredValue`` rules); anything more is explained and
  answered with an ``AuthenticationConfiguration`` instead, which can say all
  of it.

Everything here is pure apart from reading the named PEM and token files:
values go in, YAML text comes out (``yaml.safe_dump``; nothing is executed or
fetched). Each input is checked with a message naming the flag it came from,
because these files are read by other programs long after this one has exited,
and a broken one shows up as a cluster that cannot log anyone in.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import textwrap
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from proxy.claims import CREDENTIAL_ID_EXTRA
from proxy.config import (
    FILE_SIGNING_ALGS,
    SUPPORTED_API_VERSIONS,
    AuthConfig,
    ClaimValidationRule,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
    url_problems,
)
from proxy.errors import ConfigError, TokenError
from proxy.tokens import peek

__all__ = [
    "DEFAULT_CA_FILE_PATH",
    "DEFAULT_PROXY_NAMESPACE",
    "DEFAULT_PROXY_SERVICE_ACCOUNT",
    "EXEC_API_VERSION",
    "KUBELOGIN_COMMAND",
    "KUBELOGIN_INSTALL_HINT",
    "LISTEN_ADDRESS",
    "PROXY_CONTEXT_NAME",
    "WEBHOOK_APISERVER_FLAGS",
    "apiserver_flags",
    "authentication_configuration",
    "default_context_name",
    "proxy_kubeconfig",
    "proxy_rbac",
    "user_kubeconfig",
    "webhook_kubeconfig",
]

#: ``client.authentication.k8s.io`` version of the exec credential (the article's).
EXEC_API_VERSION: Final = "client.authentication.k8s.io/v1"
#: Where kubelogin listens for the browser redirect; the IdP app must allow
#: ``http://localhost:8000`` as its redirect URI (the article's Okta setup).
LISTEN_ADDRESS: Final = "localhost:8000"
#: Path ``apiserver_flags`` gives ``--oidc-ca-file`` when the caller names none.
DEFAULT_CA_FILE_PATH: Final = "/etc/kubernetes/pki/oidc-ca.crt"

#: kubelogin's binary under the name every install method gives it (krew,
#: Homebrew, the release archive saved as its README says). The kubeconfig runs
#: it directly rather than as ``kubectl oidc-login``: when it is missing,
#: kubectl then says "executable kubectl-oidc_login not found" and prints
#: ``installHint``, instead of re-entering itself and failing with
#: ``unknown command "oidc-login"``. Both forms need this binary on PATH.
KUBELOGIN_COMMAND: Final = "kubectl-oidc_login"
#: What kubectl prints when ``KUBELOGIN_COMMAND`` is not found.
KUBELOGIN_INSTALL_HINT: Final = """\
This kubeconfig logs you in with kubelogin, run as kubectl-oidc_login, which
must be on your PATH. Install it with one of:
  kubectl krew install oidc-login   (krew's ~/.krew/bin must be on PATH)
  brew install kubelogin
  or download it from https://github.com/int128/kubelogin/releases and save
  the binary as kubectl-oidc_login in a directory on your PATH.
"""
#: ``kubeconfig user``'s context name without ``--context-name`` is
#: ``oidc@<server host[:port][/path]>``: unique per API server, so two
#: generated files never share a name by default.
_CONTEXT_PREFIX: Final = "oidc@"

#: kube-apiserver's flags for the webhook kubeconfig, as the header of
#: ``webhook_kubeconfig`` and deploy/overlays/webhook/apiserver/README.md give
#: them. The cache TTL is 30 s rather than the 2 min default, so a user
#: disabled at the IdP is refused sooner; reviews are cheap (we cache too).
WEBHOOK_APISERVER_FLAGS: Final = (
    ("--authentication-token-webhook-config-file", "<this file>"),
    ("--authentication-token-webhook-version", "v1"),
    ("--authentication-token-webhook-cache-ttl", "30s"),
)

#: The proxy's service account, as deploy/ names it (namespace and name).
DEFAULT_PROXY_NAMESPACE: Final = "kube-oidc-gate"
DEFAULT_PROXY_SERVICE_ACCOUNT: Final = "kube-oidc-gate"
#: Name of the context, cluster and user entries of ``proxy_kubeconfig``.
PROXY_CONTEXT_NAME: Final = "kube-oidc-gate-proxy"
#: Largest token file read (service-account tokens are about 1 KiB).
_MAX_TOKEN_BYTES: Final = 64 * 1024

#: Algorithms kube-apiserver verifies (it has no EdDSA).
_KUBE_ALGS: Final = tuple(a for a in FILE_SIGNING_ALGS if a != "EdDSA")


# ---------------------------------------------------------------------------
# Reading and checking the inputs
# ---------------------------------------------------------------------------


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: cannot read: {err.strerror or err}"
        ) from err


def _read_certificates(path: str, flag: str) -> tuple[bytes, list[x509.Certificate]]:
    """The file's bytes (embedded as they are) and its parsed certificates."""
    data = _read(path, flag)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: not a PEM certificate file: "
            "no CERTIFICATE block found"
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: a CERTIFICATE block does not "
            f"parse: {err}"
        ) from err
    return data, certs


def _read_private_key(path: str, flag: str) -> tuple[bytes, PublicKeyTypes]:
    """The key file's bytes and the public half of the key, for the match check."""
    data = _read(path, flag)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: the private key is encrypted; "
            "kube-apiserver cannot ask for a passphrase: give an unencrypted key"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: not a PEM private key: {err}"
        ) from err
    return data, key.public_key()


def _spki(key: PublicKeyTypes | CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_url(
    url: str,
    flag: str,
    *,
    loopback_http: bool,
    need_path: bool = False,
    allow_query: bool = True,
) -> None:
    """``https`` (or ``http`` to loopback when allowed), a host, no credentials.

    An issuer URL also takes no query (it must equal the tokens' ``iss``).
    """
    try:
        path = urlsplit(url).path
        _ = urlsplit(url).port
    except ValueError as err:
        raise ConfigError(
            f"config: {flag}: {json.dumps(url)}: URL does not parse: {err}"
        ) from err
    problems = url_problems(url, loopback_http=loopback_http, allow_query=allow_query)
    if need_path and path in ("", "/"):
        problems.append(
            "URL must name the webhook's path, such as "
            "https://HOST:7443/authenticate (kube-apiserver posts to the URL as is)"
        )
    if problems:
        raise ConfigError([f"config: {flag}: {json.dumps(url)}: {p}" for p in problems])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Dumper(yaml.SafeDumper):
    """``safe_dump`` that writes multi-line strings (PEM, CEL) as ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def _comment(lines: Sequence[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def _wrap(items: Sequence[str], *, bullet: str) -> list[str]:
    """Long explanations as comment lines that fit a terminal."""
    indent = " " * len(bullet)
    return [
        line
        for item in items
        for line in textwrap.wrap(
            item,
            width=86,
            initial_indent=bullet,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    ]


# ---------------------------------------------------------------------------
# kubeconfigs
# ---------------------------------------------------------------------------


def webhook_kubeconfig(
    *,
    url: str,
    ca_file: str,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> str:
    """The file kube-apiserver's ``--authentication-token-webhook-config-file`` names.

    ``url`` is the webhook's full https URL (kube-apiserver posts to it as is);
    ``ca_file`` holds the CA of the webhook's serving certificate;
    ``client_cert``/``client_key`` (together or not at all) are what
    kube-apiserver presents when the webhook runs with ``--client-ca-file``.
    The PEM files are embedded as ``*-data``, so the output stands alone.
    """
    _check_url(url, "--url", loopback_http=False, need_path=True)
    ca_data, _ = _read_certificates(ca_file, "--ca-file")
    user: dict[str, str] = {}
    if (client_cert is None) != (client_key is None):
        missing = "--client-key" if client_key is None else "--client-cert"
        raise ConfigError(
            "config: --client-cert and --client-key must be given together: "
            f"{missing} is missing"
        )
    if client_cert is not None and client_key is not None:
        cert_data, certs = _read_certificates(client_cert, "--client-cert")
        key_data, public = _read_private_key(client_key, "--client-key")
        if _spki(certs[0].public_key()) != _spki(public):
            raise ConfigError(
                f"config: --client-cert {json.dumps(client_cert)} and --client-key "
                f"{json.dumps(client_key)} do not match: the key is not the one "
                "of the certificate (the first in the file)"
            )
        user = {
            "client-certificate-data": _b64(cert_data),
            "client-key-data": _b64(key_data),
        }
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kube-oidc-gate",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": _b64(ca_data),
                },
            }
        ],
        "users": [{"name": "kube-apiserver", "user": user}],
        "contexts": [
            {
                "name": "webhook",
                "context": {"cluster": "kube-oidc-gate", "user": "kube-apiserver"},
            }
        ],
        "current-context": "webhook",
        "preferences": {},
    }
    header = _comment(
        [
            "kube-oidc-gate TokenReview webhook, as seen by kube-apiserver. Give it as",
            *(f"  {flag}={value}" for flag, value in WEBHOOK_APISERVER_FLAGS),
        ]
    )
    return header + _dump(document)


def default_context_name(server: str) -> str:
    """``kubeconfig user``'s context name when ``--context-name`` is not given.

    ``oidc@`` and the server's host (with its port and path, if any): files
    generated for different API servers (or proxies) never share a name, so
    merging them cannot make one context use another's cluster or user.
    """
    parts = urlsplit(server)
    return _CONTEXT_PREFIX + parts.netloc.lower() + parts.path.rstrip("/")


def _issuer_slash_problem(issuer_url: str) -> str:
    """Why an issuer URL ending in ``/`` is refused: a typo for every Okta issuer.

    kubelogin (like kube-apiserver) compares the URL with the discovery
    document's ``issuer`` character for character, and Okta's never end in a
    slash, so the login would fail on every user's machine instead of here.
    Some IdPs' issuers do end in one (Auth0's), hence the way out.
    """
    return (
        f"config: --oidc-issuer-url: {json.dumps(issuer_url)} ends with '/', "
        "but kubelogin compares it with the IdP's issuer character for character "
        "(Okta's never end in '/'): give "
        f"--oidc-issuer-url={issuer_url.rstrip('/')}, or add "
        "--allow-issuer-trailing-slash if your IdP's issuer really ends in '/'"
    )


def user_kubeconfig(
    *,
    server: str,
    issuer_url: str,
    client_id: str,
    ca_file: str | None = None,
    context_name: str | None = None,
    extra_scopes: Sequence[str] = (),
    allow_issuer_trailing_slash: bool = False,
    exec_command: str = KUBELOGIN_COMMAND,
    exec_args: Sequence[str] | None = None,
) -> str:
    """An end user's kubeconfig that logs in with kubelogin's ``get-token``.

    The exec credential is the reference article's ``kubectl config
    set-credentials`` result with the plugin binary run directly
    (``KUBELOGIN_COMMAND``): ``get-token`` with the issuer URL, the client id
    and ``--listen-address=localhost:8000``, interactive if a terminal is
    there, and ``installHint`` for a machine without kubelogin.

    ``context_name`` (default: ``default_context_name(server)``) names the
    context, its cluster and its user entry alike, so files for several
    clusters can be merged with ``KUBECONFIG=a:b kubectl config view
    --flatten``. kubectl keeps the first entry of a name: when every file
    called its cluster ``kubernetes`` (as kubeadm's ``admin.conf`` does), a
    merged context silently used another file's server.
    ``extra_scopes`` become ``--oidc-extra-scope`` (an IdP may only send
    ``groups`` when asked). An issuer URL ending in ``/`` is refused unless
    ``allow_issuer_trailing_slash``. ``exec_command``/``exec_args`` replace the
    command and all its arguments (tests run a stand-in plugin this way).
    """
    _check_url(server, "--server", loopback_http=True)
    _check_url(issuer_url, "--oidc-issuer-url", loopback_http=True, allow_query=False)
    if issuer_url.endswith("/") and not allow_issuer_trailing_slash:
        raise ConfigError(_issuer_slash_problem(issuer_url))
    name = default_context_name(server) if context_name is None else context_name
    for flag, value in (
        ("--oidc-client-id", client_id),
        ("--context-name", name),
        ("--exec-command", exec_command),
    ):
        if not value or value != value.strip():
            raise ConfigError(
                f"config: {flag}: must be non-empty, without leading or trailing "
                f"spaces (got {json.dumps(value)})"
            )
    for scope in extra_scopes:
        if not scope or any(c.isspace() for c in scope) or "," in scope:
            raise ConfigError(
                f"config: --oidc-extra-scope: {json.dumps(scope)}: a scope is one "
                "word, without spaces or commas"
            )
    cluster: dict[str, str] = {"server": server}
    if ca_file is not None:
        ca_data, _ = _read_certificates(ca_file, "--ca-file")
        cluster["certificate-authority-data"] = _b64(ca_data)
    if exec_args is None:
        args = [
            "get-token",
            f"--oidc-issuer-url={issuer_url}",
            f"--oidc-client-id={client_id}",
            f"--listen-address={LISTEN_ADDRESS}",
            *(f"--oidc-extra-scope={scope}" for scope in extra_scopes),
        ]
    else:
        args = list(exec_args)
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [
            {
                "name": name,
                "user": {
                    "exec": {
                        "apiVersion": EXEC_API_VERSION,
                        "command": exec_command,
                        "args": args,
                        "installHint": KUBELOGIN_INSTALL_HINT,
                        "interactiveMode": "IfAvailable",
                        "provideClusterInfo": False,
                    }
                },
            }
        ],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": name, "user": name, "namespace": "default"},
            }
        ],
        "current-context": name,
        "preferences": {},
    }
    header = _comment(
        [
            "Log in to Kubernetes with your OpenID identity. Needs kubelogin as",
            f"{KUBELOGIN_COMMAND} on your PATH (kubectl krew install oidc-login).",
            "The first kubectl command opens a browser; the token is cached",
            "in ~/.kube/cache/oidc-login until it expires.",
            "Its context, cluster and user entries are all named",
            f"  {name}",
            "so it merges with files of other names (kubectl keeps the first of",
            "two entries of one name), e.g.:",
            "  KUBECONFIG=~/.kube/config:this-file kubectl config view --flatten",
        ]
    )
    return header + _dump(document)


# ---------------------------------------------------------------------------
# The proxy's own credential, outside the cluster
# ---------------------------------------------------------------------------


def _token_command(namespace: str, service_account: str) -> str:
    return f"kubectl -n {namespace} create token {service_account} --duration=720h"


def _read_service_account_token(
    path: str, *, namespace: str, service_account: str, now: float
) -> tuple[str, float | None]:
    """The token in ``path`` and its ``exp``, checked to be the named account's.

    The claims are read without verifying the signature (only the API server
    can): this catches a token of another account or an expired one here, not
    as 401s or "cannot impersonate" 403s from a running proxy.
    """
    raw = _read(path, "--token-file")
    if len(raw) > _MAX_TOKEN_BYTES:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: {len(raw)} bytes is too "
            "large for a service-account token"
        )
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: not a token (not ASCII text)"
        ) from err
    make = _token_command(namespace, service_account)
    if not token:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: the file is empty: write "
            f"the token into it ({make} > FILE)"
        )
    try:
        claims = peek(token, max_bytes=_MAX_TOKEN_BYTES).claims
    except TokenError as err:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: not a service-account "
            f"token (a JWT): {err}"
        ) from err
    expected = f"system:serviceaccount:{namespace}:{service_account}"
    sub = claims.get("sub")
    if sub != expected:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: the token is for "
            f"{json.dumps(sub)}, but --namespace/--service-account name "
            f'"{expected}", the account the RBAC binds: give its token ({make}) '
            "or change the flags"
        )
    exp = claims.get("exp")
    if exp is None:
        return token, None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: the token's exp is not a number"
        )
    if exp <= now:
        raise ConfigError(
            f"config: --token-file {json.dumps(path)}: the token expired at "
            f"{_utc(exp)}: make a new one ({make})"
        )
    return token, float(exp)


def _check_account(namespace: str, service_account: str) -> None:
    """Names kube-apiserver could accept (``:`` would garble the subject)."""
    for flag, value in (
        ("--namespace", namespace),
        ("--service-account", service_account),
    ):
        if not value or any(c.isspace() or c in ":/" for c in value):
            raise ConfigError(
                f"config: {flag}: must be a non-empty name without spaces, ':' "
                f"or '/' (got {json.dumps(value)})"
            )


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def proxy_kubeconfig(
    *,
    server: str,
    token_file: str,
    ca_file: str | None = None,
    namespace: str = DEFAULT_PROXY_NAMESPACE,
    service_account: str = DEFAULT_PROXY_SERVICE_ACCOUNT,
    now: float | None = None,
) -> str:
    """The proxy's ``--kubeconfig`` when it runs outside the cluster.

    The credential is the token of the service account ``proxy_rbac`` binds
    (``kubectl create token``, or a ``kubernetes.io/service-account-token``
    Secret's for one that does not expire), embedded so the file stands alone,
    like ``ca_file``, the API server's CA. In the cluster the proxy needs no
    kubeconfig: it uses its pod's service account and re-reads its rotating
    token. Here the token is read once, when the proxy starts, so the header
    says when it expires. ``now`` (seconds since the epoch) is for tests.
    """
    _check_url(server, "--server", loopback_http=True)
    _check_account(namespace, service_account)
    cluster: dict[str, str] = {"server": server}
    if ca_file is not None:
        ca_data, _ = _read_certificates(ca_file, "--ca-file")
        cluster["certificate-authority-data"] = _b64(ca_data)
    token, exp = _read_service_account_token(
        token_file,
        namespace=namespace,
        service_account=service_account,
        now=time.time() if now is None else now,
    )
    name = PROXY_CONTEXT_NAME
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": name}},
        ],
        "current-context": name,
        "preferences": {},
    }
    expiry = (
        [
            f"The token expires at {_utc(exp)}. The proxy reads it once, at start:",
            "before then, make a new one, regenerate this file and restart it.",
        ]
        if exp is not None
        else ["The token does not expire (a service-account-token Secret's)."]
    )
    header = _comment(
        [
            "kube-oidc-gate proxy's own credential for the API server: the token of",
            f"service account {namespace}/{service_account}, which may only impersonate",
            "(kube-oidc-gate kubeconfig proxy --print-rbac). Use it as",
            "  kube-oidc-gate proxy --kubeconfig <this file> ...",
            *expiry,
            "It holds a credential: keep it readable by the proxy alone (chmod 600).",
        ]
    )
    return header + _dump(document)


def proxy_rbac(
    config: AuthConfig | None = None,
    *,
    namespace: str = DEFAULT_PROXY_NAMESPACE,
    service_account: str = DEFAULT_PROXY_SERVICE_ACCOUNT,
) -> str:
    """The service account of the proxy and exactly the rights it needs.

    It may impersonate users, groups, uids and the extra keys the proxy
    sends: ``authentication.kubernetes.io/credential-id`` (from a token's
    ``jti``) and every ``claimMappings.extra`` key of ``config`` (none for
    the ``--oidc-*`` flags or ``None``). RBAC has no wildcard for
    ``userextras/<key>``, and a key missing here makes the API server refuse
    that user's every request with 403. With the defaults and deploy/'s
    configuration, the objects equal deploy/base/serviceaccount.yaml and
    deploy/overlays/proxy/rbac.yaml (a test holds them equal).
    """
    _check_account(namespace, service_account)
    role = f"{service_account}-impersonator"
    keys = {CREDENTIAL_ID_EXTRA}
    for authenticator in config.authenticators if config is not None else ():
        keys.update(e.key for e in authenticator.claim_mappings.extra)
    extras = [CREDENTIAL_ID_EXTRA, *sorted(keys - {CREDENTIAL_ID_EXTRA})]
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": service_account, "namespace": namespace},
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["users", "groups"],
                    "verbs": ["impersonate"],
                },
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["uids", *(f"userextras/{k}" for k in extras)],
                    "verbs": ["impersonate"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": service_account,
                    "namespace": namespace,
                }
            ],
        },
    ]
    source = (
        "credential-id and the configuration's claimMappings.extra keys"
        if config is not None
        else "credential-id only: no --authentication-config was given"
    )
    header = _comment(
        [
            "kube-oidc-gate proxy's service account: it may impersonate users,",
            "groups, uids and the extra keys the proxy sends, nothing else",
            f"(extra keys: {source}).",
            "Apply it, then make the token for its kubeconfig:",
            f"  kubectl create namespace {namespace}   # unless it exists",
            "  kubectl apply -f <this file>",
            f"  {_token_command(namespace, service_account)} > proxy.token",
        ]
    )
    return header + "---\n".join(_dump(d) for d in documents)


# ---------------------------------------------------------------------------
# kube-apiserver's own settings
# ---------------------------------------------------------------------------


def _required_claim_problem(rule: ClaimValidationRule) -> str | None:
    """Why a ``claim``/``requiredValue`` rule cannot be an ``--oidc-required-claim``.

    The flag is read as comma-separated ``KEY=VALUE`` pairs with the spaces
    around each part trimmed, so a comma anywhere, an ``=`` in the key or
    surrounding spaces cannot survive it.
    """
    claim, value = rule.claim or "", rule.required_value or ""
    if "," in claim or "," in value:
        return "contains a comma, which the flag reads as a pair separator"
    if "=" in claim:
        return "has '=' in the claim name, which the flag reads as the separator"
    if claim != claim.strip() or value != value.strip():
        return "has leading or trailing spaces, which the flag trims"
    return None


def _legacy_problems(config: AuthConfig) -> list[str]:
    """Why the ``--oidc-*`` flags cannot express ``config`` (empty: they can)."""
    if len(config.authenticators) != 1:
        return [f"it has {len(config.authenticators)} issuers; the flags configure one"]
    a = config.authenticators[0]
    p = a.source
    problems: list[str] = []
    issuer = a.issuer
    if issuer.discovery_url is not None:
        problems.append(
            f"{p}: issuer.discoveryURL is set; with the flags the discovery "
            "document is always fetched from the issuer URL"
        )
    if len(issuer.audiences) != 1:
        problems.append(
            f"{p}: it accepts {len(issuer.audiences)} audiences; --oidc-client-id "
            "is one"
        )
    if not [alg for alg in issuer.signing_algs if alg in _KUBE_ALGS]:
        problems.append(
            f"{p}: it accepts only {', '.join(issuer.signing_algs)}, which "
            "kube-apiserver does not verify"
        )
    mappings = a.claim_mappings
    username = mappings.username
    if username.expression is not None:
        problems.append(f"{p}: claimMappings.username is a CEL expression")
    elif username.prefix == "-":
        problems.append(
            f'{p}: the username prefix is "-", which --oidc-username-prefix reads '
            "as no prefix"
        )
    if mappings.groups is not None and mappings.groups.expression is not None:
        problems.append(f"{p}: claimMappings.groups is a CEL expression")
    if mappings.uid is not None:
        problems.append(f"{p}: claimMappings.uid is set; the flags have no uid")
    if mappings.extra:
        problems.append(f"{p}: claimMappings.extra is set; the flags have no extra")
    for i, rule in enumerate(a.claim_validation_rules):
        if rule.expression is not None:
            problems.append(f"{p}: claimValidationRules[{i}] is a CEL expression")
            continue
        problem = _required_claim_problem(rule)
        if problem is not None:
            problems.append(
                f"{p}: claimValidationRules[{i}] (claim {json.dumps(rule.claim)}) "
                f"{problem}"
            )
    if a.user_validation_rules:
        problems.append(f"{p}: userValidationRules are set; the flags have none")
    return problems


def _notes(config: AuthConfig, *, for_flags: bool) -> list[str]:
    """Differences kube-apiserver will make that no output can avoid."""
    notes: list[str] = []
    for a in config.authenticators:
        issuer = a.issuer
        if urlsplit(issuer.url).scheme == "http":
            notes.append(
                f"{a.source}: kube-apiserver requires an https issuer URL; "
                f"{issuer.url} is accepted by kube-oidc-gate only (loopback, for "
                "tests and --dev)"
            )
        if "EdDSA" in issuer.signing_algs and (for_flags or config.form == "flags"):
            notes.append(
                f"{a.source}: EdDSA is left out: kube-apiserver does not verify "
                "EdDSA signatures"
            )
        if not for_flags and not set(_KUBE_ALGS) <= set(issuer.signing_algs):
            notes.append(
                f"{a.source}: kube-oidc-gate accepts only "
                f"{', '.join(issuer.signing_algs)} here; an "
                "AuthenticationConfiguration has no algorithm field and "
                f"kube-apiserver accepts {', '.join(_KUBE_ALGS)}"
            )
    return notes


def _username_prefix_flag(username: PrefixedClaimOrExpression, url: str) -> str | None:
    """The ``--oidc-username-prefix`` value, or None when the default is right.

    kube-apiserver's default is ``<issuer-url>#``, or no prefix for the
    ``email`` claim; ``-`` says "no prefix" explicitly.
    """
    prefix = username.prefix or ""
    default = "" if username.claim == "email" else f"{url}#"
    if prefix == default:
        return None
    return prefix or "-"


def apiserver_flags(
    config: AuthConfig,
    *,
    ca_file_path: str = DEFAULT_CA_FILE_PATH,
    api_version: str = "apiserver.config.k8s.io/v1",
) -> str:
    """kube-apiserver's ``--oidc-*`` flags equivalent to ``config``, one per line.

    When the flags cannot express ``config`` (several issuers, CEL, uid or
    extra mappings, user rules, a discovery URL, several audiences), the text
    says why in comments and gives the ``AuthenticationConfiguration`` instead
    (in ``api_version``).
    A CA bundle cannot be a flag value: ``--oidc-ca-file`` names
    ``ca_file_path`` and the bundle to put there follows in comments. Lines
    starting with ``#`` are comments.
    """
    problems = _legacy_problems(config)
    if problems:
        return _comment(
            [
                "The --oidc-* flags cannot express this configuration:",
                *_wrap(problems, bullet="  - "),
                "Give kube-apiserver this AuthenticationConfiguration instead,",
                "as --authentication-config=FILE (with no --oidc-* flag):",
                "",
            ]
        ) + authentication_configuration(config)
    a = config.authenticators[0]
    issuer, mappings = a.issuer, a.claim_mappings
    flags = [
        f"--oidc-issuer-url={issuer.url}",
        f"--oidc-client-id={issuer.audiences[0]}",
        f"--oidc-username-claim={mappings.username.claim}",
    ]
    prefix = _username_prefix_flag(mappings.username, issuer.url)
    if prefix is not None:
        flags.append(f"--oidc-username-prefix={prefix}")
    if mappings.groups is not None:
        flags.append(f"--oidc-groups-claim={mappings.groups.claim}")
        if mappings.groups.prefix:
            flags.append(f"--oidc-groups-prefix={mappings.groups.prefix}")
    flags.extend(
        f"--oidc-required-claim={rule.claim}={rule.required_value or ''}"
        for rule in a.claim_validation_rules
    )
    algs = [alg for alg in issuer.signing_algs if alg in _KUBE_ALGS]
    if algs != ["RS256"]:
        flags.append(f"--oidc-signing-algs={','.join(algs)}")
    trailer = ""
    if issuer.certificate_authority is not None:
        flags.append(f"--oidc-ca-file={ca_file_path}")
        trailer = _comment(
            [
                f"{ca_file_path} must hold, on every control-plane node:",
                *issuer.certificate_authority.strip().splitlines(),
            ]
        )
    header = _comment(
        [
            "kube-apiserver flags equivalent to this kube-oidc-gate configuration",
            "(kubeadm: the command of /etc/kubernetes/manifests/kube-apiserver.yaml).",
            *_wrap(_notes(config, for_flags=True), bullet="note: "),
        ]
    )
    return header + "".join(f"{flag}\n" for flag in flags) + trailer


def _prefixed(value: PrefixedClaimOrExpression) -> dict[str, str]:
    if value.expression is not None:
        return {"expression": value.expression.source}
    return {"claim": value.claim or "", "prefix": value.prefix or ""}


def _jwt_entry(a: JWTAuthenticatorConfig) -> dict[str, Any]:
    issuer: dict[str, Any] = {"url": a.issuer.url}
    if a.issuer.discovery_url is not None:
        issuer["discoveryURL"] = a.issuer.discovery_url
    if a.issuer.certificate_authority is not None:
        issuer["certificateAuthority"] = a.issuer.certificate_authority
    issuer["audiences"] = list(a.issuer.audiences)
    if a.issuer.audience_match_policy or len(a.issuer.audiences) > 1:
        issuer["audienceMatchPolicy"] = "MatchAny"
    entry: dict[str, Any] = {"issuer": issuer}

    rules: list[dict[str, str]] = []
    for rule in a.claim_validation_rules:
        if rule.expression is not None:
            item = {"expression": rule.expression.source}
            if rule.message:
                item["message"] = rule.message
        else:
            item = {
                "claim": rule.claim or "",
                "requiredValue": rule.required_value or "",
            }
        rules.append(item)
    if rules:
        entry["claimValidationRules"] = rules

    m = a.claim_mappings
    mappings: dict[str, Any] = {"username": _prefixed(m.username)}
    if m.groups is not None:
        mappings["groups"] = _prefixed(m.groups)
    if m.uid is not None:
        mappings["uid"] = (
            {"expression": m.uid.expression.source}
            if m.uid.expression is not None
            else {"claim": m.uid.claim or ""}
        )
    if m.extra:
        mappings["extra"] = [
            {"key": x.key, "valueExpression": x.value_expression.source}
            for x in m.extra
        ]
    entry["claimMappings"] = mappings

    if a.user_validation_rules:
        entry["userValidationRules"] = [
            {
                "expression": r.expression.source,
                **({"message": r.message} if r.message else {}),
            }
            for r in a.user_validation_rules
        ]
    return entry


def authentication_configuration(
    config: AuthConfig, api_version: str = "apiserver.config.k8s.io/v1"
) -> str:
    """An ``AuthenticationConfiguration`` equivalent to ``config`` (any config).

    Prefixes are written out as resolved (the legacy ``<issuer>#`` default
    becomes an explicit prefix, as the file format has no defaulting), CEL
    expressions by their source, CA bundles inline. ``api_version`` is one of
    ``SUPPORTED_API_VERSIONS``: ``v1`` needs kube-apiserver 1.34 or later,
    ``v1beta1`` 1.30 or later.
    """
    if api_version not in SUPPORTED_API_VERSIONS:
        raise ConfigError(
            f"config: --api-version: {json.dumps(api_version)}: unsupported; "
            f"supported: {', '.join(SUPPORTED_API_VERSIONS)}"
        )
    document: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": "AuthenticationConfiguration",
        "jwt": [_jwt_entry(a) for a in config.authenticators],
    }
    header = _comment(
        [
            "AuthenticationConfiguration equivalent to this kube-oidc-gate",
            "configuration, for kube-apiserver --authentication-config=FILE.",
            *_wrap(_notes(config, for_flags=False), bullet="note: "),
        ]
    )
    return header + _dump(document)
