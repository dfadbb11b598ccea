"""The container image: the Dockerfile's promises, and its steps replayed in a venv.

No container engine can build the image on the machines CI runs on (there is
no Docker daemon, and a daemonless builder cannot pull ``python:3.11-slim``
because only the package registries are reachable), so this module checks
the Dockerfile as text and then replays what it does with the same tools:

- the build context the ``.dockerignore`` lets through holds everything the
  wheel needs and nothing else (no tests, no deploy files, no venv);
- from exactly that context, the build stage's two commands run as written,
  with its environment: ``pip wheel --no-deps`` builds the project's wheel
  with the hot path compiled by mypyc (``HATCH_BUILD_HOOKS_ENABLE=1``), ``pip
  wheel --only-binary=:all:`` puts a binary wheel of every dependency beside
  it (none compiled); then the runtime stage's: a fresh virtual environment installs
  the project's wheel from that directory alone (``--no-index``), ``pip check``
  passes, pip is removed, and the installed ``kube-oidc-gate`` starts
  (``--help``, each mode's ``--help``, ``--version``) from outside the source
  tree, so it runs the installed copy.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from proxy import __version__

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
#: Files that must reach the build stage for ``pip wheel .`` to work.
WHEEL_INPUTS = ("pyproject.toml", "README.md")
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.licenses",
)
#: Bound on every command the slow test runs (pip may fetch from the index).
#: The wheel build compiles the request path with mypyc and gcc: about a minute
#: on an idle machine, and past 300 s on a loaded 2-core CI machine, where it
#: once failed for no other reason. A hang still ends the test.
COMMAND_TIMEOUT = 900


# --------------------------------------------------------------------------
# A small Dockerfile reader: instructions per stage, continuations joined.


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments inside a continuation are dropped, as Docker does
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ``${ARG}`` in FROM resolved."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(
                r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), ""), words[0]
            )
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before FROM, got {keyword}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def _key_values(args: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs of an ENV/LABEL/ARG line (values may be quoted)."""
    out: dict[str, str] = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    return parsed[1][-1]


