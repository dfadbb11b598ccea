"""CEL for AuthenticationConfiguration on cel-expr-python: the Kubernetes
documentation's expressions, the regressions of issue 20, property-name escapes,
the ``sets`` library, optionals, type checks at load with Kubernetes' messages,
evaluation errors, ``selected_fields``, and a property test over random claims."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import cel_source
from proxy.cel import CompiledExpression, Returns, Variables, compile_expression
from proxy.errors import ConfigError, ExpressionError

PATH = "jwt[0].claimMappings.username.expression"

CLAIMS: dict[str, Any] = {
    "iss": "https://issuer.example.com",
    "sub": "00u1alice",
    "aud": ["b", "a"],
    "exp": 1_700_086_400,
    "nbf": 1_700_000_000,
    "iat": 1_700_000_000,
    "hd": "example.com",
    "username": "alice",
    "email": "alice@example.com",
    "email_verified": True,
    "roles": "admin,dev",
    "other_roles": "ops , audit",
    "is_admin": True,
    "tenant": "t-42",
    "groups": ["dev", "admin"],
    "realm_access": {"roles": ["offline_access", "uma_authorization"]},
    "resource_access": {"kubernetes": {"roles": ["viewer"]}},
    "amr": ["pwd", "mfa"],
    "score": 0.5,
    "count": 3,
    "flag": False,
    "kubernetes.io": {
        "namespace": "kube-system",
        "serviceaccount": {"name": "coredns", "uid": "a087d5a0"},
    },
    "data": [{"groups.io": "gen1"}],
    "x-tenant/id": "t-7",
    "a__b": "double underscore",
    "namespace": "reserved word",
}

USER: dict[str, Any] = {
    "username": "oidc:alice",
    "uid": "00u1alice",
    "groups": ["oidc:dev", "oidc:admin"],
    "extra": {"example.com/tenant": ["t-42"], "example.org/foo": ["bar", "baz"]},
}


def run(source: str, value: Any = CLAIMS, *, variable: str = "claims") -> object:
    expression = compile_expression(source, variables=(variable,), field_path=PATH)
    return expression.evaluate({variable: value})


def with_claims(**changes: Any) -> dict[str, Any]:
    claims = {k: v for k, v in CLAIMS.items() if k not in changes}
    claims.update({k: v for k, v in changes.items() if v is not DROP})
    return claims


DROP = object()


# --------------------------------------------------------------------------
# Every expression of the Kubernetes documentation for this file


DOCUMENTED = [
    ("hd", 'claims.hd == "example.com"', "claims", CLAIMS, True),
    ("hd-other", 'claims.hd == "example.com"', "claims", with_claims(hd="x.io"), False),
    ("lifetime", "claims.exp - claims.nbf <= 86400", "claims", CLAIMS, True),
    (
        "lifetime-too-long",
        "claims.exp - claims.nbf <= 86400",
        "claims",
        with_claims(exp=1_700_086_401),
        False,
    ),
    (
        "username-suffix",
        'claims.username + ":external-user"',
        "claims",
        CLAIMS,
        "alice:external-user",
    ),
    ("groups-split", 'claims.roles.split(",")', "claims", CLAIMS, ["admin", "dev"]),
    ("uid", "claims.sub", "claims", CLAIMS, "00u1alice"),
    ("extra-value", "claims.tenant", "claims", CLAIMS, "t-42"),
    ("extra-list", "[claims.tenant]", "claims", CLAIMS, ["t-42"]),
    (
        "user-not-system",
        "!user.username.startsWith('system:')",
        "user",
        USER,
        True,
    ),
    (
        "user-system",
        "!user.username.startsWith('system:')",
        "user",
        {**USER, "username": "system:admin"},
        False,
    ),
    (
        "user-groups-not-system",
        "user.groups.all(group, !group.startsWith('system:'))",
        "user",
        USER,
        True,
    ),
    (
        "user-groups-system",
        "user.groups.all(group, !group.startsWith('system:'))",
        "user",
        {**USER, "groups": ["dev", "system:masters"]},
        False,
    ),
    (
        "user-extra",
        "user.extra['example.com/tenant'][0] == 't-42'",
        "user",
        USER,
        True,
    ),
    (
        "email-verified-rule-true",
        "claims.?email_verified.orValue(true) == true",
        "claims",
        CLAIMS,
        True,
    ),
    (
        "email-verified-rule-false",
        "claims.?email_verified.orValue(true) == true",
        "claims",
        with_claims(email_verified=False),
        False,
    ),
    (
        "email-verified-rule-absent",
        "claims.?email_verified.orValue(true) == true",
        "claims",
        with_claims(email_verified=DROP),
        True,
    ),
    (
        "email-verified-or-false-absent",
        "claims.?email_verified.orValue(false)",
        "claims",
        with_claims(email_verified=DROP),
        False,
    ),
    (
        "email-verified-or-false-present",
        "claims.?email_verified.orValue(false)",
        "claims",
        CLAIMS,
        True,
    ),
    (
        "nested-roles",
        "claims.realm_access.roles",
        "claims",
        CLAIMS,
        ["offline_access", "uma_authorization"],
    ),
    (
        "nested-client-roles",
        "claims.resource_access.kubernetes.roles",
        "claims",
        CLAIMS,
        ["viewer"],
    ),
    ("has-email", "has(claims.email)", "claims", CLAIMS, True),
    ("has-email-absent", "has(claims.email)", "claims", with_claims(email=DROP), False),
    (
        "aud-equivalent",
        'sets.equivalent(claims.aud, ["a","b"])',
        "claims",
        CLAIMS,
        True,
    ),
    (
        "aud-not-equivalent",
        'sets.equivalent(claims.aud, ["a","b","c"])',
        "claims",
        CLAIMS,
        False,
    ),
    (
        "groups-contains",
        'sets.contains(claims.groups, ["dev"])',
        "claims",
        CLAIMS,
        True,
    ),
    (
        "groups-not-contains",
        'sets.contains(claims.groups, ["dev", "ops"])',
        "claims",
        CLAIMS,
        False,
    ),
    (
        "amr-intersects",
        'sets.intersects(claims.amr, ["mfa", "hwk"])',
        "claims",
        CLAIMS,
        True,
    ),
    (
        "amr-not-intersects",
        'sets.intersects(claims.amr, ["hwk"])',
        "claims",
        CLAIMS,
        False,
    ),
    (
        "groups-prefixed",
        'claims.?groups.orValue([]).map(g, "oidc:" + g)',
        "claims",
        CLAIMS,
        ["oidc:dev", "oidc:admin"],
    ),
    (
        "groups-prefixed-absent",
        'claims.?groups.orValue([]).map(g, "oidc:" + g)',
        "claims",
        with_claims(groups=DROP),
        [],
    ),
    ("admin-in-groups", "'admin' in claims.groups", "claims", CLAIMS, True),
    ("ops-in-groups", "'ops' in claims.groups", "claims", CLAIMS, False),
    ("none-or-value", 'optional.none().orValue("x")', "claims", CLAIMS, "x"),
    ("of-has-value", "optional.of(1).hasValue()", "claims", CLAIMS, True),
    ("chain-absent", 'claims.?a.?b.orValue("d")', "claims", CLAIMS, "d"),
    (
        "chain-present",
        'claims.?a.?b.orValue("d")',
        "claims",
        with_claims(a={"b": "found"}),
        "found",
    ),
    (
        "chain-middle-absent",
        'claims.?a.?b.orValue("d")',
        "claims",
        with_claims(a={"c": 1}),
        "d",
    ),
    (
        "optional-index-map",
        'claims.realm_access[?"roles"].hasValue()',
        "claims",
        CLAIMS,
        True,
    ),
    (
        "optional-index-map-absent",
        'claims.realm_access[?"x"].hasValue()',
        "claims",
        CLAIMS,
        False,
    ),
    (
        "optional-index-literal",
        '{"k": "v"}[?"k"].orValue("none")',
        "claims",
        CLAIMS,
        "v",
    ),
    (
        "optional-index-list",
        'claims.groups[?0].orValue("none")',
        "claims",
        CLAIMS,
        "dev",
    ),
    (
        "optional-index-list-out",
        'claims.groups[?5].orValue("none")',
        "claims",
        CLAIMS,
        "none",
    ),
]


@pytest.mark.parametrize(
    ("source", "variable", "value", "expected"),
    [case[1:] for case in DOCUMENTED],
    ids=[case[0] for case in DOCUMENTED],
)
def test_documented_expressions(
    source: str, variable: str, value: dict[str, Any], expected: object
) -> None:
    assert run(source, value, variable=variable) == expected


# --------------------------------------------------------------------------
# Issue 20: a parenthesised sub-expression that is not a constant failed at
# evaluation ("unsupported construct"), so every token was refused.

REPORTED = [
    ("not-in-groups", "!('bar' in user.groups)", "user", USER, True),
    (
        "not-in-groups-member",
        "!('oidc:dev' in user.groups)",
        "user",
        USER,
        False,
    ),
    ("ternary-true", '(claims.is_admin) ? "true" : ""', "claims", CLAIMS, "true"),
    (
        "ternary-false",
        '(claims.is_admin) ? "true" : ""',
        "claims",
        with_claims(is_admin=False),
        "",
    ),
    (
        "split-concat-map",
        '(claims.roles.split(",") + claims.other_roles.split(",")).map(r, r.trim())',
        "claims",
        CLAIMS,
        ["admin", "dev", "ops", "audit"],
    ),
    (
        "kubernetes-groups-example",
        '(claims.roles.split(",") + claims.other_roles.split(","))'
        '.map(role, "groups:" + role)',
        "claims",
        with_claims(roles="foo,bar", other_roles="baz,qux"),
        ["groups:foo", "groups:bar", "groups:baz", "groups:qux"],
    ),
    ("parenthesised-select", "(claims).sub", "claims", CLAIMS, "00u1alice"),
    ("parenthesised-call", "(claims.sub).startsWith('00u')", "claims", CLAIMS, True),
]


@pytest.mark.parametrize(
    ("source", "variable", "value", "expected"),
    [case[1:] for case in REPORTED],
    ids=[case[0] for case in REPORTED],
)
def test_reported_wrong_refusals(
    source: str, variable: str, value: dict[str, Any], expected: object
) -> None:
    assert run(source, value, variable=variable) == expected


# --------------------------------------------------------------------------
# Property-name escapes, as kube-apiserver decodes them (its own test cases:
# "deeply nested claim - success - service account payload" and "claims
# payload with deep use of __dot__" in oidc_test.go)

ESCAPES = [
    ("dot", "claims.kubernetes__dot__io.namespace", "claims", "kube-system"),
    (
        "dot-deep",
        "claims.kubernetes__dot__io.serviceaccount.name",
        "claims",
        "coredns",
    ),
    (
        "dot-service-account-username",
        '"system:serviceaccount:" + claims.kubernetes__dot__io.namespace + ":" '
        "+ claims.kubernetes__dot__io.serviceaccount.name",
        "claims",
        "system:serviceaccount:kube-system:coredns",
    ),
    ("dot-inside-list", "claims.data[0].groups__dot__io", "claims", "gen1"),
    ("dash-and-slash", "claims.x__dash__tenant__slash__id", "claims", "t-7"),
    ("underscores", "claims.a__underscores__b", "claims", "double underscore"),
    ("reserved-word", "claims.__namespace__", "claims", "reserved word"),
    ("has-escaped", "has(claims.kubernetes__dot__io)", "claims", True),
    ("has-escaped-absent", "has(claims.example__dot__com)", "claims", False),
    (
        "has-escaped-nested",
        "has(claims.kubernetes__dot__io.serviceaccount.uid)",
        "claims",
        True,
    ),
    (
        "optional-escaped",
        "claims.?kubernetes__dot__io.namespace.orValue('none')",
        "claims",
        "kube-system",
    ),
    (
        "optional-escaped-absent",
        "claims.?example__dot__com.orValue('none')",
        "claims",
        "none",
    ),
    (
        "index-is-literal",
        'claims["kubernetes.io"]["namespace"]',
        "claims",
        "kube-system",
    ),
    ("plain-name-untouched", "claims.sub", "claims", "00u1alice"),
    ("escape-in-string-untouched", "'claims.a__dot__b'", "claims", "claims.a__dot__b"),
    (
        "user-extra",
        "user.extra.example__dot__org__slash__foo",
        "user",
        ["bar", "baz"],
    ),
    (
        "user-extra-size",
        "user.extra.example__dot__org__slash__foo.size() == 2",
        "user",
        True,
    ),
    (
        "user-extra-has",
        "has(user.extra.example__dot__com__slash__tenant)",
        "user",
        True,
    ),
    (
        "user-extra-optional-missing",
        'user.extra[?"example.com/missing"].orValue([]) == []',
        "user",
        True,
    ),
]


@pytest.mark.parametrize(
    ("source", "variable", "expected"),
    [case[1:] for case in ESCAPES],
    ids=[case[0] for case in ESCAPES],
)
def test_property_name_escapes(source: str, variable: str, expected: object) -> None:
    value = CLAIMS if variable == "claims" else USER
    assert run(source, value, variable=variable) == expected


UNESCAPE = [
    ("plain", "sub", "sub"),
    ("dot", "kubernetes__dot__io", "kubernetes.io"),
    ("dash", "x__dash__y", "x-y"),
    ("slash", "a__slash__b", "a/b"),
    ("underscores", "a__underscores__b", "a__b"),
    ("several", "a__dot__b__dash__c__slash__d", "a.b-c/d"),
    ("keyword", "__namespace__", "namespace"),
    ("keyword-true", "__true__", "true"),
    ("keyword-not-whole", "a__namespace__", None),
    ("unknown-escape", "a__b__c", None),
    ("single-double-underscore", "a__b", "a__b"),
    ("leading-underscores", "__a", "__a"),
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [case[1:] for case in UNESCAPE],
    ids=[case[0] for case in UNESCAPE],
)
def test_unescape_as_kubernetes(name: str, expected: str | None) -> None:
    assert cel_source.unescape(name) == expected


REWRITES = [
    ("select", "claims.a__dot__b", 'claims["a.b"]'),
    ("optional-select", "claims.?a__dot__b", 'claims[?"a.b"]'),
    ("has", "has(claims.x.a__dot__b)", '(claims.x[?"a.b"].hasValue())'),
    ("has-user-field", "has(user.uid) && true", "(true)&&true"),
    ("method-name-kept", "claims.x.a__dot__b()", "claims.x.a__dot__b()"),
    ("string-kept", "'.a__dot__b'", "'.a__dot__b'"),
    ("comment-kept", "claims.x // .a__dot__b", "claims.x // .a__dot__b"),
    ("unknown-escape-kept", "claims.a__b__c", "claims.a__b__c"),
    ("untokenisable-kept", "claims.a__dot__b #", "claims.a__dot__b #"),
]


@pytest.mark.parametrize(
    ("source", "expected"),
    [case[1:] for case in REWRITES],
    ids=[case[0] for case in REWRITES],
)
def test_rewrite(source: str, expected: str) -> None:
    assert cel_source.rewrite(source, fields_of=("user",)).text == expected


# --------------------------------------------------------------------------
# The sets library (cel-go's ext.Sets, part of the Kubernetes environment)

SETS = [
    ("contains", "sets.contains([1, 2, 3, 4], [2, 3])", True),
    ("contains-missing", "sets.contains([1, 2, 3, 4], [2, 5])", False),
    ("contains-empty", "sets.contains([1], [])", True),
    ("contains-empty-both", "sets.contains([], [])", True),
    ("contains-duplicates", "sets.contains([1], [1, 1])", True),
    ("contains-cross-numeric", "sets.contains([claims.count], [3.0])", True),
    ("contains-bool-is-not-int", "sets.contains([claims.flag], [0])", False),
    ("contains-lists", "sets.contains([[1], [2]], [[2]])", True),
    (
        "contains-maps",
        "sets.contains([claims.realm_access], "
        "[{'roles': ['offline_access', 'uma_authorization']}])",
        True,
    ),
    ("equivalent", "sets.equivalent([1, 2], [2, 1, 1])", True),
    ("equivalent-not", "sets.equivalent([1, 2], [1])", False),
    ("equivalent-empty", "sets.equivalent([], [])", True),
    ("intersects", "sets.intersects([1, 2], [2, 3])", True),
    ("intersects-not", "sets.intersects([1], [2])", False),
    ("intersects-empty", "sets.intersects([], [1])", False),
    ("claims-groups", 'sets.intersects(claims.groups, ["admin", "ops"])', True),
]


@pytest.mark.parametrize(
    ("source", "expected"),
    [case[1:] for case in SETS],
    ids=[case[0] for case in SETS],
)
def test_sets(source: str, expected: bool) -> None:
    assert run(source) is expected


def test_sets_element_types_are_checked_at_load() -> None:
    with pytest.raises(
        ConfigError, match=r"found no matching overload for 'sets\.contains'"
    ):
        compile_expression(
            "sets.contains([1], ['a'])", variables=("claims",), field_path=PATH
        )


# --------------------------------------------------------------------------
# Semantics: optionals, numbers, equality, errors as values, macros, functions


SEMANTICS = [
    # optionals
    ("optional-result-present", "claims.?sub.orValue(null)", "00u1alice"),
    ("optional-result-absent", "claims.?nope.orValue(null)", None),
    (
        "optional-select-propagates",
        "claims.?realm_access.roles.orValue(null)",
        ["offline_access", "uma_authorization"],
    ),
    ("optional-select-propagates-none", "claims.?nope.roles.orValue(null)", None),
    (
        "optional-select-presence-tested",
        "claims.?realm_access.nope.orValue(null)",
        None,
    ),
    ("optional-index-propagates", "claims.?groups[1].orValue(null)", "admin"),
    ("optional-of-value", "optional.of('v').value()", "v"),
    ("optional-or-first", "optional.of(1).or(optional.of(2)).value()", 1),
    ("optional-or-second", "optional.none().or(optional.of(2)).value()", 2),
    ("optional-or-none", "optional.none().or(optional.none()).hasValue()", False),
    ("optional-of-non-zero-empty", "optional.ofNonZeroValue('').hasValue()", False),
    ("optional-of-non-zero-zero", "optional.ofNonZeroValue(0).hasValue()", False),
    ("optional-of-non-zero-list", "optional.ofNonZeroValue([]).hasValue()", False),
    ("optional-of-non-zero-value", "optional.ofNonZeroValue('x').value()", "x"),
    ("optional-equality", "optional.none() == optional.none()", True),
    ("optional-of-null", "optional.of(null).hasValue()", True),
    # or / orValue are lazy: a present optional never evaluates the alternative
    ("or-value-lazy", "claims.?sub.orValue(claims.missing)", "00u1alice"),
    ("or-lazy", "claims.?sub.or(optional.of(claims.missing)).value()", "00u1alice"),
    # numbers: JSON ints stay int, comparisons cross int/double
    ("int-minus-int", "claims.exp - claims.nbf", 86400),
    ("int-gt-double", "claims.exp > 1.5e9", True),
    ("double-lt-int", "claims.score < 1", True),
    ("int-eq-double", "claims.count == 3.0", True),
    ("int-ne-double", "claims.count != 3.5", True),
    ("uint-eq-int", "3u == claims.count", True),
    ("int-division", "7 / 2", 3),
    ("int-modulo-negative", "-7 % 2", -1),
    ("double-division", "claims.score / 2.0", 0.25),
    ("double-division-by-zero", "1.0 / 0.0 > 1e308", True),
    ("int-conversion", "int(claims.score * 10.0)", 5),
    ("double-conversion", "double(claims.count) + 0.5", 3.5),
    ("string-of-number", "string(claims.count)", "3"),
    ("string-of-bool", "string(claims.flag)", "false"),
    ("int-of-string", "int('42') + 1", 43),
    ("bool-of-string", "bool('true')", True),
    # heterogeneous equality: different types are unequal, not an error
    ("string-eq-int", "claims.hd == 1", False),
    ("string-ne-int", "claims.hd != 1", True),
    ("null-eq-string", "null == claims.hd", False),
    ("list-eq", "claims.groups == ['dev', 'admin']", True),
    ("list-eq-numbers", "[1, 2.0] == [1.0, 2]", True),
    (
        "map-eq",
        "claims.realm_access == {'roles': ['offline_access', 'uma_authorization']}",
        True,
    ),
    ("in-list-heterogeneous", "1 in ['a', 1.0]", True),
    ("in-map", "'roles' in claims.realm_access", True),
    ("in-map-absent", "'nope' in claims", False),
    ("type-int", "type(claims.count) == int", True),
    ("type-string", "type(claims.hd) == string", True),
    ("dyn", "dyn(claims.count) + 1", 4),
    # errors are values: && and || absorb them, the ternary skips the other side
    ("or-absorbs-error", "claims.missing == 'x' || true", True),
    ("or-absorbs-error-right", "true || claims.missing == 'x'", True),
    ("and-absorbs-error", "claims.missing == 'x' && false", False),
    ("has-guard", "has(claims.missing) && claims.missing.startsWith('x')", False),
    ("ternary-skips", "has(claims.missing) ? claims.missing : 'default'", "default"),
    ("ternary-taken", "has(claims.sub) ? claims.sub : 'default'", "00u1alice"),
    ("exists-absorbs-error", "[1, 'a'].exists(x, x.startsWith('a'))", True),
    ("all-false-wins", "[1, 'a'].all(x, x.startsWith('b'))", False),
    # has()
    ("has-nested", "has(claims.realm_access.roles)", True),
    ("has-nested-absent", "has(claims.realm_access.nope)", False),
    ("has-parenthesised", "has((claims.sub))", True),
    # macros
    ("all-true", "claims.groups.all(g, g.size() > 2)", True),
    ("exists", "claims.groups.exists(g, g == 'admin')", True),
    ("exists-false", "claims.groups.exists(g, g == 'ops')", False),
    ("exists-one", "claims.groups.exists_one(g, g.startsWith('d'))", True),
    ("exists-one-two", "['a', 'ab'].exists_one(g, g.startsWith('a'))", False),
    ("filter", "claims.groups.filter(g, g != 'dev')", ["admin"]),
    ("map", "claims.groups.map(g, g.upperAscii())", ["DEV", "ADMIN"]),
    ("map-filter", "claims.groups.map(g, g != 'dev', 'k:' + g)", ["k:admin"]),
    ("map-over-map-keys", "claims.realm_access.map(k, k)", ["roles"]),
    ("nested-macros", "[[1, 2], [3]].map(l, l.filter(x, x > 1))", [[2], [3]]),
    ("macro-variable-shadows", "claims.groups.exists(claims, claims == 'dev')", True),
    ("macro-over-empty", "[].all(x, x)", True),
    # strings (Kubernetes strings library) and standard functions
    ("split-limit", "'a,b,c'.split(',', 2)", ["a", "b,c"]),
    ("split-zero", "'a,b,c'.split(',', 0)", []),
    ("split-all", "'a,b,c'.split(',', -1)", ["a", "b", "c"]),
    ("split-empty-separator", "'abc'.split('')", ["a", "b", "c"]),
    ("split-empty-string", "''.split(',')", [""]),
    ("join", "claims.groups.join('|')", "dev|admin"),
    ("join-no-separator", "['a', 'b'].join()", "ab"),
    ("lower-ascii", "'ÀLICE'.lowerAscii()", "Àlice"),
    ("upper-ascii", "'àlice'.upperAscii()", "àLICE"),
    ("replace", "'a-b-c'.replace('-', '_')", "a_b_c"),
    ("replace-limit", "'a-b-c'.replace('-', '_', 1)", "a_b-c"),
    ("trim", "'  x y  '.trim()", "x y"),
    ("substring", "'hello'.substring(1, 3)", "el"),
    ("substring-open", "'hello'.substring(3)", "lo"),
    ("char-at", "'hello'.charAt(1)", "e"),
    ("char-at-end", "'hello'.charAt(5)", ""),
    ("index-of", "'hello'.indexOf('l')", 2),
    ("index-of-offset", "'hello'.indexOf('l', 3)", 3),
    ("index-of-absent", "'hello'.indexOf('z')", -1),
    ("last-index-of", "'hello mellow'.lastIndexOf('ello')", 7),
    ("last-index-of-offset", "'hello mellow'.lastIndexOf('ello', 6)", 1),
    ("starts-with", "claims.email.startsWith('alice@')", True),
    ("ends-with", "claims.email.endsWith('@example.com')", True),
    ("contains", "claims.email.contains('@')", True),
    ("matches", "claims.email.matches('^[a-z]+@example\\\\.com$')", True),
    ("matches-global", "matches(claims.sub, '^00u')", True),
    ("size-string", "claims.sub.size()", 9),
    ("size-list", "size(claims.groups)", 2),
    ("size-map", "size(claims.realm_access)", 1),
    ("unicode-size", "size('héllo')", 5),
    ("concat-list", "claims.groups + ['ops']", ["dev", "admin", "ops"]),
    ("map-literal", "{'a': claims.count}", {"a": 3}),
    ("index-map-literal-key", "claims['hd']", "example.com"),
    ("multi-line", "claims.hd ==\n  'example.com'", True),
]


@pytest.mark.parametrize(
    ("source", "expected"),
    [case[1:] for case in SEMANTICS],
    ids=[case[0] for case in SEMANTICS],
)
def test_semantics(source: str, expected: object) -> None:
    assert run(source) == expected


def test_integers_beyond_int64_become_doubles() -> None:
    claims = {"big": 2**64, "edge": 2**63, "small": -(2**63) - 1}
    assert run("type(claims.big) == double && claims.big > 1.0", claims) is True
    assert run("type(claims.edge) == double", claims) is True
    assert run("type(claims.small) == double", claims) is True
    assert run("claims.big", claims) == float(2**64)


def test_float_claims_compare_with_ints_but_do_not_mix_in_arithmetic() -> None:
    claims = {"exp": 1_700_086_400.0, "nbf": 1_700_000_000}
    assert run("claims.exp > claims.nbf", claims) is True
    with pytest.raises(ExpressionError, match=r"no such overload"):
        run("claims.exp - claims.nbf <= 86400", claims)


# --------------------------------------------------------------------------
# Results are plain Python values


RESULTS = [
    ("str", "claims.sub", str),
    ("bool", "claims.email_verified", bool),
    ("int", "claims.count", int),
    ("float", "claims.score", float),
    ("null", "null", type(None)),
    ("list", "claims.groups.map(g, g)", list),
    ("list-untouched", "claims.groups", list),
    ("dict", "claims.realm_access", dict),
    ("literal-map", "{'a': [1, true]}", dict),
    ("uint", "1u", int),
]


@pytest.mark.parametrize(
    ("source", "kind"),
    [case[1:] for case in RESULTS],
    ids=[case[0] for case in RESULTS],
)
def test_results_are_plain_python(source: str, kind: type) -> None:
    result = run(source)
    assert type(result) is kind
    assert_plain(result)


def assert_plain(value: object) -> None:
    """No runtime type survives, however deep."""
    assert type(value) in (str, bool, int, float, type(None), list, dict)
    if isinstance(value, list):
        for item in value:
            assert_plain(item)
    if isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key)
            assert_plain(item)


# --------------------------------------------------------------------------
# Evaluation failures at request time: ExpressionError naming the path and the
# expression, as kube-apiserver's "expression '...' resulted in error: ..."

SECRET = "s3cr3t-claim-value"

FAILURES = [
    ("missing-key", "claims.nope", {}, "resulted in error: no such key: nope"),
    (
        "missing-nested",
        "claims.realm_access.nope",
        CLAIMS,
        "resulted in error: no such key: nope",
    ),
    ("missing-in-list", "[claims.nope]", {}, "no such key: nope"),
    ("missing-or-false", "claims.nope || false", {}, "no such key: nope"),
    ("has-on-missing-parent", "has(claims.a.b)", {}, "no such key: a"),
    (
        "missing-escaped",
        "claims.kubernetes__dot__io",
        {},
        "no such key: kubernetes.io",
    ),
    ("select-on-string", "claims.sub.foo", {"sub": SECRET}, "resulted in error"),
    (
        "wrong-type-method",
        "claims.sub.startsWith('x')",
        {"sub": 7},
        "no such overload",
    ),
    (
        "wrong-type-arithmetic",
        "claims.exp - claims.nbf <= 86400",
        {"exp": SECRET, "nbf": 1},
        "no such overload",
    ),
    ("wrong-type-concat", "claims.sub + 1", {"sub": SECRET}, "no such overload"),
    ("wrong-type-not", "!claims.sub", {"sub": SECRET}, "no such overload"),
    ("wrong-type-in", "'a' in claims.sub", {"sub": SECRET}, "no such overload"),
    (
        "wrong-type-sets",
        "sets.contains(claims.sub, ['a'])",
        {"sub": SECRET},
        "no such overload",
    ),
    ("predicate-not-bool", "claims.groups.all(g, g)", {"groups": [SECRET]}, "error"),
    ("condition-not-bool", "claims.sub ? 1 : 2", {"sub": SECRET}, "error"),
    ("int-of-string", "int(claims.sub)", {"sub": SECRET}, "cannot convert"),
    ("division-by-zero", "claims.count / 0", {"count": 1}, "divide by zero"),
    ("modulo-by-zero", "claims.count % 0", {"count": 1}, "modulus by zero"),
    ("overflow", "claims.count * 9223372036854775807", {"count": 2}, "overflow"),
    ("index-out-of-range", "claims.groups[2]", {"groups": ["a"]}, "index"),
    ("none-value", "claims.?nope.value()", {}, "optional.none() dereference"),
    ("bad-regex", "claims.sub.matches('[')", {"sub": SECRET}, "regular expression"),
    (
        "result-bytes",
        "b'bytes'",
        {},
        "the result is bytes, which has no json form",
    ),
    ("result-type", "type(claims)", {}, "the result is type, which has no json form"),
    ("result-optional", "claims.?sub", {"sub": "x"}, "the result cannot be read"),
]


@pytest.mark.parametrize(
    ("source", "claims", "fragment"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_evaluation_failures(
    source: str, claims: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ExpressionError) as caught:
        run(source, claims)
    message = str(caught.value)
    assert message.startswith(f"cel: {PATH}: expression {source!r}")
    assert fragment in message
    assert SECRET not in message
    assert "\n" not in message


ACTIVATION_FAILURES = [
    ("variable-missing", "claims", {}, "no value for variable 'claims'"),
    ("user-missing", "user", {}, "no value for variable 'user'"),
    ("user-not-object", "user", {"user": "alice"}, "variable 'user' must be an object"),
    (
        "user-field-missing",
        "user",
        {"user": {"username": "a"}},
        "variable 'user' has no field 'uid'",
    ),
]


@pytest.mark.parametrize(
    ("variable", "activation", "fragment"),
    [case[1:] for case in ACTIVATION_FAILURES],
    ids=[case[0] for case in ACTIVATION_FAILURES],
)
def test_activation_failures(
    variable: str, activation: dict[str, Any], fragment: str
) -> None:
    source = "claims.sub" if variable == "claims" else "user.uid"
    expression = compile_expression(source, variables=(variable,), field_path=PATH)
    with pytest.raises(ExpressionError) as caught:
        expression.evaluate(activation)
    assert str(caught.value) == f"cel: {PATH}: {fragment}"


@pytest.mark.parametrize(
    "claims",
    [{"sub": "a\x00b"}, {"a\x00b": "x"}, {"groups": ["ok", "a\x00"]}],
    ids=["value", "key", "in-a-list"],
)
def test_a_nul_character_is_refused_not_cut(claims: dict[str, Any]) -> None:
    """The runtime's conversion would read "a\\x00b" as "a": refuse instead."""
    expression = compile_expression("claims", variables=("claims",), field_path=PATH)
    with pytest.raises(ExpressionError, match="NUL character"):
        expression.evaluate({"claims": claims})


