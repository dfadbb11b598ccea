"""kube-apiserver's ``--audit-*`` flags (proxy mode), and their check.

Same names, defaults and meanings as kube-apiserver's, so a policy and a
backend configuration move between the two unchanged; the values they make are
``proxy.audit.auditor.AuditOptions``, whose defaults are the flags' defaults.
"""

from __future__ import annotations

import argparse
import os

from proxy.audit.auditor import AuditOptions
from proxy.audit.policy import load_policy
from proxy.errors import ConfigError
from proxy.options.common import file_problem

__all__ = ["add_audit_arguments", "audit_options_from_args", "parse_duration"]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "audit" group (proxy mode)."""
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
    policy_file = ns.audit_policy_file
    log_path = ns.audit_log_path or None
    webhook = ns.audit_webhook_config_file or None
    problems = _backend_problems(policy_file, log_path, webhook)
    problems += _number_problems(ns)
    problems += _path_problems(ns, log_path, webhook)
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


def _backend_problems(
    policy_file: str | None, log_path: str | None, webhook: str | None
) -> list[str]:
    """A policy and at least one backend, or neither."""
    problems: list[str] = []
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
    return problems


def _number_problems(ns: argparse.Namespace) -> list[str]:
    """kube-apiserver's bounds on the sizes, counts and durations."""
    problems: list[str] = []
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
    return problems


def _path_problems(
    ns: argparse.Namespace, log_path: str | None, webhook: str | None
) -> list[str]:
    """A log file one process can own, and a webhook kubeconfig that can be read."""
    problems: list[str] = []
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
    return problems
