"""Configuration values: one frozen tree, parsed once, validated completely.

The authentication part has the two forms kube-apiserver accepts, with the same
meaning: the legacy ``--oidc-*`` flags and an ``AuthenticationConfiguration``
file. Both are turned into the same ``JWTAuthenticatorConfig`` values, so the
engine has a single code path; the legacy conveniences (the ``<issuer>#``
username prefix, ``-`` for no prefix, required claims) are resolved here, the way
kube-apiserver resolves them in its option code rather than in the library.

Every default lives in this module.

Loaders
-------
``add_auth_arguments`` / ``auth_config_from_args`` read the flags;
``load_authentication_config`` / ``parse_authentication_config`` read the file.
The file is decoded strictly (an unknown or duplicated field is an error, as
in kube-apiserver, which decodes this file with its strict codec) and
validated with kube-apiserver's rules and wording, so an error message can be
searched for in Kubernetes' documentation. Every problem is collected and
reported at once, each as ``config: <source>: <field path>: <kind>: <detail>``.

Deliberate differences from kube-apiserver, all of them refusals or
relaxations that cannot change what a valid configuration means:

- plain ``http`` issuer and discovery URLs are accepted when the host is a
  loopback address (127.0.0.0/8, ::1, ``localhost``): tests and ``--dev`` run
  an issuer on the same machine, and a loopback connection cannot be
  intercepted by the network;
- an issuer URL must have a host;
- ``anonymous.enabled: true`` is refused: this service only ever answers with
  an identity proven by a token, so there is no anonymous user to hand out;
- ``issuer.egressSelectorType`` is accepted and ignored: it picks one of
  kube-apiserver's konnectivity tunnels, which do not exist here; this process
  reaches the issuer over its own network, like any other pod;
- ``apiserver.config.k8s.io/v1alpha1`` is accepted beside ``v1beta1`` and
  ``v1``, as kube-apiserver 1.34 still accepts it: the three share every field
  read here, and refusing it would only break files copied from older clusters;
- the file must name at least one ``jwt`` authenticator (kube-apiserver allows
  none, for anonymous-only setups, which we refuse anyway);
- ``--oidc-groups-prefix`` without ``--oidc-groups-claim`` is an error rather
  than silently ignored, and conflicting ``--oidc-required-claim`` values for
  one claim are an error rather than "the last one wins".
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import math
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.cel import CompiledExpression, Returns, compile_expression
from proxy.errors import ConfigError

__all__ = [
    "ALLOWED_SIGNING_ALGS",
    "DEFAULT_PROBE_ADDRESS",
    "DEFAULT_PROXY_PORT",
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
    "add_auth_arguments",
    "add_okta_event_hook_arguments",
    "add_revocation_arguments",
    "add_revoke_arguments",
    "apply_tuning_args",
    "auth_config_from_args",
    "decode_document",
    "file_problem",
    "is_loopback_host",
    "load_authentication_config",
    "okta_event_hook_from_args",
    "parse_authentication_config",
    "parse_client_key",
    "parse_duration",
    "revocation_settings_from_args",
    "url_problems",
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


# --------------------------------------------------------------------------
# Shared checks (flags and file)
# --------------------------------------------------------------------------

_LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP (127.0.0.0/8, ::1).

    The one place plain http is allowed for an issuer, a JWKS or an upstream:
    tests and ``--dev`` run on loopback, where nothing crosses a network.
    """
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def file_problem(
    flag: str, path: str, remedy: str, *, component: str = "config"
) -> str | None:
    """What is wrong with the file ``flag`` names, or None when it can be read.

    Every flag that names a file says the same three things when it cannot be
    read: which flag and path, whether the file is missing, a directory or
    unreadable, and ``remedy`` (what to give instead, or what leaving the flag
    out does), so the operator fixes it without reading the code. The content
    is checked later, by whoever parses it.
    """
    where = f"{component}: {flag} {json.dumps(path)}"
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return f"{where}: no such file; {remedy}"
    except IsADirectoryError:
        return f"{where}: is a directory, not a file; {remedy}"
    except OSError as err:
        return f"{where}: cannot read: {(err.strerror or str(err)).lower()}"
    return None


