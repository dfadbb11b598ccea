"""Real signing keys for tests: generated per run, never committed.

``new_key("RS256")`` makes a fresh private key, ``sign`` makes a real compact
JWS with PyJWT, ``jwks`` publishes the public halves as a JWK Set.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = ["SigningKey", "claims_for", "jwks", "new_key", "sign"]

_CURVES = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        pub = self.private_key.public_key()
        if self.alg.startswith(("RS", "PS")):
            raw = RSAAlgorithm.to_jwk(pub, as_dict=True)
        elif self.alg.startswith("ES"):
            raw = ECAlgorithm.to_jwk(pub, as_dict=True)
        else:
            raw = OKPAlgorithm.to_jwk(pub, as_dict=True)
        jwk = dict(raw)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def new_key(
    alg: str = "RS256", *, kid: str | None = None, bits: int = 2048
) -> SigningKey:
    if alg.startswith(("RS", "PS")):
        priv: Any = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif alg in _CURVES:
        priv = ec.generate_private_key(_CURVES[alg])
    elif alg == "EdDSA":
        priv = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unsupported test alg {alg}")
    return SigningKey(
        kid=kid or f"{alg.lower()}-{secrets.token_hex(4)}", alg=alg, private_key=priv
    )


def sign(
    key: SigningKey,
    claims: dict[str, Any],
    *,
    headers: dict[str, Any] | None = None,
    alg: str | None = None,
) -> str:
    hdr: dict[str, Any] = {"kid": key.kid}
    if headers:
        hdr.update(headers)
    hdr = {k: v for k, v in hdr.items() if v is not None}
    return jwt.encode(claims, key.private_key, algorithm=alg or key.alg, headers=hdr)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in keys]}


def jwks_bytes(*keys: SigningKey) -> bytes:
    return json.dumps(jwks(*keys)).encode()


def claims_for(
    issuer: str,
    audience: str | list[str] = "kubernetes",
    *,
    sub: str = "00u1alice",
    lifetime: int = 3600,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    t = int(now if now is not None else time.time())
    out: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": t,
        "nbf": t,
        "exp": t + lifetime,
    }
    out.update(extra)
    return out


def sign_bytes(
    key: SigningKey, payload: bytes, *, headers: dict[str, Any] | None = None
) -> str:
    """Sign arbitrary payload bytes (for claims PyJWT refuses to encode)."""
    hdr: dict[str, Any] = {"kid": key.kid}
    hdr.update(headers or {})
    return jwt.api_jws.encode(payload, key.private_key, algorithm=key.alg, headers=hdr)
