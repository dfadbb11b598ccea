"""Kubernetes-style configuration files, decoded as kube's strict decoder does.

JSON when the text starts with ``{``, YAML otherwise; a field given twice in
one mapping is refused (kube-apiserver decodes its configuration files with a
strict codec; silently keeping the last value could hide half of an edit). Used
for the ``AuthenticationConfiguration``, the introspection side file and the
audit ``Policy``; a problem names the file and, for the commonest YAML
mistake (an unquoted value ending in ``:``), says how to quote it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from proxy.errors import ConfigError

__all__ = ["decode_document"]


class _DuplicateKeyError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """A YAML safe loader that refuses a key given twice in one mapping.

    kube-apiserver's strict decoding refuses duplicated fields; silently
    keeping the last one could hide half of an edit.
    """


def _construct_strict_mapping(
    loader: _StrictLoader, node: yaml.MappingNode
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate field {json.dumps(str(key))}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"duplicate field {json.dumps(key)}")
        out[key] = value
    return out


def decode_document(text: str, source: str) -> object:
    """A configuration file's text as kube's decoders read it: JSON when the
    text starts with ``{`` (as kube's decoder decides), else YAML, a duplicated
    field refused; ``ConfigError`` names ``source``.
    """
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except _DuplicateKeyError as err:
            raise ConfigError(f"config: {source}: {err}") from err
        except json.JSONDecodeError:
            pass  # a YAML flow mapping also starts with "{"
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).replace('in "<unicode string>", ', "").split())
        hint = _quote_hint(text, err)
        raise ConfigError(
            f"config: {source}: not valid YAML or JSON: {detail}{hint}"
        ) from err


#: ``key: value:`` where the second colon is the one YAML refused: the value
#: (``okta:``) is a plain scalar that ends in, or holds, ``": "``.
_UNQUOTED_COLON = re.compile(
    r"([A-Za-z_][\w.-]*)\s*:\s+([^\s'\"{}\[\],#:][^{}\[\],#]*?)\s*$"
)


def _quote_hint(text: str, err: yaml.YAMLError) -> str:
    """A hint for the commonest YAML mistake in this file: ``prefix: okta:``.

    YAML ends a plain value at ``": "`` or at a ``:`` that ends the line, so
    an unquoted prefix with a trailing colon is read as a second key on the
    same line ("mapping values are not allowed here"; in a flow mapping,
    "expected ',' or '}'"). kube-apiserver refuses the same file; it is
    the value that needs quotes, which neither message says.
    """
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    lines = text.splitlines()
    if not 0 <= mark.line < len(lines):
        return ""
    line = lines[mark.line]
    if line[mark.column : mark.column + 1] != ":":
        return ""
    found = _UNQUOTED_COLON.search(line[: mark.column])
    if found is None:
        return ""
    after = line[mark.column :]
    if "{" in line[: mark.column] or "[" in line[: mark.column]:
        tail = re.split(r"[,}\]]", after, maxsplit=1)[0]
    else:
        tail = after.split(" #", 1)[0]
    value = found.group(2) + tail.rstrip()
    return (
        f' (quote a value that ends in ":" or holds ": ", as in '
        f"{found.group(1)}: {json.dumps(value)})"
    )
