"""The operators' kit in ``deploy/components/monitoring``, proven with real parts.

- ``promtool check rules`` accepts the alert rules, and ``promtool test rules``
  runs synthetic series through every alert: it fires when it should and
  stays quiet on healthy traffic and on a blip shorter than its ``for:``.
- A private Prometheus on 127.0.0.1 scrapes the real ``webhook`` and
  ``proxy`` commands (``--workers 2`` each) while the test drives accepted and
  refused requests; then every dashboard query and every alert expression
  (each side of its comparison) is evaluated through Prometheus' HTTP API and
  must return data with the labels it aggregates by. The queries are read
  from the dashboard JSON and the rule file, so a new panel or alert is
  checked without touching this file; a query naming a metric or a label the
  service does not export finds no data and fails.
- The component renders with ``kubectl kustomize`` in both overlays, and the
  ``monitoring.coreos.com/v1`` objects pass a structural check. No schema for
  those CRDs is available offline (``kubernetes-validate`` ships only the core
  kinds), so ``MONITORING_SCHEMAS`` below transcribes, from the published
  CRDs of prometheus-operator, the types of the fields the component uses
  and refuses any other field.
- docs/operations.md lists every alert with its severity and ``for:``.

Prometheus and promtool come from the Debian package ``prometheus``;
``.ci/install-system.sh`` installs it (without starting its service). Without
it the tests that need them are skipped with a message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]  # via kubernetes-validate
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trustme
import yaml

from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import upstream_kubeconfig
from tests.fakes.issuer import FakeIssuer
from tests.keygen import claims_for, new_key, sign
from tests.proc import Proc
from tests.support.running_webhook import review_body
from tests.test_cli_webhook import client_ssl, free_port, webhook_args
from tests.test_deploy import DEPLOY, DOCS, find, one, render

COMPONENT = DEPLOY / "components" / "monitoring"
RULES = COMPONENT / "prometheusrule.yaml"
DASHBOARD = COMPONENT / "grafana-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = (
    "prometheus/promtool not installed: apt-get install prometheus "
    "(Debian package `prometheus`; .ci/install-system.sh installs it)"
)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
PROMTOOL_TIMEOUT = 60
NAMESPACE = "kube-oidc-gate"
JOB = "kube-oidc-gate-metrics"
#: The target labels the Prometheus Operator gives a ServiceMonitor's targets
#: (besides ``instance``); the private Prometheus sets them statically.
TARGET_LABELS = {
    "namespace": NAMESPACE,
    "job": JOB,
    "service": JOB,
    "endpoint": "probe",
    "container": "kube-oidc-gate",
}
#: Grafana's variables, as the test fills them in.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": NAMESPACE,
    "$pod": ".*",
}


def rule_spec() -> dict[str, Any]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_spec()["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def write_rule_file(directory: Path) -> Path:
    """The PrometheusRule's ``spec`` is a Prometheus rule file as it is."""
    path = directory / "kube-oidc-gate.rules.yaml"
    path.write_text(yaml.safe_dump(rule_spec(), sort_keys=False), encoding="utf-8")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


# --------------------------------------------------------------------------
# The rules, offline: promtool


