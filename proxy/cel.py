"""CEL for AuthenticationConfiguration: compile once at start-up, evaluate per token.

API CONTRACT (other modules rely on exactly this):

- ``compile_expression(source, *, variables, field_path) -> CompiledExpression``
  raises ``ConfigError`` naming ``field_path`` on a syntax error (with line and
  column), an undeclared variable or function, or a malformed macro.
- ``CompiledExpression.evaluate(activation) -> object`` takes plain Python JSON
  values (``{"claims": {...}}`` or ``{"user": {...}}``) and returns plain Python
  values (str, bool, int, float, None, list, dict); raises ``ExpressionError``.
  An optional result becomes its value, or ``None`` when it is empty.
- ``CompiledExpression.selected_fields``: the ``(variable, field)`` pairs the
  expression selects (``claims.email`` -> ``("claims", "email")``, also through
  ``claims.?email``, ``claims["email"]`` and ``has(claims.email)``), for the
  ``email_verified`` rule. It is read from the parse tree, never from the text.

Why cel-python, extended: kube-apiserver evaluates these expressions with
cel-go and the Kubernetes CEL environment, whose documentation uses the
optional syntax (``claims.?email_verified.orValue(true)``) and the ``sets``
library. celpy has neither, so this module adds them at the seams celpy offers,
without copying it:

- Grammar: celpy's ``cel.lark`` text (read from the installed package) plus
  ``cel_ext.lark`` next to this file, which ``%extend``s ``member`` with
  ``.?field`` and ``[?index]``. One LALR parser is built, lazily, per process.
- Tree: after parsing, calls (``size(x)``, qualified ``optional.of(x)`` and
  ``sets.contains(a, b)``), the macros (``all``, ``exists``, ``exists_one``,
  ``map``, ``filter``) and ``has()`` are rewritten into dedicated nodes, and
  the tree is checked: undeclared identifiers (``user`` in a claims
  expression), unknown functions and wrong argument counts are a
  ``ConfigError`` at start-up, as cel-go's checker reports them, rather than a
  refusal of every token later. Then the single-child precedence chains are
  cut and literals converted once, so evaluation visits few nodes.
- Evaluation: ``_Evaluator`` subclasses ``celpy.evaluation.Evaluator`` (its
  tree walk, ``primary`` and ``literal``) and supplies the new nodes, the
  operators and the calls; the function table (``_CATALOGUE``) is ours, with
  a few of celpy's ``base_functions`` (``bytes``, ``duration``, ``timestamp``,
  ``matches``, the ``get*`` time accessors). Claims are converted to celpy
  values lazily, only the parts an expression reaches. A simple rule takes
  about 10 µs, a macro about 7 µs per element.
- Supported functions: ``size contains startsWith endsWith matches int uint
  double string bool bytes type dyn duration timestamp`` and the time
  accessors; the Kubernetes strings library ``charAt indexOf lastIndexOf
  lowerAscii upperAscii replace split substring trim join`` (``indexOf`` and
  ``lastIndexOf`` also on lists); ``optional.of optional.none
  optional.ofNonZeroValue hasValue value or orValue``; ``sets.contains
  sets.equivalent sets.intersects``; ``has()``, ``in`` and the macros.

Semantics chosen to match Kubernetes (cel-go) where celpy differs:

- JSON numbers: an integral JSON number within int64 is a CEL ``int``; any
  other number is a ``double`` (k8s.io/apimachinery's JSON decoding does the
  same). Comparisons (``< <= > >= == !=``) work across int, uint and double
  by numeric value, so ``claims.exp - claims.nbf <= 86400`` holds for JSON
  ints and ``claims.exp > 1.5e9`` works too. Arithmetic does not mix them (CEL
  has no such overload): ``claims.exp - 1.5`` is an error, as in Kubernetes.
- Equality is heterogeneous: values of different types are simply unequal
  (``claims.hd == "x"`` is false when ``hd`` is a number), not an error; lists
  and maps compare element-wise; ``in`` uses the same equality.
- Errors are values until the end, so ``&&`` / ``||`` absorb them the CEL way
  (``has(claims.x) && claims.x == "y"`` is false, not an error), and
  ``all``/``exists`` short-circuit like cel-go.
- Optionals: ``a.?f`` / ``a[?k]`` give ``optional.of`` the value or
  ``optional.none()``; selecting or indexing on an optional propagates (a
  ``none`` stays ``none``, a present value is selected with presence testing),
  so ``claims.?a.?b`` and ``claims.?a.b`` are both optional. ``or`` and
  ``orValue`` evaluate their argument only when needed.
- ``has(m.f)`` is false when map ``m`` lacks ``f``, and an error when ``m``
  itself fails (``has(claims.a.b)`` without ``a``), as in cel-go.

Not implemented (not used by the Kubernetes documentation for this file):
optional list/map literal entries (``[?x]``, ``{?k: v}``), message
construction, the ``math``/``lists``/``regex``/``url``/``ip`` libraries.
"""

from __future__ import annotations

import functools
import importlib.resources
import operator
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import lark
from celpy import celtypes
from celpy.evaluation import (
    Activation,
    CELEvalError,
    CELFunction,
    CELSyntaxError,
    CELUnsupportedError,
    Evaluator,
    Result,
    base_functions,
    celstr,
)
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput

from proxy.errors import ConfigError, ExpressionError

