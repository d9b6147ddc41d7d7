"""Valid objects with unique random values; keyword overrides for what a test cares about."""

from __future__ import annotations

import secrets
from typing import Any

from blog.v1 import post_pb2, user_pb2


def unique(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def user(**overrides: Any) -> user_pb2.User:
    name = unique()
    values: dict[str, Any] = {
        "username": name,
        "email": f"{name}@example.com",
        "display_name": f"User {name}",
        "bio": "",
    }
    values.update(overrides)
    return user_pb2.User(**values)


def create_user_request(**overrides: Any) -> user_pb2.CreateUserRequest:
    return user_pb2.CreateUserRequest(user=user(**overrides))


def post(author_id: int, **overrides: Any) -> post_pb2.Post:
    values: dict[str, Any] = {
        "author_id": author_id,
        "title": f"Title {unique('t')}",
        "body": "Body text",
        "tags": [],
    }
    values.update(overrides)
    return post_pb2.Post(**values)
