"""JWT verification on the hot path: parse once, cheap checks first, then crypto.

Why not ``jwt.decode``: PyJWT >= 2.14 spends most of a decode validating the
base64url alphabet byte by byte in Python, so the RSA signature is a fifth of
its cost (see benchmarks/). Here the token is split and decoded once with C
routines, the unverified ``iss`` routes it (or declares it "not mine") before
any cryptography, and the signature is checked directly with ``cryptography``
against key objects that ``proxy.jwk`` built when the key set was fetched.
PyJWT still parses JWKs (``proxy.jwk``) and signs test tokens.

Order of checks, cheapest first, every one a typed ``TokenError``:

1. size, three non-empty base64url parts (``peek``), each in its one canonical
   encoding (no padding, zero trailing bits);
2. header: a JSON object, ``alg`` in the issuer's allowlist (never ``none``, never
   HS*), no ``crit`` (we implement no extensions, so RFC 7515 says refuse);
   ``jku``/``x5u``/``jwk``/``x5c`` are ignored: keys come only from the issuer's
   configured JWKS, never from the token;
3. payload: a JSON object with no duplicate names;
4. key by ``kid`` from the ``KeyResolver`` (an unknown kid may refetch, under a
   cooldown the resolver enforces; ``"kid": ""`` is no kid, so every key is
   tried, as go-oidc does); the key's type must fit ``alg``;
5. signature: an RSA signature must be exactly the modulus length, as Go's
   ``rsa.VerifyPKCS1v15``/``rsa.VerifyPSS`` require (``cryptography`` would
   accept one missing its leading zero bytes: a second text of one token);
6. ``iss`` exact (``accounts.google.com`` also stands for
   ``https://accounts.google.com``, for that issuer only, as go-oidc), ``exp``
   required and not past (no leeway), ``nbf`` not later than now plus the
   leeway (``--clock-skew``, default 300 s: go-oidc's fixed 5 minutes), ``iat``
   only type-checked (go-oidc never compares it with the clock; ``null`` is
   refused as Go's decoder refuses it), ``aud`` match-any.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from proxy.config import IssuerConfig
from proxy.errors import (
    AlgorithmNotAllowed,
    AudienceMismatch,
    InvalidClaim,
    IssuerMismatch,
    MalformedToken,
    MissingClaim,
    SignatureInvalid,
    TokenExpired,
    TokenNotYetValid,
    UnknownKeyId,
)
from proxy.jwk import VerificationKey

__all__ = [
    "GOOGLE_ISSUER",
    "IGNORED_HEADERS",
    "KeyResolver",
    "ParsedToken",
    "coalesce_issuer",
    "peek",
    "verify",
]

#: Headers that would let a token name its own key. Ignored on purpose, never fetched.
IGNORED_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c"})

#: The one issuer whose tokens may carry a scheme-less ``iss`` (OpenID Connect
#: Core §15.6.2; go-oidc and kube-apiserver accept it for this issuer only).
GOOGLE_ISSUER: Final = "https://accounts.google.com"
_GOOGLE_ISSUER_NO_SCHEME: Final = "accounts.google.com"

#: Year 9999: later "dates" are garbage, and floats lose whole seconds beyond 2**53.
_MAX_NUMERIC_DATE: Final = 253402300799.0
#: The base64url alphabet (RFC 4648 §5). ``translate`` deleting it leaves
#: whatever else a part holds: a C loop, 0.43 µs on a kilobyte part against
#: 1.04 µs for a regular expression's character-class scan.
_B64URL: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STD: Final = bytes.maketrans(b"-_", b"+/")
#: Unused low bits of the last character, by the length of the final quantum.
_UNUSED_BITS: Final = (0, 0, 0x0F, 0x03)

#: Stateless descriptors, built once instead of per verification.
_HASHES: Final[Mapping[str, hashes.HashAlgorithm]] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}
_PKCS1: Final = padding.PKCS1v15()


class KeyResolver(Protocol):
    """Where verification keys come from (``proxy.keyset`` satisfies this)."""

    @property
    def ready(self) -> bool:
        """Whether keys have been loaded at least once."""
        ...

    def lookup(self, kid: str | None) -> Sequence[VerificationKey]:
        """Keys for ``kid`` (all keys when None); no I/O."""
        ...

    async def refresh_unknown(self, kid: str | None) -> Sequence[VerificationKey]:
        """Keys for ``kid`` after a refetch the resolver may rate-limit."""
        ...


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A compact JWS split and decoded once; nothing in it is verified yet."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def unverified_issuer(self) -> str | None:
        """The ``iss`` claim before verification: only for routing, never trusted.

        Coalesced as kube-apiserver's ``untrustedIssuer`` does (see
        ``coalesce_issuer``).
        """
        iss = self.claims.get("iss")
        return coalesce_issuer(iss) if isinstance(iss, str) else None

    @property
    def kid(self) -> str | None:
        """The header's ``kid`` when it is a non-empty string.

        ``""`` is no kid: go-oidc then tries every key, and so do we.
        """
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) and kid else None


def coalesce_issuer(iss: str) -> str:
    """``https://accounts.google.com`` for Google's legacy ``accounts.google.com``.

    Kubernetes routes and verifies such tokens as Google's (OpenID Connect
    Core §15.6.2); no other issuer gets a scheme-less alias.
    """
    return GOOGLE_ISSUER if iss == _GOOGLE_ISSUER_NO_SCHEME else iss


def _b64decode(part: bytes, what: str) -> bytes:
    if not part or part.translate(None, _B64URL):
        raise MalformedToken(f"token: {what} is not base64url (RFC 7515 §2)")
    padded = part.translate(_TO_STD) + b"=" * (-len(part) % 4)
    try:
        decoded = binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error as err:
        raise MalformedToken(f"token: {what} is not valid base64url") from err
    # The last character of a 2- or 3-character tail carries 4 or 2 unused
    # bits; RFC 4648 §3.5 lets a decoder refuse them unless zero, and we do,
    # so one byte string has one encoding (one token, one text).
    unused = _UNUSED_BITS[len(part) % 4]
    if unused and _B64URL.index(part[-1]) & unused:
        raise MalformedToken(
            f"token: {what} is not canonical base64url (non-zero trailing bits)"
        )
    return decoded


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise MalformedToken(
                    f'token: duplicate member "{name[:64]}" in a JSON object'
                )
            seen.add(name)
    return out


def _reject_constant(name: str) -> Any:
    raise MalformedToken(f"token: {name} is not a JSON number (RFC 8259)")


#: Built once: ``json.loads`` with hooks would build a new decoder per call.
_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        # JWS and JWT text is UTF-8 (RFC 7515 §2, RFC 7519 §7.2).
        value = _DECODER.decode(raw.decode("utf-8"))
    except MalformedToken:
        raise
    except (ValueError, RecursionError) as err:
        raise MalformedToken(f"token: {what} is not valid JSON") from err
    if not isinstance(value, dict):
        raise MalformedToken(
            f"token: {what} is a JSON {type(value).__name__}, expected an object"
        )
    return value


def peek(token: str | bytes, *, max_bytes: int) -> ParsedToken:
    """Split and decode a compact JWS; raise ``MalformedToken`` for anything else.

    Everything returned is unverified. The caller uses ``unverified_issuer`` only
    to choose an authenticator (or say "not mine"), as kube-apiserver does.
    """
    raw = token.encode("ascii", "replace") if isinstance(token, str) else token
    if len(raw) > max_bytes:
        raise MalformedToken(
            f"token: {len(raw)} bytes is larger than the {max_bytes}-byte limit"
        )
    parts = raw.split(b".")
    if len(parts) != 3:
        hint = ""
        if len(parts) == 5:
            hint = " (5 parts is an encrypted JWE, which is not accepted)"
        raise MalformedToken(
            f"token: expected 3 dot-separated parts (a compact JWS), got "
            f"{len(parts)}{hint}"
        )
    h64, p64, s64 = parts
    if not h64 or not p64 or not s64:
        raise MalformedToken("token: header, payload and signature must be non-empty")
    header = _json_object(_b64decode(h64, "header"), "header")
    claims = _json_object(_b64decode(p64, "payload"), "payload")
    signature = _b64decode(s64, "signature")
    return ParsedToken(
        header=header,
        claims=claims,
        signing_input=h64 + b"." + p64,
        signature=signature,
    )


def _signature_ok(key: VerificationKey, alg: str, data: bytes, sig: bytes) -> bool:
    k = key.key
    try:
        if alg == "EdDSA":
            assert isinstance(k, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
            k.verify(sig, data)
            return True
        digest = _HASHES[alg[2:]]
        if alg.startswith(("RS", "PS")):
            assert isinstance(k, rsa.RSAPublicKey)
            # RFC 8017 §8.1.2/§8.2.2 step 1: exactly k octets. OpenSSL pads a
            # short one with zeros, which would make the token text ambiguous.
            if len(sig) != (k.key_size + 7) // 8:
                return False
        if alg.startswith("RS"):
            assert isinstance(k, rsa.RSAPublicKey)
            k.verify(sig, data, _PKCS1, digest)
        elif alg.startswith("PS"):
            assert isinstance(k, rsa.RSAPublicKey)
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            k.verify(sig, data, pss, digest)
        else:
            assert isinstance(k, ec.EllipticCurvePublicKey)
            size = (k.curve.key_size + 7) // 8
            if len(sig) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            )
            k.verify(der, data, ec.ECDSA(digest))
    except InvalidSignature:
        return False
    return True


def _numeric_date(claims: Mapping[str, Any], name: str, issuer: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if value is None and name == "nbf":
        # go-oidc decodes nbf into a pointer, so null is "absent"; exp and
        # iat are values whose decoder refuses null.
        return None
    # bool is an int subclass: "exp": true is not a date.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidClaim(
            f'token: "{name}" must be a NumericDate (a JSON number), got '
            f"{'null' if value is None else type(value).__name__}",
            claim=name,
            issuer=issuer,
        )
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float) or abs(as_float) > _MAX_NUMERIC_DATE:
        raise InvalidClaim(
            f'token: "{name}" is out of range for a NumericDate',
            claim=name,
            issuer=issuer,
        )
    return as_float


def _check_times(
    claims: Mapping[str, Any], issuer: str, now: float, leeway: float
) -> None:
    """go-oidc's rules: ``exp`` without leeway, ``nbf`` with it, ``iat`` unchecked."""
    exp = _numeric_date(claims, "exp", issuer)
    if exp is None:
        raise MissingClaim(
            'token: required claim "exp" is missing', claim="exp", issuer=issuer
        )
    if now > exp:
        raise TokenExpired(
            f"token: expired {int(now - exp)}s ago (exp {int(exp)})", issuer=issuer
        )
    nbf = _numeric_date(claims, "nbf", issuer)
    if nbf is not None and nbf > now + leeway:
        raise TokenNotYetValid(
            f'token: "nbf" is {int(nbf - now)}s in the future '
            f"(allowed clock skew {int(leeway)}s)",
            issuer=issuer,
        )
    _numeric_date(claims, "iat", issuer)