def test_a_lone_surrogate_reads_as_go_decodes_it() -> None:
    """Python's json keeps "\\ud800" as a lone surrogate; Go makes it U+FFFD."""
    assert run("claims", {"a\ud800": "b\udfff"}) == {"a\ufffd": "b\ufffd"}


def test_deeply_nested_claims_are_an_expression_error() -> None:
    nested: Any = "leaf"
    for _ in range(5000):
        nested = [nested]
    expression = compile_expression("claims.x", variables=("claims",), field_path=PATH)
    with pytest.raises(ExpressionError, match="variable 'claims' nests too deeply"):
        expression.evaluate({"claims": {"x": nested}})


# --------------------------------------------------------------------------
# Load time: compile errors and result types, in Kubernetes' words
# (field.Invalid(path, expression, "compilation failed: ..." / "must evaluate
# to bool")), at the expression's field path.

COMPILE_FAILURES = [
    (
        "syntax-end",
        "claims.hd ==",
        ("claims",),
        'Invalid value: "claims.hd ==": compilation failed: ERROR: <input>:1:13: '
        "Syntax error: mismatched input '<EOF>'",
    ),
    (
        "syntax-second-line",
        "claims.hd ==\n  'a' +",
        ("claims",),
        "compilation failed: ERROR: <input>:2:8: Syntax error",
    ),
    ("syntax-empty", "", ("claims",), "compilation failed: ERROR: <input>:1:1"),
    (
        "syntax-after-an-escape",
        "claims.kubernetes__dot__io.x +",
        ("claims",),
        "compilation failed: ERROR: <input>:1:31: Syntax error",
    ),
    (
        "user-in-claims-rule",
        "user.username == 'x'",
        ("claims",),
        "compilation failed: ERROR: <input>:1:5: undeclared reference to "
        "'user.username'",
    ),
    (
        "claims-in-user-rule",
        "claims.sub == user.username",
        ("user",),
        "compilation failed: ERROR: <input>:1:7: undeclared reference to 'claims.sub'",
    ),
    (
        "user-unknown-field",
        "user.foo == 'x'",
        ("user",),
        "undeclared reference to 'user.foo'",
    ),
    (
        "user-field-type",
        "user.groups[0] + 1 == 2",
        ("user",),
        "found no matching overload for '_+_' applied to '(string, int)'",
    ),
    (
        "unknown-function",
        "foo(claims.b)",
        ("claims",),
        "undeclared reference to 'foo'",
    ),
    (
        "kubernetes-library-not-available",
        "claims.url.isURL()",
        ("claims",),
        "undeclared reference to 'isURL'",
    ),
]