__all__ = ["CompiledExpression", "compile_expression"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_NUMERIC = frozenset({"int", "uint", "double"})
_MAX_MESSAGE = 200


# --------------------------------------------------------------------------
# Grammar


def _keyword_literals(token: lark.Token) -> lark.Token:
    """``true``/``false`` lex as IDENT; retype them, keeping their position.

    celpy's own callback (``CELParser.ambiguous_literals``) builds a new token
    without line and column, which would leave errors about them unplaced.
    """
    if token.value in ("true", "false"):
        return lark.Token.new_borrow_pos("BOOL_LIT", token.value, token)
    return token


@functools.cache
def _parser() -> lark.Lark:
    """celpy's grammar plus ours; built once, on first use (about 0.1 s)."""
    base = importlib.resources.files("celpy").joinpath("cel.lark").read_text("utf-8")
    ours = (
        importlib.resources.files("proxy").joinpath("cel_ext.lark").read_text("utf-8")
    )
    return lark.Lark(
        base + "\n" + ours,
        parser="lalr",
        start="expr",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": _keyword_literals},
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
    )


# --------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class _Optional:
    """CEL ``optional(T)``: ``optional.of(value)`` or ``optional.none()``."""

    present: bool
    value: object = None


_NONE = _Optional(present=False)
_MISSING = object()


def _kind(value: object) -> str:
    """The CEL type name of a runtime value, for dispatch and for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool | celtypes.BoolType):
        return "bool"
    if isinstance(value, celtypes.UintType):
        return "uint"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, _Optional):
        return "optional"
    if isinstance(value, celtypes.TimestampType):
        return "timestamp"
    if isinstance(value, celtypes.DurationType):
        return "duration"
    if isinstance(value, type):
        return "type"
    return type(value).__name__.lower()


def _a(value: object) -> str:
    """``a string``, ``an int``: the value's CEL type with its article."""
    kind = _kind(value)
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _number(value: object) -> int | float:
    return (
        float(cast(float, value)) if _kind(value) == "double" else int(cast(int, value))
    )


def _equals(left: object, right: object) -> bool:
    """cel-go's heterogeneous equality: numbers by value, other types unequal."""
    kl, kr = _kind(left), _kind(right)
    if kl in _NUMERIC and kr in _NUMERIC:
        return _number(left) == _number(right)
    if kl != kr:
        return False
    if kl == "list":
        ll, lr = cast(list[object], left), cast(list[object], right)
        return len(ll) == len(lr) and all(
            _equals(a, b) for a, b in zip(ll, lr, strict=True)
        )
    if kl == "map":
        ml, mr = cast(dict[object, object], left), cast(dict[object, object], right)
        if len(ml) != len(mr):
            return False
        for key, value in ml.items():
            other = _map_get(mr, key)
            if other is _MISSING or not _equals(value, other):
                return False
        return True
    if kl == "optional":
        ol, orr = cast(_Optional, left), cast(_Optional, right)
        if ol.present != orr.present:
            return False
        return not ol.present or _equals(ol.value, orr.value)
    if kl == "null":
        return True
    if kl == "bool":
        return bool(left) == bool(right)
    if kl == "string":
        return str(left) == str(right)
    if kl == "bytes":
        return bytes(cast(bytes, left)) == bytes(cast(bytes, right))
    return bool(left == right)


def _map_get(mapping: dict[object, object], key: object) -> object:
    """Look ``key`` up with CEL equality (``{1: x}[1.0]``); ``_MISSING`` if absent."""
    if _kind(key) == "string":
        try:
            return dict.get(mapping, key, _MISSING)
        except TypeError:
            pass
    for candidate, value in mapping.items():
        if _equals(candidate, key):
            return value
    return _MISSING


def _set_key(value: object) -> object:
    """A hashable stand-in that is equal exactly when CEL equality holds, or None."""
    kind = _kind(value)
    if kind == "string":
        return ("s", str(value))
    if kind in _NUMERIC:
        return ("n", _number(value))
    if kind == "bool":
        return ("b", bool(value))
    if kind == "null":
        return ("z",)
    return None


def _hashed(items: Iterable[object]) -> set[object] | None:
    """The ``_set_key`` of every item, or None if one of them has none."""
    keys: set[object] = set()
    for item in items:
        key = _set_key(item)
        if key is None:
            return None
        keys.add(key)
    return keys


def _contains_all(haystack: list[object], needles: Iterable[object]) -> bool:
    """Whether every needle is in haystack; hashed when the elements allow it."""
    keys = _hashed(haystack)
    for needle in needles:
        if keys is not None:
            if _set_key(needle) not in keys:
                return False
        elif not any(_equals(needle, item) for item in haystack):
            return False
    return True


_CONVERTED = (
    dict,
    list,
    type,
    _Optional,
    celtypes.BoolType,
    celtypes.IntType,
    celtypes.UintType,
    celtypes.DoubleType,
    celtypes.StringType,
    celtypes.BytesType,
    celtypes.TimestampType,
    celtypes.DurationType,
)


def _from_json(value: object) -> object:
    """One plain JSON value to celpy, lazily: containers are left as they are.

    A map or list is converted element by element when the expression reaches
    into it (``_select``, ``_index``, macros), so a token's claims are never
    copied whole for an expression that reads one of them. Integers outside
    int64 become doubles, as k8s.io/apimachinery's JSON decoding does. A value
    that is not JSON is a CEL error value.
    """
    if value is None or isinstance(value, _CONVERTED):
        return value
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return celtypes.IntType(value)
        try:
            return celtypes.DoubleType(float(value))
        except OverflowError:
            return CELEvalError("a json number is out of range")
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return CELEvalError(f"a value of type {type(value).__name__} is not json")


class _NotJSON(Exception):
    """A result that has no plain JSON form (bytes, timestamp, type...)."""


def _to_python(value: object) -> object:
    """celpy values back to plain Python; an optional becomes its value or None."""
    if value is None:
        return None
    if isinstance(value, _Optional):
        return _to_python(value.value) if value.present else None
    if isinstance(value, CELEvalError):
        raise _NotJSON("number out of range")
    kind = _kind(value)
    if kind == "bool":
        return bool(value)
    if kind in ("int", "uint"):
        number = int(cast(int, value))
        if kind == "int" and not _INT64_MIN <= number <= _INT64_MAX:
            return _to_python(_from_json(number))  # as if the expression had read it
        return number
    if kind == "double":
        return float(cast(float, value))
    if kind == "string":
        return str(value)
    if kind in ("list", "tuple"):
        return [_to_python(item) for item in cast(list[object], value)]
    if kind == "map":
        return {
            _to_python(key): _to_python(item)
            for key, item in cast(dict[object, object], value).items()
        }
    raise _NotJSON(kind)


# --------------------------------------------------------------------------
# Functions and operators


class _Refused(Exception):
    """A function's argument is of the right type but unusable (out of range)."""


_Impl = Callable[..., object]


def _function(name: str) -> Callable[[_Impl], CELFunction]:
    """Wrap an implementation so every failure is a CEL error *value*.

    Errors must stay values so ``&&``, ``||`` and ``exists`` can absorb them;
    celpy would turn a raised ``ValueError`` into a misleading "overflow".
    """

    def decorate(implementation: _Impl) -> CELFunction:
        def call(*args: object) -> Result:
            for arg in args:
                if isinstance(arg, CELEvalError):
                    return arg
            try:
                return cast(Result, implementation(*args))
            except _Refused as err:
                return CELEvalError(f"{name}: {err}")
            except TypeError:
                return CELEvalError(f"no such overload: {_signature(name, args)}")
            except (ValueError, ArithmeticError):
                return CELEvalError(f"invalid argument: {_signature(name, args)}")

        call.__name__ = name
        return call

    return decorate


_INFIX = frozenset({"==", "!=", "<", "<=", ">", ">=", "in"})


def _signature(name: str, args: Sequence[object]) -> str:
    """``split(string, int)``, or ``int < string`` for an operator."""
    kinds = [_kind(arg) for arg in args]
    if name in _INFIX and len(kinds) == 2:
        return f"{kinds[0]} {name} {kinds[1]}"
    return f"{name}({', '.join(kinds)})"


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _int(value: object) -> int:
    if _kind(value) not in ("int", "uint"):
        raise TypeError
    return int(cast(int, value))


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError
    return value


def _strings(values: Iterable[str]) -> celtypes.ListType:
    return celtypes.ListType([celtypes.StringType(v) for v in values])


def _equal_op(left: object, right: object) -> object:
    return celtypes.BoolType(_equals(left, right))


def _not_equal_op(left: object, right: object) -> object:
    return celtypes.BoolType(not _equals(left, right))


_ORDERED = frozenset({"string", "bytes", "bool", "timestamp", "duration"})


def _ordering(compare: Callable[[Any, Any], bool]) -> _Impl:
    """``< <= > >=``: numbers across int/uint/double by value, else same type."""

    def apply(left: object, right: object) -> object:
        kl, kr = _kind(left), _kind(right)
        if kl in _NUMERIC and kr in _NUMERIC:
            return celtypes.BoolType(compare(_number(left), _number(right)))
        if kl == kr and kl in _ORDERED:
            if kl == "bool":
                return celtypes.BoolType(compare(bool(left), bool(right)))
            if kl == "string":
                return celtypes.BoolType(compare(str(left), str(right)))
            return celtypes.BoolType(compare(left, right))
        raise TypeError

    return apply


_ARITHMETIC_KINDS = {
    "+": frozenset({"int", "uint", "double", "string", "bytes", "list"}),
    "-": _NUMERIC,
    "*": _NUMERIC,
    "/": _NUMERIC,
    "%": frozenset({"int", "uint"}),
}
_TIME = frozenset({"timestamp", "duration"})
_RESULT_TYPES: dict[str, Callable[[Any], object]] = {
    "double": celtypes.DoubleType,
    "string": celtypes.StringType,
    "bytes": celtypes.BytesType,
    "list": celtypes.ListType,
}


def _arithmetic(symbol: str, operation: Callable[[Any, Any], object]) -> CELFunction:
    """An arithmetic operator that refuses mixed int/double, as CEL does."""
    allowed = _ARITHMETIC_KINDS[symbol]

    def apply(left: object, right: object) -> Result:
        if isinstance(left, CELEvalError):
            return left
        if isinstance(right, CELEvalError):
            return right
        kl, kr = _kind(left), _kind(right)
        if kl in _TIME and kr in _TIME and symbol in "+-":
            return cast(Result, operation(left, right))
        if kl != kr or kl not in allowed:
            return CELEvalError(f"no such overload: {kl} {symbol} {kr}")
        try:
            result = operation(left, right)
        except ZeroDivisionError:
            return CELEvalError("division by zero")
        except (ValueError, OverflowError):
            return CELEvalError("integer overflow")
        wrap = _RESULT_TYPES.get(kl)
        return cast(Result, wrap(result) if wrap is not None else result)

    return apply


def _in(item: object, container: object) -> object:
    if isinstance(container, list):
        return celtypes.BoolType(any(_equals(item, element) for element in container))
    if isinstance(container, dict):
        return celtypes.BoolType(_map_get(container, item) is not _MISSING)
    raise TypeError


def _size(value: object) -> object:
    if _kind(value) not in ("string", "bytes", "list", "map"):
        raise TypeError
    return celtypes.IntType(len(cast(Sequence[object], value)))


def _contains(text: object, fragment: object) -> object:
    return celtypes.BoolType(_str(fragment) in _str(text))


def _starts_with(text: object, prefix: object) -> object:
    return celtypes.BoolType(_str(text).startswith(_str(prefix)))


def _ends_with(text: object, suffix: object) -> object:
    return celtypes.BoolType(_str(text).endswith(_str(suffix)))


def _matches(text: object, pattern: object) -> object:
    return base_functions["matches"](_str(text), _str(pattern))


def _to_string(value: object) -> object:
    kind = _kind(value)
    if kind == "bool":
        return celtypes.StringType("true" if value else "false")
    if kind in _NUMERIC:
        return celtypes.StringType(str(_number(value)))
    if kind == "bytes":
        return celtypes.StringType(cast(bytes, value).decode("utf-8"))
    if kind in ("string", "timestamp", "duration"):
        return celtypes.StringType(str(value))
    raise TypeError


_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


_TRUE = frozenset({"true", "True", "TRUE", "t", "1"})
_FALSE = frozenset({"false", "False", "FALSE", "f", "0"})


def _to_bool(value: object) -> object:
    if _kind(value) == "bool":
        return celtypes.BoolType(bool(value))
    text = _str(value)
    if text in _TRUE or text in _FALSE:
        return celtypes.BoolType(text in _TRUE)
    raise ValueError


def _type_of(value: object) -> object:
    kind = _kind(value)
    name = "null_type" if kind == "null" else kind
    if name not in _TYPE_VALUES:
        raise TypeError
    return _TYPE_VALUES[name]


def _lower_ascii(text: object) -> object:
    return celtypes.StringType(_str(text).translate(_LOWER))


def _upper_ascii(text: object) -> object:
    return celtypes.StringType(_str(text).translate(_UPPER))


def _trim(text: object) -> object:
    return celtypes.StringType(_str(text).strip())


def _replace(text: object, old: object, new: object, count: object = -1) -> object:
    limit = _int(count)
    return celtypes.StringType(_str(text).replace(_str(old), _str(new), max(limit, -1)))


def _split(text: object, separator: object, count: object = -1) -> object:
    """``'a,b'.split(',')``; with ``n``: 0 gives [], <0 all parts, >0 at most n."""
    value, sep, limit = _str(text), _str(separator), _int(count)
    if limit == 0:
        return celtypes.ListType()
    if sep:
        return _strings(value.split(sep, limit - 1 if limit > 0 else -1))
    parts = list(value)
    if 0 < limit < len(parts):
        parts = [*parts[: limit - 1], "".join(parts[limit - 1 :])]
    return _strings(parts)


def _join(items: object, separator: object = "") -> object:
    return celtypes.StringType(
        _str(separator).join(_str(item) for item in _list(items))
    )


def _check_range(index: int, upper: int) -> None:
    if not 0 <= index <= upper:
        raise _Refused(f"index out of range: {index}")


def _substring(text: object, start: object, end: object = None) -> object:
    value = _str(text)
    first = _int(start)
    _check_range(first, len(value))
    last = len(value) if end is None else _int(end)
    _check_range(last, len(value))
    if first > last:
        raise _Refused(f"invalid substring range: start {first} > end {last}")
    return celtypes.StringType(value[first:last])


def _char_at(text: object, index: object) -> object:
    value, position = _str(text), _int(index)
    _check_range(position, len(value))
    return celtypes.StringType(value[position : position + 1])


def _index_of(target: object, item: object, offset: object = None) -> object:
    if isinstance(target, list) and offset is None:
        for position, element in enumerate(target):
            if _equals(element, item):
                return celtypes.IntType(position)
        return celtypes.IntType(-1)
    value, fragment = _str(target), _str(item)
    start = 0 if offset is None else _int(offset)
    _check_range(start, len(value))
    return celtypes.IntType(value.find(fragment, start))


def _last_index_of(target: object, item: object, offset: object = None) -> object:
    if isinstance(target, list) and offset is None:
        for position in range(len(target) - 1, -1, -1):
            if _equals(target[position], item):
                return celtypes.IntType(position)
        return celtypes.IntType(-1)
    value, fragment = _str(target), _str(item)
    if offset is None:
        return celtypes.IntType(value.rfind(fragment))
    start = _int(offset)
    _check_range(start, len(value))
    return celtypes.IntType(value.rfind(fragment, 0, start + len(fragment)))


def _optional(value: object) -> _Optional:
    if not isinstance(value, _Optional):
        raise TypeError
    return value


def _optional_of(value: object) -> object:
    return _Optional(present=True, value=value)


def _optional_none() -> object:
    return _NONE


def _optional_of_non_zero(value: object) -> object:
    kind = _kind(value)
    if value is None or (kind in ("bool", *_NUMERIC) and not value):
        return _NONE
    if kind in ("string", "bytes", "list", "map") and not value:
        return _NONE
    return _Optional(present=True, value=value)


def _has_value(value: object) -> object:
    return celtypes.BoolType(_optional(value).present)


def _value(value: object) -> object:
    present = _optional(value)
    if not present.present:
        raise _Refused("optional.none() dereference")
    return present.value


def _sets_contains(haystack: object, needles: object) -> object:
    return celtypes.BoolType(_contains_all(_list(haystack), _list(needles)))


def _sets_equivalent(left: object, right: object) -> object:
    a, b = _list(left), _list(right)
    return celtypes.BoolType(_contains_all(a, b) and _contains_all(b, a))


def _sets_intersects(left: object, right: object) -> object:
    a, b = _list(left), _list(right)
    return celtypes.BoolType(any(_contains_all(a, [item]) for item in b))


def _celpy(name: str) -> _Impl:
    return cast(_Impl, base_functions[name])


#: Every function an expression may call, with its allowed argument counts;
#: a method's receiver counts as its first argument (``s.split(",")`` is 2).
#: Anything not listed here is refused when the expression is compiled.
_CATALOGUE: dict[str, tuple[_Impl, frozenset[int]]] = {
    "dyn": (lambda value: value, frozenset({1})),
    "size": (_size, frozenset({1})),
    "contains": (_contains, frozenset({2})),
    "startsWith": (_starts_with, frozenset({2})),
    "endsWith": (_ends_with, frozenset({2})),
    "matches": (_matches, frozenset({2})),
    "int": (celtypes.IntType, frozenset({1})),
    "uint": (celtypes.UintType, frozenset({1})),
    "double": (celtypes.DoubleType, frozenset({1})),
    "string": (_to_string, frozenset({1})),
    "bool": (_to_bool, frozenset({1})),
    "bytes": (_celpy("bytes"), frozenset({1})),
    "type": (_type_of, frozenset({1})),
    "duration": (_celpy("duration"), frozenset({1})),
    "timestamp": (_celpy("timestamp"), frozenset({1})),
    **{
        name: (_celpy(name), frozenset({1, 2}))
        for name in (
            "getDate",
            "getDayOfMonth",
            "getDayOfWeek",
            "getDayOfYear",
            "getFullYear",
            "getMonth",
            "getHours",
            "getMilliseconds",
            "getMinutes",
            "getSeconds",
        )
    },
    "charAt": (_char_at, frozenset({2})),
    "indexOf": (_index_of, frozenset({2, 3})),
    "lastIndexOf": (_last_index_of, frozenset({2, 3})),
    "lowerAscii": (_lower_ascii, frozenset({1})),
    "upperAscii": (_upper_ascii, frozenset({1})),
    "replace": (_replace, frozenset({3, 4})),
    "split": (_split, frozenset({2, 3})),
    "substring": (_substring, frozenset({2, 3})),
    "trim": (_trim, frozenset({1})),
    "join": (_join, frozenset({1, 2})),
    "hasValue": (_has_value, frozenset({1})),
    "value": (_value, frozenset({1})),
    "optional.of": (_optional_of, frozenset({1})),
    "optional.none": (_optional_none, frozenset({0})),
    "optional.ofNonZeroValue": (_optional_of_non_zero, frozenset({1})),
    "sets.contains": (_sets_contains, frozenset({2})),
    "sets.equivalent": (_sets_equivalent, frozenset({2})),
    "sets.intersects": (_sets_intersects, frozenset({2})),
}

#: Evaluated lazily by ``_Evaluator`` (the argument only when the optional is empty).
_LAZY_OPTIONAL: dict[str, frozenset[int]] = {
    "or": frozenset({2}),
    "orValue": frozenset({2}),
}
_MACROS: dict[str, frozenset[int]] = {
    "all": frozenset({2}),
    "exists": frozenset({2}),
    "exists_one": frozenset({2}),
    "filter": frozenset({2}),
    "map": frozenset({2, 3}),
}
_NAMESPACES = frozenset({"optional", "sets"})
#: The bare type names an expression may use (``type(x) == string``).
_TYPE_VALUES: dict[str, object] = {
    "bool": celtypes.BoolType,
    "bytes": celtypes.BytesType,
    "double": celtypes.DoubleType,
    "duration": celtypes.DurationType,
    "int": celtypes.IntType,
    "list": celtypes.ListType,
    "map": celtypes.MapType,
    "null_type": type(None),
    "string": celtypes.StringType,
    "timestamp": celtypes.TimestampType,
    "type": celtypes.TypeType,
    "uint": celtypes.UintType,
}

_FUNCTIONS: dict[str, CELFunction] = {
    name: _function(name)(implementation)
    for name, (implementation, _) in _CATALOGUE.items()
}
_FUNCTIONS.update(
    {
        "_==_": _function("==")(_equal_op),
        "_!=_": _function("!=")(_not_equal_op),
        "_<_": _function("<")(_ordering(operator.lt)),
        "_<=_": _function("<=")(_ordering(operator.le)),
        "_>_": _function(">")(_ordering(operator.gt)),
        "_>=_": _function(">=")(_ordering(operator.ge)),
        "_in_": _function("in")(_in),
        "_+_": _arithmetic("+", operator.add),
        "_-_": _arithmetic("-", operator.sub),
        "_*_": _arithmetic("*", operator.mul),
        "_/_": _arithmetic("/", operator.truediv),
        "_%_": _arithmetic("%", operator.mod),
    }
)


# --------------------------------------------------------------------------
# Evaluation

#: celpy's evaluator wants an Activation; ours keeps variables in ``scope`` and
#: calls ``_FUNCTIONS`` directly, so this shared one is never written to.
_ACTIVATION = Activation(functions=_FUNCTIONS)

_Tree = lark.Tree[lark.Token]
_OPERATORS = {
    "relation_lt": "_<_",
    "relation_le": "_<=_",
    "relation_gt": "_>_",
    "relation_ge": "_>=_",
    "relation_eq": "_==_",
    "relation_ne": "_!=_",
    "relation_in": "_in_",
    "addition_add": "_+_",
    "addition_sub": "_-_",
    "multiplication_mul": "_*_",
    "multiplication_div": "_/_",
    "multiplication_mod": "_%_",
}


def _error(
    message: str, at: lark.Tree[lark.Token] | lark.Token | None = None
) -> CELEvalError:
    """A CEL error value positioned at ``at`` (the token or node that failed)."""
    if isinstance(at, lark.Token):
        return CELEvalError(message, token=at)
    if at is not None and not at.meta.empty:
        return CELEvalError(message, tree=at)
    return CELEvalError(message)


def _locate(result: Result, at: _Tree | lark.Token) -> Result:
    """Give a function's error value the position of the call, if it has none."""
    if isinstance(result, CELEvalError) and result.line is None:
        meta = at if isinstance(at, lark.Token) else at.meta
        result.line = getattr(meta, "line", None)
        result.column = getattr(meta, "column", None)
    return result


class _Evaluator(Evaluator):
    """celpy's tree interpreter plus optionals, ``has``, macros and qualified calls.

    The operator, identifier and call methods are our own, not celpy's: celpy's
    build ``typing`` generics at run time (``cast(Tuple[List[Result], Result],
    ...)``), about 70 µs per operator, which made a macro over 50 groups take
    milliseconds. celpy's remain for the tree walk, ``primary`` (list and map
    literals) and ``literal`` (run once per literal, at compile time).
    """

    def __init__(self, ast: _Tree, scope: dict[str, object]) -> None:
        super().__init__(ast, activation=_ACTIVATION)
        self.scope = scope

    def _visit(self, node: _Tree) -> Result:
        return cast(Result, self.visit(node))

    def ident(self, tree: _Tree) -> Result:
        """A variable (``claims``, a macro's variable) or a bare type name."""
        name = cast(lark.Token, tree.children[0])
        if name.value in self.scope:
            return cast(Result, self.scope[name.value])
        if name.value in _TYPE_VALUES:
            return cast(Result, _TYPE_VALUES[name.value])
        return _error(f"undeclared reference to '{name}'", name)

    def const(self, tree: _Tree) -> Result:
        """A literal, converted once at compile time by ``_simplify``."""
        return cast(Result, tree.children[0])

    def _in_scope(self, tree: _Tree, name: str, value: object) -> Result:
        """Evaluate a macro body with its variable bound; errors stay values."""
        return _Evaluator(tree, {**self.scope, name: value})._visit(tree)

    def _apply(self, name: lark.Token, arguments: list[object]) -> Result:
        function = _FUNCTIONS.get(name.value)
        if function is None:
            return _error(f"undeclared reference to function '{name}'", name)
        return _locate(function(*arguments), name)

    def _arguments(self, tree: _Tree, index: int) -> list[object] | CELEvalError:
        if len(tree.children) <= index:
            return []
        values = self._visit(cast(_Tree, tree.children[index]))
        if isinstance(values, CELEvalError):
            return values
        return list(cast(list[object], values))

    def expr(self, tree: _Tree) -> Result:
        """``c ? a : b``: an error in ``c`` is the result, and only one side runs."""
        if len(tree.children) == 1:
            return self._visit(cast(_Tree, tree.children[0]))
        condition, when_true, when_false = cast(list[_Tree], tree.children)
        chosen = self._visit(condition)
        if isinstance(chosen, CELEvalError):
            return chosen
        if not isinstance(chosen, celtypes.BoolType):
            return _error(f"the condition of ?: is {_a(chosen)}, not a bool", tree)
        return self._visit(when_true if chosen else when_false)

    def _logical(self, tree: _Tree, decisive: bool) -> Result:
        """``||`` (decisive true) and ``&&`` (decisive false), commutative over errors."""
        if len(tree.children) == 1:
            return self._visit(cast(_Tree, tree.children[0]))
        left = self._visit(cast(_Tree, tree.children[0]))
        if isinstance(left, celtypes.BoolType) and bool(left) == decisive:
            return left
        right = self._visit(cast(_Tree, tree.children[1]))
        if isinstance(right, celtypes.BoolType) and bool(right) == decisive:
            return right
        for value in (left, right):
            if isinstance(value, CELEvalError):
                return value
        for value in (left, right):
            if not isinstance(value, celtypes.BoolType):
                symbol = "||" if decisive else "&&"
                return _error(f"no such overload: {symbol} on {_a(value)}", tree)
        return celtypes.BoolType(not decisive)

    def conditionalor(self, tree: _Tree) -> Result:
        return self._logical(tree, decisive=True)

    def conditionaland(self, tree: _Tree) -> Result:
        return self._logical(tree, decisive=False)

    def _binary(self, tree: _Tree) -> Result:
        """``relation``, ``addition``, ``multiplication``: ``[op(left)] right``."""
        if len(tree.children) == 1:
            return self._visit(cast(_Tree, tree.children[0]))
        operation, right_tree = cast(list[_Tree], tree.children)
        left = self._visit(cast(_Tree, operation.children[0]))
        right = self._visit(right_tree)
        function = _FUNCTIONS[_OPERATORS[operation.data]]
        return _locate(function(left, right), tree)

    relation = _binary
    addition = _binary
    multiplication = _binary

    def unary(self, tree: _Tree) -> Result:
        if len(tree.children) == 1:
            return self._visit(cast(_Tree, tree.children[0]))
        operation, operand = cast(list[_Tree], tree.children)
        value = self._visit(operand)
        if isinstance(value, CELEvalError):
            return value
        kind = _kind(value)
        if operation.data == "unary_not" and kind == "bool":
            return celtypes.BoolType(not value)
        if operation.data == "unary_neg" and kind in ("int", "double"):
            try:
                return cast(Result, -cast(int, value))
            except ValueError:
                return _error("integer overflow", tree)
        symbol = "!" if operation.data == "unary_not" else "-"
        return _error(f"no such overload: {symbol}{kind}", tree)

    def exprlist(self, tree: _Tree) -> Result:
        values = [self._visit(cast(_Tree, child)) for child in tree.children]
        for value in values:
            if isinstance(value, CELEvalError):
                return value
        return celtypes.ListType(cast(list[celtypes.Value], values))

    def mapinits(self, tree: _Tree) -> Result:
        values = [self._visit(cast(_Tree, child)) for child in tree.children]
        for value in values:
            if isinstance(value, CELEvalError):
                return value
        result = celtypes.MapType()
        for key, value in zip(values[0::2], values[1::2], strict=True):
            if _kind(key) not in ("string", "int", "uint", "bool"):
                return _error(f"a map key cannot be {_a(key)}", tree)
            if _map_get(cast(dict[object, object], result), key) is not _MISSING:
                return _error(f"duplicate map key: {_describe_key(key)}", tree)
            result[cast(celtypes.Value, key)] = cast(celtypes.Value, value)
        return result

    def _select(self, target: object, name: lark.Token, optional: bool) -> Result:
        if isinstance(target, CELEvalError):
            return target
        if isinstance(target, _Optional):
            if not target.present:
                return cast(Result, target)
            target, optional = target.value, True
        if isinstance(target, dict):
            found = _map_get(target, name.value)
            if found is _MISSING:
                return (
                    cast(Result, _NONE)
                    if optional
                    else _error(f"no such key: '{name}'", name)
                )
            found = _from_json(found)
            if isinstance(found, CELEvalError):
                return found
            return cast(Result, _Optional(True, found) if optional else found)
        return _error(f"{_a(target)} has no fields (selecting '{name}')", name)

    def member_dot(self, tree: _Tree) -> Result:
        operand, name = tree.children
        target = self._visit(cast(_Tree, operand))
        return self._select(target, cast(lark.Token, name), optional=False)

    def member_dot_opt(self, tree: _Tree) -> Result:
        operand, name = tree.children
        target = self._visit(cast(_Tree, operand))
        return self._select(target, cast(lark.Token, name), optional=True)

    def _index(self, at: _Tree, target: object, key: object, optional: bool) -> Result:
        for value in (target, key):
            if isinstance(value, CELEvalError):
                return value
        if isinstance(target, _Optional):
            if not target.present:
                return cast(Result, target)
            target, optional = target.value, True
        kind = _kind(key)
        found: object = _MISSING
        if isinstance(target, dict):
            if kind not in ("string", "bool", *_NUMERIC):
                return _error(f"a map key cannot be {_a(key)}", at)
            found = _map_get(target, key)
            missing = f"no such key: {_describe_key(key)}"
        elif isinstance(target, list):
            if kind not in _NUMERIC or (
                kind == "double" and not float(cast(float, key)).is_integer()
            ):
                return _error(f"a list index must be an int, not {_a(key)}", at)
            position = int(_number(key))
            if 0 <= position < len(target):
                found = target[position]
            missing = f"index out of range: {position}"
        else:
            return _error(f"{_a(target)} cannot be indexed", at)
        if found is _MISSING:
            return cast(Result, _NONE) if optional else _error(missing, at)
        found = _from_json(found)
        if isinstance(found, CELEvalError):
            return found
        return cast(Result, _Optional(True, found) if optional else found)

    def member_index(self, tree: _Tree) -> Result:
        operand, index = cast(list[_Tree], tree.children)
        return self._index(
            index, self._visit(operand), self._visit(index), optional=False
        )

    def member_index_opt(self, tree: _Tree) -> Result:
        operand, index = cast(list[_Tree], tree.children)
        return self._index(
            index, self._visit(operand), self._visit(index), optional=True
        )

    def member_dot_arg(self, tree: _Tree) -> Result:
        """A method call; ``or`` / ``orValue`` evaluate their argument only if needed."""
        method = cast(lark.Token, tree.children[1])
        target = self._visit(cast(_Tree, tree.children[0]))
        if isinstance(target, CELEvalError):
            return target
        if method.value in _LAZY_OPTIONAL:
            return self._optional_or(tree, method, target)
        arguments = self._arguments(tree, 2)
        if isinstance(arguments, CELEvalError):
            return arguments
        return self._apply(method, [target, *arguments])

    def _optional_or(self, tree: _Tree, method: lark.Token, target: object) -> Result:
        name = method.value
        if not isinstance(target, _Optional):
            return _error(f"no such overload: {_kind(target)}.{name}()", method)
        if target.present:
            return cast(Result, target if name == "or" else target.value)
        arguments = cast(_Tree, tree.children[2])
        alternative = self._visit(cast(_Tree, arguments.children[0]))
        if name == "or" and not isinstance(alternative, _Optional | CELEvalError):
            return _error(
                f"no such overload: optional.or({_kind(alternative)})", method
            )
        return alternative

    def call(self, tree: _Tree) -> Result:
        """``size(x)``, ``optional.of(x)``, ``sets.contains(a, b)``: a global function."""
        arguments = self._arguments(tree, 1)
        if isinstance(arguments, CELEvalError):
            return arguments
        return self._apply(cast(lark.Token, tree.children[0]), arguments)

    def has_call(self, tree: _Tree) -> Result:
        """``has(m.f)``: whether map ``m`` has key ``f``; an error if ``m`` fails."""
        select = cast(_Tree, tree.children[0])
        operand, name = select.children
        target: object = self._visit(cast(_Tree, operand))
        if isinstance(target, CELEvalError):
            return target
        if isinstance(target, _Optional):
            if not target.present:
                return celtypes.BoolType(False)
            target = target.value
        if isinstance(target, dict):
            found = _map_get(target, cast(lark.Token, name).value)
            return celtypes.BoolType(found is not _MISSING)
        return _error(f"has() needs a map, got {_a(target)}", tree)

    def macro_call(self, tree: _Tree) -> Result:
        """``all``, ``exists``, ``exists_one``, ``filter`` and ``map`` (2 or 3 args)."""
        operand, macro, variable, *bodies = tree.children
        name, var = cast(lark.Token, macro).value, cast(lark.Token, variable).value
        exprs = cast(list[_Tree], bodies)
        target = self._visit(cast(_Tree, operand))
        if isinstance(target, CELEvalError):
            return target
        if isinstance(target, dict | list):
            items = [_from_json(item) for item in target]
        else:
            return _error(f"{name}() needs a list or a map, got {_a(target)}", macro)

        def predicate(item: object) -> Result:
            if isinstance(item, CELEvalError):
                return item
            result = self._in_scope(exprs[0], var, item)
            if isinstance(result, CELEvalError | celtypes.BoolType):
                return result
            return _error(f"the predicate of {name}() gave {_a(result)}", macro)

        if name in ("all", "exists"):
            decisive = name == "exists"
            failure: CELEvalError | None = None
            for item in items:
                outcome = predicate(item)
                if isinstance(outcome, CELEvalError):
                    failure = failure or outcome
                elif bool(outcome) == decisive:
                    return celtypes.BoolType(decisive)
            return failure if failure is not None else celtypes.BoolType(not decisive)
        kept: list[object] = []
        for item in items:
            if name != "map" or len(exprs) == 2:
                outcome = predicate(item)
                if isinstance(outcome, CELEvalError):
                    return outcome
                if not outcome:
                    continue
            kept.append(item)
        if name == "exists_one":
            return celtypes.BoolType(len(kept) == 1)
        if name == "filter":
            return celtypes.ListType(cast(list[celtypes.Value], kept))
        mapped = celtypes.ListType()
        for item in kept:
            if isinstance(item, CELEvalError):
                return item
            result = self._in_scope(exprs[-1], var, item)
            if isinstance(result, CELEvalError):
                return result
            mapped.append(cast(celtypes.Value, result))
        return mapped


def _describe_key(key: object) -> str:
    """A map key or list index for a message, shortened (keys are not secrets)."""
    kind = _kind(key)
    if kind == "string":
        text = str(key)
        return repr(text if len(text) <= 40 else text[:37] + "...")
    if kind == "bool":
        return "true" if key else "false"
    return str(_number(key)) if kind in _NUMERIC else kind


def _describe(err: CELEvalError) -> str:
    """A short lowercase-led message for a CEL error: never a value dump."""
    text = (
        err.args[0]
        if err.args and isinstance(err.args[0], str)
        else "evaluation failed"
    )
    text = " ".join(text.split(" (in activation", 1)[0].split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    text = text[:1].lower() + text[1:]
    if err.line is not None and err.column is not None:
        text += f" (line {err.line}, column {err.column})"
    return text


# --------------------------------------------------------------------------
# Compilation


_PASSTHROUGH = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
        "paren_expr",
    }
)


