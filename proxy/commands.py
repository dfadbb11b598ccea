"""The subcommands that print and exit: ``check-token``, ``kubeconfig``,
``apiserver-flags`` and ``revoke``.

Each takes the parsed flags and returns the exit code; ``proxy.cli`` parses
and dispatches. Heavy modules (the checker, ``kubernetes``, the upstream
client) are imported inside the commands that need them, so each starts
quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from proxy.errors import ConfigError, ProxyError
from proxy.options.auth import auth_config_from_args
from proxy.options.authfile import load_authentication_config
from proxy.options.revocation import parse_duration, revocation_settings_from_args
from proxy.options.values import DEFAULT_REVOCATION_LIFETIME

__all__ = ["apiserver_flags", "check_token", "kubeconfig", "revoke"]


def _read_token(ns: argparse.Namespace) -> str:
    if ns.token_file and ns.token:
        raise ConfigError(
            "config: give the token as an argument or --token-file, not both"
        )
    if ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as f:
                raw = f.read()
        except OSError as err:
            raise ConfigError(
                f"config: --token-file {ns.token_file}: {err.strerror}"
            ) from err
    elif ns.token == "-" or (ns.token is None and not sys.stdin.isatty()):  # noqa: S105
        raw = sys.stdin.read(1024 * 1024)
    elif ns.token:
        raw = ns.token
    else:
        raise ConfigError(
            "config: no token: pass it as an argument, with --token-file, or - for stdin"
        )
    token = raw.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        raise ConfigError("config: the token is empty")
    return token


def check_token(ns: argparse.Namespace) -> int:
    """``check-token``: explain why the token is accepted or refused."""
    from proxy.checktoken import check_token as explain

    if ns.offline and not ns.jwks_file:
        raise ConfigError("config: --offline needs --jwks-file")
    if ns.jwks_file and not ns.offline:
        raise ConfigError("config: --jwks-file is only used with --offline")
    revocations = revocation_settings_from_args(ns)
    if ns.offline and revocations is not None:
        raise ConfigError(
            "config: --offline makes no network request; drop "
            "--revocation-namespace (the list is read from the API server)"
        )
    config = auth_config_from_args(ns)
    assert config is not None
    token = _read_token(ns)
    return asyncio.run(
        explain(
            config,
            token,
            out=sys.stdout,
            jwks_file=ns.jwks_file,
            revocations=revocations,
        )
    )


def kubeconfig(ns: argparse.Namespace) -> int:
    """``kubeconfig KIND``: print the file of that kind."""
    from proxy.kubeconfig import user_kubeconfig, webhook_kubeconfig

    if ns.kind == "webhook":
        text = webhook_kubeconfig(
            url=ns.url,
            ca_file=ns.ca_file,
            client_cert=ns.client_cert,
            client_key=ns.client_key,
        )
    elif ns.kind == "user":
        text = user_kubeconfig(
            server=ns.server,
            issuer_url=ns.oidc_issuer_url,
            client_id=ns.oidc_client_id,
            ca_file=ns.ca_file,
            context_name=ns.context_name,
            allow_issuer_trailing_slash=ns.allow_issuer_trailing_slash,
        )
    else:
        text = _kubeconfig_proxy(ns)
    sys.stdout.write(text)
    return 0


def _kubeconfig_proxy(ns: argparse.Namespace) -> str:
    from proxy.kubeconfig import proxy_kubeconfig, proxy_rbac

    if ns.print_rbac:
        given = [
            flag
            for flag, value in (
                ("--server", ns.server),
                ("--ca-file", ns.ca_file),
                ("--token-file", ns.token_file),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"config: --print-rbac prints only the RBAC objects: drop "
                f"{', '.join(given)} (give them without --print-rbac, once the "
                "token exists)"
            )
        config = (
            load_authentication_config(ns.authentication_config)
            if ns.authentication_config is not None
            else None
        )
        return proxy_rbac(
            config, namespace=ns.namespace, service_account=ns.service_account
        )
    missing = [
        flag
        for flag, value in (("--server", ns.server), ("--token-file", ns.token_file))
        if value is None
    ]
    problems: list[str] = []
    if missing:
        problems.append(
            f"config: kubeconfig proxy needs {' and '.join(missing)}; the token "
            "is the service account's that --print-rbac creates (see its header)"
        )
    if ns.authentication_config is not None:
        problems.append(
            "config: --authentication-config is only used with --print-rbac"
        )
    if problems:
        raise ConfigError(problems)
    return proxy_kubeconfig(
        server=ns.server,
        token_file=ns.token_file,
        ca_file=ns.ca_file,
        namespace=ns.namespace,
        service_account=ns.service_account,
    )


def apiserver_flags(ns: argparse.Namespace) -> int:
    """``apiserver-flags``: print kube-apiserver's configuration equal to ours."""
    from proxy.kubeconfig import apiserver_flags as flags_text
    from proxy.kubeconfig import authentication_configuration

    config = auth_config_from_args(ns)
    assert config is not None
    text = (
        flags_text(config)
        if ns.format == "flags"
        else authentication_configuration(config)
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def revoke(ns: argparse.Namespace) -> int:
    """``revoke``: create the object with the operator's credential, print its name."""
    from proxy.revocation import parse_time

    problems: list[str] = []
    before = time.time()
    if ns.before != "now":
        try:
            before = parse_time(ns.before, "--before")
        except ProxyError as err:
            problems.append(
                f"config: --before must be 'now' or an RFC 3339 time such as "
                f"2026-01-02T15:04:05Z, got {ns.before[:64]!r} ({err})"
            )
    lifetime = DEFAULT_REVOCATION_LIFETIME
    try:
        lifetime = parse_duration(ns.expires_in, "--expires-in")
    except ConfigError as err:
        problems.extend(err.problems)
    if not ns.sub.strip():
        problems.append("config: --sub must not be empty")
    if problems:
        raise ConfigError(problems)
    name = asyncio.run(_revoke_async(ns, before, before + lifetime))
    sys.stdout.write(f"{name}\n")
    return 0


async def _revoke_async(ns: argparse.Namespace, before: float, expires: float) -> str:
    from proxy.revocation_api import create_revocation
    from proxy.upstream import Upstream, UpstreamSettings

    client = Upstream(UpstreamSettings(kubeconfig=ns.kubeconfig, context=ns.context))
    await client.start()
    try:
        return await create_revocation(
            client,
            ns.namespace,
            subject=ns.sub,
            issuer=ns.issuer,
            issued_before=before,
            reason=ns.reason,
            expires_at=expires,
            name=ns.name,
        )
    finally:
        await client.close()