def _check_audience(claims: Mapping[str, Any], issuer: IssuerConfig) -> None:
    aud = claims.get("aud")
    if aud is None:
        raise MissingClaim(
            'token: required claim "aud" is missing', claim="aud", issuer=issuer.url
        )
    if isinstance(aud, str):
        got: list[str] = [aud]
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        got = aud
    else:
        raise InvalidClaim(
            'token: "aud" must be a string or a list of strings',
            claim="aud",
            issuer=issuer.url,
        )
    if not any(a in issuer.audiences for a in got):
        shown = ", ".join(f'"{a[:128]}"' for a in got[:10])
        want = ", ".join(f'"{a}"' for a in issuer.audiences)
        raise AudienceMismatch(
            f"token: audience mismatch: expected one of [{want}], got [{shown}]",
            issuer=issuer.url,
        )


def check_header(token: ParsedToken, issuer: IssuerConfig) -> str:
    """Validate the header for ``issuer``; return the ``alg`` to verify with."""
    alg = token.header.get("alg")
    if not isinstance(alg, str):
        raise MalformedToken('token: header has no "alg" string', issuer=issuer.url)
    if alg not in issuer.signing_algs:
        allowed = ", ".join(issuer.signing_algs)
        raise AlgorithmNotAllowed(
            f'token: signing algorithm "{alg[:32]}" is not allowed for this issuer '
            f"(allowed: {allowed})",
            issuer=issuer.url,
        )
    if "crit" in token.header:
        raise MalformedToken(
            'token: header has "crit" extensions, none of which are supported',
            issuer=issuer.url,
        )
    kid = token.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise MalformedToken('token: header "kid" must be a string', issuer=issuer.url)
    return alg


