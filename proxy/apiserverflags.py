"""kube-apiserver's own OIDC settings, for a cluster that validates tokens itself.

``apiserver_flags`` gives the legacy ``--oidc-*`` flags for what that form can
say (one issuer, claim mappings, ``claim``/``requiredValue`` rules); anything
more is explained and answered with an ``AuthenticationConfiguration``
(``authentication_configuration``) instead, which can say all of it.
Re-exported by ``proxy.kubeconfig``.
"""

from __future__ import annotations

import json
from typing import Any, Final
from urllib.parse import urlsplit

from proxy.config import (
    FILE_SIGNING_ALGS,
    SUPPORTED_API_VERSIONS,
    AuthConfig,
    ClaimValidationRule,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
)
from proxy.errors import ConfigError
from proxy.kubefiles import (
    comment,
    dump_yaml,
    wrap_notes,
)

__all__ = ["DEFAULT_CA_FILE_PATH", "apiserver_flags", "authentication_configuration"]

#: Path ``apiserver_flags`` gives ``--oidc-ca-file`` when the caller names none.
DEFAULT_CA_FILE_PATH: Final = "/etc/kubernetes/pki/oidc-ca.crt"
#: Algorithms kube-apiserver verifies (it has no EdDSA).
_KUBE_ALGS: Final = tuple(a for a in FILE_SIGNING_ALGS if a != "EdDSA")


def _required_claim_problem(rule: ClaimValidationRule) -> str | None:
    """Why a ``claim``/``requiredValue`` rule cannot be an ``--oidc-required-claim``.

    The flag is read as comma-separated ``KEY=VALUE`` pairs with the spaces
    around each part trimmed, so a comma anywhere, an ``=`` in the key or
    surrounding spaces cannot survive it.
    """
    claim, value = rule.claim or "", rule.required_value or ""
    if "," in claim or "," in value:
        return "contains a comma, which the flag reads as a pair separator"
    if "=" in claim:
        return "has '=' in the claim name, which the flag reads as the separator"
    if claim != claim.strip() or value != value.strip():
        return "has leading or trailing spaces, which the flag trims"
    return None


def _legacy_problems(config: AuthConfig) -> list[str]:
    """Why the ``--oidc-*`` flags cannot express ``config`` (empty: they can)."""
    if len(config.authenticators) != 1:
        return [f"it has {len(config.authenticators)} issuers; the flags configure one"]
    a = config.authenticators[0]
    p = a.source
    problems: list[str] = []
    issuer = a.issuer
    if issuer.discovery_url is not None:
        problems.append(
            f"{p}: issuer.discoveryURL is set; with the flags the discovery "
            "document is always fetched from the issuer URL"
        )
    if len(issuer.audiences) != 1:
        problems.append(
            f"{p}: it accepts {len(issuer.audiences)} audiences; --oidc-client-id "
            "is one"
        )
    if not [alg for alg in issuer.signing_algs if alg in _KUBE_ALGS]:
        problems.append(
            f"{p}: it accepts only {', '.join(issuer.signing_algs)}, which "
            "kube-apiserver does not verify"
        )
    mappings = a.claim_mappings
    username = mappings.username
    if username.expression is not None:
        problems.append(f"{p}: claimMappings.username is a CEL expression")
    elif username.prefix == "-":
        problems.append(
            f'{p}: the username prefix is "-", which --oidc-username-prefix reads '
            "as no prefix"
        )
    if mappings.groups is not None and mappings.groups.expression is not None:
        problems.append(f"{p}: claimMappings.groups is a CEL expression")
    if mappings.uid is not None:
        problems.append(f"{p}: claimMappings.uid is set; the flags have no uid")
    if mappings.extra:
        problems.append(f"{p}: claimMappings.extra is set; the flags have no extra")
    for i, rule in enumerate(a.claim_validation_rules):
        if rule.expression is not None:
            problems.append(f"{p}: claimValidationRules[{i}] is a CEL expression")
            continue
        problem = _required_claim_problem(rule)
        if problem is not None:
            problems.append(
                f"{p}: claimValidationRules[{i}] (claim {json.dumps(rule.claim)}) "
                f"{problem}"
            )
    if a.user_validation_rules:
        problems.append(f"{p}: userValidationRules are set; the flags have none")
    return problems