def test_two_stages_on_python_311_slim(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    assert len(stages) == 2
    build, runtime = stages
    assert build.name == "build"
    # The build stage needs a C compiler (the slim image has none); the wheel
    # it compiles only fits the same Python version.
    assert build.base == "python:3.11"
    assert runtime.base == "python:3.11-slim"
    assert runtime.name is None


def test_build_stage_builds_the_wheel_from_the_project_only(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    build = dockerfile[1][0]
    sources = [shlex.split(c)[:-1] for c in build.all("COPY")]
    copied = {s for srcs in sources for s in srcs}
    assert copied == {*WHEEL_INPUTS, "proxy"}
    runs = " ".join(build.all("RUN"))
    assert re.search(r"pip wheel --no-deps --wheel-dir /wheels \.", runs)
    assert (
        _key_values(" ".join(build.all("ENV"))).get("HATCH_BUILD_HOOKS_ENABLE") == "1"
    )
    # Dependencies as binary wheels only: none of them is compiled here.
    assert "--only-binary=:all:" in runs


def test_runtime_stage_installs_only_the_built_wheel(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    runtime = final_stage(dockerfile)
    # Nothing from the build context reaches the final image: no COPY/ADD at
    # all; the wheels come through a bind mount of the build stage.
    assert runtime.all("COPY") == []
    assert runtime.all("ADD") == []
    (install,) = [r for r in runtime.all("RUN") if "pip install" in r]
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    assert "--no-index" in install
    assert "--find-links=/wheels" in install
    assert re.search(r"/wheels/kube_oidc_gate-\*\.whl", install)
    assert "pip uninstall --yes pip setuptools wheel" in install
    env = _key_values(" ".join(runtime.all("ENV")))
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    assert runtime.all("HEALTHCHECK") == []  # Kubernetes probes are used instead


def test_runs_as_a_numeric_non_root_user(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    (user,) = final_stage(dockerfile).all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # The manifests run the pod as the same user.
    deployment = yaml.safe_load(
        (REPO / "deploy/base/deployment.yaml").read_text(encoding="utf-8")
    )
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsUser"] == int(uid)
    if gid:
        assert pod["runAsGroup"] == int(gid)


def test_entrypoint_is_the_console_script(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    (entrypoint,) = final_stage(dockerfile).all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kube-oidc-gate"]  # exec form
    assert "kube-oidc-gate" in PYPROJECT["project"]["scripts"]


def test_oci_labels_and_version(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    runtime = final_stage(dockerfile)
    labels = _key_values(" ".join(runtime.all("LABEL")))
    assert set(OCI_LABELS) <= set(labels)
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert (
        labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    )
    args = _key_values(" ".join(runtime.all("ARG")))
    assert args["VERSION"] == __version__


# --------------------------------------------------------------------------
# The build context


def _ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        if any(_match(pattern, p) for p in prefixes):
            ignored = not negated
    return ignored


def _match(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        return any(
            fnmatch.fnmatchcase("/".join(path.split("/")[i:]), rest)
            for i in range(len(path.split("/")))
        )
    return fnmatch.fnmatchcase(path, pattern)


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        out.append((negated, line.lstrip("!").strip("/")))
    return out


def build_context() -> list[str]:
    """Paths (relative, POSIX) a builder would send, per ``.dockerignore``."""
    patterns = dockerignore_patterns()
    reincluded = [p for negated, p in patterns if negated]
    files: list[str] = []
    for root, dirs, names in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        # Skip a directory only if it is ignored and nothing re-includes below it.
        dirs[:] = [
            d
            for d in dirs
            if not _ignored(rel_root + d, patterns)
            or any(p.startswith(rel_root + d + "/") for p in reincluded)
        ]
        files.extend(
            rel_root + n for n in names if not _ignored(rel_root + n, patterns)
        )
    return sorted(files)


def test_build_context_is_only_what_the_wheel_needs() -> None:
    context = build_context()
    package = sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / "proxy").rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix not in (".pyc", ".so")
    )
    assert context == sorted([*WHEEL_INPUTS, *package])


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("tests/test_image.py", True),
        ("deploy/base/deployment.yaml", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("proxy/__pycache__/cli.cpython-311.pyc", True),
        ("proxy/cli.py", False),
        ("proxy/py.typed", False),
        ("pyproject.toml", False),
    ],
    ids=str,
)
def test_dockerignore_matcher(path: str, ignored: bool) -> None:
    assert _ignored(path, dockerignore_patterns()) is ignored


# --------------------------------------------------------------------------
# The image's steps, replayed


def _run(args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def build_stage_command(parsed: tuple[dict[str, str], list[Stage]]) -> str:
    """The build stage's ``RUN`` that makes the wheels, as written."""
    (command,) = [r for r in parsed[1][0].all("RUN") if "pip wheel" in r]
    return command


def build_stage_env(parsed: tuple[dict[str, str], list[Stage]]) -> dict[str, str]:
    """The build stage's ``ENV``."""
    return _key_values(" ".join(parsed[1][0].all("ENV")))


def clean_environment() -> dict[str, str]:
    """This process's environment minus whatever points at the project's venv
    or sources, so a command sees only what it is given.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        and not k.startswith(("PIP_", "MYPY", "HATCH_"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin
    )
    return env


@pytest.mark.slow
def test_wheel_from_the_build_context_installs_and_starts(
    tmp_path: Path, dockerfile: tuple[dict[str, str], list[Stage]]
) -> None:
    """The build stage replayed as a builder runs it: a Python of its own with
    nothing but pip (no stubs, no mypy, no hatch: the project's venv is out of
    sight), the context ``.dockerignore`` sends at ``/src``, the stage's
    ``ENV``, and its ``RUN`` line word for word (``/wheels`` moved under
    ``tmp_path``). Until issue 18 this failed: mypyc's strict check had no
    PyYAML stubs in pip's isolated build environment.
    """
    env = clean_environment()
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # The builder's Python: a fresh venv with pip alone, whose `python` comes
    # first on PATH as the image's does.
    builder = tmp_path / "builder"
    venv.EnvBuilder(with_pip=True, clear=True).create(builder)
    listed = _run(
        [str(builder / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        cwd=tmp_path,
        env=env,
    )
    assert {p["name"].lower() for p in json.loads(listed)} <= {"pip", "setuptools"}

    context = tmp_path / "src"
    for rel in build_context():
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    wheels = tmp_path / "wheels"
    command = build_stage_command(dockerfile).replace("/wheels", str(wheels))
    stage_env = {
        **env,
        **build_stage_env(dockerfile),
        "PATH": f"{builder / 'bin'}{os.pathsep}{env['PATH']}",
    }
    _run(["bash", "-euc", command], cwd=context, env=stage_env)

    (wheel,) = wheels.glob("kube_oidc_gate-*.whl")
    assert wheel.name.startswith(f"kube_oidc_gate-{__version__}-cp311-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "proxy/py.typed" in names  # package data beside the modules
    compiled = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"][
        "mypyc"
    ]["include"]
    for module in compiled:
        stem = Path(module).stem
        assert [n for n in names if re.fullmatch(rf"proxy/{stem}\..*\.so", n)], stem
    assert not [n for n in names if n.startswith("tests/")]
    # The stage's second command put every dependency beside it.
    assert any(w.name.startswith("aiohttp-") for w in wheels.glob("*.whl"))

    # Runtime stage: a clean environment, only those wheels, no index; then
    # pip goes, and the command must still start.
    venv.EnvBuilder(with_pip=True, clear=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    python = str(bin_dir / "python")
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-index",
            f"--find-links={wheels}",
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
    )
    _run([python, "-m", "pip", "check"], cwd=tmp_path, env=env)
    _run(
        [python, "-m", "pip", "uninstall", "--yes", "pip", "setuptools", "wheel"],
        cwd=tmp_path,
        env=env,
    )
    assert not (bin_dir / "pip").exists()

    cli = str(bin_dir / "kube-oidc-gate")
    assert "webhook" in _run([cli, "--help"], cwd=tmp_path, env=env)
    assert "--authentication-config" in _run(
        [cli, "webhook", "--help"], cwd=tmp_path, env=env
    )
    assert "--secure-port" in _run([cli, "proxy", "--help"], cwd=tmp_path, env=env)
    version = _run([cli, "--version"], cwd=tmp_path, env=env)
    assert version.strip() == f"kube-oidc-gate {__version__} (compiled: yes)"
    where = _run(
        [python, "-c", "import proxy; print(proxy.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")
