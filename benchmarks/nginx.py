"""The shared upstream of the proxy-versus-Apache scenarios: a private nginx.

Issue 7 measures "Apache httpd + mod_auth_openidc ... reverse-proxying to a
local nginx", and so do we: the aiohttp stand-in (``benchmarks.servers
upstream``) spends about 22 µs of CPU per request on the same two cores as the
proxy, Apache and wrk, and that dilutes every ratio measured through it. nginx
answering a fixed body costs a fraction of that.

A private instance (its own prefix, config, pid file, temp directories and
error log in the run's temp directory; nothing under /etc/nginx or /var/log is
read or written, and the Debian package's own service is never used) run in
the foreground (``daemon off``) as a child of the harness, so it is stopped by
its PID. One master and one worker, keep-alive with no request limit, no access
log, listening on 127.0.0.1 only. It answers only the fixed routes it is given,
with the same status, body bytes and content type as the aiohttp upstream;
everything else is a 404. The streamed body and the idle watches stay on the
aiohttp upstream, which implements them. Debian package: ``nginx``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HEADERS_PATH",
    "Route",
    "argv",
    "missing",
    "nginx_binary",
    "version",
    "write_config",
    "write_proxy_config",
]

#: Answers the two headers a front end must set (``Impersonate-User`` and
#: ``Authorization``), so the harness can check a peer forwards what the proxy
#: does before it measures it.
HEADERS_PATH = "/_bench/headers"

#: The escapes nginx's config parser understands inside a quoted string.
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One fixed answer: ``GET path`` gets ``status``, ``content_type`` and ``body``."""

    body: bytes
    content_type: str
    status: int = 200


def nginx_binary() -> str | None:
    """``/usr/sbin/nginx`` when the Debian package is installed."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def missing() -> str | None:
    """Why nginx cannot be the upstream here, or None when it can."""
    if nginx_binary() is None:
        return "nginx is not installed (Debian package: nginx)"
    return None


def version(binary: str) -> str:
    """``nginx 1.22.1`` (``nginx -v`` prints ``nginx version: nginx/1.22.1`` on stderr)."""
    res = subprocess.run(
        [binary, "-v"], check=False, capture_output=True, text=True, timeout=5
    )
    out = (res.stderr or res.stdout).strip().split("\n")[0]
    return out.rpartition(": ")[2].replace("/", " ", 1) or "nginx"


def _quoted(body: bytes) -> str:
    """``body`` as a single-quoted nginx string (the ``return`` directive's text)."""
    text = body.decode()
    if "$" in text:
        # nginx expands variables in return text and has no escape for "$".
        raise ValueError("nginx: a fixed body may not contain '$'")
    if any(ord(c) < 0x20 and c not in _ESCAPES for c in text):
        raise ValueError("nginx: a fixed body may not contain control characters")
    return "'" + "".join(_ESCAPES.get(c, c) for c in text) + "'"


def _location(path: str, route: Route) -> str:
    if not path.startswith("/") or any(c in path for c in " ;{}'\"\\$#"):
        raise ValueError(f"nginx: unusable route path {path!r}")
    if any(c in route.content_type for c in '"\\$\n{}'):
        raise ValueError(f"nginx: unusable content type {route.content_type!r}")
    return (
        f"    location = {path} {{\n"
        f'      default_type "{route.content_type}";\n'
        f"      return {route.status} {_quoted(route.body)};\n"
        f"    }}\n"
    )


def write_config(root: Path, *, port: int, routes: Mapping[str, Route]) -> Path:
    """Write ``root/nginx.conf`` serving ``routes`` on 127.0.0.1:``port``; return its path."""
    user, temp = _common(root)
    locations = "".join(_location(p, r) for p, r in routes.items())
    conf = f"""# Private nginx instance for the kube-oidc-gate benchmark (generated).
daemon off;
master_process on;
worker_processes 1;
{user}pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
  worker_connections 4096;
}}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  types {{}}
{temp}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
{locations}    location = {HEADERS_PATH} {{
      default_type text/plain;
      return 200 "$http_impersonate_user\\n$http_authorization\\n";
    }}
    location / {{
      return 404;
    }}
  }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return path


def _common(root: Path) -> tuple[str, str]:
    """The ``user`` line and the temp paths, all in ``root``.

    As root, the worker drops to www-data (as Apache's children do); it reads
    nothing here, and the master creates the temp directories for it.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    user = "user www-data www-data;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {root}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return user, temp


def write_proxy_config(
    root: Path,
    *,
    port: int,
    cert: str,
    key: str,
    upstream: str,
    credential: str,
    workers: int,
) -> Path:
    """The ceiling: nginx as a TLS reverse proxy to ``upstream`` (``host:port``), no authentication.

    What any proxy on this machine must do at least: TLS in front, the same
    header rewrite (the client's ``Authorization`` replaced by the upstream
    credential), kept-alive upstream connections; no token is looked at.
    ``workers`` worker processes, as many as the proxy's workers.
    """
    if any(c.isspace() or c in "\"'\\$;{}#" for c in credential + upstream):
        raise ValueError("nginx: unusable credential or upstream")
    user, temp = _common(root)
    conf = f"""# Private nginx TLS reverse proxy for the kube-oidc-gate benchmark (generated).
daemon off;
master_process on;
worker_processes {workers};
{user}pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
  worker_connections 4096;
}}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  types {{}}
{temp}
  upstream up {{
    server {upstream};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=1024;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {credential}";
    }}
  }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return path


def argv(binary: str, conf: Path) -> list[str]:
    """The command line: prefix, config and start-up error log all in ``conf``'s directory.

    ``-e`` matters: without it nginx opens its compiled-in error log before it
    has read the config.
    """
    root = conf.parent
    return [binary, "-p", f"{root}/", "-c", str(conf), "-e", str(root / "error.log")]
