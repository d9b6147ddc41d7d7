"""Hostile request generators for the fuzz promise: plain `random.Random` with a fixed
seed (reproducible), over every method. Each yields (method path, streaming, bytes)."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from blog.v1 import post_pb2, user_pb2

U = "/blog.v1.UserService/"
P = "/blog.v1.PostService/"
FAR_ID = 2**62  # never a seeded row: writes aimed here change nothing that exists

# method -> (request class, streaming, writes)
METHODS: dict[str, tuple[type[Message], bool, bool]] = {
    U + "CreateUser": (user_pb2.CreateUserRequest, False, True),
    U + "BatchCreateUsers": (user_pb2.BatchCreateUsersRequest, False, True),
    U + "GetUser": (user_pb2.GetUserRequest, False, False),
    U + "ListUsers": (user_pb2.ListUsersRequest, False, False),
    U + "UpdateUser": (user_pb2.UpdateUserRequest, False, True),
    U + "DeleteUser": (user_pb2.DeleteUserRequest, False, True),
    U + "UndeleteUser": (user_pb2.UndeleteUserRequest, False, True),
    U + "StreamUsers": (user_pb2.StreamUsersRequest, True, False),
    P + "CreatePost": (post_pb2.CreatePostRequest, False, True),
    P + "GetPost": (post_pb2.GetPostRequest, False, False),
    P + "ListPosts": (post_pb2.ListPostsRequest, False, False),
    P + "UpdatePost": (post_pb2.UpdatePostRequest, False, True),
    P + "DeletePost": (post_pb2.DeletePostRequest, False, True),
    P + "StreamPosts": (post_pb2.StreamPostsRequest, True, False),
}

INTS = [0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), FAR_ID, 1001, 1000, 999]
NASTY = [
    "",
    "\x00",
    "a\x00b",
    "\u202e\u0000\ufeff",
    "'; DROP TABLE users; --",
    "%s%s%s%n",
    "\U0001f600" * 40,
    "A" * 33,
    "a" * 3000,
    "\ud7ff\ue000",
    "Robert'); --",
    "\\",
    '"',
    "ab",
]
FILTERS = [
    "(" * 1000,
    "(" * 200 + "id = 1" + ")" * 200,
    "NOT " * 500 + "id = 1",
    " AND ".join(["id = 1"] * 400),
    'username = "' + "\\" * 1000,
    'username = "\x00"',
    "id = 99999999999999999999999999",
    'create_time > "9999-99-99T99:99:99Z"',
    'create_time > "0001-01-01T00:00:00Z"',
    "bio = 1",
    "id = 1 OR",
    "= = =",
    'tags:"x" AND title:"%_"',
    "id >= -9223372036854775809",
    "\u0000",
    "id = 1 " + ")" * 50,
    'title:"' + "%" * 2000 + '"',
    "username = email",
]
ORDERS = ["id desc", "id, id", "bio", "username desc, create_time", ",", "id desc desc", "x" * 300]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(rng: random.Random, real: list[str]) -> Iterator[str]:
    """Forged tokens of every shape: random text, structure games, and mutations of
    real tokens (a flipped character, a swapped key id, a truncation, a re-signing
    attempt with a made-up MAC)."""
    while True:
        shape = rng.randrange(12)
        base = rng.choice(real) if real else "db1.e30." + "A" * 22
        if shape == 0:
            yield b64(b"[" * rng.randint(1, 5000)) + ".AA"
        elif shape == 1:
            yield "".join(rng.choice("ab.-_=+/\x00\u00e9") for _ in range(rng.randint(0, 200)))
        elif shape == 2:
            i = rng.randrange(len(base))
            yield base[:i] + rng.choice("AB-_.") + base[i + 1 :]
        elif shape == 3:
            yield base[: rng.randrange(len(base))]
        elif shape == 4:
            kid, _, rest = base.partition(".")
            yield rng.choice(["db2", "x" * 40, "env-deadbeef", "k" * 41, "{", ""]) + "." + rest
        elif shape == 5:
            yield base + "." + base
        elif shape == 6:
            body = b'{"t":"users.page_token","b":"0","p":[' + b"[" * 3000 + b"]"
            yield "db1." + b64(body) + "." + "A" * 22
        elif shape == 7:
            yield "unknown" + str(rng.randrange(10**6)) + ".e30." + "A" * 22
        elif shape == 8:
            yield base.replace(".", "..")
        elif shape == 9:
            yield base * rng.randint(2, 40)
        elif shape == 10:
            kid, body, mac = ([*base.split("."), "", ""])[:3]
            yield f"{kid}.{body[::-1]}.{mac}"
        else:
            yield "db1." + b64(bytes(rng.randrange(256) for _ in range(64))) + "." + "_" * 22


def rand_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(NASTY)
    return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randint(0, 40)))


def user_msg(rng: random.Random, good: bool) -> user_pb2.User:
    name = f"fz{rng.randrange(16**10):010x}"
    if good:
        return user_pb2.User(username=name, email=f"{name}@example.com")
    return user_pb2.User(
        id=rng.choice(INTS),
        username=rng.choice([name, rand_text(rng), name.upper(), "ab", "a" * 32]),
        email=rng.choice([f"{name}@example.com", rand_text(rng), "a@b", "@", "x" * 300]),
        display_name=rng.choice(["", rand_text(rng), "d" * 101]),
        bio=rng.choice(["", rand_text(rng), "b" * 2001]),
        etag=rng.choice(["", "v1", "v-1", "v99999999999999999999999", rand_text(rng)]),
    )


def post_msg(rng: random.Random) -> post_pb2.Post:
    tags = [rand_text(rng) for _ in range(rng.choice([0, 1, 5, 25]))]
    if rng.random() < 0.05:
        tags = [f"BAD TAG {i}!" for i in range(3000)]
    return post_pb2.Post(
        id=rng.choice(INTS),
        author_id=rng.choice(INTS),
        title=rng.choice(["t", "", rand_text(rng), "t" * 201]),
        body=rng.choice(["", rand_text(rng), "b" * 100_001]),
        tags=tags,
        etag=rng.choice(["", "v1", rand_text(rng)]),
    )


def mask(rng: random.Random, fields: list[str]) -> field_mask_pb2.FieldMask:
    choice = rng.randrange(5)
    if choice == 0:
        return field_mask_pb2.FieldMask(
            paths=[f"nope_{i}" for i in range(rng.choice([50, 10_000]))]
        )
    if choice == 1:
        return field_mask_pb2.FieldMask(paths=["*", *rng.sample(fields, 1)])
    if choice == 2:
        return field_mask_pb2.FieldMask(paths=[rand_text(rng) for _ in range(3)])
    return field_mask_pb2.FieldMask(paths=rng.sample(fields, rng.randint(0, len(fields))))


def structured(rng: random.Random, method: str, tokens: Iterator[str]) -> Message:
    """A message of the method's type with boundary and hostile values."""
    name = method.rsplit("/", 1)[1]
    token = next(tokens) if rng.random() < 0.6 else ""
    view = rng.choice([0, 1, 2, 3, -1, 2**31 - 1])
    if name == "CreateUser":
        return user_pb2.CreateUserRequest(
            user=user_msg(rng, rng.random() < 0.2),
            request_id=rng.choice(["", "not-a-uuid", "0" * 36, rand_text(rng)]),
        )
    if name == "BatchCreateUsers":
        n = rng.choice([0, 1, 3, 100, 1001])
        bad = rng.random() < 0.7
        return user_pb2.BatchCreateUsersRequest(
            requests=[user_pb2.CreateUserRequest(user=user_msg(rng, not bad)) for _ in range(n)]
        )
    if name in ("GetUser", "GetPost"):
        cls = user_pb2.GetUserRequest if name == "GetUser" else post_pb2.GetPostRequest
        return cls(id=rng.choice(INTS), view=view)
    if name in ("ListUsers", "ListPosts"):
        cls = user_pb2.ListUsersRequest if name == "ListUsers" else post_pb2.ListPostsRequest
        extra: dict[str, Any] = {"show_deleted": rng.random() < 0.5} if name == "ListUsers" else {}
        return cls(
            page_size=rng.choice([*INTS[:5], 50, 1001]),
            page_token=token,
            filter=rng.choice([*FILTERS, ""]),
            order_by=rng.choice([*ORDERS, ""]),
            view=view,
            **extra,
        )
    if name in ("StreamUsers", "StreamPosts"):
        cls = user_pb2.StreamUsersRequest if name == "StreamUsers" else post_pb2.StreamPostsRequest
        # Always something invalid, so a stream ends at once (the fuzz is not a load).
        return cls(
            resume_token=token or next(tokens),
            filter=rng.choice([*FILTERS, ""]),
            order_by=rng.choice([*ORDERS, ""]),
            view=view,
        )
    if name == "UpdateUser":
        user = user_msg(rng, False)
        user.id = rng.choice([0, -1, FAR_ID, 2**63 - 1])
        return user_pb2.UpdateUserRequest(
            user=user, update_mask=mask(rng, ["username", "email", "bio", "id", "etag"])
        )
    if name == "DeleteUser":
        return user_pb2.DeleteUserRequest(
            id=rng.choice([0, -1, FAR_ID, 2**63 - 1]), etag=rand_text(rng)
        )
    if name == "UndeleteUser":
        return user_pb2.UndeleteUserRequest(id=rng.choice([0, -1, FAR_ID, 2**63 - 1]))
    if name == "CreatePost":
        post = post_msg(rng)
        post.author_id = rng.choice([0, -1, FAR_ID, 2**63 - 1])
        return post_pb2.CreatePostRequest(post=post, request_id=rng.choice(["", "x"]))
    if name == "UpdatePost":
        post = post_msg(rng)
        post.id = rng.choice([0, -1, FAR_ID, 2**63 - 1])
        return post_pb2.UpdatePostRequest(
            post=post, update_mask=mask(rng, ["title", "body", "tags", "author_id", "etag"])
        )
    if name == "DeletePost":
        return post_pb2.DeletePostRequest(id=rng.choice([0, -1, FAR_ID]), etag=rand_text(rng))
    raise AssertionError(name)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Bit flips, truncation, garbage appended, invalid UTF-8 spliced in."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        else:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.choice([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80"])
    return bytes(buf)


