"""Okta's event hook: the second listener's flags and its secret.

``--okta-event-hook-*`` turn on a second TLS listener for Okta's event hooks
(``proxy.oktahook``); the revocations it makes go to ``--revocation-namespace``,
so the hook requires it.
"""

from __future__ import annotations

import argparse

from proxy.errors import ConfigError
from proxy.options.common import secret_text
from proxy.options.values import OktaEventHookConfig, Secret

__all__ = ["add_okta_event_hook_arguments", "okta_event_hook_from_args"]


def add_okta_event_hook_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Okta event hook flags (both serving modes; docs/okta.md)."""
    group = parser.add_argument_group(
        "okta event hook",
        "A second TLS listener for Okta's event hooks: a user deactivated, "
        "suspended, locked or signed out in Okta is revoked on every replica.",
    )
    group.add_argument(
        "--okta-event-hook-address",
        metavar="HOST:PORT",
        help="Serve Okta's event hook at https://HOST:PORT/okta/events, with the "
        "serving certificate of the main listener (default: off).",
    )
    group.add_argument(
        "--okta-event-hook-secret-file",
        metavar="FILE",
        help="File holding the whole Authorization header value Okta sends (the "
        "hook's authentication secret); requests without it get 401. Required "
        "with --okta-event-hook-address; read at start-up.",
    )


def okta_event_hook_from_args(ns: argparse.Namespace) -> OktaEventHookConfig | None:
    """The event hook's settings, None when it is off; raises ``ConfigError``."""
    address: str | None = getattr(ns, "okta_event_hook_address", None)
    secret_file: str | None = getattr(ns, "okta_event_hook_secret_file", None)
    namespace: str | None = getattr(ns, "revocation_namespace", None)
    if address is None:
        if secret_file is not None:
            raise ConfigError(
                "config: --okta-event-hook-secret-file requires "
                "--okta-event-hook-address (where Okta's event hook is served)"
            )
        return None
    problems: list[str] = []
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        problems.append(
            f"config: --okta-event-hook-address must be HOST:PORT, got {address!r}"
        )
    secret: str | None = None
    if secret_file is None:
        problems.append(
            "config: --okta-event-hook-address requires "
            "--okta-event-hook-secret-file (the Authorization header value "
            "configured in Okta; docs/okta.md)"
        )
    else:
        secret = secret_text(
            "--okta-event-hook-secret-file",
            secret_file,
            "give the file holding the event hook's authentication secret "
            "(docs/okta.md)",
            problems,
        )
    if not namespace:
        problems.append(
            "config: --okta-event-hook-address requires --revocation-namespace "
            "(where the revocations it makes are stored)"
        )
    if problems:
        raise ConfigError(problems)
    assert secret is not None
    assert namespace
    return OktaEventHookConfig(
        host=host.strip("[]") or "0.0.0.0",  # noqa: S104
        port=int(port_text),
        secret=Secret(secret),
        revocation_namespace=namespace,
    )
