"""Tests for service.filtering: the AIP-160 filter compiler, run against a real SQLite table."""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.filtering import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    FieldKind,
    FilterError,
    FilterField,
    compile_filter,
    substring_has,
)

metadata = sa.MetaData()
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("username", sa.String(32), nullable=False),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("bio", sa.String, nullable=False, default=""),
    sa.Column("score", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)
user_tags = sa.Table(
    "user_tags",
    metadata,
    sa.Column("user_id", sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("tag", sa.String(32), primary_key=True),
)

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)

# id, username, display_name, score, create_time, tags
ROWS: list[tuple[int, str, str, int, datetime, tuple[str, ...]]] = [
    (1, "alice", "Alice Liddell", 10, T0, ("go", "python")),
    (2, "bob", "Bob the 100% Builder", -5, T0 + timedelta(microseconds=1), ("go",)),
    (3, "carol", "Carol_Danvers", 0, T0 + timedelta(seconds=1), ()),
    (4, "dave", 'Dave "The Rave" O\\Neil', 2**63 - 1, T0 + timedelta(days=1), ("rust",)),
    (5, "123", "a/b path%_", -(2**63), T0 - timedelta(days=365), ("python",)),
    (6, "AND", "Ünïcödé ÉMILE", 7, T0 + timedelta(hours=5), ("go", "rust")),
    (7, "tab", "line\nbreak\tand tab", 7, T0 + timedelta(minutes=1), ()),
]
ALL = {row[0] for row in ROWS}


def _has_tag(value: Any) -> sa.ColumnElement[bool]:
    return sa.exists().where(user_tags.c.user_id == users.c.id, user_tags.c.tag == value)


FIELDS: dict[str, FilterField] = {
    "id": FilterField(FieldKind.INT, users.c.id),
    "username": FilterField(FieldKind.STRING, users.c.username),
    "display_name": FilterField(
        FieldKind.STRING, users.c.display_name, substring_has(users.c.display_name)
    ),
    "score": FilterField(FieldKind.INT, users.c.score),
    "create_time": FilterField(FieldKind.TIMESTAMP, users.c.create_time),
    "tags": FilterField(FieldKind.STRING, None, _has_tag),
}


@pytest.fixture(scope="module")
def engine() -> Iterator[sa.Engine]:
    eng = sa.create_engine("sqlite://")
    metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {
                    "id": i,
                    "username": u,
                    "display_name": d,
                    "score": s,
                    "create_time": t,
                }
                for i, u, d, s, t, _ in ROWS
            ],
        )
        conn.execute(
            user_tags.insert(),
            [{"user_id": i, "tag": tag} for i, *_, tags in ROWS for tag in tags],
        )
    yield eng
    eng.dispose()


@pytest.fixture
def run(engine: sa.Engine) -> Callable[[str], set[int]]:
    def run(text: str) -> set[int]:
        where = compile_filter(text, FIELDS)
        stmt = sa.select(users.c.id)
        if where is not None:
            stmt = stmt.where(where)
        with engine.connect() as conn:
            return set(conn.scalars(stmt))

    return run


