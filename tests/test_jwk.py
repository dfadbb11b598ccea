"""proxy.jwk: which JWKs become verification keys, and why the others do not."""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from proxy.errors import KeySetError
from proxy.jwk import VerificationKey, load_jwks_file, parse_jwks
from tests.keygen import new_key

ISSUER = "https://issuer.example.com/oauth2/default"

Jwk = dict[str, Any]


@functools.cache
def _rsa(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def _ec(curve: str) -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
        "P-521": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[curve])


def rsa_jwk(bits: int = 2048, **extra: Any) -> Jwk:
    jwk = dict(RSAAlgorithm.to_jwk(_rsa(bits).public_key(), as_dict=True))
    jwk.update(kid=f"rsa{bits}", use="sig")
    jwk.update(extra)
    return jwk


def ec_jwk(curve: str = "P-256", **extra: Any) -> Jwk:
    jwk = dict(ECAlgorithm.to_jwk(_ec(curve).public_key(), as_dict=True))
    jwk.update(kid=f"ec-{curve}")
    jwk.update(extra)
    return jwk


def ed25519_jwk(**extra: Any) -> Jwk:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    jwk = dict(OKPAlgorithm.to_jwk(pub, as_dict=True))
    jwk.update(kid="ed25519", alg="EdDSA")
    jwk.update(extra)
    return jwk


def ed448_jwk() -> Jwk:
    pub = ed448.Ed448PrivateKey.generate().public_key()
    return {**OKPAlgorithm.to_jwk(pub, as_dict=True), "kid": "ed448"}


def private_rsa_jwk() -> Jwk:
    return {**RSAAlgorithm.to_jwk(_rsa(2048), as_dict=True), "kid": "leaked"}


def private_ec_jwk() -> Jwk:
    return {**ECAlgorithm.to_jwk(_ec("P-256"), as_dict=True), "kid": "leaked-ec"}


