"""TLS for our listeners: server contexts, and a self-signed pair when none is given.

A listener that carries tokens is never plain HTTP. Without
``--tls-cert-file``/``--tls-private-key-file`` we follow kube-apiserver's
convention: generate a self-signed certificate into ``--cert-dir`` once and reuse
it on later starts while it is valid, so clients can pin it (its path is logged
as the CA to give them). The key file is created with mode 0600.

``ServingTLS`` reloads the pair and the client CA live (issue 21). The
listener keeps one context for its whole life; its ``sni_callback`` (run for
every handshake, with or without a server name) hands the handshake the
context built from the files as they last loaded, so new handshakes use a new
pair or CA while established connections keep theirs. A whole new context per
change, not ``load_cert_chain`` on the live one: a CA cannot be taken out of a
context, and a pair half written (certificate first, key later) must leave the
last good one serving. ``load_cert_chain`` refuses a key that does not match
its certificate, so a new context exists only for a matching pair. The
client-verification mode is the listener context's and never changes: the
``--client-ca-file`` flag is given or not for the life of the process.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import ConfigError

__all__ = ["CertPair", "ServingTLS", "ensure_self_signed", "server_context"]

log = logging.getLogger(__name__)

SELF_SIGNED_NAME = "kube-oidc-gate"
_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class CertPair:
    """Paths of a PEM certificate (chain) and its private key."""

    cert_file: str
    key_file: str


def _still_valid(path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc - now < dt.timedelta(days=7):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return all(h in names for h in hosts)


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def ensure_self_signed(cert_dir: str, extra_hosts: list[str] | None = None) -> CertPair:
    """Reuse or create ``<cert_dir>/kube-oidc-gate.{crt,key}`` (ECDSA P-256)."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for h in extra_hosts or []:
        if h and h not in ("0.0.0.0", "::") and h not in hosts:  # noqa: S104
            hosts.append(h)
    directory = Path(cert_dir)
    cert_path = directory / f"{SELF_SIGNED_NAME}.crt"
    key_path = directory / f"{SELF_SIGNED_NAME}.key"
    if cert_path.exists() and key_path.exists() and _still_valid(cert_path, hosts):
        return CertPair(str(cert_path), str(key_path))
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"config: --cert-dir {cert_dir}: {err.strerror}") from err
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{SELF_SIGNED_NAME}@{hosts[3]}")]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertPair(str(cert_path), str(key_path))


def server_context(
    pair: CertPair, *, client_ca_file: str | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with a client CA, clients must present a cert it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(pair.cert_file, pair.key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"config: --tls-cert-file {pair.cert_file} / --tls-private-key-file "
            f"{pair.key_file}: cannot load: {err}"
        ) from err
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"config: --client-ca-file {client_ca_file}: cannot load: {err}"
            ) from err
        ctx.verify_mode = ssl.CERT_REQUIRED
    # HTTP/1.1 only: aiohttp's server does not speak h2.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ServingTLS:
    """The listener's TLS context, whose handshakes get the last good pair and CA.

    ``reload()`` builds a context from the files as they are now and, if it
    loads, makes it the one new handshakes get; if it does not (a key that does
    not match yet, a file half written, a CA that does not parse), the last
    good one keeps serving and the problem is logged once per change.
    """

    __slots__ = ("_client_ca_file", "_current", "_pair", "context")

    def __init__(self, pair: CertPair, *, client_ca_file: str | None = None) -> None:
        self._pair = pair
        self._client_ca_file = client_ca_file
        # Raises ConfigError: at start a pair that does not load stops the start.
        self._current = server_context(pair, client_ca_file=client_ca_file)
        self.context = server_context(pair, client_ca_file=client_ca_file)
        self.context.sni_callback = self._select

    @property
    def files(self) -> tuple[str, ...]:
        """The files a change of which calls for ``reload()``."""
        extra = (self._client_ca_file,) if self._client_ca_file else ()
        return (self._pair.cert_file, self._pair.key_file, *extra)

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: object
    ) -> None:
        conn.context = self._current

    def reload(self) -> bool:
        """Load the files again; True if new handshakes now use what they hold."""
        try:
            fresh = server_context(self._pair, client_ca_file=self._client_ca_file)
        except ConfigError as err:
            log.warning(
                "serving certificate not reloaded, the last good one serves",
                extra={"problem": str(err)},
            )
            return False
        self._current = fresh
        log.info(
            "serving certificate reloaded",
            extra={
                "cert_file": self._pair.cert_file,
                "client_ca": bool(self._client_ca_file),
            },
        )
        return True
