"""The legacy form: kube-apiserver's ``--oidc-*`` flags and their defaulting.

The nine flags mean what kube-apiserver's flags of the same names mean, and
are resolved the way its option code resolves them (rather than in the
library): the ``<issuer>#`` username prefix unless the claim is ``email``,
``-`` for no prefix, required claims as ``KEY=VALUE`` pairs. The result is the
same ``JWTAuthenticatorConfig`` a file entry becomes, so the engine has one
code path.

Deliberate differences from kube-apiserver, both refusals: an
``--oidc-groups-prefix`` without ``--oidc-groups-claim`` is an error rather
than silently ignored, and conflicting ``--oidc-required-claim`` values for one
claim are an error rather than "the last one wins".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from proxy.options.common import FlagGroup, file_problem, pem_problem, url_problems
from proxy.options.values import (
    ALLOWED_SIGNING_ALGS,
    DEFAULT_SIGNING_ALGS,
    ClaimMappings,
    ClaimValidationRule,
    IssuerConfig,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
)

__all__ = ["add_legacy_arguments", "flags_given", "legacy_authenticator"]


#: Flag -> argparse dest, for every flag that selects the legacy form.
_OIDC_FLAGS: tuple[tuple[str, str], ...] = (
    ("--oidc-issuer-url", "oidc_issuer_url"),
    ("--oidc-client-id", "oidc_client_id"),
    ("--oidc-username-claim", "oidc_username_claim"),
    ("--oidc-username-prefix", "oidc_username_prefix"),
    ("--oidc-groups-claim", "oidc_groups_claim"),
    ("--oidc-groups-prefix", "oidc_groups_prefix"),
    ("--oidc-required-claim", "oidc_required_claim"),
    ("--oidc-ca-file", "oidc_ca_file"),
    ("--oidc-signing-algs", "oidc_signing_algs"),
)

_DEFAULT_USERNAME_CLAIM = "sub"


def add_legacy_arguments(group: FlagGroup) -> None:
    """Add the nine ``--oidc-*`` flags to the "authentication" group.

    They default to None here and are defaulted in ``legacy_authenticator``,
    so that "given" can be told from "defaulted": the two configuration forms
    are mutually exclusive.
    """
    _add_issuer_flags(group)
    _add_mapping_flags(group)
    _add_check_flags(group)


def _add_issuer_flags(group: FlagGroup) -> None:
    group.add_argument(
        "--oidc-issuer-url",
        metavar="URL",
        help=(
            "The URL of the OpenID issuer; only the https scheme is accepted "
            "(plain http only for a loopback host, for tests). It must equal the "
            "'iss' claim of the tokens and the 'issuer' of the discovery document "
            "at URL/.well-known/openid-configuration. Requires --oidc-client-id."
        ),
    )
    group.add_argument(
        "--oidc-client-id",
        metavar="ID",
        help=(
            "The client ID for the OpenID Connect client; tokens must carry it in "
            "their 'aud' claim. Requires --oidc-issuer-url."
        ),
    )


def _add_mapping_flags(group: FlagGroup) -> None:
    group.add_argument(
        "--oidc-username-claim",
        metavar="CLAIM",
        help=(
            "The token claim to use as the user name (default "
            f"'{_DEFAULT_USERNAME_CLAIM}'). Claims other than the default are not "
            "guaranteed to be unique and immutable; with 'email', a present "
            "'email_verified' claim must be true."
        ),
    )
    group.add_argument(
        "--oidc-username-prefix",
        metavar="PREFIX",
        help=(
            "Prefix prepended to user names to prevent clashes with existing names "
            "(such as system: users); 'oidc:' makes names like 'oidc:jane'. If "
            "unset or empty and --oidc-username-claim is not 'email', the prefix is "
            "'<issuer-url>#' (the value of --oidc-issuer-url followed by '#'); if "
            "unset and the claim is 'email', there is no prefix. The value '-' "
            "disables prefixing."
        ),
    )
    group.add_argument(
        "--oidc-groups-claim",
        metavar="CLAIM",
        help=(
            "The token claim holding the user's groups: a string or an array of "
            "strings. Unset: no groups come from the token."
        ),
    )
    group.add_argument(
        "--oidc-groups-prefix",
        metavar="PREFIX",
        help=(
            "Prefix prepended to every group to prevent clashes with existing "
            "names (such as system: groups). Default: none. Requires "
            "--oidc-groups-claim."
        ),
    )


def _add_check_flags(group: FlagGroup) -> None:
    group.add_argument(
        "--oidc-required-claim",
        metavar="KEY=VALUE",
        action="append",
        help=(
            "A claim the token must carry with exactly this string value. Repeat "
            "the flag, or give several pairs separated by commas (a=b,c=d), for "
            "several claims; a value containing a comma needs the file form."
        ),
    )
    group.add_argument(
        "--oidc-ca-file",
        metavar="FILE",
        help=(
            "PEM file of the CA(s) that sign the issuer's TLS certificate. Unset: "
            "the system's trusted CAs."
        ),
    )
    group.add_argument(
        "--oidc-signing-algs",
        metavar="ALG[,ALG...]",
        action="append",
        help=(
            "Comma-separated JOSE algorithms accepted in token signatures (default "
            f"{','.join(DEFAULT_SIGNING_ALGS)}); allowed: "
            f"{', '.join(sorted(ALLOWED_SIGNING_ALGS))}. HS256/384/512 and 'none' "
            "are refused: a symmetric algorithm would make the issuer's public key "
            "a signing secret, and 'none' means no signature at all."
        ),
    )


def flags_given(ns: argparse.Namespace) -> list[str]:
    """The ``--oidc-*`` flags given on the command line, in their help order."""
    return [flag for flag, dest in _OIDC_FLAGS if getattr(ns, dest, None) is not None]


def legacy_authenticator(
    ns: argparse.Namespace, problems: list[str]
) -> JWTAuthenticatorConfig | None:
    """Resolve the ``--oidc-*`` flags the way kube-apiserver's option code does."""
    start = len(problems)
    issuer_url: str | None = getattr(ns, "oidc_issuer_url", None) or None
    client_id: str | None = getattr(ns, "oidc_client_id", None) or None

    # A missing flag is one problem among the others, never a reason to stop
    # looking: every check below runs whatever is missing here.
    if issuer_url is not None and client_id is None:
        problems.append(
            "config: --oidc-issuer-url and --oidc-client-id must be given "
            "together: --oidc-client-id is missing; give the client ID of the "
            "identity provider's application (the audience tokens carry)"
        )
    elif client_id is not None and issuer_url is None:
        problems.append(
            "config: --oidc-issuer-url and --oidc-client-id must be given "
            "together: --oidc-issuer-url is missing; give the issuer URL, exactly "
            "as the tokens' iss claim says it"
        )
    elif issuer_url is None:
        given = ", ".join(flags_given(ns))
        problems.append(f"config: {given}: need --oidc-issuer-url and --oidc-client-id")
    if issuer_url is not None:
        problems.extend(
            f"config: --oidc-issuer-url: {json.dumps(issuer_url)}: {p}"
            for p in url_problems(issuer_url)
        )

    username_claim: str | None = getattr(ns, "oidc_username_claim", None)
    if username_claim is None:
        username_claim = _DEFAULT_USERNAME_CLAIM
    elif not username_claim:
        problems.append("config: --oidc-username-claim: must not be empty")
    username_prefix = _legacy_username_prefix(
        getattr(ns, "oidc_username_prefix", None), username_claim, issuer_url or ""
    )

    groups: PrefixedClaimOrExpression | None = None
    groups_claim: str | None = getattr(ns, "oidc_groups_claim", None) or None
    groups_prefix: str | None = getattr(ns, "oidc_groups_prefix", None)
    if groups_claim is not None:
        groups = PrefixedClaimOrExpression(
            claim=groups_claim, prefix=groups_prefix or ""
        )
    elif groups_prefix:
        problems.append(
            "config: --oidc-groups-prefix needs --oidc-groups-claim: without a "
            "groups claim there are no groups to prefix"
        )

    rules = _required_claims(getattr(ns, "oidc_required_claim", None) or [], problems)
    algs = _signing_algs(getattr(ns, "oidc_signing_algs", None), problems)
    ca_pem = _read_ca_file(getattr(ns, "oidc_ca_file", None), problems)

    if len(problems) > start or issuer_url is None or client_id is None:
        return None
    return JWTAuthenticatorConfig(
        issuer=IssuerConfig(
            url=issuer_url,
            certificate_authority=ca_pem,
            audiences=(client_id,),
            audience_match_policy="MatchAny",
            signing_algs=algs,
        ),
        claim_mappings=ClaimMappings(
            username=PrefixedClaimOrExpression(
                claim=username_claim, prefix=username_prefix
            ),
            groups=groups,
        ),
        claim_validation_rules=rules,
        source="--oidc-*",
    )