def _notes(config: AuthConfig, *, for_flags: bool) -> list[str]:
    """Differences kube-apiserver will make that no output can avoid."""
    notes: list[str] = []
    for a in config.authenticators:
        issuer = a.issuer
        if urlsplit(issuer.url).scheme == "http":
            notes.append(
                f"{a.source}: kube-apiserver requires an https issuer URL; "
                f"{issuer.url} is accepted by kube-oidc-gate only (loopback, for "
                "tests and --dev)"
            )
        if "EdDSA" in issuer.signing_algs and (for_flags or config.form == "flags"):
            notes.append(
                f"{a.source}: EdDSA is left out: kube-apiserver does not verify "
                "EdDSA signatures"
            )
        if not for_flags and not set(_KUBE_ALGS) <= set(issuer.signing_algs):
            notes.append(
                f"{a.source}: kube-oidc-gate accepts only "
                f"{', '.join(issuer.signing_algs)} here; an "
                "AuthenticationConfiguration has no algorithm field and "
                f"kube-apiserver accepts {', '.join(_KUBE_ALGS)}"
            )
    return notes


def _username_prefix_flag(username: PrefixedClaimOrExpression, url: str) -> str | None:
    """The ``--oidc-username-prefix`` value, or None when the default is right.

    kube-apiserver's default is ``<issuer-url>#``, or no prefix for the
    ``email`` claim; ``-`` says "no prefix" explicitly.
    """
    prefix = username.prefix or ""
    default = "" if username.claim == "email" else f"{url}#"
    if prefix == default:
        return None
    return prefix or "-"


def apiserver_flags(
    config: AuthConfig,
    *,
    ca_file_path: str = DEFAULT_CA_FILE_PATH,
    api_version: str = "apiserver.config.k8s.io/v1",
) -> str:
    """kube-apiserver's ``--oidc-*`` flags equivalent to ``config``, one per line.

    When the flags cannot express ``config`` (several issuers, CEL, uid or
    extra mappings, user rules, a discovery URL, several audiences), the text
    says why in comments and gives the ``AuthenticationConfiguration`` instead
    (in ``api_version``).
    A CA bundle cannot be a flag value: ``--oidc-ca-file`` names
    ``ca_file_path`` and the bundle to put there follows in comments. Lines
    starting with ``#`` are comments.
    """
    problems = _legacy_problems(config)
    if problems:
        return comment(
            [
                "The --oidc-* flags cannot express this configuration:",
                *wrap_notes(problems, bullet="  - "),
                "Give kube-apiserver this AuthenticationConfiguration instead,",
                "as --authentication-config=FILE (with no --oidc-* flag):",
                "",
            ]
        ) + authentication_configuration(config)
    a = config.authenticators[0]
    issuer, mappings = a.issuer, a.claim_mappings
    flags = [
        f"--oidc-issuer-url={issuer.url}",
        f"--oidc-client-id={issuer.audiences[0]}",
        f"--oidc-username-claim={mappings.username.claim}",
    ]
    prefix = _username_prefix_flag(mappings.username, issuer.url)
    if prefix is not None:
        flags.append(f"--oidc-username-prefix={prefix}")
    if mappings.groups is not None:
        flags.append(f"--oidc-groups-claim={mappings.groups.claim}")
        if mappings.groups.prefix:
            flags.append(f"--oidc-groups-prefix={mappings.groups.prefix}")
    flags.extend(
        f"--oidc-required-claim={rule.claim}={rule.required_value or ''}"
        for rule in a.claim_validation_rules
    )
    algs = [alg for alg in issuer.signing_algs if alg in _KUBE_ALGS]
    if algs != ["RS256"]:
        flags.append(f"--oidc-signing-algs={','.join(algs)}")
    trailer = ""
    if issuer.certificate_authority is not None:
        flags.append(f"--oidc-ca-file={ca_file_path}")
        trailer = comment(
            [
                f"{ca_file_path} must hold, on every control-plane node:",
                *issuer.certificate_authority.strip().splitlines(),
            ]
        )
    header = comment(
        [
            "kube-apiserver flags equivalent to this kube-oidc-gate configuration",
            "(kubeadm: the command of /etc/kubernetes/manifests/kube-apiserver.yaml).",
            *wrap_notes(_notes(config, for_flags=True), bullet="note: "),
        ]
    )
    return header + "".join(f"{flag}\n" for flag in flags) + trailer


