"""Okta groups: fetch a user's groups from Okta's API when the token's are cut.

The ``--okta-*`` flags name one Okta org's API credentials (an API token, or a
service app's client id and private key) and the issuers whose users'
groups are fetched (``proxy.oktagroups``, ``proxy.oktaapi``). The credential
files are checked at start-up and re-read by ``proxy.oktaapi`` when they
change, so only their paths are kept.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.options.common import (
    FlagGroup,
    read_count,
    read_number,
    secret_text,
    url_problems,
)
from proxy.options.values import JWTAuthenticatorConfig, OktaGroupsConfig

__all__ = ["ClientKey", "add_okta_arguments", "okta_from_args", "parse_client_key"]


_DEFAULT_OKTA = OktaGroupsConfig(issuers=())

#: Flag -> argparse dest of the Okta groups flags (``--okta-*``).
_OKTA_FLAGS: tuple[tuple[str, str], ...] = (
    ("--okta-groups-issuer", "okta_groups_issuer"),
    ("--okta-org-url", "okta_org_url"),
    ("--okta-api-key-id", "okta_api_key_id"),
    ("--okta-groups-cap", "okta_groups_cap"),
    ("--okta-groups-filter", "okta_groups_filter"),
    ("--okta-groups-cache-ttl", "okta_groups_cache_ttl"),
    ("--okta-groups-timeout", "okta_groups_timeout"),
)


def add_okta_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "okta groups" group: the API credentials and the fetch's bounds."""
    okta = parser.add_argument_group(
        "okta groups",
        "Fetch a user's groups from Okta's API when the token's groups claim is "
        "absent (minified tokens of the org authorization server) or holds at "
        "least --okta-groups-cap entries (Okta puts at most 100 in a token). "
        "Off unless an API token or a service app is given; docs/okta.md.",
    )
    _add_credential_flags(okta)
    _add_fetch_flags(okta)


def _add_credential_flags(okta: FlagGroup) -> None:
    okta.add_argument(
        "--okta-groups-api-token-file",
        metavar="FILE",
        help=(
            "File holding an Okta API token (sent as 'Authorization: SSWS "
            "<token>'); re-read when it changes. Mutually exclusive with "
            "--okta-api-client-id."
        ),
    )
    okta.add_argument(
        "--okta-api-client-id",
        metavar="ID",
        help=(
            "Client id of an Okta API service app (OAuth 2.0 client credentials "
            "with private_key_jwt, scopes okta.groups.read okta.users.read), "
            "which Okta recommends over API tokens. Requires "
            "--okta-api-private-key-file."
        ),
    )
    okta.add_argument(
        "--okta-api-private-key-file",
        metavar="FILE",
        help=(
            "The service app's private key: PEM (RSA or EC, unencrypted) or a "
            "private JWK as Okta's console shows it; re-read when it changes."
        ),
    )
    okta.add_argument(
        "--okta-api-key-id",
        metavar="KID",
        help=(
            "The 'kid' of the service app's public key in Okta (default: the "
            "JWK file's own 'kid'; none for a PEM file)."
        ),
    )
    okta.add_argument(
        "--okta-api-dpop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Bind the service app's access token to a key with DPoP proofs "
            "(RFC 9449), as Okta requires by default for new API service apps "
            "(default on); --no-okta-api-dpop when the app's 'Require DPoP' is off."
        ),
    )