def url_problems(
    url: str, *, loopback_http: bool = True, allow_query: bool = False
) -> list[str]:
    """What is wrong with a URL we will send requests (or tokens) to.

    kube-apiserver's rules for issuer URLs: https, a host, no credentials, no
    query (``iss`` must equal it), no fragment. Plain ``http`` passes only for a
    loopback host when ``loopback_http`` allows it, for tests and ``--dev``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError as err:
        return [str(err)]
    problems: list[str] = []
    if parts.scheme == "http" and loopback_http:
        if not (host and is_loopback_host(host)):
            problems.append(
                "URL scheme must be https (plain http is allowed only for a "
                "loopback host: 127.0.0.0/8, ::1, localhost)"
            )
    elif parts.scheme != "https":
        problems.append("URL scheme must be https")
    if not host:
        problems.append("URL must contain a host")
    if parts.username is not None or parts.password is not None:
        problems.append("URL must not contain a username or password")
    if parts.query and not allow_query:
        problems.append("URL must not contain a query")
    if parts.fragment:
        problems.append("URL must not contain a fragment")
    return problems


def _pem_problem(pem: str) -> str | None:
    """Why ``pem`` is not a usable CA bundle, or None.

    The bundle is loaded the way the issuer connection will load it (an
    ``ssl`` trust store), so a bundle accepted here cannot fail later; the
    certificates are also parsed so the message can say which part is wrong.
    Blocks other than CERTIFICATE are skipped, as kube-apiserver skips them.
    """
    if "-----BEGIN CERTIFICATE-----" not in pem:
        return "no PEM CERTIFICATE block found"
    try:
        x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except ValueError as err:
        return f"a CERTIFICATE block does not parse: {err}"
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as err:
        return f"not usable as a TLS trust store: {err}"
    return None


# --------------------------------------------------------------------------
# Form 1: the legacy --oidc-* flags, and the engine's tunables
# --------------------------------------------------------------------------

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
_DEFAULT_KEYSET = KeySetSettings()
_DEFAULT_CACHE = CacheSettings()
_DEFAULT_ADMISSION = AdmissionSettings()
_DEFAULT_LEEWAY = AuthConfig(authenticators=()).leeway


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the authentication flags: kube-apiserver's names, defaults and meaning.

    The ``--oidc-*`` flags default to None here and are defaulted in
    ``auth_config_from_args``, so that "given" can be told from "defaulted":
    the two configuration forms are mutually exclusive.
    """
    group = parser.add_argument_group(
        "authentication",
        "Either --authentication-config FILE or the --oidc-* flags (one issuer), "
        "with the same meaning as kube-apiserver's flags of the same names.",
    )
    group.add_argument(
        "--authentication-config",
        metavar="FILE",
        help=(
            "An AuthenticationConfiguration file (YAML or JSON, apiVersion "
            "apiserver.config.k8s.io/v1, v1beta1 or v1alpha1), as given to "
            "kube-apiserver's flag of the same name: up to 64 issuers, CEL claim "
            "mappings and validation rules. Mutually exclusive with every "
            "--oidc-* flag. anonymous.enabled: true is refused."
        ),
    )
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

    tuning = parser.add_argument_group(
        "token validation tuning",
        "Bounds of the authentication engine; they apply to both forms above.",
    )
    tuning.add_argument(
        "--jwks-unknown-kid-cooldown",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_KEYSET.unknown_kid_cooldown,
        help=(
            "Least time between two key set refetches forced by a token whose 'kid' "
            "is unknown, per issuer (default %(default)s). Lowering it lets anyone "
            "who can send a token make us call the issuer more often."
        ),
    )
    tuning.add_argument(
        "--jwks-fetch-timeout",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_KEYSET.fetch_timeout,
        help="Timeout of one discovery or key set request (default %(default)s).",
    )
    tuning.add_argument(
        "--token-cache-size",
        metavar="N",
        type=int,
        default=_DEFAULT_CACHE.max_entries,
        help=(
            "Most authentication results kept, keyed by a hash of the token "
            "(default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--token-cache-success-ttl",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_CACHE.success_ttl,
        help=(
            "Longest time an accepted token's result is reused (never beyond the "
            "token's 'exp'); 0 disables (default %(default)s). A token's claims, "
            "and so the user's groups, are not re-read during this time."
        ),
    )
    tuning.add_argument(
        "--token-cache-failure-ttl",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_CACHE.failure_ttl,
        help=(
            "How long a refused token is remembered as refused, so replaying it "
            "is cheap; 0 disables (default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--new-tokens-per-turn",
        metavar="N",
        type=int,
        default=_DEFAULT_ADMISSION.per_turn,
        help=(
            "While accepted tokens are answered from the cache, tokens never seen "
            "before start at most N validations per turn of a worker's event "
            "loop, where each client of a remembered token gets one answer; the "
            "others wait their turn in order. Keeps a flood of new (junk) tokens "
            "from slowing down the users already logged in. 0 turns it off "
            "(default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--new-token-queue",
        metavar="N",
        type=int,
        default=_DEFAULT_ADMISSION.max_waiting,
        help=(
            "Most new tokens waiting for a turn per worker; one more is answered "
            "503 with Retry-After, which kube-apiserver and kubectl retry "
            "(default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--clock-skew",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_LEEWAY,
        help=(
            "How far in the future a token's 'nbf' may be, for an issuer whose "
            "clock runs ahead of ours (default %(default)s, kube-apiserver's "
            "fixed 5 minutes). As in kube-apiserver, 'exp' has no leeway and "
            "'iat' is not compared with the clock."
        ),
    )
    _add_okta_arguments(parser)
    _add_introspection_arguments(parser)


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


def _add_okta_arguments(parser: argparse.ArgumentParser) -> None:
    okta = parser.add_argument_group(
        "okta groups",
        "Fetch a user's groups from Okta's API when the token's groups claim is "
        "absent (minified tokens of the org authorization server) or holds at "
        "least --okta-groups-cap entries (Okta puts at most 100 in a token). "
        "Off unless an API token or a service app is given; docs/okta.md.",
    )
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


def _okta_from_args(
    ns: argparse.Namespace,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> OktaGroupsConfig | None:
    token_file: str | None = getattr(ns, "okta_groups_api_token_file", None)
    client_id: str | None = getattr(ns, "okta_api_client_id", None)
    key_file: str | None = getattr(ns, "okta_api_private_key_file", None)
    others = [f for f, dest in _OKTA_FLAGS if getattr(ns, dest, None) is not None]
    if token_file is None and client_id is None:
        if key_file is not None:
            problems.append(
                "config: --okta-api-private-key-file requires --okta-api-client-id"
            )
        elif others:
            problems.append(
                f"config: {others[0]} requires --okta-groups-api-token-file or "
                "--okta-api-client-id (the Okta API credentials)"
            )
        return None
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
    key_id: str | None = getattr(ns, "okta_api_key_id", None)
    if client_id is not None and key_file is not None:
        text = _okta_secret_problem("--okta-api-private-key-file", key_file, problems)
        if text is not None:
            try:
                parse_client_key(text)
            except ValueError as err:
                problems.append(
                    f"config: --okta-api-private-key-file {json.dumps(key_file)}: {err}"
                )
    org_url: str | None = getattr(ns, "okta_org_url", None)
    if org_url is not None:
        for problem in url_problems(org_url):
            problems.append(f"config: --okta-org-url: {problem}")
        if urlsplit(org_url).path.strip("/"):
            problems.append(
                "config: --okta-org-url: must be the org's scheme and host only "
                "(no path), e.g. https://example.okta.com"
            )
    filter_regex: str = getattr(ns, "okta_groups_filter", None) or _DEFAULT_OKTA.filter
    try:
        re.compile(filter_regex)
    except re.error as err:
        problems.append(f"config: --okta-groups-filter: not a valid regex: {err}")
    cap = _count(ns, "okta_groups_cap", _DEFAULT_OKTA.cap, 1, problems)
    ttl = _number(
        ns,
        "okta_groups_cache_ttl",
        _DEFAULT_OKTA.cache_ttl,
        problems,
        allow_zero=False,
    )
    timeout = _number(
        ns, "okta_groups_timeout", _DEFAULT_OKTA.timeout, problems, allow_zero=False
    )
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


# --------------------------------------------------------------------------
# Token introspection (RFC 7662): flags and the side file
# --------------------------------------------------------------------------

_DEFAULT_INTROSPECTION = IntrospectionConfig(clients=())

#: Flag -> dest of the introspection tunables (they need a client to apply to).
_INTROSPECTION_TUNING: tuple[tuple[str, str], ...] = (
    ("--introspection-cache-ttl", "introspection_cache_ttl"),
    ("--introspection-failure-policy", "introspection_failure_policy"),
    ("--introspection-max-staleness", "introspection_max_staleness"),
    ("--introspection-timeout", "introspection_timeout"),
    ("--introspection-concurrency", "introspection_concurrency"),
)

#: Fields of one entry of the ``--introspection-config`` file.
_INTROSPECTION_FIELDS: tuple[str, ...] = (
    "url",
    "clientID",
    "clientSecretFile",
    "introspectionEndpoint",
)


def _add_introspection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "token introspection",
        "Ask the issuer's introspection endpoint (RFC 7662) whether a verified "
        "token is still active, so a revoked token is refused within "
        "--introspection-cache-ttl instead of at its exp. Off unless a client "
        "is given; docs/configuration.md.",
    )
    group.add_argument(
        "--oidc-introspection-client-id",
        metavar="ID",
        help=(
            "Client id that authenticates to the --oidc-issuer-url issuer's "
            "introspection_endpoint (client_secret_basic). Requires "
            "--oidc-introspection-client-secret-file."
        ),
    )
    group.add_argument(
        "--oidc-introspection-client-secret-file",
        metavar="FILE",
        help="File holding that client's secret (read once at start-up).",
    )
    group.add_argument(
        "--introspection-config",
        metavar="FILE",
        help=(
            "YAML file mapping issuer URLs to introspection clients (issuers: "
            "[{url, clientID, clientSecretFile, introspectionEndpoint}]), for "
            "--authentication-config; docs/configuration.md."
        ),
    )
    group.add_argument(
        "--introspection-cache-ttl",
        metavar="SECONDS",
        type=float,
        help=(
            "How long an introspection answer is reused per token, and so the "
            "longest a revoked token is still accepted (default "
            f"{_DEFAULT_INTROSPECTION.cache_ttl:g}; never beyond the token's exp)."
        ),
    )
    group.add_argument(
        "--introspection-failure-policy",
        choices=INTROSPECTION_POLICIES,
        help=(
            "When the introspection endpoint does not answer: deny (default; "
            "refused as introspection_unavailable, 503 from the webhook so "
            "kube-apiserver retries) or allow-cached (use the token's last "
            "'active' answer while it is at most --introspection-max-staleness old)."
        ),
    )
    group.add_argument(
        "--introspection-max-staleness",
        metavar="SECONDS",
        type=float,
        help=(
            "With allow-cached: the oldest answer used during an outage "
            f"(default {_DEFAULT_INTROSPECTION.max_staleness:g})."
        ),
    )
    group.add_argument(
        "--introspection-timeout",
        metavar="SECONDS",
        type=float,
        help=(
            "Whole-request timeout of one introspection call (default "
            f"{_DEFAULT_INTROSPECTION.timeout:g})."
        ),
    )
    group.add_argument(
        "--introspection-concurrency",
        metavar="N",
        type=int,
        help=(
            "Most introspection calls in flight per worker (default "
            f"{_DEFAULT_INTROSPECTION.concurrency})."
        ),
    )


def _secret_file(flag: str, path: str, problems: list[str]) -> Secret | None:
    """The introspection client's secret in ``path``, or None with a problem."""
    text = _secret_text(
        flag, path, "give the file holding the introspection client's secret", problems
    )
    return None if text is None else Secret(text)


def load_introspection_file(
    path: str, problems: list[str]
) -> list[IntrospectionClient]:
    """The clients of an ``--introspection-config`` file; problems are appended.

    The file is ours, not Kubernetes': the ``AuthenticationConfiguration``
    keeps kube-apiserver's schema, so this side file maps issuer URLs to
    introspection clients::

        issuers:
          - url: https://example.okta.com/oauth2/default
            clientID: 0oa...
            clientSecretFile: /etc/kube-oidc-gate/introspection/secret
            # introspectionEndpoint: https://...  (default: from discovery)
    """
    flag = "--introspection-config"
    where = f"config: {flag} {json.dumps(path)}"
    unreadable = file_problem(flag, path, "give the introspection side file")
    if unreadable is not None:
        problems.append(unreadable)
        return []
    try:
        with open(path, encoding="utf-8") as f:
            doc = _decode(f.read(), path)
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{where}: cannot read: {type(err).__name__}")
        return []
    except ConfigError as err:
        problems.extend(err.problems)
        return []
    if not isinstance(doc, dict) or set(doc) != {"issuers"}:
        problems.append(f'{where}: expected a mapping with one field, "issuers"')
        return []
    entries = doc["issuers"]
    if not isinstance(entries, list) or not entries:
        problems.append(f'{where}: "issuers" must be a non-empty list')
        return []
    clients: list[IntrospectionClient] = []
    for i, entry in enumerate(entries):
        at = f"{where}: issuers[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: expected a mapping")
            continue
        unknown = sorted(set(entry) - set(_INTROSPECTION_FIELDS))
        if unknown:
            problems.append(
                f"{at}: unknown field {json.dumps(unknown[0])} (known: "
                f"{', '.join(_INTROSPECTION_FIELDS)})"
            )
        values: dict[str, str] = {}
        for name in _INTROSPECTION_FIELDS:
            value = entry.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                problems.append(f"{at}.{name}: must be a non-empty string")
                continue
            values[name] = value
        missing = [n for n in _INTROSPECTION_FIELDS[:3] if n not in values]
        if missing:
            problems.append(f"{at}: {json.dumps(missing[0])} is required")
            continue
        secret = _secret_file(
            f"{flag} issuers[{i}].clientSecretFile",
            values["clientSecretFile"],
            problems,
        )
        endpoint = values.get("introspectionEndpoint")
        if endpoint is not None:
            for problem in url_problems(endpoint, allow_query=True):
                problems.append(f"{at}.introspectionEndpoint: {problem}")
        if secret is not None:
            clients.append(
                IntrospectionClient(
                    issuer=values["url"],
                    client_id=values["clientID"],
                    client_secret=secret,
                    endpoint=endpoint,
                )
            )
    return clients


def _introspection_from_args(
    ns: argparse.Namespace,
    authenticators: Sequence[JWTAuthenticatorConfig],
    problems: list[str],
) -> IntrospectionConfig | None:
    client_id: str | None = getattr(ns, "oidc_introspection_client_id", None)
    secret_file: str | None = getattr(ns, "oidc_introspection_client_secret_file", None)
    side_file: str | None = getattr(ns, "introspection_config", None)
    tuning = [
        f for f, dest in _INTROSPECTION_TUNING if getattr(ns, dest, None) is not None
    ]
    legacy = client_id is not None or secret_file is not None
    if not legacy and side_file is None:
        if tuning:
            problems.append(
                f"config: {tuning[0]} requires --oidc-introspection-client-id or "
                "--introspection-config (an introspection client)"
            )
        return None
    if legacy and side_file is not None:
        problems.append(
            "config: --introspection-config and --oidc-introspection-client-id are "
            "mutually exclusive: put the --oidc-introspection-* settings in the file"
        )
        return None
    clients: list[IntrospectionClient] = []
    if legacy:
        if getattr(ns, "authentication_config", None) is not None:
            problems.append(
                "config: --oidc-introspection-client-id goes with the --oidc-* "
                "flags; with --authentication-config use --introspection-config FILE"
            )
            return None
        if client_id is None:
            problems.append(
                "config: --oidc-introspection-client-secret-file requires "
                "--oidc-introspection-client-id"
            )
        elif secret_file is None:
            problems.append(
                "config: --oidc-introspection-client-id requires "
                "--oidc-introspection-client-secret-file"
            )
        else:
            secret = _secret_file(
                "--oidc-introspection-client-secret-file", secret_file, problems
            )
            if secret is not None and authenticators:
                clients.append(
                    IntrospectionClient(
                        issuer=authenticators[0].issuer.url,
                        client_id=client_id,
                        client_secret=secret,
                    )
                )
    else:
        assert side_file is not None
        clients = load_introspection_file(side_file, problems)
        configured = {a.issuer.url for a in authenticators}
        seen: set[str] = set()
        for client in clients:
            if client.issuer in seen:
                problems.append(
                    f"config: --introspection-config: issuer {json.dumps(client.issuer)} "
                    "is listed twice"
                )
            seen.add(client.issuer)
            if authenticators and client.issuer not in configured:
                problems.append(
                    f"config: --introspection-config: issuer "
                    f"{json.dumps(client.issuer)} is not configured (configured: "
                    f"{', '.join(json.dumps(u) for u in sorted(configured))})"
                )
    d = _DEFAULT_INTROSPECTION
    ttl = _number(ns, "introspection_cache_ttl", d.cache_ttl, problems, allow_zero=True)
    staleness = _number(
        ns, "introspection_max_staleness", d.max_staleness, problems, allow_zero=True
    )
    timeout = _number(
        ns, "introspection_timeout", d.timeout, problems, allow_zero=False
    )
    concurrency = _count(ns, "introspection_concurrency", d.concurrency, 1, problems)
    policy = getattr(ns, "introspection_failure_policy", None) or d.failure_policy
    if policy not in INTROSPECTION_POLICIES:
        problems.append(
            f"config: --introspection-failure-policy: {policy!r} is not one of "
            f"{', '.join(INTROSPECTION_POLICIES)}"
        )
        policy = d.failure_policy
    if staleness < ttl and policy == "allow-cached":
        problems.append(
            "config: --introspection-max-staleness "
            f"({staleness:g}) must be at least --introspection-cache-ttl ({ttl:g})"
        )
    return replace(
        d,
        clients=tuple(clients),
        cache_ttl=ttl,
        failure_policy="allow-cached" if policy == "allow-cached" else "deny",
        max_staleness=staleness,
        timeout=timeout,
        concurrency=concurrency,
    )


def _secret_text(flag: str, path: str, remedy: str, problems: list[str]) -> str | None:
    """The text of the secret file ``flag`` names, or None with a problem
    (the file's state and ``remedy``; never its content).
    """
    unreadable = file_problem(flag, path, remedy)
    if unreadable is not None:
        problems.append(unreadable)
        return None
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        problems.append(f"config: {flag} {json.dumps(path)}: not readable UTF-8 text")
        return None
    if not text:
        problems.append(f"config: {flag} {json.dumps(path)}: the file is empty")
        return None
    return text


def _okta_secret_problem(flag: str, path: str, problems: list[str]) -> str | None:
    """An Okta credential file's text, or None with a problem."""
    return _secret_text(
        flag, path, "give the file holding the Okta credential (docs/okta.md)", problems
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OktaEventHookConfig:
    """``--okta-event-hook-*``: where Okta's event hook is served, and its secret."""

    host: str
    port: int
    #: The whole ``Authorization`` header value Okta sends (its *secret*).
    secret: Secret
    #: Where the revocations the hook makes are stored (issue 22, part 2).
    revocation_namespace: str


def add_okta_event_hook_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Okta event hook flags (both serving modes; docs/okta.md)."""
    group = parser.add_argument_group(
        "okta event hook",
        "A second TLS listener for Okta's event hooks: a user deactivated, "
        "suspended, locked or signed out in Okta is revoked on every replica.",
    )
    group.add_argument(
        "--okta-event-hook-address",
        metavar="HOST:PORT",
        help="Serve Okta's event hook at https://HOST:PORT/okta/events, with the "
        "serving certificate of the main listener (default: off).",
    )
    group.add_argument(
        "--okta-event-hook-secret-file",
        metavar="FILE",
        help="File holding the whole Authorization header value Okta sends (the "
        "hook's authentication secret); requests without it get 401. Required "
        "with --okta-event-hook-address; read at start-up.",
    )


def okta_event_hook_from_args(ns: argparse.Namespace) -> OktaEventHookConfig | None:
    """The event hook's settings, None when it is off; raises ``ConfigError``."""
    address: str | None = getattr(ns, "okta_event_hook_address", None)
    secret_file: str | None = getattr(ns, "okta_event_hook_secret_file", None)
    namespace: str | None = getattr(ns, "revocation_namespace", None)
    if address is None:
        if secret_file is not None:
            raise ConfigError(
                "config: --okta-event-hook-secret-file requires "
                "--okta-event-hook-address (where Okta's event hook is served)"
            )
        return None
    problems: list[str] = []
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        problems.append(
            f"config: --okta-event-hook-address must be HOST:PORT, got {address!r}"
        )
    secret: str | None = None
    if secret_file is None:
        problems.append(
            "config: --okta-event-hook-address requires "
            "--okta-event-hook-secret-file (the Authorization header value "
            "configured in Okta; docs/okta.md)"
        )
    else:
        secret = _secret_text(
            "--okta-event-hook-secret-file",
            secret_file,
            "give the file holding the event hook's authentication secret "
            "(docs/okta.md)",
            problems,
        )
    if not namespace:
        problems.append(
            "config: --okta-event-hook-address requires --revocation-namespace "
            "(where the revocations it makes are stored)"
        )
    if problems:
        raise ConfigError(problems)
    assert secret is not None
    assert namespace
    return OktaEventHookConfig(
        host=host.strip("[]") or "0.0.0.0",  # noqa: S104
        port=int(port_text),
        secret=Secret(secret),
        revocation_namespace=namespace,
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


def _flags_given(ns: argparse.Namespace) -> list[str]:
    return [flag for flag, dest in _OIDC_FLAGS if getattr(ns, dest, None) is not None]


def auth_config_from_args(
    ns: argparse.Namespace, *, allow_empty: bool = False
) -> AuthConfig | None:
    """Build the authentication configuration from parsed flags.

    Exactly one form must be given: the file or the ``--oidc-*`` flags. With
    ``allow_empty`` (``--dev`` supplies its own issuer), giving neither returns
    None; the tunables are still validated, and ``apply_tuning_args`` applies
    them to the configuration the caller builds. Every problem found is raised
    in one ``ConfigError``.
    """
    problems: list[str] = []
    keyset, cache, admission, leeway = _tuning_from_args(ns, problems)
    file: str | None = getattr(ns, "authentication_config", None)
    given = _flags_given(ns)

    if file is not None and given:
        others = f" (also given: {', '.join(given[1:])})" if len(given) > 1 else ""
        problems.insert(
            0,
            f"config: --authentication-config and {given[0]} are mutually "
            "exclusive: the file replaces every --oidc-* flag; move the flag's "
            f"setting into the file{others}",
        )
        raise ConfigError(problems)

    if file is None and not given:
        if problems:
            raise ConfigError(problems)
        if allow_empty:
            return None
        raise ConfigError(
            "config: no authentication configured: give --authentication-config "
            "FILE, or --oidc-issuer-url with --oidc-client-id"
        )

    config: AuthConfig | None = None
    if file is not None:
        try:
            config = load_authentication_config(file)
        except ConfigError as err:
            problems.extend(err.problems)
    else:
        authenticator = _legacy_authenticator(ns, problems)
        if authenticator is not None:
            config = AuthConfig(authenticators=(authenticator,), form="flags")

    authenticators = config.authenticators if config is not None else ()
    okta = _okta_from_args(ns, authenticators, problems)
    introspection = _introspection_from_args(ns, authenticators, problems)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return replace(
        config,
        keyset=keyset,
        cache=cache,
        admission=admission,
        leeway=leeway,
        okta=okta,
        introspection=introspection,
    )


def apply_tuning_args(config: AuthConfig, ns: argparse.Namespace) -> AuthConfig:
    """Return ``config`` with the tunables given on the command line.

    For callers that build the authenticators themselves (``--dev``).
    """
    problems: list[str] = []
    keyset, cache, admission, leeway = _tuning_from_args(ns, problems)
    if _okta_from_args(ns, (), problems) is not None:
        problems.append(
            "config: the --okta-* flags need the --oidc-* flags or "
            "--authentication-config, not --dev"
        )
    if _introspection_from_args(ns, (), problems) is not None:
        problems.append(
            "config: the introspection flags need the --oidc-* flags or "
            "--authentication-config, not --dev"
        )
    if problems:
        raise ConfigError(problems)
    return replace(
        config, keyset=keyset, cache=cache, admission=admission, leeway=leeway
    )


def _number(
    ns: argparse.Namespace,
    dest: str,
    default: float,
    problems: list[str],
    *,
    allow_zero: bool,
) -> float:
    value = getattr(ns, dest, None)
    if value is None:
        return default
    flag = "--" + dest.replace("_", "-")
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = math.isfinite(number) and (number >= 0 if allow_zero else number > 0)
    if not ok:
        bound = "0 or more" if allow_zero else "greater than 0"
        problems.append(
            f"config: {flag}: must be a finite number {bound} (got {value!r})"
        )
        return default
    return number


def _tuning_from_args(
    ns: argparse.Namespace, problems: list[str]
) -> tuple[KeySetSettings, CacheSettings, AdmissionSettings, float]:
    cooldown = _number(
        ns,
        "jwks_unknown_kid_cooldown",
        _DEFAULT_KEYSET.unknown_kid_cooldown,
        problems,
        allow_zero=False,
    )
    timeout = _number(
        ns,
        "jwks_fetch_timeout",
        _DEFAULT_KEYSET.fetch_timeout,
        problems,
        allow_zero=False,
    )
    success = _number(
        ns,
        "token_cache_success_ttl",
        _DEFAULT_CACHE.success_ttl,
        problems,
        allow_zero=True,
    )
    failure = _number(
        ns,
        "token_cache_failure_ttl",
        _DEFAULT_CACHE.failure_ttl,
        problems,
        allow_zero=True,
    )
    leeway = _number(ns, "clock_skew", _DEFAULT_LEEWAY, problems, allow_zero=True)
    size = _count(ns, "token_cache_size", _DEFAULT_CACHE.max_entries, 1, problems)
    per_turn = _count(
        ns, "new_tokens_per_turn", _DEFAULT_ADMISSION.per_turn, 0, problems
    )
    queue = _count(ns, "new_token_queue", _DEFAULT_ADMISSION.max_waiting, 1, problems)
    keyset = replace(
        _DEFAULT_KEYSET, unknown_kid_cooldown=cooldown, fetch_timeout=timeout
    )
    cache = replace(
        _DEFAULT_CACHE, max_entries=size, success_ttl=success, failure_ttl=failure
    )
    admission = replace(_DEFAULT_ADMISSION, per_turn=per_turn, max_waiting=queue)
    return keyset, cache, admission, leeway


def _count(
    ns: argparse.Namespace, dest: str, default: int, least: int, problems: list[str]
) -> int:
    value = getattr(ns, dest, None)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        flag = "--" + dest.replace("_", "-")
        problems.append(
            f"config: {flag}: must be an integer of {least} or more (got {value!r})"
        )
        return default
    return value


def _legacy_authenticator(
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
        given = ", ".join(_flags_given(ns))
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
    problem = _pem_problem(pem)
    if problem is not None:
        problems.append(
            f"config: --oidc-ca-file {json.dumps(path)}: not a valid PEM CA bundle: "
            f"{problem}"
        )
        return None
    return pem


# --------------------------------------------------------------------------
# Form 2: an AuthenticationConfiguration file
# --------------------------------------------------------------------------

_KIND = "AuthenticationConfiguration"

# The fields each object of the file may have (strict decoding).
_TOP_FIELDS = ("apiVersion", "kind", "jwt", "anonymous")
_ANONYMOUS_FIELDS = ("enabled", "conditions")
_CONDITION_FIELDS = ("path",)
_JWT_FIELDS = ("issuer", "claimValidationRules", "claimMappings", "userValidationRules")
_ISSUER_FIELDS = (
    "url",
    "discoveryURL",
    "certificateAuthority",
    "audiences",
    "audienceMatchPolicy",
    "egressSelectorType",
)
_CLAIM_RULE_FIELDS = ("claim", "requiredValue", "expression", "message")
_MAPPINGS_FIELDS = ("username", "groups", "uid", "extra")
_PREFIXED_FIELDS = ("claim", "prefix", "expression")
_CLAIM_OR_EXPR_FIELDS = ("claim", "expression")
_EXTRA_FIELDS = ("key", "valueExpression")
_USER_RULE_FIELDS = ("expression", "message")

_EGRESS_SELECTOR_TYPES = ("controlplane", "cluster")
_RESERVED_EXTRA_DOMAINS = ("kubernetes.io", "k8s.io")
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_HTTP_PATH = re.compile(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+")
_EMAIL_RULE = (
    "claims.email_verified must be used in claimMappings.username.expression or "
    "claimMappings.extra[*].valueExpression or claimValidationRules[*].expression "
    "when claims.email is used in claimMappings.username.expression"
)


def load_authentication_config(path: str) -> AuthConfig:
    """Read, decode strictly and validate an ``AuthenticationConfiguration`` file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(
            f"config: --authentication-config {json.dumps(path)}: cannot read: "
            f"{err.strerror or err}"
        ) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config: --authentication-config {json.dumps(path)}: not UTF-8 text"
        ) from err
    return parse_authentication_config(text, source=path)


def parse_authentication_config(text: str, *, source: str) -> AuthConfig:
    """Decode and validate the text of an ``AuthenticationConfiguration``.

    ``source`` (the file name) starts every problem. Raises ``ConfigError``
    listing every problem found, each at its field path.
    """
    document = _decode(text, source)
    reader = _FileReader(source)
    authenticators = reader.document(document)
    if reader.problems:
        raise ConfigError(reader.problems)
    return AuthConfig(authenticators=authenticators, form="file")


class _DuplicateKeyError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """A YAML safe loader that refuses a key given twice in one mapping.

    kube-apiserver's strict decoding refuses duplicated fields; silently
    keeping the last one could hide half of an edit.
    """


def _construct_strict_mapping(
    loader: _StrictLoader, node: yaml.MappingNode
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate field {json.dumps(str(key))}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"duplicate field {json.dumps(key)}")
        out[key] = value
    return out


def _decode(text: str, source: str) -> object:
    """JSON when the text starts with ``{`` (as kube's decoder decides), else YAML."""
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except _DuplicateKeyError as err:
            raise ConfigError(f"config: {source}: {err}") from err
        except json.JSONDecodeError:
            pass  # a YAML flow mapping also starts with "{"
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).replace('in "<unicode string>", ', "").split())
        hint = _quote_hint(text, err)
        raise ConfigError(
            f"config: {source}: not valid YAML or JSON: {detail}{hint}"
        ) from err


def decode_document(text: str, source: str) -> object:
    """A configuration file's text as kube's decoders read it (JSON or YAML,
    a duplicated field refused), for the other Kubernetes-style files the
    service loads (the audit ``Policy``); ``ConfigError`` names ``source``.
    """
    return _decode(text, source)


#: ``key: value:`` where the second colon is the one YAML refused: the value
#: (``okta:``) is a plain scalar that ends in, or holds, ``": "``.
_UNQUOTED_COLON = re.compile(
    r"([A-Za-z_][\w.-]*)\s*:\s+([^\s'\"{}\[\],#:][^{}\[\],#]*?)\s*$"
)


def _quote_hint(text: str, err: yaml.YAMLError) -> str:
    """A hint for the commonest YAML mistake in this file: ``prefix: okta:``.

    YAML ends a plain value at ``": "`` or at a ``:`` that ends the line, so
    an unquoted prefix with a trailing colon is read as a second key on the
    same line ("mapping values are not allowed here"; in a flow mapping,
    "expected ',' or '}'"). kube-apiserver refuses the same file; it is
    the value that needs quotes, which neither message says.
    """
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    lines = text.splitlines()
    if not 0 <= mark.line < len(lines):
        return ""
    line = lines[mark.line]
    if line[mark.column : mark.column + 1] != ":":
        return ""
    found = _UNQUOTED_COLON.search(line[: mark.column])
    if found is None:
        return ""
    after = line[mark.column :]
    if "{" in line[: mark.column] or "[" in line[: mark.column]:
        tail = re.split(r"[,}\]]", after, maxsplit=1)[0]
    else:
        tail = after.split(" #", 1)[0]
    value = found.group(2) + tail.rstrip()
    return (
        f' (quote a value that ends in ":" or holds ": ", as in '
        f"{found.group(1)}: {json.dumps(value)})"
    )


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: object) -> str:
    """A value in a problem, quoted the way kube's field errors quote it."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _FileReader:
    """Walks the decoded document once: checks types, fields and rules, and builds.

    Problems are collected, never raised, so the operator sees all of them.
    Builders return None when the part they build has a problem; the values
    are only returned to the caller when no problem was found.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    # -- problem wording (kube's field.Error kinds) -------------------------

    def _add(self, path: str, text: str) -> None:
        self.problems.append(f"config: {self.source}: {path}: {text}")

    def required(self, path: str, detail: str = "") -> None:
        self._add(path, f"Required value: {detail}" if detail else "Required value")

    def invalid(self, path: str, value: object, detail: str) -> None:
        self._add(path, f"Invalid value: {_show(value)}: {detail}")

    def duplicate(self, path: str, value: object) -> None:
        self._add(path, f"Duplicate value: {_show(value)}")

    def unsupported(self, path: str, value: object, supported: Sequence[str]) -> None:
        allowed = ", ".join(_show(s) for s in supported)
        self._add(
            path, f"Unsupported value: {_show(value)}: supported values: {allowed}"
        )

    def forbidden(self, path: str, detail: str) -> None:
        self._add(path, f"Forbidden: {detail}")

    # -- typed access --------------------------------------------------------

    def obj(self, value: object, path: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """A mapping with only known fields; null and absent read as empty."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._add(path, f"Invalid type: expected object, got {_type_name(value)}")
            return {}
        for key in value:
            if key not in fields:
                name = str(key)
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
                self._add(_child(path, name), f"Unknown field{hint}")
        return {k: v for k, v in value.items() if k in fields}

    def string(self, m: Mapping[str, Any], key: str, path: str) -> str | None:
        """A string field; None when absent or null (Go would read "")."""
        value = m.get(key)
        if value is None or isinstance(value, str):
            return value
        self._add(
            _child(path, key), f"Invalid type: expected string, got {_type_name(value)}"
        )
        return None

    def items(self, m: Mapping[str, Any], key: str, path: str) -> list[Any]:
        value = m.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self._add(
                _child(path, key),
                f"Invalid type: expected array, got {_type_name(value)}",
            )
            return []
        return value

    def compile(
        self,
        source: str,
        *,
        variables: tuple[str, ...],
        field_path: str,
        returns: Returns,
    ) -> CompiledExpression | None:
        """Compile with ``proxy.cel``, type included; its problems join ours."""
        try:
            return compile_expression(
                source, variables=variables, field_path=field_path, returns=returns
            )
        except ConfigError as err:
            for problem in err.problems:
                self.problems.append(
                    f"config: {self.source}: {problem.removeprefix('config: ')}"
                )
            return None

    # -- the document --------------------------------------------------------

    def document(self, document: object) -> tuple[JWTAuthenticatorConfig, ...]:
        if not isinstance(document, dict):
            got = "an empty document" if document is None else _type_name(document)
            self.problems.append(
                f"config: {self.source}: expected an {_KIND} object, got {got}"
            )
            return ()
        api_version, kind = document.get("apiVersion"), document.get("kind")
        if api_version is None:
            self.required("apiVersion", f"one of {', '.join(SUPPORTED_API_VERSIONS)}")
        elif api_version not in SUPPORTED_API_VERSIONS:
            self.unsupported("apiVersion", api_version, SUPPORTED_API_VERSIONS)
        if kind is None:
            self.required("kind", _KIND)
        elif kind != _KIND:
            self.unsupported("kind", kind, (_KIND,))
        if self.problems:
            return ()  # another kind of document: its fields would only add noise

        top = self.obj(document, "", _TOP_FIELDS)
        self.anonymous(top.get("anonymous"))
        entries = self.items(top, "jwt", "")
        if not entries:
            if "jwt" not in top or isinstance(top.get("jwt"), list | type(None)):
                self.required(
                    "jwt",
                    "at least one jwt authenticator is required: kube-oidc-gate "
                    "authenticates nothing else",
                )
            return ()
        if len(entries) > MAX_AUTHENTICATORS:
            self._add(
                "jwt",
                f"Too many: {len(entries)}: must have at most "
                f"{MAX_AUTHENTICATORS} items",
            )
            return ()

        built: list[JWTAuthenticatorConfig | None] = []
        seen_urls: set[str] = set()
        seen_discovery: set[str] = set()
        for i, entry in enumerate(entries):
            path = f"jwt[{i}]"
            built.append(self.jwt(entry, path))
            issuer = entry.get("issuer") if isinstance(entry, dict) else None
            if not isinstance(issuer, dict):
                continue
            url, discovery = issuer.get("url"), issuer.get("discoveryURL")
            if isinstance(url, str) and url:
                if url in seen_urls:
                    self.duplicate(f"{path}.issuer.url", url)
                seen_urls.add(url)
            if isinstance(discovery, str) and discovery:
                if discovery in seen_discovery:
                    self.duplicate(f"{path}.issuer.discoveryURL", discovery)
                seen_discovery.add(discovery)
        if self.problems:
            return ()
        out = tuple(a for a in built if a is not None)
        assert len(out) == len(built)
        return out

    def anonymous(self, raw: object) -> None:
        m = self.obj(raw, "anonymous", _ANONYMOUS_FIELDS)
        enabled = m.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            self._add(
                "anonymous.enabled",
                f"Invalid type: expected boolean, got {_type_name(enabled)}",
            )
        elif enabled:
            self.forbidden(
                "anonymous.enabled",
                "kube-oidc-gate never authenticates anonymous requests: a request "
                "without a valid token is refused; remove this or set it to false",
            )
        conditions = self.items(m, "conditions", "anonymous")
        for j, condition in enumerate(conditions):
            c = self.obj(condition, f"anonymous.conditions[{j}]", _CONDITION_FIELDS)
            self.string(c, "path", f"anonymous.conditions[{j}]")
        if conditions and not enabled:
            self.invalid(
                "anonymous.conditions",
                conditions,
                "enabled should be set to true when conditions are defined",
            )

    def jwt(self, raw: object, path: str) -> JWTAuthenticatorConfig | None:
        m = self.obj(raw, path, _JWT_FIELDS)
        start = len(self.problems)
        issuer = self.issuer(m.get("issuer"), f"{path}.issuer")
        rules = self.claim_rules(m, path)
        mappings = self.claim_mappings(
            m.get("claimMappings"), f"{path}.claimMappings", rules
        )
        user_rules = self.user_rules(m, path)
        if len(self.problems) > start or issuer is None or mappings is None:
            return None
        return JWTAuthenticatorConfig(
            issuer=issuer,
            claim_mappings=mappings,
            claim_validation_rules=rules,
            user_validation_rules=user_rules,
            source=path,
        )

    def issuer(self, raw: object, path: str) -> IssuerConfig | None:
        m = self.obj(raw, path, _ISSUER_FIELDS)
        start = len(self.problems)

        url = self.string(m, "url", path) or ""
        if not url:
            if "url" not in m or m.get("url") in (None, ""):
                self.required(f"{path}.url", "URL is required")
        else:
            for detail in url_problems(url):
                self.invalid(f"{path}.url", url, detail)

        discovery = self.string(m, "discoveryURL", path) or ""
        if discovery:
            if url and url.rstrip("/") == discovery.rstrip("/"):
                self.invalid(
                    f"{path}.discoveryURL",
                    discovery,
                    "discoveryURL must be different from URL",
                )
            for detail in url_problems(discovery):
                self.invalid(f"{path}.discoveryURL", discovery, detail)

        audiences: list[str] = []
        raw_audiences = self.items(m, "audiences", path)
        if not raw_audiences and not (
            "audiences" in m and not isinstance(m["audiences"], list | type(None))
        ):
            self.required(
                f"{path}.audiences", f"at least one {path}.audiences is required"
            )
        for j, audience in enumerate(raw_audiences):
            apath = f"{path}.audiences[{j}]"
            if audience is not None and not isinstance(audience, str):
                self._add(
                    apath, f"Invalid type: expected string, got {_type_name(audience)}"
                )
                continue
            text = audience or ""
            if not text:
                self.required(apath, "audience can't be empty")
            if text in audiences:
                self.duplicate(apath, text)
            audiences.append(text)

        policy = self.string(m, "audienceMatchPolicy", path) or ""
        if len(raw_audiences) > 1 and policy != "MatchAny":
            self.invalid(
                f"{path}.audienceMatchPolicy",
                policy,
                "audienceMatchPolicy must be MatchAny for multiple audiences",
            )
        elif len(raw_audiences) == 1 and policy not in ("", "MatchAny"):
            self.invalid(
                f"{path}.audienceMatchPolicy",
                policy,
                "audienceMatchPolicy must be empty or MatchAny for single audience",
            )

        ca = self.string(m, "certificateAuthority", path) or ""
        if ca:
            problem = _pem_problem(ca)
            if problem is not None:
                self.invalid(f"{path}.certificateAuthority", "<omitted>", problem)

        egress = self.string(m, "egressSelectorType", path) or ""
        if egress and egress not in _EGRESS_SELECTOR_TYPES:
            self.unsupported(
                f"{path}.egressSelectorType", egress, _EGRESS_SELECTOR_TYPES
            )

        if len(self.problems) > start:
            return None
        return IssuerConfig(
            url=url,
            discovery_url=discovery or None,
            certificate_authority=ca or None,
            audiences=tuple(audiences),
            audience_match_policy="MatchAny" if policy else "",
            signing_algs=FILE_SIGNING_ALGS,
        )

    def claim_rules(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[ClaimValidationRule, ...]:
        rules: list[ClaimValidationRule] = []
        seen_claims: set[str] = set()
        seen_expressions: set[str] = set()
        for j, raw in enumerate(self.items(m, "claimValidationRules", path)):
            rpath = f"{path}.claimValidationRules[{j}]"
            r = self.obj(raw, rpath, _CLAIM_RULE_FIELDS)
            claim = self.string(r, "claim", rpath) or ""
            required_value = self.string(r, "requiredValue", rpath) or ""
            expression = self.string(r, "expression", rpath) or ""
            message = self.string(r, "message", rpath) or ""
            if claim and expression:
                self.invalid(rpath, claim, "claim and expression can't both be set")
            elif not claim and not expression:
                self.required(rpath, "claim or expression is required")
            elif claim:
                if message:
                    self.invalid(
                        f"{rpath}.message",
                        message,
                        "message can't be set when claim is set",
                    )
                if claim in seen_claims:
                    self.duplicate(f"{rpath}.claim", claim)
                seen_claims.add(claim)
                rules.append(
                    ClaimValidationRule(claim=claim, required_value=required_value)
                )
            else:
                if required_value:
                    self.invalid(
                        f"{rpath}.requiredValue",
                        required_value,
                        "requiredValue can't be set when expression is set",
                    )
                if expression in seen_expressions:
                    self.duplicate(f"{rpath}.expression", expression)
                    continue
                seen_expressions.add(expression)
                compiled = self.compile(
                    expression,
                    variables=("claims",),
                    field_path=f"{rpath}.expression",
                    returns=Returns.BOOL,
                )
                if compiled is not None:
                    rules.append(
                        ClaimValidationRule(expression=compiled, message=message)
                    )
        return tuple(rules)

    def prefixed(
        self, raw: object, path: str, *, required: bool, returns: Returns
    ) -> PrefixedClaimOrExpression | None:
        m = self.obj(raw, path, _PREFIXED_FIELDS)
        claim = self.string(m, "claim", path) or ""
        prefix = self.string(m, "prefix", path)
        expression = self.string(m, "expression", path) or ""
        if claim and expression:
            self.invalid(path, "", "claim and expression can't both be set")
        elif expression:
            if prefix is not None:
                self.invalid(
                    f"{path}.prefix",
                    prefix,
                    "prefix can't be set when expression is set",
                )
            compiled = self.compile(
                expression,
                variables=("claims",),
                field_path=f"{path}.expression",
                returns=returns,
            )
            if compiled is not None and prefix is None:
                return PrefixedClaimOrExpression(expression=compiled)
        elif claim:
            if prefix is None:
                self.required(
                    f"{path}.prefix",
                    "prefix is required when claim is set. It can be set to an empty "
                    "string to disable prefixing",
                )
            else:
                return PrefixedClaimOrExpression(claim=claim, prefix=prefix)
        elif required:
            self.required(path, "claim or expression is required")
        return None

    def claim_mappings(
        self, raw: object, path: str, rules: Sequence[ClaimValidationRule]
    ) -> ClaimMappings | None:
        m = self.obj(raw, path, _MAPPINGS_FIELDS)
        start = len(self.problems)
        username = self.prefixed(
            m.get("username"),
            f"{path}.username",
            required=True,
            returns=Returns.STRING,
        )
        groups = self.prefixed(
            m.get("groups"), f"{path}.groups", required=False, returns=Returns.STRINGS
        )

        uid: ClaimOrExpression | None = None
        u = self.obj(m.get("uid"), f"{path}.uid", _CLAIM_OR_EXPR_FIELDS)
        uid_claim = self.string(u, "claim", f"{path}.uid") or ""
        uid_expression = self.string(u, "expression", f"{path}.uid") or ""
        if uid_claim and uid_expression:
            self.invalid(f"{path}.uid", "", "claim and expression can't both be set")
        elif uid_expression:
            compiled = self.compile(
                uid_expression,
                variables=("claims",),
                field_path=f"{path}.uid.expression",
                returns=Returns.STRING,
            )
            if compiled is not None:
                uid = ClaimOrExpression(expression=compiled)
        elif uid_claim:
            uid = ClaimOrExpression(claim=uid_claim)

        extra = self.extra_mappings(m, path)
        self.email_rule(path, username, extra, rules)

        if len(self.problems) > start or username is None:
            return None
        return ClaimMappings(username=username, groups=groups, uid=uid, extra=extra)

    def extra_mappings(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[ExtraMapping, ...]:
        out: list[ExtraMapping] = []
        seen: set[str] = set()
        for j, raw in enumerate(self.items(m, "extra", path)):
            epath = f"{path}.extra[{j}]"
            e = self.obj(raw, epath, _EXTRA_FIELDS)
            key = self.string(e, "key", epath) or ""
            self.extra_key(key, f"{epath}.key")
            if key in seen:
                self.duplicate(f"{epath}.key", key)
                continue
            seen.add(key)
            value_expression = self.string(e, "valueExpression", epath) or ""
            if not value_expression:
                self.required(f"{epath}.valueExpression", "valueExpression is required")
                continue
            compiled = self.compile(
                value_expression,
                variables=("claims",),
                field_path=f"{epath}.valueExpression",
                returns=Returns.STRINGS,
            )
            if compiled is not None:
                out.append(ExtraMapping(key=key, value_expression=compiled))
        return tuple(out)

    def extra_key(self, key: str, path: str) -> None:
        """A domain-prefixed path, lowercase, outside Kubernetes' own domains."""
        if not key:
            self.required(path)
            return
        domain, sep, rest = key.partition("/")
        if not sep or not domain or not rest:
            self.invalid(
                path, key, 'must be a domain-prefixed path (such as "acme.io/foo")'
            )
        else:
            if len(domain) > 253:
                self.invalid(path, domain, "must be no more than 253 characters")
            if not _DNS1123_SUBDOMAIN.fullmatch(domain):
                self.invalid(
                    path,
                    domain,
                    "a lowercase RFC 1123 subdomain must consist of lower case "
                    "alphanumeric characters, '-' or '.', and must start and end "
                    "with an alphanumeric character",
                )
            if not _HTTP_PATH.fullmatch(rest):
                self.invalid(path, rest, "Invalid path: must be an RFC 3986 path")
        if key != key.lower():
            self.invalid(path, key, "key must be lowercase")
        if any(
            domain == d or domain.endswith("." + d) for d in _RESERVED_EXTRA_DOMAINS
        ):
            self.invalid(
                path,
                key,
                "k8s.io, kubernetes.io and their subdomains are reserved for "
                "Kubernetes use",
            )

    def email_rule(
        self,
        path: str,
        username: PrefixedClaimOrExpression | None,
        extra: Sequence[ExtraMapping],
        rules: Sequence[ClaimValidationRule],
    ) -> None:
        """An e-mail is only an identity once verified (kube-apiserver's rule).

        With ``username.claim: email`` the claims mapping checks
        ``email_verified`` at run time; with an expression that cannot be
        done, so the file must show it checks ``email_verified`` itself.
        """
        if username is None or username.expression is None:
            return
        email, verified = ("claims", "email"), ("claims", "email_verified")
        if email not in username.expression.selected_fields:
            return
        others = [x.value_expression for x in extra] + [
            r.expression for r in rules if r.expression is not None
        ]
        if any(verified in e.selected_fields for e in [username.expression, *others]):
            return
        self.invalid(
            f"{path}.username.expression", username.expression.source, _EMAIL_RULE
        )

    def user_rules(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[UserValidationRule, ...]:
        rules: list[UserValidationRule] = []
        seen: set[str] = set()
        for j, raw in enumerate(self.items(m, "userValidationRules", path)):
            rpath = f"{path}.userValidationRules[{j}]"
            r = self.obj(raw, rpath, _USER_RULE_FIELDS)
            expression = self.string(r, "expression", rpath) or ""
            message = self.string(r, "message", rpath) or ""
            if not expression:
                self.required(f"{rpath}.expression", "expression is required")
                continue
            if expression in seen:
                self.duplicate(f"{rpath}.expression", expression)
                continue
            seen.add(expression)
            compiled = self.compile(
                expression,
                variables=("user",),
                field_path=f"{rpath}.expression",
                returns=Returns.BOOL,
            )
            if compiled is not None:
                rules.append(UserValidationRule(expression=compiled, message=message))
        return tuple(rules)


# --------------------------------------------------------------------------
# The revocation list (``--revocation-namespace``) and ``revoke``
# --------------------------------------------------------------------------

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def add_revocation_arguments(
    parser: argparse.ArgumentParser, *, kubeconfig: bool
) -> None:
    """``--revocation-namespace`` (both front ends, and ``check-token``, which
    reads the list once); ``kubeconfig`` also adds
    ``--kubeconfig``/``--context`` (the webhook's: the proxy has its own)."""
    g = parser.add_argument_group("revocation list")
    g.add_argument(
        "--revocation-namespace",
        default=None,
        metavar="NS",
        help="Watch the Revocation objects (CRD revocations.kube-oidc-gate.io, "
        "deploy/components/revocation) in this namespace and refuse the tokens "
        "they name as revoked, within seconds, on every replica. Needs "
        "get/list/watch (and delete, for expired objects) there. Default: off.",
    )
    if kubeconfig:
        g.add_argument(
            "--kubeconfig",
            help="kubeconfig with the gate's credential for reading the revocation "
            "list (default: the in-cluster service account). Only with "
            "--revocation-namespace.",
        )
        g.add_argument(
            "--context",
            help="Context in --kubeconfig (default: its current-context).",
        )


def revocation_settings_from_args(ns: argparse.Namespace) -> RevocationSettings | None:
    """The revocation watch of a serving mode, or None when it is off."""
    namespace: str | None = getattr(ns, "revocation_namespace", None)
    if namespace is None:
        if ns.command in ("webhook", "check-token") and (ns.kubeconfig or ns.context):
            raise ConfigError(
                f"config: --kubeconfig and --context of {ns.command} are for the "
                "revocation list: give --revocation-namespace too, or drop them"
            )
        return None
    if not _NAMESPACE.match(namespace):
        raise ConfigError(
            f"config: --revocation-namespace must be a namespace name (lowercase "
            f"letters, digits, '-'), got {namespace[:64]!r}"
        )
    return RevocationSettings(
        namespace=namespace, kubeconfig=ns.kubeconfig, context=ns.context
    )


def add_revoke_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kube-oidc-gate revoke``."""
    parser.add_argument(
        "--sub", required=True, help="The subject (the tokens' sub claim) to revoke."
    )
    parser.add_argument(
        "--issuer",
        default=None,
        help="Only tokens of this issuer URL (default: of any issuer).",
    )
    parser.add_argument(
        "--before",
        default="now",
        metavar="TIME|now",
        help="Refuse tokens issued before this RFC 3339 time (default now: every "
        "token issued so far; tokens issued later, after a new login, pass).",
    )
    parser.add_argument(
        "--reason", default="", help="Why (shown in kubectl get and the logs)."
    )
    parser.add_argument(
        "--namespace",
        default=DEFAULT_REVOCATION_NAMESPACE,
        help="Namespace the gate watches (its --revocation-namespace; default "
        f"{DEFAULT_REVOCATION_NAMESPACE}).",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig of the operator (default: the in-cluster service account).",
    )
    parser.add_argument(
        "--context", help="Context in --kubeconfig (default: its current-context)."
    )
    parser.add_argument(
        "--expires-in",
        default=f"{int(DEFAULT_REVOCATION_LIFETIME // 3600)}h",
        metavar="DURATION",
        help="After --before plus this long (e.g. 90m, 24h, 7d) the gate deletes "
        "the object: the longest token lifetime you accept (default 24h).",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="Object name (default: generated, revoked-xxxxx); with a name, a "
        "second run with the same name succeeds without creating another.",
    )


def parse_duration(value: str, flag: str) -> float:
    """Seconds of ``90s``, ``15m``, ``24h``, ``7d`` (or a bare number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"config: {flag} must be a positive duration such as 90m, 24h or 7d, "
            f"got {value[:32]!r}"
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit
