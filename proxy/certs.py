"""TLS for our listeners: server contexts, and a self-signed pair when none is given.

A listener that carries tokens is never plain HTTP. Without
``--tls-cert-file``/``--tls-private-key-file`` we follow kube-apiserver's
convention: generate a self-signed certificate into ``--cert-dir`` once and reuse
it on later starts while it is valid, so clients can pin it (its path is logged
as the CA to give them). The key file is created with mode 0600.

A running process renews that pair too (issue 21; kube-apiserver never does):
``SelfSigned.renew_if_due`` makes a new pair (a new key) once less than a
third of ``--cert-dir-validity`` is left, the same rule as reuse at start. With
``--workers N`` every worker asks on its own poll, and an exclusive ``flock`` on
``kube-oidc-gate.lock`` in the directory makes exactly one of them write: the
others, under the lock in turn, find the pair fresh and leave it. Each file is
written to a temporary name and renamed over the old one; every worker
(the writer included) then loads the pair through its file watch, like any
pair replaced on disk, and ``ServingTLS`` refuses the instant between the two
renames where the key does not match the certificate yet.

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

import asyncio
import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import ConfigError

__all__ = [
    "DEFAULT_SELF_SIGNED_VALIDITY",
    "CertPair",
    "SelfSigned",
    "SelfSignedRenewal",
    "ServingTLS",
    "ensure_self_signed",
    "self_signed",
    "server_context",
]

log = logging.getLogger(__name__)

SELF_SIGNED_NAME = "kube-oidc-gate"
#: Lifetime of a generated pair (``--cert-dir-validity``).
DEFAULT_SELF_SIGNED_VALIDITY = dt.timedelta(days=365)
#: Seconds before a renewal that failed (the disk, not the pair) is tried again.
_RENEW_RETRY = 10.0
#: Backdating of ``notBefore``, for clients whose clock is a little behind.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class CertPair:
    """Paths of a PEM certificate (chain) and its private key."""

    cert_file: str
    key_file: str


def _hosts(extra_hosts: list[str] | None) -> tuple[str, ...]:
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for h in extra_hosts or []:
        if h and h not in ("0.0.0.0", "::") and h not in hosts:  # noqa: S104
            hosts.append(h)
    return tuple(hosts)


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over.

    A reader sees the old file or the new one whole, never a part.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfSigned:
    """The generated pair of ``--cert-dir``: where it is, what it names, how long
    it lives, and when it is made again (less than a third of ``validity``
    left, at start and while running).
    """

    cert_dir: str
    hosts: tuple[str, ...]
    validity: dt.timedelta = DEFAULT_SELF_SIGNED_VALIDITY

    @property
    def pair(self) -> CertPair:
        """The paths of the certificate and the key."""
        directory = Path(self.cert_dir)
        return CertPair(
            str(directory / f"{SELF_SIGNED_NAME}.crt"),
            str(directory / f"{SELF_SIGNED_NAME}.key"),
        )

    def due_at(self) -> float:
        """Unix time at which the certificate on disk is due for renewal (now,
        if it cannot be read). Blocking: call it in a thread."""
        try:
            cert = x509.load_pem_x509_certificate(
                Path(self.pair.cert_file).read_bytes()
            )
        except (OSError, ValueError):
            return 0.0
        due = cert.not_valid_after_utc - self.validity / 3
        return due.timestamp()

    def _names_all_hosts(self) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(
                Path(self.pair.cert_file).read_bytes()
            )
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except (OSError, ValueError, x509.ExtensionNotFound):
            return False
        names = {str(n) for n in san.value.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)}
        return all(h in names for h in self.hosts)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's lock: one writer among the workers (and any
        other process started on the same ``--cert-dir``)."""
        lock = os.path.join(self.cert_dir, f"{SELF_SIGNED_NAME}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def ensure(self) -> CertPair:
        """At start: reuse the pair while it names every host and is not due;
        otherwise make a new one. Raises ``ConfigError`` for an unusable
        directory."""
        try:
            Path(self.cert_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():
                pair = self.pair
                fresh = time.time() < self.due_at() and self._names_all_hosts()
                if not (fresh and Path(pair.key_file).exists()):
                    self._generate()
        except OSError as err:
            raise ConfigError(
                f"config: --cert-dir {self.cert_dir}: {err.strerror}"
            ) from err
        return self.pair

    def renew_if_due(self) -> bool:
        """While running: make a new pair if the one on disk is due; ``True`` if
        this call wrote it. Blocking (a lock, a key generation): call it in a
        thread. The check is made again under the lock, so of several workers
        due at once, only the first writes."""
        with self._locked():
            if time.time() < self.due_at():
                return False
            self._generate()
        log.info(
            "self-signed certificate renewed",
            extra={
                "ca_file": self.pair.cert_file,
                "valid_for_seconds": self.validity.total_seconds(),
                "hint": "give clients the new file as their CA, or pass "
                "--tls-cert-file",
            },
        )
        return True

    def _generate(self) -> None:
        """A new key and certificate, each written atomically (key first)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"{SELF_SIGNED_NAME}@{self.hosts[3]}"
                )
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + self.validity)
            .add_extension(
                x509.SubjectAlternativeName(_alt_names(self.hosts)), critical=False
            )
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
        pair = self.pair
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomically(Path(pair.key_file), key_pem, 0o600)
        _write_atomically(
            Path(pair.cert_file), cert.public_bytes(serialization.Encoding.PEM), 0o644
        )


def self_signed(
    cert_dir: str,
    extra_hosts: list[str] | None = None,
    *,
    validity: dt.timedelta = DEFAULT_SELF_SIGNED_VALIDITY,
) -> SelfSigned:
    """Reuse or create ``<cert_dir>/kube-oidc-gate.{crt,key}`` (ECDSA P-256);
    the ``SelfSigned`` that renews it while running."""
    generated = SelfSigned(
        cert_dir=cert_dir, hosts=_hosts(extra_hosts), validity=validity
    )
    generated.ensure()
    return generated


def ensure_self_signed(
    cert_dir: str,
    extra_hosts: list[str] | None = None,
    *,
    validity: dt.timedelta = DEFAULT_SELF_SIGNED_VALIDITY,
) -> CertPair:
    """``self_signed(...)``'s pair, for who only serves it (never renews)."""
    return self_signed(cert_dir, extra_hosts, validity=validity).pair


class SelfSignedRenewal:
    """Asks ``SelfSigned.renew_if_due`` once the pair is due, from the file
    watcher's poll (``FileWatcher.add_periodic``); before that a poll costs
    one comparison, no I/O."""

    __slots__ = ("_due", "_generated")

    def __init__(self, generated: SelfSigned) -> None:
        self._generated = generated
        self._due = generated.due_at()

    async def check(self) -> None:
        """Renew if due (in a thread); learn the next due time from the disk,
        which another worker may have written meanwhile."""
        if time.time() < self._due:
            return
        try:
            await asyncio.to_thread(self._generated.renew_if_due)
        except OSError as err:  # a full disk, a directory gone: try again later
            log.warning(
                "self-signed certificate not renewed, the current one serves",
                extra={"cert_dir": self._generated.cert_dir, "detail": err.strerror},
            )
            self._due = time.time() + _RENEW_RETRY
            return
        self._due = await asyncio.to_thread(self._generated.due_at)


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
