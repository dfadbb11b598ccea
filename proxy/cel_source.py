"""What Kubernetes reads from a CEL expression's text before the runtime sees it.

kube-apiserver lets a field selection name a claim or extra key that is not a
CEL identifier through its property-name escapes (k8s.io/apiserver/pkg/cel,
``escaping.go``): ``__dot__`` is ``.``, ``__dash__`` is ``-``, ``__slash__``
is ``/``, ``__underscores__`` is ``__``, and ``__{keyword}__`` is a CEL reserved
word (``__namespace__`` is ``namespace``). So ``claims.kubernetes__dot__io``
reads the claim ``kubernetes.io`` and ``user.extra.example__dot__org__slash__foo``
the extra key ``example.org/foo``, at any depth. cel-expr-python has no hook for
field lookup on a map, so this module rewrites each escaped selection into the
equivalent index, which the runtime then type-checks and evaluates as usual:

- ``x.a__dot__b``      becomes ``x["a.b"]``
- ``x.?a__dot__b``     becomes ``x[?"a.b"]``
- ``has(x.a__dot__b)`` becomes ``(x[?"a.b"].hasValue())`` (``has`` needs a
  selection; on a map the two mean the same)

An identifier whose escapes do not decode (``a__b__c``: ``__b__`` is no escape)
is left as written. Index syntax (``claims["kubernetes.io"]``) is always
literal, escaped or not.

``user`` is declared to the runtime as its four fields (see ``proxy.cel``), so
``has(user.username)``, always true for Kubernetes' user object, becomes
``(true)``.

The scanner also yields ``selected_fields``: which fields of a variable an
expression selects (``claims.email``, ``claims.?email``, ``claims["email"]``,
``has(claims.email)``, also parenthesised), for the ``email_verified`` rule.
It works on tokens (strings and comments are never mistaken for selections); a
text it cannot tokenise is returned unchanged, and the runtime reports its
syntax error against what the operator wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Rewritten", "rewrite", "selected_fields", "unescape"]

#: CEL's reserved words, as kube-apiserver lists them (``celReservedSymbols``).
RESERVED = frozenset(
    {
        "true", "false", "null", "in", "as", "break", "const", "continue",
        "else", "for", "function", "if", "import", "let", "loop", "package",
        "namespace", "return", "var", "void", "while",
    }
)  # fmt: skip

_ESCAPES = {"underscores": "__", "dot": ".", "dash": "-", "slash": "/"}
_ESCAPE = re.compile(r"__[^_]+__")

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
  | (?P<string>
        (?:[bB]?[rR]|[rR][bB])(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n\r]*'|"[^"\n\r]*")
      | [bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
               |'(?:\\.|[^'\\\n\r])*'|"(?:\\.|[^"\\\n\r])*")
    )
  | (?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d+|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
  | (?P<ident>[_a-zA-Z][_a-zA-Z0-9]*)
  | (?P<quoted>`[^`\n\r]*`)
  | (?P<punct>\.\?|\[\?|&&|\|\||==|!=|<=|>=|[-+*/%!<>?:.,()\[\]{}])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str


def unescape(name: str) -> str | None:
    """Kubernetes' ``Unescape``: the property name ``name`` stands for, or None.

    None when an ``__x__`` sequence is no escape, or a keyword escape is not
    the whole name (``a__in__``), exactly as kube-apiserver refuses them.
    """
    ok = True

    def replace(match: re.Match[str]) -> str:
        nonlocal ok
        contents = match.group()[2:-2]
        if contents in _ESCAPES:
            return _ESCAPES[contents]
        if contents in RESERVED and len(match.group()) == len(name):
            return contents
        ok = False
        return ""

    decoded = _ESCAPE.sub(replace, name)
    return decoded if ok else None


def _tokens(source: str) -> list[_Token] | None:
    """The significant tokens of ``source``, or None if it does not tokenise."""
    out: list[_Token] = []
    position = 0
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None:
            return None
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append(_Token(kind, match.group()))
        position = match.end()
    return out


def _is_field(tokens: Sequence[_Token], index: int) -> bool:
    """``tokens[index]`` is a field name after ``.`` or ``.?``, not a method."""
    return (
        tokens[index].kind == "ident"
        and index > 0
        and tokens[index - 1].text in (".", ".?")
        and (index + 1 == len(tokens) or tokens[index + 1].text != "(")
    )


def _escaped(name: str) -> str | None:
    decoded = unescape(name)
    return decoded if decoded is not None and decoded != name else None


def _closing(tokens: Sequence[_Token], opening: int) -> int | None:
    depth = 0
    for index in range(opening, len(tokens)):
        text = tokens[index].text
        if text in ("(", "[", "[?", "{"):
            depth += 1
        elif text in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return index if text == ")" else None
    return None


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The text the runtime compiles, and whether it differs from the source."""

    text: str
    changed: bool


