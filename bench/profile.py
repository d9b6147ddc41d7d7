"""`py-spy record --format raw --gil` of a server under load, summarised by function.

`--gil` keeps only samples of the thread holding the GIL: without it py-spy counts the
event loop's and gRPC poller's epoll waits (C code, GIL released) as busy time.

py-spy's raw format is one collapsed stack a line: `frame;frame;...;leaf count`,
outermost frame first, each frame `function (file)` (with --nolineno). Own samples
count the leaf frame; total samples count every function once per stack.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")

LAYERS = (
    ("uvloop + gRPC C core (time in Runner.run's C loop)", ("asyncio/runners.py",)),
    ("service", ("service/",)),
    ("grpc", ("grpc/", "grpc_health", "cygrpc", "_cython", "grpc_status", "grpc_reflection")),
    ("sqlalchemy", ("sqlalchemy/",)),
    ("asyncpg", ("asyncpg/",)),
    ("protobuf", ("google/protobuf",)),
    ("asyncio/uvloop", ("asyncio/", "uvloop/", "contextlib.py")),
    ("logging", ("logging/",)),
)


@dataclass
class ProfileSummary:
    samples: int
    seconds: float
    rate: int
    own: list[tuple[str, int]] = field(default_factory=list)
    total: list[tuple[str, int]] = field(default_factory=list)
    layers: list[tuple[str, int]] = field(default_factory=list)
    # Samples by the innermost service function on the stack (the service code that
    # led to the work, libraries it called included); stacks with none by leaf layer.
    by_service: list[tuple[str, int]] = field(default_factory=list)
    raw_path: str = ""
    error: str | None = None


def py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        return None
    return procs.start(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nolineno",
            "--gil",
            "--output",
            str(out),
        ],
        log_path=out.with_suffix(".log"),
    )


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", f"{procs.ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


# Frames every stack starts with (interpreter start-up, the CLI, the event loop's run):
# left out of the "total" ranking, where they would only say "100%".
_WRAPPERS = ("(<frozen runpy>)", "(service/__main__.py)", "(uvloop/__init__.py)", "Runner.run (")


def _layer(frame: str) -> str:
    for name, markers in LAYERS:
        if any(m in frame for m in markers):
            return name
    return "other"


def _innermost_service(frames: list[str]) -> str:
    for frame in reversed(frames):
        if "(service/" in frame and "(service/__main__.py)" not in frame:
            return frame
    return f"[{_layer(frames[-1]).split(' (')[0]}]"


def summarise(path: Path, seconds: float, rate: int, top: int = 15) -> ProfileSummary:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    by_service: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        layers[_layer(frames[-1])] += count
        by_service[_innermost_service(frames)] += count
        for frame in set(frames):
            if not any(w in frame for w in _WRAPPERS):
                total[frame] += count
    return ProfileSummary(
        samples=samples,
        seconds=seconds,
        rate=rate,
        own=own.most_common(top),
        total=total.most_common(top),
        layers=layers.most_common(),
        by_service=by_service.most_common(top),
        raw_path=str(path),
    )
