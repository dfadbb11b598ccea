"""The hostile token corpus: every case an attacker or a broken client may send.

Each case is a token and the reason code it must be refused with (``not_mine``
for tokens that name no configured issuer nor one on its host;
``issuer_mismatch`` for a near miss: a slash or case apart). The same corpus runs against
``check-token``, the engine, the webhook and the proxy, so a defence proven in
one place is proven in all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.keygen import SigningKey, claims_for, new_key, sign, sign_bytes

AUDIENCE = "kubernetes"
#: The allowlist the corpus's issuer is configured with (RS, PS and ES, so that a
#: type mismatch between key and alg is a real possibility, not an alg refusal).
ALGS = ("RS256", "PS256", "ES256")


@dataclass(frozen=True)
class Case:
    name: str
    token: str
    reason: str


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _raw(
    header: dict[str, Any], payload: bytes | str, sig: bytes = b"\x01" * 256
) -> str:
    return f"{_b64(json.dumps(header))}.{_b64(payload)}.{_b64(sig)}"


def corpus(issuer: str, key: SigningKey) -> list[Case]:
    """Build the corpus for ``issuer``, whose published signing key is ``key`` (RS256)."""
    good = claims_for(issuer, AUDIENCE, groups=["naxslabs-admins"])
    attacker = new_key("RS256", kid=key.kid)
    ec_attacker = new_key("ES256")
    cases: list[Case] = []

    def add(name: str, token: str, reason: str) -> None:
        cases.append(Case(name, token, reason))

    def claims(**overrides: Any) -> dict[str, Any]:
        out = dict(good)
        for k, v in overrides.items():
            if v is ...:
                out.pop(k, None)
            else:
                out[k] = v
        return out

    payload = json.dumps(good)
    for alg in ("none", "None", "NONE", "nOnE"):
        add(
            f"alg-{alg}",
            _raw({"alg": alg, "kid": key.kid}, payload, b"x"),
            "alg_not_allowed",
        )

    pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h, p = _b64(json.dumps({"alg": "HS256", "kid": key.kid})), _b64(payload)
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    add("hs256-with-public-key-as-secret", f"{h}.{p}.{_b64(mac)}", "alg_not_allowed")

    es_on_rsa = _raw({"alg": "ES256", "kid": key.kid}, payload, b"\x02" * 64)
    add("es256-header-on-rsa-key", es_on_rsa, "alg_not_allowed")
    add("ps256-header-on-rs256-key", sign(key, good, alg="PS256"), "alg_not_allowed")

    add(
        "kid-absent-foreign-signature",
        sign(attacker, good, headers={"kid": None}),
        "bad_signature",
    )
    add("kid-unknown", sign(new_key("RS256"), good), "unknown_kid")
    add(
        "kid-path-like",
        sign(attacker, good, headers={"kid": "../../../../etc/passwd"}),
        "unknown_kid",
    )
    add("kid-huge", sign(attacker, good, headers={"kid": "k" * 8000}), "unknown_kid")
    add("kid-not-a-string", _raw({"alg": "RS256", "kid": 7}, payload), "malformed")

    for header in ("jku", "x5u"):
        add(
            f"{header}-elsewhere",
            sign(attacker, good, headers={header: "https://attacker.invalid/keys"}),
            "bad_signature",
        )
    add(
        "jwk-embedded",
        sign(attacker, good, headers={"jwk": attacker.public_jwk}),
        "bad_signature",
    )
    add(
        "x5c-embedded",
        sign(attacker, good, headers={"x5c": ["MIIBIjANBgkq"]}),
        "bad_signature",
    )
    add(
        "ec-key-embedded-as-jwk",
        sign(ec_attacker, good, headers={"jwk": ec_attacker.public_jwk}),
        "unknown_kid",
    )

    add(
        "crit-unknown",
        sign(key, good, headers={"crit": ["exp"], "exp": 1}),
        "malformed",
    )
    add("jwe-five-parts", "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "malformed")
    inner = sign(key, good)
    add(
        "nested-jwt",
        sign_bytes(key, inner.encode(), headers={"cty": "JWT"}),
        "malformed",
    )
    add("bad-base64", inner[:20] + "*" + inner[21:], "malformed")
    add("padded-base64", inner.replace(".", "=.", 1), "malformed")
    dup = payload[:-1] + f', "sub": "admin", "iss": "{issuer}"' + "}"
    add("duplicate-json-keys", sign_bytes(key, dup.encode()), "malformed")
    for name, body in (
        ("array", "[1,2]"),
        ("string", '"x"'),
        ("number", "42"),
        ("null", "null"),
    ):
        add(f"payload-{name}", sign_bytes(key, body.encode()), "malformed")
    add("header-not-object", f"{_b64('[]')}.{_b64(payload)}.{_b64(b'x')}", "malformed")
    add("one-megabyte", "a" * (1024 * 1024), "malformed")
    add("empty-parts", "..", "malformed")

    add("exp-string", sign(key, claims(exp="9999999999")), "claim_invalid")
    add("exp-huge", sign(key, claims(exp=10**20)), "claim_invalid")
    add("exp-negative", sign(key, claims(exp=-1)), "expired")
    add("exp-missing", sign(key, claims(exp=...)), "claim_missing")
    add("exp-bool", sign(key, claims(exp=True)), "claim_invalid")
    add("nbf-string", sign(key, claims(nbf="0")), "claim_invalid")
    add("nbf-future", sign(key, claims(nbf=good["iat"] + 86400)), "not_yet_valid")
    # go-oidc never compares iat with the clock; only its type (issue 20).
    add("iat-float-future", sign(key, claims(iat=good["iat"] + 86400.5)), "ok")
    add("iat-string", sign(key, claims(iat="0")), "claim_invalid")
    add("aud-number", sign(key, claims(aud=5)), "claim_invalid")
    add("aud-object", sign(key, claims(aud={"a": 1})), "claim_invalid")
    add("aud-other", sign(key, claims(aud=["someone-else"])), "audience_mismatch")
    add("aud-missing", sign(key, claims(aud=...)), "claim_missing")
    add("iss-trailing-slash", sign(key, claims(iss=issuer + "/")), "issuer_mismatch")
    add("iss-other-case", sign(key, claims(iss=issuer.upper())), "issuer_mismatch")
    add("groups-mixed-types", sign(key, claims(groups=["a", 1, None])), "claim_invalid")
    add("groups-thousands", sign(key, claims(groups=["g"] * 1100)), "claim_invalid")
    add("sub-number", sign(key, claims(sub=12345)), "claim_invalid")
    # kube-apiserver keeps "" (the user is "<issuer>#"): issue 20.
    add("sub-empty", sign(key, claims(sub="")), "ok")
    add("sub-missing", sign(key, claims(sub=...)), "claim_missing")
    add("long-claim-within-size-limit", sign(key, claims(sub="u" * 8000)), "ok")
    add("long-claim-over-size-limit", sign(key, claims(sub="u" * 13000)), "malformed")
    return cases
