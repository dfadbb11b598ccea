"""The configuration's values: frozen dataclasses and every default.

What the flags and the ``AuthenticationConfiguration`` file are turned into,
and nothing else: the groups of ``proxy.options`` read and check their flags
and build these; the engine, the handlers and the CLI read them. A default
lives here once, so a flag's help, its validation and the engine agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from proxy.cel import CompiledExpression

__all__ = [
    "ALLOWED_SIGNING_ALGS",
    "DEFAULT_PROBE_ADDRESS",
    "DEFAULT_PROXY_PORT",
    "DEFAULT_REVOCATION_LIFETIME",
    "DEFAULT_REVOCATION_NAMESPACE",
    "DEFAULT_SIGNING_ALGS",
    "DEFAULT_WEBHOOK_PORT",
    "FILE_SIGNING_ALGS",
    "INTROSPECTION_POLICIES",
    "MAX_AUTHENTICATORS",
    "OKTA_API_SCOPES",
    "SUPPORTED_API_VERSIONS",
    "AdmissionSettings",
    "AuthConfig",
    "CacheSettings",
    "ClaimMappings",
    "ClaimOrExpression",
    "ClaimValidationRule",
    "ExtraMapping",
    "IntrospectionClient",
    "IntrospectionConfig",
    "IssuerConfig",
    "JWTAuthenticatorConfig",
    "KeySetSettings",
    "OktaEventHookConfig",
    "OktaGroupsConfig",
    "PrefixedClaimOrExpression",
    "RevocationSettings",
    "Secret",
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

#: Most ``jwt`` authenticators one file may hold (kube-apiserver's limit).
MAX_AUTHENTICATORS = 64

# Default listen ports. A gate often runs beside the control plane (a webhook
# as a static pod or on the host network, the bare command on a node), so none
# of them may be a port that is already taken there: kube-apiserver (6443;
# 8443 on minikube, 16443 on MicroK8s, 6444 and 9345 on k3s/RKE2), etcd
# (2379-2381), the kubelet (10248, 10250), kube-proxy (10249, 10256),
# kube-controller-manager (10257), kube-scheduler (10259), ingress controllers
# (80, 443, 8080, 8443, 10254), Ceph daemons under Rook (6800-7300), MetalLB
# (7472, 7946), the NodePort range (30000-32767) or the ephemeral range
# (32768 and up). In a pod the ports are the pod's own, and the Service
# publishes 443 in front of them.

#: ``webhook --secure-port`` default.
DEFAULT_WEBHOOK_PORT = 7443
#: ``proxy --secure-port`` default: not the webhook's, so both modes can run
#: side by side on one machine (a migration from one to the other).
DEFAULT_PROXY_PORT = 7444
#: ``--probe-bind-address`` default (plain HTTP: /healthz, /readyz, /metrics).
DEFAULT_PROBE_ADDRESS = "0.0.0.0:7400"

#: ``apiVersion`` values of an ``AuthenticationConfiguration`` we read; they
#: share every field (see the module docstring for why v1alpha1 is here).
SUPPORTED_API_VERSIONS: tuple[str, ...] = (
    "apiserver.config.k8s.io/v1",
    "apiserver.config.k8s.io/v1beta1",
    "apiserver.config.k8s.io/v1alpha1",
)


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
class AdmissionSettings:
    """Turns for new tokens while junk floods in beside remembered users.

    See ``proxy.admission``: new tokens together start at most ``per_turn``
    validations per turn of a worker's event loop while accepted tokens were
    answered from the cache in the last ``window`` seconds and most new tokens
    of the last one or two windows were refused or not ours.
    """

    #: New tokens started per turn of the event loop; 0 turns the rule off.
    per_turn: int = 1
    #: Most new tokens waiting for a turn; one more is answered 503.
    max_waiting: int = 1024
    #: Seconds over which remembered users and new tokens' outcomes are seen.
    window: float = 1.0


class Secret:
    """A credential held in memory: ``repr`` and ``str`` never show it.

    ``reveal()`` is called only where the value goes on the wire (an
    ``Authorization`` header); everywhere else (logs, exceptions, ``repr`` of
    the objects holding it) sees ``Secret('***')``, as starlette's ``Secret``.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The credential itself, for the one header that carries it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


#: Scopes the OAuth 2.0 service app asks for (docs/okta.md): read-only.
OKTA_API_SCOPES: tuple[str, ...] = ("okta.groups.read", "okta.users.read")


