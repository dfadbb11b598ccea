"""JSON Web Keys: turn an issuer's JWK Set into verification keys, once.

Key material is parsed here, when a key set is fetched, so verifying a token
never parses a JWK: the hot path only picks already-built ``cryptography``
public keys by ``kid``.

What is kept, and why the rest is skipped rather than fatal:

- Only asymmetric signing keys (``kty`` RSA, EC, OKP) with ``use`` "sig" or no
  ``use``. A symmetric ``oct`` key in a *public* key set is either a mistake or
  an attack (HMAC with a published secret), so it is never usable.
- A key that carries private material (``d``) is refused: the issuer has leaked
  its signing key and the operator must rotate it. It is reported, not used.
- RSA keys under 2048 bits, curves outside P-256/P-384/P-521/Ed25519/Ed448,
  undecodable parameters and a JWK ``alg`` that is not a signing algorithm for
  the key's type are skipped with a reason.

A key set may hold keys we cannot use (an encryption key beside the signing
keys is normal), so a bad key is one reason among others; only a document with
no usable key at all is an error.

Duplicate ``kid`` values are all kept. RFC 7517 only says ``kid`` *should* be
unique, and during a rotation some issuers briefly publish two keys under one
``kid`` (re-keyed, or one RSA and one EC key). Keeping both lets the verifier
try every candidate whose type fits the token's ``alg``; keeping only one would
refuse valid tokens signed with the other until the next fetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError
from jwt.utils import base64url_encode

from proxy.errors import KeySetError

__all__ = [
    "MIN_RSA_BITS",
    "PublicKey",
    "VerificationKey",
    "load_jwks_file",
    "parse_jwks",
]

logger = logging.getLogger(__name__)

PublicKey: TypeAlias = (
    RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
)

#: NIST SP 800-131A and RFC 7518 §3.3: smaller RSA keys are refused.
MIN_RSA_BITS: Final = 2048

_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
#: Each curve has exactly one JWS algorithm (RFC 7518 §3.4).
_EC_ALG_BY_CURVE: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
#: ``EdDSA`` (RFC 8037) or the fully specified names of RFC 9864.
_OKP_ALGS_BY_CURVE: Final = {
    "Ed25519": frozenset({"EdDSA", "Ed25519"}),
    "Ed448": frozenset({"EdDSA", "Ed448"}),
}
_SYMMETRIC_KTY: Final = frozenset({"oct"})
#: RFC 7638 §3.2: the members of the thumbprint input, per key type.
_THUMBPRINT_MEMBERS: Final = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationKey:
    """One usable public key from an issuer's key set, parsed and checked.

    ``alg`` is the JWK's own ``alg`` (None when the issuer did not pin one);
    ``thumbprint`` (RFC 7638, base64url SHA-256) names the key in logs even
    when it has no ``kid``.
    """

    kid: str | None
    kty: str
    alg: str | None
    crv: str | None
    key: PublicKey
    thumbprint: str

    def fits(self, alg: str) -> bool:
        """Whether a JWS signed with ``alg`` can be verified with this key.

        The key type and curve must match the algorithm, and a key that names
        its own ``alg`` is used with that algorithm only (RFC 7517 §4.4), so a
        token cannot pick e.g. PS256 for a key published for RS256.
        """
        if self.alg is not None and alg != self.alg:
            return False
        return _alg_fits(self.kty, self.crv, alg)


def _alg_fits(kty: str, crv: str | None, alg: str) -> bool:
    if kty == "RSA":
        return alg in _RSA_ALGS
    if crv is None:
        return False
    if kty == "EC":
        return _EC_ALG_BY_CURVE.get(crv) == alg
    if kty == "OKP":
        return alg in _OKP_ALGS_BY_CURVE.get(crv, frozenset())
    return False


class _SkippedKeyError(Exception):
    """Internal control flow: this JWK is not usable; the message says why.

    Never leaves this module: ``parse_jwks`` turns it into a reason string.
    """


def _describe(index: int, jwk: Mapping[str, object]) -> str:
    kid = jwk.get("kid")
    if isinstance(kid, str):
        return f'key {index} (kid "{kid[:64]}")'
    return f"key {index} (no kid)"


def _optional_str(jwk: Mapping[str, object], name: str) -> str | None:
    value = jwk.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _SkippedKeyError(f'"{name}" is not a string')
    return value


def _check_purpose(jwk: Mapping[str, object]) -> None:
    use = _optional_str(jwk, "use")
    if use is not None and use != "sig":
        raise _SkippedKeyError(f'"use" is "{use[:32]}", not "sig"')
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _SkippedKeyError('"key_ops" does not include "verify"')


def _build(kty: str, jwk: dict[str, object]) -> tuple[PublicKey, str | None]:
    """The public key and its curve; ``_SkippedKeyError`` if it is unusable."""
    try:
        if kty == "RSA":
            if "n" not in jwk or "e" not in jwk:
                raise _SkippedKeyError('an RSA key needs "n" and "e"')
            rsa_key = RSAAlgorithm.from_jwk(jwk)
            assert isinstance(rsa_key, RSAPublicKey)
            if rsa_key.key_size < MIN_RSA_BITS:
                raise _SkippedKeyError(
                    f"RSA key has {rsa_key.key_size} bits, "
                    f"at least {MIN_RSA_BITS} are required"
                )
            return rsa_key, None
        crv = _optional_str(jwk, "crv")
        if kty == "EC":
            if crv not in _EC_ALG_BY_CURVE:
                raise _SkippedKeyError(f'curve "{crv}" is not supported for EC keys')
            ec_key = ECAlgorithm.from_jwk(jwk)
            assert isinstance(ec_key, EllipticCurvePublicKey)
            return ec_key, crv
        if crv not in _OKP_ALGS_BY_CURVE:
            raise _SkippedKeyError(f'curve "{crv}" is not supported for OKP keys')
        okp_key = OKPAlgorithm.from_jwk(jwk)
        assert isinstance(okp_key, Ed25519PublicKey | Ed448PublicKey)
        return okp_key, crv
    except (
        PyJWTError,
        UnsupportedAlgorithm,
        ValueError,
        TypeError,
        KeyError,
        OverflowError,
    ) as err:
        raise _SkippedKeyError(
            f"bad key parameters ({type(err).__name__}: {err})"
        ) from err


def _check_alg(kty: str, crv: str | None, alg: str | None) -> None:
    if alg is not None and not _alg_fits(kty, crv, alg):
        where = kty if crv is None else f"{kty} {crv}"
        raise _SkippedKeyError(
            f'"alg" is "{alg[:32]}", not a signing algorithm for an {where} key'
        )


def _thumbprint(kty: str, key: PublicKey) -> str:
    """RFC 7638 thumbprint from the key itself, so encodings cannot differ."""
    if isinstance(key, RSAPublicKey):
        canonical = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, EllipticCurvePublicKey):
        canonical = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        canonical = OKPAlgorithm.to_jwk(key, as_dict=True)
    members = {name: canonical[name] for name in _THUMBPRINT_MEMBERS[kty]}
    members["kty"] = kty
    data = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64url_encode(hashlib.sha256(data).digest()).decode()


def _parse_one(entry: object) -> VerificationKey:
    if not isinstance(entry, dict):
        raise _SkippedKeyError("not a JSON object")
    jwk: dict[str, object] = entry
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise _SkippedKeyError('"kty" is missing')
    if kty in _SYMMETRIC_KTY:
        raise _SkippedKeyError(
            f'symmetric key (kty "{kty}") refused in a public key set'
        )
    if kty not in _THUMBPRINT_MEMBERS:
        raise _SkippedKeyError(f'key type "{kty[:32]}" is not supported')
    if "d" in jwk:
        raise _SkippedKeyError(
            'private key material ("d") is published: refused; '
            "the issuer's signing key is exposed and must be rotated"
        )
    kid = _optional_str(jwk, "kid")
    alg = _optional_str(jwk, "alg")
    _check_purpose(jwk)
    key, crv = _build(kty, jwk)
    _check_alg(kty, crv, alg)
    return VerificationKey(
        kid=kid, kty=kty, alg=alg, crv=crv, key=key, thumbprint=_thumbprint(kty, key)
    )


def parse_jwks(
    document: object, *, issuer: str
) -> tuple[tuple[VerificationKey, ...], tuple[str, ...]]:
    """Usable keys of a decoded JWK Set, and one reason per skipped key.

    Raises ``KeySetError`` when the document is not a key set or holds no
    usable key: then there is nothing to verify with, and the caller keeps its
    previous keys.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySetError(
            f'jwks: key set of issuer {issuer} is not a JSON object with a "keys" list'
        )
    entries: list[object] = document["keys"]
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        try:
            keys.append(_parse_one(entry))
        except _SkippedKeyError as err:
            name = (
                _describe(index, entry) if isinstance(entry, dict) else f"key {index}"
            )
            skipped.append(f"{name}: {err}")
    if not keys:
        detail = "; ".join(skipped) if skipped else "the key set is empty"
        raise KeySetError(
            f"jwks: key set of issuer {issuer} has no usable signing key ({detail})"
        )
    return tuple(keys), tuple(skipped)


def load_jwks_file(path: str | os.PathLike[str]) -> tuple[VerificationKey, ...]:
    """Keys from a local JWK Set file (``check-token --offline --jwks-file``).

    Skipped keys are logged as warnings; an unreadable file, bad JSON or a set
    with no usable key is a ``KeySetError``.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            document = json.loads(fh.read())
    except OSError as err:
        raise KeySetError(
            f"jwks: cannot read key set file {name}: {err.strerror}"
        ) from err
    except ValueError as err:
        raise KeySetError(
            f"jwks: key set file {name} is not valid JSON: {err}"
        ) from err
    keys, skipped = parse_jwks(document, issuer=f"file {name}")
    for reason in skipped:
        logger.warning("jwks key skipped", extra={"file": name, "reason": reason})
    return keys