def _unwrap(node: _Tree) -> _Tree:
    """Skip the single-child precedence levels down to the node that matters."""
    while (
        node.data in _PASSTHROUGH
        and len(node.children) == 1
        and isinstance(node.children[0], lark.Tree)
    ):
        node = node.children[0]
    return node


def _where(node: _Tree | lark.Token) -> str:
    meta = node if isinstance(node, lark.Token) else node.meta
    line, column = getattr(meta, "line", None), getattr(meta, "column", None)
    return "" if line is None else f" (line {line}, column {column})"


def _arguments(node: _Tree, index: int) -> list[_Tree]:
    if len(node.children) <= index:
        return []
    return cast(list[_Tree], cast(_Tree, node.children[index]).children)


def _rewrite(tree: _Tree, variables: frozenset[str], problems: list[str]) -> None:
    """Turn calls, macros and ``has()`` into dedicated nodes, in place.

    ``call`` holds a global or qualified function name (``size``,
    ``sets.contains``) and its arguments; ``macro_call`` the target, macro
    name, variable and bodies; ``has_call`` the field selection.
    """
    for node in list(tree.iter_subtrees()):
        if node.data == "member_dot_arg":
            operand = cast(_Tree, node.children[0])
            method = cast(lark.Token, node.children[1])
            arguments = _arguments(node, 2)
            head = _unwrap(operand)
            if head.data == "ident":
                namespace = cast(lark.Token, head.children[0]).value
                if namespace in _NAMESPACES and namespace not in variables:
                    qualified = lark.Token.new_borrow_pos(
                        "IDENT", f"{namespace}.{method.value}", method
                    )
                    node.data = "call"
                    node.children = [qualified, *node.children[2:]]
                    continue
            if method.value in _MACROS:
                if len(arguments) not in _MACROS[method.value]:
                    problems.append(
                        f"{method.value}() takes {_counts(_MACROS[method.value])} "
                        f"arguments, got {len(arguments)}{_where(method)}"
                    )
                    continue
                variable = _unwrap(arguments[0])
                if variable.data != "ident":
                    problems.append(
                        f"the first argument of {method.value}() must be a variable "
                        f"name{_where(method)}"
                    )
                    continue
                node.data = "macro_call"
                node.children = [operand, method, variable.children[0], *arguments[1:]]
        elif (
            node.data == "primary" and cast(_Tree, node.children[0]).data == "ident_arg"
        ):
            call = cast(_Tree, node.children[0])
            name = cast(lark.Token, call.children[0])
            if name.value != "has":
                node.data = "call"
                node.children = call.children
                continue
            arguments = _arguments(call, 1)
            select = _unwrap(arguments[0]) if len(arguments) == 1 else None
            if select is None or select.data != "member_dot":
                problems.append(
                    f"has() takes one field selection such as has(claims.email){_where(name)}"
                )
                continue
            node.data = "has_call"
            node.children = [select]