# --- results against SQLite -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # INT comparisons
        ("id = 1", {1}),
        ("id=1", {1}),
        ("id != 1", ALL - {1}),
        ("id < 3", {1, 2}),
        ("id <= 3", {1, 2, 3}),
        ("id > 5", {6, 7}),
        ("id >= 5", {5, 6, 7}),
        ('id = "3"', {3}),
        ("score = -5", {2}),
        ("score<-4", {2, 5}),
        ("score >= -0", ALL - {2, 5}),
        ("score = 007", {6, 7}),
        (f"score = {2**63 - 1}", {4}),
        (f"score = {-(2**63)}", {5}),
        # STRING comparisons
        ('username = "alice"', {1}),
        ("username = alice", {1}),
        ("username = 123", {5}),
        ('username = "123"', {5}),
        ('username = "AND"', {6}),
        ('username != "alice"', ALL - {1}),
        ('username < "bob"', {5, 6, 1}),
        ('username >= "carol"', {3, 4, 7}),
        ('username = "ALICE"', set()),
        ('username = ""', set()),
        ("display_name = Carol_Danvers", {3}),
        ('display_name = "Dave \\"The Rave\\" O\\\\Neil"', {4}),
        ('display_name = "line\\nbreak\\tand tab"', {7}),
        ('display_name = "line\\nbreak\\tand\\ttab"', set()),
        ('display_name = "Ünïcödé ÉMILE"', {6}),
        # has: case-insensitive substring with LIKE metacharacters taken literally
        ('display_name:"alice"', {1}),
        ("display_name:LIDDELL", {1}),
        ('display_name:"100%"', {2}),
        ('display_name:"%"', {2, 5}),
        ('display_name:"_"', {3, 5}),
        ('display_name:"l_d"', {3}),
        ('display_name:"e_l"', set()),
        ("display_name:e%l", set()),
        ('display_name:"a/b"', {5}),
        ('display_name:"/"', {5}),
        ('display_name:"%_"', {5}),
        ('display_name:"\\\\"', {4}),
        ('display_name:"\\""', {4}),
        ('display_name:""', ALL),
        ("display_name:the", {2, 4}),
        ('display_name:"\\n"', {7}),
        ("display_name:é", {6}),
        # has: a many-to-many "tags" field
        ('tags:"go"', {1, 2, 6}),
        ("tags:rust", {4, 6}),
        ("tags:java", set()),
        # TIMESTAMP comparisons
        ('create_time = "2024-01-02T03:04:05Z"', {1}),
        ('create_time = "2024-01-02t03:04:05z"', {1}),
        ('create_time = "2024-01-02T03:04:05.000000Z"', {1}),
        ('create_time = "2024-01-02T03:04:05.000001Z"', {2}),
        ('create_time = "2024-01-02T03:04:05.000001000Z"', {2}),
        ('create_time = "2024-01-02T08:04:05+05:00"', {1}),
        ('create_time = "2024-01-01T22:34:05-04:30"', {1}),
        ('create_time = "2024-01-02T03:04:05-00:00"', {1}),
        ('create_time = "2024-01-02T03:04:06.0+00:00"', {3}),
        ('create_time < "2024-01-02T03:04:05Z"', {5}),
        ('create_time <= "2024-01-02T03:04:05Z"', {1, 5}),
        ('create_time > "2024-01-02T03:04:05Z"', ALL - {1, 5}),
        ('create_time >= "2024-01-02T03:05:05Z"', {4, 6, 7}),
        ('create_time != "2024-01-02T03:04:05Z"', ALL - {1}),
        # sub-microsecond digits: exact answers even though storage has microseconds
        ('create_time = "2024-01-02T03:04:05.0000005Z"', set()),
        ('create_time != "2024-01-02T03:04:05.0000005Z"', ALL),
        ('create_time < "2024-01-02T03:04:05.0000005Z"', {1, 5}),
        ('create_time <= "2024-01-02T03:04:05.0000005Z"', {1, 5}),
        ('create_time > "2024-01-02T03:04:05.0000005Z"', ALL - {1, 5}),
        ('create_time >= "2024-01-02T03:04:05.0000005Z"', ALL - {1, 5}),
        ('create_time < "2024-01-02T03:04:05.000000999999Z"', {1, 5}),
        ('create_time > "2024-01-02T03:04:04.999999999Z"', ALL - {5}),
        # boolean structure
        ("id = 1 AND username = alice", {1}),
        ("id = 1 AND username = bob", set()),
        ("id = 1 OR id = 2", {1, 2}),
        ("id = 1 OR id = 2 OR id = 3", {1, 2, 3}),
        ("NOT id = 1", ALL - {1}),
        ("-id = 1", ALL - {1}),
        ("NOT(id = 1)", ALL - {1}),
        ("-(id = 1 OR id = 2)", ALL - {1, 2}),
        ("NOT (id < 3 OR id > 5)", {3, 4, 5}),
        ("NOT tags:go", {3, 4, 5, 7}),
        ("((id = 1))", {1}),
        ("(id = 1 OR id = 2) AND (id = 2 OR id = 3)", {2}),
        # AIP-160: OR binds tighter than AND, so this is id = 3 AND (id = 1 OR id = 3)
        ("id = 3 AND id = 1 OR id = 3", {3}),
        ("id = 1 OR id = 3 AND id = 3", {3}),
        ("id = 2 AND id = 1 OR id = 1", set()),
        ("(id = 3 AND id = 1) OR id = 3", {3}),
        ("(id = 1 OR id = 3) AND id = 1", {1}),
        ("id = 1 OR (id = 3 AND id = 3)", {1, 3}),
        ("id = 1 OR id = 2 AND id = 2 OR id = 3", {2}),
        # juxtaposition is AND, and is also weaker than OR
        ("id > 1 id < 4", {2, 3}),
        ("tags:go tags:python", {1}),
        ("id = 3 id = 1 OR id = 3", {3}),
        ("id >= 2 tags:go AND NOT display_name:bob", {6}),
        ("(id=1)(id=1)", {1}),
        # keywords are upper case only; other cases are ordinary words (values here)
        ("username = alice OR username = bob", {1, 2}),
        ('username = "OR" OR username = "AND"', {6}),
        ("username = -AND", set()),
        ("username=-5", set()),
        # white space of any kind
        ("\tid\n=\r\n1\u00a0", {1}),
        ("  ", ALL),
        ("", ALL),
    ],
)
def test_results(run: Callable[[str], set[int]], text: str, expected: set[int]) -> None:
    assert run(text) == expected


