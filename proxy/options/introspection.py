"""Token introspection (RFC 7662): its flags and its side file.

Ask the issuer whether a verified token is still active
(``proxy.introspection``). The client of the ``--oidc-issuer-url`` issuer comes
from ``--oidc-introspection-*``; with ``--authentication-config``, whose schema
stays kube-apiserver's, the clients come from a side file of ours
(``--introspection-config``). Secrets are read once, at start-up, into
``Secret`` values.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace

from proxy.errors import ConfigError
from proxy.options.common import (
    FlagGroup,
    file_problem,
    read_count,
    read_number,
    secret_text,
    url_problems,
)
from proxy.options.decode import decode_document
from proxy.options.values import (
    INTROSPECTION_POLICIES,
    IntrospectionClient,
    IntrospectionConfig,
    JWTAuthenticatorConfig,
    Secret,
)

__all__ = [
    "add_introspection_arguments",
    "introspection_from_args",
    "load_introspection_file",
]


_DEFAULT_INTROSPECTION = IntrospectionConfig(clients=())

#: Flag -> dest of the introspection tunables (they need a client to apply to).
_INTROSPECTION_TUNING: tuple[tuple[str, str], ...] = (
    ("--introspection-cache-ttl", "introspection_cache_ttl"),
    ("--introspection-failure-policy", "introspection_failure_policy"),
    ("--introspection-max-staleness", "introspection_max_staleness"),
    ("--introspection-timeout", "introspection_timeout"),
    ("--introspection-concurrency", "introspection_concurrency"),
)

#: Fields of one entry of the ``--introspection-config`` file.
_INTROSPECTION_FIELDS: tuple[str, ...] = (
    "url",
    "clientID",
    "clientSecretFile",
    "introspectionEndpoint",
)


def add_introspection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "token introspection" group: the clients, then their tunables."""
    group = parser.add_argument_group(
        "token introspection",
        "Ask the issuer's introspection endpoint (RFC 7662) whether a verified "
        "token is still active, so a revoked token is refused within "
        "--introspection-cache-ttl instead of at its exp. Off unless a client "
        "is given; docs/configuration.md.",
    )
    _add_client_flags(group)
    _add_tunable_flags(group)


def _add_client_flags(group: FlagGroup) -> None:
    group.add_argument(
        "--oidc-introspection-client-id",
        metavar="ID",
        help=(
            "Client id that authenticates to the --oidc-issuer-url issuer's "
            "introspection_endpoint (client_secret_basic). Requires "
            "--oidc-introspection-client-secret-file."
        ),
    )
    group.add_argument(
        "--oidc-introspection-client-secret-file",
        metavar="FILE",
        help="File holding that client's secret (read once at start-up).",
    )
    group.add_argument(
        "--introspection-config",
        metavar="FILE",
        help=(
            "YAML file mapping issuer URLs to introspection clients (issuers: "
            "[{url, clientID, clientSecretFile, introspectionEndpoint}]), for "
            "--authentication-config; docs/configuration.md."
        ),
    )


def _add_tunable_flags(group: FlagGroup) -> None:
    group.add_argument(
        "--introspection-cache-ttl",
        metavar="SECONDS",
        type=float,
        help=(
            "How long an introspection answer is reused per token, and so the "
            "longest a revoked token is still accepted (default "
            f"{_DEFAULT_INTROSPECTION.cache_ttl:g}; never beyond the token's exp)."
        ),
    )
    group.add_argument(
        "--introspection-failure-policy",
        choices=INTROSPECTION_POLICIES,
        help=(
            "When the introspection endpoint does not answer: deny (default; "
            "refused as introspection_unavailable, 503 from the webhook so "
            "kube-apiserver retries) or allow-cached (use the token's last "
            "'active' answer while it is at most --introspection-max-staleness old)."
        ),
    )
    group.add_argument(
        "--introspection-max-staleness",
        metavar="SECONDS",
        type=float,
        help=(
            "With allow-cached: the oldest answer used during an outage "
            f"(default {_DEFAULT_INTROSPECTION.max_staleness:g})."
        ),
    )
    group.add_argument(
        "--introspection-timeout",
        metavar="SECONDS",
        type=float,
        help=(
            "Whole-request timeout of one introspection call (default "
            f"{_DEFAULT_INTROSPECTION.timeout:g})."
        ),
    )
    group.add_argument(
        "--introspection-concurrency",
        metavar="N",
        type=int,
        help=(
            "Most introspection calls in flight per worker (default "
            f"{_DEFAULT_INTROSPECTION.concurrency})."
        ),
    )


