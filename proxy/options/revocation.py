"""The revocation list: ``--revocation-namespace`` and ``revoke``'s flags.

Both front ends (and ``check-token``, which reads the list once) watch the
Revocation objects of one namespace (``proxy.revocation_api``);
``kube-oidc-gate revoke`` writes one there.
"""

from __future__ import annotations

import argparse
import re

from proxy.errors import ConfigError
from proxy.options.values import (
    DEFAULT_REVOCATION_LIFETIME,
    DEFAULT_REVOCATION_NAMESPACE,
    RevocationSettings,
)

__all__ = [
    "add_revocation_arguments",
    "add_revoke_arguments",
    "parse_duration",
    "revocation_settings_from_args",
]


_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def add_revocation_arguments(
    parser: argparse.ArgumentParser, *, kubeconfig: bool
) -> None:
    """``--revocation-namespace`` (both front ends, and ``check-token``, which
    reads the list once); ``kubeconfig`` also adds
    ``--kubeconfig``/``--context`` (the webhook's: the proxy has its own)."""
    g = parser.add_argument_group("revocation list")
    g.add_argument(
        "--revocation-namespace",
        default=None,
        metavar="NS",
        help="Watch the Revocation objects (CRD revocations.kube-oidc-gate.io, "
        "deploy/components/revocation) in this namespace and refuse the tokens "
        "they name as revoked, within seconds, on every replica. Needs "
        "get/list/watch (and delete, for expired objects) there. Default: off.",
    )
    if kubeconfig:
        g.add_argument(
            "--kubeconfig",
            help="kubeconfig with the gate's credential for reading the revocation "
            "list (default: the in-cluster service account). Only with "
            "--revocation-namespace.",
        )
        g.add_argument(
            "--context",
            help="Context in --kubeconfig (default: its current-context).",
        )


def revocation_settings_from_args(ns: argparse.Namespace) -> RevocationSettings | None:
    """The revocation watch of a serving mode, or None when it is off."""
    namespace: str | None = getattr(ns, "revocation_namespace", None)
    if namespace is None:
        if ns.command in ("webhook", "check-token") and (ns.kubeconfig or ns.context):
            raise ConfigError(
                f"config: --kubeconfig and --context of {ns.command} are for the "
                "revocation list: give --revocation-namespace too, or drop them"
            )
        return None
    if not _NAMESPACE.match(namespace):
        raise ConfigError(
            f"config: --revocation-namespace must be a namespace name (lowercase "
            f"letters, digits, '-'), got {namespace[:64]!r}"
        )
    return RevocationSettings(
        namespace=namespace, kubeconfig=ns.kubeconfig, context=ns.context
    )


def add_revoke_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kube-oidc-gate revoke``."""
    parser.add_argument(
        "--sub", required=True, help="The subject (the tokens' sub claim) to revoke."
    )
    parser.add_argument(
        "--issuer",
        default=None,
        help="Only tokens of this issuer URL (default: of any issuer).",
    )
    parser.add_argument(
        "--before",
        default="now",
        metavar="TIME|now",
        help="Refuse tokens issued before this RFC 3339 time (default now: every "
        "token issued so far; tokens issued later, after a new login, pass).",
    )
    parser.add_argument(
        "--reason", default="", help="Why (shown in kubectl get and the logs)."
    )
    parser.add_argument(
        "--namespace",
        default=DEFAULT_REVOCATION_NAMESPACE,
        help="Namespace the gate watches (its --revocation-namespace; default "
        f"{DEFAULT_REVOCATION_NAMESPACE}).",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig of the operator (default: the in-cluster service account).",
    )
    parser.add_argument(
        "--context", help="Context in --kubeconfig (default: its current-context)."
    )
    parser.add_argument(
        "--expires-in",
        default=f"{int(DEFAULT_REVOCATION_LIFETIME // 3600)}h",
        metavar="DURATION",
        help="After --before plus this long (e.g. 90m, 24h, 7d) the gate deletes "
        "the object: the longest token lifetime you accept (default 24h).",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="Object name (default: generated, revoked-xxxxx); with a name, a "
        "second run with the same name succeeds without creating another.",
    )


def parse_duration(value: str, flag: str) -> float:
    """Seconds of ``90s``, ``15m``, ``24h``, ``7d`` (or a bare number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"config: {flag} must be a positive duration such as 90m, 24h or 7d, "
            f"got {value[:32]!r}"
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit
