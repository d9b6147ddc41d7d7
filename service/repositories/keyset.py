"""Keyset (seek) ordering shared by list pages and streams: never OFFSET."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import UnaryExpression

from service.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class SortKey:
    name: str
    column: Any  # a Core column or an ORM attribute
    descending: bool


@dataclass(frozen=True, slots=True)
class Ordering:
    """An ORDER BY that always ends with the primary key, so positions are unique."""

    keys: tuple[SortKey, ...]

    @property
    def canonical(self) -> str:
        """The normal form of the order, which tokens are bound to."""
        return ",".join(f"{k.name} desc" if k.descending else k.name for k in self.keys)

    def clauses(self) -> list[UnaryExpression[Any]]:
        return [k.column.desc() if k.descending else k.column.asc() for k in self.keys]

    def after(self, position: Sequence[Any]) -> ColumnElement[bool]:
        """Rows strictly after `position` in this order."""
        if len(position) != len(self.keys):
            raise ValueError("position does not match the ordering")
        directions = {k.descending for k in self.keys}
        if len(directions) == 1:
            # One direction: a row-value comparison, which an index on the keys serves.
            row = tuple_(*(k.column for k in self.keys))
            value = tuple_(*position)
            return row < value if self.keys[0].descending else row > value
        terms = []
        for i, key in enumerate(self.keys):
            equal = [k.column == v for k, v in zip(self.keys[:i], position[:i], strict=True)]
            beyond = key.column < position[i] if key.descending else key.column > position[i]
            terms.append(and_(*equal, beyond))
        return or_(*terms)

    def position_of(self, row: Any) -> list[Any]:
        return [getattr(row, k.name) for k in self.keys]


def parse_order_by(
    text: str,
    *,
    columns: Mapping[str, Any],
    default: str,
    field: str = "order_by",
) -> Ordering:
    """An AIP-132 order_by ("a, b desc") over the allowed columns; `id` breaks ties."""
    source = text.strip() or default
    keys: list[SortKey] = []
    seen: set[str] = set()
    for raw in source.split(","):
        words = raw.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != "desc"):
            raise InvalidArgument.field(field, f"'{raw.strip()}' is not 'field' or 'field desc'")
        name = words[0]
        if name not in columns:
            allowed = ", ".join(sorted(columns))
            raise InvalidArgument.field(field, f"cannot order by '{name}'; use one of {allowed}")
        if name in seen:
            raise InvalidArgument.field(field, f"'{name}' appears twice")
        seen.add(name)
        keys.append(SortKey(name, columns[name], len(words) == 2))
    if "id" not in seen:
        keys.append(SortKey("id", columns["id"], keys[0].descending))
    elif keys[-1].name != "id":
        raise InvalidArgument.field(field, "fields after 'id' would never take effect")
    return Ordering(tuple(keys))


def seek(stmt: Any, ordering: Ordering, after: Sequence[Any] | None) -> Any:
    """The statement in `ordering`, from just after `after` (a page or resume position)."""
    stmt = stmt.order_by(*ordering.clauses())
    return stmt if after is None else stmt.where(ordering.after(after))


async def stream_partitions(
    session: AsyncSession, stmt: Any, *, batch_size: int
) -> AsyncGenerator[Sequence[Any]]:
    """`AsyncSession.stream` with `yield_per` (a server-side cursor on PostgreSQL), by
    `partitions()`. Close it with `contextlib.aclosing`: its `finally` closes the cursor
    when the consumer stops early (a cancelled call)."""
    result = await session.stream(stmt.execution_options(yield_per=batch_size))
    try:
        async for partition in result.partitions():
            yield partition
    finally:
        await result.close()
