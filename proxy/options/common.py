"""What several option groups share: file, URL and PEM checks, number readers.

Every check here appends or returns a problem in the one wording all groups
use (``config: <flag> "<path>": ...``), so the CLI can list every problem of
every flag at once and an operator fixes them in one pass.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import ssl
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509

__all__ = [
    "FlagGroup",
    "file_problem",
    "is_loopback_host",
    "pem_problem",
    "read_count",
    "read_number",
    "secret_text",
    "url_problems",
]


class FlagGroup(Protocol):
    """Where a group's flags are added: a parser, or one of its argument groups."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action:
        """Add one flag, as ``argparse`` does."""
        ...


_LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP (127.0.0.0/8, ::1).

    The one place plain http is allowed for an issuer, a JWKS or an upstream:
    tests and ``--dev`` run on loopback, where nothing crosses a network.
    """
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def file_problem(
    flag: str, path: str, remedy: str, *, component: str = "config"
) -> str | None:
    """What is wrong with the file ``flag`` names, or None when it can be read.

    Every flag that names a file says the same three things when it cannot be
    read: which flag and path, whether the file is missing, a directory or
    unreadable, and ``remedy`` (what to give instead, or what leaving the flag
    out does), so the operator fixes it without reading the code. The content
    is checked later, by whoever parses it.
    """
    where = f"{component}: {flag} {json.dumps(path)}"
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return f"{where}: no such file; {remedy}"
    except IsADirectoryError:
        return f"{where}: is a directory, not a file; {remedy}"
    except OSError as err:
        return f"{where}: cannot read: {(err.strerror or str(err)).lower()}"
    return None


def url_problems(
    url: str, *, loopback_http: bool = True, allow_query: bool = False
) -> list[str]:
    """What is wrong with a URL we will send requests (or tokens) to.

    kube-apiserver's rules for issuer URLs: https, a host, no credentials, no
    query (``iss`` must equal it), no fragment. Plain ``http`` passes only for a
    loopback host when ``loopback_http`` allows it, for tests and ``--dev``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError as err:
        return [str(err)]
    problems: list[str] = []
    if parts.scheme == "http" and loopback_http:
        if not (host and is_loopback_host(host)):
            problems.append(
                "URL scheme must be https (plain http is allowed only for a "
                "loopback host: 127.0.0.0/8, ::1, localhost)"
            )
    elif parts.scheme != "https":
        problems.append("URL scheme must be https")
    if not host:
        problems.append("URL must contain a host")
    if parts.username is not None or parts.password is not None:
        problems.append("URL must not contain a username or password")
    if parts.query and not allow_query:
        problems.append("URL must not contain a query")
    if parts.fragment:
        problems.append("URL must not contain a fragment")
    return problems


def pem_problem(pem: str) -> str | None:
    """Why ``pem`` is not a usable CA bundle, or None.

    The bundle is loaded the way the issuer connection will load it (an
    ``ssl`` trust store), so a bundle accepted here cannot fail later; the
    certificates are also parsed so the message can say which part is wrong.
    Blocks other than CERTIFICATE are skipped, as kube-apiserver skips them.
    """
    if "-----BEGIN CERTIFICATE-----" not in pem:
        return "no PEM CERTIFICATE block found"
    try:
        x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except ValueError as err:
        return f"a CERTIFICATE block does not parse: {err}"
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as err:
        return f"not usable as a TLS trust store: {err}"
    return None


def secret_text(flag: str, path: str, remedy: str, problems: list[str]) -> str | None:
    """The text of the secret file ``flag`` names, or None with a problem
    (the file's state and ``remedy``; never its content).
    """
    unreadable = file_problem(flag, path, remedy)
    if unreadable is not None:
        problems.append(unreadable)
        return None
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        problems.append(f"config: {flag} {json.dumps(path)}: not readable UTF-8 text")
        return None
    if not text:
        problems.append(f"config: {flag} {json.dumps(path)}: the file is empty")
        return None
    return text


def read_number(
    ns: argparse.Namespace,
    dest: str,
    default: float,
    problems: list[str],
    *,
    allow_zero: bool,
) -> float:
    """The number flag ``dest`` holds, ``default`` when it was not given, or
    ``default`` with a problem when it is not finite and positive (or zero,
    with ``allow_zero``)."""
    value = getattr(ns, dest, None)
    if value is None:
        return default
    flag = "--" + dest.replace("_", "-")
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = math.isfinite(number) and (number >= 0 if allow_zero else number > 0)
    if not ok:
        bound = "0 or more" if allow_zero else "greater than 0"
        problems.append(
            f"config: {flag}: must be a finite number {bound} (got {value!r})"
        )
        return default
    return number


def read_count(
    ns: argparse.Namespace, dest: str, default: int, least: int, problems: list[str]
) -> int:
    """The integer flag ``dest`` holds, ``default`` when it was not given, or
    ``default`` with a problem when it is below ``least``."""
    value = getattr(ns, dest, None)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        flag = "--" + dest.replace("_", "-")
        problems.append(
            f"config: {flag}: must be an integer of {least} or more (got {value!r})"
        )
        return default
    return value