def rewrite(source: str, *, fields_of: Iterable[str] = ()) -> Rewritten:
    """Decode the escaped selections of ``source`` into index syntax.

    ``fields_of`` names variables declared as qualified names
    (``user`` as ``user.username``...), whose ``has(user.f)`` is ``true``.
    """
    tokens = _tokens(source)
    if tokens is None:
        return Rewritten(source, changed=False)
    qualified = frozenset(fields_of)
    texts = [t.text for t in tokens]
    changed = False
    for index, token in enumerate(tokens):
        if not (
            token.text == "has"
            and token.kind == "ident"
            and (index == 0 or tokens[index - 1].text not in (".", ".?"))
            and index + 1 < len(tokens)
            and tokens[index + 1].text == "("
        ):
            continue
        closing = _closing(tokens, index + 1)
        if closing is None or closing - index < 4:
            continue
        last, dot = closing - 1, closing - 2
        if tokens[dot].text != "." or not _is_field(tokens, last):
            continue
        if closing - index == 5 and tokens[index + 2].text in qualified:
            texts[index : closing + 1] = ["(true)"] + [""] * (closing - index)
            changed = True
            continue
        key = _escaped(tokens[last].text)
        if key is not None:
            texts[index] = ""
            texts[dot] = ""
            texts[last] = f'[?"{key}"].hasValue()'
            changed = True
    for index, token in enumerate(tokens):
        if texts[index] != token.text or not _is_field(tokens, index):
            continue
        key = _escaped(token.text)
        if key is None:
            continue
        optional = tokens[index - 1].text == ".?"
        texts[index - 1] = ""
        texts[index] = f'[?"{key}"]' if optional else f'["{key}"]'
        changed = True
    if not changed:
        return Rewritten(source, changed=False)
    return Rewritten(_join(texts), changed=True)


def _join(texts: Sequence[str]) -> str:
    """Tokens back to text, a space between two that would otherwise merge."""
    out: list[str] = []
    previous = ""
    for text in texts:
        if not text:
            continue
        if previous and _word(previous[-1]) and _word(text[0]):
            out.append(" ")
        out.append(text)
        previous = text
    return "".join(out)


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _literal(token: _Token) -> str | None:
    """The value of a simple string literal (no escape sequences), or None."""
    if token.kind != "string":
        return None
    body = token.text.lstrip("rRbB")
    prefix = token.text[: len(token.text) - len(body)].lower()
    if "b" in prefix or ("r" not in prefix and "\\" in body):
        return None
    quote = 3 if body[:3] in ("'''", '"""') else 1
    return body[quote:-quote]


def selected_fields(
    source: str, variables: Iterable[str]
) -> frozenset[tuple[str, str]]:
    """The ``(variable, field)`` pairs ``source`` selects from its variables.

    A variable counts where it stands on its own (not ``x.claims``), possibly
    in parentheses; its field by ``.f``, ``.?f`` (escapes decoded), or an index
    with a constant string (``["f"]``, ``[?"f"]``). Macro variables are not
    told apart, as kube-apiserver's own check does not tell them apart.
    """
    tokens = _tokens(source)
    if tokens is None:
        return frozenset()
    names = frozenset(variables)
    found: set[tuple[str, str]] = set()
    for index, token in enumerate(tokens):
        if token.kind != "ident" or token.text not in names:
            continue
        if index > 0 and tokens[index - 1].text in (".", ".?"):
            continue
        opened = 0
        while index - opened - 1 >= 0 and tokens[index - opened - 1].text == "(":
            opened += 1
        after = index + 1
        while opened and after < len(tokens) and tokens[after].text == ")":
            opened -= 1
            after += 1
        if after + 1 >= len(tokens):
            continue
        selector, name = tokens[after], tokens[after + 1]
        if selector.text in (".", ".?") and name.kind == "ident":
            found.add((token.text, unescape(name.text) or name.text))
        elif (
            selector.text in ("[", "[?")
            and after + 2 < len(tokens)
            and tokens[after + 2].text == "]"
        ):
            value = _literal(name)
            if value is not None:
                found.add((token.text, value))
    return frozenset(found)
