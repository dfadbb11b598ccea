"""``kube-oidc-gate check-token``: tell a person exactly why a token passes or fails.

It runs the very engine the webhook and the proxy run (same configuration,
same checks, same messages), without the result cache, and prints what it
learnt: the decoded header and claims (the token itself is never printed), the
times in words, and then the mapped user as JSON (exit 0, with a warning line
when the configured groups claim is absent) or the refusal with its reason
code and a hint drawn from the troubleshooting table (exit 1). It logs only
warnings, as text, by default: it talks to a person at a terminal.

``--offline --jwks-file F`` checks against a local JWK Set and makes no network
request at all, for air-gapped debugging or a key set copied from the IdP.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

import aiohttp

from proxy.authn import Authenticator, Verdict
from proxy.config import AuthConfig
from proxy.introspection import Introspection, IntrospectionResult
from proxy.jwk import load_jwks_file
from proxy.keyset import (
    ClaimSourceClient,
    IntrospectionHttpClient,
    KeySets,
    StaticKeySet,
)
from proxy.oktaapi import OktaApiClient
from proxy.oktagroups import GroupsProvenance, OktaGroups
from proxy.tokens import KeyResolver

__all__ = ["GROUPS_HINT", "HINTS", "check_token", "render", "warnings_for"]

#: Reason code → what usually causes it and where to look. README's
#: troubleshooting table says the same; keep them in step.
HINTS: Final[Mapping[str, str]] = {
    "malformed": "this is not a compact JWS (header.payload.signature); pass the "
    "id_token itself, not an access token of another format or a whole JSON response",
    "alg_not_allowed": "the issuer signs with an algorithm not in --oidc-signing-algs "
    "(default RS256), or the key named by kid is of another type",
    "unknown_kid": "no published key has this kid: the token is from another issuer or "
    "authorization server, or was signed with a key the issuer has withdrawn",
    "keys_unavailable": "the issuer's discovery document or JWKS could not be fetched; "
    "see the fetch error above (network, CA, or issuer URL)",
    "bad_signature": "the signature does not verify: the token was altered or signed "
    "by a different key that reuses the kid",
    "expired": "get a fresh token (kubectl oidc-login get-token; or clear "
    "~/.kube/cache/oidc-login if an old token is stuck in the cache)",
    "not_yet_valid": "the clocks disagree: check NTP on this machine and the IdP",
    "issuer_mismatch": "the iss claim must equal --oidc-issuer-url / issuer.url exactly "
    "(scheme, host, path, trailing slash, case); with Okta, compare with Security > API > "
    "Authorization Servers > Issuer (a custom domain changes it)",
    "audience_mismatch": "the aud claim must contain --oidc-client-id / one of "
    "issuer.audiences; Okta ID tokens carry the client id, access tokens of a custom "
    "authorization server carry its audience (api://default)",
    "claim_missing": "the token lacks a claim the configuration needs (the username "
    "claim, or a required claim); Okta adds groups and email only when configured to",
    "claim_invalid": "a claim has the wrong type or value (see the message)",
    "rule_failed": "a required claim or a claimValidationRules entry refused the token",
    "user_rule_failed": "a userValidationRules entry refused the mapped user",
    "claim_source": "the token's groups live at a distributed claim source "
    "(_claim_names/_claim_sources) that was refused or did not verify: the "
    "endpoint must be https on the issuer's own host and answer a JWT of the "
    "same issuer and audience (see the message)",
    "claim_source_unavailable": "the distributed claim source did not answer "
    "(network, timeout, non-2xx): retried on the next review",
    "groups_unavailable": "the groups claim is capped or absent and Okta's API "
    "(--okta-*) did not answer: check the API token or service app (scopes "
    "okta.groups.read okta.users.read, a read-only admin role, DPoP), the org "
    "URL and rate limits (see the message); retried on the next review",
    "revoked": "the issuer's introspection endpoint says the token is no longer "
    "active, or a Revocation object (--revocation-namespace; kubectl get "
    "revocations) names the token's subject and it was issued before "
    "issuedBefore (the user was deactivated, signed out or revoked): log in "
    "again (kubectl oidc-login; clear ~/.kube/cache/oidc-login); deleting the "
    "Revocation lifts it",
    "revocations_unavailable": "--revocation-namespace is on and this process "
    "has not read the revocation list yet: check the gate's credential (RBAC "
    "get/list/watch on revocations.kube-oidc-gate.io) and that the CRD is "
    "installed; /readyz says why; retried on the next review",
    "introspection_unavailable": "introspection is on for the issuer "
    "(--oidc-introspection-* / --introspection-config) and its endpoint did not "
    "answer: check the introspection_endpoint in discovery, the client id and "
    "secret, and the network (see the message); retried on the next review",
    "not_mine": "the token's iss is not a configured issuer; compare it with "
    "--oidc-issuer-url / issuer.url character by character",
}


def _when(value: object, now: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        stamp = dt.datetime.fromtimestamp(float(value), dt.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    except (OverflowError, OSError, ValueError):
        return None
    delta = int(float(value) - now)
    rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
    return f"{stamp} ({rel})"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


#: What a token without its groups claim usually means, with Okta.
GROUPS_HINT: Final = (
    "Okta adds a groups claim only when the authorization server has one: "
    "Security > API > Authorization Servers > (yours) > Claims > Add Claim, "
    'name "groups", include in the ID token (Always), value type Groups, '
    'filter Matches regex ".*" (or your prefix); for the org server, set the '
    "app's Groups claim filter (Sign On tab). Without it the user has no groups "
    "and RBAC bindings to groups do not apply."
)


def warnings_for(verdict: Verdict, config: AuthConfig) -> list[str]:
    """What an accepted token lacks that the configuration expects: today a
    missing groups claim, the first thing the seed article's troubleshooting
    checks (the token passes; the user just has no groups).
    """
    if verdict.user is None or verdict.claims is None:
        return []
    if verdict.groups_from is not None and verdict.groups_from.source == "okta_api":
        return []
    for auth in config.authenticators:
        if auth.issuer.url != verdict.issuer:
            continue
        groups = auth.claim_mappings.groups
        if groups is None or groups.claim is None:
            return []
        if groups.claim not in verdict.claims:
            return [
                f'the token has no "{groups.claim}" claim (the configured groups '
                f"claim), so the user gets no groups. {GROUPS_HINT}"
            ]
    return []


def _provenance(p: GroupsProvenance) -> str:
    """Where each group came from (raw names, before the groups prefix)."""
    held = p.token_groups
    if p.source == "token":
        count = len(held or ())
        return (
            f'groups from: the token\'s "{p.claim}" claim ({count} entries, under '
            f"--okta-groups-cap {p.cap}); Okta's API was not asked\n"
        )
    had = (
        "absent"
        if held is None
        else f"{len(held)} entries, at or over --okta-groups-cap {p.cap}"
    )
    lines = [
        f"groups from: Okta's API at {p.org_url} ({p.fetched} groups, "
        f"{len(p.api_groups)} kept by --okta-groups-filter"
        f"{'; from the cache' if p.cached else ''}); the token's "
        f'"{p.claim}" claim was {had} and is replaced'
    ]
    in_token = set(held or ())
    for name in p.api_groups:
        where = "token, okta api" if name in in_token else "okta api"
        lines.append(f"  {name}: {where}")
    kept = set(p.api_groups)
    for name in held or ():
        if name not in kept:
            lines.append(f"  {name}: token only, dropped (not in the API's answer)")
    return "\n".join(lines) + "\n"


def _introspected(result: IntrospectionResult) -> str:
    """What the issuer's introspection endpoint said about an accepted token."""
    if result.stale:
        return (
            "introspection: active (the endpoint did not answer; last answer, "
            f"{result.age:.0f}s old, used under allow-cached)\n"
        )
    return "introspection: active (the issuer's introspection endpoint says so)\n"