def _counts(counts: frozenset[int]) -> str:
    return " or ".join(str(n) for n in sorted(counts))


_UNSUPPORTED = {
    "dot_ident": "a leading '.' (root-scope name) is not supported",
    "dot_ident_arg": "a leading '.' (root-scope name) is not supported",
    "member_object": "message construction is not supported",
}


class _Checker:
    """Static checks cel-go's checker would make, and the selected fields."""

    def __init__(self, variables: frozenset[str]) -> None:
        self.variables = variables
        self.problems: list[str] = []
        self.selected: set[tuple[str, str]] = set()

    def _top_variable(self, operand: _Tree, scope: frozenset[str]) -> str | None:
        head = _unwrap(operand)
        if head.data != "ident":
            return None
        name = cast(lark.Token, head.children[0]).value
        return name if name in self.variables and name not in scope else None

    def _call(self, name: lark.Token, count: int) -> None:
        spelled = name.value
        known = _CATALOGUE.get(spelled)
        counts = known[1] if known else _LAZY_OPTIONAL.get(spelled)
        if counts is None:
            self.problems.append(
                f"undeclared reference to function '{spelled}'{_where(name)}"
            )
        elif count not in counts:
            self.problems.append(
                f"'{spelled}' takes {_counts(counts)} arguments (a method's receiver "
                f"counts as one), got {count}{_where(name)}"
            )

    def visit(self, node: _Tree, scope: frozenset[str]) -> None:
        data = node.data
        if data == "ident":
            name = cast(lark.Token, node.children[0])
            if not (
                name.value in scope
                or name.value in self.variables
                or name.value in _TYPE_VALUES
            ):
                self.problems.append(
                    f"undeclared reference to '{name.value}'{_where(name)}"
                )
            return
        if data == "ident_arg":
            return  # a has() that _rewrite refused and reported
        if data in _UNSUPPORTED:
            self.problems.append(f"{_UNSUPPORTED[data]}{_where(node)}")
            return
        if data == "call":
            name = cast(lark.Token, node.children[0])
            self._call(name, len(_arguments(node, 1)))
        elif data == "member_dot_arg":
            method = cast(lark.Token, node.children[1])
            if method.value in _MACROS:  # a malformed macro, already reported
                self.visit(cast(_Tree, node.children[0]), scope)
                return
            self._call(method, 1 + len(_arguments(node, 2)))
        elif data == "macro_call":
            operand, _, variable, *bodies = node.children
            self.visit(cast(_Tree, operand), scope)
            inner = scope | {cast(lark.Token, variable).value}
            for body in bodies:
                self.visit(cast(_Tree, body), inner)
            return
        elif data in ("member_dot", "member_dot_opt"):
            top = self._top_variable(cast(_Tree, node.children[0]), scope)
            if top is not None:
                self.selected.add((top, cast(lark.Token, node.children[1]).value))
        elif data in ("member_index", "member_index_opt"):
            top = self._top_variable(cast(_Tree, node.children[0]), scope)
            literal = _unwrap(cast(_Tree, node.children[1]))
            if top is not None and literal.data == "literal":
                token = cast(lark.Token, literal.children[0])
                if token.type in ("STRING_LIT", "MLSTRING_LIT"):
                    self.selected.add((top, str(celstr(token))))
        for child in node.children:
            if isinstance(child, lark.Tree):
                self.visit(child, scope)


