"""What List and Stream requests share below the servicers: a resource's filterable and
orderable fields, the filter compiled to SQL, the order parsed, and page or resume tokens.

A servicer passes the request's filter text, order_by and token through `QuerySpec.parse`
and hands the resulting `Query` to its repository; it never sees a column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

from service.errors import FieldViolations, InvalidArgument
from service.filtering import MAX_FILTER_LENGTH, FilterError, FilterField, compile_filter
from service.repositories.ordering import Ordering, parse_order_by
from service.tokens import TokenCodec, binding_of

MAX_ORDER_BY_CHARS = 256
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Query:
    """A validated List or Stream request: where, in which order, from which position."""

    where: ColumnElement[bool] | None
    ordering: Ordering
    after: list[Any] | None
    tokens: TokenCodec
    token_kind: str
    binding: str

    def token_after(self, row: Any) -> str:
        """The page or resume token that continues after `row`."""
        return self.tokens.encode(self.token_kind, self.binding, self.ordering.position_of(row))


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """What a resource allows: filterable fields, orderable columns and the default order."""

    kind: str
    filterable: Mapping[str, FilterField]
    orderable: Mapping[str, Any]
    default_order: str

    async def parse(
        self,
        violations: FieldViolations,
        tokens: TokenCodec,
        *,
        filter_text: str,
        order_by: str,
        token: str,
        token_field: str,
        bound_to: tuple[object, ...] = (),
    ) -> Query:
        """Validate filter and order_by (with whatever else `violations` already holds),
        then decode the page or resume token, which must have been issued for the same
        filter, order and `bound_to` parameters."""
        where = None
        ordering = None
        if violations.text("filter", filter_text, max_length=MAX_FILTER_LENGTH):
            try:
                where = compile_filter(filter_text, self.filterable)
            except FilterError as error:
                violations.add("filter", str(error))
        if violations.text("order_by", order_by, max_length=MAX_ORDER_BY_CHARS):
            try:
                ordering = parse_order_by(
                    order_by, columns=self.orderable, default=self.default_order
                )
            except InvalidArgument as error:
                violations.extend(error.violations)
        violations.text(token_field, token, max_length=MAX_TOKEN_CHARS)
        violations.raise_if_any()
        assert ordering is not None
        binding = binding_of(filter_text, ordering.canonical, *bound_to)
        kind = f"{self.kind}.{token_field}"
        after = None
        if token:
            after = await tokens.decode(token, kind=kind, binding=binding, field=token_field)
            if len(after) != len(ordering.keys):
                raise InvalidArgument.field(token_field, "the token is not valid")
        return Query(where, ordering, after, tokens, kind, binding)
