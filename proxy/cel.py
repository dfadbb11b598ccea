"""CEL for AuthenticationConfiguration: compile once at start-up, evaluate per token.

API CONTRACT (filled in by the CEL work; other modules rely on exactly this):

- ``compile_expression(source, *, variables, field_path) -> CompiledExpression``
  raises ``ConfigError`` naming ``field_path`` on a syntax or type problem.
- ``CompiledExpression.evaluate(activation) -> object`` takes plain Python JSON
  values (``{"claims": {...}}`` or ``{"user": {...}}``) and returns plain Python
  values (str, bool, int, float, None, list, dict); raises ``ExpressionError``.
- ``CompiledExpression.selected_fields``: the ``(variable, field)`` pairs the
  expression selects (``claims.email`` -> ``("claims", "email")``, also through
  ``claims.?email`` and ``claims["email"]``), for the ``email_verified`` rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CompiledExpression", "compile_expression"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledExpression:
    """A CEL program compiled at start-up; evaluating it does no parsing."""

    source: str
    field_path: str
    selected_fields: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def evaluate(self, activation: Mapping[str, object]) -> object:
        """Evaluate against plain JSON values; raise ``ExpressionError`` on failure."""
        raise NotImplementedError


def compile_expression(
    source: str, *, variables: Sequence[str], field_path: str
) -> CompiledExpression:
    """Compile ``source`` once; a bad expression is a ``ConfigError`` at its path."""
    raise NotImplementedError
