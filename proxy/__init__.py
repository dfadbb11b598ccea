"""kube-oidc-gate: log in to Kubernetes with an OIDC identity provider.

One authentication engine (issuer keys, JWT validation, claim mapping with the
same meaning as kube-apiserver's) behind two front ends: a TokenReview webhook
for API servers that can call one, and an impersonating reverse proxy for those
that cannot. The stable API for embedding the engine is re-exported here.

The re-exports are resolved on first use (PEP 562), not at import: importing
``proxy.cli`` must not import the engine, whose metrics module imports
``prometheus_client``, before the CLI knows whether it runs several workers.
prometheus_client reads ``PROMETHEUS_MULTIPROC_DIR`` once, when it is first
imported (its documented way to share samples between processes), so the CLI
sets that variable first and imports the engine after.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.authn import Authenticator, Verdict
    from proxy.config import AuthConfig
    from proxy.errors import ConfigError, ProxyError, TokenError
    from proxy.kube import UserInfo

__version__ = "0.1.0"

#: Where each re-exported name lives.
_EXPORTS = {
    "Authenticator": "proxy.authn",
    "Verdict": "proxy.authn",
    "AuthConfig": "proxy.config",
    "ConfigError": "proxy.errors",
    "ProxyError": "proxy.errors",
    "TokenError": "proxy.errors",
    "UserInfo": "proxy.kube",
}

__all__ = [
    "COMPILED",
    "AuthConfig",
    "Authenticator",
    "ConfigError",
    "ProxyError",
    "TokenError",
    "UserInfo",
    "Verdict",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "COMPILED":
        # Whether the hot path runs compiled (the mypyc wheel the image ships,
        # built by ``make compiled``) or as plain Python (an editable install).
        # Found without importing the engine (see the module docstring).
        spec = importlib.util.find_spec("proxy.authn")
        origin = spec.origin if spec is not None else None
        return origin is not None and not origin.endswith(".py")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
