"""CEL for AuthenticationConfiguration: compile once at start-up, evaluate per token.

The runtime is cel-expr-python, the CEL team's Python binding of cel-cpp (the
implementation that shares the spec's conformance tests with cel-go, which
kube-apiserver uses). It parses, type-checks and evaluates; this module adds
only what kube-apiserver adds around cel-go (k8s.io/apiserver/pkg/authentication/cel):

- Two environments, as kube-apiserver builds them: ``claims`` is a
  ``map(string, dyn)``; ``user`` is an object with ``username`` and ``uid``
  (string), ``groups`` (list of string) and ``extra`` (map of string to list
  of string). The runtime has no object types without protobuf, so ``user`` is
  declared as those four qualified names: ``user.groups`` has its real type,
  and ``user.foo`` is refused at load, as Kubernetes refuses it.
- The libraries of kube-apiserver's environment that these expressions use:
  the optional syntax and functions (``claims.?x.orValue(y)``,
  ``claims[?"k"]``, ``optional.of/none``), the strings extension
  (``split``, ``trim``, ``lowerAscii``, ``join``...), and ``sets``
  (``proxy.cel_sets``, Kubernetes' addition to the runtime's own).
- Property-name escapes (``claims.kubernetes__dot__io``), decoded by
  ``proxy.cel_source`` into index syntax before the runtime compiles.
- Type checks at load: a ``claimValidationRules`` or ``userValidationRules``
  expression must be of type ``bool`` (``Returns.BOOL``, Kubernetes' rule and
  message: ``must evaluate to bool``). Kubernetes checks mappings only when a
  token arrives; we also refuse, at load, a mapping whose type can never be
  right (``Returns.STRING``: string or dyn; ``Returns.STRINGS``: string,
  list(string), list(dyn), null or dyn), since such a file refuses every token.

API (``proxy.config`` and ``proxy.claims`` rely on exactly this):

- ``compile_expression(source, *, variables, field_path, returns)`` returns a
  ``CompiledExpression`` or raises ``ConfigError`` with one problem in
  Kubernetes' form: ``<field_path>: Invalid value: "<source>": compilation
  failed: ERROR: <input>:1:8: ...`` or ``...: must evaluate to bool``.
- ``CompiledExpression.evaluate(values)`` takes plain JSON values
  (``{"claims": {...}}`` or ``{"user": {...}}``) or a ``Variables`` holding
  them, and returns plain Python values (str, bool, int, float, None, list,
  dict); failures, a result without a JSON form included, are an
  ``ExpressionError`` naming the field path and the expression.
- ``Variables(values)``: one token's variables, converted for the runtime once
  and shared by all of that token's expressions (converting the claims costs
  more than evaluating a simple rule).
- ``CompiledExpression.selected_fields``: the ``(variable, field)`` pairs the
  expression selects, for the ``email_verified`` rule.

JSON numbers: an integer within int64 is a CEL ``int``; any other number is a
``double``, as k8s.io/apimachinery's JSON decoding makes it.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from cel_expr_python import cel as runtime
from cel_expr_python.ext import ext_optional, ext_strings

from proxy import cel_sets, cel_source
from proxy.errors import ConfigError, ExpressionError

__all__ = [
    "USER_FIELDS",
    "CompiledExpression",
    "Returns",
    "Variables",
    "compile_expression",
]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_CLAIMS: Final = "claims"
_USER: Final = "user"
#: The fields of ``user``, as kube-apiserver's ``kubernetes.UserInfo`` type has them.
USER_FIELDS: Final = ("username", "uid", "groups", "extra")
_SHOWN: Final = 120
_NUL: Final = "a string with a NUL character cannot be passed to the CEL runtime"


class Returns(enum.Enum):
    """What a field's expression must evaluate to, checked when the file loads.

    The value completes Kubernetes' message ``must evaluate to <value>``.
    """

    ANY = "any"
    BOOL = "bool"
    STRING = "string"
    STRINGS = "one of [string list(string)]"


@functools.cache
def _environment(variable: str) -> runtime.Env:
    """The runtime environment of ``claims`` or ``user``; built once (about 1 ms)."""
    t = runtime.Type
    if variable == _CLAIMS:
        variables = {_CLAIMS: t.Map(t.STRING, t.DYN)}
    else:
        strings = t.List(t.STRING)
        variables = {
            "user.username": t.STRING,
            "user.uid": t.STRING,
            "user.groups": strings,
            "user.extra": t.Map(t.STRING, strings),
        }
    return runtime.NewEnv(
        variables=variables,
        extensions=[
            ext_optional.ExtOptional(),
            ext_strings.ExtStrings(),
            cel_sets.extension(),
        ],
    )


@functools.cache
def _allowed(returns: Returns) -> tuple[runtime.Type, ...]:
    t = runtime.Type
    if returns is Returns.BOOL:
        return (t.BOOL,)
    if returns is Returns.STRING:
        return (t.STRING, t.DYN)
    return (t.STRING, t.DYN, t.NULL, t.List(t.STRING), t.List(t.DYN))


def _quote(text: str) -> str:
    """A value in a problem, quoted as Kubernetes' field errors quote it."""
    return json.dumps(text, ensure_ascii=False)


