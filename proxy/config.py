"""Configuration values: one frozen tree, parsed once, validated completely.

The authentication part has the two forms kube-apiserver accepts, with the same
meaning: the legacy ``--oidc-*`` flags and an ``AuthenticationConfiguration``
file. Both are turned into the same ``JWTAuthenticatorConfig`` values, so the
engine has a single code path; the legacy conveniences (the ``<issuer>#``
username prefix, ``-`` for no prefix, required claims) are resolved here, the way
kube-apiserver resolves them in its option code rather than in the library.

Every default lives in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from proxy.cel import CompiledExpression

__all__ = [
    "ALLOWED_SIGNING_ALGS",
    "DEFAULT_SIGNING_ALGS",
    "AuthConfig",
    "CacheSettings",
    "ClaimMappings",
    "ClaimOrExpression",
    "ClaimValidationRule",
    "ExtraMapping",
    "IssuerConfig",
    "JWTAuthenticatorConfig",
    "KeySetSettings",
    "PrefixedClaimOrExpression",
    "UserValidationRule",
]

#: Asymmetric algorithms only: a symmetric ``alg`` would turn the issuer's *public*
#: key into an HMAC secret. kube-apiserver allows RS/ES/PS; EdDSA is added because
#: PyJWT and cryptography verify it and some issuers (not Okta) sign with Ed25519.
ALLOWED_SIGNING_ALGS: frozenset[str] = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)

#: ``--oidc-signing-algs`` default, as kube-apiserver's.
DEFAULT_SIGNING_ALGS: tuple[str, ...] = ("RS256",)

#: Algorithms an ``AuthenticationConfiguration`` authenticator accepts. The file
#: format has no algorithm field; kube-apiserver accepts every asymmetric
#: algorithm it supports there, and so do we.
FILE_SIGNING_ALGS: tuple[str, ...] = tuple(sorted(ALLOWED_SIGNING_ALGS))

MAX_AUTHENTICATORS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuerConfig:
    """Where an issuer lives and which tokens of it we accept."""

    url: str
    discovery_url: str | None = None
    #: PEM text of the CA bundle that verifies the issuer's TLS (None: system CAs).
    certificate_authority: str | None = None
    audiences: tuple[str, ...]
    audience_match_policy: Literal["MatchAny", ""] = "MatchAny"
    signing_algs: tuple[str, ...] = DEFAULT_SIGNING_ALGS


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimOrExpression:
    """A value taken from one claim or computed by a CEL expression (uid)."""

    claim: str | None = None
    expression: CompiledExpression | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixedClaimOrExpression:
    """Username or groups: a claim with a prefix, or a CEL expression.

    ``prefix`` is ``None`` only with an expression; with a claim it is a string,
    possibly empty (the file format requires it; the flags' defaulting fills it).
    """

    claim: str | None = None
    prefix: str | None = None
    expression: CompiledExpression | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtraMapping:
    """One ``claimMappings.extra`` entry: a domain-prefixed key and its CEL value."""

    key: str
    value_expression: CompiledExpression


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimMappings:
    """How verified claims become a Kubernetes user."""

    username: PrefixedClaimOrExpression
    groups: PrefixedClaimOrExpression | None = None
    uid: ClaimOrExpression | None = None
    extra: tuple[ExtraMapping, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimValidationRule:
    """``claim`` + ``required_value`` (also the legacy required claims) or CEL."""

    claim: str | None = None
    required_value: str | None = None
    expression: CompiledExpression | None = None
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UserValidationRule:
    """A CEL rule over the mapped ``user``; ``message`` is what a refusal says."""

    expression: CompiledExpression
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTAuthenticatorConfig:
    """One issuer's authenticator: the ``jwt[]`` entry, or the legacy flags."""

    issuer: IssuerConfig
    claim_mappings: ClaimMappings
    claim_validation_rules: tuple[ClaimValidationRule, ...] = ()
    user_validation_rules: tuple[UserValidationRule, ...] = ()
    #: ``jwt[3]`` for a file entry, ``--oidc-*`` for flags; prefixes messages.
    source: str = "--oidc-*"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySetSettings:
    """How issuer keys are fetched and kept (one set of bounds for all issuers)."""

    #: Least time between two refetches forced by an unknown ``kid``, per issuer.
    unknown_kid_cooldown: float = 30.0
    #: How long an unknown ``kid`` is remembered as unknown (no refetch for it).
    unknown_kid_ttl: float = 60.0
    #: Bounds on the JWKS cache lifetime taken from ``Cache-Control: max-age``.
    min_refresh_interval: float = 60.0
    max_refresh_interval: float = 3600.0
    #: Used when the JWKS response carries no usable ``max-age``.
    default_refresh_interval: float = 600.0
    #: Retry after a failed fetch: exponential from ``retry_min`` to ``retry_max``.
    retry_min: float = 1.0
    retry_max: float = 60.0
    #: Whole-request timeout for one discovery or JWKS fetch.
    fetch_timeout: float = 10.0
    #: Largest discovery document or JWKS accepted, in bytes.
    max_document_bytes: int = 512 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """The authentication result cache (keyed by a token hash, never the token)."""

    max_entries: int = 100_000
    #: Longest an accepted token's result is kept (never beyond its ``exp``).
    success_ttl: float = 300.0
    #: How long a refusal is remembered, so replaying a bad token is cheap.
    failure_ttl: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Everything the authentication engine needs, from flags or from a file."""

    authenticators: tuple[JWTAuthenticatorConfig, ...]
    keyset: KeySetSettings = field(default_factory=KeySetSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    #: Leeway in seconds for ``exp``, ``nbf`` and ``iat``.
    leeway: float = 60.0
    #: Largest token (bytes) looked at; anything bigger is refused unread.
    max_token_bytes: int = 16 * 1024
    #: ``flags`` or ``file``: which form the configuration came in.
    form: Literal["flags", "file"] = "flags"
