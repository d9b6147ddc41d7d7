"""The README's grpcurl examples, run as written against `python -m service serve`.

The server runs as `make run` runs it: default settings (an embedded SQLite file in
the working directory) with `--migrate`; only the port differs. Each example's
shown answer is compared with the real one: text exactly, JSON field by field,
except values that differ on every run (times, resume tokens).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from support.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = Path(sys.executable).parent / "grpcurl"
VARYING = {"create_time", "update_time", "resume_token"}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def readme_examples() -> list[tuple[str, str, str]]:
    """(command, kind of the shown answer, shown answer) for each grpcurl example."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
    examples = []
    for (kind, body), (answer_kind, answer) in itertools.pairwise(blocks):
        if kind == "sh" and body.startswith("grpcurl "):
            examples.append((body.strip(), answer_kind, answer.strip()))
    return examples


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("readme")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(GRPC_LISTEN=f"127.0.0.1:{port}", LOG_LEVEL="WARNING")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--migrate"], cwd=workdir, env=env
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = _grpcurl(f"grpcurl -plaintext 127.0.0.1:{port} list", port)
            if probe.returncode == 0:
                break
            assert process.poll() is None, "the server exited during start-up"
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0


def _grpcurl(command: str, port: int) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command.replace("localhost:50051", f"127.0.0.1:{port}"))
    assert argv[0] == "grpcurl"
    return subprocess.run(
        [str(GRPCURL), *argv[1:]], capture_output=True, text=True, timeout=30, check=False
    )


def _token_payload(token: str) -> dict[str, Any]:
    """What a page or resume token carries between its key id and its signature: kind,
    binding, position."""
    body = token.split(".")[1]
    payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return payload


def _same_token(shown: str, actual: str, path: str) -> None:
    """Made by the same code for the same request: everything but the position's time."""
    mine, theirs = _token_payload(shown), _token_payload(actual)
    assert sorted(mine) == sorted(theirs), f"{path}: token fields differ"
    for key in mine:
        if key != "p":
            assert mine[key] == theirs[key], f"{path}: token {key!r} differs"
    assert len(mine["p"]) == len(theirs["p"]), f"{path}: token position differs"
    assert mine["p"][1:] == theirs["p"][1:], f"{path}: token position differs"


def _same(shown: Any, actual: Any, path: str = "") -> None:
    if isinstance(shown, dict):
        assert isinstance(actual, dict), path
        assert sorted(shown) == sorted(actual), f"{path}: fields differ"
        for key, value in shown.items():
            if key in VARYING:
                assert isinstance(actual[key], str), f"{path}.{key}"
                if key.endswith("_time"):
                    assert RFC3339.fullmatch(actual[key]), f"{path}.{key}"
                if key.endswith("_token"):
                    _same_token(value, actual[key], f"{path}.{key}")
            else:
                _same(value, actual[key], f"{path}.{key}")
    elif isinstance(shown, list):
        assert isinstance(actual, list), path
        assert len(shown) == len(actual), path
        for index, (a, b) in enumerate(zip(shown, actual, strict=True)):
            _same(a, b, f"{path}[{index}]")
    else:
        assert shown == actual, f"{path}: README shows {shown!r}, the service answers {actual!r}"


def test_readme_resume_token_is_the_position_of_the_post_shown() -> None:
    """The example token was made from the post it follows: same time, same id."""
    (shown,) = [
        json.loads(answer)
        for command, kind, answer in readme_examples()
        if "StreamPosts" in command and kind == "json"
    ]
    last = shown["posts"][-1]
    ts, post_id = _token_payload(shown["resume_token"])["p"]
    when = datetime.fromisoformat(ts["ts"])
    assert when == datetime.fromisoformat(last["create_time"].replace("Z", "+00:00"))
    assert str(post_id) == last["id"]


def test_readme_has_the_examples_the_issue_asks_for() -> None:
    commands = " ".join(command for command, _, _ in readme_examples())
    for needle in (" list", "describe", "CreateUser", "CreatePost", "StreamPosts", "Health/Check"):
        assert needle in commands


def test_readme_grpcurl_examples_answer_as_shown(served: int) -> None:
    examples = readme_examples()
    assert len(examples) >= 6
    for command, kind, shown in examples:
        result = _grpcurl(command, served)
        if shown.startswith("ERROR:"):
            assert result.returncode != 0, command
            assert result.stderr.strip() == shown, command
            continue
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        if kind == "json":
            _same(json.loads(shown), json.loads(result.stdout), command)
        else:
            assert result.stdout.strip() == shown, command