@pytest.mark.slow
@needs_promtool
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    done = promtool("check", "rules", str(write_rule_file(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


_TEMPLATE = re.compile(r"\{\{\s*\$labels\.([a-z_]+)\s*\}\}")


def rendered_annotations(
    rule: dict[str, Any], labels: dict[str, str]
) -> dict[str, str]:
    """The annotations as Prometheus renders them for an alert with ``labels``.

    The rules only use ``{{ $labels.<name> }}``: anything else in a template
    fails here, so this rendering stays exact.
    """
    out = {}
    for key, text in rule["annotations"].items():
        done = _TEMPLATE.sub(lambda m: labels[m.group(1)], text)
        assert "{{" not in done, f"{rule['alert']}: unsupported template in {key}"
        out[key] = done
    return out


@dataclass(frozen=True)
class Case:
    """Synthetic series (one sample a minute) and what the alert does on them."""

    name: str
    series: dict[str, str]
    fires_at: tuple[str, ...] = ()
    quiet_at: tuple[str, ...] = ()
    #: The firing alert's labels from the expression (severity is added).
    labels: dict[str, str] = field(default_factory=dict)


NS = f'namespace="{NAMESPACE}", pod="p-1"'
ISSUER = "sha256:0123456789abcdef"
AUTHN = "kube_oidc_gate_authentications_total"
UPSTREAM = "kube_oidc_gate_upstream_requests_total"
FETCHES = "kube_oidc_gate_jwks_fetches_total"
LATENCY = "kube_oidc_gate_validation_duration_seconds_bucket"
CONFIG_RELOADS = (
    "kube_oidc_gate_authentication_config_controller_automatic_reloads_total"
)
UPSTREAM_RELOADS = "kube_oidc_gate_upstream_reloads_total"

CASES: dict[str, list[Case]] = {
    "KubeOIDCGateIssuerNotReady": [
        Case(
            "keys lost on one pod",
            {
                f'kube_oidc_gate_issuer_ready{{{NS}, issuer_hash="{ISSUER}"}}': "1x5 0x20",
                f'kube_oidc_gate_issuer_ready{{namespace="{NAMESPACE}", pod="p-2", '
                f'issuer_hash="{ISSUER}"}}': "1x25",
            },
            fires_at=("15m", "20m"),
            quiet_at=("5m", "9m"),
            labels={"namespace": NAMESPACE, "issuer_hash": ISSUER},
        ),
        Case(
            "a blip shorter than for",
            {
                f'kube_oidc_gate_issuer_ready{{{NS}, issuer_hash="{ISSUER}"}}': "1x5 0x2 1x20"
            },
            quiet_at=("7m", "10m", "15m", "20m"),
        ),
    ],
    "KubeOIDCGateKeyFetchFailing": [
        Case(
            "every fetch fails",
            {
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="error"}}': "0+1x60",
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="ok"}}': "5x60",
            },
            fires_at=("20m", "40m"),
            quiet_at=("10m",),
            labels={"namespace": NAMESPACE, "issuer_hash": ISSUER},
        ),
        Case(
            "fetches fail and succeed",
            {
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="error"}}': "0+1x60",
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="ok"}}': "5+1x60",
            },
            quiet_at=("20m", "40m"),
        ),
        Case(
            "one failure, the retry succeeds",
            {
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="error"}}': "0x10 1x50",
                f'{FETCHES}{{{NS}, issuer_hash="{ISSUER}", result="ok"}}': "5x11 6x49",
            },
            quiet_at=("15m", "26m", "40m"),
        ),
    ],
    "KubeOIDCGateKeysStale": [
        Case(
            "no refresh since the start",
            {
                f'kube_oidc_gate_jwks_last_success_timestamp_seconds{{{NS}, issuer_hash="{ISSUER}"}}': "0x240"
            },
            fires_at=("3h20m", "3h59m"),
            quiet_at=("2h", "3h5m"),
            labels={"namespace": NAMESPACE, "issuer_hash": ISSUER},
        ),
        Case(
            "refreshed every hour",
            {
                f'kube_oidc_gate_jwks_last_success_timestamp_seconds{{{NS}, issuer_hash="{ISSUER}"}}': (
                    "0x59 3600x59 7200x59 10800x59 14400x59"
                )
            },
            quiet_at=("2h", "3h30m", "4h50m"),
        ),
    ],
    "KubeOIDCGateAuthenticationErrors": [
        Case(
            "keys unavailable for long",
            {
                f'{AUTHN}{{{NS}, result="error", reason="keys_unavailable"}}': "0+5x40",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+50x40",
            },
            fires_at=("20m", "35m"),
            quiet_at=("8m",),
            labels={"namespace": NAMESPACE, "reason": "keys_unavailable"},
        ),
        Case(
            "a burst of errors once",
            {
                f'{AUTHN}{{{NS}, result="error", reason="keys_unavailable"}}': "0x10 3x30",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+50x40",
            },
            quiet_at=("15m", "22m", "30m"),
        ),
    ],
    "KubeOIDCGateRefusalsSpiking": [
        Case(
            "a third refused with audience_mismatch",
            {
                f'{AUTHN}{{{NS}, result="rejected", reason="audience_mismatch"}}': "0+10x60",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+20x60",
            },
            fires_at=("30m", "50m"),
            quiet_at=("10m",),
            labels={"namespace": NAMESPACE, "reason": "audience_mismatch"},
        ),
        Case(
            "too few to matter",
            {
                f'{AUTHN}{{{NS}, result="rejected", reason="audience_mismatch"}}': "0+1x60",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+1x60",
            },
            quiet_at=("30m", "50m"),
        ),
        Case(
            "expired tokens are normal",
            {
                f'{AUTHN}{{{NS}, result="rejected", reason="expired"}}': "0+10x60",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+20x60",
            },
            quiet_at=("30m", "50m"),
        ),
    ],
    "KubeOIDCGateForgedTokens": [
        Case(
            "a forged token",
            {
                f'{AUTHN}{{{NS}, result="rejected", reason="bad_signature"}}': "0x5 1x60",
                f'{AUTHN}{{{NS}, result="ok", reason="ok"}}': "0+20x65",
            },
            fires_at=("15m", "60m"),
            quiet_at=("5m", "8m"),
            labels={"namespace": NAMESPACE, "reason": "bad_signature"},
        ),
        Case(
            "other refusals",
            {f'{AUTHN}{{{NS}, result="rejected", reason="expired"}}': "0+10x60"},
            quiet_at=("15m", "50m"),
        ),
    ],
    "KubeOIDCGateUpstreamFailing": [
        Case(
            "a fifth of the requests fail",
            {
                f'{UPSTREAM}{{{NS}, code="503"}}': "0+5x40",
                f'{UPSTREAM}{{{NS}, code="unavailable"}}': "0+1x40",
                f'{UPSTREAM}{{{NS}, code="200"}}': "0+20x40",
            },
            fires_at=("20m", "35m"),
            quiet_at=("8m",),
            labels={"namespace": NAMESPACE},
        ),
        Case(
            "a few 5xx among many",
            {
                f'{UPSTREAM}{{{NS}, code="503"}}': "0+1x40",
                f'{UPSTREAM}{{{NS}, code="200"}}': "0+20x40",
            },
            quiet_at=("20m", "35m"),
        ),
        Case(
            "two bad minutes",
            {
                f'{UPSTREAM}{{{NS}, code="503"}}': "0x10 30 60 60x28",
                f'{UPSTREAM}{{{NS}, code="200"}}': "0+20x40",
            },
            quiet_at=("16m", "25m"),
        ),
    ],
    "KubeOIDCGateNewTokensWaiting": [
        Case(
            "20 a second wait",
            {
                f'kube_oidc_gate_new_token_waits_total{{{NS}, outcome="waited"}}': "0+1200x40"
            },
            fires_at=("25m", "35m"),
            quiet_at=("10m",),
            labels={"namespace": NAMESPACE},
        ),
        Case(
            "5 a second wait",
            {
                f'kube_oidc_gate_new_token_waits_total{{{NS}, outcome="waited"}}': "0+300x40"
            },
            quiet_at=("25m", "35m"),
        ),
    ],
    "KubeOIDCGateReloadFailed": [
        Case(
            "a broken authentication config written once",
            {
                f'{CONFIG_RELOADS}{{{NS}, status="failure"}}': "0x5 1x30",
                f'{CONFIG_RELOADS}{{{NS}, status="success"}}': "0x35",
                f'{UPSTREAM_RELOADS}{{{NS}, status="failure"}}': "0x35",
            },
            fires_at=("11m", "14m"),
            quiet_at=("3m", "8m", "25m"),
            labels={"namespace": NAMESPACE},
        ),
        Case(
            "a broken upstream kubeconfig written once",
            {
                f'{CONFIG_RELOADS}{{{NS}, status="failure"}}': "0x35",
                f'{UPSTREAM_RELOADS}{{{NS}, status="failure"}}': "0x5 1x30",
            },
            fires_at=("11m",),
            quiet_at=("8m", "25m"),
            labels={"namespace": NAMESPACE},
        ),
        Case(
            "only good reloads",
            {
                f'{CONFIG_RELOADS}{{{NS}, status="failure"}}': "0x35",
                f'{CONFIG_RELOADS}{{{NS}, status="success"}}': "0+1x35",
                f'{UPSTREAM_RELOADS}{{{NS}, status="failure"}}': "0x35",
                f'{UPSTREAM_RELOADS}{{{NS}, status="success"}}': "0+1x35",
            },
            quiet_at=("10m", "20m", "30m"),
        ),
    ],
    "KubeOIDCGateSlowValidation": [
        Case(
            "validations near 100 ms",
            {
                f'{LATENCY}{{{NS}, result="ok", le="0.01"}}': "0x40",
                f'{LATENCY}{{{NS}, result="ok", le="0.1"}}': "0+100x40",
                f'{LATENCY}{{{NS}, result="ok", le="+Inf"}}': "0+100x40",
            },
            fires_at=("25m", "35m"),
            quiet_at=("10m",),
            labels={"namespace": NAMESPACE},
        ),
        Case(
            "validations under 10 ms",
            {
                f'{LATENCY}{{{NS}, result="ok", le="0.01"}}': "0+100x40",
                f'{LATENCY}{{{NS}, result="ok", le="0.1"}}': "0+100x40",
                f'{LATENCY}{{{NS}, result="ok", le="+Inf"}}': "0+100x40",
            },
            quiet_at=("25m", "35m"),
        ),
    ],
}