def _secret_file(flag: str, path: str, problems: list[str]) -> Secret | None:
    """The introspection client's secret in ``path``, or None with a problem."""
    text = secret_text(
        flag, path, "give the file holding the introspection client's secret", problems
    )
    return None if text is None else Secret(text)


def load_introspection_file(
    path: str, problems: list[str]
) -> list[IntrospectionClient]:
    """The clients of an ``--introspection-config`` file; problems are appended.

    The file is ours, not Kubernetes': the ``AuthenticationConfiguration``
    keeps kube-apiserver's schema, so this side file maps issuer URLs to
    introspection clients::

        issuers:
          - url: https://example.okta.com/oauth2/default
            clientID: 0oa...
            clientSecretFile: /etc/kube-oidc-gate/introspection/secret
            # introspectionEndpoint: https://...  (default: from discovery)
    """
    flag = "--introspection-config"
    where = f"config: {flag} {json.dumps(path)}"
    unreadable = file_problem(flag, path, "give the introspection side file")
    if unreadable is not None:
        problems.append(unreadable)
        return []
    try:
        with open(path, encoding="utf-8") as f:
            doc = decode_document(f.read(), path)
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{where}: cannot read: {type(err).__name__}")
        return []
    except ConfigError as err:
        problems.extend(err.problems)
        return []
    if not isinstance(doc, dict) or set(doc) != {"issuers"}:
        problems.append(f'{where}: expected a mapping with one field, "issuers"')
        return []
    entries = doc["issuers"]
    if not isinstance(entries, list) or not entries:
        problems.append(f'{where}: "issuers" must be a non-empty list')
        return []
    clients: list[IntrospectionClient] = []
    for i, entry in enumerate(entries):
        client = _file_client(entry, f"{where}: issuers[{i}]", i, problems)
        if client is not None:
            clients.append(client)
    return clients


def _file_client(
    entry: object, at: str, i: int, problems: list[str]
) -> IntrospectionClient | None:
    """Entry ``i`` of the side file's ``issuers``, or None with its problems."""
    if not isinstance(entry, dict):
        problems.append(f"{at}: expected a mapping")
        return None
    unknown = sorted(set(entry) - set(_INTROSPECTION_FIELDS))
    if unknown:
        problems.append(
            f"{at}: unknown field {json.dumps(unknown[0])} (known: "
            f"{', '.join(_INTROSPECTION_FIELDS)})"
        )
    values: dict[str, str] = {}
    for name in _INTROSPECTION_FIELDS:
        value = entry.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"{at}.{name}: must be a non-empty string")
            continue
        values[name] = value
    missing = [n for n in _INTROSPECTION_FIELDS[:3] if n not in values]
    if missing:
        problems.append(f"{at}: {json.dumps(missing[0])} is required")
        return None
    secret = _secret_file(
        f"--introspection-config issuers[{i}].clientSecretFile",
        values["clientSecretFile"],
        problems,
    )
    endpoint = values.get("introspectionEndpoint")
    if endpoint is not None:
        for problem in url_problems(endpoint, allow_query=True):
            problems.append(f"{at}.introspectionEndpoint: {problem}")
    if secret is None:
        return None
    return IntrospectionClient(
        issuer=values["url"],
        client_id=values["clientID"],
        client_secret=secret,
        endpoint=endpoint,
    )


