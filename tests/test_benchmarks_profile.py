"""``benchmarks.profile``'s summaries: py-spy's collapsed stacks and perf's samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.profile import _perf_name, summarize, summarize_perf

_SO = "/w/build/compiled/1a29__mypyc.cpython-311-x86_64-linux-gnu.so"
_PY = "/p/lib/libpython3.11.so.1.0"


def _sample(*frames: tuple[str, str]) -> str:
    head = "kube-oidc-gate 29425 24061.932771:    2004008 cpu-clock:pppH: \n"
    return head + "".join(
        f"\t          1122d8 {sym}+0x7c ({lib})\n" for sym, lib in frames
    )


@pytest.mark.parametrize(
    ("symbol", "name"),
    [
        ("CPyDef_tokens___peek", "tokens.peek"),
        ("CPyPy_requestlog___RequestLog___info", "requestlog.RequestLog.info"),
        (
            "CPyDef_relay___forward_Relay_gen_____mypyc_generator_helper__",
            "relay.Relay.forward",
        ),
        (
            "CPyDef_impersonate____serve__ProxyHandler_gen_____mypyc_generator_helper__",
            "impersonate._ProxyHandler._serve",
        ),
        (
            "CPyDef_upstream_pool____send_ConnectionPool_gen_____mypyc_generator_helper__",
            "upstream_pool.ConnectionPool._send",
        ),
        ("CPyDef_tokens___verify_gen_____mypyc_generator_helper__", "tokens.verify"),
        ("PyObject_Vectorcall", "PyObject_Vectorcall"),
        ("CPyDef_", "CPyDef_"),
    ],
)
def test_compiled_symbols_read_as_python_names(symbol: str, name: str) -> None:
    assert _perf_name(symbol) == name


def test_perf_summary_counts_libraries_and_compiled_callers() -> None:
    rsa = _sample(
        ("bn_sqrx8x_internal", "/x/_rust.abi3.so"),
        ("CPyDef_tokens____signature_ok", _SO),
        ("CPyDef_tokens___verify_gen_____mypyc_generator_helper__", _SO),
    )
    inlined = _sample(
        ("_PyEval_EvalFrame", "inlined"),
        ("_PyEval_Vector", _PY),
        ("CPyDef_tokens___peek", _SO),
        ("CPyDef_tokens___peek", _SO),  # recursion counts once
    )
    kernel = _sample(
        ("tcp_sendmsg", "[kernel.kallsyms]"), ("do_softirq.part.0", "[kernel.kallsyms]")
    )
    text = summarize_perf("\n".join([rsa, inlined, kernel, kernel]))
    assert text.startswith("samples: 4\n")
    libraries = text.split("self, by library:\n")[1].split("\n\n")[0]
    assert libraries.splitlines() == [
        "   50.0%  [kernel.kallsyms]",
        "   25.0%  _rust.abi3.so",
        "   25.0%  libpython3.11.so.1.0",  # the inlined frame's own library
    ]
    functions = text.split("inclusive, by compiled function:\n")[1]
    assert "   25.0%  tokens.peek" in functions.splitlines()
    assert "   25.0%  tokens.verify" in functions.splitlines()
    assert "   25.0%  tokens._signature_ok" in functions.splitlines()
    # Only compiled functions are listed, not a kernel symbol with a dot.
    assert "tcp_sendmsg" not in functions
    assert "softirq" not in functions
    assert summarize_perf("") == "no samples\n"


def test_py_spy_summary(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "main (a/cli.py:1);serve (proxy/app.py:9) 3\n"
        "main (a/cli.py:1);peek (proxy/tokens.py:4) 1\n"
    )
    text = summarize(raw)
    assert text.startswith("samples: 4\n")
    assert "   75.0%  serve (proxy/app.py)" in text
    assert "  100.0%  main (a/cli.py)" in text