def _legacy_username_prefix(prefix: str | None, claim: str, issuer_url: str) -> str:
    """kube-apiserver's defaulting: ``-`` is none; unset/empty is ``<issuer>#``.

    The ``email`` claim is exempt from the default because e-mail addresses
    are already global names. An empty value counts as unset because
    kube-apiserver cannot tell the two apart.
    """
    if prefix == "-":
        return ""
    if prefix:
        return prefix
    if claim == "email":
        return ""
    return f"{issuer_url}#"


def _required_claims(
    values: Sequence[str], problems: list[str]
) -> tuple[ClaimValidationRule, ...]:
    """``KEY=VALUE`` pairs, repeated or comma-separated (kube's mapStringString)."""
    required: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            key, sep, claim_value = pair.partition("=")
            key, claim_value = key.strip(), claim_value.strip()
            if not sep or not key:
                problems.append(
                    f"config: --oidc-required-claim: {json.dumps(pair)}: malformed "
                    "pair, expected KEY=VALUE"
                )
                continue
            if key in required and required[key] != claim_value:
                problems.append(
                    f"config: --oidc-required-claim: claim {json.dumps(key)} is "
                    f"required twice with different values ({json.dumps(required[key])}"
                    f" and {json.dumps(claim_value)})"
                )
                continue
            required[key] = claim_value
    return tuple(
        ClaimValidationRule(claim=key, required_value=claim_value)
        for key, claim_value in required.items()
    )


