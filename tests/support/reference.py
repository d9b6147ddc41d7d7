"""A plain-Python reference for list and stream results: which rows a filter selects and
in what order, per database.

Where PostgreSQL and SQLite legitimately differ (docs/DECISIONS.md, entries 20 and 21),
the model asks the database under test instead of assuming:
- `:` on text ignores case through the database's own folding: PostgreSQL folds every
  letter its locale's ctype knows (all of Unicode under C.UTF-8 or en_US.UTF-8, ASCII
  only under the C locale); SQLite's `lower()` and LIKE fold ASCII only.
- Text compares and sorts by the database's collation. SQLite's BINARY and
  PostgreSQL's C and C.UTF-8 collations are code point order, which the model knows;
  any other collation (en_US.UTF-8) it does not model, and the strategies then leave
  out text order (`Traits.text_order`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from sqlalchemy import String, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from support.strategies import (
    FIELDS,
    TIMESTAMP,
    AllOf,
    AnyOf,
    Compare,
    Has,
    Node,
    Not,
)

__all__ = ["Reference", "Traits", "probe_traits"]

Row = Mapping[str, Any]

# Sorted by code point; a code point collation agrees on every neighbouring pair.
_ORDER_PROBES = sorted(
    ["", " ", "-", "0", "A", "Z", "_", "a", "a b", "a_b", "ab", "z", "~", "É", "é", "ж", "中", "😀"]
)


@dataclass(frozen=True)
class Traits:
    """What the database under test does where databases may differ."""

    dialect: str
    unicode_fold: bool  # `:` ignores case beyond ASCII
    text_order: bool  # text compares and sorts in code point order


async def probe_traits(engine: AsyncEngine) -> Traits:
    """Ask the database: does ILIKE fold 'É' to 'é', and does it order text by code point?"""
    async with engine.connect() as connection:
        fold = await connection.scalar(select(literal("É", String).ilike("é")))
        pairs = list(pairwise(_ORDER_PROBES))
        checks = [literal(a, String) < literal(b, String) for a, b in pairs]
        ordered = (await connection.execute(select(*checks))).one()
    return Traits(engine.dialect.name, bool(fold), all(bool(v) for v in ordered))


def _fold_ascii(text: str) -> str:
    return "".join(c.lower() if c.isascii() else c for c in text)


def _fold_unicode(text: str) -> str:
    # One code point to one, as PostgreSQL's lower() maps characters.
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


class Reference:
    def __init__(self, traits: Traits) -> None:
        self.traits = traits
        self._fold = _fold_unicode if traits.unicode_fold else _fold_ascii

    def matches(self, node: Node | None, row: Row, resource: str) -> bool:
        if node is None:
            return True
        if isinstance(node, Not):
            return not self.matches(node.inner, row, resource)
        if isinstance(node, AllOf):
            return all(self.matches(p, row, resource) for p in node.parts)
        if isinstance(node, AnyOf):
            return any(self.matches(p, row, resource) for p in node.parts)
        if isinstance(node, Has):
            if node.field == "tags":
                return node.value.lower() in row["tags"]
            return self._fold(node.value) in self._fold(row[node.field])
        return _compare(node, row, FIELDS[resource][node.field].kind)

    def select(
        self,
        rows: Iterable[Row],
        resource: str,
        node: Node | None,
        keys: Sequence[tuple[str, bool]],
    ) -> list[Row]:
        """The rows `node` selects, in the order of `keys` ((field, descending), ...)."""
        chosen = [row for row in rows if self.matches(node, row, resource)]
        for name, descending in reversed(keys):  # stable sorts, last key first
            chosen.sort(key=lambda row, name=name: row[name], reverse=descending)  # type: ignore[misc]
        return chosen


def _compare(node: Compare, row: Row, kind: str) -> bool:
    left = row[node.field]
    if kind == TIMESTAMP:
        left = left * 1000  # stored microseconds against a literal in nanoseconds
    right = node.value
    op = node.op
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)