_COLLAPSIBLE = _PASSTHROUGH - {"primary"}
_LEAVES = frozenset({"ident", "literal", "const", "paren_expr"})


def _collapse(node: _Tree) -> _Tree:
    while len(node.children) == 1 and isinstance(node.children[0], lark.Tree):
        child = node.children[0]
        if node.data in _COLLAPSIBLE or (
            node.data == "primary" and child.data in _LEAVES
        ):
            node = child
        else:
            break
    return node


def _simplify(tree: _Tree, problems: list[str]) -> _Tree:
    """Drop the single-child precedence levels and pre-convert literals.

    A literal ``'x'`` is nine nested nodes in celpy's tree; evaluation visits
    each one, per token and per macro element, so the chains are cut once here
    and the literal becomes a ``const`` node holding its celpy value. A literal
    celpy cannot convert (``99999999999999999999``) is a problem, as in cel-go.
    """
    for node in list(tree.iter_subtrees()):
        if node.data == "literal":
            token = cast(lark.Token, node.children[0])
            try:
                value = _Evaluator(node, {}).literal(node)
            except (CELSyntaxError, CELUnsupportedError):
                value = CELEvalError("invalid literal")
            if isinstance(value, CELEvalError):
                problems.append(f"invalid literal {_excerpt(token)}{_where(token)}")
            node.data, node.children = "const", [value]
        node.children = [
            _collapse(child) if isinstance(child, lark.Tree) else child
            for child in node.children
        ]
    return _collapse(tree)