def _signing_algs(values: Sequence[str] | None, problems: list[str]) -> tuple[str, ...]:
    if values is None:
        return DEFAULT_SIGNING_ALGS
    algs: list[str] = []
    for value in values:
        for raw in value.split(","):
            alg = raw.strip()
            if not alg or alg in algs:
                continue
            if alg.upper().startswith("HS"):
                problems.append(
                    f"config: --oidc-signing-algs: {json.dumps(alg)} is refused: a "
                    "symmetric algorithm would make the issuer's public key a "
                    "signing secret (anyone could forge tokens with it)"
                )
            elif alg.lower() == "none":
                problems.append(
                    'config: --oidc-signing-algs: "none" is refused: unsigned '
                    "tokens prove nothing"
                )
            elif alg not in ALLOWED_SIGNING_ALGS:
                problems.append(
                    f"config: --oidc-signing-algs: {json.dumps(alg)} is not "
                    f"allowed; allowed: {', '.join(sorted(ALLOWED_SIGNING_ALGS))}"
                )
            else:
                algs.append(alg)
    if not algs and not any(
        p.startswith("config: --oidc-signing-algs") for p in problems
    ):
        problems.append("config: --oidc-signing-algs: no algorithm given")
    return tuple(algs)


def _read_ca_file(path: str | None, problems: list[str]) -> str | None:
    if path is None:
        return None
    unreadable = file_problem(
        "--oidc-ca-file",
        path,
        "give the PEM bundle of the CA that signed the issuer's TLS certificate, "
        "or leave --oidc-ca-file out to trust the system's CAs",
    )
    if unreadable is not None:
        problems.append(unreadable)
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        problems.append(
            f"config: --oidc-ca-file {json.dumps(path)}: cannot read: "
            f"{err.strerror or err}"
        )
        return None
    try:
        pem = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(
            f"config: --oidc-ca-file {json.dumps(path)}: not a PEM file "
            "(not UTF-8 text)"
        )
        return None
    problem = pem_problem(pem)
    if problem is not None:
        problems.append(
            f"config: --oidc-ca-file {json.dumps(path)}: not a valid PEM CA bundle: "
            f"{problem}"
        )
        return None
    return pem
