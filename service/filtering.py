"""Compile AIP-160 `filter` strings into SQLAlchemy boolean expressions with bound parameters."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, not_, or_

__all__ = [
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_LENGTH",
    "FieldKind",
    "FilterError",
    "FilterField",
    "compile_filter",
    "substring_has",
]

# Grammar (AIP-160 subset; note that OR binds tighter than AND, and juxtaposition is AND):
#   filter      = [expression]
#   expression  = sequence {"AND" sequence}
#   sequence    = factor {factor}
#   factor      = term {"OR" term}
#   term        = ["NOT" | "-"] simple
#   simple      = restriction | "(" expression ")"
#   restriction = FIELD comparator value
#   comparator  = "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
#   value       = STRING | ["-"] WORD

MAX_FILTER_LENGTH: Final = 2048
"""Longest accepted filter, in characters (Unicode code points)."""

MAX_FILTER_DEPTH: Final = 32
"""Deepest accepted nesting of parentheses and NOT."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_LIKE_ESCAPE: Final = "/"
_MAX_NAME_IN_MESSAGE: Final = 64

_INT_RE: Final = re.compile(r"-?[0-9]+")
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_ESCAPES: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
# Characters that end a bare word (besides white space).
_SPECIAL: Final = frozenset("()\"'=<>!:,\x00")
_NUL_MESSAGE: Final = "NUL character is not allowed"
_KEYWORDS: Final = frozenset({"AND", "OR", "NOT"})


class FieldKind(enum.Enum):
    """How a filter value is converted before it meets the column."""

    INT = enum.auto()
    STRING = enum.auto()
    TIMESTAMP = enum.auto()


@dataclass(frozen=True, slots=True)
class FilterField:
    """One filterable field.

    ``column`` takes the comparisons ``= != < <= > >=`` (None: not allowed); ``has`` builds
    the expression for ``field:value`` from the already-converted value (None: not allowed).
    """

    kind: FieldKind
    column: SQLColumnExpression[Any] | None
    has: Callable[[Any], ColumnElement[bool]] | None = None


class FilterError(ValueError):
    """A filter that cannot be compiled; ``position`` is the 0-based character offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.position = position

    def __reduce__(self) -> tuple[type[FilterError], tuple[str, int]]:
        return (type(self), (self.message, self.position))


def compile_filter(text: str, fields: Mapping[str, FilterField]) -> ColumnElement[bool] | None:
    """Compile ``text`` against ``fields``; None for an empty filter; FilterError if invalid."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(
            f"filter is longer than {MAX_FILTER_LENGTH} characters", MAX_FILTER_LENGTH
        )
    if not text or text.isspace():
        return None
    return _Parser(_tokenize(text), fields).parse()


def substring_has(column: SQLColumnExpression[Any]) -> Callable[[Any], ColumnElement[bool]]:
    """A ``has`` for ``field:value`` meaning "contains value, ignoring case" (LIKE-escaped)."""

    def has(value: Any) -> ColumnElement[bool]:
        pattern = "%" + _escape_like(str(value)) + "%"
        return column.ilike(pattern, escape=_LIKE_ESCAPE)

    return has


def _escape_like(value: str) -> str:
    return (
        value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
        .replace("%", _LIKE_ESCAPE + "%")
        .replace("_", _LIKE_ESCAPE + "_")
    )


# --- lexer -------------------------------------------------------------------------------


class _T(enum.Enum):
    WORD = enum.auto()
    STRING = enum.auto()
    LPAREN = enum.auto()
    RPAREN = enum.auto()
    COMPARATOR = enum.auto()
    MINUS = enum.auto()
    AND = enum.auto()
    OR = enum.auto()
    NOT = enum.auto()
    END = enum.auto()


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _T
    text: str  # a word as written, a string literal's decoded value, or the symbol
    pos: int
    end: int


def _tokenize(text: str) -> Iterator[_Token]:
    """Tokens on demand, so that faults are reported in the order they appear in the text."""
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "(":
            yield _Token(_T.LPAREN, ch, i, i + 1)
            i += 1
        elif ch == ")":
            yield _Token(_T.RPAREN, ch, i, i + 1)
            i += 1
        elif ch in "<>!":
            op = text[i : i + 2] if text[i + 1 : i + 2] == "=" else ch
            if op == "!":
                raise FilterError("unexpected '!' (the operator is '!=')", i)
            yield _Token(_T.COMPARATOR, op, i, i + len(op))
            i += len(op)
        elif ch in "=:":
            yield _Token(_T.COMPARATOR, ch, i, i + 1)
            i += 1
        elif ch == "-":
            yield _Token(_T.MINUS, ch, i, i + 1)
            i += 1
        elif ch == '"':
            token = _string_literal(text, i)
            yield token
            i = token.end
        elif ch == "'":
            raise FilterError("string literals use double quotes", i)
        elif ch == "\x00":
            raise FilterError(_NUL_MESSAGE, i)
        elif ch in _SPECIAL:
            raise FilterError(f"unexpected '{ch}'", i)
        else:
            start = i
            i += 1
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            word = text[start:i]
            kind = _T[word] if word in _KEYWORDS else _T.WORD
            yield _Token(kind, word, start, i)
    while True:
        yield _Token(_T.END, "", n, n)


