"""The ``sets`` library of the Kubernetes CEL environment, for cel-expr-python.

kube-apiserver's CEL environment includes cel-go's ``ext.Sets()``; the CEL
runtime for Python ships no such library, so this module declares it with the
runtime's documented extension API (``cel.CelExtension``) and implements it in
Python, with cel-go's overload names and meaning:

- ``sets.contains(list(T), list(T)) -> bool``: every element of the second list
  is in the first (true when the second is empty);
- ``sets.equivalent(list(T), list(T)) -> bool``: each list contains the other
  (duplicates and order do not matter);
- ``sets.intersects(list(T), list(T)) -> bool``: some element is in both.

Membership uses CEL equality, not Python's: ``1 == 1.0`` holds, ``true == 1``
does not, and lists and maps compare element by element. The runtime hands the
arguments over as plain Python values and checks ``T`` when it compiles, so
``sets.contains([1], ["a"])`` is refused at load time, as in cel-go.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from cel_expr_python import cel

__all__ = ["cel_equal", "extension"]

_NUMBER = (int, float)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _NUMBER):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, dt.datetime):
        return "timestamp"
    if isinstance(value, dt.timedelta):
        return "duration"
    return type(value).__name__


def cel_equal(left: object, right: object) -> bool:
    """CEL's heterogeneous equality over plain Python values.

    Numbers compare by value across int, uint and double (NaN equals nothing);
    values of different kinds are unequal; lists and maps compare element-wise.
    """
    kind = _kind(left)
    if kind != _kind(right):
        return False
    if kind == "list":
        a, b = list(left), list(right)  # type: ignore[call-overload]
        return len(a) == len(b) and all(
            cel_equal(x, y) for x, y in zip(a, b, strict=True)
        )
    if kind == "map":
        ma, mb = dict(left), dict(right)  # type: ignore[call-overload]
        if len(ma) != len(mb):
            return False
        for key, value in ma.items():
            match = [v for k, v in mb.items() if cel_equal(k, key)]
            if not match or not cel_equal(value, match[0]):
                return False
        return True
    return bool(left == right)


def _member(item: object, items: Sequence[object]) -> bool:
    return any(cel_equal(item, candidate) for candidate in items)


def _contains(haystack: Sequence[object], needles: Sequence[object]) -> bool:
    return all(_member(needle, haystack) for needle in needles)


def _equivalent(left: Sequence[object], right: Sequence[object]) -> bool:
    return _contains(left, right) and _contains(right, left)


def _intersects(left: Sequence[object], right: Sequence[object]) -> bool:
    return any(_member(item, right) for item in left)


def _declare(
    name: str, implementation: Callable[[Sequence[object], Sequence[object]], bool]
) -> cel.FunctionDecl:
    """``sets.<name>(list(T), list(T)) -> bool`` with cel-go's overload id."""
    lists = cel.Type("list(T)")
    return cel.FunctionDecl(
        f"sets.{name}",
        [
            cel.Overload(
                f"list_sets_{name}_list",
                cel.Type.BOOL,
                [lists, lists],
                impl=implementation,
            )
        ],
    )


def extension() -> cel.CelExtension:
    """A new ``sets`` extension object, for ``cel.NewEnv(extensions=...)``."""
    return cel.CelExtension(
        "sets",
        [
            _declare("contains", _contains),
            _declare("equivalent", _equivalent),
            _declare("intersects", _intersects),
        ],
    )
