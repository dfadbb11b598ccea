"""Property-based: random and mutated tokens only ever yield a user, None or a TokenError."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.authn import Authenticator
from proxy.errors import TokenError
from proxy.kube import UserInfo
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import claims_for, new_key, sign, sign_bytes

KEY = new_key("RS256")
GOOD = sign(
    KEY, claims_for(ISSUER, "kubernetes", lifetime=10 * 365 * 86400, groups=["g"])
)
PROFILE = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def make_auth() -> Authenticator:
    return Authenticator(auth_config(), {ISSUER: DictResolver(KEY)})


def outcome(auth: Authenticator, token: str) -> object:
    async def run() -> object:
        try:
            return await auth.authenticate(token)
        except TokenError as err:
            return err

    return asyncio.run(run())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.slow
@PROFILE
@given(st.text(max_size=400))
def test_random_text_is_refused_with_a_typed_error(token: str) -> None:
    result = outcome(make_auth(), token)
    assert result is None or isinstance(result, TokenError)


@pytest.mark.slow
@PROFILE
@given(
    st.integers(min_value=0, max_value=len(GOOD) - 1),
    st.sampled_from("AZaz09-_.=+/ \x00é"),
)
def test_single_character_mutation_never_authenticates_a_changed_token(
    pos: int, char: str
) -> None:
    mutated = GOOD[:pos] + char + GOOD[pos + 1 :]
    result = outcome(make_auth(), mutated)
    if mutated == GOOD:
        assert isinstance(result, UserInfo)
        return
    # One token, one text: even a change that decodes to the same bytes (the
    # unused bits of base64url's last character) is refused (issue 20).
    assert result is None or isinstance(result, TokenError), result


#: The claims the engine reads itself: their values reach typed code, which a
#: compiled build (mypyc) checks at run time, so each must fail typed.
STANDARD_CLAIMS = [
    "iss",
    "aud",
    "exp",
    "nbf",
    "iat",
    "sub",
    "groups",
    "jti",
    "email",
    "email_verified",
    "preferred_username",
]


@pytest.mark.slow
@PROFILE
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "jku", "jwk", "x5c"]),
        json_values,
        max_size=5,
    ),
    claims=st.dictionaries(st.sampled_from(STANDARD_CLAIMS), json_values, max_size=10),
    sig=st.binary(max_size=300),
)
def test_arbitrary_headers_and_claims_never_escape_the_error_tree(
    header: dict[str, Any], claims: dict[str, Any], sig: bytes
) -> None:
    if "iss" not in claims:
        claims["iss"] = ISSUER
    token = ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(sig)]
    )
    result = outcome(make_auth(), token)
    assert result is None or isinstance(result, TokenError), result


@pytest.mark.slow
@PROFILE
@given(claims=st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_validly_signed_arbitrary_claims_map_or_fail_typed(
    claims: dict[str, Any],
) -> None:
    base = claims_for(ISSUER, "kubernetes")
    base.update({k: v for k, v in claims.items() if k not in ("iss", "aud", "exp")})
    token = sign(KEY, base)
    result = outcome(make_auth(), token)
    assert isinstance(result, UserInfo | TokenError), result


@pytest.mark.slow
@PROFILE
@given(claims=st.dictionaries(st.sampled_from(STANDARD_CLAIMS), json_values))
def test_any_value_of_a_standard_claim_maps_or_fails_typed(
    claims: dict[str, Any],
) -> None:
    base = claims_for(ISSUER, "kubernetes")
    base.update(claims)
    result = outcome(make_auth(), sign_bytes(KEY, json.dumps(base).encode()))
    assert isinstance(result, UserInfo | TokenError | None), result


# --- one textual form per token (issue 20) -------------------------------------------

FORM_ALGS = ("RS256", "PS256", "ES256")
FORM_KEYS = {alg: new_key(alg) for alg in FORM_ALGS}
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _form_auth() -> Authenticator:
    return Authenticator(
        auth_config(authenticator_config(algs=FORM_ALGS)),
        {ISSUER: DictResolver(*FORM_KEYS.values())},
    )


def _form_token(alg: str, n: int) -> str:
    claims = claims_for(ISSUER, "kubernetes", lifetime=10 * 365 * 86400, jti=str(n))
    return sign(FORM_KEYS[alg], claims)


def _mutate(token: str, kind: str, part: int, n: int) -> str:
    parts = token.split(".")
    text = parts[part]
    if kind == "padding":
        parts[part] = text + "=" * (1 + n % 2)
    elif kind == "trailing-bits":
        index = _ALPHABET.index(text[-1])
        unused = (0, 0, 0x0F, 0x03)[len(text) % 4]
        parts[part] = text[:-1] + _ALPHABET[index ^ (unused & (1 + n % 15)) or index]
    elif kind == "standard-alphabet":
        parts[part] = text.replace("-", "+").replace("_", "/")
    elif kind == "signature-length":
        sig = base64.urlsafe_b64decode(parts[2] + "==")
        sig = sig[1:] if sig[:1] == b"\x00" else b"\x00" + sig
        parts[2] = b64(sig)
    elif kind == "header-reencoded":
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=="))
        parts[0] = b64(json.dumps(header, indent=n % 3, sort_keys=True).encode())
    return ".".join(parts)


@pytest.mark.slow
@PROFILE
@given(
    alg=st.sampled_from(FORM_ALGS),
    n=st.integers(min_value=0, max_value=40),
    kind=st.sampled_from(
        [
            "padding",
            "trailing-bits",
            "standard-alphabet",
            "signature-length",
            "header-reencoded",
        ]
    ),
    part=st.integers(min_value=0, max_value=2),
)
def test_every_token_has_one_textual_form(
    alg: str, n: int, kind: str, part: int
) -> None:
    token = _form_token(alg, n)
    mutated = _mutate(token, kind, part, n)
    auth = _form_auth()
    assert isinstance(outcome(auth, token), UserInfo)
    if mutated != token:
        result = outcome(auth, mutated)
        assert result is None or isinstance(result, TokenError), (kind, result)


@pytest.mark.slow
@PROFILE
@given(alg=st.sampled_from(FORM_ALGS), indent=st.integers(0, 3), keys=st.booleans())
def test_other_header_encodings_are_other_tokens_that_verify_on_their_own(
    alg: str, indent: int, keys: bool
) -> None:
    key = FORM_KEYS[alg]
    header = {"alg": alg, "kid": key.kid, "typ": "JWT"}
    text = json.dumps(header, indent=indent, sort_keys=keys).encode()
    payload = json.dumps(
        claims_for(ISSUER, "kubernetes", lifetime=10 * 365 * 86400)
    ).encode()
    signing_input = b64(text) + "." + b64(payload)
    sig = jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key.private_key)
    token = signing_input + "." + b64(sig)
    assert isinstance(outcome(_form_auth(), token), UserInfo)