def _excerpt(token: lark.Token) -> str:
    text = str(token)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _syntax_problem(source: str, err: UnexpectedInput) -> str:
    token = getattr(err, "token", None)
    if isinstance(err, UnexpectedCharacters):
        what = f"unexpected character {err.char!r}"
    elif token is None or token.type == "$END":
        what = "unexpected end of expression"
    else:
        what = f"unexpected {_excerpt(token)}"
    if (token is not None and token.type == "$END") or err.line in (None, -1):
        lines = source.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    else:
        line, column = err.line, err.column
    return f"syntax error at line {line}, column {column}: {what}"


class _Program:
    """What evaluation needs: the checked, rewritten tree and the variable names."""

    __slots__ = ("tree", "variables")

    def __init__(self, tree: _Tree, variables: tuple[str, ...]) -> None:
        self.tree = tree
        self.variables = variables


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledExpression:
    """A CEL program compiled at start-up; evaluating it does no parsing.

    ``program`` is ``None`` only for a value built by hand (a test fake);
    evaluating such a value is an ``ExpressionError``.
    """

    source: str
    field_path: str
    selected_fields: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    program: _Program | None = field(default=None, compare=False, repr=False)

    def evaluate(self, activation: Mapping[str, object]) -> object:
        """Evaluate against plain JSON values; raise ``ExpressionError`` on failure.

        The message names ``field_path`` and what failed, never the values.
        """
        prefix = f"cel: {self.field_path}:"
        if self.program is None:
            raise ExpressionError(f"{prefix} expression was not compiled")
        values: dict[str, object] = {}
        for name in self.program.variables:
            if name not in activation:
                raise ExpressionError(f"{prefix} no value for variable '{name}'")
            value = _from_json(activation[name])
            if isinstance(value, CELEvalError):
                raise ExpressionError(f"{prefix} variable '{name}': {_describe(value)}")
            values[name] = value
        evaluator = _Evaluator(self.program.tree, values)
        try:
            result = evaluator.evaluate()
        except CELEvalError as err:
            raise ExpressionError(f"{prefix} {_describe(err)}") from err
        except RecursionError as err:
            raise ExpressionError(f"{prefix} evaluation nests too deeply") from err
        except (CELSyntaxError, CELUnsupportedError) as err:
            raise ExpressionError(f"{prefix} unsupported construct") from err
        except (
            ArithmeticError,
            LookupError,
            TypeError,
            ValueError,
            AttributeError,
        ) as err:
            raise ExpressionError(
                f"{prefix} evaluation failed ({type(err).__name__.lower()})"
            ) from err
        try:
            return _to_python(result)
        except _NotJSON as err:
            raise ExpressionError(
                f"{prefix} the result is a {err}, which has no json form"
            ) from err
        except RecursionError as err:
            raise ExpressionError(f"{prefix} the result nests too deeply") from err


