"""Compact JSON text for the hot path: orjson's speed, the standard library's text.

Two things are encoded on every request or new token: the log line of each
request and review, and the user of each accepted token (the result cache's
entry and the webhook's answer). ``json.JSONEncoder.encode`` took ~8 µs for an
access line, since it builds a C encoder per call; orjson takes under 1 µs.

orjson is used only where its text is the standard library's, so no line or
answer changes: values it would render its own way (dataclasses, datetimes,
subclasses of str/int/dict/list; see ``_ORJSON_OPTIONS``) reach ``default``,
which sends the whole value to ``json``, as do integers beyond 64 bits,
non-string keys, lone surrogates and any text with a character
``ensure_ascii`` escapes (non-ASCII, DEL): the output stays 7-bit, so a log
line never carries a raw bidi control or U+2028.

Deliberate differences, which neither our log lines nor our answers carry: a
float below 1e-4 is written in decimal (``0.00001`` for ``1e-05``, the same
number); NaN and the infinities are ``null`` (``json`` writes ``NaN``, which
is not JSON); a plain ``Enum`` member is its value, not ``str()`` of it.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

__all__ = ["compact", "compact_bytes"]

#: The standard library's encoder, built once (``json.dumps`` with options
#: would build a new encoder per call); unserialisable values become ``str``.
_encode_std: Final = json.JSONEncoder(default=str, separators=(",", ":")).encode

#: Values orjson would render its own way go to ``default`` (``_not_plain``).
_ORJSON_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _not_plain(value: object) -> object:
    raise TypeError(type(value).__name__)


def _fast(value: dict[str, Any]) -> bytes | None:
    """orjson's text of ``value``, or None where it would not be json's."""
    try:
        out = orjson.dumps(value, default=_not_plain, option=_ORJSON_OPTIONS)
    except TypeError:
        return None
    if not out.isascii() or b"\x7f" in out:
        return None
    return out


def compact(value: dict[str, Any]) -> str:
    """``json.dumps(value, default=str, separators=(",", ":"))``, faster."""
    out = _fast(value)
    return _encode_std(value) if out is None else out.decode("ascii")


def compact_bytes(value: dict[str, Any]) -> bytes:
    """``compact`` as ASCII bytes, sized to their length.

    orjson's own ``bytes`` keep the whole buffer it wrote into (4 KiB for a
    user of 60 bytes), and these are kept: each accepted token's user is
    stored in the result cache by its JSON. The benchmark's cache of 75,000
    entries grew from 492 to 5,837 bytes per entry with orjson's object, so
    the text is copied into an object of its own size (~0.1 µs).
    """
    out = _fast(value)
    if out is None:
        return _encode_std(value).encode("ascii")
    return memoryview(out).tobytes()
