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

This module holds the two kubeconfigs; the proxy's account is
``proxy.proxyaccount``, kube-apiserver's settings ``proxy.apiserverflags``,
and the shared readers and YAML writer ``proxy.kubefiles``. The CLI imports
all of these from here.

Everything here is pure apart from reading the named PEM and token files:
values go in, YAML text comes out (``yaml.safe_dump``; nothing is executed or
fetched). Each input is checked with a message naming the flag it came from,
because these files are read by other programs long after this one has exited,
and a broken one shows up as a cluster that cannot log anyone in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from proxy.apiserverflags import (
    DEFAULT_CA_FILE_PATH,
    apiserver_flags,
    authentication_configuration,
)
from proxy.errors import ConfigError
from proxy.kubefiles import (
    b64,
    check_url,
    comment,
    dump_yaml,
    read_certificates,
    read_private_key,
    spki,
)
from proxy.proxyaccount import (
    DEFAULT_PROXY_NAMESPACE,
    DEFAULT_PROXY_SERVICE_ACCOUNT,
    PROXY_CONTEXT_NAME,
    proxy_kubeconfig,
    proxy_rbac,
)

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
    check_url(url, "--url", loopback_http=False, need_path=True)
    ca_data, _ = read_certificates(ca_file, "--ca-file")
    user: dict[str, str] = {}
    if (client_cert is None) != (client_key is None):
        missing = "--client-key" if client_key is None else "--client-cert"
        raise ConfigError(
            "config: --client-cert and --client-key must be given together: "
            f"{missing} is missing"
        )
    if client_cert is not None and client_key is not None:
        cert_data, certs = read_certificates(client_cert, "--client-cert")
        key_data, public = read_private_key(client_key, "--client-key")
        if spki(certs[0].public_key()) != spki(public):
            raise ConfigError(
                f"config: --client-cert {json.dumps(client_cert)} and --client-key "
                f"{json.dumps(client_key)} do not match: the key is not the one "
                "of the certificate (the first in the file)"
            )
        user = {
            "client-certificate-data": b64(cert_data),
            "client-key-data": b64(key_data),
        }
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kube-oidc-gate",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": b64(ca_data),
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
    header = comment(
        [
            "kube-oidc-gate TokenReview webhook, as seen by kube-apiserver. Give it as",
            *(f"  {flag}={value}" for flag, value in WEBHOOK_APISERVER_FLAGS),
        ]
    )
    return header + dump_yaml(document)


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
    name = default_context_name(server) if context_name is None else context_name
    _check_user_inputs(
        server=server,
        issuer_url=issuer_url,
        client_id=client_id,
        name=name,
        exec_command=exec_command,
        extra_scopes=extra_scopes,
        allow_issuer_trailing_slash=allow_issuer_trailing_slash,
    )
    cluster: dict[str, str] = {"server": server}
    if ca_file is not None:
        ca_data, _ = read_certificates(ca_file, "--ca-file")
        cluster["certificate-authority-data"] = b64(ca_data)
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [
            {
                "name": name,
                "user": _exec_user(
                    issuer_url=issuer_url,
                    client_id=client_id,
                    extra_scopes=extra_scopes,
                    exec_command=exec_command,
                    exec_args=exec_args,
                ),
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
    return _login_header(name) + dump_yaml(document)


def _check_user_inputs(
    *,
    server: str,
    issuer_url: str,
    client_id: str,
    name: str,
    exec_command: str,
    extra_scopes: Sequence[str],
    allow_issuer_trailing_slash: bool,
) -> None:
    """``user_kubeconfig``'s inputs, each refused with the flag it came from."""
    check_url(server, "--server", loopback_http=True)
    check_url(issuer_url, "--oidc-issuer-url", loopback_http=True, allow_query=False)
    if issuer_url.endswith("/") and not allow_issuer_trailing_slash:
        raise ConfigError(_issuer_slash_problem(issuer_url))
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


def _login_header(name: str) -> str:
    """The user kubeconfig's opening comment: what it needs, how it merges."""
    return comment(
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


def _exec_user(
    *,
    issuer_url: str,
    client_id: str,
    extra_scopes: Sequence[str],
    exec_command: str,
    exec_args: Sequence[str] | None,
) -> dict[str, Any]:
    """The user entry: kubelogin's ``get-token`` as an exec credential."""
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
    return {
        "exec": {
            "apiVersion": EXEC_API_VERSION,
            "command": exec_command,
            "args": args,
            "installHint": KUBELOGIN_INSTALL_HINT,
            "interactiveMode": "IfAvailable",
            "provideClusterInfo": False,
        }
    }
