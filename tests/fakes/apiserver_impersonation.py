"""The fake API server's impersonation filter: kube-apiserver's, over an RBAC rule table.

kube-apiserver (``k8s.io/apiserver``'s ``WithImpersonation``) turns the
``Impersonate-*`` headers into a list of requests, asks the authorizer whether
the *requesting* account may ``impersonate`` each one, and only then builds
the user the request runs as. What the proxy relies on, and this fake does:

- ``Impersonate-User`` is a ``users`` request (API group ``""``), or a
  ``serviceaccounts`` request in the account's namespace when the name is a
  valid ``system:serviceaccount:<namespace>:<name>``; each ``Impersonate-Group``
  a ``groups`` request; each value of ``Impersonate-Extra-<key>`` a
  ``userextras/<key>`` request (API group ``authentication.k8s.io``, the key
  lower-cased, then percent-decoded); ``Impersonate-Uid`` a ``uids`` request;
- checked in that order, the first one RBAC does not allow is a 403 whose
  message is kube-apiserver's (``users "x" is forbidden: User "..." cannot
  impersonate resource "users" in API group "" at the cluster scope``);
- a group, extra or uid without a user is refused (kube-apiserver answers that
  with an internal error; 400 here), and so are two users or two uids
  (kube-apiserver reads the first; refused here, so a proxy that sent two
  cannot pass by luck);
- the user gets ``system:serviceaccounts`` and ``system:serviceaccounts:<ns>``
  when a service account is impersonated without groups, and
  ``system:authenticated`` unless a group says ``system:(un)authenticated``
  (``system:unauthenticated`` for ``system:anonymous``).

The rule table is RBAC's: ``Rule``s as a ClusterRole writes them. The default
(``DEPLOY_RULES``) is read from ``deploy/``: every ClusterRole bound there to the
gate's ServiceAccount, so a key the manifests grant is allowed and one they do
not is refused; ``PROXY_OVERLAY_RULES`` is the proxy overlay alone (a proxy
without the client-impersonation component).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDictProxy

__all__ = [
    "DEPLOY_RULES",
    "GATE_SERVICE_ACCOUNT",
    "PROXY_OVERLAY_RULES",
    "Refused",
    "Rule",
    "deploy_rules",
    "impersonated_user",
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: (namespace, name) of the ServiceAccount ``deploy/`` binds its roles to.
GATE_SERVICE_ACCOUNT = ("kube-oidc-gate", "kube-oidc-gate")

_SA_PREFIX = "system:serviceaccount:"
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_AUTHN_GROUP = "authentication.k8s.io"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One RBAC PolicyRule (``resourceNames`` empty: any name)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    def allows(self, *, verb: str, api_group: str, resource: str, name: str) -> bool:
        """RBAC's ``RuleAllows`` for a resource request (no namespace rules here)."""
        base, _, sub = resource.partition("/")
        return (
            ("*" in self.verbs or verb in self.verbs)
            and ("*" in self.api_groups or api_group in self.api_groups)
            and any(
                r in ("*", resource) or (bool(sub) and r == f"*/{sub}")
                for r in self.resources
            )
            and (not self.resource_names or name in self.resource_names)
            and bool(base)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """What kube-apiserver answers instead of serving the request."""

    code: int
    reason: str
    message: str
    details: dict[str, str] | None = None


def _manifests(paths: Iterable[Path]) -> list[Any]:
    docs: list[Any] = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def deploy_rules(*relative: str) -> tuple[Rule, ...]:
    """The rules ``deploy/`` grants the gate's ServiceAccount through
    ClusterRoleBindings, from the named files (default: every YAML file)."""
    paths = [DEPLOY / r for r in relative] or sorted(DEPLOY.rglob("*.yaml"))
    docs = [d for d in _manifests(paths) if isinstance(d, dict)]
    roles = {
        d["metadata"]["name"]: d.get("rules") or []
        for d in docs
        if d.get("kind") == "ClusterRole"
    }
    namespace, name = GATE_SERVICE_ACCOUNT
    rules: list[Rule] = []
    for binding in docs:
        if binding.get("kind") != "ClusterRoleBinding":
            continue
        if not any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == name
            and s.get("namespace") == namespace
            for s in binding.get("subjects") or []
        ):
            continue
        rules.extend(
            Rule(
                api_groups=tuple(r.get("apiGroups") or ()),
                resources=tuple(r.get("resources") or ()),
                verbs=tuple(r.get("verbs") or ()),
                resource_names=tuple(r.get("resourceNames") or ()),
            )
            for r in roles.get(binding["roleRef"]["name"], [])
        )
    return tuple(rules)


