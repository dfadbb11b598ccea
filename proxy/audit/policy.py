"""The audit ``Policy`` (``audit.k8s.io/v1``): loaded once, checked whole,
evaluated first-match exactly as kube-apiserver's policy checker does
(``k8s.io/apiserver/pkg/audit/policy/checker.go``).

A request gets the level and omitted stages of the **first** rule that
matches, else level ``None`` with the policy's ``omitStages``. Every field a
rule sets must match (an intersection):

- ``users``: the authenticated user's name; ``userGroups``: any of its groups.
  An unauthenticated request (a refused token) has no user, so a rule with
  either never matches it;
- ``verbs``: the Kubernetes verb (``proxy.audit.requestinfo``);
- ``namespaces`` or ``resources`` make the rule a resource rule (a
  non-resource request never matches it): ``""`` in ``namespaces`` matches
  cluster-scoped resources; each ``resources`` entry matches its ``group``
  exactly and then ``*``, ``resource``, ``resource/subresource``,
  ``*/subresource`` or ``resource/*``, limited to ``resourceNames`` when
  given. Otherwise ``nonResourceURLs`` makes it a non-resource rule: ``*``,
  the exact path, or a prefix ending in ``*``;
- a rule with neither matches every request.

A rule's ``omitStages`` is the union of its own and the policy's (kube's
``NewChecker``); ``omitManagedFields`` of a rule, when set, overrides the
policy's.

Loading refuses, each with its field path, what kube-apiserver's validation
refuses (a missing or unknown level, a stage that does not exist, a non-
resource URL that does not start with ``/`` or has ``*`` before its end, a
rule with both resources/namespaces and non-resource URLs, a group that is
not a DNS subdomain, ``resourceNames`` without ``resources``, no rules at
all, an ``apiVersion``/``kind`` other than ``audit.k8s.io/v1``/``Policy``).

Deliberate differences: unknown fields are refused rather than ignored (a
misspelt ``namespace:`` would silently make a rule match every namespace);
only ``audit.k8s.io/v1`` is read (kube-apiserver dropped ``v1beta1`` and
``v1alpha1`` in 1.24).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.audit.requestinfo import RequestInfo
from proxy.config import decode_document, file_problem
from proxy.errors import AuditPolicyError, ConfigError

__all__ = [
    "LEVELS",
    "STAGES",
    "Attributes",
    "GroupResources",
    "Policy",
    "PolicyRule",
    "RequestAuditConfig",
    "attributes_of",
    "evaluate",
    "load_policy",
    "parse_policy",
]

#: The levels, from least to most recorded.
LEVELS: Final = ("None", "Metadata", "Request", "RequestResponse")
#: The stages, in the order a request passes them (``Panic`` instead of the end).
STAGES: Final = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")

_API_VERSION: Final = "audit.k8s.io/v1"
_POLICY_FIELDS: Final = frozenset(
    {"apiVersion", "kind", "metadata", "rules", "omitStages", "omitManagedFields"}
)
_RULE_FIELDS: Final = frozenset(
    {
        "level",
        "users",
        "userGroups",
        "verbs",
        "resources",
        "namespaces",
        "nonResourceURLs",
        "omitStages",
        "omitManagedFields",
    }
)
_GROUP_FIELDS: Final = frozenset({"group", "resources", "resourceNames"})
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupResources:
    """Resources of one API group a rule matches (``""``: the core group)."""

    group: str = ""
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    """One rule; empty tuples mean "any" (module docstring)."""

    level: str
    users: tuple[str, ...] = ()
    user_groups: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    resources: tuple[GroupResources, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    #: Already the union with the policy's ``omitStages``.
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A loaded, valid audit policy."""

    rules: tuple[PolicyRule, ...]
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Attributes:
    """What a rule is matched against (kube's ``authorizer.Attributes``)."""

    #: The authenticated user's name; ``None`` for an unauthenticated request.
    user: str | None
    groups: tuple[str, ...] = ()
    verb: str
    resource_request: bool
    path: str
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestAuditConfig:
    """What the policy decided for one request."""

    level: str
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool = False


def attributes_of(
    info: RequestInfo, user: str | None, groups: Sequence[str] = ()
) -> Attributes:
    """The attributes of a parsed request made by ``user`` (``None``: nobody)."""
    return Attributes(
        user=user,
        groups=tuple(groups) if user is not None else (),
        verb=info.verb,
        resource_request=info.is_resource_request,
        path=info.path,
        namespace=info.namespace,
        api_group=info.api_group,
        resource=info.resource,
        subresource=info.subresource,
        name=info.name,
    )


