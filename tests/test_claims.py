"""Claim mapping, table-driven, with kube-apiserver's semantics."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import errors
from proxy.cel import compile_expression
from proxy.claims import CREDENTIAL_ID_EXTRA, map_claims
from proxy.config import (
    ClaimMappings,
    ClaimOrExpression,
    ClaimValidationRule,
    ExtraMapping,
    PrefixedClaimOrExpression,
    UserValidationRule,
)
from tests.helpers import ISSUER, authenticator_config

BASE = {"iss": ISSUER, "sub": "00u1alice", "aud": "kubernetes", "exp": 2**31}


def mapping(
    username: PrefixedClaimOrExpression | None = None,
    groups: PrefixedClaimOrExpression | None = None,
    uid: ClaimOrExpression | None = None,
    extra: tuple[ExtraMapping, ...] = (),
) -> ClaimMappings:
    return ClaimMappings(
        username=username or PrefixedClaimOrExpression(claim="sub", prefix=""),
        groups=groups,
        uid=uid,
        extra=extra,
    )


def claim(name: str, prefix: str | None = "") -> PrefixedClaimOrExpression:
    return PrefixedClaimOrExpression(claim=name, prefix=prefix)


def expr(source: str, path: str = "jwt[0].claimMappings.username.expression") -> Any:
    return compile_expression(source, variables=("claims",), field_path=path)


USERNAME_OK = [
    # kube-apiserver keeps an empty value the mapping produced (issue 20).
    ("claim-empty-kept", claim("sub"), {"sub": ""}, ""),
    ("claim-empty-with-prefix", claim("sub", "oidc:"), {"sub": ""}, "oidc:"),
    (
        "expression-empty-kept",
        PrefixedClaimOrExpression(expression=expr("claims.username")),
        {"username": ""},
        "",
    ),
    ("sub-with-issuer-prefix", claim("sub", f"{ISSUER}#"), {}, f"{ISSUER}#00u1alice"),
    ("sub-no-prefix", claim("sub", None), {}, "00u1alice"),
    (
        "email-verified",
        claim("email"),
        {"email": "a@x.io", "email_verified": True},
        "a@x.io",
    ),
    ("email-no-verified-claim", claim("email"), {"email": "a@x.io"}, "a@x.io"),
    (
        "preferred-username",
        claim("preferred_username", "oidc:"),
        {"preferred_username": "alice"},
        "oidc:alice",
    ),
]


@pytest.mark.parametrize(
    ("m", "extra", "want"),
    [c[1:] for c in USERNAME_OK],
    ids=[c[0] for c in USERNAME_OK],
)
def test_username(
    m: PrefixedClaimOrExpression, extra: dict[str, Any], want: str
) -> None:
    user = map_claims(
        authenticator_config(mappings=mapping(username=m)), {**BASE, **extra}
    )
    assert user.username == want


USERNAME_BAD: list[
    tuple[str, PrefixedClaimOrExpression, dict[str, Any], type[Exception], str]
] = [
    (
        "claim-missing",
        claim("email"),
        {},
        errors.MissingClaim,
        'username claim "email" is not present',
    ),
    (
        "claim-not-string",
        claim("sub"),
        {"sub": 42},
        errors.InvalidClaim,
        "must be a string, got int",
    ),
    (
        "email-unverified",
        claim("email"),
        {"email": "a@x.io", "email_verified": False},
        errors.InvalidClaim,
        '"email_verified" is false',
    ),
    (
        "email-verified-string",
        claim("email"),
        {"email": "a@x.io", "email_verified": "true"},
        errors.InvalidClaim,
        "must be a boolean",
    ),
]


@pytest.mark.parametrize(
    ("m", "extra", "error", "message"),
    [c[1:] for c in USERNAME_BAD],
    ids=[c[0] for c in USERNAME_BAD],
)
def test_username_refusals(
    m: PrefixedClaimOrExpression,
    extra: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        map_claims(
            authenticator_config(mappings=mapping(username=m)), {**BASE, **extra}
        )


GROUPS = [
    ("list", {"groups": ["naxslabs-admins", "dev"]}, "", ("naxslabs-admins", "dev")),
    ("string", {"groups": "naxslabs-admins"}, "", ("naxslabs-admins",)),
    ("prefixed", {"groups": ["a", "b"]}, "oidc:", ("oidc:a", "oidc:b")),
    ("absent", {}, "oidc:", ()),
    ("null", {"groups": None}, "", ()),
    ("empty-string", {"groups": ""}, "", ()),
    ("empty-list", {"groups": []}, "", ()),
]


@pytest.mark.parametrize(
    ("extra", "prefix", "want"), [g[1:] for g in GROUPS], ids=[g[0] for g in GROUPS]
)
def test_groups(extra: dict[str, Any], prefix: str, want: tuple[str, ...]) -> None:
    cfg = authenticator_config(mappings=mapping(groups=claim("groups", prefix)))
    assert map_claims(cfg, {**BASE, **extra}).groups == want


@pytest.mark.parametrize(
    "value",
    [["a", 1], 5, {"a": 1}, [["nested"]], True],
    ids=["mixed", "int", "object", "nested", "bool"],
)
def test_groups_of_wrong_type_refused(value: Any) -> None:
    cfg = authenticator_config(mappings=mapping(groups=claim("groups")))
    with pytest.raises(
        errors.InvalidClaim, match='groups claim "groups" must be a string or a list'
    ):
        map_claims(cfg, {**BASE, "groups": value})


def test_uid_from_claim_and_missing() -> None:
    cfg = authenticator_config(mappings=mapping(uid=ClaimOrExpression(claim="uid")))
    assert map_claims(cfg, {**BASE, "uid": "00u1"}).uid == "00u1"
    with pytest.raises(errors.MissingClaim, match='uid claim "uid" is not present'):
        map_claims(cfg, BASE)
    with pytest.raises(errors.InvalidClaim, match="must be a string"):
        map_claims(cfg, {**BASE, "uid": 7})


def test_jti_becomes_credential_id() -> None:
    user = map_claims(authenticator_config(mappings=mapping()), {**BASE, "jti": "abc"})
    assert user.extra[CREDENTIAL_ID_EXTRA] == ("JTI=abc",)
    assert (
        CREDENTIAL_ID_EXTRA
        not in map_claims(authenticator_config(mappings=mapping()), BASE).extra
    )


REQUIRED = [
    ("ok", {"hd": "example.com"}, None, ""),
    ("missing", {}, errors.MissingClaim, 'required claim "hd" is not present'),
    (
        "wrong-value",
        {"hd": "evil.com"},
        errors.ClaimRuleFailed,
        "expected 'example.com', got 'evil.com'",
    ),
    ("not-string", {"hd": ["example.com"]}, errors.ClaimRuleFailed, "must be a string"),
]


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [r[1:] for r in REQUIRED],
    ids=[r[0] for r in REQUIRED],
)
def test_required_claims(
    extra: dict[str, Any], error: type[Exception] | None, message: str
) -> None:
    cfg = authenticator_config(
        mappings=mapping(),
        claim_validation_rules=(
            ClaimValidationRule(claim="hd", required_value="example.com"),
        ),
    )
    if error is None:
        assert map_claims(cfg, {**BASE, **extra}).username == "00u1alice"
    else:
        with pytest.raises(error, match=message):
            map_claims(cfg, {**BASE, **extra})


# --- CEL-driven mappings and rules (the examples of the Kubernetes documentation) ------------


def test_cel_username_groups_uid_extra() -> None:
    cfg = authenticator_config(
        mappings=mapping(
            username=PrefixedClaimOrExpression(
                expression=expr('claims.username + ":external-user"')
            ),
            groups=PrefixedClaimOrExpression(
                expression=expr('claims.roles.split(",")', "g")
            ),
            uid=ClaimOrExpression(expression=expr("claims.sub", "u")),
            extra=(
                ExtraMapping(
                    key="example.com/tenant",
                    value_expression=expr("claims.tenant", "e0"),
                ),
                ExtraMapping(
                    key="example.com/empty", value_expression=expr('""', "e1")
                ),
                ExtraMapping(
                    key="example.com/list",
                    value_expression=expr('["a", "", "b"]', "e2"),
                ),
            ),
        )
    )
    claims = {**BASE, "username": "bob", "roles": "admin,dev", "tenant": "t1"}
    user = map_claims(cfg, claims)
    assert user.username == "bob:external-user"
    assert user.groups == ("admin", "dev")
    assert user.uid == "00u1alice"
    assert dict(user.extra) == {
        "example.com/tenant": ("t1",),
        "example.com/list": ("a", "b"),
    }


def test_cel_nested_roles_claim() -> None:
    cfg = authenticator_config(
        mappings=mapping(
            groups=PrefixedClaimOrExpression(
                expression=expr("claims.realm_access.roles", "g")
            )
        )
    )
    user = map_claims(cfg, {**BASE, "realm_access": {"roles": ["viewer", "editor"]}})
    assert user.groups == ("viewer", "editor")


CLAIM_RULES = [
    ("hd-ok", 'claims.hd == "example.com"', {"hd": "example.com"}, None),
    (
        "hd-bad",
        'claims.hd == "example.com"',
        {"hd": "x.com"},
        "the hd claim must be example.com",
    ),
    ("lifetime-ok", "claims.exp - claims.nbf <= 86400", {"nbf": 2**31 - 3600}, None),
    (
        "lifetime-bad",
        "claims.exp - claims.nbf <= 86400",
        {"nbf": 0},
        "the hd claim must be example.com",
    ),
    ("verified-optional", "claims.?email_verified.orValue(true) == true", {}, None),
    (
        "verified-false",
        "claims.?email_verified.orValue(true) == true",
        {"email_verified": False},
        "the hd claim",
    ),
]


@pytest.mark.parametrize(
    ("source", "extra", "failure"),
    [c[1:] for c in CLAIM_RULES],
    ids=[c[0] for c in CLAIM_RULES],
)
def test_claim_validation_rules(
    source: str, extra: dict[str, Any], failure: str | None
) -> None:
    rule = ClaimValidationRule(
        expression=expr(source, "jwt[0].claimValidationRules[0].expression"),
        message="the hd claim must be example.com",
    )
    cfg = authenticator_config(mappings=mapping(), claim_validation_rules=(rule,))
    if failure is None:
        map_claims(cfg, {**BASE, **extra})
    else:
        with pytest.raises(errors.ClaimRuleFailed, match=failure) as info:
            map_claims(cfg, {**BASE, **extra})
        assert "jwt[0].claimValidationRules[0].expression" in str(info.value)


def test_claim_rule_on_missing_claim_names_the_rule() -> None:
    rule = ClaimValidationRule(
        expression=expr('claims.hd == "x"', "jwt[0].claimValidationRules[2].expression")
    )
    cfg = authenticator_config(mappings=mapping(), claim_validation_rules=(rule,))
    with pytest.raises(
        errors.InvalidClaim, match=r"jwt\[0\]\.claimValidationRules\[2\]\.expression"
    ):
        map_claims(cfg, BASE)


USER_RULES = [
    (
        "username-system",
        "!user.username.startsWith('system:')",
        {"sub": "system:admin"},
        "reserved",
    ),
    (
        "groups-system",
        "user.groups.all(group, !group.startsWith('system:'))",
        {"groups": ["system:masters"]},
        "reserved",
    ),
    ("ok", "!user.username.startsWith('system:')", {}, None),
]


@pytest.mark.parametrize(
    ("source", "extra", "failure"),
    [c[1:] for c in USER_RULES],
    ids=[c[0] for c in USER_RULES],
)
def test_user_validation_rules(
    source: str, extra: dict[str, Any], failure: str | None
) -> None:
    rule = UserValidationRule(
        expression=compile_expression(
            source,
            variables=("user",),
            field_path="jwt[0].userValidationRules[0].expression",
        ),
        message="username and groups cannot use the reserved system: prefix",
    )
    cfg = authenticator_config(
        mappings=mapping(groups=claim("groups")), user_validation_rules=(rule,)
    )
    if failure is None:
        map_claims(cfg, {**BASE, **extra})
    else:
        with pytest.raises(errors.UserRuleFailed, match=failure):
            map_claims(cfg, {**BASE, **extra})


# --- CEL at request time on cel-expr-python (issue 20) ---------------------------------------


def cel_mapping(field: str, source: str) -> ClaimMappings:
    """A mapping whose ``field`` (username, groups, uid, extra) is the CEL ``source``."""
    path = f"jwt[0].claimMappings.{field}.expression"
    if field == "username":
        return mapping(
            username=PrefixedClaimOrExpression(expression=expr(source, path))
        )
    if field == "groups":
        return mapping(groups=PrefixedClaimOrExpression(expression=expr(source, path)))
    if field == "uid":
        return mapping(uid=ClaimOrExpression(expression=expr(source, path)))
    key = "example.com/value"
    path = "jwt[0].claimMappings.extra[0].valueExpression"
    return mapping(extra=(ExtraMapping(key=key, value_expression=expr(source, path)),))


def mapped(field: str, user: Any) -> object:
    if field == "username":
        return user.username
    if field == "groups":
        return user.groups
    if field == "uid":
        return user.uid
    return user.extra.get("example.com/value")


SERVICE_ACCOUNT = {
    "kubernetes.io": {
        "namespace": "kube-system",
        "serviceaccount": {"name": "coredns", "uid": "a087d5a0"},
    }
}

CEL_MAPPINGS = [
    (
        "ternary-parenthesised",
        "extra",
        '(claims.is_admin) ? "true" : ""',
        {"is_admin": True},
        ("true",),
    ),
    (
        "ternary-parenthesised-false",
        "extra",
        '(claims.is_admin) ? "true" : ""',
        {"is_admin": False},
        None,
    ),
    (
        "split-concat-trim",
        "groups",
        '(claims.roles.split(",") + claims.other_roles.split(",")).map(r, r.trim())',
        {"roles": "a, b", "other_roles": " c"},
        ("a", "b", "c"),
    ),
    (
        "escaped-namespace",
        "username",
        '"system:serviceaccount:" + claims.kubernetes__dot__io.namespace + ":" '
        "+ claims.kubernetes__dot__io.serviceaccount.name",
        SERVICE_ACCOUNT,
        "system:serviceaccount:kube-system:coredns",
    ),
    (
        "escaped-uid",
        "uid",
        "claims.kubernetes__dot__io.serviceaccount.uid",
        SERVICE_ACCOUNT,
        "a087d5a0",
    ),
    (
        "optional-or-value",
        "groups",
        "claims.?groups.orValue([])",
        {},
        (),
    ),
    (
        "sets-in-a-mapping",
        "extra",
        'sets.intersects(claims.amr, ["mfa"]) ? "mfa" : "pwd"',
        {"amr": ["pwd", "mfa"]},
        ("mfa",),
    ),
]


@pytest.mark.parametrize(
    ("field", "source", "extra", "want"),
    [c[1:] for c in CEL_MAPPINGS],
    ids=[c[0] for c in CEL_MAPPINGS],
)
def test_cel_mappings(
    field: str, source: str, extra: dict[str, Any], want: object
) -> None:
    cfg = authenticator_config(mappings=cel_mapping(field, source))
    assert mapped(field, map_claims(cfg, {**BASE, **extra})) == want


CEL_REQUEST_ERRORS = [
    (
        "missing-claim-without-optional",
        "username",
        "claims.nickname",
        {},
        "jwt[0].claimMappings.username.expression: expression 'claims.nickname' "
        "resulted in error: no such key: nickname",
    ),
    (
        "missing-escaped-claim",
        "uid",
        "claims.kubernetes__dot__io.serviceaccount.uid",
        {},
        "no such key: kubernetes.io",
    ),
    (
        "dyn-username-not-a-string",
        "username",
        "claims.count",
        {"count": 3},
        "jwt[0].claimMappings.username.expression must return a string",
    ),
    (
        "dyn-groups-not-strings",
        "groups",
        "claims.count",
        {"count": 3},
        "must be a string or a list of strings",
    ),
    (
        "nul-in-a-claim",
        "username",
        "claims.sub",
        {"sub": "a\x00b"},
        "NUL character",
    ),
]


@pytest.mark.parametrize(
    ("field", "source", "extra", "message"),
    [c[1:] for c in CEL_REQUEST_ERRORS],
    ids=[c[0] for c in CEL_REQUEST_ERRORS],
)
def test_cel_errors_refuse_the_token_with_the_reason(
    field: str, source: str, extra: dict[str, Any], message: str
) -> None:
    cfg = authenticator_config(mappings=cel_mapping(field, source))
    with pytest.raises(errors.InvalidClaim) as info:
        map_claims(cfg, {**BASE, **extra})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("source", "groups", "accepted"),
    [
        ("!('bar' in user.groups)", ["foo"], True),
        ("!('bar' in user.groups)", ["bar"], False),
        ("has(user.uid) && user.groups.size() > 0", ["foo"], True),
        ("user.extra.example__dot__com__slash__value[0] == 'v'", ["foo"], True),
    ],
    ids=["not-in-accepts", "not-in-refuses", "has-user-field", "escaped-extra-key"],
)
def test_cel_user_rules(source: str, groups: list[str], accepted: bool) -> None:
    rule = UserValidationRule(
        expression=compile_expression(
            source,
            variables=("user",),
            field_path="jwt[0].userValidationRules[0].expression",
        )
    )
    cfg = authenticator_config(
        mappings=mapping(
            groups=claim("groups"),
            extra=(
                ExtraMapping(
                    key="example.com/value",
                    value_expression=expr("'v'", "jwt[0].claimMappings.extra[0]"),
                ),
            ),
        ),
        user_validation_rules=(rule,),
    )
    claims = {**BASE, "groups": groups}
    if accepted:
        map_claims(cfg, claims)
    else:
        with pytest.raises(errors.UserRuleFailed, match=r"userValidationRules\[0\]"):
            map_claims(cfg, claims)
