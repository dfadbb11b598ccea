"""One exception tree for the whole service.

Every refusal kube-oidc-gate makes is one of these classes, so callers catch the
base and tests assert the leaf. Each token error carries a stable ``reason``
code: it is the metric label, the log field, the webhook's ``status.error``
prefix and the key of README's troubleshooting table, so a person can go from
a counter in Grafana to the fix without reading code.

Messages are lowercase, start with the component (``token:``, ``jwks:``,
``claims:``, ``config:``), quote the claim or field, and say expected vs got
where that is harmless. They never contain a token: the token text is never
passed to a constructor here.

    ProxyError
    ├── ConfigError                 start-up: flags or AuthenticationConfiguration
    │   └── AuditPolicyError        the --audit-policy-file (field paths listed)
    ├── KeySetError                 the issuer's discovery document or JWKS
    │   └── DiscoveryError
    ├── TokenError                  a presented token is refused (reason code)
    │   ├── MalformedToken          not a compact JWS we will read
    │   ├── AlgorithmNotAllowed     alg outside the allowlist, or key/alg mismatch
    │   ├── UnknownKeyId            no key for the token's kid, even after refetch
    │   ├── KeysUnavailable         the issuer's keys were never loaded (retry)
    │   ├── Overloaded              too many new tokens wait for a turn (retry)
    │   ├── SignatureInvalid
    │   ├── TokenExpired
    │   ├── TokenNotYetValid        nbf in the future (beyond --clock-skew)
    │   ├── IssuerMismatch
    │   ├── AudienceMismatch
    │   ├── MissingClaim
    │   ├── InvalidClaim            present but of the wrong type or value
    │   ├── ClaimSourceError        a distributed claim cannot be resolved
    │   │   └── ClaimSourceUnavailable  its endpoint failed to answer (retry)
    │   ├── TokenRevoked            introspection or a Revocation object says so
    │   ├── RevocationsUnavailable  the revocation list was never read (retry)
    │   ├── ClaimRuleFailed         claimValidationRules / required claims
    │   └── UserRuleFailed          userValidationRules
    ├── ExpressionError             a CEL expression failed to evaluate
    ├── RevocationError             a Revocation object, or the API holding them
    └── UpstreamError               the proxied API server failed
"""

from __future__ import annotations

__all__ = [
    "AlgorithmNotAllowed",
    "AudienceMismatch",
    "AuditPolicyError",
    "ClaimRuleFailed",
    "ClaimSourceError",
    "ClaimSourceUnavailable",
    "ConfigError",
    "DiscoveryError",
    "ExpressionError",
    "GroupsUnavailable",
    "IntrospectionUnavailable",
    "InvalidClaim",
    "IssuerMismatch",
    "KeySetError",
    "KeysUnavailable",
    "MalformedToken",
    "MissingClaim",
    "Overloaded",
    "ProxyError",
    "RevocationError",
    "RevocationsUnavailable",
    "SignatureInvalid",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenRevoked",
    "UnknownKeyId",
    "UpstreamError",
    "UserRuleFailed",
]


class ProxyError(Exception):
    """Root of every error kube-oidc-gate raises on purpose."""


class ConfigError(ProxyError):
    """The configuration cannot be used; start-up stops with exit code 2.

    ``problems`` lists every problem found, each naming its field path, so an
    operator fixes the file in one pass instead of one error per restart.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


class AuditPolicyError(ConfigError):
    """The audit ``Policy`` file cannot be used; ``problems`` names each field
    (``rules[2].level``) so it is fixed in one pass, as kube-apiserver's
    validation reports it.
    """


class KeySetError(ProxyError):
    """Fetching or parsing an issuer's discovery document or key set failed."""


class DiscoveryError(KeySetError):
    """The discovery document is unusable (most often: its ``issuer`` differs)."""


class TokenError(ProxyError):
    """A presented token is refused; ``reason`` is its stable code.

    ``temporary`` marks refusals that say nothing about the token itself (the
    keys are not loaded yet): the webhook answers 503 for those so the API
    server retries, and the result cache does not remember them.
    """

    reason: str = "invalid"
    temporary: bool = False

    def __init__(self, message: str, *, issuer: str | None = None) -> None:
        super().__init__(message)
        self.issuer = issuer


class MalformedToken(TokenError):
    """Not a compact JWS with a JSON header and a JSON-object payload."""

    reason = "malformed"


class AlgorithmNotAllowed(TokenError):
    """The ``alg`` is not allowed, or does not fit the key's type."""

    reason = "alg_not_allowed"


class UnknownKeyId(TokenError):
    """No published key matches the token's ``kid``, even after a refetch."""

    reason = "unknown_kid"

    def __init__(self, message: str, *, kid: str | None, issuer: str | None = None):
        super().__init__(message, issuer=issuer)
        self.kid = kid


class KeysUnavailable(TokenError):
    """The issuer's keys have never been loaded; the answer may change soon."""

    reason = "keys_unavailable"
    temporary = True


class Overloaded(TokenError):
    """Too many new tokens wait for their turn (``proxy.admission``); retry soon.

    Says nothing about the token, so it is temporary: answered 503 with
    ``Retry-After`` and never remembered.
    """

    reason = "overloaded"
    temporary = True