# --------------------------------------------------------------------------
# Evaluation (checker.go)


def evaluate(policy: Policy, attrs: Attributes) -> RequestAuditConfig:
    """The first matching rule's decision, else ``None`` (module docstring)."""
    for rule in policy.rules:
        if _rule_matches(rule, attrs):
            omit = rule.omit_managed_fields
            return RequestAuditConfig(
                level=rule.level,
                omit_stages=rule.omit_stages,
                omit_managed_fields=policy.omit_managed_fields
                if omit is None
                else omit,
            )
    return RequestAuditConfig(
        level="None",
        omit_stages=policy.omit_stages,
        omit_managed_fields=policy.omit_managed_fields,
    )


def _rule_matches(rule: PolicyRule, attrs: Attributes) -> bool:
    if rule.users and (attrs.user is None or attrs.user not in rule.users):
        return False
    if rule.user_groups and (
        attrs.user is None or not any(g in rule.user_groups for g in attrs.groups)
    ):
        return False
    if rule.verbs and attrs.verb not in rule.verbs:
        return False
    if rule.namespaces or rule.resources:
        return _matches_resource(rule, attrs)
    if rule.non_resource_urls:
        return _matches_non_resource(rule, attrs)
    return True


def _matches_non_resource(rule: PolicyRule, attrs: Attributes) -> bool:
    if attrs.resource_request:
        return False
    return any(_path_matches(attrs.path, spec) for spec in rule.non_resource_urls)


def _path_matches(path: str, spec: str) -> bool:
    if spec in ("*", path):
        return True
    return spec.endswith("*") and path.startswith(spec.rstrip("*"))


def _matches_resource(rule: PolicyRule, attrs: Attributes) -> bool:
    if not attrs.resource_request:
        return False
    if rule.namespaces and attrs.namespace not in rule.namespaces:
        return False
    if not rule.resources:
        return True
    resource, subresource = attrs.resource, attrs.subresource
    combined = f"{resource}/{subresource}" if subresource else resource
    for gr in rule.resources:
        if gr.group != attrs.api_group:
            continue
        if not gr.resources:
            return True
        if gr.resource_names and attrs.name not in gr.resource_names:
            continue
        for res in gr.resources:
            if res in (combined, "*"):
                return True
            if subresource and res.startswith("*/") and res[2:] == subresource:
                return True
            if res.endswith("/*") and res[:-2] == resource:
                return True
    return False


# --------------------------------------------------------------------------
# Loading and validation (validation.go, policy/reader.go)