def _add_fetch_flags(okta: FlagGroup) -> None:
    okta.add_argument(
        "--okta-org-url",
        metavar="URL",
        help=(
            "The Okta org whose API is asked, e.g. https://example.okta.com "
            "(default: each issuer URL's scheme and host)."
        ),
    )
    okta.add_argument(
        "--okta-groups-issuer",
        metavar="URL",
        action="append",
        help=(
            "An issuer (issuer.url of --authentication-config) whose users' groups "
            "are fetched; repeat for several. Default: the only configured issuer "
            "(--oidc-issuer-url, or a file with one jwt entry)."
        ),
    )
    okta.add_argument(
        "--okta-groups-cap",
        metavar="N",
        type=int,
        help=(
            "A groups claim with N entries or more is taken as truncated and "
            f"replaced by the API's answer (default {_DEFAULT_OKTA.cap})."
        ),
    )
    okta.add_argument(
        "--okta-groups-filter",
        metavar="REGEX",
        help=(
            "Keep only the group names the regular expression matches in full, "
            "as the groups claim's 'Matches regex' filter in Okta does (default "
            f"{_DEFAULT_OKTA.filter!r}). The groups prefix is applied afterwards."
        ),
    )
    okta.add_argument(
        "--okta-groups-cache-ttl",
        metavar="SECONDS",
        type=float,
        help=(
            "How long a user's fetched groups are reused (default "
            f"{_DEFAULT_OKTA.cache_ttl:g})."
        ),
    )
    okta.add_argument(
        "--okta-groups-timeout",
        metavar="SECONDS",
        type=float,
        help=(
            "Deadline of one user's fetch: every page, rate-limit waits and "
            f"retries (default {_DEFAULT_OKTA.timeout:g}); past it the token is "
            "refused with groups_unavailable (503 from the webhook)."
        ),
    )


