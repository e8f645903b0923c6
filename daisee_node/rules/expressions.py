"""Rule expressions over channel values, evaluated by the rule-engine library (never `eval`).

Channel names keep their dots (`battery.soc_pct < 20 and time.hour >= 18`). rule-engine reads
`a.b` as an attribute of `a`, so a context of our own resolves dotted names against the node's
values. A neighbour's channel is read as `peer.<node>.<channel>` (`peer.house2.pv.power_w`),
resolved the same way. Besides channels: `time.hour` (local hour of day, with its fraction),
`time.weekday` (0 = Monday) and the node's derived values.

What a rule may say is bounded before the parser sees it. rule-engine folds constant parts while
it parses (so a regular expression over two literals runs inside `check-config`) and builds its
tree recursively (so deep nesting overflows the stack). A rule is numbers, names, arithmetic,
comparisons, `and`/`or`/`not` and `?:`, at most `MAX_LENGTH` characters and `MAX_DEPTH` levels
deep; with nothing else, every evaluation takes a bounded time. Every name is a number, so a type
error that can be known in advance is a config problem; one that cannot (a divisor that turns
zero) fails that evaluation only, as an `EvaluationError`.

rule-engine builds its LALR parser tables when it is imported, which costs more CPU than the rest
of the node's start-up (seconds on a Pi). So it is imported only when an expression is first
compiled, and the tables it built are kept in the user's cache directory and handed to it at the
next start (PLY checks them against the grammar, so a changed grammar just rebuilds them).
"""

from __future__ import annotations

import contextlib
import decimal
import marshal
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import rule_engine
    import rule_engine.ast as ast
    from rule_engine import errors

TIME_NAMES = ("time.hour", "time.weekday", "time.minute")

#: longest expression text, in characters
MAX_LENGTH = 1000
#: most operators in one expression: bounds the parser's recursion before it starts
MAX_OPERATORS = 128
#: most operators on one path of the expression tree (each `.` of a name is one): bounds the
#: recursion of each evaluation
MAX_DEPTH = 32

_REGEX_TOKENS = frozenset({"EQ_FZM", "EQ_FZS", "NE_FZM", "NE_FZS"})
_BITWISE_TOKENS = frozenset({"BWAND", "BWOR", "BWXOR", "BWLSH", "BWRSH"})
_OPERAND_TOKENS = frozenset(
    {"FLOAT", "FLOAT_INF", "FLOAT_NAN", "SYMBOL", "TRUE", "FALSE", "STRING", "LPAREN", "RPAREN"}
)
_OPERATOR_TOKENS = frozenset(
    {"ADD", "SUB", "MUL", "TDIV", "FDIV", "MOD", "POW"}
    | {"EQ", "NE", "GT", "GE", "LT", "LE", "AND", "OR", "NOT", "QMARK", "COLON", "ATTR"}
)
_ALLOWED = "numbers, names, + - * / // % **, comparisons, and/or/not and ?:"

Result = Literal["condition", "number"]

#: where PLY looks for rule-engine's tables before building them
_TABMODULE = "rule_engine.parser.parsetab"
_TABLES_FILE = "rule-parser-tables.marshal"
_load_lock = threading.Lock()
_Context: Any = None  # the context class, made once rule_engine is imported


def _tables_path() -> Path | None:
    """The cache file for the parser tables (XDG cache dir), or None when there is no home."""
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        root = Path(base) if base else Path.home() / ".cache"
    except (RuntimeError, KeyError):  # a service user without a home directory
        return None
    return root / "daisee-node" / _TABLES_FILE


def _read_tables(path: Path) -> dict[str, Any] | None:
    try:
        tables = marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    keys = ("_tabversion", "_lr_method", "_lr_signature", "_lr_action", "_lr_goto")
    if not isinstance(tables, dict) or not all(k in tables for k in (*keys, "_lr_productions")):
        return None
    return tables


