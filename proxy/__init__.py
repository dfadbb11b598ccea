"""kube-oidc-gate: log in to Kubernetes with an OIDC identity provider.

One authentication engine (issuer keys, JWT validation, claim mapping with the
same meaning as kube-apiserver's) behind two front ends: a TokenReview webhook
for API servers that can call one, and an impersonating reverse proxy for those
that cannot. The stable API for embedding the engine is re-exported here.
"""

from proxy import authn
from proxy.authn import Authenticator, Verdict
from proxy.config import AuthConfig
from proxy.errors import ConfigError, ProxyError, TokenError
from proxy.kube import UserInfo

__version__ = "0.1.0"

#: Whether the hot path runs compiled (the mypyc wheel the image ships, built
#: by ``make compiled``) or as plain Python (an editable install).
COMPILED: bool = not authn.__file__.endswith(".py")

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