def _string_literal(text: str, start: int) -> _Token:
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return _Token(_T.STRING, "".join(out), start, i + 1)
        if ch == "\x00":
            raise FilterError(_NUL_MESSAGE, i)
        if ch == "\\":
            if i + 1 >= n:
                break
            escaped = _ESCAPES.get(text[i + 1])
            if escaped is None:
                raise FilterError(f"unknown escape sequence '\\{text[i + 1]}'", i)
            out.append(escaped)
            i += 2
        else:
            out.append(ch)
            i += 1
    raise FilterError("unterminated string literal", start)


# --- parser ------------------------------------------------------------------------------

_TERM_START: Final = frozenset({_T.WORD, _T.LPAREN, _T.NOT, _T.MINUS})


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str
    quoted: bool
    pos: int


def _shorten(name: str) -> str:
    if len(name) <= _MAX_NAME_IN_MESSAGE:
        return name
    return name[: _MAX_NAME_IN_MESSAGE - 3] + "..."


def _describe(token: _Token) -> str:
    if token.kind is _T.END:
        return "end of filter"
    if token.kind is _T.STRING:
        return "string literal"
    return f"'{_shorten(token.text)}'"


def _all_of(parts: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    return parts[0] if len(parts) == 1 else and_(*parts)


class _Parser:
    def __init__(self, tokens: Iterator[_Token], fields: Mapping[str, FilterField]) -> None:
        self._tokens = tokens
        self._fields = fields
        self._current: _Token | None = None  # lexed lazily: see _tokenize
        self._depth = 0

    def parse(self) -> ColumnElement[bool]:
        expr = self._expression(None)
        token = self._peek()
        if token.kind is _T.RPAREN:
            raise FilterError("unbalanced ')'", token.pos)
        if token.kind is not _T.END:
            raise FilterError(f"unexpected {_describe(token)}", token.pos)
        return expr

    def _peek(self) -> _Token:
        if self._current is None:
            self._current = next(self._tokens)
        return self._current

    def _next(self) -> _Token:
        token = self._peek()
        self._current = None
        return token

    def _enter(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_FILTER_DEPTH:
            raise FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels", token.pos)

    def _expression(self, after: _Token | None) -> ColumnElement[bool]:
        parts = [self._sequence(after)]
        while self._peek().kind is _T.AND:
            op = self._next()
            parts.append(self._sequence(op))
        return _all_of(parts)

    def _sequence(self, after: _Token | None) -> ColumnElement[bool]:
        parts = [self._factor(after)]
        while self._peek().kind in _TERM_START:
            parts.append(self._factor(None))
        return _all_of(parts)

    def _factor(self, after: _Token | None) -> ColumnElement[bool]:
        parts = [self._term(after)]
        while self._peek().kind is _T.OR:
            op = self._next()
            parts.append(self._term(op))
        return parts[0] if len(parts) == 1 else or_(*parts)

    def _term(self, after: _Token | None) -> ColumnElement[bool]:
        token = self._peek()
        if token.kind not in (_T.NOT, _T.MINUS):
            return self._simple(after)
        self._next()
        if token.kind is _T.MINUS and self._peek().pos != token.end:
            raise FilterError("'-' must be directly followed by the term it negates", token.pos)
        self._enter(token)
        inner = self._simple(token)
        self._depth -= 1
        return not_(inner)

    def _simple(self, after: _Token | None) -> ColumnElement[bool]:
        token = self._peek()
        if token.kind is _T.WORD:
            return self._restriction()
        if token.kind is not _T.LPAREN:
            raise self._missing_operand(token, after)
        self._next()
        self._enter(token)
        inner = self._expression(token)
        close = self._peek()
        if close.kind is _T.END:
            raise FilterError("unbalanced '(' (missing ')')", token.pos)
        if close.kind is not _T.RPAREN:
            raise FilterError(f"expected ')' but found {_describe(close)}", close.pos)
        self._next()
        self._depth -= 1
        return inner

    @staticmethod
    def _missing_operand(token: _Token, after: _Token | None) -> FilterError:
        if after is not None and after.kind is _T.LPAREN and token.kind is _T.RPAREN:
            return FilterError("empty parentheses", after.pos)
        if token.kind in (_T.END, _T.RPAREN, _T.AND, _T.OR) and after is not None:
            return FilterError(f"missing operand after '{after.text}'", token.pos)
        if token.kind in (_T.AND, _T.OR):
            return FilterError(f"missing operand before '{token.text}'", token.pos)
        if token.kind is _T.RPAREN:
            return FilterError("unbalanced ')'", token.pos)
        if token.kind is _T.COMPARATOR:
            return FilterError(f"missing field name before '{token.text}'", token.pos)
        if after is not None and after.kind in (_T.NOT, _T.MINUS):
            return FilterError(
                f"expected a field name or '(' after '{after.text}' but found {_describe(token)}",
                token.pos,
            )
        return FilterError(
            f"expected a field name, '(' or NOT but found {_describe(token)}", token.pos
        )

    def _restriction(self) -> ColumnElement[bool]:
        name = self._next()
        field = self._fields.get(name.text)
        if field is None:
            raise FilterError(f"unknown field '{_shorten(name.text)}'", name.pos)
        op = self._peek()
        if op.kind is not _T.COMPARATOR:
            raise FilterError(
                f"expected an operator after field '{name.text}' but found {_describe(op)}",
                op.pos,
            )
        self._next()
        if op.text == ":":
            if field.has is None:
                raise self._unsupported(op, name)
            value, _ = _convert(name.text, field.kind, self._value(op))
            return field.has(value)
        if field.column is None:
            raise self._unsupported(op, name)
        value, inexact = _convert(name.text, field.kind, self._value(op))
        return _compare(field.column, op.text, value, inexact)

    @staticmethod
    def _unsupported(op: _Token, name: _Token) -> FilterError:
        return FilterError(f"operator '{op.text}' is not supported on field '{name.text}'", op.pos)

    def _value(self, op: _Token) -> _Literal:
        token = self._next()
        if token.kind is _T.STRING:
            return _Literal(token.text, True, token.pos)
        if token.kind is _T.WORD:
            return _Literal(token.text, False, token.pos)
        if token.kind is _T.MINUS:
            word = self._peek()
            if word.pos == token.end and word.kind in (_T.WORD, _T.AND, _T.OR, _T.NOT):
                self._next()
                return _Literal("-" + word.text, False, token.pos)
            raise FilterError("'-' must be directly followed by a number or word", token.pos)
        if token.kind in (_T.AND, _T.OR, _T.NOT):
            raise FilterError(
                f"expected a value after '{op.text}' but found the keyword '{token.text}' "
                "(quote it to use it as text)",
                token.pos,
            )
        raise FilterError(f"missing value after '{op.text}'", token.pos)


# --- values ------------------------------------------------------------------------------


def _convert(name: str, kind: FieldKind, literal: _Literal) -> tuple[object, bool]:
    """The Python value for ``literal`` and whether it was rounded down (timestamps only)."""
    if kind is FieldKind.STRING:
        return literal.text, False
    if kind is FieldKind.INT:
        if not _INT_RE.fullmatch(literal.text):
            raise FilterError(f"field '{name}' needs an integer value", literal.pos)
        number = int(literal.text)
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise FilterError(f"integer out of range for field '{name}'", literal.pos)
        return number, False
    if not literal.quoted:
        raise FilterError(
            f"field '{name}' needs a quoted RFC 3339 timestamp, such as \"2024-01-02T03:04:05Z\"",
            literal.pos,
        )
    parsed = _parse_timestamp(literal.text)
    if parsed is None:
        raise FilterError(f"invalid RFC 3339 timestamp for field '{name}'", literal.pos)
    return parsed


def _parse_timestamp(text: str) -> tuple[datetime, bool] | None:
    """UTC datetime rounded down to the microsecond, and whether rounding lost anything."""
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    fraction, sign, off_hours, off_minutes = m.group(7, 8, 9, 10)
    fraction = fraction or ""
    micro = int(fraction[:6].ljust(6, "0"))
    inexact = fraction[6:].strip("0") != ""
    tz = UTC
    if sign is not None:
        if int(off_hours) > 23 or int(off_minutes) > 59:
            return None
        offset = timedelta(hours=int(off_hours), minutes=int(off_minutes))
        tz = timezone(-offset if sign == "-" else offset)
    try:
        return datetime(year, month, day, hour, minute, second, micro, tz).astimezone(UTC), inexact
    except (ValueError, OverflowError):
        return None


def _compare(
    column: SQLColumnExpression[Any], op: str, value: object, inexact: bool
) -> ColumnElement[bool]:
    if inexact:
        # ``value`` is a timestamp rounded down from one with sub-microsecond digits. Stored
        # timestamps have microsecond resolution, so none equals the original: compare against
        # the rounded value so that the answer is exact (and NULL stays NULL).
        if op == "=":
            return and_(column > value, column <= value)
        if op == "!=":
            return or_(column <= value, column > value)
        return column <= value if op in ("<", "<=") else column > value
    if op == "=":
        return column == value
    if op == "!=":
        return column != value
    if op == "<":
        return column < value
    if op == "<=":
        return column <= value
    if op == ">":
        return column > value
    return column >= value