def test_every_alert_has_cases_that_fire_and_stay_quiet() -> None:
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "alert names are unique"
    assert sorted(CASES) == sorted(names)
    for name, cases in CASES.items():
        assert any(c.fires_at for c in cases), f"{name}: no case where it fires"
        assert any(not c.fires_at for c in cases), f"{name}: no case where it is quiet"


def unit_tests(rule: dict[str, Any], rule_file: Path) -> dict[str, Any]:
    """A ``promtool test rules`` file for one alert, from its ``CASES``."""
    tests = []
    for case in CASES[rule["alert"]]:
        checks: list[dict[str, Any]] = []
        for at in case.quiet_at:
            checks.append(
                {"eval_time": at, "alertname": rule["alert"], "exp_alerts": []}
            )
        labels = {**case.labels, **rule["labels"]}
        for at in case.fires_at:
            expected = {
                "exp_labels": labels,
                "exp_annotations": rendered_annotations(rule, labels),
            }
            checks.append(
                {"eval_time": at, "alertname": rule["alert"], "exp_alerts": [expected]}
            )
        tests.append(
            {
                "name": case.name,
                "interval": "1m",
                "input_series": [
                    {"series": s, "values": v} for s, v in case.series.items()
                ],
                "alert_rule_test": checks,
            }
        )
    return {
        "rule_files": [str(rule_file)],
        "evaluation_interval": "1m",
        "tests": tests,
    }