def _prefixed(value: PrefixedClaimOrExpression) -> dict[str, str]:
    if value.expression is not None:
        return {"expression": value.expression.source}
    return {"claim": value.claim or "", "prefix": value.prefix or ""}


def _jwt_entry(a: JWTAuthenticatorConfig) -> dict[str, Any]:
    issuer: dict[str, Any] = {"url": a.issuer.url}
    if a.issuer.discovery_url is not None:
        issuer["discoveryURL"] = a.issuer.discovery_url
    if a.issuer.certificate_authority is not None:
        issuer["certificateAuthority"] = a.issuer.certificate_authority
    issuer["audiences"] = list(a.issuer.audiences)
    if a.issuer.audience_match_policy or len(a.issuer.audiences) > 1:
        issuer["audienceMatchPolicy"] = "MatchAny"
    entry: dict[str, Any] = {"issuer": issuer}

    rules: list[dict[str, str]] = []
    for rule in a.claim_validation_rules:
        if rule.expression is not None:
            item = {"expression": rule.expression.source}
            if rule.message:
                item["message"] = rule.message
        else:
            item = {
                "claim": rule.claim or "",
                "requiredValue": rule.required_value or "",
            }
        rules.append(item)
    if rules:
        entry["claimValidationRules"] = rules

    m = a.claim_mappings
    mappings: dict[str, Any] = {"username": _prefixed(m.username)}
    if m.groups is not None:
        mappings["groups"] = _prefixed(m.groups)
    if m.uid is not None:
        mappings["uid"] = (
            {"expression": m.uid.expression.source}
            if m.uid.expression is not None
            else {"claim": m.uid.claim or ""}
        )
    if m.extra:
        mappings["extra"] = [
            {"key": x.key, "valueExpression": x.value_expression.source}
            for x in m.extra
        ]
    entry["claimMappings"] = mappings

    if a.user_validation_rules:
        entry["userValidationRules"] = [
            {
                "expression": r.expression.source,
                **({"message": r.message} if r.message else {}),
            }
            for r in a.user_validation_rules
        ]
    return entry


def authentication_configuration(
    config: AuthConfig, api_version: str = "apiserver.config.k8s.io/v1"
) -> str:
    """An ``AuthenticationConfiguration`` equivalent to ``config`` (any config).

    Prefixes are written out as resolved (the legacy ``<issuer>#`` default
    becomes an explicit prefix, as the file format has no defaulting), CEL
    expressions by their source, CA bundles inline. ``api_version`` is one of
    ``SUPPORTED_API_VERSIONS``: ``v1`` needs kube-apiserver 1.34 or later,
    ``v1beta1`` 1.30 or later.
    """
    if api_version not in SUPPORTED_API_VERSIONS:
        raise ConfigError(
            f"config: --api-version: {json.dumps(api_version)}: unsupported; "
            f"supported: {', '.join(SUPPORTED_API_VERSIONS)}"
        )
    document: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": "AuthenticationConfiguration",
        "jwt": [_jwt_entry(a) for a in config.authenticators],
    }
    header = comment(
        [
            "AuthenticationConfiguration equivalent to this kube-oidc-gate",
            "configuration, for kube-apiserver --authentication-config=FILE.",
            *wrap_notes(_notes(config, for_flags=False), bullet="note: "),
        ]
    )
    return header + dump_yaml(document)
