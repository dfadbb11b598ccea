"""JWS parsing and verification: every rule, with real keys and real signatures."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from proxy import errors
from proxy.config import ALLOWED_SIGNING_ALGS, IssuerConfig
from proxy.tokens import peek, verify
from tests.helpers import CLIENT_ID, ISSUER, DictResolver, issuer_config
from tests.keygen import SigningKey, claims_for, new_key, sign, sign_bytes

NOW = time.time()


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_token(header: Any, payload: Any, sig: bytes = b"sig") -> str:
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{b64(h)}.{b64(p)}.{b64(sig)}"


async def run(
    token: str,
    resolver: DictResolver,
    *,
    algs: tuple[str, ...] = ("RS256",),
    audiences: tuple[str, ...] = (CLIENT_ID,),
    now: float = NOW,
    leeway: float = 300,
) -> Any:
    parsed = peek(token, max_bytes=16384)
    cfg = issuer_config(algs=algs, audiences=audiences)
    return await verify(parsed, cfg, resolver, now=now, leeway=leeway)


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return new_key("RS256")


# --- every supported algorithm verifies with a real key -----------------------

ALG_CASES = [
    ("RS256", 2048),
    ("RS256", 4096),
    ("RS384", 2048),
    ("RS512", 2048),
    ("PS256", 2048),
    ("PS384", 2048),
    ("PS512", 2048),
    ("ES256", 0),
    ("ES384", 0),
    ("ES512", 0),
    ("EdDSA", 0),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("alg", "bits"), ALG_CASES, ids=[f"{a}-{b}" for a, b in ALG_CASES]
)
async def test_valid_token_verifies(alg: str, bits: int) -> None:
    key = new_key(alg, bits=bits or 2048)
    token = sign(key, claims_for(ISSUER, CLIENT_ID, now=NOW))
    claims = await run(token, DictResolver(key), algs=(alg,))
    assert claims["sub"] == "00u1alice"
    assert claims["iss"] == ISSUER


async def test_all_allowed_algs_are_asymmetric() -> None:
    assert not {
        a for a in ALLOWED_SIGNING_ALGS if a.startswith("HS") or a.lower() == "none"
    }


# --- algorithm confusion ------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_refused(rsa_key: SigningKey, alg: str) -> None:
    token = raw_token(
        {"alg": alg, "kid": rsa_key.kid}, claims_for(ISSUER, now=NOW), b""
    )
    token = token + "AA"  # a non-empty signature part, so only the alg is wrong
    with pytest.raises(errors.AlgorithmNotAllowed, match="not allowed"):
        await run(token, DictResolver(rsa_key))


async def test_hs256_with_public_key_as_secret_refused(rsa_key: SigningKey) -> None:
    pem = rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": rsa_key.kid, "typ": "JWT"}
    h = b64(json.dumps(header))
    p = b64(json.dumps(claims_for(ISSUER, now=NOW)))
    import hashlib
    import hmac

    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    resolver = DictResolver(rsa_key)
    with pytest.raises(errors.AlgorithmNotAllowed, match='"HS256" is not allowed'):
        await run(f"{h}.{p}.{b64(mac)}", resolver, algs=("RS256", "ES256"))
    assert resolver.refreshes == 0


async def test_alg_outside_issuer_list_refused() -> None:
    key = new_key("RS384")
    token = sign(key, claims_for(ISSUER, now=NOW))
    with pytest.raises(errors.AlgorithmNotAllowed, match="allowed: RS256"):
        await run(token, DictResolver(key), algs=("RS256",))


MISMATCH = [
    ("ES256-on-rsa-key", "RS256", "ES256"),
    ("RS256-on-ec-key", "ES256", "RS256"),
    ("EdDSA-on-rsa-key", "RS256", "EdDSA"),
    ("ES384-on-p256-key", "ES256", "ES384"),
]


@pytest.mark.parametrize(
    ("key_alg", "claimed"), [m[1:] for m in MISMATCH], ids=[m[0] for m in MISMATCH]
)
async def test_key_type_must_fit_alg(key_alg: str, claimed: str) -> None:
    key = new_key(key_alg)
    # Publish the key without an "alg" member so only its type can refuse the token.
    resolver = DictResolver(key)
    resolver.keys = tuple(
        type(k)(
            kid=k.kid,
            kty=k.kty,
            alg=None,
            crv=k.crv,
            key=k.key,
            thumbprint=k.thumbprint,
        )
        for k in resolver.keys
    )
    header = {"alg": claimed, "kid": key.kid}
    token = raw_token(header, claims_for(ISSUER, now=NOW), b"x" * 64)
    with pytest.raises(errors.AlgorithmNotAllowed, match="cannot verify"):
        await run(token, resolver, algs=(claimed,))


async def test_jwk_alg_member_pins_the_algorithm() -> None:
    key = new_key("PS256")
    token = sign(key, claims_for(ISSUER, now=NOW), alg="RS256")
    with pytest.raises(errors.AlgorithmNotAllowed):
        await run(token, DictResolver(key), algs=("RS256", "PS256"))


# --- headers that try to bring their own key ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c"])
async def test_key_bearing_headers_are_ignored(rsa_key: SigningKey, name: str) -> None:
    attacker = new_key("RS256", kid=rsa_key.kid)
    value: Any = {
        "jku": "https://attacker.invalid/jwks",
        "x5u": "https://attacker.invalid/cert.pem",
        "jwk": attacker.public_jwk,
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }[name]
    good = sign(rsa_key, claims_for(ISSUER, now=NOW), headers={name: value})
    assert (await run(good, DictResolver(rsa_key)))["sub"] == "00u1alice"
    forged = sign(attacker, claims_for(ISSUER, now=NOW), headers={name: value})
    resolver = DictResolver(rsa_key)
    with pytest.raises(errors.SignatureInvalid):
        await run(forged, resolver)
    assert resolver.refreshes == 0


async def test_crit_header_refused(rsa_key: SigningKey) -> None:
    token = sign(
        rsa_key, claims_for(ISSUER, now=NOW), headers={"crit": ["exp"], "exp": 1}
    )
    with pytest.raises(errors.MalformedToken, match="crit"):
        await run(token, DictResolver(rsa_key))


# --- malformed input ----------------------------------------------------------

STR_PAYLOAD = '"x"'
DUP_PAYLOAD = '{"iss":"a","iss":"b"}'
NAN_PAYLOAD = '{"exp":NaN}'
INF_PAYLOAD = '{"exp":Infinity}'

MALFORMED = [
    ("two-parts", "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0", "3 dot-separated"),
    ("jwe-five-parts", "a.b.c.d.e", "JWE"),
    ("empty-signature", "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.", "non-empty"),
    ("padding", "eyJhbGciOiJSUzI1NiJ9=.eyJpc3MiOiJ4In0.AA", "base64url"),
    ("std-alphabet", "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.a+/b", "base64url"),
    ("space", "eyJhbGciOiJSUzI1NiJ9 .eyJpc3MiOiJ4In0.AA", "base64url"),
    ("impossible-length", "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.A", "base64url"),
    (
        "header-not-json",
        f"{b64('not json')}.{b64('{}')}.AA",
        "header is not valid JSON",
    ),
    ("header-array", f"{b64('[1]')}.{b64('{}')}.AA", "expected an object"),
    ("payload-array", f"{b64('{}')}.{b64('[]')}.AA", "payload is a JSON list"),
    ("payload-string", f"{b64('{}')}.{b64(STR_PAYLOAD)}.AA", "payload is a JSON str"),
    ("payload-null", f"{b64('{}')}.{b64('null')}.AA", "expected an object"),
    ("duplicate-claim", f"{b64('{}')}.{b64(DUP_PAYLOAD)}.AA", "duplicate"),
    ("nan", f"{b64('{}')}.{b64(NAN_PAYLOAD)}.AA", "not a JSON number"),
    ("infinity", f"{b64('{}')}.{b64(INF_PAYLOAD)}.AA", "not a JSON number"),
    ("not-utf8", f"{b64('{}')}.{b64(bytes([0xFF, 0xFE]))}.AA", "not valid JSON"),
]


@pytest.mark.parametrize(
    ("token", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_tokens(token: str, message: str) -> None:
    with pytest.raises(errors.MalformedToken, match=message):
        peek(token, max_bytes=16384)


def test_oversized_token_refused_before_decoding() -> None:
    with pytest.raises(errors.MalformedToken, match="larger than the 100-byte limit"):
        peek("a" * 101, max_bytes=100)


def test_error_messages_never_contain_the_token(rsa_key: SigningKey) -> None:
    token = sign(rsa_key, claims_for(ISSUER, now=NOW))
    for bad in (token + ".x", token[:-3] + "=AA", token.replace(".", "..", 1)):
        with pytest.raises(errors.MalformedToken) as info:
            peek(bad, max_bytes=16384)
        for part in bad.split("."):
            if len(part) > 8:
                assert part not in str(info.value)


# --- keys and signatures ----------------------------------------------------------


async def test_tampered_payload_fails_signature(rsa_key: SigningKey) -> None:
    token = sign(rsa_key, claims_for(ISSUER, now=NOW))
    h, _, s = token.split(".")
    evil = b64(json.dumps(claims_for(ISSUER, now=NOW, sub="admin")))
    with pytest.raises(errors.SignatureInvalid, match=rsa_key.kid):
        await run(f"{h}.{evil}.{s}", DictResolver(rsa_key))


async def test_ec_signature_of_wrong_length_fails() -> None:
    key = new_key("ES256")
    token = sign(key, claims_for(ISSUER, now=NOW))
    h, p, s = token.split(".")
    with pytest.raises(errors.SignatureInvalid):
        await run(f"{h}.{p}.{s}AAAA", DictResolver(key), algs=("ES256",))


async def test_unknown_kid_asks_the_resolver_once(rsa_key: SigningKey) -> None:
    other = new_key("RS256")
    resolver = DictResolver(rsa_key)
    with pytest.raises(errors.UnknownKeyId, match=other.kid) as info:
        await run(sign(other, claims_for(ISSUER, now=NOW)), resolver)
    assert resolver.refreshes == 1
    assert info.value.kid == other.kid


async def test_rotated_key_found_after_refresh(rsa_key: SigningKey) -> None:
    new = new_key("RS256")
    resolver = DictResolver(rsa_key)
    resolver.publish_on_refresh(new, rsa_key)
    claims = await run(sign(new, claims_for(ISSUER, now=NOW)), resolver)
    assert claims["sub"] == "00u1alice"
    assert resolver.refreshes == 1


async def test_keys_not_loaded_is_temporary(rsa_key: SigningKey) -> None:
    with pytest.raises(errors.KeysUnavailable) as info:
        await run(sign(rsa_key, claims_for(ISSUER, now=NOW)), DictResolver(ready=False))
    assert info.value.temporary


async def test_token_without_kid_tries_every_key(rsa_key: SigningKey) -> None:
    other = new_key("RS256")
    token = jwt.encode(
        claims_for(ISSUER, now=NOW), rsa_key.private_key, algorithm="RS256"
    )
    assert (await run(token, DictResolver(other, rsa_key)))["sub"] == "00u1alice"


# --- registered claims --------------------------------------------------------------

CLAIM_CASES: list[tuple[str, dict[str, Any], type[errors.TokenError], str]] = [
    ("exp-missing", {"exp": None}, errors.MissingClaim, '"exp" is missing'),
    ("expired", {"exp": NOW - 5}, errors.TokenExpired, "expired"),
    ("expired-a-second-ago", {"exp": NOW - 1}, errors.TokenExpired, "expired"),
    ("exp-string", {"exp": str(int(NOW) + 60)}, errors.InvalidClaim, "NumericDate"),
    ("exp-bool", {"exp": True}, errors.InvalidClaim, "NumericDate"),
    ("exp-huge", {"exp": 10**30}, errors.InvalidClaim, "out of range"),
    ("exp-enormous-int", {"exp": 10**400}, errors.InvalidClaim, "out of range"),
    ("exp-negative", {"exp": -1}, errors.TokenExpired, "expired"),
    ("nbf-future", {"nbf": NOW + 600}, errors.TokenNotYetValid, '"nbf" is'),
    ("nbf-string", {"nbf": "soon"}, errors.InvalidClaim, '"nbf"'),
    ("nbf-beyond-five-minutes", {"nbf": NOW + 301}, errors.TokenNotYetValid, "300s"),
    ("iat-string", {"iat": "0"}, errors.InvalidClaim, '"iat"'),
    ("aud-missing", {"aud": None}, errors.MissingClaim, '"aud" is missing'),
    (
        "aud-other",
        {"aud": "other-client"},
        errors.AudienceMismatch,
        'expected one of \\["kubernetes"\\], got \\["other-client"\\]',
    ),
    (
        "aud-list-other",
        {"aud": ["a", "b"]},
        errors.AudienceMismatch,
        'got \\["a", "b"\\]',
    ),
    ("aud-int", {"aud": 5}, errors.InvalidClaim, '"aud" must be'),
    (
        "aud-mixed-list",
        {"aud": ["kubernetes", 5]},
        errors.InvalidClaim,
        '"aud" must be',
    ),
    ("iss-trailing-slash", {"iss": ISSUER + "/"}, errors.IssuerMismatch, "expected"),
    ("iss-case", {"iss": ISSUER.upper()}, errors.IssuerMismatch, "expected"),
]


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [c[1:] for c in CLAIM_CASES],
    ids=[c[0] for c in CLAIM_CASES],
)
async def test_registered_claims(
    rsa_key: SigningKey, override: dict[str, Any], error: type[Exception], message: str
) -> None:
    claims = claims_for(ISSUER, CLIENT_ID, now=NOW)
    for k, v in override.items():
        if v is None:
            claims.pop(k)
        else:
            claims[k] = v
    with pytest.raises(error, match=message):
        await run(sign(rsa_key, claims), DictResolver(rsa_key))


ACCEPTED = [
    ("aud-in-list", {"aud": ["other", CLIENT_ID]}),
    ("nbf-within-leeway", {"nbf": NOW + 30}),
    ("nbf-within-five-minutes", {"nbf": NOW + 299}),
    ("iat-within-leeway", {"iat": NOW + 30}),
    ("iat-far-future-is-not-checked", {"iat": NOW + 86400}),
    ("exp-equals-now", {"exp": NOW}),
    ("no-nbf-no-iat", {"nbf": None, "iat": None}),
    ("exp-float", {"exp": NOW + 60.5}),
]


@pytest.mark.parametrize(
    "override", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED]
)
async def test_accepted_claim_shapes(
    rsa_key: SigningKey, override: dict[str, Any]
) -> None:
    claims = claims_for(ISSUER, CLIENT_ID, now=NOW)
    for k, v in override.items():
        if v is None:
            claims.pop(k)
        else:
            claims[k] = v
    assert (await run(sign(rsa_key, claims), DictResolver(rsa_key)))[
        "sub"
    ] == "00u1alice"


async def test_match_any_of_several_audiences(rsa_key: SigningKey) -> None:
    token = sign(rsa_key, claims_for(ISSUER, "api://default", now=NOW))
    claims = await run(
        token, DictResolver(rsa_key), audiences=(CLIENT_ID, "api://default")
    )
    assert claims["aud"] == "api://default"


# --- issue 20: one textual form per token, go-oidc's claim rules -------------------


def _split(token: str) -> tuple[str, str, bytes]:
    h, p, s = token.split(".")
    return h, p, base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _signed_with_leading_zero(key: SigningKey) -> str:
    """A real token whose RSA signature starts with a zero byte (1 in 256)."""
    for n in range(20_000):
        token = sign(key, claims_for(ISSUER, CLIENT_ID, now=NOW, jti=str(n)))
        if _split(token)[2][0] == 0:
            return token
    raise AssertionError("no signature with a leading zero byte")  # pragma: no cover


@pytest.mark.parametrize("alg", ["RS256", "PS256"], ids=["rs256", "ps256"])
async def test_rsa_signature_must_be_exactly_the_modulus_length(alg: str) -> None:
    key = new_key(alg)
    token = _signed_with_leading_zero(key)
    resolver = DictResolver(key)
    assert (await run(token, resolver, algs=(alg,)))["sub"] == "00u1alice"
    h, p, sig = _split(token)
    for other in (sig[1:], b"\x00" + sig):
        with pytest.raises(errors.SignatureInvalid):
            await run(f"{h}.{p}.{b64(other)}", resolver, algs=(alg,))


def _with_payload(claims: str, key: SigningKey) -> str:
    return sign_bytes(key, claims.encode())


NULL_DATE_CASES = [
    ("iat-null-refused", '"iat": null', errors.InvalidClaim, '"iat".*null'),
    ("exp-null-refused", '"exp": null', errors.InvalidClaim, '"exp".*null'),
    ("nbf-null-is-absent", '"nbf": null', None, ""),
]


@pytest.mark.parametrize(
    ("member", "error", "message"),
    [c[1:] for c in NULL_DATE_CASES],
    ids=[c[0] for c in NULL_DATE_CASES],
)
async def test_null_dates_as_go_decodes_them(
    rsa_key: SigningKey,
    member: str,
    error: type[errors.TokenError] | None,
    message: str,
) -> None:
    claims = claims_for(ISSUER, CLIENT_ID, now=NOW)
    name = member.split('"')[1]
    claims.pop(name)
    if name != "exp":
        claims.setdefault("exp", int(NOW) + 3600)
    text = json.dumps(claims)[:-1] + ", " + member + "}"
    token = _with_payload(text, rsa_key)
    if error is None:
        assert (await run(token, DictResolver(rsa_key)))["sub"] == "00u1alice"
    else:
        with pytest.raises(error, match=message):
            await run(token, DictResolver(rsa_key))


async def test_empty_kid_is_no_kid_and_tries_every_key(rsa_key: SigningKey) -> None:
    other = new_key("RS256")
    token = sign(rsa_key, claims_for(ISSUER, now=NOW), headers={"kid": ""})
    resolver = DictResolver(other, rsa_key)
    assert (await run(token, resolver))["sub"] == "00u1alice"
    assert resolver.refreshes == 0


GOOGLE = "https://accounts.google.com"
GOOGLE_CASES = [
    ("google-legacy-iss-accepted", GOOGLE, "accounts.google.com", None),
    ("google-iss-accepted", GOOGLE, GOOGLE, None),
    ("other-issuer-no-alias", ISSUER, ISSUER.removeprefix("https://"), "mismatch"),
    ("google-slash-no-alias", GOOGLE + "/", "accounts.google.com", "mismatch"),
]


@pytest.mark.parametrize(
    ("url", "iss", "error"),
    [c[1:] for c in GOOGLE_CASES],
    ids=[c[0] for c in GOOGLE_CASES],
)
async def test_legacy_google_issuer_only_for_google(
    rsa_key: SigningKey, url: str, iss: str, error: str | None
) -> None:
    token = sign(rsa_key, claims_for(iss, CLIENT_ID, now=NOW))
    parsed = peek(token, max_bytes=16384)
    cfg = IssuerConfig(url=url, audiences=(CLIENT_ID,))
    if error is None:
        assert parsed.unverified_issuer == url
        claims = await verify(parsed, cfg, DictResolver(rsa_key), now=NOW, leeway=300)
        assert claims["iss"] == iss
    else:
        with pytest.raises(errors.IssuerMismatch):
            await verify(parsed, cfg, DictResolver(rsa_key), now=NOW, leeway=300)


async def test_clock_skew_governs_nbf_only(rsa_key: SigningKey) -> None:
    ahead = sign(rsa_key, claims_for(ISSUER, CLIENT_ID, now=NOW + 200))
    expired = sign(
        rsa_key, claims_for(ISSUER, CLIENT_ID, now=NOW - 3700, lifetime=3600)
    )
    assert (await run(ahead, DictResolver(rsa_key), leeway=300))["sub"]
    with pytest.raises(errors.TokenNotYetValid, match="allowed clock skew 60s"):
        await run(ahead, DictResolver(rsa_key), leeway=60)
    with pytest.raises(errors.TokenExpired):
        await run(expired, DictResolver(rsa_key), leeway=3600)
