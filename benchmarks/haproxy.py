"""The stronger peer: HAProxy checking every bearer token with ``jwt_verify``.

HAProxy 2.6 (Debian package ``haproxy``) verifies a JWT's signature in C on
every request with its ``jwt_verify`` converter; it has no cache, no JWKS and
no claim mapping, so what it does per request is the least a JWT-checking
proxy can do: the alg must be RS256, the RS256 signature must verify against
the issuer's public key (a PEM file: given a certificate, 2.6 answers -5, "not
found"), ``iss`` and ``aud`` must match, ``exp`` must be after ``date()``.
Then ``Impersonate-User`` is set from ``sub`` and the client's
``Authorization`` is replaced by the upstream credential, as kube-oidc-gate's
proxy does, and the request goes to the same nginx upstream over kept-alive
connections (``http-reuse always``).

A private instance (its config, the combined certificate + key PEM and the
public key in the run's temp directory; nothing under /etc/haproxy is read and
the package's own service is never used) run in the foreground (``-db``) as a
child of the harness, so it is stopped by its PID. ``nbthread`` is the number
of workers the proxy gets; it listens on 127.0.0.1 only and logs nothing.

A peer that accepted tokens it should refuse would report inflated figures,
so the harness checks before measuring that it refuses a bad signature, an
expired token, a wrong audience, a wrong issuer, an ``alg`` other than RS256
and a missing token (``benchmarks.services.haproxy_peer``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["argv", "haproxy_binary", "missing", "version", "write_config"]


def haproxy_binary() -> str | None:
    """``/usr/sbin/haproxy`` when the Debian package is installed."""
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def missing() -> str | None:
    """Why the peer cannot run here, or None when it can."""
    if haproxy_binary() is None:
        return "haproxy is not installed (Debian package: haproxy, 2.6 or later)"
    return None


def version(binary: str) -> str:
    """``HAProxy 2.6.12-1+deb12u4`` (the first line of ``haproxy -v``)."""
    res = subprocess.run(
        [binary, "-v"], check=False, capture_output=True, text=True, timeout=5
    )
    first = (res.stdout or res.stderr).strip().split("\n")[0]
    parts = first.split()
    return f"HAProxy {parts[2]}" if len(parts) > 2 else "HAProxy"


def _plain(value: str, what: str) -> str:
    """``value`` if it can stand unquoted in an ACL pattern or a header value."""
    if not value or any(c.isspace() or c in "\"'\\$#{}%" for c in value):
        raise ValueError(f"haproxy: unusable {what} {value!r}")
    return value


def write_config(
    root: Path,
    *,
    port: int,
    cert_pem: bytes,
    public_key_pem: bytes,
    issuer: str,
    audience: str,
    username_prefix: str,
    upstream: str,
    credential: str,
    threads: int,
) -> Path:
    """Write ``root/haproxy.cfg`` (and the PEM files it names); return its path.

    ``cert_pem`` is the certificate followed by its private key (HAProxy's
    ``crt`` takes both in one file); ``upstream`` is ``host:port``.
    """
    root.mkdir(parents=True, exist_ok=True)
    crt = root / "tls.pem"
    crt.write_bytes(cert_pem)
    crt.chmod(0o600)
    pub = root / "issuer-public.pem"
    pub.write_bytes(public_key_pem)
    issuer = _plain(issuer, "issuer")
    audience = _plain(audience, "audience")
    prefix = _plain(username_prefix, "username prefix") if username_prefix else ""
    credential = _plain(credential, "credential")
    # ``$`` inside double quotes starts an environment variable, so the
    # ``jwt_*_query('$...')`` converters stay outside them.
    conf = f"""# Private HAProxy instance for the kube-oidc-gate benchmark (generated).
global
  nbthread {threads}
  maxconn 8000
  tune.ssl.default-dh-param 2048

defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend fe
  bind 127.0.0.1:{port} ssl crt {crt}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{pub}") -m int 1 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {issuer} }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {audience} }}
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
  http-request set-header Impersonate-User {prefix}%[var(txn.bearer),jwt_payload_query('$.sub')]
  http-request set-header Authorization "Bearer {credential}"
  default_backend be

backend be
  http-reuse always
  server up {upstream}
"""
    path = root / "haproxy.cfg"
    path.write_text(conf)
    return path


def argv(binary: str, conf: Path) -> list[str]:
    """Foreground (``-db``: no daemon, no background), this config only."""
    return [binary, "-db", "-f", str(conf)]