def x25519_jwk() -> Jwk:
    raw = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    return {"kty": "OKP", "crv": "X25519", "x": _b64(raw), "kid": "ecdh"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def off_curve_jwk() -> Jwk:
    return {**ec_jwk(), "y": _b64(b"\x01" * 32)}


# -- accepted --------------------------------------------------------------

ACCEPTED: list[tuple[str, Callable[[], Jwk], str, str | None, type[object]]] = [
    ("rsa-2048", lambda: rsa_jwk(2048, alg="RS256"), "RSA", None, rsa.RSAPublicKey),
    ("rsa-4096", lambda: rsa_jwk(4096), "RSA", None, rsa.RSAPublicKey),
    ("rsa-ps256", lambda: rsa_jwk(alg="PS256"), "RSA", None, rsa.RSAPublicKey),
    ("ec-p256", lambda: ec_jwk("P-256"), "EC", "P-256", ec.EllipticCurvePublicKey),
    ("ec-p384", lambda: ec_jwk("P-384"), "EC", "P-384", ec.EllipticCurvePublicKey),
    (
        "ec-p521",
        lambda: ec_jwk("P-521", alg="ES512"),
        "EC",
        "P-521",
        ec.EllipticCurvePublicKey,
    ),
    ("ed25519", ed25519_jwk, "OKP", "Ed25519", ed25519.Ed25519PublicKey),
    ("ed448", ed448_jwk, "OKP", "Ed448", ed448.Ed448PublicKey),
    (
        "keygen-rs256",
        lambda: new_key("RS256").public_jwk,
        "RSA",
        None,
        rsa.RSAPublicKey,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "kty", "crv", "key_type"),
    [case[1:] for case in ACCEPTED],
    ids=[case[0] for case in ACCEPTED],
)
def test_usable_keys_are_parsed_once(
    make: Callable[[], Jwk], kty: str, crv: str | None, key_type: type[object]
) -> None:
    jwk = make()
    keys, skipped = parse_jwks({"keys": [jwk]}, issuer=ISSUER)
    assert skipped == ()
    assert len(keys) == 1
    key = keys[0]
    assert (key.kid, key.kty, key.crv, key.alg) == (
        jwk["kid"],
        kty,
        crv,
        jwk.get("alg"),
    )
    assert isinstance(key.key, key_type)
    assert len(key.thumbprint) == 43


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 section 3.1: the example key and its published thumbprint.
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPF"
            "FxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93"
            "lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZ"
            "Hzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3X"
            "PksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    (key,), _ = parse_jwks({"keys": [jwk]}, issuer=ISSUER)
    assert key.thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# -- skipped -----------------------------------------------------------------

SKIPPED: list[tuple[str, Callable[[], object], str]] = [
    ("oct", lambda: {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, "symmetric key"),
    ("private-rsa", private_rsa_jwk, 'private key material ("d")'),
    ("private-ec", private_ec_jwk, 'private key material ("d")'),
    ("rsa-1024", lambda: rsa_jwk(1024), "RSA key has 1024 bits"),
    ("use-enc", lambda: rsa_jwk(use="enc"), '"use" is "enc"'),
    (
        "key-ops-encrypt",
        lambda: rsa_jwk(key_ops=["encrypt"]),
        '"key_ops" does not include "verify"',
    ),
    ("unknown-kty", lambda: {"kty": "PQC", "kid": "x"}, 'key type "PQC"'),
    ("no-kty", lambda: {"kid": "x", "n": "AQAB"}, '"kty" is missing'),
    ("secp256k1", lambda: ec_jwk("secp256k1"), 'curve "secp256k1"'),
    ("x25519", x25519_jwk, 'curve "X25519"'),
    ("rsa-bad-base64", lambda: rsa_jwk(n="!!not base64!!"), "bad key parameters"),
    ("rsa-n-not-string", lambda: rsa_jwk(n=12345), "bad key parameters"),
    ("rsa-no-e", lambda: {"kty": "RSA", "n": "AQAB", "kid": "x"}, '"n" and "e"'),
    ("ec-short-x", lambda: ec_jwk(x=_b64(b"\x01" * 5)), "bad key parameters"),
    ("ec-off-curve", off_curve_jwk, "bad key parameters"),
    ("ed25519-short", lambda: ed25519_jwk(x=_b64(b"\x01" * 5)), "bad key parameters"),
    ("alg-hs256-on-rsa", lambda: rsa_jwk(alg="HS256"), '"alg" is "HS256"'),
    ("alg-rsa-oaep", lambda: rsa_jwk(alg="RSA-OAEP"), '"alg" is "RSA-OAEP"'),
    ("alg-es384-on-p256", lambda: ec_jwk("P-256", alg="ES384"), "EC P-256 key"),
    ("kid-not-string", lambda: rsa_jwk(kid=7), '"kid" is not a string'),
    ("not-an-object", lambda: "a string", "not a JSON object"),
]


@pytest.mark.parametrize(
    ("make", "reason"),
    [case[1:] for case in SKIPPED],
    ids=[case[0] for case in SKIPPED],
)
def test_unusable_keys_are_skipped_with_a_reason(
    make: Callable[[], object], reason: str
) -> None:
    good = ec_jwk("P-256", kid="good")
    keys, skipped = parse_jwks({"keys": [good, make()]}, issuer=ISSUER)
    assert [k.kid for k in keys] == ["good"]
    assert len(skipped) == 1
    assert skipped[0].startswith("key 1")
    assert reason in skipped[0]


def test_skip_reason_names_the_kid() -> None:
    _, skipped = parse_jwks(
        {"keys": [ec_jwk(), rsa_jwk(use="enc", kid="encryption-1")]}, issuer=ISSUER
    )
    assert skipped[0].startswith('key 1 (kid "encryption-1"): ')


# -- whole document --------------------------------------------------------------

BAD_DOCUMENTS: list[tuple[str, object, str]] = [
    ("list", [rsa_jwk()], 'not a JSON object with a "keys" list'),
    ("no-keys", {"kid": "x"}, 'not a JSON object with a "keys" list'),
    ("keys-not-list", {"keys": {"a": 1}}, 'not a JSON object with a "keys" list'),
    ("empty", {"keys": []}, "no usable signing key (the key set is empty)"),
    (
        "only-unusable",
        {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},
        "no usable signing key (key 0 (no kid): symmetric key",
    ),
]


@pytest.mark.parametrize(
    ("document", "message"),
    [case[1:] for case in BAD_DOCUMENTS],
    ids=[case[0] for case in BAD_DOCUMENTS],
)
def test_unusable_documents_raise(document: object, message: str) -> None:
    with pytest.raises(KeySetError) as caught:
        parse_jwks(document, issuer=ISSUER)
    text = str(caught.value)
    assert text.startswith("jwks: ")
    assert ISSUER in text
    assert message in text


def test_duplicate_kids_are_all_kept() -> None:
    first = rsa_jwk(kid="same")
    second = ec_jwk(kid="same")
    keys, skipped = parse_jwks({"keys": [first, second]}, issuer=ISSUER)
    assert skipped == ()
    assert [(k.kid, k.kty) for k in keys] == [("same", "RSA"), ("same", "EC")]


# -- fits --------------------------------------------------------------------------

FITS: list[tuple[str, Callable[[], Jwk], str, bool]] = [
    ("rsa-rs256", rsa_jwk, "RS256", True),
    ("rsa-ps512", rsa_jwk, "PS512", True),
    ("rsa-es256", rsa_jwk, "ES256", False),
    ("rsa-hs256", rsa_jwk, "HS256", False),
    ("rsa-pinned-rs256-ps256", lambda: rsa_jwk(alg="RS256"), "PS256", False),
    ("rsa-pinned-rs256-rs256", lambda: rsa_jwk(alg="RS256"), "RS256", True),
    ("p256-es256", lambda: ec_jwk("P-256"), "ES256", True),
    ("p256-es384", lambda: ec_jwk("P-256"), "ES384", False),
    ("p521-es512", lambda: ec_jwk("P-521"), "ES512", True),
    ("ed25519-eddsa", ed25519_jwk, "EdDSA", True),
    ("ed25519-rs256", ed25519_jwk, "RS256", False),
    ("ed448-eddsa", ed448_jwk, "EdDSA", True),
]


@pytest.mark.parametrize(
    ("make", "alg", "expected"),
    [case[1:] for case in FITS],
    ids=[case[0] for case in FITS],
)
def test_fits_matches_alg_to_key_type(
    make: Callable[[], Jwk], alg: str, expected: bool
) -> None:
    (key,), _ = parse_jwks({"keys": [make()]}, issuer=ISSUER)
    assert key.fits(alg) is expected


def test_verification_key_is_frozen() -> None:
    (key,), _ = parse_jwks({"keys": [ec_jwk()]}, issuer=ISSUER)
    assert isinstance(key, VerificationKey)
    with pytest.raises(AttributeError):
        key.kid = "other"  # type: ignore[misc]


# -- load_jwks_file ------------------------------------------------------------------


def test_load_jwks_file_reads_keys_and_logs_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk(kid="k1"), rsa_jwk(use="enc")]}))
    with caplog.at_level(logging.WARNING, logger="proxy.jwk"):
        keys = load_jwks_file(path)
    assert [k.kid for k in keys] == ["k1"]
    skips = [r for r in caplog.records if r.getMessage() == "jwks key skipped"]
    assert len(skips) == 1
    assert '"use" is "enc"' in skips[0].reason  # type: ignore[attr-defined]


LOAD_ERRORS: list[tuple[str, bytes | None, str]] = [
    ("missing", None, "cannot read key set file"),
    ("garbage", b"{not json", "is not valid JSON"),
    ("no-usable-key", b'{"keys": []}', "no usable signing key"),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [case[1:] for case in LOAD_ERRORS],
    ids=[case[0] for case in LOAD_ERRORS],
)
def test_load_jwks_file_errors(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeySetError, match=r"^jwks: ") as caught:
        load_jwks_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