@pytest.mark.parametrize(
    ("source", "variables", "fragment"),
    [case[1:] for case in COMPILE_FAILURES],
    ids=[case[0] for case in COMPILE_FAILURES],
)
def test_compile_failures(
    source: str, variables: tuple[str, ...], fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_expression(source, variables=variables, field_path=PATH)
    (problem,) = caught.value.problems
    assert problem.startswith(f"config: {PATH}: Invalid value: ")
    assert fragment in problem
    assert "INVALID_ARGUMENT" not in problem


RULE = "jwt[0].claimValidationRules[0].expression"

LOAD_TYPES = [
    # rules must be bool, exactly (Kubernetes: ast.OutputType() == BoolType)
    ("rule-dyn-claim", "claims.foo", ("claims",), Returns.BOOL, False),
    ("rule-user-username", "user.username", ("user",), Returns.BOOL, False),
    (
        "rule-optional-or-value",
        "claims.?email_verified.orValue(true)",
        ("claims",),
        Returns.BOOL,
        False,
    ),
    ("rule-string", "'yes'", ("claims",), Returns.BOOL, False),
    ("rule-comparison", "claims.hd == 'example.com'", ("claims",), Returns.BOOL, True),
    (
        "rule-optional-compared",
        "claims.?email_verified.orValue(true) == true",
        ("claims",),
        Returns.BOOL,
        True,
    ),
    ("rule-has", "has(claims.hd)", ("claims",), Returns.BOOL, True),
    ("rule-user-has", "has(user.uid) && user.uid != ''", ("user",), Returns.BOOL, True),
    ("rule-user-in", "!('bar' in user.groups)", ("user",), Returns.BOOL, True),
    # username and uid: string (or dyn: known only per token)
    ("string-dyn", "claims.sub", ("claims",), Returns.STRING, True),
    ("string-concat", "'oidc:' + claims.sub", ("claims",), Returns.STRING, True),
    ("string-int", "claims.count + 1", ("claims",), Returns.STRING, False),
    ("string-bool", "claims.hd == 'x'", ("claims",), Returns.STRING, False),
    ("string-list", "claims.roles.split(',')", ("claims",), Returns.STRING, False),
    ("string-optional", "claims.?sub", ("claims",), Returns.STRING, False),
    ("string-null", "null", ("claims",), Returns.STRING, False),
    # groups and extra values: string or list of strings (null: none)
    ("strings-list", "claims.roles.split(',')", ("claims",), Returns.STRINGS, True),
    ("strings-dyn-list", "claims.groups.map(g, g)", ("claims",), Returns.STRINGS, True),
    ("strings-string", "claims.tenant", ("claims",), Returns.STRINGS, True),
    ("strings-null", "null", ("claims",), Returns.STRINGS, True),
    ("strings-empty", "[]", ("claims",), Returns.STRINGS, True),
    ("strings-ints", "[1, 2]", ("claims",), Returns.STRINGS, False),
    ("strings-map", "{'a': 'b'}", ("claims",), Returns.STRINGS, False),
    ("strings-bool", "claims.flag == true", ("claims",), Returns.STRINGS, False),
    ("any-anything", "[1, 2]", ("claims",), Returns.ANY, True),
]


@pytest.mark.parametrize(
    ("source", "variables", "returns", "accepted"),
    [case[1:] for case in LOAD_TYPES],
    ids=[case[0] for case in LOAD_TYPES],
)
def test_result_types_checked_at_load(
    source: str, variables: tuple[str, ...], returns: Returns, accepted: bool
) -> None:
    if accepted:
        compile_expression(
            source, variables=variables, field_path=RULE, returns=returns
        )
        return
    with pytest.raises(ConfigError) as caught:
        compile_expression(
            source, variables=variables, field_path=RULE, returns=returns
        )
    quoted = source.replace('"', '\\"')
    assert caught.value.problems == (
        f'config: {RULE}: Invalid value: "{quoted}": must evaluate to {returns.value}',
    )


def test_only_the_two_kubernetes_environments_exist() -> None:
    with pytest.raises(ValueError, match="variables must be"):
        compile_expression("true", variables=("a",), field_path=PATH)


# --------------------------------------------------------------------------
# selected_fields: for the email_verified rule

SELECTED = [
    ("dot", "claims.email", ("claims",), {("claims", "email")}),
    ("optional-dot", "claims.?email.orValue('')", ("claims",), {("claims", "email")}),
    ("index", "claims['email']", ("claims",), {("claims", "email")}),
    (
        "optional-index",
        "claims[?'email'].orValue('')",
        ("claims",),
        {("claims", "email")},
    ),
    ("raw-string-index", "claims[r'email']", ("claims",), {("claims", "email")}),
    ("has", "has(claims.email)", ("claims",), {("claims", "email")}),
    ("parenthesised", "(claims).email", ("claims",), {("claims", "email")}),
    ("escaped", "claims.e__dash__mail", ("claims",), {("claims", "e-mail")}),
    (
        "username-with-verified",
        "claims.email_verified ? claims.email : claims.sub",
        ("claims",),
        {("claims", "email_verified"), ("claims", "email"), ("claims", "sub")},
    ),
    (
        "only-top-level",
        "claims.realm_access.email",
        ("claims",),
        {("claims", "realm_access")},
    ),
    (
        "chained-optional",
        "claims.?a.?email.orValue('')",
        ("claims",),
        {("claims", "a")},
    ),
    (
        "in-macro-body",
        "claims.groups.exists(g, g == claims.email)",
        ("claims",),
        {("claims", "groups"), ("claims", "email")},
    ),
    (
        "macro-variable-is-not-claims",
        "claims.groups.map(c, c.email)",
        ("claims",),
        {("claims", "groups")},
    ),
    ("computed-index", "claims[claims.key]", ("claims",), {("claims", "key")}),
    ("in-is-not-a-selection", "'email' in claims", ("claims",), set()),
    (
        "string-literal-mentions",
        "'claims.email' == claims.sub",
        ("claims",),
        {("claims", "sub")},
    ),
    (
        "comment-mentions",
        "claims.sub // claims.email",
        ("claims",),
        {("claims", "sub")},
    ),
    ("user", "user.username.startsWith('x')", ("user",), {("user", "username")}),
]


@pytest.mark.parametrize(
    ("source", "variables", "expected"),
    [case[1:] for case in SELECTED],
    ids=[case[0] for case in SELECTED],
)
def test_selected_fields(
    source: str, variables: tuple[str, ...], expected: set[tuple[str, str]]
) -> None:
    compiled = compile_expression(source, variables=variables, field_path=PATH)
    assert compiled.selected_fields == frozenset(expected)


# --------------------------------------------------------------------------
# The compiled value and its variables


def test_compiled_expression_is_a_frozen_comparable_value() -> None:
    first = compile_expression("claims.sub", variables=("claims",), field_path=PATH)
    second = compile_expression("claims.sub", variables=("claims",), field_path=PATH)
    assert first == second
    assert hash(first) == hash(second)
    assert first.source == "claims.sub"
    assert first.field_path == PATH
    assert "program" not in repr(first)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.source = "claims.email"  # type: ignore[misc]


def test_one_compiled_expression_serves_many_activations() -> None:
    expression = compile_expression(
        "claims.?email.orValue(claims.sub)", variables=("claims",), field_path=PATH
    )
    assert expression.evaluate({"claims": {"email": "a@b", "sub": "s"}}) == "a@b"
    assert expression.evaluate({"claims": {"sub": "s"}}) == "s"
    with pytest.raises(ExpressionError, match="no such key: sub"):
        expression.evaluate({"claims": {}})


def test_one_variables_value_serves_many_expressions() -> None:
    scope = Variables({"claims": CLAIMS})
    sources = ["claims.sub", "claims.hd == 'example.com'", "claims.groups.size()"]
    results = [
        compile_expression(s, variables=("claims",), field_path=PATH).evaluate(scope)
        for s in sources
    ]
    assert results == ["00u1alice", True, 2]
    assert scope.activation("claims") is scope.activation("claims")


def test_a_hand_built_value_cannot_be_evaluated() -> None:
    fake = CompiledExpression(source="claims.sub", field_path=PATH)
    with pytest.raises(ExpressionError, match="expression was not compiled"):
        fake.evaluate({"claims": CLAIMS})


def test_the_activation_is_not_modified() -> None:
    claims: dict[str, Any] = {"groups": ["a"], "m": {"k": [1]}, "big": 2**70}
    snapshot = repr(claims)
    run("claims.groups + ['b']", claims)
    run("claims.m.k.map(x, x + 1)", claims)
    run("claims.big > 1.0", claims)
    assert repr(claims) == snapshot


# --------------------------------------------------------------------------
# Property: random claims give a plain value or an ExpressionError, nothing else

PROPERTY_EXPRESSIONS = [
    compile_expression(source, variables=("claims",), field_path=f"rule[{i}]")
    for i, source in enumerate(
        [
            'claims.hd == "example.com"',
            "claims.exp - claims.nbf <= 86400",
            'claims.username + ":external-user"',
            'claims.roles.split(",")',
            "claims.?email_verified.orValue(true) == true",
            'claims.?groups.orValue([]).map(g, "oidc:" + g)',
            "'admin' in claims.groups",
            'sets.equivalent(claims.aud, ["a", "b"])',
            "has(claims.email) && claims.email.endsWith('@example.com')",
            "claims.realm_access.roles.exists(r, r == 'admin')",
            "claims.?a.?b.orValue('d')",
            "claims.groups.filter(g, g.size() > 1).size() > 0",
            "[claims.tenant]",
            "claims.kubernetes__dot__io.namespace",
            "claims",
        ]
    )
]

#: Text without NUL or lone surrogates, which the runtime cannot take as they
#: are (each tested on its own above).
TEXT = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(TEXT, max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(TEXT, max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
CLAIM_NAMES = st.sampled_from(
    [
        "hd",
        "exp",
        "nbf",
        "username",
        "roles",
        "email_verified",
        "groups",
        "aud",
        "email",
        "realm_access",
        "a",
        "tenant",
        "kubernetes.io",
    ]
)
RANDOM_CLAIMS = st.dictionaries(
    CLAIM_NAMES | st.text(TEXT, max_size=5), JSON_VALUES, max_size=8
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, database=None)
@given(claims=RANDOM_CLAIMS)
def test_random_claims_give_a_value_or_an_expression_error(
    claims: dict[str, Any],
) -> None:
    scope = Variables({"claims": claims})
    for expression in PROPERTY_EXPRESSIONS:
        try:
            result = expression.evaluate(scope)
        except ExpressionError as err:
            message = str(err)
        else:
            assert_plain(result)
            continue
        assert message.startswith(f"cel: {expression.field_path}: ")
        assert "\n" not in message


@pytest.mark.slow
@settings(max_examples=100, deadline=None, database=None)
@given(claims=RANDOM_CLAIMS)
def test_the_claims_round_trip_unchanged(claims: dict[str, Any]) -> None:
    result = PROPERTY_EXPRESSIONS[-1].evaluate({"claims": claims})
    assert same_json(result, claims)


def same_json(left: object, right: object) -> bool:
    """Equality that treats NaN as equal to itself and ints beyond int64 as doubles."""
    if isinstance(right, float) and math.isnan(right):
        return isinstance(left, float) and math.isnan(left)
    if (
        isinstance(right, int)
        and not isinstance(right, bool)
        and not (-(2**63) <= right < 2**63)
    ):
        return isinstance(left, float) and left == float(right)
    if isinstance(right, list):
        return (
            isinstance(left, list)
            and len(left) == len(right)
            and all(same_json(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(right, dict):
        return (
            isinstance(left, dict)
            and left.keys() == right.keys()
            and all(same_json(left[k], right[k]) for k in right)
        )
    return type(left) is type(right) and left == right