def _compile_problem(err: Exception) -> str:
    """cel-cpp's status text as cel-go's ``issues.String()`` reads."""
    text = str(err).strip()
    text = re.sub(r"^[A-Z_]+: ", "", text)
    return re.sub(r"\s*\[[A-Z_]+\]$", "", text)


# --------------------------------------------------------------------------
# Values in


def _json(value: object) -> object:
    """``value`` as the runtime should see JSON; the same object if nothing changes.

    Integers outside int64 become doubles (the runtime would make some of them
    uint and refuse the rest); tuples become lists, other mappings dicts.
    Strings go through ``_text``.
    """
    kind = type(value)
    if isinstance(value, str):
        return _text(value)
    if kind is int:
        number = value
        assert isinstance(number, int)
        if _INT64_MIN <= number <= _INT64_MAX:
            return value
        try:
            return float(number)
        except OverflowError:
            return value
    if kind is dict or (isinstance(value, Mapping) and kind is not dict):
        mapping = value
        assert isinstance(mapping, Mapping)
        converted = {_json(k): _json(v) for k, v in mapping.items()}
        if (
            kind is dict
            and len(converted) == len(mapping)
            and all(k in mapping and converted[k] is mapping[k] for k in converted)
        ):
            return value
        return converted
    if kind is list or kind is tuple:
        items = value
        assert isinstance(items, list | tuple)
        converted_items = [_json(v) for v in items]
        if kind is list and all(
            a is b for a, b in zip(converted_items, items, strict=True)
        ):
            return value
        return converted_items
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str) -> str:
    """A string as Go's JSON decoder gives it to kube-apiserver, or ``TypeError``.

    A lone surrogate (Python's ``json`` keeps ``"\\ud800"`` as one, which the
    runtime cannot take) becomes U+FFFD, as Go decodes it. A NUL character is
    refused: the runtime's conversion would cut the string there, so
    ``"a\\u0000b"`` would read as ``"a"``.
    """
    if "\x00" in value:
        raise TypeError(_NUL)
    if value.isascii() or not _SURROGATE.search(value):
        return value
    return _SURROGATE.sub("\ufffd", value)


def _user_data(user: object) -> dict[str, object]:
    if not isinstance(user, Mapping):
        raise TypeError("variable 'user' must be an object")
    missing = [f for f in USER_FIELDS if f not in user]
    if missing:
        raise TypeError(f"variable 'user' has no field '{missing[0]}'")
    return {f"{_USER}.{name}": _json(user[name]) for name in USER_FIELDS}


class Variables:
    """One token's variables, converted for the runtime once per environment.

    Build one per token and pass it to every ``evaluate`` of that token, so the
    claims are converted once, not once per expression.
    """

    __slots__ = ("_activations", "_values")

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = values
        self._activations: dict[str, runtime.Activation] = {}

    def activation(self, variable: str) -> runtime.Activation:
        """The runtime activation for ``variable``; ``ExpressionError`` if absent."""
        activation = self._activations.get(variable)
        if activation is not None:
            return activation
        if variable not in self._values:
            raise ExpressionError(f"no value for variable '{variable}'")
        value = self._values[variable]
        try:
            data = {_CLAIMS: _json(value)} if variable == _CLAIMS else _user_data(value)
        except TypeError as err:
            raise ExpressionError(str(err)) from err
        except RecursionError as err:
            raise ExpressionError(f"variable '{variable}' nests too deeply") from err
        activation = _environment(variable).Activation(data)
        self._activations[variable] = activation
        return activation


