"""The command line's options, one group per module (kube-oidc-proxy's ``options/``).

Each module holds one group's flags (``add_*_arguments``) and their validation
(``*_from_args``, every problem listed at once); the frozen values they build
and every default live in ``values``. ``proxy.cli`` assembles the groups per
subcommand; ``proxy.config`` re-exports the names other modules import.

- ``values``: the frozen dataclasses and the defaults;
- ``common``: file, URL and PEM checks and number readers several groups share;
- ``decode``: Kubernetes-style files decoded as kube's strict decoder does;
- ``auth``: the authentication flags assembled (the two forms, the tunables,
  Okta groups, introspection) into one ``AuthConfig``;
- ``legacy``: the ``--oidc-*`` flags and kube-apiserver's defaulting of them;
- ``authfile``: the ``AuthenticationConfiguration`` file and its validation;
- ``tuning``, ``okta``, ``introspection``: the engine's bounds, groups from
  Okta's API, token introspection;
- ``eventhook``, ``revocation``: Okta's event hook listener, the revocation
  list and ``revoke``;
- ``logs``, ``serving``: logging, and the listeners, TLS and workers;
- ``proxy``, ``audit``: proxy mode's upstream and impersonation policy, and
  kube-apiserver's ``--audit-*`` flags.

Nothing is imported here, so reading one group does not load the others
(``proxy``, ``audit`` and ``serving`` import the servers, which the early
``--workers`` pre-parse in ``proxy.cli`` must not load).
"""

__all__: list[str] = []
