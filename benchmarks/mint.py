"""Keys and tokens for the benchmark: realistic RS256 ID tokens, minted in bulk.

The cold-path scenario needs a token nobody has seen on every request, so tens
of thousands are minted before the run (RSA signing, in a process pool: a few
thousand per second per core). Refused tokens need no signing: a bad signature
is random bytes, a random ``kid`` names no key at all.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "Key",
    "b64_json",
    "bad_signature",
    "claims",
    "mint",
    "mint_many",
    "new_key",
    "random_kid",
]

AUDIENCE = "kubernetes"
_GROUPS = [
    "dev",
    "ops",
    "platform-readers",
    "team-payments",
    "team-search",
    "oncall",
    "vpn-users",
    "github-org-members",
]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_json(value: dict[str, Any]) -> str:
    """A JWS part: compact JSON, base64url without padding."""
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _int_b64(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True, slots=True)
class Key:
    """An RS256 signing key with its ``kid`` (the private half stays in memory)."""

    kid: str
    pem: bytes

    @property
    def private(self) -> rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    def jwk(self) -> dict[str, Any]:
        """The public half as a JWK (RFC 7517)."""
        pub = self.private.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": _int_b64(pub.n),
            "e": _int_b64(pub.e),
        }


def new_key(kid: str | None = None) -> Key:
    """A fresh RSA-2048 key."""
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Key(kid=kid or f"bench-{secrets.token_hex(4)}", pem=pem)


def jwks(*keys: Key) -> bytes:
    """A JWK Set document of the public halves."""
    return json.dumps({"keys": [k.jwk() for k in keys]}).encode()


def claims(
    issuer: str, n: int, *, lifetime: int = 3600, now: float | None = None
) -> dict[str, Any]:
    """The claims of token number ``n``: about what Okta or Keycloak put in an ID token."""
    t = int(now if now is not None else time.time())
    return {
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": f"00u{n:08d}alice",
        "iat": t - 5,
        "nbf": t - 5,
        "exp": t + lifetime,
        "auth_time": t - 30,
        "jti": secrets.token_hex(12),
        "email": f"user{n}@example.com",
        "email_verified": True,
        "name": f"Benchmark User {n}",
        "preferred_username": f"user{n}",
        "groups": _GROUPS,
        "amr": ["pwd", "mfa"],
        "idp": "00o1benchmarkidp",
        "ver": 1,
    }


def _encode(kid: str, payload: dict[str, Any]) -> bytes:
    header = {"alg": "RS256", "kid": kid, "typ": "JWT"}
    return (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    ).encode()


def mint(key: rsa.RSAPrivateKey, kid: str, payload: dict[str, Any]) -> str:
    """A compact JWS signed with RS256."""
    signing_input = _encode(kid, payload)
    sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input.decode() + "." + _b64(sig)


def bad_signature(kid: str, payload: dict[str, Any]) -> str:
    """A well-formed token whose 256-byte signature is random: refused after RSA."""
    return _encode(kid, payload).decode() + "." + _b64(os.urandom(256))


def random_kid(payload: dict[str, Any]) -> str:
    """A token naming a key nobody published (the random-``kid`` flood)."""
    return bad_signature(f"rnd-{secrets.token_hex(8)}", payload)


def _mint_range(args: tuple[bytes, str, str, int, int, int]) -> list[str]:
    pem, kid, issuer, start, count, lifetime = args
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    now = time.time()
    return [
        mint(key, kid, claims(issuer, n, lifetime=lifetime, now=now))
        for n in range(start, start + count)
    ]


def mint_many(
    key: Key,
    issuer: str,
    count: int,
    *,
    start: int = 0,
    lifetime: int = 3600,
    workers: int = 0,
) -> list[str]:
    """``count`` distinct valid tokens, signed in ``workers`` processes (0: one per CPU)."""
    workers = workers or (os.cpu_count() or 1)
    if count < 500 or workers == 1:
        return _mint_range((key.pem, key.kid, issuer, start, count, lifetime))
    step = -(-count // workers)
    jobs = [
        (key.pem, key.kid, issuer, start + i, min(step, count - i), lifetime)
        for i in range(0, count, step)
    ]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        out: list[str] = []
        for part in pool.map(_mint_range, jobs):
            out.extend(part)
    return out