def _write_tables(path: Path, parser: Any) -> None:
    """Save the tables of rule-engine's freshly built parser, in the form PLY reads back."""
    from rule_engine._vendor.ply import yacc

    pdict = {name: getattr(parser, name) for name in dir(parser)}
    module = sys.modules[type(parser).__module__]
    pdict.setdefault("__file__", module.__file__)
    pdict.setdefault("__package__", module.__package__)
    reflect = yacc.ParserReflect(pdict, log=yacc.NullLogger())
    reflect.get_all()
    lr = parser._parser
    tables = {
        "_tabversion": yacc.__tabversion__,
        "_lr_method": "LALR",
        "_lr_signature": reflect.signature(),
        "_lr_action": lr.action,
        "_lr_goto": lr.goto,
        "_lr_productions": [
            (p.str, p.name, p.len, p.func, os.path.basename(p.file), p.line)
            if p.func
            else (str(p), p.name, p.len, None, None, None)
            for p in lr.productions
        ],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(marshal.dumps(tables))
        os.replace(partial, path)  # readers see the old file or the whole new one
    except (OSError, ValueError):
        pass  # a read-only home: the tables are built again next time


def _load() -> None:
    """Import rule_engine (once), with its parser tables from the cache when they are there."""
    global rule_engine, ast, errors, _Context
    if _Context is not None:
        return
    with _load_lock:
        if _Context is not None:
            return
        path = _tables_path()
        tables = _read_tables(path) if path is not None else None
        if tables is not None:
            module = types.ModuleType(_TABMODULE)
            module.__dict__.update(tables)
            sys.modules[_TABMODULE] = module
        try:
            import rule_engine
            import rule_engine.ast as ast
            from rule_engine import errors
            from rule_engine._vendor.ply import yacc
        finally:
            if tables is not None:
                sys.modules.pop(_TABMODULE, None)
        parser = rule_engine.Rule.parser
        if path is not None and not isinstance(parser._parser.productions[0], yacc.MiniProduction):
            # A speed-up only: a change inside PLY must never stop the rules.
            with contextlib.suppress(Exception):
                _write_tables(path, parser)  # built from the grammar: no or stale tables
        _Context = _make_context(rule_engine)


def _make_context(engine: types.ModuleType) -> type:
    class Context(engine.Context):  # type: ignore[name-defined]
        """Resolves dotted channel names against the node's values."""

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

    return Context


class _Partial:
    """A dotted name being read part by part (`battery` then `.soc_pct`)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class ExpressionError(ValueError):
    """An expression that is refused: it does not parse, or says what a rule may not say."""


class EvaluationError(ValueError):
    """One evaluation failed (a division by zero, a missing name): the expression stays valid."""


def _screen(text: str) -> None:
    """Refuse, from the tokens alone, whatever could hang or overflow the parser."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            f"expression too long: {len(text):,} characters (at most {MAX_LENGTH:,}); "
            "name parts of it in [derived]"
        )
    _load()
    lexer = rule_engine.Rule.parser._lexer.clone()  # a clone: the shared one is not thread-safe
    lexer.input(text)
    operators = 0
    previous = None
    try:
        while (token := lexer.token()) is not None:
            kind = token.type
            if kind == "ATTR" and previous != "SYMBOL":
                # `"text".length` or `(x).y`: attributes of values are evaluated by the parser.
                raise ExpressionError("'.' belongs inside channel names only (battery.soc_pct)")
            previous = kind
            if kind in _REGEX_TOKENS:
                raise ExpressionError(
                    f"regular expressions ({token.value}) are not allowed in rules; "
                    f"a rule may use {_ALLOWED}"
                )
            if kind in _BITWISE_TOKENS:
                raise ExpressionError(
                    f"bitwise operators ({token.value}) are not allowed in rules; "
                    f"a rule may use {_ALLOWED}"
                )
            if kind == "SYMBOL" and token.value.startswith("$"):
                raise ExpressionError(
                    f"built-in functions ({token.value}) are not allowed in rules; "
                    f"a rule may use {_ALLOWED}"
                )
            if kind in _OPERATOR_TOKENS:
                operators += 1
            elif kind not in _OPERAND_TOKENS and kind != "COMMENT":
                raise ExpressionError(
                    f"{str(token.value)[:20]!r} is not allowed in rules; a rule may use {_ALLOWED}"
                )
    except errors.EngineError as exc:
        raise ExpressionError(f"{_message(exc)} in {_short(text)}") from None
    if operators > MAX_OPERATORS:
        raise ExpressionError(
            f"expression too complex: {operators} operators (at most {MAX_OPERATORS}); "
            "name parts of it in [derived]"
        )


