"""The serving flags: the TLS listener, its certificate, the probes, workers.

Shared by both front ends (``webhook`` and ``proxy``); only the default port
differs. The listeners' settings are ``proxy.app.ServeSettings``; the TLS
flags are checked here before anything starts, and turned into files (a
self-signed pair generated in ``--cert-dir`` when none is given) by the CLI.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

from proxy.errors import ConfigError
from proxy.options.common import file_problem
from proxy.options.values import DEFAULT_PROBE_ADDRESS

if TYPE_CHECKING:
    from proxy.app import ServeSettings

__all__ = [
    "DEFAULT_CERT_DIR",
    "DEFAULT_CERT_DIR_VALIDITY",
    "add_serving_arguments",
    "host_port",
    "serve_settings_from_args",
    "tls_problems",
]


DEFAULT_CERT_DIR = "/var/run/kube-oidc-gate"
#: Lifetime of the pair generated in --cert-dir (as ``proxy.certs``'s default).
DEFAULT_CERT_DIR_VALIDITY: Final = 365 * 24 * 3600.0


def host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"config: {flag} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def add_serving_arguments(p: argparse.ArgumentParser, *, default_port: int) -> None:
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


def serve_settings_from_args(
    ns: argparse.Namespace, *, reuse_port: bool
) -> ServeSettings:
    """The listeners' settings, with every problem of the serving flags at once."""
    from proxy.app import ServeSettings

    dev = getattr(ns, "dev", False)
    problems: list[str] = []
    probe = ns.probe_bind_address or ("127.0.0.1:0" if dev else DEFAULT_PROBE_ADDRESS)
    probe_host, probe_port = "", 0
    try:
        probe_host, probe_port = host_port(probe, "--probe-bind-address")
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


def tls_problems(ns: argparse.Namespace) -> list[str]:
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
