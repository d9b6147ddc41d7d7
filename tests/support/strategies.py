"""Hypothesis strategies for the blog.v1 list and stream contract (API.md "Filter" and
"order_by"): data sets, filters as syntax trees with their text, order_by, and malformed or
hostile filters.

A filter is built as a tree (`Compare`, `Has`, `Not`, `AllOf`, `AnyOf`) that carries every
choice about its spelling, so `render()` is deterministic and `support.reference` can
evaluate the same tree over plain Python rows. Nothing here imports the service: the
reliability issue's fuzzer can draw from these strategies against any running server.

Values live in the reference model's units: ints, str, timestamps as integer microseconds
since the epoch in rows and integer nanoseconds in filter literals (a literal may carry
sub-microsecond digits; a stored time never does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "DEFAULT_ORDER",
    "FIELDS",
    "ORDERABLE",
    "AllOf",
    "AnyOf",
    "Compare",
    "DataSet",
    "FieldKind",
    "Has",
    "Not",
    "OrderBy",
    "PostSpec",
    "UserSpec",
    "data_sets",
    "filters",
    "hostile_filters",
    "order_bys",
    "render",
    "timestamp_text",
]

# -- the contract's fields ----------------------------------------------------------------

INT, STRING, TIMESTAMP = "int", "string", "timestamp"
FieldKind = str


@dataclass(frozen=True)
class Field:
    kind: FieldKind
    compare: bool  # = != < <= > >=
    has: bool  # ':'


FIELDS: Mapping[str, Mapping[str, Field]] = {
    "users": {
        "id": Field(INT, True, False),
        "username": Field(STRING, True, False),
        "email": Field(STRING, True, False),
        "display_name": Field(STRING, True, True),
        "create_time": Field(TIMESTAMP, True, False),
        "update_time": Field(TIMESTAMP, True, False),
    },
    "posts": {
        "id": Field(INT, True, False),
        "author_id": Field(INT, True, False),
        "title": Field(STRING, True, True),
        "create_time": Field(TIMESTAMP, True, False),
        "update_time": Field(TIMESTAMP, True, False),
        "tags": Field(STRING, False, True),
    },
}
ORDERABLE: Mapping[str, tuple[str, ...]] = {
    "users": ("id", "username", "create_time"),
    "posts": ("id", "create_time", "title"),
}
TEXT_FIELDS = frozenset({"username", "email", "display_name", "title"})
DEFAULT_ORDER: Mapping[str, tuple[tuple[str, bool], ...]] = {
    "users": (("id", False),),
    "posts": (("create_time", True), ("id", True)),
}
COMPARATORS = ("=", "!=", "<", "<=", ">", ">=")
KEYWORDS = frozenset({"AND", "OR", "NOT"})

# -- data sets ----------------------------------------------------------------------------

# Letters whose case folds the same way in Python and in PostgreSQL's lower() (one code
# point to one), LIKE metacharacters and the literal's escape characters, and code points
# of every UTF-8 length, so order and `:` are tested beyond ASCII.
TEXT_ALPHABET = 'aAbBzZ0 _%/\\"-.~éÉüÜжЖωΩñÑ中😀\n'
USERNAME_ALPHABET = "ab_0z"
TAG_POOL = ("go", "rust", "py-3", "a", "x1", "long-tag-name")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_MICROS = int((datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC) - EPOCH).total_seconds()) * 10**6
# A few instants, so that rows tie on them; neighbours a microsecond and a second apart.
TIME_POOL = tuple(BASE_MICROS + d for d in (0, 1, 2, 999_999, 1_000_000, 86_400_000_000))


def texts(*, min_size: int = 0, max_size: int = 6) -> st.SearchStrategy[str]:
    return st.text(alphabet=TEXT_ALPHABET, min_size=min_size, max_size=max_size)


@dataclass(frozen=True)
class UserSpec:
    username: str  # without the seeding prefix
    email_local: str
    display_name: str
    create_time: int  # microseconds since the epoch
    update_time: int
    deleted: bool


@dataclass(frozen=True)
class PostSpec:
    author: int  # index into DataSet.users
    title: str
    create_time: int
    update_time: int
    tags: tuple[str, ...]  # distinct, sorted


@dataclass(frozen=True)
class DataSet:
    users: tuple[UserSpec, ...]
    posts: tuple[PostSpec, ...]


def _live_names_unique(users: list[UserSpec]) -> tuple[UserSpec, ...]:
    """Usernames are unique among live users only: a later live namesake is deleted."""
    live: set[str] = set()
    out = []
    for user in users:
        if not user.deleted:
            if user.username in live:
                user = UserSpec(**{**user.__dict__, "deleted": True})
            else:
                live.add(user.username)
        out.append(user)
    return tuple(out)


@st.composite
def data_sets(
    draw: st.DrawFn, *, max_users: int = 8, max_posts: int = 14, min_users: int = 1
) -> DataSet:
    """Users and posts with ties in every orderable field (usernames, titles and times
    come from small pools), deleted users (live usernames stay unique), unicode text."""
    times = st.sampled_from(TIME_POOL)
    names = draw(st.lists(st.text(USERNAME_ALPHABET, max_size=3), min_size=1, max_size=4))
    display_names = draw(st.lists(texts(), min_size=1, max_size=4))
    users = draw(
        st.lists(
            st.builds(
                UserSpec,
                username=st.sampled_from(names),
                email_local=st.sampled_from(["bob", "Bob", "BOB", "élan", "x.y"]),
                display_name=st.sampled_from(display_names),
                create_time=times,
                update_time=times,
                deleted=st.booleans(),
            ),
            min_size=min_users,
            max_size=max_users,
        )
    )
    users = list(_live_names_unique(users))
    posts: list[PostSpec] = []
    if users:
        titles = draw(st.lists(texts(min_size=1), min_size=1, max_size=4))
        posts = draw(
            st.lists(
                st.builds(
                    PostSpec,
                    author=st.integers(0, len(users) - 1),
                    title=st.sampled_from(titles),
                    create_time=times,
                    update_time=times,
                    tags=st.lists(st.sampled_from(TAG_POOL), unique=True, max_size=3).map(
                        lambda tags: tuple(sorted(tags))
                    ),
                ),
                max_size=max_posts,
            )
        )
    return DataSet(tuple(users), tuple(posts))


# -- filters as trees ---------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Any  # int; str; or int nanoseconds since the epoch for timestamps
    text: str  # the literal as written
    space: str = " "


@dataclass(frozen=True)
class Has:
    field: str
    value: str
    text: str


@dataclass(frozen=True)
class Not:
    inner: Node
    dash: bool = False  # "-x" rather than "NOT x"


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Node, ...]
    juxtapose: bool = False  # "a b" rather than "a AND b"


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Node, ...]


Node = Compare | Has | Not | AllOf | AnyOf


def _simple(node: Node) -> str:
    """`node` where the grammar wants a restriction or a parenthesised expression."""
    text = render(node)
    return text if isinstance(node, Compare | Has) else f"({text})"


def render(node: Node) -> str:
    """The filter text of a tree. AIP-160: OR binds tighter than AND and juxtaposition."""
    if isinstance(node, Compare):
        return f"{node.field}{node.space}{node.op}{node.space}{node.text}"
    if isinstance(node, Has):
        return f"{node.field}:{node.text}"
    if isinstance(node, Not):
        return ("-" if node.dash else "NOT ") + _simple(node.inner)
    if isinstance(node, AnyOf):
        return " OR ".join(_simple(p) if not isinstance(p, Not) else render(p) for p in node.parts)
    # AllOf: a part that is itself an AND (or a juxtaposition) needs parentheses.
    rendered = [f"({render(p)})" if isinstance(p, AllOf) else render(p) for p in node.parts]
    return (" " if node.juxtapose else " AND ").join(rendered)


def quote(value: str) -> str:
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
    )
    return f'"{escaped}"'


_BARE_WORD = re.compile(r"[A-Za-z0-9_.@~][A-Za-z0-9_.@~-]*")


def _string_literal(value: str) -> st.SearchStrategy[str]:
    if _BARE_WORD.fullmatch(value) and value not in KEYWORDS:
        return st.sampled_from([quote(value), value])
    return st.just(quote(value))


def timestamp_text(nanos: int, *, offset_minutes: int = 0, digits: int | None = None) -> str:
    """RFC 3339 text for `nanos` since the epoch, written in a zone `offset_minutes` east
    of UTC, with `digits` fraction digits (at least as many as the value needs)."""
    seconds, fraction = divmod(nanos, 10**9)
    local = EPOCH + timedelta(seconds=seconds, minutes=offset_minutes)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    needed = f"{fraction:09d}".rstrip("0")
    if digits is None:
        digits = len(needed)
    frac = f"{fraction:09d}"[: max(digits, len(needed))].ljust(digits, "0")
    if frac:
        text += "." + frac
    if offset_minutes == 0:
        return text + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


@st.composite
def _timestamp_literal(draw: st.DrawFn, known: Sequence[int]) -> tuple[int, str]:
    micros = draw(st.sampled_from(sorted(set(known) | set(TIME_POOL))))
    nanos = micros * 1000 + draw(st.sampled_from([0, 0, 0, -1, 1, -1000, 1000, 500]))
    offset = draw(st.sampled_from([0, 0, 60, -300, 330, -(23 * 60 + 59), 14 * 60]))
    digits = draw(st.one_of(st.none(), st.integers(0, 12)))
    text = timestamp_text(nanos, offset_minutes=offset, digits=digits)
    if draw(st.booleans()):
        text = text.replace("T", "t").replace("Z", "z")
    return nanos, quote(text)


def _pool(rows: Sequence[Mapping[str, Any]], field: str) -> list[Any]:
    return sorted({row[field] for row in rows}, key=repr)


@st.composite
def _restriction(
    draw: st.DrawFn, resource: str, rows: Sequence[Mapping[str, Any]], text_order: bool
) -> Node:
    fields = FIELDS[resource]
    name = draw(st.sampled_from(sorted(fields)))
    field = fields[name]
    use_has = field.has and (not field.compare or draw(st.booleans()))
    if use_has:
        if name == "tags":
            tag = draw(st.sampled_from(TAG_POOL) | st.sampled_from(["GO", "Rust", "none", "x"]))
            return Has(name, tag, draw(_string_literal(tag)))
        known = [str(v) for v in _pool(rows, name)]
        value = draw(_substrings(known) if known else texts())
        return Has(name, value, draw(_string_literal(value)))
    ops = COMPARATORS
    if name in TEXT_FIELDS and not text_order:
        ops = ("=", "!=")  # order of text follows a collation the model does not know
    op = draw(st.sampled_from(ops))
    space = draw(st.sampled_from([" ", "", "  "]))
    if field.kind == INT:
        known_ints = [int(v) for v in _pool(rows, name)]
        around = [v + d for v in known_ints for d in (-1, 0, 1)]
        value = (
            draw(st.sampled_from(around) if around else st.integers(-5, 5))
            if draw(st.integers(0, 9))
            else draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
        )
        text = draw(st.sampled_from([str(value), quote(str(value))]))
        return Compare(name, op, value, text, space)
    if field.kind == TIMESTAMP:
        nanos, text = draw(_timestamp_literal([int(v) for v in _pool(rows, name)]))
        return Compare(name, op, nanos, text, space)
    known = [str(v) for v in _pool(rows, name)]
    value = draw(_near_strings(known))
    return Compare(name, op, value, draw(_string_literal(value)), space)


def _swap_case(text: str) -> str:
    return text.swapcase() if all(len(c.swapcase()) == 1 for c in text) else text


@st.composite
def _substrings(draw: st.DrawFn, known: Sequence[str]) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(texts(max_size=3))
    source = draw(st.sampled_from(known))
    start = draw(st.integers(0, len(source)))
    end = draw(st.integers(start, len(source)))
    piece = source[start:end]
    return _swap_case(piece) if draw(st.booleans()) else piece


@st.composite
def _near_strings(draw: st.DrawFn, known: Sequence[str]) -> str:
    """An existing value, one just beside it in code point order, or something else."""
    choice = draw(st.integers(0, 5))
    if not known or choice == 0:
        return draw(texts())
    value = draw(st.sampled_from(known))
    if choice == 1 and value:
        return value[:-1]
    if choice == 2:
        return value + draw(st.sampled_from(["\x01", "a", "~", "é"]))
    if choice == 3 and value:
        return _swap_case(value)
    return value


def filters(
    resource: str,
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    text_order: bool = True,
    max_leaves: int = 6,
) -> st.SearchStrategy[Node]:
    """Filter trees over `resource`'s filterable fields, with literals near `rows`' values
    (rows: mappings of field name to reference value). `text_order=False` leaves out
    `< <= > >=` on text fields, for a database whose collation the model does not know."""
    leaf = _restriction(resource, rows, text_order)

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        parts = st.lists(children, min_size=2, max_size=3).map(tuple)
        return st.one_of(
            st.builds(Not, children, st.booleans()),
            st.builds(AllOf, parts, st.booleans()),
            st.builds(AnyOf, parts),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


# -- order_by -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderBy:
    text: str
    keys: tuple[tuple[str, bool], ...]  # the order in full: (field, descending), id last


@st.composite
def order_bys(draw: st.DrawFn, resource: str, *, text_order: bool = True) -> OrderBy:
    """An order_by the API accepts (empty: the default), with the order it means:
    `id` breaks ties in the direction of the first key (docs/DECISIONS.md, entry 9)."""
    allowed = [f for f in ORDERABLE[resource] if text_order or f not in TEXT_FIELDS]
    if draw(st.integers(0, 5)) == 0:
        return OrderBy(draw(st.sampled_from(["", " "])), DEFAULT_ORDER[resource])
    others = [f for f in allowed if f != "id"]
    chosen = draw(st.permutations(others))[: draw(st.integers(0, len(others)))]
    keys = [(name, draw(st.booleans())) for name in chosen]
    if not keys or draw(st.booleans()):
        keys.append(("id", draw(st.booleans())))
    written = [f"{name} desc" if desc else name for name, desc in keys]
    separator = draw(st.sampled_from([",", ", ", " , "]))
    text = separator.join(written)
    if draw(st.booleans()):
        text = f" {text} "
    if keys[-1][0] != "id":
        keys.append(("id", keys[0][1]))
    return OrderBy(text, tuple(keys))


# -- malformed and hostile filters ----------------------------------------------------------

_FRAGMENTS = (
    "(",
    ")",
    "((",
    "))",
    "AND",
    "OR",
    "NOT",
    "-",
    "=",
    "!=",
    "!",
    "<",
    "<=",
    ">",
    ">=",
    ":",
    '"',
    "'",
    "\\",
    '"\\q"',
    '"unterminated',
    "\x00",
    ",",
    "id",
    "title",
    "tags",
    "bio",
    "author_id",
    "username",
    "create_time",
    "email",
    "display_name",
    "update_time",
    "9223372036854775808",
    "-9223372036854775809",
    "1e3",
    "0x10",
    '"2024-13-01T00:00:00Z"',
    '"2024-02-30T00:00:00Z"',
    '"2024-01-01T00:00:00+24:00"',
    '"2024-01-01 00:00:00Z"',
    '"9999-12-31T23:59:59-23:59"',
    '"0001-01-01T00:00:00+00:01"',
    "é",
    "😀",
    "\u202e",
    "\t",
    "\n",
    " ",
    "*",
    "%",
    "_",
    "AND AND",
    "OR )",
    "( )",
    "NOT NOT",
    "--",
)


def hostile_filters(resource: str = "posts") -> st.SearchStrategy[str]:
    """Filter text a client may send: token soup, broken valid filters, nesting and
    length past the limits, out-of-range literals, control and astral characters. The
    contract: each is accepted or INVALID_ARGUMENT on `filter`, never anything else."""
    soup = st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=4), max_size=12).flatmap(
        lambda parts: st.sampled_from([" ", ""]).map(lambda sep: sep.join(parts))
    )
    valid = filters(resource).map(render)
    mutated = st.builds(
        _mutate,
        valid,
        st.lists(st.tuples(st.integers(0, 10**6), st.text(max_size=2)), min_size=1, max_size=3),
    )
    deep = st.builds(
        lambda n, inner, neg: ("NOT " * n if neg else "(" * n) + inner + ("" if neg else ")" * n),
        st.integers(28, 40),
        valid,
        st.booleans(),
    )
    long = st.builds(lambda n, text: " OR ".join([text] * n), st.integers(100, 400), valid)
    arbitrary = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
    return st.one_of(soup, mutated, deep, long, arbitrary)


def _mutate(text: str, edits: list[tuple[int, str]]) -> str:
    """`text` with a few characters deleted or replaced at the given positions."""
    for position, replacement in edits:
        if not text:
            return replacement
        i = position % len(text)
        text = text[:i] + replacement + text[i + 1 :]
    return text