def _children(node: Any) -> Iterator[Any]:
    """The sub-expressions of a node of the screened grammar."""
    if isinstance(node, ast.Statement):
        yield node.expression
    elif isinstance(node, ast.BinaryExpressionBase):
        yield node.left
        yield node.right
    elif isinstance(node, ast.UnaryExpression):
        yield node.right
    elif isinstance(node, ast.GetAttributeExpression):
        yield node.object
    elif isinstance(node, ast.TernaryExpression):
        yield node.condition
        yield node.case_true
        yield node.case_false


def _depth(root: Any) -> int:
    """The depth of a tree, without recursion (the tree may be deeper than is safe to recurse)."""
    deepest = 0
    stack = [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in _children(node))
    return deepest


def _dotted(node: Any) -> str | None:
    """`a.b.c` for a chain of attributes on a symbol, else None."""
    parts = []
    while isinstance(node, ast.GetAttributeExpression):
        parts.append(node.name)
        node = node.object
    if isinstance(node, ast.SymbolExpression) and node.scope is None:
        parts.append(node.name)
        return ".".join(reversed(parts))
    return None


def _names(root: Any) -> set[str]:
    """The dotted names an expression reads."""
    out: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        name = (
            _dotted(node)
            if isinstance(node, ast.SymbolExpression | ast.GetAttributeExpression)
            else None
        )
        if name is not None:
            out.add(name)
        else:
            stack.extend(_children(node))
    return out


_KIND = {"number": "a number", "condition": "a condition", "text": "text"}
_OPS = {
    "add": "+", "sub": "-", "mul": "*", "tdiv": "/", "fdiv": "//", "mod": "%", "pow": "**",
    "eq": "==", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<=",
}  # fmt: skip


def _type(node: Any) -> str:
    """The kind of value a node gives: "number", "condition" or "text"; ExpressionError if its
    parts cannot go together. Names are numbers. Recursive: run it on screened trees only."""
    if isinstance(node, ast.Statement):
        return _type(node.expression)
    if isinstance(node, ast.FloatExpression):
        return "number"
    if isinstance(node, ast.BooleanExpression):
        return "condition"
    if isinstance(node, ast.StringExpression):
        return "text"
    if isinstance(node, ast.SymbolExpression | ast.GetAttributeExpression):
        if _dotted(node) is None:
            raise ExpressionError("attributes (.name) belong to channel names only")
        return "number"
    if isinstance(node, ast.UnaryExpression):
        operand = _type(node.right)
        if node.type == "not":
            if operand == "text":
                raise ExpressionError("type error: 'not' needs a condition, not text")
            return "condition"
        if operand != "number":
            raise ExpressionError(f"type error: '-' needs a number, not {_KIND[operand]}")
        return "number"
    if isinstance(node, ast.TernaryExpression):
        if _type(node.condition) == "text":
            raise ExpressionError("type error: the test of '?:' is text")
        case_true, case_false = _type(node.case_true), _type(node.case_false)
        if case_true != case_false:
            raise ExpressionError(
                f"type error: '?:' gives {_KIND[case_true]} or {_KIND[case_false]}"
            )
        return case_true
    if isinstance(node, ast.BinaryExpressionBase):
        left, right = _type(node.left), _type(node.right)
        if isinstance(node, ast.LogicExpression):
            if "text" in (left, right):
                raise ExpressionError(f"type error: '{node.type}' needs conditions, not text")
            return "condition"
        op = _OPS.get(node.type, node.type)
        if isinstance(node, ast.ArithmeticComparisonExpression) or not isinstance(
            node, ast.ComparisonExpression
        ):
            if left != "number" or right != "number":
                raise ExpressionError(
                    f"type error: '{op}' needs numbers, not {_KIND[left]} and {_KIND[right]}"
                )
            if op in ("/", "//", "%") and _is_zero(node.right):
                raise ExpressionError(f"division by zero ('{op} 0')")
            return "condition" if isinstance(node, ast.ComparisonExpression) else "number"
        if left != right:  # == and != across kinds are constant: a mistake, not a test
            raise ExpressionError(f"type error: '{op}' compares {_KIND[left]} with {_KIND[right]}")
        return "condition"
    raise ExpressionError(
        f"{type(node).__name__} is not allowed in rules; a rule may use {_ALLOWED}"
    )


