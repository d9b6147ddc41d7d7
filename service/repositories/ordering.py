"""order_by (AIP-132) parsed into an Ordering over a resource's orderable columns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def position_of(self, row: Any) -> list[Any]:
        """The row's values of the order's keys: where a page or resume token points."""
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
