"""Rule expressions over channel values, evaluated by the rule-engine library (never `eval`).

Channel names keep their dots (`battery.soc_pct < 20 and time.hour >= 18`). rule-engine reads
`a.b` as an attribute of `a`, so a context of our own resolves dotted names against the node's
values. Besides channels: `time.hour` (local hour of day, with its fraction), `time.weekday`
(0 = Monday) and the node's derived values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import rule_engine
import rule_engine.ast as ast
from rule_engine import errors

TIME_NAMES = ("time.hour", "time.weekday", "time.minute")


class _Partial:
    """A dotted name being read part by part (`battery` then `.soc_pct`)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class _Context(rule_engine.Context):
    def __init__(self) -> None:
        super().__init__(resolver=self._symbol, default_value=None)

    @staticmethod
    def _symbol(thing: Mapping[str, Any], name: str) -> Any:
        return thing[name] if name in thing else _Partial(name)

    def resolve_attribute(self, thing: Any, object_: Any, name: str) -> Any:
        if isinstance(object_, _Partial):
            key = f"{object_.path}.{name}"
            return thing[key] if key in thing else _Partial(key)
        return super().resolve_attribute(thing, object_, name)


class ExpressionError(ValueError):
    """An expression that does not parse."""


def _names(node: Any, out: set[str]) -> None:
    """Collect the dotted names an expression reads."""
    if isinstance(node, ast.GetAttributeExpression | ast.SymbolExpression):
        parts = []
        cursor = node
        while isinstance(cursor, ast.GetAttributeExpression):
            parts.append(cursor.name)
            cursor = cursor.object
        if isinstance(cursor, ast.SymbolExpression):
            parts.append(cursor.name)
            out.add(".".join(reversed(parts)))
            return
        node = cursor
    for value in vars(node).values() if hasattr(node, "__dict__") else ():
        if isinstance(value, ast.ExpressionBase):
            _names(value, out)
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, ast.ExpressionBase):
                    _names(item, out)


class Expression:
    """A compiled expression and the names it reads."""

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self._rule = rule_engine.Rule(text, context=_Context())
        except errors.EngineError as exc:
            message = getattr(exc, "message", str(exc))
            raise ExpressionError(f"{message} in {text!r}") from None
        names: set[str] = set()
        _names(self._rule.statement.expression, names)
        self.names = frozenset(names)

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The value of the expression; `values` must hold every name it reads."""
        return self._rule.evaluate(values)

    def test(self, values: Mapping[str, Any]) -> bool:
        return bool(self._rule.matches(values))


def check(text: str, known: Callable[[str], bool]) -> list[str]:
    """Problems with an expression: syntax, or names that are not known channels."""
    try:
        expression = Expression(text)
    except ExpressionError as exc:
        return [str(exc)]
    unknown = sorted(n for n in expression.names if not known(n))
    if unknown:
        return [f"unknown channel(s): {', '.join(unknown)}"]
    return []
