"""Reading the inputs of the generated files, and writing their YAML.

Shared by ``proxy.kubeconfig``, ``proxy.proxyaccount`` and
``proxy.apiserverflags``: each input file is read and checked with a message
naming the flag it came from, and every document is dumped the same way
(``yaml.safe_dump``'s dumper, multi-line strings as ``|`` blocks).
"""

from __future__ import annotations

import base64
import json
import textwrap
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from proxy.config import (
    url_problems,
)
from proxy.errors import ConfigError

__all__ = [
    "b64",
    "check_url",
    "comment",
    "dump_yaml",
    "read_certificates",
    "read_input",
    "read_private_key",
    "spki",
    "wrap_notes",
]


def read_input(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: cannot read: {err.strerror or err}"
        ) from err


def read_certificates(path: str, flag: str) -> tuple[bytes, list[x509.Certificate]]:
    """The file's bytes (embedded as they are) and its parsed certificates."""
    data = read_input(path, flag)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: not a PEM certificate file: "
            "no CERTIFICATE block found"
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: a CERTIFICATE block does not "
            f"parse: {err}"
        ) from err
    return data, certs


def read_private_key(path: str, flag: str) -> tuple[bytes, PublicKeyTypes]:
    """The key file's bytes and the public half of the key, for the match check."""
    data = read_input(path, flag)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: the private key is encrypted; "
            "kube-apiserver cannot ask for a passphrase: give an unencrypted key"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"config: {flag} {json.dumps(path)}: not a PEM private key: {err}"
        ) from err
    return data, key.public_key()


def spki(key: PublicKeyTypes | CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_url(
    url: str,
    flag: str,
    *,
    loopback_http: bool,
    need_path: bool = False,
    allow_query: bool = True,
) -> None:
    """``https`` (or ``http`` to loopback when allowed), a host, no credentials.

    An issuer URL also takes no query (it must equal the tokens' ``iss``).
    """
    try:
        path = urlsplit(url).path
        _ = urlsplit(url).port
    except ValueError as err:
        raise ConfigError(
            f"config: {flag}: {json.dumps(url)}: URL does not parse: {err}"
        ) from err
    problems = url_problems(url, loopback_http=loopback_http, allow_query=allow_query)
    if need_path and path in ("", "/"):
        problems.append(
            "URL must name the webhook's path, such as "
            "https://HOST:7443/authenticate (kube-apiserver posts to the URL as is)"
        )
    if problems:
        raise ConfigError([f"config: {flag}: {json.dumps(url)}: {p}" for p in problems])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Dumper(yaml.SafeDumper):
    """``safe_dump`` that writes multi-line strings (PEM, CEL) as ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(document: dict[str, Any]) -> str:
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def comment(lines: Sequence[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def wrap_notes(items: Sequence[str], *, bullet: str) -> list[str]:
    """Long explanations as comment lines that fit a terminal."""
    indent = " " * len(bullet)
    return [
        line
        for item in items
        for line in textwrap.wrap(
            item,
            width=86,
            initial_indent=bullet,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    ]