_IDENTIFIER = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*\Z")


def compile_expression(
    source: str, *, variables: Sequence[str], field_path: str
) -> CompiledExpression:
    """Compile ``source`` once; a bad expression is a ``ConfigError`` at its path.

    ``variables`` are the only names the expression may use (``claims`` or
    ``user``); every problem found is reported, each with its position.
    """
    prefix = f"config: {field_path}:"
    declared = frozenset(variables)
    for name in declared:
        if not _IDENTIFIER.match(name):
            raise ConfigError(f"{prefix} invalid variable name {name!r}")
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as err:
        raise ConfigError(f"{prefix} {_syntax_problem(source, err)}") from err
    except LarkError as err:
        raise ConfigError(f"{prefix} syntax error") from err
    problems: list[str] = []
    checker = _Checker(declared)
    try:
        _rewrite(tree, declared, problems)
        checker.visit(tree, frozenset())
        problems.extend(checker.problems)
        simplified = _simplify(tree, problems)
    except RecursionError as err:
        raise ConfigError(f"{prefix} expression nests too deeply") from err
    if problems:
        raise ConfigError([f"{prefix} {problem}" for problem in problems])
    return CompiledExpression(
        source=source,
        field_path=field_path,
        selected_fields=frozenset(checker.selected),
        program=_Program(simplified, tuple(sorted(declared))),
    )
