"""``kube-oidc-gate proxy``: its own flags, and the app they configure.

The upstream and impersonation-policy flags follow kube-oidc-proxy's names
where it had them (``--token-passthrough``, ``--allow-reserved-groups``,
``--trusted-proxies``) and kubectl's for the upstream (``--kubeconfig``,
``--context``), so an operator moving from either finds what they know.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable

from proxy.app import Engine, proxy_app
from proxy.audit.auditor import AuditOptions, Auditor
from proxy.audit.policy import load_policy
from proxy.config import file_problem
from proxy.errors import ConfigError
from proxy.http1 import Server
from proxy.impersonate import ProxySettings
from proxy.upstream import SERVICE_ACCOUNT_DIR, Upstream, UpstreamSettings
from proxy.watch import FileWatcher

__all__ = [
    "add_proxy_arguments",
    "audit_options_from_args",
    "build_proxy_app",
    "parse_duration",
    "proxy_settings_from_args",
    "upstream_settings_from_args",
]

_DEFAULTS = ProxySettings()
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
    _add_audit_arguments(parser)


def parse_duration(text: str) -> float:
    """Seconds from ``30`` (seconds), or a Go duration as kube-apiserver's
    flags take it (``30s``, ``1m30s``, ``500ms``, ``1h``).
    """
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total, number, rest = 0.0, "", value
    if not rest:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    while rest:
        i = 0
        while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
            i += 1
        number, rest = rest[:i], rest[i:]
        unit = "ms" if rest.startswith("ms") else rest[:1]
        if not number or unit not in _DURATION_UNITS:
            raise argparse.ArgumentTypeError(
                f"not a duration: {text!r} (use seconds, or 30s, 1m, 500ms)"
            )
        try:
            total += float(number) * _DURATION_UNITS[unit]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from err
        rest = rest[len(unit) :]
    return total


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    d = AuditOptions.__dataclass_fields__
    au = parser.add_argument_group(
        "audit (kube-apiserver's flags and meanings; docs/operations.md)"
    )
    au.add_argument(
        "--audit-policy-file",
        help="An audit.k8s.io/v1 Policy: which requests are recorded at which level "
        "(None, Metadata, Request, RequestResponse). Required by the backends below.",
    )
    au.add_argument(
        "--audit-log-path",
        help="Write audit events as JSON lines to this file ('-': standard output).",
    )
    au.add_argument(
        "--audit-log-maxsize",
        type=int,
        default=d["log_max_size_mb"].default,
        help="Megabytes of the audit log file before it is rotated (default 0: 100).",
    )
    au.add_argument(
        "--audit-log-maxbackup",
        type=int,
        default=d["log_max_backups"].default,
        help="Most rotated audit log files kept (default 0: all).",
    )
    au.add_argument(
        "--audit-log-maxage",
        type=int,
        default=d["log_max_age_days"].default,
        help="Days a rotated audit log file is kept, by the time in its name "
        "(default 0: forever).",
    )
    au.add_argument(
        "--audit-log-batch-buffer-size",
        type=int,
        default=d["log_buffer_size"].default,
        help="Events waiting for the log writer; beyond it they are dropped and "
        f"counted (default {d['log_buffer_size'].default}).",
    )
    au.add_argument(
        "--audit-webhook-config-file",
        help="A kubeconfig naming the audit webhook (server URL, CA, credential); "
        "events are posted to it as EventList batches.",
    )
    au.add_argument(
        "--audit-webhook-batch-buffer-size",
        type=int,
        default=d["webhook_buffer_size"].default,
        help="Events waiting to be sent; beyond it they are dropped and counted "
        f"(default {d['webhook_buffer_size'].default}).",
    )
    au.add_argument(
        "--audit-webhook-batch-max-size",
        type=int,
        default=d["webhook_batch_max_size"].default,
        help=f"Most events in one batch (default {d['webhook_batch_max_size'].default}).",
    )
    au.add_argument(
        "--audit-webhook-batch-max-wait",
        type=parse_duration,
        default=d["webhook_batch_max_wait"].default,
        help="How long a batch that is not full waits before it is sent "
        f"(default {d['webhook_batch_max_wait'].default:g}s).",
    )
    au.add_argument(
        "--audit-webhook-initial-backoff",
        type=parse_duration,
        default=d["webhook_initial_backoff"].default,
        help="Wait before the first retry of a failed batch, x1.5 per retry, 5 tries "
        f"(default {d['webhook_initial_backoff'].default:g}s).",
    )


def audit_options_from_args(ns: argparse.Namespace) -> AuditOptions | None:
    """Check the ``--audit-*`` flags (every problem listed) and load the
    policy; ``None`` when auditing is off.

    Deliberate differences from kube-apiserver, which starts and records
    nothing: a backend without ``--audit-policy-file``, or a policy without
    a backend, is refused, since the operator surely expected events.
    """
    problems: list[str] = []
    policy_file = ns.audit_policy_file
    log_path = ns.audit_log_path or None
    webhook = ns.audit_webhook_config_file or None
    backends = [
        flag
        for flag, value in (
            ("--audit-log-path", log_path),
            ("--audit-webhook-config-file", webhook),
        )
        if value
    ]
    if backends and not policy_file:
        problems.append(
            f"audit: {' and '.join(backends)} "
            f"{'need' if len(backends) > 1 else 'needs'} --audit-policy-file "
            "(without a policy nothing would be recorded)"
        )
    if policy_file and not backends:
        problems.append(
            "audit: --audit-policy-file needs --audit-log-path or "
            "--audit-webhook-config-file (where to write the events)"
        )
    for flag, value in (
        ("--audit-log-maxsize", ns.audit_log_maxsize),
        ("--audit-log-maxbackup", ns.audit_log_maxbackup),
        ("--audit-log-maxage", ns.audit_log_maxage),
    ):
        if value < 0:
            problems.append(f"audit: {flag} {value} can't be a negative number")
    for flag, value in (
        ("--audit-log-batch-buffer-size", ns.audit_log_batch_buffer_size),
        ("--audit-webhook-batch-buffer-size", ns.audit_webhook_batch_buffer_size),
        ("--audit-webhook-batch-max-size", ns.audit_webhook_batch_max_size),
    ):
        if value < 1:
            problems.append(f"audit: {flag} must be >= 1, got {value}")
    for flag, seconds in (
        ("--audit-webhook-batch-max-wait", ns.audit_webhook_batch_max_wait),
        ("--audit-webhook-initial-backoff", ns.audit_webhook_initial_backoff),
    ):
        if not seconds > 0:
            problems.append(f"audit: {flag} must be > 0, got {seconds:g}s")
    if log_path and log_path != "-" and getattr(ns, "workers", 1) > 1:
        problems.append(
            "audit: --audit-log-path to a file cannot be shared by --workers "
            f"{ns.workers} processes (each would rotate it); use '-' (stdout) or "
            "--audit-webhook-config-file"
        )
    if log_path and log_path != "-" and os.path.isdir(log_path):
        problems.append(
            f"audit: --audit-log-path {log_path!r}: is a directory; give a file path"
        )
    if webhook:
        unreadable = file_problem(
            "--audit-webhook-config-file",
            webhook,
            "give a kubeconfig naming the audit webhook",
            component="audit",
        )
        if unreadable is not None:
            problems.append(unreadable)
    policy = None
    if policy_file:
        try:
            policy = load_policy(policy_file)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    if policy is None:
        return None
    return AuditOptions(
        policy=policy,
        log_path=log_path,
        log_max_size_mb=ns.audit_log_maxsize,
        log_max_backups=ns.audit_log_maxbackup,
        log_max_age_days=ns.audit_log_maxage,
        log_buffer_size=ns.audit_log_batch_buffer_size,
        webhook_config_file=webhook,
        webhook_buffer_size=ns.audit_webhook_batch_buffer_size,
        webhook_batch_max_size=ns.audit_webhook_batch_max_size,
        webhook_batch_max_wait=ns.audit_webhook_batch_max_wait,
        webhook_initial_backoff=ns.audit_webhook_initial_backoff,
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


async def build_proxy_app(
    ns: argparse.Namespace,
    engine: Engine,
    closers: list[Callable[[], object]],
    watcher: FileWatcher | None = None,
) -> tuple[Server, Callable[[int, int], None] | None, Callable[[], list[str]] | None]:
    """Start the upstream client and build the proxy app; ``closers`` gets its
    close, ``watcher`` the kubeconfig to reload when it changes (issue 21).
    """
    settings = proxy_settings_from_args(ns)
    # Refuses a client-certificate credential under --token-passthrough, at
    # start and on every reload of --kubeconfig.
    upstream = Upstream(upstream_settings_from_args(ns), metrics=engine.metrics)
    await upstream.start()
    closers.append(upstream.close)
    if watcher is not None and ns.kubeconfig:
        watcher.add(
            "upstream kubeconfig",
            [p for p in ns.kubeconfig.split(os.pathsep) if p],
            upstream.reload_kubeconfig,
        )
    options = audit_options_from_args(ns)
    auditor = None
    if options is not None:
        # Closed after the listener has drained: the last requests' events
        # are in the backends' buffers by then, and close() flushes them.
        auditor = await Auditor.from_options(options, metrics=engine.metrics)
        closers.append(auditor.close)
    return proxy_app(engine, upstream, settings, auditor=auditor), None, None
