"""The parts of List and Stream requests that users and posts share: filter, order, tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

from service.api.validation import Violations
from service.errors import InvalidArgument
from service.filtering import FilterError, FilterField, compile_filter
from service.repositories.keyset import Ordering, parse_order_by
from service.tokens import TokenCodec, binding_of


@dataclass(frozen=True, slots=True)
class Query:
    where: ColumnElement[bool] | None
    ordering: Ordering
    binding: str
    after: list[Any] | None


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """What a resource allows: filterable fields, orderable columns and the default order."""

    kind: str
    filterable: Mapping[str, FilterField]
    orderable: Mapping[str, Any]
    default_order: str

    async def parse(
        self,
        violations: Violations,
        tokens: TokenCodec,
        *,
        filter_text: str,
        order_by: str,
        token: str,
        token_field: str,
        bound_to: tuple[object, ...] = (),
    ) -> Query:
        """Validate filter and order_by, then decode the page or resume token, which must
        have been issued for the same filter, order and `bound_to` parameters."""
        where = None
        ordering = None
        if violations.text("filter", filter_text, max_length=2048):
            try:
                where = compile_filter(filter_text, self.filterable)
            except FilterError as error:
                violations.add("filter", str(error))
        if violations.text("order_by", order_by, max_length=256):
            try:
                ordering = parse_order_by(
                    order_by, columns=self.orderable, default=self.default_order
                )
            except InvalidArgument as error:
                violations.extend(error.violations)
        violations.text(token_field, token, max_length=4096)
        violations.raise_if_any()
        assert ordering is not None
        binding = binding_of(filter_text, ordering.canonical, *bound_to)
        after = None
        if token:
            after = await tokens.decode(
                token, kind=f"{self.kind}.{token_field}", binding=binding, field=token_field
            )
            if len(after) != len(ordering.keys):
                raise InvalidArgument.field(token_field, "the token is not valid")
        return Query(where, ordering, binding, after)

    def token(self, tokens: TokenCodec, query: Query, token_field: str, last_row: Any) -> str:
        return tokens.encode(
            f"{self.kind}.{token_field}", query.binding, query.ordering.position_of(last_row)
        )
