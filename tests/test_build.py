"""Which build the suite runs: plain Python, or the mypyc-compiled wheel.

``make check`` runs the whole suite twice: on the sources (an editable
install) and in ``build/compiled`` on the wheel the image ships, with
``KUBE_OIDC_GATE_EXPECT_COMPILED=1``. Without these checks a path mistake
would silently run the sources twice, in this process or in the service
processes the tests start.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import proxy
from proxy import tokens

EXPECT_COMPILED = os.environ.get("KUBE_OIDC_GATE_EXPECT_COMPILED") == "1"
REPO = Path(__file__).resolve().parent.parent


def test_this_process_runs_the_expected_build() -> None:
    assert proxy.COMPILED is EXPECT_COMPILED
    assert tokens.__file__ is not None
    assert tokens.__file__.endswith(".so") is EXPECT_COMPILED


@pytest.mark.slow
def test_a_started_service_process_runs_the_same_build(tmp_path: Path) -> None:
    # From a directory outside the tree, as the tests start the service.
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    want = "yes" if EXPECT_COMPILED else "no"
    assert done.stdout.strip() == (
        f"kube-oidc-gate {proxy.__version__} (compiled: {want})"
    )


def _compiled_modules() -> list[Path]:
    """The modules pyproject.toml's mypyc hook compiles."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    hook = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [REPO / pattern.lstrip("/") for pattern in hook["include"]]


def _except_names_of_several_types(source: str) -> list[str]:
    """``function: name`` wherever one name is bound by ``except`` clauses of
    different exception types within one function.

    mypy accepts that; mypyc gives a variable one type per function, the
    first clause's, and the second clause then raises ``TypeError`` instead
    of handling its exception (seen: ``except _Lost as err`` ... ``except
    _Malformed as err`` refused every malformed answer).
    """
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.ExceptHandler) and node.name:
                kind = ast.unparse(node.type) if node.type else "BaseException"
                types.setdefault(node.name, set()).add(kind)
        found += [f"{fn.name}: {name}" for name, t in types.items() if len(t) > 1]
    return found


@pytest.mark.slow
def test_compiled_modules_never_rebind_an_except_name_to_another_type() -> None:
    modules = _compiled_modules()
    assert len(modules) >= 10
    problems = {
        m.name: bad
        for m in modules
        if (bad := _except_names_of_several_types(m.read_text(encoding="utf-8")))
    }
    assert problems == {}


def test_the_except_name_check_finds_the_pattern() -> None:
    source = (
        "def f():\n"
        "    try:\n        pass\n"
        "    except KeyError as err:\n        raise\n"
        "    except OSError as err:\n        raise\n"
        "def g():\n"
        "    try:\n        pass\n"
        "    except (KeyError, OSError) as err:\n        raise\n"
    )
    assert _except_names_of_several_types(source) == ["f: err"]
