"""The proxy's own account: its RBAC, and its kubeconfig outside the cluster.

``proxy_rbac`` is the service account of the proxy and exactly the
impersonation rights it needs (those of ``deploy/overlays/proxy/rbac.yaml``);
``proxy_kubeconfig`` embeds that account's token for a proxy that runs outside
the cluster. Re-exported by ``proxy.kubeconfig``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Final

from proxy.claims import CREDENTIAL_ID_EXTRA
from proxy.config import (
    AuthConfig,
)
from proxy.errors import ConfigError, TokenError
from proxy.kubefiles import (
    b64,
    check_url,
    comment,
    dump_yaml,
    read_certificates,
    read_input,
)
from proxy.tokens import peek

__all__ = [
    "DEFAULT_PROXY_NAMESPACE",
    "DEFAULT_PROXY_SERVICE_ACCOUNT",
    "PROXY_CONTEXT_NAME",
    "proxy_kubeconfig",
    "proxy_rbac",
]

#: The proxy's service account, as deploy/ names it (namespace and name).
DEFAULT_PROXY_NAMESPACE: Final = "kube-oidc-gate"
DEFAULT_PROXY_SERVICE_ACCOUNT: Final = "kube-oidc-gate"
#: Name of the context, cluster and user entries of ``proxy_kubeconfig``.
PROXY_CONTEXT_NAME: Final = "kube-oidc-gate-proxy"
#: Largest token file read (service-account tokens are about 1 KiB).
_MAX_TOKEN_BYTES: Final = 64 * 1024


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
    raw = read_input(path, "--token-file")
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
    check_url(server, "--server", loopback_http=True)
    _check_account(namespace, service_account)
    cluster: dict[str, str] = {"server": server}
    if ca_file is not None:
        ca_data, _ = read_certificates(ca_file, "--ca-file")
        cluster["certificate-authority-data"] = b64(ca_data)
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
    header = comment(
        [
            "kube-oidc-gate proxy's own credential for the API server: the token of",
            f"service account {namespace}/{service_account}, which may only impersonate",
            "(kube-oidc-gate kubeconfig proxy --print-rbac). Use it as",
            "  kube-oidc-gate proxy --kubeconfig <this file> ...",
            *expiry,
            "It holds a credential: keep it readable by the proxy alone (chmod 600).",
        ]
    )
    return header + dump_yaml(document)


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
    keys = {CREDENTIAL_ID_EXTRA}
    for authenticator in config.authenticators if config is not None else ():
        keys.update(e.key for e in authenticator.claim_mappings.extra)
    extras = [CREDENTIAL_ID_EXTRA, *sorted(keys - {CREDENTIAL_ID_EXTRA})]
    documents = _rbac_documents(
        namespace=namespace, service_account=service_account, extras=extras
    )
    source = (
        "credential-id and the configuration's claimMappings.extra keys"
        if config is not None
        else "credential-id only: no --authentication-config was given"
    )
    header = comment(
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
    return header + "---\n".join(dump_yaml(d) for d in documents)


def _rbac_documents(
    *, namespace: str, service_account: str, extras: list[str]
) -> list[dict[str, Any]]:
    """The ServiceAccount, its ClusterRole (impersonation only) and the binding."""
    role = f"{service_account}-impersonator"
    return [
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
