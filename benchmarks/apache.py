"""The peer: Apache httpd + mod_auth_openidc as an OAuth 2.0 resource server.

A private instance (its own ServerRoot, config, pid file and logs in a temp
directory; nothing under /etc/apache2 is read or changed) run in the
foreground as a child of the harness, so it is stopped by its PID. It
validates the same RS256 bearer tokens against the same keys, fetched from the
local issuer's https JWKS (mod_auth_openidc fetches keys only over https), and
reverse-proxies to the same upstream as kube-oidc-gate. TLS in front, as ours,
mpm_event, keep-alive on, no access log. Debian packages: ``apache2`` and
``libapache2-mod-auth-openidc``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

__all__ = ["MODULES_DIR", "apache_binary", "missing", "write_config"]

MODULES_DIR = Path("/usr/lib/apache2/modules")
_MODULES = {
    "mpm_event_module": "mod_mpm_event.so",
    "authn_core_module": "mod_authn_core.so",
    "authz_core_module": "mod_authz_core.so",
    "authz_user_module": "mod_authz_user.so",
    "proxy_module": "mod_proxy.so",
    "proxy_http_module": "mod_proxy_http.so",
    "ssl_module": "mod_ssl.so",
    "socache_shmcb_module": "mod_socache_shmcb.so",
    "auth_openidc_module": "mod_auth_openidc.so",
}


def apache_binary() -> str | None:
    """``/usr/sbin/apache2`` when the Debian package is installed."""
    return shutil.which("apache2") or (
        "/usr/sbin/apache2" if Path("/usr/sbin/apache2").exists() else None
    )


def missing() -> str | None:
    """Why the peer cannot run here, or None when it can."""
    if apache_binary() is None:
        return "apache2 is not installed (Debian packages: apache2 libapache2-mod-auth-openidc)"
    absent = [so for so in _MODULES.values() if not (MODULES_DIR / so).exists()]
    if absent:
        return f"apache modules missing: {', '.join(absent)} (Debian: libapache2-mod-auth-openidc)"
    return None


def write_config(
    root: Path,
    *,
    port: int,
    cert: str,
    key: str,
    jwks_url: str,
    upstream: str,
) -> Path:
    """Write ``root/httpd.conf`` and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / "run").mkdir(exist_ok=True)
    # The children run as www-data and need to read nothing here but may write
    # the runtime directory (shared memory, mutexes).
    os.chmod(root / "run", 0o777)
    loads = "\n".join(
        f"LoadModule {name} {MODULES_DIR / so}" for name, so in _MODULES.items()
    )
    user = "www-data" if os.geteuid() == 0 else None
    run_as = f"User {user}\nGroup {user}\n" if user else ""
    conf = f"""# Private Apache instance for the kube-oidc-gate benchmark (generated).
ServerRoot "{root}"
ServerName 127.0.0.1
PidFile "{root}/run/httpd.pid"
DefaultRuntimeDir "{root}/run"
Mutex file:{root}/run default
ErrorLog "{root}/logs/error.log"
LogLevel warn
{run_as}{loads}
Listen 127.0.0.1:{port}
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30
StartServers 2
ServerLimit 4
ThreadsPerChild 64
MinSpareThreads 64
MaxSpareThreads 256
MaxRequestWorkers 256
SSLSessionCache "shmcb:{root}/run/ssl_scache(512000)"
OIDCCryptoPassphrase {secrets.token_hex(16)}
OIDCOAuthVerifyJwksUri {jwks_url}
OIDCOAuthSSLValidateServer Off
OIDCOAuthRemoteUserClaim sub
OIDCPassClaimsAs headers
<VirtualHost 127.0.0.1:{port}>
  SSLEngine on
  SSLCertificateFile "{cert}"
  SSLCertificateKeyFile "{key}"
  ProxyPass / {upstream}/ keepalive=On
  ProxyPassReverse / {upstream}/
  <Location />
    AuthType oauth20
    Require valid-user
  </Location>
</VirtualHost>
"""
    path = root / "httpd.conf"
    path.write_text(conf)
    return path
