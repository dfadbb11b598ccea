"""The ``kube-oidc-gate`` command: parse flags, build the config, run a mode.

Modes: ``webhook`` (TokenReview server), ``proxy`` (impersonating reverse
proxy), ``check-token`` (explain one token), ``kubeconfig`` (generate the API
server's webhook kubeconfig or a user's kubeconfig), ``apiserver-flags`` (the
equivalent kube-apiserver configuration), ``revoke`` (store a Revocation
object that every replica watching its namespace enforces).

Exit codes: 0 success, 1 a checked token was refused, 2 a usage or
configuration error (printed as ``error: ...`` with every problem listed).

Nothing imports this module. Heavy modules (the servers, ``kubernetes``) are
imported inside the functions that need them, so ``check-token`` and
``kubeconfig`` start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias, TypeVar

from proxy import COMPILED, __version__
from proxy.config import (
    DEFAULT_PROBE_ADDRESS,
    DEFAULT_PROXY_PORT,
    DEFAULT_WEBHOOK_PORT,
    add_auth_arguments,
    add_okta_event_hook_arguments,
    add_revocation_arguments,
    add_revoke_arguments,
    apply_tuning_args,
    auth_config_from_args,
    file_problem,
    okta_event_hook_from_args,
    revocation_settings_from_args,
)
from proxy.errors import ConfigError, ProxyError
from proxy.log import configure_logging, flush_logs

if TYPE_CHECKING:
    from proxy.app import Engine, ServeSettings
    from proxy.certs import SelfSigned, ServingTLS
    from proxy.config import AuthConfig, OktaEventHookConfig
    from proxy.http1 import Server
    from proxy.oktahook import Revoker
    from proxy.watch import FileWatcher

__all__ = ["build_parser", "main"]

log = logging.getLogger("proxy.cli")

DEFAULT_CERT_DIR = "/var/run/kube-oidc-gate"
#: Lifetime of the pair generated in --cert-dir (as ``proxy.certs``'s default).
DEFAULT_CERT_DIR_VALIDITY: Final = 365 * 24 * 3600.0


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"config: {flag} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def _add_common(
    p: argparse.ArgumentParser,
    *,
    serving: bool = False,
    log_format: str = "json",
    log_level: str = "info",
) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=log_format,
        help=f"Log line format (default {log_format}).",
    )
    g.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=log_level,
        help=f"Least severe level logged (default {log_level}). Debug may show identities, never credentials.",
    )
    if serving:
        g.add_argument(
            "--refusal-log-limit",
            type=int,
            default=10,
            metavar="N",
            help="Refused requests (or token reviews) each process logs in full per "
            "cause and second (default 10); the rest are counted in one "
            '"refusals not logged" line per cause and second. Accepted requests are '
            "always logged; 0 logs every refusal.",
        )


def _add_serving(p: argparse.ArgumentParser, *, default_port: int) -> None:
    g = p.add_argument_group("serving")
    g.add_argument(
        "--bind-address",
        default=None,
        help="Address the TLS listener binds (default 0.0.0.0; 127.0.0.1 with --dev).",
    )
    g.add_argument(
        "--secure-port",
        type=int,
        default=default_port,
        help=f"TLS port (default {default_port}, chosen to be free on a control-plane "
        "node: kube-apiserver has 6443, and no Kubernetes component, ingress "
        "controller or NodePort uses this one).",
    )
    g.add_argument(
        "--tls-cert-file",
        help="PEM certificate (chain) to serve; with --tls-private-key-file. Without "
        "both, a self-signed certificate is generated in --cert-dir (and reused).",
    )
    g.add_argument("--tls-private-key-file", help="PEM private key of --tls-cert-file.")
    g.add_argument(
        "--cert-dir",
        default=None,
        help="Where a self-signed certificate is generated when no --tls-cert-file is "
        f"given (default {DEFAULT_CERT_DIR}; a temporary directory with --dev).",
    )
    g.add_argument(
        "--cert-dir-validity",
        type=float,
        default=DEFAULT_CERT_DIR_VALIDITY,
        metavar="SECONDS",
        help="Lifetime of the certificate generated in --cert-dir (default "
        f"{DEFAULT_CERT_DIR_VALIDITY:.0f}, 365 days). It is "
        "reused at start and renewed while running once less than a third is left.",
    )
    g.add_argument(
        "--client-ca-file",
        help="If set, only clients presenting a certificate signed by this CA (the API "
        "server) are answered; others are refused during the TLS handshake.",
    )
    g.add_argument(
        "--probe-bind-address",
        default=None,
        help="HOST:PORT of the plain-HTTP listener for /healthz, /readyz and /metrics "
        f"(default {DEFAULT_PROBE_ADDRESS}, a port nothing in Kubernetes uses, unlike "
        "8080; 127.0.0.1:0 with --dev). It never carries tokens.",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Processes sharing the port with SO_REUSEPORT (default 1); each has its own caches.",
    )
    g.add_argument(
        "--shutdown-grace-period",
        type=float,
        default=30.0,
        help="Seconds in-flight requests get to finish after SIGTERM (default 30).",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also used by tests that compare manifests to flags)."""
    parser = argparse.ArgumentParser(
        prog="kube-oidc-gate",
        description="Log in to Kubernetes with your OIDC identity provider.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (compiled: {'yes' if COMPILED else 'no'})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    wh = sub.add_parser("webhook", help="Serve kube-apiserver's TokenReview webhook.")
    add_auth_arguments(wh)
    _add_serving(wh, default_port=DEFAULT_WEBHOOK_PORT)
    add_revocation_arguments(wh, kubeconfig=True)
    add_okta_event_hook_arguments(wh)
    g = wh.add_argument_group("webhook")
    g.add_argument(
        "--webhook-audiences",
        default="",
        help="Comma-separated API audiences this webhook vouches for; empty (default) "
        "answers audience-agnostically, like kube-apiserver's own JWT authenticator.",
    )
    g.add_argument(
        "--dev",
        action="store_true",
        help="Start a built-in DEVELOPMENT issuer on loopback and authenticate its "
        "tokens; prints a demo token and a curl command. Never in production.",
    )
    _add_common(wh, serving=True)

    px = sub.add_parser(
        "proxy", help="Serve an impersonating reverse proxy in front of the API server."
    )
    add_auth_arguments(px)
    _add_serving(px, default_port=DEFAULT_PROXY_PORT)
    add_okta_event_hook_arguments(px)
    _add_proxy_arguments(px)
    add_revocation_arguments(px, kubeconfig=False)
    _add_common(px, serving=True)

    rv = sub.add_parser(
        "revoke",
        help="Revoke a subject's tokens on every replica (a Revocation object).",
        description="Create one Revocation object (CRD revocations.kube-oidc-gate.io) "
        "in the namespace the gate watches (--revocation-namespace); every replica "
        "refuses the subject's tokens issued before --before within seconds. Print "
        "its name. kubectl get revocations -n NS lists them; kubectl delete lifts one.",
    )
    add_revoke_arguments(rv)
    _add_common(rv, log_format="text", log_level="warning")

    ct = sub.add_parser(
        "check-token", help="Explain why a token is accepted or refused."
    )
    add_auth_arguments(ct)
    ct.add_argument("token", nargs="?", help="The token, or - to read it from stdin.")
    ct.add_argument("--token-file", help="Read the token from this file.")
    ct.add_argument(
        "--offline",
        action="store_true",
        help="Make no network request; needs --jwks-file.",
    )
    ct.add_argument(
        "--jwks-file", help="A JWK Set file to verify against (with --offline)."
    )
    # The replicas' revocation list, read once: which Revocation refuses it.
    add_revocation_arguments(ct, kubeconfig=True)
    # A person at a terminal reads the verdict on stdout: only what went wrong
    # on the way (a failed fetch) belongs on stderr, and as text.
    _add_common(ct, log_format="text", log_level="warning")

    kc = sub.add_parser(
        "kubeconfig",
        help="Print a kubeconfig for the API server's webhook, for users, or for "
        "the proxy itself.",
    )
    kcs = kc.add_subparsers(dest="kind", required=True, metavar="KIND")
    _add_kubeconfig_webhook(kcs)
    _add_kubeconfig_user(kcs)
    _add_kubeconfig_proxy(kcs)

    af = sub.add_parser(
        "apiserver-flags", help="Print the kube-apiserver configuration equal to ours."
    )
    add_auth_arguments(af)
    af.add_argument(
        "--format",
        choices=("flags", "config"),
        default="flags",
        help="--oidc-* flags (when expressible) or an AuthenticationConfiguration file.",
    )
    return parser


_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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
    from proxy.kubeconfig import KUBELOGIN_COMMAND, LISTEN_ADDRESS

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
    from proxy.kubeconfig import DEFAULT_PROXY_NAMESPACE, DEFAULT_PROXY_SERVICE_ACCOUNT

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


def _add_proxy_arguments(p: argparse.ArgumentParser) -> None:
    from proxy.proxyflags import add_proxy_arguments

    add_proxy_arguments(p)


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


def _check_token(ns: argparse.Namespace) -> int:
    from proxy.checktoken import check_token

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
        check_token(
            config,
            token,
            out=sys.stdout,
            jwks_file=ns.jwks_file,
            revocations=revocations,
        )
    )


