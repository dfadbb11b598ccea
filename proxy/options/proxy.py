"""Proxy mode's own flags: the upstream API server and the impersonation policy.

The flags follow kube-oidc-proxy's names where it had them
(``--token-passthrough``, ``--allow-reserved-groups``, ``--trusted-proxies``)
and kubectl's for the upstream (``--kubeconfig``, ``--context``), so an operator
moving from either finds what they know. The values they make are
``proxy.impersonate.ProxySettings`` and ``proxy.upstream.UpstreamSettings``,
whose defaults are the flags' defaults.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from proxy.errors import ConfigError
from proxy.impersonate import ProxySettings
from proxy.upstream import SERVICE_ACCOUNT_DIR, UpstreamSettings

__all__ = [
    "add_proxy_arguments",
    "proxy_settings_from_args",
    "upstream_settings_from_args",
]

_DEFAULTS = ProxySettings()


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the upstream and impersonation-policy flags of proxy mode."""
    up = parser.add_argument_group("upstream API server")
    up.add_argument(
        "--kubeconfig",
        help="kubeconfig with the proxy's own credentials for the API server "
        "(default: the in-cluster service account, whose rotating token is re-read).",
    )
    up.add_argument(
        "--context", help="Context in --kubeconfig (default: its current-context)."
    )
    up.add_argument(
        "--service-account-dir",
        default=None,
        help="Without --kubeconfig: the directory holding the pod's service-account "
        f"token and ca.crt (default {SERVICE_ACCOUNT_DIR}, where the kubelet mounts "
        "them); the token is re-read as the kubelet rotates it.",
    )
    up.add_argument(
        "--upstream-connect-timeout",
        type=float,
        default=_DEFAULTS.connect_timeout,
        help=f"Seconds to connect to the API server (default {_DEFAULTS.connect_timeout:g}).",
    )
    up.add_argument(
        "--request-timeout",
        type=float,
        default=_DEFAULTS.request_timeout,
        help="Seconds for a whole non-streaming request (default "
        f"{_DEFAULTS.request_timeout:g}); watches, logs -f, exec and port-forward have "
        "no total timeout, only --stream-idle-timeout.",
    )
    up.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=_DEFAULTS.stream_idle_timeout,
        help="Seconds without a byte after which a watch, log stream or exec/"
        f"port-forward tunnel is closed (default {_DEFAULTS.stream_idle_timeout:g}; 0: never).",
    )
    pol = parser.add_argument_group("impersonation policy")
    pol.add_argument(
        "--allow-client-impersonation",
        action="store_true",
        help="Let clients send Impersonate-* headers (kubectl --as); each value is checked "
        "with a SubjectAccessReview as the authenticated user. Default: refused with 403.",
    )
    pol.add_argument(
        "--max-impersonation-values",
        type=int,
        default=_DEFAULTS.max_impersonation_values,
        help="Most Impersonate-* values one request may carry (default "
        f"{_DEFAULTS.max_impersonation_values}); each costs one SubjectAccessReview.",
    )
    pol.add_argument(
        "--token-passthrough",
        action="store_true",
        help="Forward tokens of no configured issuer unchanged (no impersonation) and let "
        "the API server decide. Default: 401.",
    )
    pol.add_argument(
        "--allow-reserved-groups",
        default="",
        help="Comma-separated system: names (user or groups) a token may map to; any other "
        "system: identity from a token is refused with 403.",
    )
    pol.add_argument(
        "--trusted-proxies",
        default="",
        help="Comma-separated CIDRs of load balancers whose X-Forwarded-For is kept; "
        "from anyone else it is ignored.",
    )


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def proxy_settings_from_args(ns: argparse.Namespace) -> ProxySettings:
    """Validate the proxy flags into ``ProxySettings`` (every problem listed)."""
    problems: list[str] = []
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for cidr in _csv(ns.trusted_proxies):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            problems.append(f"config: --trusted-proxies: {cidr!r} is not a CIDR")
    reserved = _csv(ns.allow_reserved_groups)
    problems += [
        f"config: --allow-reserved-groups: {name!r} does not start with system:"
        for name in reserved
        if not name.startswith("system:")
    ]
    for flag, value in (
        ("--upstream-connect-timeout", ns.upstream_connect_timeout),
        ("--request-timeout", ns.request_timeout),
    ):
        if not value > 0:
            problems.append(f"config: {flag} must be > 0, got {value}")
    if ns.stream_idle_timeout < 0:
        problems.append("config: --stream-idle-timeout must be >= 0")
    if ns.max_impersonation_values < 1:
        problems.append("config: --max-impersonation-values must be >= 1")
    if problems:
        raise ConfigError(problems)
    return ProxySettings(
        allow_client_impersonation=ns.allow_client_impersonation,
        max_impersonation_values=ns.max_impersonation_values,
        token_passthrough=ns.token_passthrough,
        allow_reserved_groups=reserved,
        trusted_proxies=tuple(networks),
        connect_timeout=ns.upstream_connect_timeout,
        request_timeout=ns.request_timeout,
        stream_idle_timeout=ns.stream_idle_timeout,
        tunnel_idle_timeout=ns.stream_idle_timeout,
        refusal_log_limit=ns.refusal_log_limit,
    )


def upstream_settings_from_args(ns: argparse.Namespace) -> UpstreamSettings:
    """Where the proxy's own credential comes from, as the flags say.

    ``--service-account-dir`` moves the in-cluster files (a pod that mounts
    its projected token elsewhere, a test); with ``--kubeconfig`` it has no
    meaning and is refused rather than ignored.
    """
    sa_dir = ns.service_account_dir
    if sa_dir is not None and ns.kubeconfig:
        raise ConfigError(
            "config: --service-account-dir is for the in-cluster service account: "
            "give either it or --kubeconfig, not both"
        )
    base = (sa_dir or SERVICE_ACCOUNT_DIR).rstrip("/") or "/"
    return UpstreamSettings(
        kubeconfig=ns.kubeconfig,
        context=ns.context,
        token_file=os.path.join(base, "token"),
        ca_file=os.path.join(base, "ca.crt"),
        token_passthrough=ns.token_passthrough,
    )
