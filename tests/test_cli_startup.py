"""Start-up failures of the real command: one ``error:`` line (or one list), exit 2.

The command runs as a subprocess (``python -m proxy``), bounded in time; what
may fork workers runs in its own process group and is killed by PID on a
timeout (``tests.proc``). Ports in use are real listeners on 127.0.0.1, and
nothing reaches a network beyond loopback. The last case calls ``serve``
in-process, for a port taken between the start-up check and a worker's bind.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml
from aiohttp import web

from proxy.app import ServeSettings, listen_problems, serve
from proxy.errors import ConfigError
from proxy.http1 import Limits, Server
from proxy.kube import status_body
from tests.fakes.issuer import FakeIssuer
from tests.proc import ROOT, Proc
from tests.test_cli_webhook import free_port

#: An issuer nobody contacts: every case here stops before the engine starts.
ISSUER = ["--oidc-issuer-url", "https://idp.example.test/oauth2/default",
          "--oidc-client-id", "kubernetes"]  # fmt: skip

#: The address of the secure listener in every case.
HOST = "127.0.0.1"


def kubeconfig(path: Path, user: dict[str, str] | None = None) -> Path:
    """A usable proxy kubeconfig for an API server that is never called here."""
    ca = trustme.CA()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://127.0.0.1:1",
                    "certificate-authority-data": base64.b64encode(
                        ca.cert_pem.bytes()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user or {"token": "proxy-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def serve_args(
    mode: str, tmp_path: Path, *, port: int, probe_port: int, workers: int = 1
) -> list[str]:
    args = [
        mode, *ISSUER,
        "--bind-address", HOST,
        "--secure-port", str(port),
        "--probe-bind-address", f"{HOST}:{probe_port}",
        "--cert-dir", str(tmp_path / "certs"),
        "--workers", str(workers),
    ]  # fmt: skip
    if mode == "proxy":
        args += ["--kubeconfig", str(kubeconfig(tmp_path / "upstream.yaml"))]
    return args


def run_to_exit(*args: str) -> tuple[int, list[str]]:
    """The exit code and stderr lines of a start expected to stop by itself
    (within a minute; else its whole process group is killed)."""
    with Proc(*args) as proc:
        try:
            code = proc.popen.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running: " + "".join(proc.stderr)) from None
    # Leaving the block joined the threads that collect the output.
    return code, "".join(proc.stderr).splitlines()


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A real listener on a loopback port, as another program would hold it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield sock


# --------------------------------------------------------------------------
# Port in use


PORT_CASES = [
    (mode, listener, workers)
    for mode in ("webhook", "proxy")
    for listener in ("secure", "probe")
    for workers in (1, 2)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "listener", "workers"),
    PORT_CASES,
    ids=[f"{m}-{lst}-port-{w}-worker{'s' * (w > 1)}" for m, lst, w in PORT_CASES],
)
def test_a_port_in_use_is_one_line_naming_the_address_and_flag(
    taken: socket.socket, tmp_path: Path, mode: str, listener: str, workers: int
) -> None:
    port = taken.getsockname()[1]
    secure, probe = (port, free_port()) if listener == "secure" else (free_port(), port)
    args = serve_args(mode, tmp_path, port=secure, probe_port=probe, workers=workers)
    code, lines = run_to_exit(*args)
    flags, change = (
        ("--bind-address/--secure-port", "--secure-port")
        if listener == "secure"
        else ("--probe-bind-address", "--probe-bind-address")
    )
    assert code == 2
    assert lines == [
        f"error: listen: {HOST}:{port} ({flags}) is already in use: stop what "
        f"listens there, or choose another port with {change}"
    ]


@pytest.mark.slow
def test_a_port_held_by_another_gates_workers_is_not_shared(tmp_path: Path) -> None:
    """Workers bind with SO_REUSEPORT, which would let a second gate join the
    first one's port without a word; the start-up check refuses it."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = serve_args(
            "webhook", tmp_path, port=port, probe_port=free_port(), workers=2
        )
        code, lines = run_to_exit(*args)
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"error: listen: {HOST}:{port} (--bind-address/")