def _kubeconfig(ns: argparse.Namespace) -> int:
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
    from proxy.config import load_authentication_config
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


def _apiserver_flags(ns: argparse.Namespace) -> int:
    from proxy.kubeconfig import apiserver_flags, authentication_configuration

    config = auth_config_from_args(ns)
    assert config is not None
    text = (
        apiserver_flags(config)
        if ns.format == "flags"
        else authentication_configuration(config)
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _revoke(ns: argparse.Namespace) -> int:
    """``revoke``: create the object with the operator's credential, print its name."""
    import time

    from proxy.config import DEFAULT_REVOCATION_LIFETIME, parse_duration
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


def _clear_metrics_dir(directory: str) -> None:
    """Start a user-given ``PROMETHEUS_MULTIPROC_DIR`` empty of earlier runs' samples."""
    from proxy.metrics import clear_multiprocess_dir

    try:
        removed = clear_multiprocess_dir(directory)
    except OSError as err:
        raise ConfigError(
            f"config: PROMETHEUS_MULTIPROC_DIR={directory!r} cannot be used for "
            f"metrics: {err.strerror or err}"
        ) from err
    if removed:
        log.info(
            "metrics: removed an earlier run's sample files",
            extra={"directory": directory, "files": removed},
        )


def _serve_settings(ns: argparse.Namespace, *, reuse_port: bool) -> ServeSettings:
    """The listeners' settings, with every problem of the serving flags at once."""
    from proxy.app import ServeSettings

    dev = getattr(ns, "dev", False)
    problems: list[str] = []
    probe = ns.probe_bind_address or ("127.0.0.1:0" if dev else DEFAULT_PROBE_ADDRESS)
    probe_host, probe_port = "", 0
    try:
        probe_host, probe_port = _host_port(probe, "--probe-bind-address")
    except ConfigError as err:
        problems.extend(err.problems)
    if not 0 <= ns.secure_port <= 65535:
        problems.append(f"config: --secure-port must be 0-65535, got {ns.secure_port}")
    if ns.shutdown_grace_period < 0:
        problems.append("config: --shutdown-grace-period must be >= 0")
    if ns.refusal_log_limit < 0:
        problems.append(
            f"config: --refusal-log-limit must be >= 0, got {ns.refusal_log_limit}"
        )
    bind_address = ns.bind_address or ("127.0.0.1" if dev else "0.0.0.0")  # noqa: S104
    wildcard = ("", "0.0.0.0", "::")  # noqa: S104
    if (
        probe_port
        and probe_port == ns.secure_port
        and (probe_host == bind_address or {probe_host, bind_address} & set(wildcard))
    ):
        problems.append(
            f"config: --secure-port {ns.secure_port} and --probe-bind-address "
            f"{probe} name the same port: give the probes a port of their own"
        )
    if problems:
        raise ConfigError(problems)
    return ServeSettings(
        bind_address=bind_address,
        secure_port=ns.secure_port,
        probe_host=probe_host,
        probe_port=probe_port,
        shutdown_grace_period=ns.shutdown_grace_period,
        reuse_port=reuse_port,
    )


#: What leaving out both TLS flags does (``proxy.certs.self_signed``).
_SELF_SIGNED = (
    "or leave out both --tls-cert-file and --tls-private-key-file to serve a "
    "self-signed certificate, generated in --cert-dir (default "
    f"{DEFAULT_CERT_DIR}), reused while valid and logged as the CA to give clients"
)


#: Shortest ``--cert-dir-validity``: its last third must span a few polls.
_MIN_CERT_DIR_VALIDITY: Final = 6.0


def _tls_problems(ns: argparse.Namespace) -> list[str]:
    """What is wrong with the TLS flags, checked before anything starts."""
    problems: list[str] = []
    if bool(ns.tls_cert_file) != bool(ns.tls_private_key_file):
        given, missing = (
            ("--tls-cert-file", "--tls-private-key-file")
            if ns.tls_cert_file
            else ("--tls-private-key-file", "--tls-cert-file")
        )
        problems.append(
            "config: --tls-cert-file and --tls-private-key-file must be given "
            f"together: {given} is given, {missing} is missing; give both, "
            + _SELF_SIGNED.removeprefix("or ")
        )
    files = (
        (
            "--tls-cert-file",
            ns.tls_cert_file,
            f"give the PEM certificate (chain) to serve, {_SELF_SIGNED}",
        ),
        (
            "--tls-private-key-file",
            ns.tls_private_key_file,
            f"give the PEM private key of --tls-cert-file, {_SELF_SIGNED}",
        ),
        (
            "--client-ca-file",
            ns.client_ca_file,
            "give the PEM bundle of the CA that signed the certificates clients "
            "present (kube-apiserver's, from its webhook kubeconfig), or leave "
            "--client-ca-file out to answer clients without one",
        ),
    )
    for flag, path, remedy in files:
        if path:
            problem = file_problem(flag, path, remedy)
            if problem is not None:
                problems.append(problem)
    if not ns.cert_dir_validity >= _MIN_CERT_DIR_VALIDITY:
        problems.append(
            f"config: --cert-dir-validity must be at least {_MIN_CERT_DIR_VALIDITY:g} "
            f"seconds, got {ns.cert_dir_validity:g}: a pair is renewed when a third "
            "of it is left, and files are looked at once a second"
        )
    return problems


def _tls(
    ns: argparse.Namespace, bind_address: str
) -> tuple[str, str, SelfSigned | None]:
    """Return (cert, key, the generated pair or None); ``_tls_problems`` has
    checked the flags."""
    from proxy.certs import self_signed

    if ns.tls_cert_file:
        return ns.tls_cert_file, ns.tls_private_key_file, None
    cert_dir = ns.cert_dir or (
        tempfile.mkdtemp(prefix="kube-oidc-gate-dev-")
        if getattr(ns, "dev", False)
        else DEFAULT_CERT_DIR
    )
    generated = self_signed(
        cert_dir, [bind_address], validity=dt.timedelta(seconds=ns.cert_dir_validity)
    )
    return generated.pair.cert_file, generated.pair.key_file, generated


def _proxy_problems(ns: argparse.Namespace) -> list[str]:
    """The proxy's own flags and its upstream credential source, checked early.

    A worker would find the same problems only after the engine started, one
    at a time, and (with ``--workers N``) once per worker.
    """
    from proxy.proxyflags import (
        audit_options_from_args,
        proxy_settings_from_args,
        upstream_settings_from_args,
    )
    from proxy.upstream import upstream_problems

    problems: list[str] = []
    _collect(problems, lambda: proxy_settings_from_args(ns))
    _collect(problems, lambda: audit_options_from_args(ns))
    upstream = _collect(problems, lambda: upstream_settings_from_args(ns))
    if upstream is not None:
        problems += upstream_problems(upstream)
    return problems


_T = TypeVar("_T")


def _collect(problems: list[str], make: Callable[[], _T]) -> _T | None:
    """``make()``, or None with its ``ConfigError``'s problems added to ``problems``."""
    try:
        return make()
    except ConfigError as err:
        problems.extend(err.problems)
        return None


#: Most bytes of problems a worker reports to the parent: far below a pipe's
#: capacity, so the write never waits for a reader (the parent reads after the
#: worker has exited).
_REPORT_LIMIT: Final = 16 * 1024


def _run_processes(workers: int, run_one: Callable[[], int]) -> int:
    """Run ``run_one`` in ``workers`` forked processes; forward signals; return the worst code.

    A worker that cannot start (a ``ProxyError``: a port taken after all, an
    API server credential that does not load) reports its problems through a
    pipe of its own and exits 2; the parent stops the other workers and raises
    the problems, each once, as one ``ConfigError``. ``--workers N`` then fails
    as one process does: ``error: ...`` and exit code 2, where a worker's
    ``os._exit`` used to swallow the message.
    """
    if workers == 1:
        return run_one()
    reports: dict[int, int] = {}  # worker pid -> read end of its report pipe
    for _ in range(workers):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_end)
            for other in reports.values():
                os.close(other)
            _worker(run_one, write_end)
        os.close(write_end)
        reports[pid] = read_end

    def forward(signum: int, _frame: object) -> None:
        for pid in reports:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # SIGHUP reloads every worker's files now (issue 21); the parent's default
    # for it would end the parent and leave the workers orphaned.
    signal.signal(signal.SIGHUP, forward)
    worst = 0
    problems: list[str] = []
    running = set(reports)
    while running:
        pid, status = os.wait()
        if pid not in running:
            continue
        running.discard(pid)
        worst = max(worst, os.waitstatus_to_exitcode(status))
        report = _read_report(reports[pid])
        if report:
            problems += [p for p in report if p not in problems]
            # The others must not serve on as if the start had worked.
            for other in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    if problems:
        raise ConfigError(problems)
    return worst


