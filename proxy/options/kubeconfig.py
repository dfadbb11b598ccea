"""The flags of ``kubeconfig webhook``, ``kubeconfig user`` and ``kubeconfig proxy``.

What each generated file needs (``proxy.kubeconfig``): the URL and CA
kube-apiserver reaches the webhook with, the issuer and client a user logs in
to, and the proxy's own service account outside the cluster.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

from proxy.kubeconfig import (
    DEFAULT_PROXY_NAMESPACE,
    DEFAULT_PROXY_SERVICE_ACCOUNT,
    KUBELOGIN_COMMAND,
    LISTEN_ADDRESS,
)

__all__ = ["add_kubeconfig_arguments"]


_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_kubeconfig_arguments(kc: argparse.ArgumentParser) -> None:
    """Add ``kubeconfig``'s three kinds, each with its flags."""
    kcs = kc.add_subparsers(dest="kind", required=True, metavar="KIND")
    _add_kubeconfig_webhook(kcs)
    _add_kubeconfig_user(kcs)
    _add_kubeconfig_proxy(kcs)


def _add_kubeconfig_webhook(kcs: _Subparsers) -> None:
    kw = kcs.add_parser(
        "webhook",
        help="The file for kube-apiserver's --authentication-token-webhook-config-file.",
        description="Print the kubeconfig kube-apiserver reads to reach this "
        "webhook; its header names the kube-apiserver flags to give with it.",
    )
    kw.add_argument(
        "--url",
        required=True,
        metavar="URL",
        help="Required. https://HOST[:PORT]/authenticate of this webhook, as "
        "kube-apiserver reaches it (it posts to the URL as given).",
    )
    kw.add_argument(
        "--ca-file",
        required=True,
        metavar="FILE",
        help="Required. CA that signed the webhook's serving certificate (embedded).",
    )
    kw.add_argument(
        "--client-cert",
        metavar="FILE",
        help="Client certificate kube-apiserver presents, for a webhook run with "
        "--client-ca-file (default: none). With --client-key.",
    )
    kw.add_argument(
        "--client-key",
        metavar="FILE",
        help="Unencrypted key of --client-cert (default: none).",
    )


def _add_kubeconfig_user(kcs: _Subparsers) -> None:
    ku = kcs.add_parser(
        "user",
        help="The end-user kubeconfig that logs in with kubelogin.",
        description="Print the kubeconfig users log in with: its exec credential "
        f"runs kubelogin ({KUBELOGIN_COMMAND} get-token) with --listen-address="
        f"{LISTEN_ADDRESS}, the redirect URI to register at the IdP. The file "
        "holds no secret.",
    )
    ku.add_argument(
        "--server",
        required=True,
        metavar="URL",
        help="Required. The URL kubectl talks to: this proxy's in proxy mode, the "
        "API server's in webhook mode.",
    )
    ku.add_argument(
        "--oidc-issuer-url",
        required=True,
        metavar="URL",
        help="Required. The issuer kubelogin logs in to, exactly as the IdP's "
        "discovery document says it (https; for Okta "
        "https://ORG.okta.com/oauth2/default, with no trailing '/').",
    )
    ku.add_argument(
        "--oidc-client-id",
        required=True,
        metavar="ID",
        help="Required. The client ID of the IdP's app (Okta: the native app's); "
        "not a secret.",
    )
    ku.add_argument(
        "--ca-file",
        metavar="FILE",
        help="CA of --server, embedded (default: none: the system's trusted CAs).",
    )
    ku.add_argument(
        "--context-name",
        metavar="NAME",
        help="Name of the context and of its cluster and user entries (default: "
        "oidc@ and --server's host, e.g. oidc@gate.example.com:7444). Files with "
        "different names merge safely with KUBECONFIG=a:b kubectl config view "
        "--flatten.",
    )
    ku.add_argument(
        "--allow-issuer-trailing-slash",
        action="store_true",
        help="Accept an --oidc-issuer-url ending in '/' (default: refused, as a "
        "typo). Only for an IdP whose issuer really ends in '/', such as Auth0.",
    )


def _add_kubeconfig_proxy(kcs: _Subparsers) -> None:
    kp = kcs.add_parser(
        "proxy",
        help="The proxy's own kubeconfig outside the cluster (or, with "
        "--print-rbac, its service account and RBAC).",
        description="Print the --kubeconfig of a proxy that runs outside the "
        "cluster: the API server and a token of the proxy's service account. "
        "With --print-rbac, print that service account and the RBAC that lets it "
        "impersonate and do nothing else; apply it first and make the token.",
    )
    kp.add_argument(
        "--server",
        metavar="URL",
        help="The API server's URL (required unless --print-rbac).",
    )
    kp.add_argument(
        "--ca-file",
        metavar="FILE",
        help="CA of the API server, embedded (default: none: the system's trusted "
        "CAs). kubectl get configmap kube-root-ca.crt gives the cluster's.",
    )
    kp.add_argument(
        "--token-file",
        metavar="FILE",
        help="The service account's token, embedded (required unless "
        "--print-rbac): kubectl create token, or a service-account-token "
        "Secret's for one that does not expire.",
    )
    kp.add_argument(
        "--namespace",
        default=DEFAULT_PROXY_NAMESPACE,
        metavar="NS",
        help=f"Namespace of the service account (default {DEFAULT_PROXY_NAMESPACE}, "
        "as in deploy/).",
    )
    kp.add_argument(
        "--service-account",
        default=DEFAULT_PROXY_SERVICE_ACCOUNT,
        metavar="NAME",
        help="The service account (default "
        f"{DEFAULT_PROXY_SERVICE_ACCOUNT}, as in deploy/); the token must be its.",
    )
    kp.add_argument(
        "--print-rbac",
        action="store_true",
        help="Print the ServiceAccount, ClusterRole and ClusterRoleBinding instead "
        "of a kubeconfig (default: off).",
    )
    kp.add_argument(
        "--authentication-config",
        metavar="FILE",
        help="With --print-rbac: the proxy's AuthenticationConfiguration, whose "
        "claimMappings.extra keys it must be allowed to impersonate (default: "
        "none: only the credential-id extra, right for the --oidc-* flags).",
    )
