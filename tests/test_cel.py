"""CEL for AuthenticationConfiguration: the Kubernetes documentation's expressions,
the optional syntax and ``sets`` library added to celpy, errors and their messages,
``selected_fields``, and a property test over random claims."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import cel
from proxy.cel import CompiledExpression, compile_expression
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
    "tenant": "t-42",
    "groups": ["dev", "admin"],
    "realm_access": {"roles": ["offline_access", "uma_authorization"]},
    "resource_access": {"kubernetes": {"roles": ["viewer"]}},
    "amr": ["pwd", "mfa"],
    "score": 0.5,
    "count": 3,
    "flag": False,
}

USER: dict[str, Any] = {
    "username": "oidc:alice",
    "uid": "00u1alice",
    "groups": ["oidc:dev", "oidc:admin"],
    "extra": {"example.com/tenant": ["t-42"]},
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
# Semantics: optionals, numbers, equality, errors as values, macros, functions


SEMANTICS = [
    # optionals
    ("optional-result-present", "claims.?sub", "00u1alice"),
    ("optional-result-absent", "claims.?nope", None),
    (
        "optional-select-propagates",
        "claims.?realm_access.roles",
        ["offline_access", "uma_authorization"],
    ),
    ("optional-select-propagates-none", "claims.?nope.roles", None),
    ("optional-select-presence-tested", "claims.?realm_access.nope", None),
    ("optional-index-propagates", "claims.?groups[1]", "admin"),
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
    ("or-lazy", "claims.?sub.or(claims.?missing.map(x, x)).value()", "00u1alice"),
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
    ("list-index-of", "claims.groups.indexOf('admin')", 1),
    ("list-last-index-of", "['a', 'b', 'a'].lastIndexOf('a')", 2),
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
    claims = {"big": 2**64}
    assert run("type(claims.big) == double && claims.big > 1", claims) is True


def test_float_claims_compare_with_ints_but_do_not_mix_in_arithmetic() -> None:
    claims = {"exp": 1_700_086_400.0, "nbf": 1_700_000_000}
    assert run("claims.exp > claims.nbf", claims) is True
    with pytest.raises(ExpressionError, match=r"no such overload: double - int"):
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
    """No celpy type survives, however deep (StringType is a str subclass)."""
    assert type(value) in (str, bool, int, float, type(None), list, dict)
    if isinstance(value, list):
        for item in value:
            assert_plain(item)
    if isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key)
            assert_plain(item)


# --------------------------------------------------------------------------
# Evaluation failures: ExpressionError naming the path, never the values

SECRET = "s3cr3t-claim-value"

FAILURES = [
    ("missing-key", "claims.nope", {}, "no such key: 'nope' (line 1, column 8)"),
    ("missing-nested", "claims.realm_access.nope", CLAIMS, "no such key: 'nope'"),
    ("missing-in-list", "[claims.nope]", {}, "no such key: 'nope'"),
    ("missing-or-false", "claims.nope || false", {}, "no such key: 'nope'"),
    ("has-on-missing-parent", "has(claims.a.b)", {}, "no such key: 'a'"),
    ("select-on-string", "claims.sub.foo", {"sub": SECRET}, "a string has no fields"),
    (
        "wrong-type-method",
        "claims.sub.startsWith('x')",
        {"sub": 7},
        "no such overload: startsWith(int, string)",
    ),
    (
        "wrong-type-arithmetic",
        "claims.exp - claims.nbf <= 86400",
        {"exp": SECRET, "nbf": 1},
        "no such overload: string - int",
    ),
    (
        "wrong-type-concat",
        "claims.sub + 1",
        {"sub": SECRET},
        "no such overload: string + int",
    ),
    (
        "wrong-type-compare",
        "claims.sub < 1",
        {"sub": SECRET},
        "no such overload: string < int",
    ),
    ("wrong-type-not", "!claims.sub", {"sub": SECRET}, "no such overload: !string"),
    (
        "wrong-type-in",
        "'a' in claims.sub",
        {"sub": SECRET},
        "no such overload: string in string",
    ),
    (
        "wrong-type-macro",
        "claims.sub.all(x, true)",
        {"sub": SECRET},
        "all() needs a list or a map, got a string",
    ),
    (
        "wrong-type-sets",
        "sets.contains(claims.sub, ['a'])",
        {"sub": SECRET},
        "no such overload: sets.contains(string, list)",
    ),
    (
        "predicate-not-bool",
        "claims.groups.all(g, g)",
        {"groups": [SECRET]},
        "the predicate of all() gave a string",
    ),
    (
        "condition-not-bool",
        "claims.sub ? 1 : 2",
        {"sub": SECRET},
        "the condition of ?: is a string",
    ),
    (
        "or-not-bool",
        "false || claims.sub",
        {"sub": SECRET},
        "no such overload: || on a string",
    ),
    (
        "int-of-string",
        "int(claims.sub)",
        {"sub": SECRET},
        "invalid argument: int(string)",
    ),
    ("division-by-zero", "claims.count / 0", {"count": 1}, "division by zero"),
    ("modulo-by-zero", "claims.count % 0", {"count": 1}, "division by zero"),
    (
        "overflow",
        "claims.count * 9223372036854775807",
        {"count": 2},
        "integer overflow",
    ),
    (
        "index-out-of-range",
        "claims.groups[2]",
        {"groups": ["a"]},
        "index out of range: 2",
    ),
    (
        "index-negative",
        "claims.groups[-1]",
        {"groups": ["a"]},
        "index out of range: -1",
    ),
    (
        "index-not-int",
        "claims.groups['a']",
        {"groups": ["a"]},
        "a list index must be an int",
    ),
    (
        "index-bool",
        "claims.groups[true]",
        {"groups": ["a"]},
        "a list index must be an int, not a bool",
    ),
    ("none-value", "claims.?nope.value()", {}, "optional.none() dereference"),
    (
        "or-value-on-plain",
        "claims.sub.orValue('x')",
        {"sub": SECRET},
        "no such overload: string.orValue()",
    ),
    (
        "substring-range",
        "claims.sub.substring(50)",
        {"sub": SECRET},
        "substring: index out of range: 50",
    ),
    (
        "substring-reversed",
        "claims.sub.substring(3, 1)",
        {"sub": SECRET},
        "substring: invalid substring range: start 3 > end 1",
    ),
    (
        "char-at-range",
        "claims.sub.charAt(-1)",
        {"sub": SECRET},
        "charAt: index out of range: -1",
    ),
    (
        "index-of-offset-range",
        "claims.sub.indexOf('a', 99)",
        {"sub": SECRET},
        "indexOf: index out of range: 99",
    ),
    ("bad-regex", "claims.sub.matches('[')", {"sub": SECRET}, "match error"),
    (
        "mixed-arithmetic",
        "claims.count + 0.5",
        {"count": 1},
        "no such overload: int + double",
    ),
    (
        "result-not-json",
        "b'bytes'",
        {},
        "the result is a bytes, which has no json form",
    ),
    ("result-type", "type(claims)", {}, "the result is a type, which has no json form"),
    ("duplicate-map-key", "{'a': 1, 'a': 2}", {}, "duplicate map key: 'a'"),
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
    assert message.startswith(f"cel: {PATH}: ")
    assert fragment in message
    detail = message.removeprefix(f"cel: {PATH}: ")
    assert detail[0].islower()
    assert SECRET not in message
    assert "\n" not in message


ACTIVATION_FAILURES = [
    ("variable-missing", {}, "no value for variable 'claims'"),
    (
        "variable-not-json",
        {"claims": {1, 2}},
        "variable 'claims': a value of type set is not json",
    ),
]


@pytest.mark.parametrize(
    ("activation", "fragment"),
    [case[1:] for case in ACTIVATION_FAILURES],
    ids=[case[0] for case in ACTIVATION_FAILURES],
)
def test_activation_failures(activation: dict[str, Any], fragment: str) -> None:
    expression = compile_expression(
        "claims.sub", variables=("claims",), field_path=PATH
    )
    with pytest.raises(
        ExpressionError, match=f"^{re.escape(f'cel: {PATH}: {fragment}')}$"
    ):
        expression.evaluate(activation)


def test_a_non_json_value_inside_the_claims_fails_only_when_reached() -> None:
    expression = compile_expression("claims.x", variables=("claims",), field_path=PATH)
    assert expression.evaluate({"claims": {"x": 1, "y": object()}}) == 1
    with pytest.raises(ExpressionError, match="a value of type object is not json"):
        expression.evaluate({"claims": {"x": object()}})


def test_deeply_nested_claims_are_an_expression_error() -> None:
    nested: Any = "leaf"
    for _ in range(5000):
        nested = [nested]
    expression = compile_expression("claims.x", variables=("claims",), field_path=PATH)
    with pytest.raises(ExpressionError, match="nests too deeply"):
        expression.evaluate({"claims": {"x": nested}})


# --------------------------------------------------------------------------
# Compile failures: ConfigError naming the path, the problem and its position


COMPILE_FAILURES = [
    (
        "syntax-end",
        "claims.hd ==",
        ("claims",),
        ["syntax error at line 1, column 13: unexpected end of expression"],
    ),
    (
        "syntax-token",
        "claims.(hd)",
        ("claims",),
        ["syntax error at line 1, column 8: unexpected '('"],
    ),
    (
        "syntax-character",
        "claims.hd = 'x'",
        ("claims",),
        ["syntax error at line 1, column 11: unexpected character '='"],
    ),
    (
        "syntax-second-line",
        "claims.hd ==\n  'a' +",
        ("claims",),
        ["syntax error at line 2, column 8: unexpected end of expression"],
    ),
    (
        "syntax-empty",
        "",
        ("claims",),
        ["syntax error at line 1, column 1: unexpected end of expression"],
    ),
    (
        "user-in-claims-rule",
        "user.username == 'x'",
        ("claims",),
        ["undeclared reference to 'user' (line 1, column 1)"],
    ),
    (
        "claims-in-user-rule",
        "claims.sub == user.username",
        ("user",),
        ["undeclared reference to 'claims' (line 1, column 1)"],
    ),
    (
        "unknown-variable-in-macro",
        "claims.groups.all(g, h)",
        ("claims",),
        ["undeclared reference to 'h' (line 1, column 22)"],
    ),
    (
        "macro-variable-out-of-scope",
        "claims.groups.all(g, true) && g",
        ("claims",),
        ["undeclared reference to 'g' (line 1, column 31)"],
    ),
    (
        "unknown-function",
        "lower(claims.sub)",
        ("claims",),
        ["undeclared reference to function 'lower' (line 1, column 1)"],
    ),
    (
        "unknown-method",
        "claims.sub.toUpper()",
        ("claims",),
        ["undeclared reference to function 'toUpper' (line 1, column 12)"],
    ),
    (
        "unknown-namespace-function",
        "sets.union(claims.a, [])",
        ("claims",),
        ["undeclared reference to function 'sets.union'"],
    ),
    (
        "namespace-alone",
        "optional.none",
        ("claims",),
        ["undeclared reference to 'optional'"],
    ),
    (
        "wrong-arity-method",
        "claims.sub.split()",
        ("claims",),
        ["'split' takes 2 or 3 arguments (a method's receiver counts as one), got 1"],
    ),
    (
        "wrong-arity-function",
        "size(claims.a, claims.b)",
        ("claims",),
        ["'size' takes 1 arguments"],
    ),
    (
        "wrong-arity-or-value",
        "claims.?a.orValue()",
        ("claims",),
        ["'orValue' takes 2 arguments"],
    ),
    (
        "wrong-arity-macro",
        "claims.groups.map(g)",
        ("claims",),
        ["map() takes 2 or 3 arguments, got 1"],
    ),
    (
        "macro-variable-not-a-name",
        "claims.groups.all('g', true)",
        ("claims",),
        ["the first argument of all() must be a variable name"],
    ),
    (
        "has-not-a-selection",
        "has(claims)",
        ("claims",),
        ["has() takes one field selection such as has(claims.email)"],
    ),
    (
        "has-index",
        "has(claims['email'])",
        ("claims",),
        ["has() takes one field selection"],
    ),
    (
        "has-optional",
        "has(claims.?email)",
        ("claims",),
        ["has() takes one field selection"],
    ),
    (
        "invalid-literal",
        "claims.n == 99999999999999999999",
        ("claims",),
        ["invalid literal '99999999999999999999' (line 1, column 13)"],
    ),
    (
        "message-construction",
        "Foo{a: 1}",
        ("claims",),
        ["message construction is not supported"],
    ),
    (
        "root-scope-name",
        ".claims.sub",
        ("claims",),
        ["a leading '.' (root-scope name) is not supported"],
    ),
    (
        "every-problem-reported",
        "user.a + foo(claims.b)",
        ("claims",),
        [
            "undeclared reference to 'user' (line 1, column 1)",
            "undeclared reference to function 'foo' (line 1, column 10)",
        ],
    ),
]


@pytest.mark.parametrize(
    ("source", "variables", "fragments"),
    [case[1:] for case in COMPILE_FAILURES],
    ids=[case[0] for case in COMPILE_FAILURES],
)
def test_compile_failures(
    source: str, variables: tuple[str, ...], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_expression(source, variables=variables, field_path=PATH)
    problems = caught.value.problems
    assert len(problems) == len(fragments)
    for problem, fragment in zip(problems, fragments, strict=True):
        assert problem.startswith(f"config: {PATH}: ")
        assert fragment in problem


def test_invalid_variable_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("invalid variable name 'a.b'")):
        compile_expression("true", variables=("a.b",), field_path=PATH)


# --------------------------------------------------------------------------
# selected_fields: read from the tree, for the email_verified rule


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
    (
        "shadowed-variable",
        "claims.groups.exists(claims, claims.email == 'x')",
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
        "function-argument",
        "size(claims.groups) > 0",
        ("claims",),
        {("claims", "groups")},
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
# The compiled value


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


def test_evaluation_does_not_parse() -> None:
    expression = compile_expression(
        "claims.groups.map(g, g + '!')", variables=("claims",), field_path=PATH
    )
    before = cel._parser.cache_info()
    for _ in range(3):
        assert expression.evaluate({"claims": CLAIMS}) == ["dev!", "admin!"]
    assert cel._parser.cache_info() == before


def test_one_compiled_expression_serves_many_activations() -> None:
    expression = compile_expression(
        "claims.?email.orValue(claims.sub)", variables=("claims",), field_path=PATH
    )
    assert expression.evaluate({"claims": {"email": "a@b", "sub": "s"}}) == "a@b"
    assert expression.evaluate({"claims": {"sub": "s"}}) == "s"
    with pytest.raises(ExpressionError, match="no such key: 'sub'"):
        expression.evaluate({"claims": {}})


def test_a_hand_built_value_cannot_be_evaluated() -> None:
    fake = CompiledExpression(source="claims.sub", field_path=PATH)
    with pytest.raises(ExpressionError, match="expression was not compiled"):
        fake.evaluate({"claims": CLAIMS})


def test_the_activation_is_not_modified() -> None:
    claims: dict[str, Any] = {"groups": ["a"], "m": {"k": [1]}}
    snapshot = repr(claims)
    run("claims.groups + ['b']", claims)
    run("claims.m.k.map(x, x + 1)", claims)
    assert repr(claims) == snapshot
    assert type(claims["groups"][0]) is str


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
            "claims",
        ]
    )
]

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
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
    ]
)
RANDOM_CLAIMS = st.dictionaries(
    CLAIM_NAMES | st.text(max_size=5), JSON_VALUES, max_size=8
)


@settings(max_examples=150, deadline=None, database=None)
@given(claims=RANDOM_CLAIMS)
def test_random_claims_give_a_value_or_an_expression_error(
    claims: dict[str, Any],
) -> None:
    for expression in PROPERTY_EXPRESSIONS:
        try:
            result = expression.evaluate({"claims": claims})
        except ExpressionError as err:
            message = str(err)
        else:
            assert_plain(result)
            continue
        assert message.startswith(f"cel: {expression.field_path}: ")
        assert "\n" not in message


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
