"""``proxy.jsontext``: orjson's speed, the standard library's text.

The oracle is ``json.JSONEncoder(default=str, separators=(",", ":"))``, what
every log line was rendered with before. Where the two may differ on purpose
(floats below 1e-4 in decimal notation, NaN and infinities, plain ``Enum``
members) the test says so; everything else must be the same text.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import tracemalloc
import uuid
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.jsontext import compact as encode_json
from proxy.jsontext import compact_bytes
from proxy.kube import UserInfo

_ORACLE = json.JSONEncoder(default=str, separators=(",", ":")).encode

# Finite floats at or above 1e-4 in magnitude (or zero): both libraries write
# the shortest repr there. Below it Python writes 1e-05 and orjson 0.00001.
_FLOATS = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: f == 0 or abs(f) >= 1e-4
)

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: orjson refuses, the oracle renders
    | _FLOATS
    | st.text()  # any code point: control characters, bidi, U+2028, surrogates
)

_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _VALUES, max_size=12))
def test_same_text_as_the_standard_library(fields: dict[str, Any]) -> None:
    assert encode_json(fields) == _ORACLE(fields)


class _Colour(enum.Enum):
    RED = "red"


class _Level(enum.StrEnum):
    HIGH = "high"


class _Count(enum.IntEnum):
    THREE = 3


@dataclasses.dataclass
class _Point:
    x: int


class _Name(str):
    def __str__(self) -> str:
        return "shown"


def test_values_orjson_renders_its_own_way_fall_back() -> None:
    """Each of these would come out differently from orjson; none does."""
    cases: dict[str, Any] = {
        "datetime": datetime.datetime(2026, 12, 7, 19, 40, 1, 5),
        "date": datetime.date(2026, 12, 7),
        "dataclass": _Point(1),
        "str subclass": _Name("raw"),
        "str enum": _Level.HIGH,
        "int enum": _Count.THREE,
        "big int": 2**70,
        "non-string key": {1: "one"},
        "set": {"a"},
        "bytes": b"\x00\xff",
        "decimal": decimal.Decimal("1.10"),
        "uuid": uuid.UUID(int=7),
        "non-ASCII": "é\u202e\u2028",
        "DEL": "a\x7fb",
        "lone surrogate": "\ud800",
    }
    for name, value in cases.items():
        fields = {"event": "request", "value": value}
        assert encode_json(fields) == _ORACLE(fields), name


def test_log_lines_stay_7_bit() -> None:
    """A raw bidi override or line separator in a log line could mislead a
    reader or a line-based shipper; like the oracle, every one is escaped.
    """
    line = encode_json({"user": "alice\u202e\u2028\x7f\x00é"})
    assert line.isascii()
    for escaped in ("\\u202e", "\\u2028", "\\u007f"):
        assert escaped in line
    assert json.loads(line) == {"user": "alice\u202e\u2028\x7f\x00é"}


def test_the_deliberate_differences() -> None:
    """Written down in ``encode_json``'s docstring: the same values, other text."""
    small = encode_json({"duration": 1e-05})
    assert small == '{"duration":0.00001}'
    assert json.loads(small)["duration"] == 1e-05
    # The oracle writes NaN and Infinity, which no JSON parser must accept.
    assert encode_json({"a": math.nan, "b": -math.inf}) == '{"a":null,"b":null}'
    assert encode_json({"colour": _Colour.RED}) == '{"colour":"red"}'


def test_bytes_are_the_text_encoded() -> None:
    for value in ({"username": "alice", "groups": ["a", "b"]}, {"user": "é"}):
        assert compact_bytes(value) == encode_json(value).encode("ascii")


def test_kept_bytes_hold_no_more_than_their_text() -> None:
    """Each cached acceptance keeps its user's JSON: orjson's own object would
    keep its 4 KiB buffer with it (the result cache grew twelvefold).
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [
            compact_bytes({"username": f"oidc:{i}", "groups": ["a"]})
            for i in range(2000)
        ]
        per_object = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert len(kept[0]) < 50
    assert per_object < 200, per_object


def test_a_users_json_is_the_standard_librarys() -> None:
    """The result cache and the webhook's answer carry this encoding."""
    user = UserInfo(
        username="oidc:alice",
        uid="42",
        groups=("dev", "ops"),
        extra=MappingProxyType(
            {"authentication.kubernetes.io/credential-id": ("JTI=x",)}
        ),
    )
    assert user.to_json() == _ORACLE(user.to_dict()).encode()
    assert UserInfo.from_json(user.to_json()) == user