class _Reader:
    """Collects every problem of one document, each with its field path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"audit: {self.source}: {path}: {message}")

    def strings(self, value: object, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(path, "must be a list of strings")
            return ()
        return tuple(value)

    def unknown(
        self, value: dict[str, object], allowed: frozenset[str], path: str
    ) -> None:
        for key in value:
            if key not in allowed:
                self.problem(
                    f"{path}{key}",
                    "unknown field (allowed: " + ", ".join(sorted(allowed)) + ")",
                )

    def stages(self, value: object, path: str) -> frozenset[str]:
        out: set[str] = set()
        for i, stage in enumerate(self.strings(value, path)):
            if stage not in STAGES:
                self.problem(
                    f"{path}[{i}]",
                    f"unsupported stage {json.dumps(stage)}; allowed: "
                    + ", ".join(STAGES),
                )
            out.add(stage)
        return frozenset(out)

    def flag(self, value: object, path: str) -> bool | None:
        if value is None:
            return None
        if not isinstance(value, bool):
            self.problem(path, "must be true or false")
            return None
        return value

    def group_resources(self, value: object, path: str) -> tuple[GroupResources, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(path, "must be a list")
            return ()
        out: list[GroupResources] = []
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            if not isinstance(item, dict):
                self.problem(where, "must be a mapping")
                continue
            self.unknown(item, _GROUP_FIELDS, where + ".")
            group = item.get("group") or ""
            if not isinstance(group, str):
                self.problem(where + ".group", "must be a string")
                group = ""
            elif group and not (len(group) <= 253 and _DNS_SUBDOMAIN.fullmatch(group)):
                self.problem(
                    where + ".group",
                    f"{json.dumps(group)} is not a valid DNS subdomain (an API "
                    'group name such as "apps", without a version)',
                )
            resources = self.strings(item.get("resources"), where + ".resources")
            names = self.strings(item.get("resourceNames"), where + ".resourceNames")
            if names and not resources:
                self.problem(
                    where + ".resourceNames",
                    "using resourceNames requires at least one resource",
                )
            out.append(
                GroupResources(group=group, resources=resources, resource_names=names)
            )
        return tuple(out)

    def rule(
        self, value: object, path: str, policy_omit: frozenset[str]
    ) -> PolicyRule | None:
        if not isinstance(value, dict):
            self.problem(path, "must be a mapping")
            return None
        self.unknown(value, _RULE_FIELDS, path + ".")
        level = value.get("level")
        if level is None or level == "":
            self.problem(path + ".level", "required; one of " + ", ".join(LEVELS))
        elif level not in LEVELS:
            self.problem(
                path + ".level",
                f"unsupported level {json.dumps(level)}; one of " + ", ".join(LEVELS),
            )
        urls = self.strings(value.get("nonResourceURLs"), path + ".nonResourceURLs")
        for i, url in enumerate(urls):
            if url == "*":
                continue
            if not url.startswith("/"):
                self.problem(
                    f"{path}.nonResourceURLs[{i}]",
                    f"{json.dumps(url)}: non-resource URL rules must begin with '/'",
                )
            if url and "*" in url[:-1]:
                self.problem(
                    f"{path}.nonResourceURLs[{i}]",
                    f"{json.dumps(url)}: a '*' may only be the final character",
                )
        resources = self.group_resources(value.get("resources"), path + ".resources")
        namespaces = self.strings(value.get("namespaces"), path + ".namespaces")
        if urls and (resources or namespaces):
            self.problem(
                path,
                "rules cannot apply to both regular resources (resources, "
                "namespaces) and non-resource URLs",
            )
        return PolicyRule(
            level=level if isinstance(level, str) else "",
            users=self.strings(value.get("users"), path + ".users"),
            user_groups=self.strings(value.get("userGroups"), path + ".userGroups"),
            verbs=self.strings(value.get("verbs"), path + ".verbs"),
            resources=resources,
            namespaces=namespaces,
            non_resource_urls=urls,
            omit_stages=self.stages(value.get("omitStages"), path + ".omitStages")
            | policy_omit,
            omit_managed_fields=self.flag(
                value.get("omitManagedFields"), path + ".omitManagedFields"
            ),
        )


def parse_policy(document: object, source: str) -> Policy:
    """A ``Policy`` from a decoded document; ``AuditPolicyError`` lists every
    problem (field path, what is wrong, what is allowed).
    """
    reader = _Reader(source)
    if not isinstance(document, dict):
        raise AuditPolicyError(f"audit: {source}: not a Policy object")
    if document.get("apiVersion") != _API_VERSION:
        reader.problem(
            "apiVersion",
            f"expected {json.dumps(_API_VERSION)}, got "
            f"{json.dumps(document.get('apiVersion'))}",
        )
    if document.get("kind") != "Policy":
        reader.problem(
            "kind", f'expected "Policy", got {json.dumps(document.get("kind"))}'
        )
    reader.unknown(document, _POLICY_FIELDS, "")
    omit = reader.stages(document.get("omitStages"), "omitStages")
    managed = reader.flag(document.get("omitManagedFields"), "omitManagedFields")
    raw_rules = document.get("rules")
    rules: list[PolicyRule] = []
    if not isinstance(raw_rules, list) or not raw_rules:
        reader.problem(
            "rules",
            "a policy needs at least one rule (kube-apiserver refuses a policy "
            "with 0 rules; end with `- level: Metadata` to record everything "
            "else)",
        )
    else:
        for i, raw in enumerate(raw_rules):
            rule = reader.rule(raw, f"rules[{i}]", omit)
            if rule is not None:
                rules.append(rule)
    if reader.problems:
        raise AuditPolicyError(reader.problems)
    return Policy(
        rules=tuple(rules), omit_stages=omit, omit_managed_fields=bool(managed)
    )


def load_policy(path: str) -> Policy:
    """Read and check ``--audit-policy-file`` (blocking: call it at start-up)."""
    flag = "--audit-policy-file"
    source = f"{flag} {json.dumps(path)}"
    unreadable = file_problem(
        flag, path, "give an audit.k8s.io/v1 Policy file", component="audit"
    )
    if unreadable is not None:
        raise AuditPolicyError(unreadable)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise AuditPolicyError(
            f"audit: {source}: cannot read: {type(err).__name__}"
        ) from err
    try:
        document = decode_document(text, source)
    except ConfigError as err:
        raise AuditPolicyError(list(err.problems)) from err
    return parse_policy(document, source)