def okta_from_args(
    ns: argparse.Namespace,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> OktaGroupsConfig | None:
    """The Okta groups settings the ``--okta-*`` flags give, None when no
    credential is given; problems are appended, in the flags' order."""
    token_file: str | None = getattr(ns, "okta_groups_api_token_file", None)
    client_id: str | None = getattr(ns, "okta_api_client_id", None)
    key_file: str | None = getattr(ns, "okta_api_private_key_file", None)
    if token_file is None and client_id is None:
        _without_credentials(ns, key_file, problems)
        return None
    _credential_problems(token_file, client_id, key_file, problems)
    key_id: str | None = getattr(ns, "okta_api_key_id", None)
    org_url: str | None = getattr(ns, "okta_org_url", None)
    if org_url is not None:
        _org_url_problems(org_url, problems)
    filter_regex: str = getattr(ns, "okta_groups_filter", None) or _DEFAULT_OKTA.filter
    try:
        re.compile(filter_regex)
    except re.error as err:
        problems.append(f"config: --okta-groups-filter: not a valid regex: {err}")
    cap = read_count(ns, "okta_groups_cap", _DEFAULT_OKTA.cap, 1, problems)
    ttl = read_number(
        ns,
        "okta_groups_cache_ttl",
        _DEFAULT_OKTA.cache_ttl,
        problems,
        allow_zero=False,
    )
    timeout = read_number(
        ns, "okta_groups_timeout", _DEFAULT_OKTA.timeout, problems, allow_zero=False
    )
    named = _okta_issuers(ns, authenticators, problems)
    return OktaGroupsConfig(
        issuers=tuple(dict.fromkeys(named)),
        org_url=org_url,
        api_token_file=token_file,
        client_id=client_id,
        private_key_file=key_file,
        key_id=key_id,
        dpop=bool(getattr(ns, "okta_api_dpop", True)),
        cap=cap,
        filter=filter_regex,
        cache_ttl=ttl,
        timeout=timeout,
    )


def _without_credentials(
    ns: argparse.Namespace, key_file: str | None, problems: list[str]
) -> None:
    """With no API token and no service app, any other ``--okta-*`` flag is
    a mistake: it would silently do nothing."""
    others = [f for f, dest in _OKTA_FLAGS if getattr(ns, dest, None) is not None]
    if key_file is not None:
        problems.append(
            "config: --okta-api-private-key-file requires --okta-api-client-id"
        )
    elif others:
        problems.append(
            f"config: {others[0]} requires --okta-groups-api-token-file or "
            "--okta-api-client-id (the Okta API credentials)"
        )


def _credential_problems(
    token_file: str | None,
    client_id: str | None,
    key_file: str | None,
    problems: list[str],
) -> None:
    """One credential, complete, in files that can be read (and a key that loads)."""
    if token_file is not None and client_id is not None:
        problems.append(
            "config: --okta-groups-api-token-file and --okta-api-client-id are "
            "mutually exclusive: give an API token or a service app, not both"
        )
    if client_id is not None and key_file is None:
        problems.append(
            "config: --okta-api-client-id requires --okta-api-private-key-file"
        )
    if token_file is not None:
        _okta_secret_problem("--okta-groups-api-token-file", token_file, problems)
    if client_id is not None and key_file is not None:
        text = _okta_secret_problem("--okta-api-private-key-file", key_file, problems)
        if text is not None:
            try:
                parse_client_key(text)
            except ValueError as err:
                problems.append(
                    f"config: --okta-api-private-key-file {json.dumps(key_file)}: {err}"
                )


def _org_url_problems(org_url: str, problems: list[str]) -> None:
    for problem in url_problems(org_url):
        problems.append(f"config: --okta-org-url: {problem}")
    if urlsplit(org_url).path.strip("/"):
        problems.append(
            "config: --okta-org-url: must be the org's scheme and host only "
            "(no path), e.g. https://example.okta.com"
        )


def _okta_issuers(
    ns: argparse.Namespace,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> list[str]:
    """The issuers whose users' groups are fetched: those named, or the only one."""
    by_url = {a.issuer.url: a for a in authenticators}
    named: list[str] | None = getattr(ns, "okta_groups_issuer", None)
    if named is None:
        if len(by_url) == 1:
            named = list(by_url)
        elif by_url:
            problems.append(
                "config: --okta-groups-api-token-file/--okta-api-client-id with "
                f"{len(by_url)} issuers in --authentication-config: name the Okta "
                "issuer(s) with --okta-groups-issuer URL"
            )
            named = []
        else:
            named = []
    for url in named:
        auth = by_url.get(url)
        if auth is None:
            configured = ", ".join(json.dumps(u) for u in by_url)
            problems.append(
                f"config: --okta-groups-issuer {json.dumps(url)}: no such issuer "
                f"is configured (configured: {configured})"
            )
        elif auth.claim_mappings.groups is None:
            problems.append(
                f"config: --okta-groups-issuer {json.dumps(url)}: the issuer maps "
                "no groups (give --oidc-groups-claim or claimMappings.groups), so "
                "fetched groups would be dropped"
            )
    return named


def _okta_secret_problem(flag: str, path: str, problems: list[str]) -> str | None:
    """An Okta credential file's text, or None with a problem."""
    return secret_text(
        flag, path, "give the file holding the Okta credential (docs/okta.md)", problems
    )


ClientKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_EC_ALGS: Mapping[str, str] = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
}


def parse_client_key(text: str) -> tuple[ClientKey, str, str | None]:
    """(key, alg, kid) of a service app's private key: PEM or a private JWK.

    Raises ``ValueError`` with a message that never quotes the key.
    """
    stripped = text.strip()
    kid: str | None = None
    key: object
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except ValueError:
            raise ValueError("not a JSON Web Key (invalid JSON)") from None
        if not isinstance(doc, dict) or "d" not in doc:
            raise ValueError(
                'a private JSON Web Key (with "d") is expected, not a public one'
            )
        if isinstance(doc.get("kid"), str):
            kid = doc["kid"]
        try:
            key = jwt.PyJWK(doc).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise ValueError("the JSON Web Key does not load") from None
    else:
        try:
            key = serialization.load_pem_private_key(stripped.encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError(
                "not an unencrypted PEM private key (PKCS#8 or PKCS#1) or a private JWK"
            ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits; 2048 or more needed")
        return key, "RS256", kid
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = _EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"EC curve {key.curve.name} is not P-256, P-384 or P-521")
        return key, alg, kid
    raise ValueError("only RSA and EC private keys are used by Okta service apps")