def test_empty_filter_is_none() -> None:
    assert compile_filter("", FIELDS) is None
    assert compile_filter(" \t\r\n ", FIELDS) is None
    assert compile_filter("", {}) is None


# --- a randomised cross-check against a Python evaluation of the same expression ---------


@dataclass(frozen=True)
class _Node:
    op: str  # "cmp", "has", "not", "minus", "and", "seq", "or"
    children: tuple[_Node, ...] = ()
    text: str = ""
    predicate: Callable[[tuple[Any, ...]], bool] | None = None


_PRECEDENCE = {"and": 0, "seq": 1, "or": 2}


def _render(node: _Node, parent: int = -1) -> str:
    if node.op in ("cmp", "has"):
        return node.text
    if node.op in ("not", "minus"):
        child = node.children[0]
        inner = _render(child)
        if child.op not in ("cmp", "has"):
            inner = f"({inner})"
        return f"NOT {inner}" if node.op == "not" else f"-{inner}"
    level = _PRECEDENCE[node.op]
    joiner = {"and": " AND ", "seq": " ", "or": " OR "}[node.op]
    # parenthesise a child only when its operator binds no tighter than this one
    text = joiner.join(_render(c, level) for c in node.children)
    return f"({text})" if level <= parent else text


def _evaluate(node: _Node, row: tuple[Any, ...]) -> bool:
    if node.predicate is not None:
        return node.predicate(row)
    if node.op in ("not", "minus"):
        return not _evaluate(node.children[0], row)
    if node.op == "or":
        return any(_evaluate(c, row) for c in node.children)
    return all(_evaluate(c, row) for c in node.children)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _leaf(rng: random.Random) -> _Node:
    op = rng.choice(list(_OPS))
    pick = rng.randrange(4)
    if pick == 0:
        value = rng.randint(0, 8)
        return _Node("cmp", text=f"id {op} {value}", predicate=lambda r: _OPS[op](r[0], value))
    if pick == 1:
        name = rng.choice(["alice", "bob", "carol", "dave", "eve", "123"])
        return _Node("cmp", text=f'username{op}"{name}"', predicate=lambda r: _OPS[op](r[1], name))
    if pick == 2:
        score = rng.choice([-5, 0, 7, 10, 11])
        return _Node("cmp", text=f"score {op} {score}", predicate=lambda r: _OPS[op](r[3], score))
    tag = rng.choice(["go", "python", "rust", "java"])
    return _Node("has", text=f"tags:{tag}", predicate=lambda r: tag in r[5])