@pytest.mark.slow
@needs_promtool
@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_fires_when_it_should_and_only_then(
    tmp_path: Path, rule: dict[str, Any]
) -> None:
    rules = write_rule_file(tmp_path)
    spec = tmp_path / "test.yaml"
    spec.write_text(yaml.safe_dump(unit_tests(rule, rules)), encoding="utf-8")
    done = promtool("test", "rules", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@needs_promtool
def test_a_wrong_expectation_fails_promtool(tmp_path: Path) -> None:
    """The unit tests above can fail: expecting silence where it fires does."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "KubeOIDCGateIssuerNotReady"]
    doc = unit_tests(rule, write_rule_file(tmp_path))
    doc["tests"][0]["alert_rule_test"][-1]["exp_alerts"] = []
    spec = tmp_path / "test.yaml"
    spec.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert promtool("test", "rules", str(spec)).returncode != 0


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_says_what_to_check_first(rule: dict[str, Any]) -> None:
    assert set(rule["labels"]) == {"severity"}
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert set(rule["annotations"]) == {"summary", "description"}
    description = rule["annotations"]["description"]
    assert "Check first" in description
    assert "docs/troubleshooting.md" in description
    assert "check-token" in description
    assert re.fullmatch(r"\d+m", rule["for"]), "a for: in minutes"
    assert int(rule["for"][:-1]) >= 5, "no page on a blip"


# --------------------------------------------------------------------------
# Reading PromQL: the queries' operands, metrics and labels


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?|\b(and|or|unless)\b")
_MODIFIER = re.compile(r"\s*(on|ignoring|group_left|group_right)\s*(\([^)]*\))?")
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
)
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "and", "or", "unless", "offset",
    }
)  # fmt: skip


def operands(expr: str) -> list[str]:
    """``expr`` cut at its top-level comparisons and set operators.

    Each piece is what an alert compares (a ratio, a rate, an age): the
    piece, not the alert, must find data on a healthy service.
    """
    pieces, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == '"':
            i = expr.index('"', i + 1)
        elif (
            depth == 0
            and (m := _COMPARISON.match(expr, i))
            and (m.group(3) is None or _is_word_boundary(expr, i))
        ):
            pieces.append(expr[start:i])
            i = m.end()
            while modifier := _MODIFIER.match(expr, i):
                i = modifier.end()
            start = i
            continue
        i += 1
    pieces.append(expr[start:])
    return [p.strip() for p in pieces if p.strip()]


def _is_word_boundary(expr: str, i: int) -> bool:
    return i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_")


def metric_names(expr: str) -> set[str]:
    """Every series name ``expr`` reads (all ours start ``kube_oidc_gate_``)."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = _LABEL_LISTS.sub(" ", bare)
    bare = re.sub(r"\b\d+(?:ms|s|m|h|d|w|y)\b", " ", bare)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        word, rest = m.group(0), bare[m.end() :].lstrip()
        if word in _KEYWORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d[\d.e+-]*|Inf|NaN", word, re.IGNORECASE):
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    names = set(_MATCHER.findall(expr))
    for listed in _LABEL_LISTS.findall(expr):
        names.update(n.strip() for n in listed.split(",") if n.strip())
    return names


def result_labels(expr: str) -> set[str]:
    """The labels a query's series carry: its first ``by`` list, without ``le``."""
    m = re.search(r"\bby\s*\(([^)]*)\)", expr)
    listed = {n.strip() for n in m.group(1).split(",")} if m else set()
    return listed - {"le", ""}


@pytest.mark.parametrize(
    ("expr", "pieces"),
    [
        ("a > 0", ["a", "0"]),
        (
            'sum by (x) (rate(m{r="a>b"}[5m])) / on (x) group_left sum(m) > 0.2 '
            "and on (x, y) c > 30",
            [
                'sum by (x) (rate(m{r="a>b"}[5m])) / on (x) group_left sum(m)',
                "0.2",
                "c",
                "30",
            ],
        ),
        ("a > 0 unless on (x) b > 0", ["a", "0", "b", "0"]),
        ("time() - min by (x) (m) > 3 * 3600", ["time() - min by (x) (m)", "3 * 3600"]),
        ("m_and_more == 0", ["m_and_more", "0"]),
    ],
    ids=["plain", "ratio-and-floor", "unless", "arithmetic", "keyword-inside-name"],
)
def test_operands(expr: str, pieces: list[str]) -> None:
    assert operands(expr) == pieces


def test_metric_and_label_names_are_read() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (namespace, le) (rate(x_bucket{a="1", '
        'b=~"c|d"}[5m]))) / on (pod) group_left sum(y) > 0.05 and z offset 5m'
    )
    assert metric_names(expr) == {"x_bucket", "y", "z"}
    assert label_names(expr) == {"a", "b", "namespace", "le", "pod"}
    assert result_labels(expr) == {"namespace"}


def grafana_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, filled in."""
    doc = dashboard()
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*([a-z_]+)\)", var["query"]["query"])
        assert m, f"variable {var['name']}: only label_values(series, label) is used"
        out.append((f"variable {var['name']}", f"group by ({m[2]}) ({m[1]})"))
    filled = []
    for where, query in out:
        expr = query
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        filled.append((where, expr))
    return filled


def alert_queries() -> list[tuple[str, str]]:
    out = []
    for rule in alert_rules():
        for i, piece in enumerate(operands(rule["expr"])):
            if metric_names(piece):
                out.append((f"alert {rule['alert']} operand {i}", piece))
    return out


# --------------------------------------------------------------------------
# The dashboard, as a file


def test_dashboard_is_importable_as_it_is() -> None:
    doc = dashboard()
    assert doc["id"] is None, "an id belongs to one Grafana; import assigns one"
    assert doc["uid"] == "kube-oidc-gate"
    assert doc["__inputs"] == [], "nothing to fill in on import"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    data_source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == data_source
        assert panel["description"]
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"] == data_source
            used = set(re.findall(r"\$([a-z_]+)", target["expr"]))
            assert used <= {"namespace", "pod", "__rate_interval"}


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(e for _, e in grafana_queries())
    for needle in (
        "sum by (handler, code) (rate(kube_oidc_gate_http_requests_total",
        "sum by (handler, le) (rate(kube_oidc_gate_http_request_duration_seconds_bucket",
        "sum by (result, reason) (rate(kube_oidc_gate_authentications_total",
        'kube_oidc_gate_token_cache_requests_total{namespace="kube-oidc-gate", '
        'pod=~".*", outcome="hit"}',
        "max by (pod, issuer_hash) (kube_oidc_gate_jwks_last_success_timestamp_seconds",
        "sum by (code) (rate(kube_oidc_gate_upstream_requests_total",
        "sum by (outcome) (rate(kube_oidc_gate_new_token_waits_total",
    ):
        assert needle in exprs


def test_every_query_aggregates() -> None:
    """Each query names its labels (``by``), or sums everything: one series
    per pod and worker would say nothing the aggregate does not."""
    for where, expr in grafana_queries() + alert_queries():
        assert re.search(r"\b(sum|min|max|group)\b", expr), where


# --------------------------------------------------------------------------
# The kustomize component


#: From prometheus-operator's published CRDs (monitoring.coreos.com_*.yaml):
#: the types of the fields the component uses; any other field is refused.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS},
}
_NAMESPACES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchNames": {"type": "array", "items": _STR}},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": _STR,
        "path": _STR,
        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": {
            "type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
        "scrapeTimeout": {
            "type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS},
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": {"type": ["string", "integer"]},
        "for": {
            "type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}


def _kind(spec: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": _STR,
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": required,
                "properties": spec,
            },
        },
    }


MONITORING_SCHEMAS = {
    "ServiceMonitor": _kind(
        {
            "selector": _SELECTOR,
            "namespaceSelector": _NAMESPACES,
            "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
        },
        ["selector", "endpoints"],
    ),
    "PodMonitor": _kind(
        {
            "selector": _SELECTOR,
            "namespaceSelector": _NAMESPACES,
            "podMetricsEndpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
        },
        ["selector"],
    ),
    "PrometheusRule": _kind(
        {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _STR,
                        "rules": {"type": "array", "items": _RULE},
                    },
                },
            }
        },
        [],
    ),
}
MONITORING_KINDS = set(MONITORING_SCHEMAS)


def _with_component(copy: Path, overlay: str, *, podmonitor: bool = False) -> Path:
    wrapper = copy / "overlays" / f"{overlay}-monitoring"
    wrapper.mkdir()
    (wrapper / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - ../{overlay}\n"
        "components:\n  - ../../components/monitoring\n",
        encoding="utf-8",
    )
    if podmonitor:
        path = copy / "components" / "monitoring" / "kustomization.yaml"
        text = path.read_text(encoding="utf-8")
        swapped = text.replace(
            "  - service.yaml\n  - servicemonitor.yaml\n", "  - podmonitor.yaml\n"
        )
        assert swapped != text, "the component's resources list changed"
        path.write_text(swapped, encoding="utf-8")
    return wrapper


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[dict[str, Any]]]:
    """Both overlays with the component, and the PodMonitor variant."""
    out = {}
    for variant in ("proxy", "webhook", "proxy+podmonitor"):
        copy = tmp_path_factory.mktemp("deploy") / "deploy"
        shutil.copytree(DEPLOY, copy)
        overlay, _, alt = variant.partition("+")
        out[variant] = render(_with_component(copy, overlay, podmonitor=bool(alt)))
    return out


VARIANTS = ("proxy", "webhook", "proxy+podmonitor")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_component_objects_pass_their_schemas(
    monitored: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    kinds = set()
    for obj in monitored[variant]:
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            kinds.add(obj["kind"])
            jsonschema.validate(obj, MONITORING_SCHEMAS[obj["kind"]])
        elif obj["apiVersion"] in ("v1", "apps/v1", "policy/v1", "autoscaling/v2") or (
            obj["apiVersion"].startswith("rbac.")
        ):
            kubernetes_validate.validate(obj, "1.30", strict=True)
    expected = {"PrometheusRule"} | (
        {"PodMonitor"} if variant.endswith("podmonitor") else {"ServiceMonitor"}
    )
    assert kinds == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ServiceMonitor", ["spec", "endpoints", 0, "prot"], "probe"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "30 seconds"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], 5),
    ],
    ids=["unknown-field", "bad-duration", "for-as-number"],
)
def test_structural_check_catches_mistakes(
    monitored: dict[str, list[dict[str, Any]]],
    kind: str,
    path: list[str | int],
    value: object,
) -> None:
    obj = json.loads(json.dumps(one(monitored["proxy"], kind)))
    node: Any = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, MONITORING_SCHEMAS[kind])


def _probe_port(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    pod = one(objects, "Deployment")["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    (port,) = [p for p in c["ports"] if p["name"] == "probe"]
    (bind,) = [a for a in c["args"] if a.startswith("--probe-bind-address=")]
    assert bind.endswith(f":{port['containerPort']}")
    return pod["metadata"]["labels"], int(port["containerPort"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["proxy", "webhook"])
def test_service_monitor_reaches_the_probe_port(
    monitored: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = monitored[variant]
    pod_labels, probe = _probe_port(objects)
    monitor = one(objects, "ServiceMonitor")["spec"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    services = [
        s
        for s in find(objects, "Service")
        if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["kube-oidc-gate-metrics"]
    (service,) = services
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["targetPort"], port["port"]) == (
        endpoint["port"],
        "probe",
        probe,
    )
    assert monitor["namespaceSelector"]["matchNames"] == [NAMESPACE]
    # The public Service still has no probe port.
    public = one(objects, "Service", "kube-oidc-gate")
    assert all(p["name"] != "probe" for p in public["spec"]["ports"])


@pytest.mark.slow
def test_pod_monitor_alternative_reaches_the_probe_port(
    monitored: dict[str, list[dict[str, Any]]],
) -> None:
    objects = monitored["proxy+podmonitor"]
    pod_labels, _ = _probe_port(objects)
    monitor = one(objects, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("probe", "/metrics")
    assert not find(objects, "Service", "kube-oidc-gate-metrics")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_rules_and_dashboard_ship_as_they_are_tested(
    monitored: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = monitored[variant]
    assert one(objects, "PrometheusRule")["spec"] == rule_spec()
    config_map = one(objects, "ConfigMap", "kube-oidc-gate-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == dashboard()


# --------------------------------------------------------------------------
# The docs say what the rules do


def test_operations_lists_every_alert_as_the_rules_say() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    rows = {
        m[1]: (m[2], m[3])
        for m in re.finditer(
            r"^\| `(KubeOIDCGate\w+)` \| (\w+) \| (\w+) \|", text, re.MULTILINE
        )
    }
    assert rows == {
        r["alert"]: (r["labels"]["severity"], r["for"]) for r in alert_rules()
    }
    assert "deploy/components/monitoring" in text
    assert "kind: PodMonitor" in text
    # Metrics that do not exist yet get no rule, only a note (the reload
    # alert, once such a note, is KubeOIDCGateReloadFailed in the table).
    assert "revocation-watch alert" in text


# --------------------------------------------------------------------------
# A real Prometheus scraping the real service


@dataclass
class Prometheus:
    """A private ``prometheus`` on 127.0.0.1, with its config and data in ``home``."""

    home: Path
    targets: dict[str, int]
    rule_file: Path
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert PROMETHEUS is not None
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(self.rule_file)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{port}"],
                            "labels": {**TARGET_LABELS, "pod": pod},
                        }
                        for pod, port in self.targets.items()
                    ],
                }
            ],
        }
        path = self.home / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port = free_port()
        log = (self.home / "prometheus.log").open("wb")
        with log:
            self.popen = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={self.home / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )

    def log(self) -> str:
        return (self.home / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    async def get(self, s: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with s.get(self.url + path, params=params) as r:
            body = await r.json()
            assert r.status == 200, body
            assert body["status"] == "success", body
            return body["data"]

    async def ready(self, s: aiohttp.ClientSession, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            assert self.popen.poll() is None, f"prometheus exited:\n{self.log()}"
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout}s:\n{self.log()}")


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def proxy_args(
    issuer: FakeIssuer, upstream: Path, tmp_path: Path, port: int, probe: int
) -> list[str]:
    return [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--oidc-username-claim", "email",
        "--oidc-groups-claim", "groups",
        "--kubeconfig", str(upstream),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(port),
        "--probe-bind-address", f"127.0.0.1:{probe}",
        "--cert-dir", str(tmp_path / "proxy-certs"),
        "--shutdown-grace-period", "5",
        "--workers", "2",
    ]  # fmt: skip


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(timeout=15)


async def _counter(probe: int, name: str, **labels: str) -> float:
    """A counter's value on the service's own /metrics (not via Prometheus)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{probe}/metrics") as r,
    ):
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


class Driver:
    """Accepted and refused requests against the running webhook and proxy."""

    def __init__(self, issuer: FakeIssuer, tmp_path: Path) -> None:
        self.issuer = issuer
        self.webhook_ctx = client_ssl(tmp_path)
        self.proxy_ctx = ssl.create_default_context(
            cafile=str(tmp_path / "proxy-certs" / "kube-oidc-gate.crt")
        )
        self.forger = new_key(kid=issuer.keys[0].kid)
        self.good = issuer.token(groups=["naxslabs-admins"])
        self.user = issuer.token(
            email="alice@example.com", email_verified=True, groups=["naxslabs-admins"]
        )
        self.serial = 0

    def forged(self) -> str:
        """A new token with the issuer's kid and a signature that does not verify."""
        self.serial += 1
        return sign(self.forger, claims_for(self.issuer.url, jti=f"f-{self.serial}"))

    async def review(self, port: int, token: str) -> int:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.webhook_ctx, force_close=True)
            ) as s,
            s.post(
                f"https://127.0.0.1:{port}/authenticate", json=review_body(token)
            ) as r,
        ):
            await r.read()
            return r.status

    async def kube(
        self, port: int, token: str, path: str = "/api/v1/namespaces/default/pods"
    ) -> int:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.proxy_ctx, force_close=True)
            ) as s,
            s.get(
                f"https://127.0.0.1:{port}{path}",
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            await r.read()
            return r.status


async def drive_webhook(d: Driver, port: int, probe: int) -> None:
    other = sign(new_key(), claims_for("https://idp.other.example.test"))
    expired = d.issuer.token(lifetime=-600)
    for token in [d.good] * 10 + [expired] * 3 + [other] * 2:
        assert await d.review(port, token) == 200
    for _ in range(5):
        assert await d.review(port, d.forged()) == 200
    # New tokens wait their turn while cached users are served and most new
    # tokens are refused: send bursts of both until some waited.
    for _ in range(15):
        burst = [d.review(port, d.good) for _ in range(8)]
        burst += [d.review(port, d.forged()) for _ in range(40)]
        await asyncio.gather(*burst)
        if await _counter(
            probe, "kube_oidc_gate_new_token_waits_total", outcome="waited"
        ):
            break
    else:
        raise AssertionError("no new token waited for its turn")
    # Last (it leaves the key sets failing): the issuer is down when a token
    # with a new kid asks for a refetch, which fails.
    d.issuer.go_down()
    try:
        rotated = new_key()
        for _ in range(4):
            token = sign(rotated, claims_for(d.issuer.url, jti=f"r-{d.serial}"))
            d.serial += 1
            assert await d.review(port, token) in (200, 503)
    finally:
        d.issuer.come_up()
    assert await _counter(probe, "kube_oidc_gate_jwks_fetches_total", result="error")


async def drive_proxy(d: Driver, port: int, apiserver: FakeAPIServer) -> None:
    for _ in range(10):
        assert await d.kube(port, d.user) == 200
    for token in (d.forged(), d.forged(), "not-a-jwt"):
        assert await d.kube(port, token) == 401
    # A watch held open over a few scrapes: an in-flight stream.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=d.proxy_ctx)) as s,
        s.get(
            f"https://127.0.0.1:{port}/api/v1/namespaces/default/pods?watch=1",
            headers={"Authorization": f"Bearer {d.user}"},
        ) as watch,
    ):
        assert watch.status == 200
        await asyncio.sleep(3)
    # The API server goes away: the proxy's upstream errors.
    await apiserver.stop()
    for _ in range(5):
        assert await d.kube(port, d.user) in (502, 503, 504)


