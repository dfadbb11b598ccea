"""Configuration loaders: the legacy ``--oidc-*`` flags and the structured file.

The file cases are kube-apiserver's validation rules, one case per rule, each
asserting the exact field path and wording kube-apiserver uses. YAML is
written as text, the way an operator writes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from textwrap import dedent, indent

import pytest
import trustme

from proxy.cel import CompiledExpression
from proxy.config import (
    ALLOWED_SIGNING_ALGS,
    DEFAULT_SIGNING_ALGS,
    FILE_SIGNING_ALGS,
    MAX_AUTHENTICATORS,
    AdmissionSettings,
    AuthConfig,
    CacheSettings,
    ClaimValidationRule,
    KeySetSettings,
    add_auth_arguments,
    apply_tuning_args,
    auth_config_from_args,
    load_authentication_config,
    parse_authentication_config,
)
from proxy.errors import ConfigError

ISSUER_URL = "https://issuer.example.com"
SRC = "auth.yaml"


@pytest.fixture(scope="module")
def ca_pem() -> str:
    return trustme.CA().cert_pem.bytes().decode()


def parse_argv(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kube-oidc-gate")
    add_auth_arguments(parser)
    return parser.parse_args(argv)


def from_argv(argv: list[str], *, allow_empty: bool = False) -> AuthConfig | None:
    return auth_config_from_args(parse_argv(argv), allow_empty=allow_empty)


def flags_config(*extra: str) -> AuthConfig:
    config = from_argv(
        ["--oidc-issuer-url", ISSUER_URL, "--oidc-client-id", "kubectl", *extra]
    )
    assert config is not None
    return config


def flag_problems(argv: list[str]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as excinfo:
        from_argv(argv)
    return excinfo.value.problems


def legacy_problems(*extra: str) -> tuple[str, ...]:
    return flag_problems(
        ["--oidc-issuer-url", ISSUER_URL, "--oidc-client-id", "k", *extra]
    )


# --------------------------------------------------------------------------
# Form 1: legacy flags
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "claim", "prefix"),
    [
        ([], "sub", f"{ISSUER_URL}#"),
        (["--oidc-username-claim", "sub"], "sub", f"{ISSUER_URL}#"),
        (
            ["--oidc-username-claim", "preferred_username"],
            "preferred_username",
            f"{ISSUER_URL}#",
        ),
        (["--oidc-username-prefix", ""], "sub", f"{ISSUER_URL}#"),
        (["--oidc-username-claim", "email"], "email", ""),
        (["--oidc-username-prefix", "-"], "sub", ""),
        (
            ["--oidc-username-claim", "email", "--oidc-username-prefix", "-"],
            "email",
            "",
        ),
        (["--oidc-username-prefix", "oidc:"], "sub", "oidc:"),
        (
            ["--oidc-username-claim", "email", "--oidc-username-prefix", "okta:"],
            "email",
            "okta:",
        ),
    ],
    ids=[
        "default-sub-gets-issuer-hash",
        "explicit-sub-gets-issuer-hash",
        "other-claim-gets-issuer-hash",
        "empty-prefix-counts-as-unset",
        "email-gets-no-prefix",
        "dash-means-no-prefix",
        "email-and-dash",
        "explicit-prefix-verbatim",
        "email-explicit-prefix-verbatim",
    ],
)
def test_legacy_username_prefix_defaults(
    argv: list[str], claim: str, prefix: str
) -> None:
    (authenticator,) = flags_config(*argv).authenticators
    username = authenticator.claim_mappings.username
    assert (username.claim, username.prefix, username.expression) == (
        claim,
        prefix,
        None,
    )


def test_legacy_flags_map_to_one_authenticator() -> None:
    config = flags_config(
        "--oidc-groups-claim",
        "groups",
        "--oidc-groups-prefix",
        "oidc:",
        "--oidc-required-claim",
        "hd=example.com",
    )
    assert config.form == "flags"
    (a,) = config.authenticators
    assert a.source == "--oidc-*"
    assert a.issuer.url == ISSUER_URL
    assert a.issuer.audiences == ("kubectl",)
    assert a.issuer.audience_match_policy == "MatchAny"
    assert a.issuer.discovery_url is None
    assert a.issuer.certificate_authority is None
    assert a.issuer.signing_algs == DEFAULT_SIGNING_ALGS == ("RS256",)
    assert a.claim_mappings.groups is not None
    assert (a.claim_mappings.groups.claim, a.claim_mappings.groups.prefix) == (
        "groups",
        "oidc:",
    )
    assert a.claim_mappings.uid is None
    assert a.claim_mappings.extra == ()
    assert a.claim_validation_rules == (
        ClaimValidationRule(claim="hd", required_value="example.com"),
    )
    assert a.user_validation_rules == ()


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [([], ""), (["--oidc-groups-prefix", "g:"], "g:")],
    ids=["groups-prefix-default-empty", "groups-prefix-verbatim"],
)
def test_legacy_groups(argv: list[str], prefix: str) -> None:
    (a,) = flags_config("--oidc-groups-claim", "roles", *argv).authenticators
    assert a.claim_mappings.groups is not None
    assert (a.claim_mappings.groups.claim, a.claim_mappings.groups.prefix) == (
        "roles",
        prefix,
    )


def test_legacy_without_groups_claim_maps_no_groups() -> None:
    (a,) = flags_config().authenticators
    assert a.claim_mappings.groups is None


def test_legacy_groups_prefix_needs_groups_claim() -> None:
    (problem,) = legacy_problems("--oidc-groups-prefix", "g:")
    assert "--oidc-groups-prefix needs --oidc-groups-claim" in problem


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--oidc-required-claim", "hd=example.com"], [("hd", "example.com")]),
        (
            [
                "--oidc-required-claim",
                "hd=example.com",
                "--oidc-required-claim",
                "tier=gold",
            ],
            [("hd", "example.com"), ("tier", "gold")],
        ),
        (["--oidc-required-claim", "a=b,c=d"], [("a", "b"), ("c", "d")]),
        (
            ["--oidc-required-claim", "a=b,c=d", "--oidc-required-claim", "e=f"],
            [("a", "b"), ("c", "d"), ("e", "f")],
        ),
        (["--oidc-required-claim", " a = b , c=d "], [("a", "b"), ("c", "d")]),
        (["--oidc-required-claim", "a=x=y"], [("a", "x=y")]),
        (["--oidc-required-claim", "a="], [("a", "")]),
        (
            ["--oidc-required-claim", "a=b", "--oidc-required-claim", "a=b"],
            [("a", "b")],
        ),
    ],
    ids=[
        "one",
        "repeated-flag",
        "comma-form",
        "comma-and-repeated",
        "spaces-trimmed",
        "value-with-equals",
        "empty-value",
        "same-pair-twice",
    ],
)
def test_legacy_required_claims(
    argv: list[str], expected: list[tuple[str, str]]
) -> None:
    (a,) = flags_config(*argv).authenticators
    assert [(r.claim, r.required_value) for r in a.claim_validation_rules] == expected
    assert all(
        r.expression is None and r.message == "" for r in a.claim_validation_rules
    )


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("hd", '"hd": malformed pair, expected KEY=VALUE'),
        ("=example.com", '"=example.com": malformed pair'),
        ("a=b,c", '"c": malformed pair'),
        ("a=b,a=c", 'claim "a" is required twice with different values ("b" and "c")'),
    ],
    ids=["no-equals", "no-key", "second-pair-malformed", "conflicting-values"],
)
def test_legacy_required_claim_errors(value: str, needle: str) -> None:
    (problem,) = legacy_problems("--oidc-required-claim", value)
    assert problem.startswith("config: --oidc-required-claim: ")
    assert needle in problem


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ("RS256",)),
        (["--oidc-signing-algs", "ES256"], ("ES256",)),
        (["--oidc-signing-algs", "RS256,ES256,PS512"], ("RS256", "ES256", "PS512")),
        (
            ["--oidc-signing-algs", "RS256", "--oidc-signing-algs", "EdDSA"],
            ("RS256", "EdDSA"),
        ),
        (["--oidc-signing-algs", " RS256 , RS256,ES384 "], ("RS256", "ES384")),
    ],
    ids=["default-rs256", "one", "list", "repeated-flag", "trimmed-and-deduplicated"],
)
def test_legacy_signing_algs(argv: list[str], expected: tuple[str, ...]) -> None:
    (a,) = flags_config(*argv).authenticators
    assert a.issuer.signing_algs == expected


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("HS256", ['"HS256" is refused', "symmetric", "public key"]),
        ("RS256,HS512", ['"HS512" is refused', "symmetric"]),
        ("none", ['"none" is refused', "unsigned"]),
        ("RS1", ['"RS1" is not allowed', "allowed: ES256"]),
        ("rs256", ['"rs256" is not allowed']),
        ("", ["no algorithm given"]),
    ],
    ids=["hs256", "hs512-in-list", "none", "unknown", "wrong-case", "empty"],
)
def test_legacy_signing_algs_refused(value: str, needles: list[str]) -> None:
    (problem,) = legacy_problems("--oidc-signing-algs", value)
    assert problem.startswith("config: --oidc-signing-algs: ")
    for needle in needles:
        assert needle in problem


def test_allowed_signing_algs_are_asymmetric() -> None:
    assert not any(
        alg.startswith("HS") or alg == "none" for alg in ALLOWED_SIGNING_ALGS
    )
    assert set(FILE_SIGNING_ALGS) == ALLOWED_SIGNING_ALGS


def test_legacy_ca_file_read(tmp_path: Path, ca_pem: str) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca_pem)
    (a,) = flags_config("--oidc-ca-file", str(ca_file)).authenticators
    assert a.issuer.certificate_authority == ca_pem


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file; give the PEM bundle of the CA"),
        ("directory", "is a directory, not a file; give the PEM bundle"),
        (
            b"hello, not a certificate\n",
            "not a valid PEM CA bundle: no PEM CERTIFICATE block",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "not a valid PEM CA bundle: a CERTIFICATE block does not parse",
        ),
        (b"\xff\xfe\x00binary", "not a PEM file (not UTF-8 text)"),
    ],
    ids=["missing", "directory", "not-pem", "broken-certificate", "binary"],
)
def test_legacy_ca_file_errors(
    tmp_path: Path, content: bytes | str | None, needle: str
) -> None:
    path = tmp_path / "ca.pem"
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    (problem,) = legacy_problems("--oidc-ca-file", str(path))
    assert problem.startswith(f"config: --oidc-ca-file {json.dumps(str(path))}: ")
    assert needle in problem


def test_legacy_private_key_only_is_not_a_ca(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(trustme.CA().private_key_pem.bytes())
    (problem,) = legacy_problems("--oidc-ca-file", str(path))
    assert "no PEM CERTIFICATE block" in problem


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--oidc-issuer-url", ISSUER_URL],
            "--oidc-issuer-url and --oidc-client-id must be given together: "
            "--oidc-client-id is missing",
        ),
        (
            ["--oidc-client-id", "kubectl"],
            "--oidc-issuer-url and --oidc-client-id must be given together: "
            "--oidc-issuer-url is missing",
        ),
        (
            ["--oidc-issuer-url", "", "--oidc-client-id", "kubectl"],
            "--oidc-issuer-url is missing",
        ),
        (
            ["--oidc-username-claim", "email"],
            "--oidc-username-claim: need --oidc-issuer-url and --oidc-client-id",
        ),
    ],
    ids=["issuer-only", "client-id-only", "empty-issuer", "other-flag-only"],
)
def test_legacy_issuer_and_client_id_go_together(argv: list[str], needle: str) -> None:
    (problem,) = flag_problems(argv)
    assert needle in problem


def test_legacy_empty_username_claim_refused() -> None:
    (problem,) = legacy_problems("--oidc-username-claim", "")
    assert problem == "config: --oidc-username-claim: must not be empty"


@pytest.mark.parametrize(
    "missing",
    ["--oidc-client-id", "--oidc-issuer-url"],
    ids=["client-id-missing", "issuer-missing"],
)
def test_a_missing_flag_does_not_hide_the_other_problems(missing: str) -> None:
    given = {"--oidc-issuer-url": "http://issuer.example.com", "--oidc-client-id": "k"}
    del given[missing]
    problems = flag_problems(
        [
            *(item for pair in given.items() for item in pair),
            "--oidc-signing-algs",
            "HS256",
            "--oidc-groups-prefix",
            "g:",
            "--oidc-ca-file",
            "/nonexistent/ca.pem",
        ]
    )
    expected = [
        f"{missing} is missing",
        "--oidc-groups-prefix needs --oidc-groups-claim",
        '--oidc-signing-algs: "HS256" is refused',
        '--oidc-ca-file "/nonexistent/ca.pem": no such file',
    ]
    if missing == "--oidc-client-id":
        expected.insert(1, "URL scheme must be https")
    assert len(problems) == len(expected), problems
    for problem, needle in zip(problems, expected, strict=True):
        assert needle in problem


def test_legacy_problems_are_all_listed() -> None:
    problems = flag_problems(
        [
            "--oidc-issuer-url",
            "http://issuer.example.com",
            "--oidc-client-id",
            "k",
            "--oidc-signing-algs",
            "HS256",
            "--oidc-required-claim",
            "bad",
            "--clock-skew",
            "-1",
        ]
    )
    assert len(problems) == 4
    assert any("--oidc-issuer-url" in p for p in problems)
    assert any("--oidc-signing-algs" in p for p in problems)
    assert any("--oidc-required-claim" in p for p in problems)
    assert any("--clock-skew" in p for p in problems)


# Issuer URL rules are shared by the flags and the file: one table for both.
URL_CASES = [
    ("https://issuer.example.com", None),
    ("https://issuer.example.com/oauth2/default", None),
    ("https://issuer.example.com:8443/", None),
    ("http://127.0.0.1:8080", None),
    ("http://127.3.4.5/realms/dev", None),
    ("http://[::1]:8080", None),
    ("http://localhost:5556/dex", None),
    ("http://issuer.example.com", "URL scheme must be https"),
    ("http://10.0.0.1", "URL scheme must be https"),
    ("http://localhost.example.com", "URL scheme must be https"),
    ("ftp://issuer.example.com", "URL scheme must be https"),
    ("https://issuer.example.com?tenant=a", "URL must not contain a query"),
    ("https://issuer.example.com#frag", "URL must not contain a fragment"),
    (
        "https://user:pw@issuer.example.com",
        "URL must not contain a username or password",
    ),
    ("https://user@issuer.example.com", "URL must not contain a username or password"),
    ("https:///path-only", "URL must contain a host"),
    ("https://issuer.example.com:port", "Port could not be cast"),
]
URL_IDS = [
    "https",
    "https-path",
    "https-port",
    "http-ipv4-loopback",
    "http-loopback-range",
    "http-ipv6-loopback",
    "http-localhost",
    "http-public-host",
    "http-private-ip",
    "http-localhost-lookalike",
    "ftp",
    "query",
    "fragment",
    "user-and-password",
    "user",
    "no-host",
    "bad-port",
]


@pytest.mark.parametrize(("url", "problem"), URL_CASES, ids=URL_IDS)
def test_issuer_url_rules_flags(url: str, problem: str | None) -> None:
    argv = ["--oidc-issuer-url", url, "--oidc-client-id", "k"]
    if problem is None:
        config = from_argv(argv)
        assert config is not None
        assert config.authenticators[0].issuer.url == url
    else:
        problems = flag_problems(argv)
        assert any(
            p.startswith(f"config: --oidc-issuer-url: {json.dumps(url)}: {problem}")
            for p in problems
        ), problems


@pytest.mark.parametrize(("url", "problem"), URL_CASES, ids=URL_IDS)
def test_issuer_url_rules_file(url: str, problem: str | None) -> None:
    text = doc(entry(issuer=f"url: {json.dumps(url)}\naudiences: [k]"))
    if problem is None:
        assert parse(text).authenticators[0].issuer.url == url
    else:
        problems = file_problems(text)
        expected = (
            f"config: {SRC}: jwt[0].issuer.url: Invalid value: {json.dumps(url)}: "
            f"{problem}"
        )
        assert any(p.startswith(expected) for p in problems), problems


# --------------------------------------------------------------------------
# Mutual exclusion, the empty configuration, tunables
# --------------------------------------------------------------------------


def test_file_and_flags_are_mutually_exclusive(tmp_path: Path) -> None:
    problems = flag_problems(
        [
            "--authentication-config",
            str(tmp_path / "auth.yaml"),
            "--oidc-issuer-url",
            ISSUER_URL,
            "--oidc-client-id",
            "k",
        ]
    )
    assert len(problems) == 1
    assert problems[0].startswith(
        "config: --authentication-config and --oidc-issuer-url are mutually exclusive: "
    )
    assert "--oidc-client-id" in problems[0]


def test_file_and_any_oidc_flag_are_mutually_exclusive(tmp_path: Path) -> None:
    (problem,) = flag_problems(
        [
            "--authentication-config",
            str(tmp_path / "a.yaml"),
            "--oidc-username-prefix",
            "-",
        ]
    )
    assert problem.startswith(
        "config: --authentication-config and --oidc-username-prefix are mutually "
        "exclusive"
    )


def test_neither_form_is_refused() -> None:
    (problem,) = flag_problems([])
    assert "--authentication-config" in problem
    assert "--oidc-issuer-url" in problem


def test_neither_form_allowed_when_the_caller_supplies_it() -> None:
    assert from_argv([], allow_empty=True) is None


def test_neither_form_still_checks_tunables() -> None:
    with pytest.raises(ConfigError, match="--clock-skew"):
        from_argv(["--clock-skew", "-5"], allow_empty=True)


def test_tunable_defaults_come_from_the_dataclasses() -> None:
    config = flags_config()
    assert config.keyset == KeySetSettings()
    assert config.cache == CacheSettings()
    assert config.admission == AdmissionSettings()
    assert config.leeway == AuthConfig(authenticators=()).leeway
    assert config.keyset.unknown_kid_cooldown == 30.0


def test_tunables_applied() -> None:
    config = flags_config(
        "--jwks-unknown-kid-cooldown",
        "45",
        "--jwks-fetch-timeout",
        "2.5",
        "--token-cache-size",
        "10",
        "--token-cache-success-ttl",
        "0",
        "--token-cache-failure-ttl",
        "3",
        "--clock-skew",
        "0",
        "--new-tokens-per-turn",
        "0",
        "--new-token-queue",
        "64",
    )
    assert config.keyset == KeySetSettings(unknown_kid_cooldown=45.0, fetch_timeout=2.5)
    assert config.admission == AdmissionSettings(per_turn=0, max_waiting=64)
    assert config.cache == CacheSettings(
        max_entries=10, success_ttl=0.0, failure_ttl=3.0
    )
    assert config.leeway == 0.0


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--jwks-unknown-kid-cooldown", "0", "greater than 0"),
        ("--jwks-unknown-kid-cooldown", "inf", "finite"),
        ("--jwks-fetch-timeout", "-1", "greater than 0"),
        ("--jwks-fetch-timeout", "nan", "finite"),
        ("--token-cache-size", "0", "integer of 1 or more"),
        ("--token-cache-success-ttl", "-1", "0 or more"),
        ("--token-cache-failure-ttl", "-0.5", "0 or more"),
        ("--clock-skew", "-1", "0 or more"),
        ("--new-tokens-per-turn", "-1", "integer of 0 or more"),
        ("--new-token-queue", "0", "integer of 1 or more"),
    ],
    ids=[
        "cooldown-zero",
        "cooldown-infinite",
        "timeout-negative",
        "timeout-nan",
        "cache-size-zero",
        "success-ttl-negative",
        "failure-ttl-negative",
        "clock-skew-negative",
        "per-turn-negative",
        "queue-zero",
    ],
)
def test_tunables_validated(flag: str, value: str, needle: str) -> None:
    (problem,) = legacy_problems(flag, value)
    assert problem.startswith(f"config: {flag}: ")
    assert needle in problem


def test_tunables_apply_to_the_file_form(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(doc(entry()))
    config = from_argv(["--authentication-config", str(path), "--clock-skew", "5"])
    assert config is not None
    assert config.form == "file"
    assert config.leeway == 5.0


def test_file_errors_come_through_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        from_argv(["--authentication-config", str(tmp_path / "missing.yaml")])


def test_apply_tuning_args() -> None:
    base = flags_config()
    ns = parse_argv(["--token-cache-size", "7"])
    tuned = apply_tuning_args(base, ns)
    assert tuned.cache.max_entries == 7
    assert tuned.authenticators == base.authenticators
    with pytest.raises(ConfigError, match="--token-cache-size"):
        apply_tuning_args(base, parse_argv(["--token-cache-size", "-3"]))


def test_help_states_defaults_and_caveats() -> None:
    parser = argparse.ArgumentParser(
        prog="kube-oidc-gate",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10_000),
    )
    add_auth_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "default 'sub'" in text
    assert "'<issuer-url>#'" in text
    assert "default RS256" in text
    assert (
        "symmetric algorithm would make the issuer's public key a signing secret"
        in text
    )
    assert "(default 30.0)" in text


# --------------------------------------------------------------------------
# Form 2: AuthenticationConfiguration file
# --------------------------------------------------------------------------

ISSUER = f"url: {ISSUER_URL}\naudiences: [kubernetes]"
USERNAME = 'username: {claim: sub, prefix: ""}'


def entry(*, issuer: str = ISSUER, mappings: str = USERNAME, more: str = "") -> str:
    """One ``jwt[]`` item as YAML text; ``more`` adds top-level keys of the item."""
    text = (
        f"issuer:\n{indent(issuer, '  ')}\nclaimMappings:\n{indent(mappings, '  ')}\n"
    )
    return text + (more.rstrip("\n") + "\n" if more else "")


def doc(*entries: str, version: str = "v1", tail: str = "") -> str:
    out = (
        f"apiVersion: apiserver.config.k8s.io/{version}\n"
        "kind: AuthenticationConfiguration\n"
    )
    if entries:
        out += "jwt:\n"
    for item in entries:
        first, *rest = item.rstrip("\n").split("\n")
        out += f"- {first}\n" + "".join(f"  {line}\n" for line in rest)
    return out + dedent(tail)


def parse(text: str) -> AuthConfig:
    return parse_authentication_config(text, source=SRC)


def file_problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as excinfo:
        parse(text)
    return excinfo.value.problems


def expr(compiled: CompiledExpression | None) -> tuple[str, str]:
    assert compiled is not None
    return (compiled.source, compiled.field_path)


def full_file(version: str, ca_pem: str) -> str:
    ca = indent(ca_pem.strip(), " " * 6) + "\n"
    return dedent(
        f"""\
        apiVersion: apiserver.config.k8s.io/{version}
        kind: AuthenticationConfiguration
        jwt:
        - issuer:
            url: https://example.okta.com/oauth2/default
            discoveryURL: https://okta.internal/.well-known/openid-configuration
            certificateAuthority: |
        CA_PEM
            audiences: [kubectl, "api://default"]
            audienceMatchPolicy: MatchAny
            egressSelectorType: controlplane
          claimValidationRules:
          - claim: hd
            requiredValue: example.com
          - expression: "claims.exp - claims.nbf <= 86400"
            message: tokens may live one day at most
          claimMappings:
            username:
              expression: "claims.email_verified == true ? claims.email : ''"
            groups:
              claim: groups
              prefix: "okta:"
            uid:
              claim: uid
            extra:
            - key: example.com/tenant
              valueExpression: claims.tid
            - key: example.com/roles
              valueExpression: "claims.?roles.orValue([])"
          userValidationRules:
          - expression: "!user.username.startsWith('system:')"
            message: username cannot use the reserved system prefix
        - issuer:
            url: http://127.0.0.1:5556/dex
            audiences: [kubernetes]
          claimMappings:
            username:
              claim: sub
              prefix: ""
            groups:
              expression: "claims.groups.map(g, 'dex:' + g)"
            uid:
              expression: claims.sub
        anonymous:
          enabled: false
        """
    ).replace("CA_PEM\n", ca)


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha1"])
def test_complete_valid_file(tmp_path: Path, ca_pem: str, version: str) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(full_file(version, ca_pem))
    config = load_authentication_config(str(path))
    assert config.form == "file"
    first, second = config.authenticators

    assert first.source == "jwt[0]"
    assert first.issuer.url == "https://example.okta.com/oauth2/default"
    assert (
        first.issuer.discovery_url
        == "https://okta.internal/.well-known/openid-configuration"
    )
    assert first.issuer.certificate_authority is not None
    assert first.issuer.certificate_authority.strip() == ca_pem.strip()
    assert first.issuer.audiences == ("kubectl", "api://default")
    assert first.issuer.audience_match_policy == "MatchAny"
    assert first.issuer.signing_algs == FILE_SIGNING_ALGS

    claim_rule, expr_rule = first.claim_validation_rules
    assert claim_rule == ClaimValidationRule(claim="hd", required_value="example.com")
    assert expr(expr_rule.expression) == (
        "claims.exp - claims.nbf <= 86400",
        "jwt[0].claimValidationRules[1].expression",
    )
    assert expr_rule.message == "tokens may live one day at most"
    assert (expr_rule.claim, expr_rule.required_value) == (None, None)

    m = first.claim_mappings
    assert m.username.claim is None
    assert m.username.prefix is None
    assert expr(m.username.expression) == (
        "claims.email_verified == true ? claims.email : ''",
        "jwt[0].claimMappings.username.expression",
    )
    assert m.groups is not None
    assert (m.groups.claim, m.groups.prefix, m.groups.expression) == (
        "groups",
        "okta:",
        None,
    )
    assert m.uid is not None
    assert (m.uid.claim, m.uid.expression) == ("uid", None)
    assert [(x.key, expr(x.value_expression)) for x in m.extra] == [
        (
            "example.com/tenant",
            ("claims.tid", "jwt[0].claimMappings.extra[0].valueExpression"),
        ),
        (
            "example.com/roles",
            (
                "claims.?roles.orValue([])",
                "jwt[0].claimMappings.extra[1].valueExpression",
            ),
        ),
    ]
    (user_rule,) = first.user_validation_rules
    assert expr(user_rule.expression) == (
        "!user.username.startsWith('system:')",
        "jwt[0].userValidationRules[0].expression",
    )
    assert user_rule.message == "username cannot use the reserved system prefix"

    assert second.source == "jwt[1]"
    assert second.issuer.url == "http://127.0.0.1:5556/dex"
    assert second.issuer.audience_match_policy == ""
    assert second.issuer.discovery_url is None
    assert second.issuer.certificate_authority is None
    m2 = second.claim_mappings
    assert (m2.username.claim, m2.username.prefix) == ("sub", "")
    assert m2.groups is not None
    assert m2.groups.prefix is None
    assert expr(m2.groups.expression) == (
        "claims.groups.map(g, 'dex:' + g)",
        "jwt[1].claimMappings.groups.expression",
    )
    assert m2.uid is not None
    assert expr(m2.uid.expression) == (
        "claims.sub",
        "jwt[1].claimMappings.uid.expression",
    )
    assert second.claim_validation_rules == ()
    assert second.user_validation_rules == ()


def test_minimal_file_without_expressions(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(doc(entry()))
    (a,) = load_authentication_config(str(path)).authenticators
    assert a.issuer.url == ISSUER_URL
    assert a.issuer.audiences == ("kubernetes",)
    assert a.issuer.audience_match_policy == ""
    assert (a.claim_mappings.username.claim, a.claim_mappings.username.prefix) == (
        "sub",
        "",
    )
    assert a.claim_mappings.groups is None
    assert a.claim_mappings.uid is None


def test_json_file() -> None:
    text = json.dumps(
        {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "AuthenticationConfiguration",
            "jwt": [
                {
                    "issuer": {
                        "url": ISSUER_URL,
                        "audiences": ["a", "b"],
                        "audienceMatchPolicy": "MatchAny",
                    },
                    "claimMappings": {
                        "username": {"claim": "email", "prefix": ""},
                        "groups": {"claim": "groups", "prefix": ""},
                    },
                    "claimValidationRules": [
                        {"claim": "hd", "requiredValue": "example.com"}
                    ],
                }
            ],
        }
    )
    (a,) = parse(text).authenticators
    assert a.issuer.audiences == ("a", "b")
    assert a.claim_validation_rules == (
        ClaimValidationRule(claim="hd", required_value="example.com"),
    )


def test_yaml_flow_mapping_is_not_mistaken_for_json() -> None:
    text = (
        "{apiVersion: apiserver.config.k8s.io/v1, kind: AuthenticationConfiguration, "
        f"jwt: [{{issuer: {{url: '{ISSUER_URL}', audiences: [k]}}, "
        "claimMappings: {username: {claim: sub, prefix: ''}}}]}"
    )
    assert parse(text).authenticators[0].issuer.audiences == ("k",)


def test_most_authenticators_accepted() -> None:
    entries = [
        entry(issuer=f"url: https://issuer{i}.example.com\naudiences: [k]")
        for i in range(MAX_AUTHENTICATORS)
    ]
    assert len(parse(doc(*entries)).authenticators) == 64


def test_too_many_authenticators_refused() -> None:
    entries = [
        entry(issuer=f"url: https://issuer{i}.example.com\naudiences: [k]")
        for i in range(MAX_AUTHENTICATORS + 1)
    ]
    assert file_problems(doc(*entries)) == (
        f"config: {SRC}: jwt: Too many: 65: must have at most 64 items",
    )


def test_anonymous_disabled_accepted() -> None:
    text = doc(entry(), tail="anonymous:\n  enabled: false\n")
    assert len(parse(text).authenticators) == 1


def issuer_with(line: str) -> str:
    return f"{ISSUER}\n{line}"


# (id, file text, expected problem (a prefix of it), number of problems)
VALIDATION_CASES: list[tuple[str, str, str, int]] = [
    # the document
    (
        "no-jwt",
        doc(),
        "jwt: Required value: at least one jwt authenticator is required",
        1,
    ),
    ("empty-jwt", doc(tail="jwt: []\n"), "jwt: Required value", 1),
    (
        "jwt-not-a-list",
        doc(tail="jwt: {}\n"),
        "jwt: Invalid type: expected array, got object",
        1,
    ),
    (
        "anonymous-enabled",
        doc(entry(), tail="anonymous:\n  enabled: true\n"),
        "anonymous.enabled: Forbidden: kube-oidc-gate never authenticates anonymous "
        "requests",
        1,
    ),
    (
        "anonymous-conditions-without-enabled",
        doc(
            entry(),
            tail="anonymous:\n  enabled: false\n  conditions: [{path: /livez}]\n",
        ),
        'anonymous.conditions: Invalid value: [{"path": "/livez"}]: enabled should be '
        "set to "
        "true when conditions are defined",
        1,
    ),
    (
        "unknown-top-field",
        doc(entry(), tail="metadata: {name: x}\n"),
        "metadata: Unknown field",
        1,
    ),
    (
        "unknown-nested-field",
        doc(entry(mappings='username: {claim: sub, prefix: "", claims: x}')),
        'jwt[0].claimMappings.username.claims: Unknown field (did you mean "claim"?)',
        1,
    ),
    (
        "field-names-are-case-sensitive",
        doc(entry(issuer=issuer_with("discoveryUrl: https://internal.example.com"))),
        'jwt[0].issuer.discoveryUrl: Unknown field (did you mean "discoveryURL"?)',
        1,
    ),
    (
        "wrong-type",
        doc(entry(issuer=f"url: {ISSUER_URL}\naudiences: kubernetes")),
        "jwt[0].issuer.audiences: Invalid type: expected array, got string",
        1,
    ),
    # issuer.url
    (
        "url-missing",
        doc(entry(issuer="audiences: [k]")),
        "jwt[0].issuer.url: Required value: URL is required",
        1,
    ),
    (
        "url-not-https",
        doc(entry(issuer="url: http://issuer.example.com\naudiences: [k]")),
        'jwt[0].issuer.url: Invalid value: "http://issuer.example.com": URL scheme '
        "must be https",
        1,
    ),
    (
        "url-query",
        doc(entry(issuer="url: https://issuer.example.com?a=b\naudiences: [k]")),
        'jwt[0].issuer.url: Invalid value: "https://issuer.example.com?a=b": '
        "URL must not contain a query",
        1,
    ),
    (
        "url-fragment",
        doc(entry(issuer="url: https://issuer.example.com#x\naudiences: [k]")),
        'jwt[0].issuer.url: Invalid value: "https://issuer.example.com#x": '
        "URL must not contain a fragment",
        1,
    ),
    (
        "url-userinfo",
        doc(entry(issuer="url: https://me@issuer.example.com\naudiences: [k]")),
        'jwt[0].issuer.url: Invalid value: "https://me@issuer.example.com": '
        "URL must not contain a username or password",
        1,
    ),
    (
        "url-duplicate",
        doc(entry(), entry()),
        f'jwt[1].issuer.url: Duplicate value: "{ISSUER_URL}"',
        1,
    ),
    # issuer.discoveryURL
    (
        "discovery-not-https",
        doc(entry(issuer=issuer_with("discoveryURL: http://internal.example.com/d"))),
        'jwt[0].issuer.discoveryURL: Invalid value: "http://internal.example.com/d": '
        "URL scheme must be https",
        1,
    ),
    (
        "discovery-same-as-url",
        doc(entry(issuer=issuer_with(f"discoveryURL: {ISSUER_URL}/"))),
        f'jwt[0].issuer.discoveryURL: Invalid value: "{ISSUER_URL}/": '
        "discoveryURL must be different from URL",
        1,
    ),
    (
        "discovery-duplicate",
        doc(
            entry(issuer=issuer_with("discoveryURL: https://internal.example.com/d")),
            entry(
                issuer="url: https://other.example.com\naudiences: [k]\n"
                "discoveryURL: https://internal.example.com/d"
            ),
        ),
        'jwt[1].issuer.discoveryURL: Duplicate value: "https://internal.example.com/d"',
        1,
    ),
    # issuer.certificateAuthority
    (
        "ca-not-pem",
        doc(entry(issuer=issuer_with("certificateAuthority: not a certificate"))),
        'jwt[0].issuer.certificateAuthority: Invalid value: "<omitted>": '
        "no PEM CERTIFICATE block found",
        1,
    ),
    # issuer.audiences and audienceMatchPolicy
    (
        "audiences-missing",
        doc(entry(issuer=f"url: {ISSUER_URL}")),
        "jwt[0].issuer.audiences: Required value: at least one jwt[0].issuer.audiences "
        "is required",
        1,
    ),
    (
        "audiences-empty",
        doc(entry(issuer=f"url: {ISSUER_URL}\naudiences: []")),
        "jwt[0].issuer.audiences: Required value",
        1,
    ),
    (
        "audience-empty-string",
        doc(entry(issuer=f'url: {ISSUER_URL}\naudiences: [""]')),
        "jwt[0].issuer.audiences[0]: Required value: audience can't be empty",
        1,
    ),
    (
        "audience-duplicate",
        doc(
            entry(
                issuer=(
                    f"url: {ISSUER_URL}\naudiences: [k, k]\naudienceMatchPolicy: "
                    "MatchAny"
                )
            )
        ),
        'jwt[0].issuer.audiences[1]: Duplicate value: "k"',
        1,
    ),
    (
        "policy-missing-with-two-audiences",
        doc(entry(issuer=f"url: {ISSUER_URL}\naudiences: [a, b]")),
        'jwt[0].issuer.audienceMatchPolicy: Invalid value: "": audienceMatchPolicy '
        "must be "
        "MatchAny for multiple audiences",
        1,
    ),
    (
        "policy-wrong-with-one-audience",
        doc(entry(issuer=issuer_with("audienceMatchPolicy: MatchAll"))),
        'jwt[0].issuer.audienceMatchPolicy: Invalid value: "MatchAll": '
        "audienceMatchPolicy "
        "must be empty or MatchAny for single audience",
        1,
    ),
    (
        "egress-selector-unknown",
        doc(entry(issuer=issuer_with("egressSelectorType: etcd"))),
        'jwt[0].issuer.egressSelectorType: Unsupported value: "etcd": supported '
        "values: "
        '"controlplane", "cluster"',
        1,
    ),
    # claimValidationRules
    (
        "rule-claim-and-expression",
        doc(entry(more='claimValidationRules: [{claim: hd, expression: "true"}]')),
        'jwt[0].claimValidationRules[0]: Invalid value: "hd": claim and expression '
        "can't "
        "both be set",
        1,
    ),
    (
        "rule-neither",
        doc(entry(more="claimValidationRules: [{message: hi}]")),
        "jwt[0].claimValidationRules[0]: Required value: claim or expression is "
        "required",
        1,
    ),
    (
        "rule-message-with-claim",
        doc(
            entry(
                more="claimValidationRules: [{claim: hd, requiredValue: x, message: m}]"
            )
        ),
        'jwt[0].claimValidationRules[0].message: Invalid value: "m": message can\'t '
        "be set when claim is set",
        1,
    ),
    (
        "rule-required-value-with-expression",
        doc(
            entry(
                more="claimValidationRules: [{expression: 'claims.hd == \"x\"', "
                "requiredValue: x}]"
            )
        ),
        'jwt[0].claimValidationRules[0].requiredValue: Invalid value: "x": '
        "requiredValue can't be set when expression is set",
        1,
    ),
    (
        "rule-duplicate-claim",
        doc(
            entry(
                more=(
                    "claimValidationRules: [{claim: hd}, {claim: hd, requiredValue: x}]"
                )
            )
        ),
        'jwt[0].claimValidationRules[1].claim: Duplicate value: "hd"',
        1,
    ),
    (
        "rule-duplicate-expression",
        doc(
            entry(
                more="claimValidationRules: [{expression: 'has(claims.hd)'}, "
                "{expression: 'has(claims.hd)'}]"
            )
        ),
        'jwt[0].claimValidationRules[1].expression: Duplicate value: "has(claims.hd)"',
        1,
    ),
    # claimMappings.username
    (
        "username-missing",
        doc(entry(mappings="groups: {claim: g, prefix: ''}")),
        "jwt[0].claimMappings.username: Required value: claim or expression is "
        "required",
        1,
    ),
    (
        "claim-mappings-missing",
        doc("issuer:\n  url: https://issuer.example.com\n  audiences: [k]\n"),
        "jwt[0].claimMappings.username: Required value: claim or expression is "
        "required",
        1,
    ),
    (
        "username-claim-and-expression",
        doc(entry(mappings="username: {claim: sub, expression: claims.sub}")),
        'jwt[0].claimMappings.username: Invalid value: "": claim and expression can\'t '
        "both be set",
        1,
    ),
    (
        "username-prefix-missing",
        doc(entry(mappings="username: {claim: sub}")),
        "jwt[0].claimMappings.username.prefix: Required value: prefix is required when "
        "claim is set. It can be set to an empty string to disable prefixing",
        1,
    ),
    (
        "username-prefix-null-is-missing",
        doc(entry(mappings="username: {claim: sub, prefix: null}")),
        "jwt[0].claimMappings.username.prefix: Required value",
        1,
    ),
    (
        "username-prefix-with-expression",
        doc(entry(mappings="username: {expression: claims.sub, prefix: 'x:'}")),
        'jwt[0].claimMappings.username.prefix: Invalid value: "x:": prefix can\'t '
        "be set when expression is set",
        1,
    ),
    # claimMappings.groups and uid
    (
        "groups-prefix-missing",
        doc(entry(mappings=f"{USERNAME}\ngroups: {{claim: groups}}")),
        "jwt[0].claimMappings.groups.prefix: Required value: prefix is required when "
        "claim "
        "is set",
        1,
    ),
    (
        "groups-claim-and-expression",
        doc(
            entry(
                mappings=(
                    f"{USERNAME}\ngroups: {{claim: g, prefix: '', expression: "
                    f"claims.g}}"
                )
            )
        ),
        'jwt[0].claimMappings.groups: Invalid value: "": claim and expression can\'t '
        "both "
        "be set",
        1,
    ),
    (
        "groups-prefix-with-expression",
        doc(
            entry(mappings=f"{USERNAME}\ngroups: {{expression: claims.g, prefix: ''}}")
        ),
        'jwt[0].claimMappings.groups.prefix: Invalid value: "": prefix can\'t be set '
        "when expression is set",
        1,
    ),
    (
        "uid-claim-and-expression",
        doc(entry(mappings=f"{USERNAME}\nuid: {{claim: sub, expression: claims.sub}}")),
        'jwt[0].claimMappings.uid: Invalid value: "": claim and expression can\'t both '
        "be set",
        1,
    ),
    # claimMappings.extra
    (
        "extra-key-missing",
        doc(entry(mappings=f"{USERNAME}\nextra: [{{valueExpression: claims.sub}}]")),
        "jwt[0].claimMappings.extra[0].key: Required value",
        1,
    ),
    (
        "extra-key-not-domain-prefixed",
        doc(
            entry(
                mappings=(
                    f"{USERNAME}\nextra: [{{key: tenant, valueExpression: claims.t}}]"
                )
            )
        ),
        'jwt[0].claimMappings.extra[0].key: Invalid value: "tenant": must be a '
        'domain-prefixed path (such as "acme.io/foo")',
        1,
    ),
    (
        "extra-key-bad-domain",
        doc(
            entry(
                mappings=(
                    f"{USERNAME}\nextra: [{{key: -x.com/a, valueExpression: claims.t}}]"
                )
            )
        ),
        'jwt[0].claimMappings.extra[0].key: Invalid value: "-x.com": a lowercase RFC '
        "1123 "
        "subdomain",
        1,
    ),
    (
        "extra-key-uppercase",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra: [{{key: example.com/Tenant, "
                "valueExpression: claims.t}]"
            )
        ),
        'jwt[0].claimMappings.extra[0].key: Invalid value: "example.com/Tenant": key '
        "must be lowercase",
        1,
    ),
    (
        "extra-key-kubernetes-io",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra: [{{key: kubernetes.io/a, "
                "valueExpression: claims.t}]"
            )
        ),
        'jwt[0].claimMappings.extra[0].key: Invalid value: "kubernetes.io/a": k8s.io, '
        "kubernetes.io and their subdomains are reserved for Kubernetes use",
        1,
    ),
    (
        "extra-key-k8s-io-subdomain",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra: [{{key: authentication.k8s.io/a, "
                "valueExpression: claims.t}]"
            )
        ),
        'jwt[0].claimMappings.extra[0].key: Invalid value: "authentication.k8s.io/a": '
        "k8s.io, kubernetes.io and their subdomains are reserved",
        1,
    ),
    (
        "extra-key-duplicate",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra:\n"
                "- {key: example.com/a, valueExpression: claims.a}\n"
                "- {key: example.com/a, valueExpression: claims.b}"
            )
        ),
        'jwt[0].claimMappings.extra[1].key: Duplicate value: "example.com/a"',
        1,
    ),
    (
        "extra-value-expression-missing",
        doc(entry(mappings=f"{USERNAME}\nextra: [{{key: example.com/a}}]")),
        "jwt[0].claimMappings.extra[0].valueExpression: Required value: "
        "valueExpression is required",
        1,
    ),
    # userValidationRules
    (
        "user-rule-expression-missing",
        doc(entry(more="userValidationRules: [{message: m}]")),
        "jwt[0].userValidationRules[0].expression: Required value: expression is "
        "required",
        1,
    ),
    (
        "user-rule-duplicate",
        doc(
            entry(
                more="userValidationRules: [{expression: 'user.uid != \"\"'}, "
                "{expression: 'user.uid != \"\"'}]"
            )
        ),
        'jwt[0].userValidationRules[1].expression: Duplicate value: "user.uid != '
        '\\"\\""',
        1,
    ),
    # the email_verified rule
    (
        "email-without-email-verified",
        doc(entry(mappings="username: {expression: claims.email}")),
        'jwt[0].claimMappings.username.expression: Invalid value: "claims.email": '
        "claims.email_verified must be used in claimMappings.username.expression or "
        "claimMappings.extra[*].valueExpression or claimValidationRules[*].expression "
        "when "
        "claims.email is used in claimMappings.username.expression",
        1,
    ),
    (
        "email-verified-only-in-a-user-rule-does-not-count",
        doc(
            entry(
                mappings="username: {expression: claims.email}",
                more="userValidationRules: [{expression: 'user.username != \"\"'}]",
            )
        ),
        'jwt[0].claimMappings.username.expression: Invalid value: "claims.email": '
        "claims.email_verified must be used",
        1,
    ),
    # CEL compile errors, reported at the expression's path
    (
        "cel-syntax-error-username",
        doc(entry(mappings="username: {expression: 'claims.sub +'}")),
        "jwt[0].claimMappings.username.expression",
        1,
    ),
    (
        "cel-syntax-error-claim-rule",
        doc(entry(more="claimValidationRules: [{expression: 'claims.hd =='}]")),
        "jwt[0].claimValidationRules[0].expression",
        1,
    ),
    (
        "cel-syntax-error-extra",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra: [{{key: example.com/a, "
                "valueExpression: 'claims.a +'}]"
            )
        ),
        "jwt[0].claimMappings.extra[0].valueExpression",
        1,
    ),
    (
        "cel-user-rule-cannot-see-claims",
        doc(entry(more="userValidationRules: [{expression: 'claims.sub == \"x\"'}]")),
        "jwt[0].userValidationRules[0].expression",
        1,
    ),
    (
        "cel-claim-rule-cannot-see-user",
        doc(
            entry(more="claimValidationRules: [{expression: 'user.username == \"x\"'}]")
        ),
        "jwt[0].claimValidationRules[0].expression",
        1,
    ),
    # CEL in Kubernetes' words: compilation failed: <cel-go's issues text>
    (
        "cel-syntax-error-kubernetes-text",
        doc(entry(mappings="username: {expression: 'claims.sub +'}")),
        'jwt[0].claimMappings.username.expression: Invalid value: "claims.sub +": '
        "compilation failed: ERROR: <input>:1:13: Syntax error: mismatched input "
        "'<EOF>'",
        1,
    ),
    (
        "cel-user-unknown-field",
        doc(entry(more="userValidationRules: [{expression: 'user.foo == \"x\"'}]")),
        'jwt[0].userValidationRules[0].expression: Invalid value: "user.foo == '
        '\\"x\\"": compilation failed: ERROR: <input>:1:5: undeclared reference to '
        "'user.foo'",
        1,
    ),
    # CEL types at load time: rules must be bool (Kubernetes' check and message)
    (
        "cel-claim-rule-not-bool",
        doc(entry(more="claimValidationRules: [{expression: claims.foo}]")),
        'jwt[0].claimValidationRules[0].expression: Invalid value: "claims.foo": '
        "must evaluate to bool",
        1,
    ),
    (
        "cel-claim-rule-optional-not-bool",
        doc(
            entry(
                more="claimValidationRules: "
                "[{expression: 'claims.?email_verified.orValue(true)'}]"
            )
        ),
        "jwt[0].claimValidationRules[0].expression: Invalid value: "
        '"claims.?email_verified.orValue(true)": must evaluate to bool',
        1,
    ),
    (
        "cel-user-rule-not-bool",
        doc(entry(more="userValidationRules: [{expression: user.username}]")),
        'jwt[0].userValidationRules[0].expression: Invalid value: "user.username": '
        "must evaluate to bool",
        1,
    ),
    (
        "cel-second-rule-not-bool",
        doc(
            entry(
                more="claimValidationRules: [{expression: 'claims.hd == \"x\"'}, "
                "{expression: claims.hd}]"
            )
        ),
        'jwt[0].claimValidationRules[1].expression: Invalid value: "claims.hd": '
        "must evaluate to bool",
        1,
    ),
    # mappings of a type that can never be right (we check them at load; see docs)
    (
        "cel-username-not-string",
        doc(entry(mappings="username: {expression: 'claims.n + 1'}")),
        'jwt[0].claimMappings.username.expression: Invalid value: "claims.n + 1": '
        "must evaluate to string",
        1,
    ),
    (
        "cel-uid-not-string",
        doc(entry(mappings=f"{USERNAME}\nuid: {{expression: 'claims.sub == \"x\"'}}")),
        'jwt[0].claimMappings.uid.expression: Invalid value: "claims.sub == \\"x\\"": '
        "must evaluate to string",
        1,
    ),
    (
        "cel-groups-not-strings",
        doc(entry(mappings=f"{USERNAME}\ngroups: {{expression: '[1, 2]'}}")),
        'jwt[0].claimMappings.groups.expression: Invalid value: "[1, 2]": '
        "must evaluate to one of [string list(string)]",
        1,
    ),
    (
        "cel-extra-not-strings",
        doc(
            entry(
                mappings=f"{USERNAME}\nextra: [{{key: example.com/a, "
                "valueExpression: 'claims.?a'}]"
            )
        ),
        'jwt[0].claimMappings.extra[0].valueExpression: Invalid value: "claims.?a": '
        "must evaluate to one of [string list(string)]",
        1,
    ),
    # apiVersion and kind
    (
        "api-version-unsupported",
        doc(entry(), version="v2"),
        'apiVersion: Unsupported value: "apiserver.config.k8s.io/v2": supported '
        "values: "
        '"apiserver.config.k8s.io/v1", "apiserver.config.k8s.io/v1beta1"',
        1,
    ),
    (
        "kind-wrong",
        doc(entry()).replace(
            "AuthenticationConfiguration", "AuthorizationConfiguration"
        ),
        'kind: Unsupported value: "AuthorizationConfiguration"',
        1,
    ),
    (
        "api-version-missing",
        "kind: AuthenticationConfiguration\n",
        "apiVersion: Required value",
        1,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "count"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
def test_file_validation(text: str, expected: str, count: int) -> None:
    problems = file_problems(text)
    assert any(p.startswith(f"config: {SRC}: {expected}") for p in problems), problems
    assert len(problems) == count, problems


@pytest.mark.parametrize(
    ("mappings", "more"),
    [
        (
            "username: {expression: claims.email}",
            "claimValidationRules: [{expression: 'claims.?email_verified.orValue(true) "
            "== true'}]",
        ),
        (
            "username: {expression: claims.email}\nextra:\n"
            "- {key: example.com/verified, valueExpression: "
            "'string(claims.email_verified)'}",
            "",
        ),
    ],
    ids=["in-a-claim-rule", "in-an-extra-mapping"],
)
def test_email_verified_elsewhere_satisfies_the_email_rule(
    mappings: str, more: str
) -> None:
    (a,) = parse(doc(entry(mappings=mappings, more=more))).authenticators
    assert expr(a.claim_mappings.username.expression)[0] == "claims.email"


def test_email_verified_in_the_username_expression_satisfies_the_email_rule() -> None:
    text = doc(
        entry(
            mappings=(
                "username: {expression: 'claims.email_verified ? claims.email : \"\"'}"
            )
        )
    )
    assert len(parse(text).authenticators) == 1


def test_email_claim_without_expression_needs_no_rule() -> None:
    text = doc(entry(mappings="username: {claim: email, prefix: ''}"))
    assert parse(text).authenticators[0].claim_mappings.username.claim == "email"


def test_every_problem_is_listed_at_once() -> None:
    text = doc(
        entry(
            issuer="url: http://issuer.example.com\naudiences: [a, a]",
            mappings="username: {claim: sub}\nextra: [{key: k8s.io/x}]",
            more="claimValidationRules: [{}]",
        ),
        entry(issuer="audiences: [k]\nflavour: x", mappings=USERNAME),
    )
    problems = file_problems(text)
    expected = [
        'jwt[0].issuer.url: Invalid value: "http://issuer.example.com": URL scheme '
        "must be https",
        'jwt[0].issuer.audiences[1]: Duplicate value: "a"',
        'jwt[0].issuer.audienceMatchPolicy: Invalid value: "": audienceMatchPolicy '
        "must be "
        "MatchAny for multiple audiences",
        "jwt[0].claimValidationRules[0]: Required value: claim or expression is "
        "required",
        "jwt[0].claimMappings.username.prefix: Required value: prefix is required",
        'jwt[0].claimMappings.extra[0].key: Invalid value: "k8s.io/x": k8s.io, '
        "kubernetes.io",
        "jwt[0].claimMappings.extra[0].valueExpression: Required value",
        "jwt[1].issuer.flavour: Unknown field",
        "jwt[1].issuer.url: Required value",
    ]
    assert len(problems) == len(expected), problems
    for problem, want in zip(problems, expected, strict=True):
        assert problem.startswith(f"config: {SRC}: {want}")
    message = str(ConfigError(list(problems)))
    assert message.startswith(f"{len(expected)} problems:")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            doc(entry()) + "kind: AuthenticationConfiguration\n",
            'duplicate field "kind"',
        ),
        ('{"apiVersion": "a", "apiVersion": "b"}', 'duplicate field "apiVersion"'),
        ("jwt: [\n", "not valid YAML or JSON"),
        ("", "got an empty document"),
        ("- a\n- b\n", "got array"),
        ("---\na: 1\n---\nb: 2\n", "not valid YAML or JSON"),
    ],
    ids=[
        "yaml-duplicate-field",
        "json-duplicate-field",
        "yaml-syntax",
        "empty",
        "not-an-object",
        "two-documents",
    ],
)
def test_undecodable_files(text: str, needle: str) -> None:
    (problem,) = file_problems(text)
    assert problem.startswith(f"config: {SRC}: ")
    assert needle in problem


@pytest.mark.parametrize(
    ("mappings", "hint"),
    [
        ("username:\n  claim: sub\n  prefix: okta:", 'prefix: "okta:"'),
        ("username:\n  claim: sub\n  prefix: okta:  # ours", 'prefix: "okta:"'),
        ("username:\n  claim: sub\n  prefix: okta:user:", 'prefix: "okta:user:"'),
        ("username:\n  claim: sub\n  prefix: a: b", 'prefix: "a: b"'),
        ("username: {claim: sub, prefix: okta:}", 'prefix: "okta:"'),
    ],
    ids=["trailing-colon", "with-comment", "two-colons", "colon-space", "flow"],
)
def test_an_unquoted_colon_in_a_value_gets_a_quoting_hint(
    mappings: str, hint: str
) -> None:
    """YAML reads ``prefix: okta:`` as a second key; kube-apiserver refuses the
    file too. The message says to quote the value, as it should be written."""
    (problem,) = file_problems(doc(entry(mappings=mappings)))
    assert problem.startswith(f"config: {SRC}: not valid YAML or JSON: ")
    assert problem.endswith(f", as in {hint})"), problem


def test_other_yaml_errors_get_no_quoting_hint() -> None:
    (problem,) = file_problems("jwt: [\n")
    assert "quote" not in problem


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as excinfo:
        load_authentication_config(path)
    (problem,) = excinfo.value.problems
    assert problem.startswith(
        f"config: --authentication-config {json.dumps(path)}: cannot read"
    )


def test_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(doc(entry(mappings="username: {claim: sub}")))
    with pytest.raises(ConfigError) as excinfo:
        load_authentication_config(str(path))
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"config: {path}: jwt[0].claimMappings.username.prefix: ")


def test_valid_ca_in_file(ca_pem: str) -> None:
    text = doc(
        entry(issuer=issuer_with("certificateAuthority: |\n" + indent(ca_pem, "  ")))
    )
    (a,) = parse(text).authenticators
    assert a.issuer.certificate_authority == ca_pem


def test_egress_selector_type_accepted_and_ignored() -> None:
    plain = parse(doc(entry())).authenticators[0]
    for value in ("controlplane", "cluster"):
        text = doc(entry(issuer=issuer_with(f"egressSelectorType: {value}")))
        assert parse(text).authenticators[0] == plain