def _kid_text(kid: str | None) -> str:
    return "(none)" if kid is None else json.dumps(kid[:64])


async def verify(
    token: ParsedToken,
    issuer: IssuerConfig,
    keys: KeyResolver,
    *,
    now: float,
    leeway: float,
) -> Mapping[str, Any]:
    """Verify ``token`` for ``issuer``; return its claims or raise ``TokenError``."""
    alg = check_header(token, issuer)
    kid = token.kid
    candidates = keys.lookup(kid)
    if not candidates:
        candidates = await keys.refresh_unknown(kid)
    if not candidates:
        raise UnknownKeyId(
            f"token: no key with kid {_kid_text(kid)} in the issuer's key set, "
            "even after a refetch (was it signed by another issuer or a withdrawn key?)",
            kid=kid,
            issuer=issuer.url,
        )
    fitting = [k for k in candidates if k.fits(alg)]
    if not fitting:
        raise AlgorithmNotAllowed(
            f'token: the key with kid {_kid_text(kid)} cannot verify "{alg}" '
            f"(key type {candidates[0].kty})",
            issuer=issuer.url,
        )
    if not any(
        _signature_ok(k, alg, token.signing_input, token.signature) for k in fitting
    ):
        raise SignatureInvalid(
            f"token: signature does not verify with key {_kid_text(kid)}",
            issuer=issuer.url,
        )
    claims = token.claims
    iss = claims.get("iss")
    if iss != issuer.url and not (
        issuer.url == GOOGLE_ISSUER and iss == _GOOGLE_ISSUER_NO_SCHEME
    ):
        got = iss[:256] if isinstance(iss, str) else type(iss).__name__
        raise IssuerMismatch(
            f'token: issuer mismatch: expected "{issuer.url}", got "{got}"',
            issuer=issuer.url,
            expected=issuer.url,
            got=got,
        )
    _check_times(claims, issuer.url, now, leeway)
    _check_audience(claims, issuer)
    return claims
