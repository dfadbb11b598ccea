"""Authentication: the groups of flags assembled, and the one value they make.

The authentication part has the two forms kube-apiserver accepts, with the
same meaning: the legacy ``--oidc-*`` flags (``proxy.options.legacy``) and an
``AuthenticationConfiguration`` file (``proxy.options.authfile``). Both are
turned into the same ``JWTAuthenticatorConfig`` values, so the engine has a
single code path; the engine's tunables, Okta groups and introspection apply
to either (``tuning``, ``okta``, ``introspection``). Every problem of every
group is raised at once, in one ``ConfigError``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from proxy.errors import ConfigError
from proxy.options.authfile import load_authentication_config
from proxy.options.introspection import (
    add_introspection_arguments,
    introspection_from_args,
)
from proxy.options.legacy import (
    add_legacy_arguments,
    flags_given,
    legacy_authenticator,
)
from proxy.options.okta import add_okta_arguments, okta_from_args
from proxy.options.tuning import add_tuning_arguments, tuning_from_args
from proxy.options.values import AuthConfig

__all__ = ["add_auth_arguments", "apply_tuning_args", "auth_config_from_args"]


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
    add_legacy_arguments(group)
    add_tuning_arguments(parser)
    add_okta_arguments(parser)
    add_introspection_arguments(parser)


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
    keyset, cache, admission, leeway = tuning_from_args(ns, problems)
    file: str | None = getattr(ns, "authentication_config", None)
    given = flags_given(ns)

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
        authenticator = legacy_authenticator(ns, problems)
        if authenticator is not None:
            config = AuthConfig(authenticators=(authenticator,), form="flags")

    authenticators = config.authenticators if config is not None else ()
    okta = okta_from_args(ns, authenticators, problems)
    introspection = introspection_from_args(ns, authenticators, problems)
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
    keyset, cache, admission, leeway = tuning_from_args(ns, problems)
    if okta_from_args(ns, (), problems) is not None:
        problems.append(
            "config: the --okta-* flags need the --oidc-* flags or "
            "--authentication-config, not --dev"
        )
    if introspection_from_args(ns, (), problems) is not None:
        problems.append(
            "config: the introspection flags need the --oidc-* flags or "
            "--authentication-config, not --dev"
        )
    if problems:
        raise ConfigError(problems)
    return replace(
        config, keyset=keyset, cache=cache, admission=admission, leeway=leeway
    )