def _tree(rng: random.Random, depth: int) -> _Node:
    if depth == 0 or rng.random() < 0.3:
        return _leaf(rng)
    op = rng.choice(["not", "minus", "and", "seq", "or", "and", "or"])
    if op in ("not", "minus"):
        return _Node(op, (_tree(rng, depth - 1),))
    return _Node(op, tuple(_tree(rng, depth - 1) for _ in range(rng.randint(2, 3))))


def test_random_expressions_match_python_evaluation(run: Callable[[str], set[int]]) -> None:
    rng = random.Random(160)
    for _ in range(400):
        tree = _tree(rng, 4)
        text = _render(tree)
        expected = {row[0] for row in ROWS if _evaluate(tree, row)}
        assert run(text) == expected, text


# --- bound parameters, never SQL text -----------------------------------------------------


def test_values_are_bound_parameters(run: Callable[[str], set[int]]) -> None:
    hostile = "x' OR '1'='1"
    text = f'username = "{hostile}" OR display_name:"{hostile}" OR score = 42'
    expr = compile_filter(text, FIELDS)
    assert expr is not None
    compiled = expr.compile(dialect=sqlite.dialect())
    sql = str(compiled)
    assert "'1'" not in sql
    assert "42" not in sql
    assert hostile in compiled.params.values()
    assert 42 in compiled.params.values()
    assert run(text) == set()


def test_substring_has_sql() -> None:
    has = substring_has(users.c.display_name)
    pg = PGDialect()  # type: ignore[no-untyped-call]
    compiled = has("50%_a/b").compile(dialect=pg)
    assert "ILIKE" in str(compiled)
    assert "ESCAPE '/'" in str(compiled)
    assert list(compiled.params.values()) == ["%50/%/_a//b%"]
    compiled = has(12).compile(dialect=sqlite.dialect())
    assert list(compiled.params.values()) == ["%12%"]


def test_has_receives_converted_values() -> None:
    received: list[Any] = []

    def record(value: Any) -> sa.ColumnElement[bool]:
        received.append(value)
        return sa.true()

    fields = {
        "n": FilterField(FieldKind.INT, None, record),
        "s": FilterField(FieldKind.STRING, None, record),
        "t": FilterField(FieldKind.TIMESTAMP, None, record),
    }
    compile_filter('n:"5" n:-7 s:12 s:"a\\tb" s:-x t:"2024-01-02T04:04:05.1234569+01:00"', fields)
    assert received == [
        5,
        -7,
        "12",
        "a\tb",
        "-x",
        datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    ]
    assert received[-1].utcoffset() == timedelta(0)


def test_timestamp_values_are_aware_utc() -> None:
    expr = compile_filter('create_time >= "2024-06-30T23:59:59.5-07:00"', FIELDS)
    assert expr is not None
    (value,) = expr.compile().params.values()
    assert value == datetime(2024, 7, 1, 6, 59, 59, 500000, tzinfo=UTC)
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