def _is_zero(node: Any) -> bool:
    if not isinstance(node, ast.FloatExpression):
        return False
    try:
        return bool(node.value == 0)
    except (ArithmeticError, TypeError):
        return False


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    if message == "data type mismatch":
        message = "type error: a condition or text where a number is needed (or the reverse)"
    if isinstance(exc, decimal.DecimalException) or message.startswith("[<class"):
        message = f"arithmetic error ({type(exc).__name__})"
    return message


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


class Expression:
    """A compiled expression and the names it reads; refused (ExpressionError) unless it is
    within the bounds above and its parts go together."""

    def __init__(self, text: str, *, result: Result | None = None) -> None:
        self.text = text
        _screen(text)
        try:
            self._rule = rule_engine.Rule(text, context=_Context())
        except errors.EngineError as exc:
            raise ExpressionError(f"{_message(exc)} in {_short(text)}") from None
        except (
            ArithmeticError,
            ValueError,
            TypeError,
        ) as exc:  # constant parts folded by the parser
            raise ExpressionError(f"{_message(exc)} in {_short(text)}") from None
        except RecursionError:  # the screen makes this unreachable; never let it escape
            raise ExpressionError(f"expression nested too deeply in {_short(text)}") from None
        statement = self._rule.statement
        depth = _depth(statement) - 2  # operators on the longest path: not the statement or leaf
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"expression nested too deeply: {depth} levels (at most {MAX_DEPTH}; a chain "
                "of 'and' counts a level per term); name parts of it in [derived]"
            )
        kind = _type(statement)
        if result == "condition" and kind != "condition":
            raise ExpressionError(
                f"type error: a condition is needed (e.g. 'x > 0'), not {_KIND[kind]}"
            )
        if result == "number" and kind != "number":
            raise ExpressionError(f"type error: a number is needed, not {_KIND[kind]}")
        self.kind = kind
        self.names = frozenset(_names(statement))

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The value of the expression; `values` must hold every name it reads. EvaluationError
        when this evaluation fails."""
        try:
            return self._rule.evaluate(values)
        except errors.EngineError as exc:
            raise EvaluationError(_message(exc)) from None
        except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
            raise EvaluationError(_message(exc)) from None

    def test(self, values: Mapping[str, Any]) -> bool:
        """Whether the condition holds; EvaluationError when this evaluation fails."""
        value = self.evaluate(values)
        if isinstance(value, _Partial):
            raise EvaluationError(f"no value for {value.path}")
        return bool(value)


def check(text: str, known: Callable[[str], bool], *, result: Result | None = None) -> list[str]:
    """Problems with an expression: refused (see the module), or names that are not known.
    Takes a few milliseconds at most, whatever the text."""
    try:
        expression = Expression(text, result=result)
    except ExpressionError as exc:
        return [str(exc)]
    unknown = sorted(n for n in expression.names if not known(n))
    if unknown:
        return [f"unknown channel(s): {', '.join(unknown)}"]
    return []
