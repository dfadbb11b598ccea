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

__all__ = ["Route", "argv", "missing", "nginx_binary", "version", "write_config"]

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
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    # As root, the worker drops to www-data (as Apache's children do); it reads
    # nothing here, and the master creates the temp directories for it.
    user = "user www-data www-data;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {root}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
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
{locations}    location / {{
      return 404;
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