def test_orm_attributes_work_as_columns() -> None:
    class Base(DeclarativeBase):
        pass

    class Thing(Base):
        __tablename__ = "things"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str]

    fields = {
        "id": FilterField(FieldKind.INT, Thing.id),
        "title": FilterField(FieldKind.STRING, Thing.title, substring_has(Thing.title)),
    }
    expr = compile_filter('id > 1 AND title:"x"', fields)
    assert expr is not None
    sql = str(expr.compile(dialect=sqlite.dialect()))
    assert sql == "things.id > ? AND lower(things.title) LIKE lower(?) ESCAPE '/'"


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        # unknown fields (including ones that exist but are not filterable), case-sensitive
        ("bio = x", 0, "unknown field 'bio'"),
        ("  bio:x", 2, "unknown field 'bio'"),
        ("ID = 1", 0, "unknown field 'ID'"),
        ("id = 1 AND Username = x", 11, "unknown field 'Username'"),
        ("id = 1 and id = 2", 7, "unknown field 'and'"),
        ("id = 1 or id = 2", 7, "unknown field 'or'"),
        ("not id = 1", 0, "unknown field 'not'"),
        ("author.name = x", 0, "unknown field 'author.name'"),
        ("x" * 100 + "=1", 0, "unknown field '" + "x" * 61 + "...'"),
        ("bio=1 \x00", 0, "unknown field 'bio'"),
        ('bio=1 "unterminated', 0, "unknown field 'bio'"),
        # operators a field does not allow
        ("id:1", 2, "operator ':' is not supported on field 'id'"),
        ("username : x", 9, "operator ':' is not supported on field 'username'"),
        ("tags = go", 5, "operator '=' is not supported on field 'tags'"),
        ("tags<go", 4, "operator '<' is not supported on field 'tags'"),
        # missing or misplaced pieces
        ("id", 2, "expected an operator after field 'id' but found end of filter"),
        ("id 1", 3, "expected an operator after field 'id' but found '1'"),
        ('id "1"', 3, "expected an operator after field 'id' but found string literal"),
        ("id =", 4, "missing value after '='"),
        ("id = )", 5, "missing value after '='"),
        ("id = = 1", 5, "missing value after '='"),
        ("id == 1", 4, "missing value after '='"),
        ("id = (1)", 5, "missing value after '='"),
        ("id = AND", 5, "found the keyword 'AND'"),
        ("username = NOT", 11, "found the keyword 'NOT'"),
        ("id = - 1", 5, "'-' must be directly followed by a number or word"),
        ("id = --1", 5, "'-' must be directly followed by a number or word"),
        ("= 1", 0, "missing field name before '='"),
        ('"id" = 1', 0, "expected a field name, '(' or NOT but found string literal"),
        ("AND id = 1", 0, "missing operand before 'AND'"),
        ("OR id = 1", 0, "missing operand before 'OR'"),
        ("id = 1 AND", 10, "missing operand after 'AND'"),
        ("id = 1 AND   ", 13, "missing operand after 'AND'"),
        ("id = 1 OR", 9, "missing operand after 'OR'"),
        ("id = 1 AND AND id = 2", 11, "missing operand after 'AND'"),
        ("id = 1 OR AND id = 2", 10, "missing operand after 'OR'"),
        ("id = 1 AND OR id = 2", 11, "missing operand after 'AND'"),
        ("NOT", 3, "missing operand after 'NOT'"),
        ("-", 1, "missing operand after '-'"),
        ("NOT NOT id = 1", 4, "expected a field name or '(' after 'NOT' but found 'NOT'"),
        ("NOT -id = 1", 4, "expected a field name or '(' after 'NOT' but found '-'"),
        ("- id = 1", 0, "'-' must be directly followed by the term it negates"),
        ("id = 1 - id = 2", 7, "'-' must be directly followed by the term it negates"),
        # parentheses
        ("()", 0, "empty parentheses"),
        ("id = 1 AND ( )", 11, "empty parentheses"),
        ("(id = 1", 0, "unbalanced '(' (missing ')')"),
        ("((id = 1)", 0, "unbalanced '(' (missing ')')"),
        ("(id = 1 OR (id = 2)", 0, "unbalanced '(' (missing ')')"),
        ("id = 1)", 6, "unbalanced ')'"),
        (")", 0, "unbalanced ')'"),
        ("(id = 1))", 8, "unbalanced ')'"),
        ("(id = 1 AND)", 11, "missing operand after 'AND'"),
        ('(id = 1 "x")', 8, "expected ')' but found string literal"),
        # trailing garbage
        ('id = 1 "x"', 7, "unexpected string literal"),
        ("id = 1 = 2", 7, "unexpected '='"),
        ("id = 1 :", 7, "unexpected ':'"),
        # lexical faults
        ("id ! 1", 3, "unexpected '!' (the operator is '!=')"),
        ("id = 1,2", 6, "unexpected ','"),
        ("username = 'alice'", 11, "string literals use double quotes"),
        ('username = "alice', 11, "unterminated string literal"),
        ('username = "alice\\"', 11, "unterminated string literal"),
        ('username = "alice\\', 11, "unterminated string literal"),
        ('username = "a\\qb"', 13, "unknown escape sequence '\\q'"),
        ('username = "a\\u0041"', 13, "unknown escape sequence '\\u'"),
        ("\x00", 0, "NUL character is not allowed"),
        ("id = 1\x00", 6, "NUL character is not allowed"),
        ('username = "a\x00b"', 13, "NUL character is not allowed"),
        ("id = 1 AND \x00", 11, "NUL character is not allowed"),
        # INT values
        ("id = abc", 5, "field 'id' needs an integer value"),
        ('id = "abc"', 5, "field 'id' needs an integer value"),
        ('id = " 1"', 5, "field 'id' needs an integer value"),
        ('id = ""', 5, "field 'id' needs an integer value"),
        ("id = 1.5", 5, "field 'id' needs an integer value"),
        ("id = 1e3", 5, "field 'id' needs an integer value"),
        ("id = 0x10", 5, "field 'id' needs an integer value"),
        ("id = 1_000", 5, "field 'id' needs an integer value"),
        ("id = \u0661", 5, "field 'id' needs an integer value"),  # ARABIC-INDIC DIGIT ONE
        ("id = +1", 5, "field 'id' needs an integer value"),
        ("id = -x", 5, "field 'id' needs an integer value"),
        ("id=1AND id=2", 3, "field 'id' needs an integer value"),
        (f"id = {2**63}", 5, "integer out of range for field 'id'"),
        (f"id = {-(2**63) - 1}", 5, "integer out of range for field 'id'"),
        (f'score = "{2**64}"', 8, "integer out of range for field 'score'"),
        # TIMESTAMP values
        ("create_time = 2024", 14, "field 'create_time' needs a quoted RFC 3339 timestamp"),
        ("create_time > 2024-01-02", 14, "needs a quoted RFC 3339 timestamp"),
        ('create_time > "2024-01-02"', 14, "invalid RFC 3339 timestamp for field 'create_time'"),
        ('create_time > "2024-01-02T03:04:05"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02 03:04:05Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-1-02T03:04:05Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T03:04:05.Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T03:04:05+0100"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > " 2024-01-02T03:04:05Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-02-30T03:04:05Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-13-01T03:04:05Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T24:00:00Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T03:60:00Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2016-12-31T23:59:60Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T03:04:05+24:00"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "2024-01-02T03:04:05+01:60"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "0000-01-01T00:00:00Z"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "0001-01-01T00:00:00+01:00"', 14, "invalid RFC 3339 timestamp"),
        ('create_time > "9999-12-31T23:59:59-01:00"', 14, "invalid RFC 3339 timestamp"),
        (
            'create_time > "\uff12\uff10\uff12\uff14-01-02T03:04:05Z"',
            14,
            "invalid RFC 3339 timestamp",
        ),
        ('id = 1 AND create_time < "yesterday"', 25, "invalid RFC 3339 timestamp"),
    ],
)
def test_errors(text: str, position: int, message: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text, FIELDS)
    assert info.value.position == position
    assert message in info.value.message
    assert str(info.value) == f"{info.value.message} at position {position}"