def invalid_utf8(rng: random.Random) -> bytes:
    """A string field (tag 2 .. 5 of a User inside field 1) holding bytes that are not
    UTF-8, by hand (protobuf's Python API refuses to build it)."""
    bad = rng.choice([b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
    inner = bytes([(rng.randint(2, 5) << 3) | 2, len(bad)]) + bad
    return bytes([(1 << 3) | 2, len(inner)]) + inner


def requests(
    seed: int, count: int, real_tokens: list[str], safe: Callable[[str, bytes], bool]
) -> Iterator[tuple[str, bool, bytes]]:
    """`count` hostile requests over every method; `safe(method, data)` filters out the
    rare random request that would write to a seeded row."""
    rng = random.Random(seed)
    tokens = forged_tokens(rng, real_tokens)
    methods = list(METHODS)
    made = 0
    while made < count:
        method = methods[made % len(methods)]
        _cls, streaming, _writes = METHODS[method]
        kind = rng.randrange(10)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        elif kind == 1:
            data = invalid_utf8(rng)
        elif kind in (2, 3):
            data = mutate(rng, structured(rng, method, tokens).SerializeToString())
        else:
            data = structured(rng, method, tokens).SerializeToString()
        if not safe(method, data):
            continue
        made += 1
        yield method, streaming, data
