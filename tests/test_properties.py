"""Property-based: random and mutated tokens only ever yield a user, None or a TokenError."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.authn import Authenticator
from proxy.errors import TokenError
from proxy.kube import UserInfo
from tests.helpers import ISSUER, DictResolver, auth_config
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


@PROFILE
@given(st.text(max_size=400))
def test_random_text_is_refused_with_a_typed_error(token: str) -> None:
    result = outcome(make_auth(), token)
    assert result is None or isinstance(result, TokenError)


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
    # base64url's last character can carry unused bits: a change there may decode
    # to the very same bytes, and then the token is (rightly) still valid.
    if isinstance(result, UserInfo):
        assert [base64.urlsafe_b64decode(p + "==") for p in mutated.split(".")] == [
            base64.urlsafe_b64decode(p + "==") for p in GOOD.split(".")
        ]
    else:
        assert result is None or isinstance(result, TokenError)


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


@PROFILE
@given(claims=st.dictionaries(st.sampled_from(STANDARD_CLAIMS), json_values))
def test_any_value_of_a_standard_claim_maps_or_fails_typed(
    claims: dict[str, Any],
) -> None:
    base = claims_for(ISSUER, "kubernetes")
    base.update(claims)
    result = outcome(make_auth(), sign_bytes(KEY, json.dumps(base).encode()))
    assert isinstance(result, UserInfo | TokenError | None), result
