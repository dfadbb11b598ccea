"""``proxy.audit.policy`` against kube-apiserver's checker tests, plus loading.

``ATTRS``, ``RULES``, ``LEVEL_CASES``, ``OMIT_CASES``, ``POLICY_OMIT_CASES``,
``UNION_CASES`` and ``MANAGED_FIELDS_CASES`` are ``checker_test.go`` of
``k8s.io/apiserver/pkg/audit/policy`` as data (``testAuditLevel`` run once
without and once with policy-wide ``omitStages``, ``TestChecker``,
``TestCheckerPolicyOmitStages``, ``TestUnionStages``,
``TestOmitManagedFields``). The rules are written as the YAML a user would
write and go through ``parse_policy``, so loading is covered too.

Deliberate differences from kube-apiserver (see ``proxy.audit.policy``):
unknown fields are refused, only ``audit.k8s.io/v1`` is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.audit.policy import (
    Attributes,
    Policy,
    evaluate,
    load_policy,
    parse_policy,
)
from proxy.errors import AuditPolicyError, ConfigError

TIM = ("tim@k8s.io", ("humans", "developers"))

ATTRS: dict[str, Attributes] = {
    "namespaced": Attributes(
        user=TIM[0], groups=TIM[1], verb="get", namespace="default", api_group="",
        resource="pods", name="busybox", resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
    "cluster": Attributes(
        user=TIM[0], groups=TIM[1], verb="get", api_group="rbac.authorization.k8s.io",
        resource="clusterroles", name="edit", resource_request=True,
        path="/apis/rbac.authorization.k8s.io/v1beta1/clusterroles/edit",
    ),
    "nonResource": Attributes(
        user=TIM[0], groups=TIM[1], verb="get", resource_request=False,
        path="/logs/kubelet.log",
    ),
    "subresource": Attributes(
        user=TIM[0], groups=TIM[1], verb="get", namespace="default", api_group="",
        resource="pods", subresource="log", name="busybox", resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
    "Unauthorized": Attributes(
        user=None, verb="get", namespace="default", api_group="", resource="pods",
        name="busybox", resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
}  # fmt: skip

RULES: dict[str, dict[str, Any]] = {
    "default": {"level": "Metadata"},
    "create": {"level": "Request", "verbs": ["create"]},
    "tims": {"level": "Metadata", "users": ["tim@k8s.io"]},
    "humans": {"level": "Metadata", "userGroups": ["humans"]},
    "serviceAccounts": {"level": "Request", "userGroups": ["system:serviceaccounts"]},
    "getPods": {"level": "RequestResponse", "verbs": ["get"], "resources": [{"resources": ["pods"]}]},
    "getPodLogs": {"level": "Request", "verbs": ["get"], "resources": [{"resources": ["pods/log"]}]},
    "getPodWildcardMatching": {"level": "Request", "verbs": ["get"], "resources": [{"resources": ["*"]}]},
    "getPodResourceWildcardMatching": {"level": "Request", "verbs": ["get"], "resources": [{"resources": ["*/log"]}]},
    "getPodSubResourceWildcardMatching": {"level": "Request", "verbs": ["get"], "resources": [{"resources": ["pods/*"]}]},
    "getClusterRoles": {
        "level": "RequestResponse", "verbs": ["get"],
        "resources": [{"group": "rbac.authorization.k8s.io", "resources": ["clusterroles"]}],
        "namespaces": [""],
    },
    "getLogs": {"level": "RequestResponse", "verbs": ["get"], "nonResourceURLs": ["/logs*"]},
    "getMetrics": {"level": "Request", "verbs": ["get"], "nonResourceURLs": ["/metrics"]},
    "clusterRoleEdit": {
        "level": "Request",
        "resources": [{"group": "rbac.authorization.k8s.io", "resources": ["clusterroles"], "resourceNames": ["edit"]}],
    },
    "omit RequestReceived": {"level": "Request", "omitStages": ["RequestReceived"]},
    "only audit panic": {
        "level": "Request",
        "omitStages": ["RequestReceived", "ResponseStarted", "ResponseComplete"],
    },
}  # fmt: skip

# request, expected level, rule names (testAuditLevel)
LEVEL_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("namespaced", "Metadata", ("default",)),
    ("namespaced", "None", ("create",)),
    ("namespaced", "Metadata", ("tims",)),
    ("namespaced", "Metadata", ("humans",)),
    ("namespaced", "None", ("serviceAccounts",)),
    ("namespaced", "RequestResponse", ("getPods",)),
    ("namespaced", "None", ("getClusterRoles",)),
    ("namespaced", "None", ("getLogs",)),
    ("namespaced", "None", ("getMetrics",)),
    ("namespaced", "Metadata", ("getMetrics", "serviceAccounts", "default")),
    ("namespaced", "RequestResponse", ("getMetrics", "getPods", "default")),
    ("namespaced", "RequestResponse", ("getPodLogs", "getPods")),
    ("cluster", "Metadata", ("default",)),
    ("cluster", "None", ("create",)),
    ("cluster", "Metadata", ("tims",)),
    ("cluster", "Metadata", ("humans",)),
    ("cluster", "None", ("serviceAccounts",)),
    ("cluster", "None", ("getPods",)),
    ("cluster", "RequestResponse", ("getClusterRoles",)),
    ("cluster", "Request", ("clusterRoleEdit", "getClusterRoles")),
    ("cluster", "None", ("getLogs",)),
    ("cluster", "None", ("getMetrics",)),
    ("cluster", "Metadata", ("getMetrics", "serviceAccounts", "default")),
    ("cluster", "RequestResponse", ("getMetrics", "getClusterRoles", "default")),
    ("cluster", "None", ("getPodLogs", "getPods")),
    ("nonResource", "Metadata", ("default",)),
    ("nonResource", "None", ("create",)),
    ("nonResource", "Metadata", ("tims",)),
    ("nonResource", "Metadata", ("humans",)),
    ("nonResource", "None", ("serviceAccounts",)),
    ("nonResource", "None", ("getPods",)),
    ("nonResource", "None", ("getClusterRoles",)),
    ("nonResource", "RequestResponse", ("getLogs",)),
    ("nonResource", "None", ("getMetrics",)),
    ("nonResource", "Metadata", ("getMetrics", "serviceAccounts", "default")),
    ("nonResource", "RequestResponse", ("getLogs", "getClusterRoles", "default")),
    ("nonResource", "None", ("getPodLogs", "getPods")),
    ("subresource", "Request", ("getPodLogs", "getPods")),
    ("subresource", "Request", ("getPodWildcardMatching",)),
    ("subresource", "Request", ("getPodResourceWildcardMatching",)),
    ("subresource", "Request", ("getPodSubResourceWildcardMatching",)),
    ("Unauthorized", "None", ("tims",)),
    ("Unauthorized", "Metadata", ("tims", "default")),
    ("Unauthorized", "None", ("humans",)),
    ("Unauthorized", "Metadata", ("humans", "default")),
]

RR = "RequestReceived"
RS = "ResponseStarted"
RC = "ResponseComplete"
POLICY_STAGES = (RR, RS)

# request, level, policy omitStages, expected omitStages, rules
OMIT_CASES: list[tuple[str, str, tuple[str, ...], set[str], tuple[str, ...]]] = [
    # TestChecker
    ("namespaced", "Request", (), {RR}, ("omit RequestReceived", "getPods", "default")),
    ("namespaced", "Request", (), {RR, RS, RC}, ("only audit panic", "getPods", "default")),
    ("cluster", "Request", (), {RR}, ("omit RequestReceived", "getPods", "default")),
    ("cluster", "Request", (), {RR, RS, RC}, ("only audit panic", "getPods", "default")),
    ("nonResource", "Request", (), {RR}, ("omit RequestReceived", "getPods", "default")),
    ("nonResource", "Request", (), {RR, RS, RC}, ("only audit panic", "getPods", "default")),
    # TestCheckerPolicyOmitStages
    ("namespaced", "Request", POLICY_STAGES, {RR, RS}, ("omit RequestReceived", "getPods", "default")),
    ("namespaced", "Request", POLICY_STAGES, {RR, RS, RC}, ("only audit panic", "getPods", "default")),
    ("cluster", "Request", POLICY_STAGES, {RR, RS}, ("omit RequestReceived", "getPods", "default")),
    ("cluster", "Request", POLICY_STAGES, {RR, RS, RC}, ("only audit panic", "getPods", "default")),
    ("nonResource", "Metadata", POLICY_STAGES, {RR, RS}, ("default", "omit RequestReceived", "getPods")),
    ("nonResource", "Request", POLICY_STAGES, {RR, RS, RC}, ("only audit panic", "getPods", "default")),
]  # fmt: skip

UNION_CASES: list[tuple[tuple[str, ...], tuple[str, ...], set[str]]] = [
    ((), (), set()),
    ((RR,), (), {RR}),
    ((RR,), (RR,), {RR}),
    ((RR,), (RS,), {RR, RS}),
    ((RR, RR), (RR, RR), {RR}),
    ((RR, RS), ("Panic", RR), {RR, RS, "Panic"}),
    ((), (RR,), {RR}),
]

# name, policy omitManagedFields, rule omitManagedFields, expected
MANAGED_FIELDS_CASES: list[tuple[str, bool, bool | None, bool]] = [
    ("global policy default is false, rule does not override", False, None, False),
    ("global policy default is true, rule does not override", True, None, True),
    ("global policy default is true, rule overrides to false", True, False, False),
    ("global policy default is false, rule overrides to true", False, True, True),
]


def policy_of(rules: list[dict[str, Any]], **fields: Any) -> Policy:
    return parse_policy(
        {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": rules, **fields},
        "test",
    )


def _ids(cases: list[Any]) -> list[str]:
    return [f"{c[0]}:{'+'.join(c[-1])}" for c in cases]


@pytest.mark.parametrize("policy_stages", [(), POLICY_STAGES], ids=["none", "policy"])
@pytest.mark.parametrize(
    ("request_name", "level", "rule_names"), LEVEL_CASES, ids=_ids(LEVEL_CASES)
)
def test_checker_levels(
    request_name: str,
    level: str,
    rule_names: tuple[str, ...],
    policy_stages: tuple[str, ...],
) -> None:
    """``testAuditLevel``: the level, and the policy's stages omitted either
    way (the rules in that helper omit none of their own)."""
    policy = policy_of(
        [RULES[r] for r in rule_names], omitStages=list(policy_stages) or None
    )
    config = evaluate(policy, ATTRS[request_name])
    assert config.level == level
    assert config.omit_stages == set(policy_stages)


@pytest.mark.parametrize(
    ("request_name", "level", "policy_stages", "omitted", "rule_names"),
    OMIT_CASES,
    ids=[f"{c[0]}:{'+'.join(c[2]) or 'none'}:{c[4][0]}" for c in OMIT_CASES],
)
def test_checker_omit_stages(
    request_name: str,
    level: str,
    policy_stages: tuple[str, ...],
    omitted: set[str],
    rule_names: tuple[str, ...],
) -> None:
    policy = policy_of(
        [RULES[r] for r in rule_names], omitStages=list(policy_stages) or None
    )
    config = evaluate(policy, ATTRS[request_name])
    assert config.level == level
    assert config.omit_stages == omitted


@pytest.mark.parametrize(
    ("policy_stages", "rule_stages", "union"), UNION_CASES, ids=str
)
def test_union_of_policy_and_rule_stages(
    policy_stages: tuple[str, ...], rule_stages: tuple[str, ...], union: set[str]
) -> None:
    policy = policy_of(
        [{"level": "Metadata", "omitStages": list(rule_stages)}],
        omitStages=list(policy_stages),
    )
    assert policy.rules[0].omit_stages == union


@pytest.mark.parametrize(
    ("policy_value", "rule_value", "expected"),
    [c[1:] for c in MANAGED_FIELDS_CASES],
    ids=[c[0] for c in MANAGED_FIELDS_CASES],
)
def test_omit_managed_fields(
    policy_value: bool, rule_value: bool | None, expected: bool
) -> None:
    rule: dict[str, Any] = {"level": "RequestResponse", "verbs": ["get"]}
    if rule_value is not None:
        rule["omitManagedFields"] = rule_value
    policy = policy_of([rule], omitManagedFields=policy_value)
    attrs = Attributes(user=None, verb="get", resource_request=False, path="/")
    assert evaluate(policy, attrs).omit_managed_fields is expected


def test_no_rule_matches_is_none_with_the_policys_stages() -> None:
    policy = policy_of([RULES["create"]], omitStages=["Panic"])
    config = evaluate(policy, ATTRS["namespaced"])
    assert (config.level, config.omit_stages) == ("None", frozenset({"Panic"}))


def test_a_namespaces_only_rule_is_a_resource_rule() -> None:
    policy = policy_of([{"level": "Metadata", "namespaces": ["default"]}])
    assert evaluate(policy, ATTRS["namespaced"]).level == "Metadata"
    assert evaluate(policy, ATTRS["nonResource"]).level == "None"
    assert evaluate(policy, ATTRS["cluster"]).level == "None"
    star = policy_of([{"level": "Metadata", "nonResourceURLs": ["*"]}])
    assert evaluate(star, ATTRS["nonResource"]).level == "Metadata"
    assert evaluate(star, ATTRS["namespaced"]).level == "None"


def test_a_group_without_resources_matches_all_of_it() -> None:
    policy = policy_of(
        [{"level": "Request", "resources": [{"group": "rbac.authorization.k8s.io"}]}]
    )
    assert evaluate(policy, ATTRS["cluster"]).level == "Request"
    assert evaluate(policy, ATTRS["namespaced"]).level == "None"


# --------------------------------------------------------------------------
# Invalid policies: every problem at once, each with its field path.

INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("no-rules", {"rules": []}, ["rules: a policy needs at least one rule"]),
    ("missing-level", {"rules": [{"verbs": ["get"]}]}, ["rules[0].level: required"]),
    ("unknown-level", {"rules": [{"level": "Everything"}]}, ['rules[0].level: unsupported level "Everything"']),
    ("bad-stage", {"rules": [{"level": "None", "omitStages": ["Done"]}]}, ['rules[0].omitStages[0]: unsupported stage "Done"']),
    ("bad-policy-stage", {"omitStages": ["Later"], "rules": [{"level": "None"}]}, ['omitStages[0]: unsupported stage "Later"']),
    ("url-without-slash", {"rules": [{"level": "None", "nonResourceURLs": ["healthz"]}]}, ['rules[0].nonResourceURLs[0]: "healthz": non-resource URL rules must begin with \'/\'']),
    ("star-inside-url", {"rules": [{"level": "None", "nonResourceURLs": ["/a*/b"]}]}, ['rules[0].nonResourceURLs[0]: "/a*/b": a \'*\' may only be the final character']),
    ("both-kinds", {"rules": [{"level": "None", "nonResourceURLs": ["/x"], "namespaces": ["a"]}]}, ["rules[0]: rules cannot apply to both regular resources"]),
    ("group-with-version", {"rules": [{"level": "None", "resources": [{"group": "apps/v1"}]}]}, ['rules[0].resources[0].group: "apps/v1" is not a valid DNS subdomain']),
    ("names-without-resources", {"rules": [{"level": "None", "resources": [{"resourceNames": ["x"]}]}]}, ["rules[0].resources[0].resourceNames: using resourceNames requires at least one resource"]),
    ("misspelt-field", {"rules": [{"level": "None", "namespace": ["a"]}]}, ["rules[0].namespace: unknown field"]),
    ("not-a-list", {"rules": [{"level": "None", "users": "alice"}]}, ["rules[0].users: must be a list of strings"]),
    ("bad-flag", {"omitManagedFields": "yes", "rules": [{"level": "None"}]}, ["omitManagedFields: must be true or false"]),
    ("two-problems", {"rules": [{"level": "x"}, {"level": "None", "omitStages": ["y"]}]}, ['rules[0].level: unsupported level "x"', 'rules[1].omitStages[0]: unsupported stage "y"']),
]  # fmt: skip


@pytest.mark.parametrize(
    ("document", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_policies_are_refused_with_field_paths(
    document: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(AuditPolicyError) as caught:
        parse_policy(
            {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", **document}, "p.yaml"
        )
    problems = caught.value.problems
    assert len(problems) == len(expected), problems
    for problem, wanted in zip(problems, expected, strict=True):
        assert problem.startswith("audit: p.yaml: ")
        assert wanted in problem


@pytest.mark.parametrize(
    ("api_version", "kind", "wanted"),
    [
        ("audit.k8s.io/v1beta1", "Policy", 'apiVersion: expected "audit.k8s.io/v1"'),
        ("audit.k8s.io/v1", "AuthenticationConfiguration", 'kind: expected "Policy"'),
    ],
    ids=["old-version", "wrong-kind"],
)
def test_only_v1_policies_load(api_version: str, kind: str, wanted: str) -> None:
    with pytest.raises(AuditPolicyError, match=wanted):
        parse_policy(
            {"apiVersion": api_version, "kind": kind, "rules": [{"level": "None"}]},
            "p",
        )


EXAMPLE = """\
apiVersion: audit.k8s.io/v1
kind: Policy
metadata:
  name: example
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/version"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "pods/log"]
  - level: RequestResponse
    verbs: ["create", "update", "patch", "delete"]
    resources:
      - group: rbac.authorization.k8s.io
  - level: Metadata