def test_filter_error_shape() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("bio = x", FIELDS)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.message == "unknown field 'bio'"
    assert err.position == 0
    assert str(err) == "unknown field 'bio' at position 0"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.message, copy.position, str(copy)) == (err.message, err.position, str(err))


def test_timestamp_range_edges(run: Callable[[str], set[int]]) -> None:
    assert run('create_time > "0001-01-01T00:00:00Z"') == ALL
    assert run('create_time < "9999-12-31T23:59:59.999999999Z"') == ALL
    assert run('create_time >= "9999-12-31T23:59:59.9999999Z"') == set()
    assert run('create_time < "0001-01-01T01:00:00+01:00"') == set()


# --- limits ---------------------------------------------------------------------------


def test_length_limit(run: Callable[[str], set[int]]) -> None:
    clause = "id = 1 OR "
    text = (clause * (MAX_FILTER_LENGTH // len(clause)))[:-4]
    text += " " * (MAX_FILTER_LENGTH - len(text))
    assert len(text) == MAX_FILTER_LENGTH
    assert run(text) == {1}
    with pytest.raises(FilterError) as info:
        compile_filter(text + " ", FIELDS)
    assert info.value.position == MAX_FILTER_LENGTH
    assert "longer than 2048 characters" in info.value.message
    with pytest.raises(FilterError):
        compile_filter(" " * (MAX_FILTER_LENGTH + 1), FIELDS)


def test_many_terms_at_the_length_limit(run: Callable[[str], set[int]]) -> None:
    for joiner in (" AND ", " OR ", " "):
        terms = ["id>0"] * ((MAX_FILTER_LENGTH + len(joiner)) // (4 + len(joiner)))
        text = joiner.join(terms)
        assert len(text) <= MAX_FILTER_LENGTH
        assert run(text) == ALL


def test_depth_limit(run: Callable[[str], set[int]]) -> None:
    depth = MAX_FILTER_DEPTH
    assert run("(" * depth + "id = 1" + ")" * depth) == {1}
    assert run("(" * (depth - 1) + "NOT id = 1" + ")" * (depth - 1)) == ALL - {1}
    with pytest.raises(FilterError) as info:
        compile_filter("(" * (depth + 1) + "id = 1" + ")" * (depth + 1), FIELDS)
    assert info.value.position == depth
    assert "nested deeper than 32 levels" in info.value.message
    with pytest.raises(FilterError) as info:
        compile_filter("(" * depth + "NOT id = 1" + ")" * depth, FIELDS)
    assert info.value.position == depth
    with pytest.raises(FilterError) as info:
        compile_filter("(" * 1000, FIELDS)
    assert info.value.position == depth
    # deep but flat input is fine
    assert run(" AND ".join(["(id = 1 OR id = 2)"] * 60)) == {1, 2}


_ALPHABET = [
    *"()\"'=<>!:,-\\ \t\n\x00._*é5",
    "id",
    "username",
    "tags",
    "create_time",
    "display_name",
    "AND",
    "OR",
    "NOT",
    "1",
    "-7",
    '"x"',
    '"2024-01-02T03:04:05Z"',
    "\\n",
]


def _outcome(run: Callable[[str], set[int]], text: str) -> set[int] | FilterError:
    try:
        return run(text)
    except FilterError as err:
        return err


def test_garbage_never_escapes_as_another_exception(run: Callable[[str], set[int]]) -> None:
    rng = random.Random(2048)
    compiled = 0
    for _ in range(5000):
        text = " ".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.5:
            text = text.replace(" ", "")
        outcome = _outcome(run, text)
        if isinstance(outcome, FilterError):
            assert 0 <= outcome.position <= len(text), text
            assert outcome.message
        else:
            assert outcome <= ALL
            compiled += 1
    assert compiled > 20