@pytest.mark.slow
def test_the_secure_and_probe_listeners_cannot_share_a_port(tmp_path: Path) -> None:
    port = free_port()
    args = serve_args("webhook", tmp_path, port=port, probe_port=port)
    code, lines = run_to_exit(*args)
    assert code == 2
    assert lines == [
        f"error: config: --secure-port {port} and --probe-bind-address "
        f"{HOST}:{port} name the same port: give the probes a port of their own"
    ]


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_reported_once_by_the_parent(
    tmp_path: Path,
) -> None:
    """What only a worker can find (here: a kubeconfig that exists but does not
    load) reaches the operator as one line and exit 2, not a silent exit 1."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    args = serve_args("proxy", tmp_path, port=0, probe_port=0, workers=2)
    args[args.index("--kubeconfig") + 1] = str(broken)
    code, lines = run_to_exit(*args)
    errors = [line for line in lines if not line.startswith("{")]
    assert code == 2
    assert errors == [
        f"error: upstream: {broken}: Invalid kube-config file. Expected key "
        f"current-context in {broken}"
    ], lines


# --------------------------------------------------------------------------
# Configuration errors: which flag, which file, what to do


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else dict(os.environ),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.splitlines()


def _outside_a_pod() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.pop("KUBERNETES_SERVICE_PORT", None)
    return env


UNQUOTED_PREFIX = textwrap.dedent(
    """\
    apiVersion: apiserver.config.k8s.io/v1
    kind: AuthenticationConfiguration
    jwt:
    - issuer:
        url: https://example.okta.com/oauth2/default
        audiences: [kubernetes]
      claimMappings:
        username:
          claim: sub
          prefix: okta:
    """
)


def _case_args(case: str, tmp_path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The command line (and environment) of one ``CONFIG_CASES`` row."""
    ports = ["--bind-address", HOST, "--secure-port", "0",
             "--probe-bind-address", f"{HOST}:0", "--cert-dir", str(tmp_path / "c")]  # fmt: skip
    ca = trustme.CA()
    pem = tmp_path / "pem"
    pem.write_bytes(ca.cert_pem.bytes())
    missing = str(tmp_path / "missing")
    upstream = ["--kubeconfig", str(kubeconfig(tmp_path / "kc.yaml"))]
    if case == "kubeconfig-missing":
        return ["proxy", *ISSUER, *ports, "--kubeconfig", missing], None
    if case == "no-kubeconfig-outside-a-pod":
        return ["proxy", *ISSUER, *ports], _outside_a_pod()
    if case == "tls-cert-missing":
        tls = ["--tls-cert-file", missing, "--tls-private-key-file", str(pem)]
        return ["webhook", *ISSUER, *ports, *tls], None
    if case == "tls-key-missing":
        tls = ["--tls-cert-file", str(pem), "--tls-private-key-file", missing]
        return ["proxy", *ISSUER, *ports, *upstream, *tls], None
    if case == "tls-key-not-given":
        return ["webhook", *ISSUER, *ports, "--tls-cert-file", str(pem)], None
    if case == "client-ca-missing":
        return ["webhook", *ISSUER, *ports, "--client-ca-file", missing], None
    if case == "oidc-ca-missing":
        return ["webhook", *ISSUER, *ports, "--oidc-ca-file", missing], None
    assert case == "unquoted-prefix"
    config = tmp_path / "authn.yaml"
    config.write_text(UNQUOTED_PREFIX)
    return ["webhook", "--authentication-config", str(config), *ports], None


#: (case, needles the one line holds, in order)
CONFIG_CASES: list[tuple[str, list[str]]] = [
    (
        "kubeconfig-missing",
        ['error: upstream: --kubeconfig "{missing}": no such file; give the '
         "kubeconfig with the proxy's own credential", "leave --kubeconfig out in a "
         "pod to use its service account"],
    ),
    (
        "no-kubeconfig-outside-a-pod",
        ["error: upstream: no --kubeconfig, and not in a pod", "give --kubeconfig",
         "in a pod the mounted service-account token is used"],
    ),
    (
        "tls-cert-missing",
        ['error: config: --tls-cert-file "{missing}": no such file; give the PEM '
         "certificate", "leave out both --tls-cert-file and --tls-private-key-file "
         "to serve a self-signed certificate, generated in --cert-dir"],
    ),
    (
        "tls-key-missing",
        ['error: config: --tls-private-key-file "{missing}": no such file',
         "self-signed certificate"],
    ),
    (
        "tls-key-not-given",
        ["error: config: --tls-cert-file and --tls-private-key-file must be given "
         "together: --tls-cert-file is given, --tls-private-key-file is missing",
         "leave out both"],
    ),
    (
        "client-ca-missing",
        ['error: config: --client-ca-file "{missing}": no such file',
         "leave --client-ca-file out to answer clients without one"],
    ),
    (
        "oidc-ca-missing",
        ['error: config: --oidc-ca-file "{missing}": no such file',
         "leave --oidc-ca-file out to trust the system's CAs"],
    ),
    (
        "unquoted-prefix",
        ["error: config: {tmp}/authn.yaml: not valid YAML or JSON: mapping values "
         "are not allowed here", 'quote a value that ends in ":"',
         'prefix: "okta:"'],
    ),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "needles"), CONFIG_CASES, ids=[c for c, _ in CONFIG_CASES]
)
def test_a_configuration_error_names_the_flag_and_what_to_do(
    tmp_path: Path, case: str, needles: list[str]
) -> None:
    args, env = _case_args(case, tmp_path)
    code, lines = run_cli(*args, env=env)
    assert code == 2
    assert len(lines) == 1, lines
    at = 0
    for needle in needles:
        text = needle.format(missing=tmp_path / "missing", tmp=tmp_path)
        found = lines[0].find(text, at)
        assert found >= 0, f"{text!r} not in {lines[0]!r}"
        at = found + len(text)