@pytest.mark.slow
@needs_prometheus
async def test_prometheus_evaluates_every_query_and_alert(
    issuer: FakeIssuer, apiserver: FakeAPIServer, tmp_path: Path
) -> None:
    webhook_port, webhook_probe = free_port(), free_port()
    proxy_port, proxy_probe = free_port(), free_port()
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.yaml", apiserver.url, apiserver.ca_pem
    )
    home = tmp_path / "prometheus"
    home.mkdir()
    prom = Prometheus(
        home,
        {
            "kube-oidc-gate-webhook-0": webhook_probe,
            "kube-oidc-gate-proxy-0": proxy_probe,
        },
        write_rule_file(home),
    )
    with (
        Proc(
            *webhook_args(
                issuer,
                tmp_path,
                webhook_port,
                "--workers",
                "2",
                probe_port=webhook_probe,
            )
        ) as webhook,
        Proc(*proxy_args(issuer, upstream, tmp_path, proxy_port, proxy_probe)) as proxy,
        running(webhook, proxy),
    ):
        prom.start()
        try:
            async with aiohttp.ClientSession() as s:
                await prom.ready(s, timeout=30)
                for proc in (webhook, proxy):
                    await proc.await_log("serving", count=2, timeout=30)
                d = Driver(issuer, tmp_path)
                await drive_webhook(d, webhook_port, webhook_probe)
                await drive_proxy(d, proxy_port, apiserver)
                await check_queries(prom, s)
        finally:
            prom.stop()