#: Everything ``deploy/`` can grant the gate (the proxy overlay and the
#: client-impersonation component): the fake's default.
DEPLOY_RULES = deploy_rules()
#: The proxy overlay alone: what a proxy without ``--allow-client-impersonation``
#: is granted.
PROXY_OVERLAY_RULES = deploy_rules("overlays/proxy/rbac.yaml")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Request:
    """One thing to impersonate: kube-apiserver's ``ObjectReference``."""

    resource: str
    api_group: str
    name: str
    namespace: str = ""

    def forbidden(self, requester: str) -> Refused:
        # responsewriters.Forbidden + apierrors.NewForbidden.
        base = self.resource.split("/", 1)[0]
        qualified = f"{base}.{self.api_group}" if self.api_group else base
        where = (
            f'in the namespace "{self.namespace}"'
            if self.namespace
            else "at the cluster scope"
        )
        message = (
            f'{qualified} "{self.name}" is forbidden: User "{requester}" cannot '
            f'impersonate resource "{self.resource}" in API group '
            f'"{self.api_group}" {where}'
        )
        return Refused(
            code=403,
            reason="Forbidden",
            message=message,
            details={"name": self.name, "group": self.api_group, "kind": base},
        )


def _service_account(username: str) -> tuple[str, str] | None:
    """serviceaccount.SplitUsername: (namespace, name) when valid, else None."""
    if not username.startswith(_SA_PREFIX):
        return None
    parts = username[len(_SA_PREFIX) :].split(":")
    if len(parts) != 2:
        return None
    namespace, name = parts
    if len(namespace) > 63 or not _LABEL.fullmatch(namespace):
        return None
    if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        return None
    return namespace, name


def _bad_request(message: str) -> Refused:
    return Refused(code=400, reason="BadRequest", message=message)


def impersonated_user(
    headers: CIMultiDictProxy[str] | Any, requester: str, rules: Iterable[Rule]
) -> dict[str, Any] | Refused | None:
    """The user a request runs as, a refusal, or None without ``Impersonate-*``."""
    users = headers.getall("Impersonate-User", [])
    uids = headers.getall("Impersonate-Uid", [])
    groups = list(headers.getall("Impersonate-Group", []))
    extras = [
        (urllib.parse.unquote(n[len("impersonate-extra-") :].lower()), v)
        for n, v in headers.items()
        if n.lower().startswith("impersonate-extra-")
    ]
    if len(users) > 1:
        return _bad_request(f"two users to impersonate: {users}")
    if len(uids) > 1:
        return _bad_request(f"two uids to impersonate: {uids}")
    username = users[0] if users else ""
    uid = uids[0] if uids else ""
    if not username:
        if groups or extras or uid:
            return _bad_request(
                f"requested groups {groups}, extras {extras}, uid {uid!r} "
                "without impersonating a user"
            )
        return None
    requests: list[_Request] = []
    account = _service_account(username)
    if account is not None:
        requests.append(
            _Request(
                resource="serviceaccounts",
                api_group="",
                namespace=account[0],
                name=account[1],
            )
        )
    else:
        requests.append(_Request(resource="users", api_group="", name=username))
    requests.extend(_Request(resource="groups", api_group="", name=g) for g in groups)
    requests.extend(
        _Request(resource=f"userextras/{k}", api_group=_AUTHN_GROUP, name=v)
        for k, v in extras
    )
    if uid:
        requests.append(_Request(resource="uids", api_group=_AUTHN_GROUP, name=uid))
    rules = tuple(rules)
    for request in requests:
        if not any(
            r.allows(
                verb="impersonate",
                api_group=request.api_group,
                resource=request.resource,
                name=request.name,
            )
            for r in rules
        ):
            return request.forbidden(requester)
    if account is not None and not groups:
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{account[0]}"]
    if username == "system:anonymous":
        if "system:unauthenticated" not in groups:
            groups.append("system:unauthenticated")
    elif (
        "system:authenticated" not in groups and "system:unauthenticated" not in groups
    ):
        groups.append("system:authenticated")
    user: dict[str, Any] = {"username": username, "groups": groups}
    if uid:
        user["uid"] = uid
    if extras:
        extra: dict[str, list[str]] = {}
        for key, value in extras:
            extra.setdefault(key, []).append(value)
        user["extra"] = extra
    return user
