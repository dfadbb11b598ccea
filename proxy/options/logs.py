"""Logging flags, on every subcommand that logs.

Serving modes default to JSON at ``info``; the commands a person runs at a
terminal (``check-token``, ``revoke``) default to text at ``warning``, so
stdout holds only their answer.
"""

from __future__ import annotations

import argparse

__all__ = ["add_logging_arguments"]


def add_logging_arguments(
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