async def check_queries(prom: Prometheus, s: aiohttp.ClientSession) -> None:
    queries = grafana_queries() + alert_queries()
    assert len(queries) >= 20
    results: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for where, expr in queries:
            if not results.get(where):
                results[where] = (await prom.get(s, "/api/v1/query", query=expr))[
                    "result"
                ]
        if all(results.values()):
            break
        await asyncio.sleep(0.5)
    empty = [f"{w}: {e}" for w, e in queries if not results[w]]
    assert not empty, "queries without data:\n" + "\n".join(empty)

    scraped = set(
        await prom.get(
            s, "/api/v1/label/__name__/values", **{"match[]": f'{{job="{JOB}"}}'}
        )
    )
    labels = set(
        await prom.get(
            s, "/api/v1/labels", **{"match[]": '{__name__=~"kube_oidc_gate_.+"}'}
        )
    )
    for where, expr in queries:
        assert metric_names(expr) <= scraped, f"{where}: {metric_names(expr) - scraped}"
        assert label_names(expr) <= labels, f"{where}: {label_names(expr) - labels}"
        want = result_labels(expr)
        for series in results[where]:
            assert set(series["metric"]) == want, f"{where}: {series['metric']}"
    # Each whole alert expression evaluates (no matching errors), and so do
    # the rules Prometheus itself loaded.
    for rule in alert_rules():
        await prom.get(s, "/api/v1/query", query=rule["expr"])
    groups = (await prom.get(s, "/api/v1/rules"))["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    deadline = time.monotonic() + 10
    while any(r["health"] == "unknown" for r in loaded.values()):
        assert time.monotonic() < deadline, "rules never evaluated"
        await asyncio.sleep(0.5)
        groups = (await prom.get(s, "/api/v1/rules"))["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
    bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    assert not bad, bad