def _worker(run_one: Callable[[], int], report_fd: int) -> NoReturn:
    """A forked worker's whole life: run, report a ``ProxyError``, exit."""
    code = 1
    try:
        code = run_one()
    except ProxyError as err:
        problems = err.problems if isinstance(err, ConfigError) else (str(err),)
        data = "\n".join(problems).encode()[:_REPORT_LIMIT]
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(report_fd, data) :]
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - the worker's last word, then exit
        traceback.print_exc()
        code = 1
    finally:
        # os._exit skips logging.shutdown: write the queued lines first.
        flush_logs()
        os._exit(code)


def _read_report(fd: int) -> list[str]:
    """The problems a worker wrote before it exited (none: it did not fail so)."""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    return [line for line in text.splitlines() if line]


def _serve_mode(ns: argparse.Namespace, metrics_dir: str | None) -> int:
    """Check every flag, then serve in one process or ``--workers`` processes;
    ``metrics_dir`` is the shared metrics directory ``main`` made, if any."""
    from proxy.app import listen_problems
    from proxy.certs import CertPair, ServingTLS

    dev = getattr(ns, "dev", False)
    # Every problem of every flag at once, as for the configuration file: an
    # operator fixes them in one pass, not one per restart.
    problems: list[str] = []
    if ns.workers < 1 or ns.workers > 64:
        problems.append("config: --workers must be between 1 and 64")
    if dev and ns.workers > 1:
        problems.append("config: --dev runs one process; drop --workers")
    config = _collect(problems, lambda: auth_config_from_args(ns, allow_empty=dev))
    if dev and config is not None:
        problems.insert(
            0,
            "config: --dev brings its own issuer and is mutually exclusive with "
            "--authentication-config and the --oidc-* flags",
        )
    workers = min(max(ns.workers, 1), 64)
    settings = _collect(problems, lambda: _serve_settings(ns, reuse_port=workers > 1))
    problems += _tls_problems(ns)
    hook = _collect(problems, lambda: okta_event_hook_from_args(ns))
    if ns.command == "proxy":
        problems += _proxy_problems(ns)
    revocation = _collect(problems, lambda: revocation_settings_from_args(ns))
    if revocation is not None and ns.command == "webhook":
        from proxy.upstream import UpstreamSettings, upstream_problems

        problems += upstream_problems(
            UpstreamSettings(kubeconfig=ns.kubeconfig, context=ns.context)
        )
    if settings is not None:
        problems += listen_problems(settings)
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given_dir and given_dir != metrics_dir:
        _clear_metrics_dir(given_dir)
    cert, key, generated = _tls(ns, settings.bind_address)
    if generated is not None:
        log.warning(
            "serving with a self-signed certificate",
            extra={
                "ca_file": cert,
                "hint": "give clients this file as their CA, or pass --tls-cert-file",
            },
        )
    # Loaded once, here: a file that does not load stops the start before
    # any worker exists.
    tls = ServingTLS(CertPair(cert, key), client_ca_file=ns.client_ca_file)
    # Okta presents no client certificate: with --client-ca-file the hook
    # gets a context of its own, of the same pair.
    hook_tls = (
        ServingTLS(CertPair(cert, key))
        if hook is not None and ns.client_ca_file
        else tls
    )

    def run_one() -> int:
        _install_uvloop()
        return asyncio.run(
            _serve_async(
                ns,
                config,
                settings,
                tls,
                cert,
                generated=generated,
                hook=None if hook is None else (hook, hook_tls),
            )
        )

    return _run_processes(ns.workers, run_one)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve_async(
    ns: argparse.Namespace,
    config: AuthConfig | None,
    settings: ServeSettings,
    tls: ServingTLS,
    cert: str,
    *,
    generated: SelfSigned | None = None,
    hook: tuple[OktaEventHookConfig, ServingTLS] | None = None,
) -> int:
    from proxy.app import probe_app, serve, start_engine
    from proxy.metrics import Metrics
    from proxy.revocation import RevocationList
    from proxy.watch import FileWatcher

    metrics = Metrics()
    dev_issuer = None
    if getattr(ns, "dev", False):
        from proxy.devissuer import DevIssuer, dev_auth_config

        dev_issuer = DevIssuer()
        await dev_issuer.start()
        config = apply_tuning_args(
            dev_auth_config(dev_issuer.url, dev_issuer.client_id), ns
        )
    assert config is not None
    revocation = revocation_settings_from_args(ns)
    engine = await start_engine(
        config,
        metrics=metrics,
        revocations=None if revocation is None else RevocationList(),
    )
    if dev_issuer is not None:
        # Print the demo only once it works: the dev issuer is local and fast.
        await engine.keysets.get(dev_issuer.url).refresh(force=True)
    closers: list[Callable[[], object]] = []
    # Every worker watches on its own: each has its own listener context,
    # engine and upstream client to bring up to date (issue 21).
    watcher = FileWatcher()
    # Reading and parsing the pair happens in a thread; the swap is one
    # attribute assignment, seen whole by the next handshake.
    watcher.add("serving certificate", tls.files, lambda: asyncio.to_thread(tls.reload))
    if generated is not None:
        from proxy.certs import SelfSignedRenewal

        # Every worker asks; the directory's lock lets one write, and every
        # worker loads the new pair through the watch above.
        renewal = await asyncio.to_thread(SelfSignedRenewal, generated)
        watcher.add_periodic("self-signed certificate", renewal.check)
    if hook is not None and hook[1] is not tls:
        hook_tls = hook[1]
        watcher.add(
            "okta event hook certificate",
            hook_tls.files,
            lambda: asyncio.to_thread(hook_tls.reload),
        )
    if not getattr(ns, "dev", False):
        from proxy.app import ConfigReloader

        reloader = ConfigReloader(engine, lambda: _reload_config(ns))
        watcher.add(
            "authentication config",
            [ns.authentication_config or "", ns.oidc_ca_file or ""],
            reloader.reload,
        )
    watching = asyncio.create_task(watcher.run(), name="file watcher")
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, watcher.poke)

    async def stop_watching() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    closers.append(stop_watching)
    try:
        if revocation is not None:
            from proxy.app import start_revocation_watch

            rw = await start_revocation_watch(engine, revocation)
            if revocation.kubeconfig and engine.revocation_client is not None:
                watcher.add(
                    "revocation kubeconfig",
                    [p for p in revocation.kubeconfig.split(os.pathsep) if p],
                    engine.revocation_client.reload_kubeconfig,
                )
            log.info("revocation watch started", extra={"namespace": rw.namespace})
        main_app, on_ready, extra_checks = await _front_end(
            ns, engine, cert, dev_issuer, closers, watcher=watcher
        )
        if hook is not None:
            await _start_okta_hook(*hook, engine, settings, closers)
        # Everything built so far lives until exit: move it out of the garbage
        # collector's generations so full collections (which run while a busy
        # result cache grows) stop re-scanning every imported module.
        gc.freeze()
        await serve(
            main_app,
            probe_app(engine, extra_checks=extra_checks),
            settings,
            tls.context,
            on_ready=on_ready,
        )
    finally:
        for close in reversed(closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await engine.close()
        if dev_issuer is not None:
            await dev_issuer.close()
        # The counts of refusals not logged yet, before the final line.
        flush_logs()
    log.info("stopped")
    return 0


async def _start_okta_hook(
    hook: OktaEventHookConfig,
    tls: ServingTLS,
    engine: Engine,
    settings: ServeSettings,
    closers: list[Callable[[], object]],
) -> None:
    """Serve Okta's event hook beside the front end, with the serving pair
    (reloaded with it); ``closers`` drains it.
    """
    from proxy.oktahook import HOOK_PATH, OktaHook

    receiver = OktaHook(
        _okta_revoker(hook, engine), hook.secret, metrics=engine.metrics
    )
    closers.append(lambda: receiver.close(settings.shutdown_grace_period))
    try:
        port = await receiver.start(
            hook.host,
            hook.port,
            ssl_context=tls.context,
            reuse_port=settings.reuse_port,
        )
    except OSError as err:
        raise ConfigError(
            f"listen: {hook.host}:{hook.port} (--okta-event-hook-address): "
            f"{(err.strerror or str(err)).lower()}"
        ) from err
    log.info(
        "okta event hook listening",
        extra={"bind": hook.host, "port": port, "path": HOOK_PATH},
    )


def _okta_revoker(hook: OktaEventHookConfig, engine: Engine) -> Revoker:
    """Where the event hook's decisions go: Revocation objects in
    ``hook.revocation_namespace`` (the list every replica watches), written
    with the revocation watch's own client; cached verdicts of a user whose
    groups changed are dropped in this worker.
    """
    from proxy.oktahook import CallbackRevoker
    from proxy.revocation_api import create_revocation

    client = engine.revocation_client
    if client is None:  # pragma: no cover - the hook requires the namespace
        raise ConfigError(
            "config: --okta-event-hook-address requires --revocation-namespace"
        )
    namespace = hook.revocation_namespace
    authenticator = engine.authenticator

    async def create(**fields: Any) -> None:
        await create_revocation(client, namespace, **fields)

    def forget(subject: str) -> None:
        authenticator.forget_subject(None, subject)

    return CallbackRevoker(create, forget)


def _reload_config(ns: argparse.Namespace) -> AuthConfig:
    """The authentication configuration from the same flags, files read again."""
    config = auth_config_from_args(ns)
    assert config is not None  # not --dev: a form was given
    return config


async def _front_end(
    ns: argparse.Namespace,
    engine: Engine,
    cert: str,
    dev_issuer: object,
    closers: list[Callable[[], object]],
    *,
    watcher: FileWatcher,
) -> tuple[
    Server,
    Callable[[int, int], None] | None,
    Callable[[], list[str]] | None,
]:
    from proxy.app import webhook_app
    from proxy.webhook import WebhookSettings

    if ns.command == "webhook":
        audiences = tuple(
            a.strip() for a in ns.webhook_audiences.split(",") if a.strip()
        )
        app = webhook_app(
            engine,
            WebhookSettings(
                audiences=audiences, refusal_log_limit=ns.refusal_log_limit
            ),
        )
        on_ready = None
        if dev_issuer is not None:
            on_ready = _dev_banner(dev_issuer, cert)
        return app, on_ready, None
    from proxy.proxyflags import build_proxy_app

    return await build_proxy_app(ns, engine, closers, watcher)


def _dev_banner(dev_issuer: object, cert: str) -> Callable[[int, int], None]:
    from proxy.devissuer import DevIssuer, demo_instructions

    assert isinstance(dev_issuer, DevIssuer)

    def banner(port: int, probe_port: int) -> None:
        token = dev_issuer.mint(sub="alice", groups=["naxslabs-admins"])
        text = demo_instructions(
            token=token,
            webhook_url=f"https://127.0.0.1:{port}",
            ca_file=cert,
            issuer_url=dev_issuer.url,
        )
        sys.stdout.write(text + f"\nprobes: http://127.0.0.1:{probe_port}/readyz\n")
        sys.stdout.flush()

    return banner


def _shared_metrics_dir(argv: Sequence[str] | None) -> str | None:
    """With ``--workers N`` (N > 1), make the directory the workers share their
    metrics through and name it in ``PROMETHEUS_MULTIPROC_DIR``; ``None``
    otherwise, or when the variable is already set (the operator's own).

    Why here, before anything else: prometheus_client reads the variable once,
    when it is first imported (its documented way to share samples between
    processes), and building the parser imports modules that import it. So
    ``--workers`` alone is read first; the full parser checks it again.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("command", nargs="?")
    early.add_argument("--workers", type=int, default=1)
    try:
        known, _ = early.parse_known_args(argv)
    except SystemExit:  # a malformed --workers: the full parser says so
        return None
    if known.command not in ("webhook", "proxy") or not 1 < known.workers <= 64:
        return None
    if "prometheus_client" in sys.modules:  # pragma: no cover - embedding, or a bug
        raise ProxyError(
            "metrics: prometheus_client was imported before --workers could set "
            "PROMETHEUS_MULTIPROC_DIR: set it yourself before starting"
        )
    directory = tempfile.mkdtemp(prefix="kube-oidc-gate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m proxy``."""
    try:
        metrics_dir = _shared_metrics_dir(argv)
    except ProxyError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    try:
        return _main(argv, metrics_dir)
    finally:
        # Only the parent gets here (a worker leaves with os._exit): the
        # samples die with the pod's processes, so their files go too.
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _main(argv: Sequence[str] | None, metrics_dir: str | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    configure_logging(
        level=getattr(ns, "log_level", "info"), fmt=getattr(ns, "log_format", "text")
    )
    try:
        if ns.command == "check-token":
            return _check_token(ns)
        if ns.command == "kubeconfig":
            return _kubeconfig(ns)
        if ns.command == "apiserver-flags":
            return _apiserver_flags(ns)
        if ns.command == "revoke":
            return _revoke(ns)
        return _serve_mode(ns, metrics_dir)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except ProxyError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        return 130