"""


def test_a_policy_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    policy = load_policy(str(path))
    assert [r.level for r in policy.rules] == [
        "None",
        "Metadata",
        "RequestResponse",
        "Metadata",
    ]
    assert all("RequestReceived" in r.omit_stages for r in policy.rules)


def test_the_shipped_example_policy_loads() -> None:
    root = Path(__file__).resolve().parent.parent
    shipped = sorted(root.glob("deploy/**/audit-policy.yaml"))
    assert shipped, "deploy/ ships an example audit policy"
    for path in shipped:
        assert load_policy(str(path)).rules


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("rules: [", "not valid YAML or JSON"),
        (
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules: []\nrules: []\n",
            'duplicate field "rules"',
        ),
        ("- just\n- a list\n", "not a Policy object"),
    ],
    ids=["bad-yaml", "duplicate-field", "not-a-mapping"],
)
def test_unreadable_policy_files(tmp_path: Path, text: str, wanted: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=wanted):
        load_policy(str(path))


def test_missing_policy_file_says_which_flag(tmp_path: Path) -> None:
    with pytest.raises(AuditPolicyError) as caught:
        load_policy(str(tmp_path / "nope.yaml"))
    (problem,) = caught.value.problems
    assert problem.startswith("audit: --audit-policy-file ")
    assert "no such file" in problem