def introspection_from_args(
    ns: argparse.Namespace,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> IntrospectionConfig | None:
    """The introspection settings the flags give, None when no client is
    given; problems are appended."""
    client_id: str | None = getattr(ns, "oidc_introspection_client_id", None)
    secret_file: str | None = getattr(ns, "oidc_introspection_client_secret_file", None)
    side_file: str | None = getattr(ns, "introspection_config", None)
    tuning = [
        f for f, dest in _INTROSPECTION_TUNING if getattr(ns, dest, None) is not None
    ]
    legacy = client_id is not None or secret_file is not None
    if not legacy and side_file is None:
        if tuning:
            problems.append(
                f"config: {tuning[0]} requires --oidc-introspection-client-id or "
                "--introspection-config (an introspection client)"
            )
        return None
    if legacy and side_file is not None:
        problems.append(
            "config: --introspection-config and --oidc-introspection-client-id are "
            "mutually exclusive: put the --oidc-introspection-* settings in the file"
        )
        return None
    if side_file is None:
        if getattr(ns, "authentication_config", None) is not None:
            problems.append(
                "config: --oidc-introspection-client-id goes with the --oidc-* "
                "flags; with --authentication-config use --introspection-config FILE"
            )
            return None
        clients = _flag_clients(client_id, secret_file, authenticators, problems)
    else:
        clients = _side_file_clients(side_file, authenticators, problems)
    return _with_tunables(ns, tuple(clients), problems)


def _flag_clients(
    client_id: str | None,
    secret_file: str | None,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> list[IntrospectionClient]:
    """The ``--oidc-introspection-*`` client of the ``--oidc-issuer-url`` issuer."""
    if client_id is None:
        problems.append(
            "config: --oidc-introspection-client-secret-file requires "
            "--oidc-introspection-client-id"
        )
    elif secret_file is None:
        problems.append(
            "config: --oidc-introspection-client-id requires "
            "--oidc-introspection-client-secret-file"
        )
    else:
        secret = _secret_file(
            "--oidc-introspection-client-secret-file", secret_file, problems
        )
        if secret is not None and authenticators:
            return [
                IntrospectionClient(
                    issuer=authenticators[0].issuer.url,
                    client_id=client_id,
                    client_secret=secret,
                )
            ]
    return []


def _side_file_clients(
    side_file: str,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> list[IntrospectionClient]:
    """The side file's clients, each for a configured issuer, none twice."""
    clients = load_introspection_file(side_file, problems)
    configured = {a.issuer.url for a in authenticators}
    seen: set[str] = set()
    for client in clients:
        if client.issuer in seen:
            problems.append(
                f"config: --introspection-config: issuer {json.dumps(client.issuer)} "
                "is listed twice"
            )
        seen.add(client.issuer)
        if authenticators and client.issuer not in configured:
            problems.append(
                f"config: --introspection-config: issuer "
                f"{json.dumps(client.issuer)} is not configured (configured: "
                f"{', '.join(json.dumps(u) for u in sorted(configured))})"
            )
    return clients


def _with_tunables(
    ns: argparse.Namespace,
    clients: tuple[IntrospectionClient, ...],
    problems: list[str],
) -> IntrospectionConfig:
    """``clients`` with the ``--introspection-*`` tunables (or their defaults)."""
    d = _DEFAULT_INTROSPECTION
    ttl = read_number(
        ns, "introspection_cache_ttl", d.cache_ttl, problems, allow_zero=True
    )
    staleness = read_number(
        ns, "introspection_max_staleness", d.max_staleness, problems, allow_zero=True
    )
    timeout = read_number(
        ns, "introspection_timeout", d.timeout, problems, allow_zero=False
    )
    concurrency = read_count(
        ns, "introspection_concurrency", d.concurrency, 1, problems
    )
    policy = getattr(ns, "introspection_failure_policy", None) or d.failure_policy
    if policy not in INTROSPECTION_POLICIES:
        problems.append(
            f"config: --introspection-failure-policy: {policy!r} is not one of "
            f"{', '.join(INTROSPECTION_POLICIES)}"
        )
        policy = d.failure_policy
    if staleness < ttl and policy == "allow-cached":
        problems.append(
            "config: --introspection-max-staleness "
            f"({staleness:g}) must be at least --introspection-cache-ttl ({ttl:g})"
        )
    return replace(
        d,
        clients=clients,
        cache_ttl=ttl,
        failure_policy="allow-cached" if policy == "allow-cached" else "deny",
        max_staleness=staleness,
        timeout=timeout,
        concurrency=concurrency,
    )
