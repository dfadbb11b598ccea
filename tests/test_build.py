"""Which build the suite runs: plain Python, or the mypyc-compiled wheel.

``make check`` runs the whole suite twice: on the sources (an editable
install) and in ``build/compiled`` on the wheel the image ships, with
``KUBE_OIDC_GATE_EXPECT_COMPILED=1``. Without these checks a path mistake
would silently run the sources twice, in this process or in the service
processes the tests start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import proxy
from proxy import tokens

EXPECT_COMPILED = os.environ.get("KUBE_OIDC_GATE_EXPECT_COMPILED") == "1"


def test_this_process_runs_the_expected_build() -> None:
    assert proxy.COMPILED is EXPECT_COMPILED
    assert tokens.__file__ is not None
    assert tokens.__file__.endswith(".so") is EXPECT_COMPILED


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