@pytest.mark.slow
def test_a_missing_client_id_does_not_hide_the_other_problems(tmp_path: Path) -> None:
    code, lines = run_cli(
        "proxy",
        "--oidc-issuer-url", "http://idp.example.test",
        "--oidc-groups-prefix", "okta:",
        "--kubeconfig", str(tmp_path / "missing"),
        "--tls-cert-file", str(tmp_path / "tls.crt"),
        "--tls-private-key-file", str(tmp_path / "tls.key"),
        "--secure-port", "70000",
    )  # fmt: skip
    assert code == 2
    assert lines[0] == "error: 7 problems:"
    listed = "\n".join(lines[1:])
    for needle in (
        "--oidc-client-id is missing",
        '--oidc-issuer-url: "http://idp.example.test": URL scheme must be https',
        "--oidc-groups-prefix needs --oidc-groups-claim",
        "--secure-port must be 0-65535, got 70000",
        "--tls-cert-file",
        "--tls-private-key-file",
        "upstream: --kubeconfig",
    ):
        assert needle in listed, needle
    assert all(line.startswith("  - ") for line in lines[1:])


# --------------------------------------------------------------------------
# An upstream credential far more powerful than impersonation needs


@pytest.mark.slow
async def test_a_system_masters_certificate_is_warned_about_at_start(
    issuer: FakeIssuer, tmp_path: Path
) -> None:
    client = trustme.CA().issue_cert(
        "kubernetes-admin",
        common_name="kubernetes-admin",
        organization_name="system:masters",
    )
    user = {
        "client-certificate-data": base64.b64encode(
            client.cert_chain_pems[0].bytes()
        ).decode(),
        "client-key-data": base64.b64encode(client.private_key_pem.bytes()).decode(),
    }
    upstream = kubeconfig(tmp_path / "admin.conf", user)
    args = [
        "proxy",
        "--oidc-issuer-url", issuer.url,
        "--oidc-client-id", "kubernetes",
        "--kubeconfig", str(upstream),
        "--bind-address", HOST,
        "--secure-port", "0",
        "--probe-bind-address", f"{HOST}:0",
        "--cert-dir", str(tmp_path / "certs"),
    ]  # fmt: skip
    with Proc(*args) as proc:
        (warning,) = await proc.await_log(
            "upstream credential is far more powerful than impersonation needs",
            timeout=30,
        )
        await proc.await_log("serving", timeout=30)
        assert proc.stop() == 0
    assert warning["level"] == "warning"
    assert warning["groups"] == ["system:masters"]
    assert "deploy/overlays/proxy/rbac.yaml" in warning["hint"]
    assert "bypasses RBAC" in warning["risk"]


# --------------------------------------------------------------------------
# The same line when a port is taken after the check (between the check and a
# worker's bind): ``serve`` itself, in-process.


@pytest.mark.parametrize("listener", ["secure", "probe"])
async def test_serve_reports_a_taken_port_as_the_check_does(
    taken: socket.socket, listener: str
) -> None:
    port = taken.getsockname()[1]
    free = free_port()
    settings = ServeSettings(
        bind_address=HOST,
        secure_port=port if listener == "secure" else free,
        probe_host=HOST,
        probe_port=port if listener == "probe" else free,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert(HOST).configure_cert(ctx)
    front = Server({}, limits=Limits(), error_body=status_body)
    with pytest.raises(ConfigError) as raised:
        await serve(front, web.Application(), settings, ctx)
    (problem,) = raised.value.problems
    assert problem == listen_problems(settings)[0]
    assert problem.startswith(f"listen: {HOST}:{port} (")
    change = "--secure-port" if listener == "secure" else "--probe-bind-address"
    assert problem.endswith(f"or choose another port with {change}")


def test_the_cli_imports_no_prometheus_client_before_it_reads_workers() -> None:
    """prometheus_client reads PROMETHEUS_MULTIPROC_DIR once, at its first
    import; the CLI sets it for --workers N, so nothing may import it sooner
    (issue 26: no patching the library's value class afterwards)."""
    code = "import sys, proxy.cli; print('prometheus_client' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == "False"