@dataclass(frozen=True, slots=True, kw_only=True)
class OktaGroupsConfig:
    """Groups beyond the token: ask Okta's API when the claim is capped or absent.

    One Okta org's API credentials (an API token, or a service app's client id
    and private key), used for the issuers in ``issuers``. The secret files are
    named here, checked at start-up, and re-read by ``proxy.oktaapi`` when they
    change (key rotation without a restart), so only their paths are kept.
    """

    issuers: tuple[str, ...]
    #: ``None``: each issuer's own scheme and host (an Okta issuer lives there).
    org_url: str | None = None
    api_token_file: str | None = None
    client_id: str | None = None
    private_key_file: str | None = None
    #: ``kid`` of the client assertion; a JWK key file's own ``kid`` otherwise.
    key_id: str | None = None
    #: Send DPoP proofs (RFC 9449) with the service app, as Okta requires by
    #: default for new API service apps.
    dpop: bool = True
    #: A groups claim with this many entries or more is taken as truncated.
    cap: int = 100
    #: Group names kept (``re.fullmatch``, like Okta's "Matches regex").
    filter: str = ".*"
    #: How long a user's fetched groups are reused.
    cache_ttl: float = 300.0
    #: Most users whose groups are remembered.
    cache_entries: int = 10_000
    #: Whole-fetch deadline (every page, rate-limit waits and retries).
    timeout: float = 10.0
    #: Most fetches in flight at once, per process.
    concurrency: int = 4
    #: Most pages followed for one user (200 groups each).
    max_pages: int = 25

    def org_for(self, issuer_url: str) -> str:
        """The Okta org whose API answers for ``issuer_url``."""
        if self.org_url is not None:
            return self.org_url.rstrip("/")
        parts = urlsplit(issuer_url)
        return f"{parts.scheme}://{parts.netloc}"


#: ``--introspection-failure-policy`` values.
INTROSPECTION_POLICIES: tuple[str, ...] = ("deny", "allow-cached")


@dataclass(frozen=True, slots=True, kw_only=True)
class IntrospectionClient:
    """One issuer's introspection client (RFC 7662, ``client_secret_basic``).

    The secret is read from its file once, at start-up, into a ``Secret``
    (rotating it needs a restart, which every replica gets from a rollout).
    """

    issuer: str
    client_id: str
    client_secret: Secret
    #: ``None``: the discovery document's ``introspection_endpoint``.
    endpoint: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IntrospectionConfig:
    """Ask the issuer whether a verified token is still active (``proxy.introspection``)."""

    clients: tuple[IntrospectionClient, ...]
    #: How long an answer is reused per token (never beyond the token's ``exp``).
    cache_ttl: float = 30.0
    #: ``deny``: no answer refuses the token; ``allow-cached``: the last
    #: ``active`` answer is used while it is at most ``max_staleness`` old.
    failure_policy: Literal["deny", "allow-cached"] = "deny"
    max_staleness: float = 300.0
    #: Whole-request timeout of one introspection call.
    timeout: float = 5.0
    #: Most introspection calls in flight at once, per process.
    concurrency: int = 16
    #: Most tokens whose answers are remembered.
    cache_entries: int = 100_000
    token_type_hint: str = "id_token"  # noqa: S105 - a token type, not a secret

    def client_for(self, issuer: str) -> IntrospectionClient | None:
        """The introspection client of ``issuer``; ``None``: introspection is off."""
        for client in self.clients:
            if client.issuer == issuer:
                return client
        return None


#: Where ``kube-oidc-gate revoke`` writes, and where ``deploy/`` puts the gate.
DEFAULT_REVOCATION_NAMESPACE = "kube-oidc-gate"
#: ``revoke --expires-in`` default: the longest token lifetime we expect
#: (Okta access tokens may live up to 24 h; ID tokens 1 h).
DEFAULT_REVOCATION_LIFETIME = 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationSettings:
    """Watch the Revocation objects of one namespace (``proxy.revocation_api``)."""

    namespace: str
    #: kubeconfig with the gate's credential; ``None``: the in-cluster
    #: service account.
    kubeconfig: str | None = None
    context: str | None = None
    #: Server-side bound of one watch request (the API server ends it; we
    #: re-watch from the last resourceVersion at once).
    watch_timeout: float = 300.0
    #: Longest silence on an open watch before it is taken as broken (the API
    #: server sends a bookmark about every minute).
    idle_timeout: float = 90.0
    #: Backoff after a failure: first delay, and the bound (full jitter).
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Timeout of a list, create or delete request.
    request_timeout: float = 10.0
    #: How often expired objects are looked for (and deleted).
    expiry_interval: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Everything the authentication engine needs, from flags or from a file."""

    authenticators: tuple[JWTAuthenticatorConfig, ...]
    keyset: KeySetSettings = field(default_factory=KeySetSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    #: Clock skew allowed on ``nbf`` (seconds); go-oidc's fixed 5 minutes by
    #: default. ``exp`` has no leeway and ``iat`` is not compared, as in
    #: kube-apiserver.
    leeway: float = 300.0
    #: Largest token (bytes) looked at; anything bigger is refused unread.
    max_token_bytes: int = 16 * 1024
    #: ``flags`` or ``file``: which form the configuration came in.
    form: Literal["flags", "file"] = "flags"
    #: Groups fetched from Okta's API (``--okta-*``); None: off.
    okta: OktaGroupsConfig | None = None
    #: Token introspection (``--introspection-*``); None: off for every issuer.
    introspection: IntrospectionConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OktaEventHookConfig:
    """``--okta-event-hook-*``: where Okta's event hook is served, and its secret."""

    host: str
    port: int
    #: The whole ``Authorization`` header value Okta sends (its *secret*).
    secret: Secret
    #: Where the revocations the hook makes are stored (issue 22, part 2).
    revocation_namespace: str