def render(
    verdict: Verdict, *, now: float, out: TextIO, warnings: Sequence[str] = ()
) -> int:
    """Print ``verdict`` for a person and return the exit code (0 accepted, 1 not)."""
    if verdict.header is not None:
        out.write(
            "header:\n"
            + json.dumps(dict(verdict.header), indent=2, sort_keys=True)
            + "\n"
        )
    if verdict.claims is not None:
        out.write(
            "claims:\n"
            + json.dumps(dict(verdict.claims), indent=2, sort_keys=True, default=str)
            + "\n"
        )
        times = [
            f"  {name}: {_when(verdict.claims.get(name), now)}"
            for name in ("iat", "nbf", "exp")
            if _when(verdict.claims.get(name), now) is not None
        ]
        if times:
            out.write("times:\n" + "\n".join(times) + "\n")
    if verdict.user is not None:
        out.write(f"result: accepted by issuer {verdict.issuer}\n")
        out.write(json.dumps(verdict.user.to_dict(), indent=2) + "\n")
        if verdict.groups_from is not None:
            out.write(_provenance(verdict.groups_from))
        if verdict.introspection is not None:
            out.write(_introspected(verdict.introspection))
        for warning in warnings:
            out.write(f"warning: {warning}\n")
        return 0
    if verdict.not_mine is not None:
        out.write("result: rejected (not_mine)\n")
        out.write(verdict.not_mine + "\n")
        out.write(f"hint: {HINTS['not_mine']}\n")
        return 1
    assert verdict.error is not None
    reason = verdict.error.reason
    out.write(f"result: rejected ({reason})\n{verdict.error}\n")
    if reason in HINTS:
        out.write(f"hint: {HINTS[reason]}\n")
    return 1


async def check_token(
    config: AuthConfig,
    token: str,
    *,
    out: TextIO,
    jwks_file: str | None = None,
) -> int:
    """Validate ``token`` against ``config`` (online, or offline with ``jwks_file``)."""
    urls = [a.issuer.url for a in config.authenticators]
    if jwks_file is not None:
        static = StaticKeySet(load_jwks_file(jwks_file))
        resolvers: dict[str, KeyResolver] = dict.fromkeys(urls, static)
        verdict = await Authenticator(config, resolvers).explain(token)
        return render(
            verdict, now=time.time(), out=out, warnings=warnings_for(verdict, config)
        )
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.keyset.fetch_timeout),
        headers={"User-Agent": "kube-oidc-gate check-token"},
    ) as session:
        keysets = KeySets(
            [a.issuer for a in config.authenticators], config.keyset, session=session
        )
        try:
            authenticator = Authenticator(
                config,
                {u: keysets.get(u) for u in set(urls)},
                claim_sources=ClaimSourceClient(session),
                okta_groups=None
                if config.okta is None
                else OktaGroups(config.okta, OktaApiClient(session, config)),
                introspection=None
                if config.introspection is None
                else Introspection(
                    config.introspection,
                    IntrospectionHttpClient(
                        session,
                        [a.issuer for a in config.authenticators],
                        lambda url: keysets.get(url).introspection_endpoint,
                        timeout=config.introspection.timeout,
                    ),
                ),
            )
            verdict = await authenticator.explain(token)
        finally:
            await keysets.close()
    return render(
        verdict, now=time.time(), out=out, warnings=warnings_for(verdict, config)
    )
