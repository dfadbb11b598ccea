"""The configuration, as other modules import it: a re-export of ``proxy.options``.

The values, their defaults and the option groups (flags and validation) live
in ``proxy.options``, one group per module; this module keeps the names the
engine, the handlers and the tests have always imported from here, so they
need not know which group a name belongs to.
"""

from __future__ import annotations

from proxy.options.auth import (
    add_auth_arguments,
    apply_tuning_args,
    auth_config_from_args,
)
from proxy.options.authfile import (
    load_authentication_config,
    parse_authentication_config,
)
from proxy.options.common import (
    file_problem,
    is_loopback_host,
    url_problems,
)
from proxy.options.decode import (
    decode_document,
)
from proxy.options.eventhook import (
    add_okta_event_hook_arguments,
    okta_event_hook_from_args,
)
from proxy.options.okta import (
    ClientKey,
    parse_client_key,
)
from proxy.options.revocation import (
    add_revocation_arguments,
    add_revoke_arguments,
    parse_duration,
    revocation_settings_from_args,
)
from proxy.options.values import (
    ALLOWED_SIGNING_ALGS,
    DEFAULT_PROBE_ADDRESS,
    DEFAULT_PROXY_PORT,
    DEFAULT_REVOCATION_LIFETIME,
    DEFAULT_REVOCATION_NAMESPACE,
    DEFAULT_SIGNING_ALGS,
    DEFAULT_WEBHOOK_PORT,
    FILE_SIGNING_ALGS,
    INTROSPECTION_POLICIES,
    MAX_AUTHENTICATORS,
    OKTA_API_SCOPES,
    SUPPORTED_API_VERSIONS,
    AdmissionSettings,
    AuthConfig,
    CacheSettings,
    ClaimMappings,
    ClaimOrExpression,
    ClaimValidationRule,
    ExtraMapping,
    IntrospectionClient,
    IntrospectionConfig,
    IssuerConfig,
    JWTAuthenticatorConfig,
    KeySetSettings,
    OktaEventHookConfig,
    OktaGroupsConfig,
    PrefixedClaimOrExpression,
    RevocationSettings,
    Secret,
    UserValidationRule,
)

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
    "ClientKey",
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