class SignatureInvalid(TokenError):
    """The signature does not verify with the key the ``kid`` names."""

    reason = "bad_signature"


class TokenExpired(TokenError):
    """``exp`` is in the past (no leeway, as go-oidc and kube-apiserver)."""

    reason = "expired"


class TokenNotYetValid(TokenError):
    """``nbf`` is in the future beyond the leeway (``iat`` is never compared, as go-oidc)."""

    reason = "not_yet_valid"


class IssuerMismatch(TokenError):
    """The token's ``iss`` is not the configured issuer URL.

    Raised after the signature verified, or before it for a *near miss*: an
    ``iss`` that names no configured issuer but shares a host with one (a
    trailing slash, the scheme, case, port or path apart). kube-apiserver
    calls that "not mine" and says nothing; an Okta custom domain or a slash
    typo then looks like a token nobody knows. We say which issuer it nearly
    was (``expected``) and what the token said (``got``, a claim value, safe
    to log; never the token). ``near_miss`` marks the unverified kind, which
    the proxy still passes through under ``--token-passthrough``.
    """

    reason = "issuer_mismatch"

    def __init__(
        self,
        message: str,
        *,
        issuer: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        near_miss: bool = False,
    ) -> None:
        super().__init__(message, issuer=issuer)
        self.expected = expected
        self.got = got
        self.near_miss = near_miss


class AudienceMismatch(TokenError):
    """No ``aud`` value is among the configured audiences."""

    reason = "audience_mismatch"


class MissingClaim(TokenError):
    """A claim the configuration needs is absent."""

    reason = "claim_missing"

    def __init__(self, message: str, *, claim: str, issuer: str | None = None):
        super().__init__(message, issuer=issuer)
        self.claim = claim


class InvalidClaim(TokenError):
    """A claim is present but has the wrong type or a refused value."""

    reason = "claim_invalid"

    def __init__(self, message: str, *, claim: str, issuer: str | None = None):
        super().__init__(message, issuer=issuer)
        self.claim = claim


class ClaimSourceError(TokenError):
    """A distributed claim (OIDC Core §5.6.2) was refused or did not verify.

    Also the egress policy's refusal: an endpoint off the issuer's origin is
    never called (``proxy.distclaims``).
    """

    reason = "claim_source"


class ClaimSourceUnavailable(ClaimSourceError):
    """The claim source did not answer usefully (network, timeout, status).

    Says nothing about the token, so it is temporary: the webhook answers
    503 and the API server retries; the result cache does not remember it.
    """

    reason = "claim_source_unavailable"
    temporary = True


class GroupsUnavailable(TokenError):
    """The groups claim is capped or absent and Okta's API did not answer.

    Fail closed: without the full list the user would silently lose (or,
    from a stale list, keep) groups, so the token is refused until the API
    answers. Temporary, like ``keys_unavailable``: the webhook answers 503
    and kube-apiserver retries; the result cache does not remember it.
    """

    reason = "groups_unavailable"
    temporary = True


class TokenRevoked(TokenError):
    """The token was revoked: the issuer's introspection endpoint (RFC 7662)
    says it is not active, or a Revocation object names its subject
    (``proxy.revocation``).

    The signature and claims were fine: the user was deactivated, the
    session ended. Not temporary: the token will not become valid again
    (a lifted Revocation drops the remembered refusals).
    """

    reason = "revoked"


class RevocationsUnavailable(TokenError):
    """``--revocation-namespace`` is on and the list was never read.

    Fail closed: until the first list of the Revocation objects succeeds,
    a token that may be revoked is not accepted. Temporary: the webhook
    answers 503 and kube-apiserver retries; ``/readyz`` says not ready.
    Once read, the list stays in force while the watch is broken.
    """

    reason = "revocations_unavailable"
    temporary = True


class RevocationError(ProxyError):
    """A Revocation object is malformed, or the API refused to store one.

    ``status`` is the API server's HTTP status when it answered (403: RBAC,
    404: namespace or CRD missing), ``None`` otherwise.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class IntrospectionUnavailable(TokenError):
    """Introspection is on for the issuer and it gave no usable answer.

    With ``--introspection-failure-policy deny`` (the default) the token is
    refused rather than accepted unchecked. Temporary: the webhook answers
    503, kube-apiserver retries, and the result cache does not remember it.
    """

    reason = "introspection_unavailable"
    temporary = True


class ClaimRuleFailed(TokenError):
    """A required claim or a ``claimValidationRules`` entry failed."""

    reason = "rule_failed"


class UserRuleFailed(TokenError):
    """A ``userValidationRules`` entry failed for the mapped user."""

    reason = "user_rule_failed"


class ExpressionError(ProxyError):
    """A compiled CEL expression failed at evaluation time (no such key, bad type).

    The claim mapping turns this into a token error that names the field path
    of the expression, so the operator knows which line of the file to read.
    """


class UpstreamError(ProxyError):
    """The API server behind the proxy failed, timed out or was unreachable."""

    def __init__(self, message: str, *, status: int = 502) -> None:
        super().__init__(message)
        self.status = status