# --------------------------------------------------------------------------
# Values out


_ERROR_TEXTS = (
    (re.compile(r'^Key not found in map : "(.*)"$', re.S), r"no such key: \1"),
    (
        re.compile(r"^No matching overloads found : (.*)$", re.S),
        r"no such overload: \1",
    ),
)


def _describe(message: object) -> str:
    """The runtime's error text, in cel-go's words where they differ."""
    text = " ".join(re.sub(r"^[A-Z_]+: ", "", str(message)).split())
    for pattern, replacement in _ERROR_TEXTS:
        if pattern.match(text):
            return pattern.sub(replacement, text)
    return text


class _NotJSON(Exception):
    """A result with no plain JSON form (bytes, timestamp, duration, type...)."""


def _plain(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray):
        raise _NotJSON("bytes")
    raise _NotJSON(type(value).__name__.lower())


@dataclass(frozen=True, slots=True)
class _Program:
    """What evaluation needs: the compiled expression and its variable."""

    expression: runtime.Expression
    variable: str


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

    def evaluate(self, values: Mapping[str, object] | Variables) -> object:
        """Evaluate against plain JSON values; raise ``ExpressionError`` on failure."""
        prefix = f"cel: {self.field_path}:"
        if self.program is None:
            raise ExpressionError(f"{prefix} expression was not compiled")
        variables = values if isinstance(values, Variables) else Variables(values)
        try:
            activation = variables.activation(self.program.variable)
        except ExpressionError as err:
            raise ExpressionError(f"{prefix} {err}") from err
        shown = (
            self.source if len(self.source) <= _SHOWN else self.source[:_SHOWN] + "..."
        )
        try:
            result = self.program.expression.eval(activation)
            failed = result.type() == runtime.Type.ERROR
            value = result.value() if failed else result.plain_value()
        except (RuntimeError, TypeError, ValueError) as err:
            raise ExpressionError(
                f"{prefix} expression {shown!r}: the result cannot be read "
                f"({type(err).__name__})"
            ) from err
        if failed:
            raise ExpressionError(
                f"{prefix} expression {shown!r} resulted in error: {_describe(value)}"
            )
        try:
            return _plain(value)
        except _NotJSON as err:
            raise ExpressionError(
                f"{prefix} expression {shown!r}: the result is {err}, which has no json form"
            ) from err
        except RecursionError as err:
            raise ExpressionError(f"{prefix} the result nests too deeply") from err


def _variable(variables: tuple[str, ...] | list[str]) -> str:
    names = tuple(variables)
    if names not in ((_CLAIMS,), (_USER,)):
        raise ValueError(
            f"cel: variables must be ('claims',) or ('user',), got {names}"
        )
    return names[0]


def compile_expression(
    source: str,
    *,
    variables: tuple[str, ...] | list[str],
    field_path: str,
    returns: Returns = Returns.ANY,
) -> CompiledExpression:
    """Compile ``source`` once; a bad expression is a ``ConfigError`` at its path.

    ``variables`` is ``("claims",)`` or ``("user",)``: the environment of the
    field (claim mappings and rules, or user rules). ``returns`` is the type
    the field needs, checked here rather than on every token.
    """
    variable = _variable(variables)
    prefix = f"config: {field_path}: Invalid value: {_quote(source)}:"
    env = _environment(variable)
    rewritten = cel_source.rewrite(
        source, fields_of=(_USER,) if variable == _USER else ()
    )
    try:
        expression = env.compile(rewritten.text)
    except RuntimeError as err:
        detail = _compile_problem(err)
        if rewritten.changed:
            try:
                env.compile(source)
            except RuntimeError as original:
                detail = _compile_problem(original)
        raise ConfigError(f"{prefix} compilation failed: {detail}") from err
    if returns is not Returns.ANY:
        try:
            kind = expression.return_type()
        except RuntimeError:
            # The runtime cannot name some types (a map keyed by an optional,
            # ``{claims.?email: "x"}``): leave the check to each token, as
            # kube-apiserver does for every mapping, rather than fail to start.
            kind = None
        if kind is not None and not any(
            kind == allowed for allowed in _allowed(returns)
        ):
            raise ConfigError(f"{prefix} must evaluate to {returns.value}")
    return CompiledExpression(
        source=source,
        field_path=field_path,
        selected_fields=cel_source.selected_fields(source, (variable,)),
        program=_Program(expression, variable),
    )
