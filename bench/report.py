"""Results, ratios, targets, and docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.profile import ProfileSummary


@dataclass
class Result:
    name: str
    label: str
    group: str  # "ceiling" | "service"
    unit: str  # "QPS" | "rows/s" | "ms"
    value: float | None
    short: str = ""  # how other rows name this one in "vs ceiling"
    p50_ms: float | None = None
    p99_ms: float | None = None
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    per: str = "call"  # CPU figures are per call, or per "1k rows"
    server_cpu_us: float | None = None
    db_cpu_us: float | None = None
    client_cpu_us: float | None = None
    peak_rss_mb: float | None = None
    ceiling: str | None = None  # name of the result this one is divided by
    naive: bool = False  # also compare with the naive twin
    lower_is_better: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def medians(rounds: list[dict[str, Result]]) -> dict[str, Result]:
    """One result per scenario from several rounds: the round with the median value
    (lower median for an even count), with every round's value and the spread."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[str, Result] = {}
    for name in dict.fromkeys(n for results in rounds for n in results):
        measured = [r[name] for r in rounds if name in r and r[name].value is not None]
        if not measured:
            merged[name] = next(r[name] for r in rounds if name in r)
            continue
        ranked = sorted(measured, key=lambda r: r.value or 0.0)
        median = ranked[(len(ranked) - 1) // 2]
        median.extra["rounds"] = [_round(r.value) for r in measured]
        median.extra["spread"] = _round((ranked[-1].value or 0.0) - (ranked[0].value or 0.0))
        merged[name] = median
    return merged


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(value) if abs(value) >= 100 else round(value, 2)


def ratio(results: dict[str, Result], a: str, b: str | None) -> float | None:
    if b is None or a not in results or b not in results:
        return None
    x, y = results[a].value, results[b].value
    if x is None or y is None or y == 0:
        return None
    return x / y


# -- formatting ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _value(r: Result) -> str:
    if r.value is None:
        return "—"
    if r.unit == "ms":
        return f"{_ms(r.value)} ms"
    return f"{_num(r.value)} {r.unit}"


def _errors(r: Result) -> str:
    if not r.errors:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))


COLUMNS = (
    "Scenario",
    "Result",
    "p50 ms",
    "p99 ms",
    "Errors",
    "Server CPU µs",
    "DB CPU µs",
    "Client CPU µs",
    "Peak RSS MB",
    "Other procs (cores)",
    "vs ceiling",
    "vs naive twin",
)


def rows(results: dict[str, Result]) -> list[list[str]]:
    table = []
    for r in results.values():
        ceiling = ratio(results, r.name, r.ceiling)
        naive = ratio(results, r.name, "naive") if r.naive else None
        per = "" if r.per == "call" else f" /{r.per}"
        table.append(
            [
                r.label,
                _value(r),
                _ms(r.p50_ms),
                _ms(r.p99_ms),
                _errors(r),
                _num(r.server_cpu_us) + per if r.server_cpu_us is not None else "—",
                _num(r.db_cpu_us) + per if r.db_cpu_us is not None else "—",
                _num(r.client_cpu_us) + per if r.client_cpu_us is not None else "—",
                _num(r.peak_rss_mb, 0) if r.peak_rss_mb is not None else "—",
                _num(r.extra.get("foreign_cores_busy"), 1),
                f"{_x(ceiling)} {results[r.ceiling].short or results[r.ceiling].label}"
                if ceiling is not None and r.ceiling
                else "—",
                _x(naive),
            ]
        )
    return table


def console_table(results: dict[str, Result]) -> str:
    body = rows(results)
    widths = [max([len(COLUMNS[i]), *(len(row[i]) for row in body)]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def markdown_table(header: list[str] | tuple[str, ...], body: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# -- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


# Issue 12's baseline: ListPosts page 50 BASIC's PostgreSQL CPU a call (2026-11-23 full
# run), which the target halves.
LIST_POSTS_DB_CPU_BEFORE_US = 1515.0


def targets(
    results: dict[str, Result], round_trips: dict[str, tuple[int, str]] | None = None
) -> list[Target]:
    """Issue 12's targets (same-run ratios), and the contract's promises on streams and
    deep pages."""
    out: list[Target] = []

    def get(name: str) -> Result | None:
        return results.get(name)

    def at_least(text: str, a: str, b: str, factor: float) -> None:
        r = ratio(results, a, b)
        out.append(
            Target(
                text,
                "not measured" if r is None else f"{r:.2f}x",
                None if r is None else r >= factor,
            )
        )

    def per_call(
        text: str, name: str, limit: float, *, base: str | None = None, db: bool = False
    ) -> None:
        a, b = get(name), get(base) if base else None
        value = (a.db_cpu_us if db else a.server_cpu_us) if a else None
        if base is not None:
            other = b.server_cpu_us if b else None
            value = value / other if value and other else None
        if value is None:
            out.append(Target(text, "not measured", None))
            return
        shown = f"{value:.2f}x" if base else f"{value:,.0f} µs"
        out.append(Target(text, shown, value <= limit))

    def trips(text: str, method: str, limit: int) -> None:
        found = (round_trips or {}).get(method)
        out.append(
            Target(
                text,
                "not counted" if found is None else str(found[0]),
                None if found is None else found[0] <= limit,
            )
        )

    at_least("GetUser QPS ≥ 0.5x bare grpc.aio echo QPS", "get_user", "echo", 0.5)
    at_least("GetUser QPS ≥ 2x naive twin QPS", "get_user", "naive", 2.0)
    half = get("get_user_half_peak")
    p99 = half.value if half else None
    out.append(
        Target(
            "GetUser p99 at half of peak QPS ≤ 8 ms",
            "not measured" if p99 is None else f"{p99:.2f} ms",
            None if p99 is None else p99 <= 8.0,
        )
    )
    per_call(
        "ListPosts page 50 BASIC server CPU a call ≤ 2x GetUser's",
        "list_posts_basic",
        2.0,
        base="get_user",
    )
    per_call(
        "ListPosts page 50 BASIC PostgreSQL CPU a call ≤ half of 1,515 µs",
        "list_posts_basic",
        LIST_POSTS_DB_CPU_BEFORE_US / 2,
        db=True,
    )
    at_least(
        "ListPosts page 50 FULL QPS ≥ 0.85x BASIC", "list_posts_full", "list_posts_basic", 0.85
    )
    trips("CreatePost (2 tags, no request_id) ≤ 4 round trips", "CreatePost (2 tags)", 4)
    at_least("CreatePost QPS ≥ 0.6x GetUser", "create_post", "get_user", 0.6)
    trips("UpdateUser ≤ 3 round trips", "UpdateUser (display_name)", 3)
    at_least("UpdateUser QPS ≥ 0.7x GetUser", "update_user", "get_user", 0.7)
    at_least(
        "StreamPosts rows/s ≥ 0.85x the harness's stream ceiling",
        "stream_posts",
        "stream_ceiling",
        0.85,
    )
    at_least(
        "BatchCreateUsers rows/s ≥ 0.5x asyncpg COPY rows/s", "batch_create_users", "copy", 0.5
    )
    at_least(
        "GetUser, serve --workers 2 ≥ 1.3x --workers 1 (measured back to back)",
        "get_user_workers2",
        "get_user_1w_pair",
        1.3,
    )
    at_least(
        "GetUser with metrics + access log ≥ 0.9x without (measured back to back)",
        "get_user_obs_on",
        "get_user_obs_off",
        0.9,
    )
    stream = get("stream_posts")
    growth = stream.extra.get("rss_growth_mb") if stream else None
    out.append(
        Target(
            "StreamPosts RSS growth < 50 MB over the whole stream",
            "not measured" if growth is None else f"{growth:.1f} MB",
            None if growth is None else growth < 50,
        )
    )
    deep = ratio(results, "list_page1000", "list_page1")
    out.append(
        Target(
            "ListPosts page 1000 latency ≤ 1.2x page 1 (p50)",
            "not measured" if deep is None else f"{deep:.2f}x",
            None if deep is None else deep <= 1.2,
        )
    )
    return out


_DETAIL_NAMES = {
    "window_s": "window s",
    "server_cpu_s": "server CPU s",
    "client_cpu_s": "client CPU s",
    "db_cpu_s": "DB CPU s",
    "loadavg": "load avg",
    "new_db_sessions": "new DB sessions",
    "db_xacts_per_call": "DB xacts/call (approx.)",
    "p999_ms": "p99.9 ms",
    "in_flight": "in flight",
    "cpu_s_by_process": "CPU s by server process",
    "server_cores_busy": "server cores busy",
    "foreign_cores_busy": "cores busy with other processes",
    "steal_cores": "cores stolen by the hypervisor",
    "cost_vs_off_pct": "QPS cost vs off, %",
    "server_cpu_cost_us": "server CPU µs/call added",
    "windows": "QPS of each window",
    "rounds": "result of each round",
    "spread": "spread (max - min)",
    "ratio_by_pair": "on/off QPS, pair by pair",
}


def _details(r: Result) -> str:
    parts = []
    for key, value in r.extra.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:,.2f}"
        parts.append(f"{_DETAIL_NAMES.get(key, key.replace('_', ' '))}: {value}")
    return "; ".join(parts)


def _met(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**not met**")


# -- the document -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
    }


def versions(pg_version: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"Python": platform.python_version()}
    for name in ("grpcio", "SQLAlchemy", "asyncpg", "protobuf", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["PostgreSQL"] = pg_version
    return found


_READING_PLACEHOLDER = (
    "_To be written by hand after a full run: what the figures say, which targets are\n"
    "missed and why, and what to change first. This section is kept when the file is\n"
    "regenerated._"
)


def _kept_reading(path: Path) -> str | None:
    """The hand-written "Reading" section of an existing file, kept across runs."""
    if not path.exists():
        return None
    match = re.search(r"^## Reading\n(.*?)(?=^## |\Z)", path.read_text(), re.S | re.M)
    if not match:
        return None
    text = match.group(1).strip()
    return text or None


def write_markdown(
    path: Path,
    *,
    results: dict[str, Result],
    profiles: dict[str, ProfileSummary],
    run: dict[str, Any],
    pg_version: str,
    problems: list[str] | None = None,
    statements: dict[str, tuple[int, str]] | None = None,
) -> None:
    reading = _kept_reading(path) or _READING_PLACEHOLDER
    m = machine()
    v = versions(pg_version)
    out: list[str] = []
    out.append("# Benchmarks")
    out.append("")
    out.append(
        f"Generated by `python -m bench {run['args']}` on {run['date']} "
        f"({run['seconds']:.0f} s). Do not edit the tables by hand; rerun the harness "
        "(`make bench` for the full profile, `make bench-quick` for the short one). Only "
        "the *Reading* section is hand-written and kept across runs."
    )
    out.append("")
    out.append("## Machine and versions")
    out.append("")
    out.append(
        markdown_table(
            ["", ""],
            [
                [
                    "Machine",
                    f"{m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}",
                ],
                ["Date (UTC)", run["date"]],
                ["Load average at start", f"{run['loadavg']:.2f}"],
                *[[k, val] for k, val in v.items()],
            ],
        )
    )
    out.append("")
    out.append(
        "Client processes, servers and PostgreSQL share the same CPUs, so every figure is "
        "for this whole box, not for the server alone."
    )
    out.append("")
    out.append("## Set-up")
    out.append("")
    for line in run["setup"]:
        out.append(f"- {line}")
    out.append("")
    if problems:
        out.append("## Problems found by this run")
        out.append("")
        for problem in problems:
            out.append(f"- **{problem}**")
        out.append("")
    if statements:
        out.append("## Round trips per method")
        out.append("")
        out.append(
            "Every message exchange a call starts with PostgreSQL, BEGIN and COMMIT "
            "included, counted at asyncpg's protocol (tests/support/statements.py) on the "
            "bench database after warm-up: the fewest of three calls (a prepare on a "
            "statement-cache miss would add one)."
        )
        out.append("")
        out.append(
            markdown_table(
                ["Method", "Round trips", "What they are"],
                [[name, str(n), f"`{summary[:300]}`"] for name, (n, summary) in statements.items()],
            )
        )
        out.append("")
    out.append("## Results")
    out.append("")
    out.append(
        "CPU columns are CPU time (user + system) per call (or per 1,000 rows where marked) "
        "during the measured window: *Server* is the server's process tree (psutil), *DB* "
        "the PostgreSQL backends of the bench database, *Client* the load-generating "
        "processes. Peak RSS is the server tree's, sampled every 100 ms. *Other procs* is "
        "how many cores processes that are not part of the run (other users of the "
        "machine) kept busy meanwhile: rows with a high figure are perturbed. p50/p99 are "
        "client-observed per-call latencies (for streams: the gap between messages). "
        "Failed calls are never counted as calls; they appear under *Errors*."
    )
    out.append("")
    out.append(markdown_table(list(COLUMNS), rows(results)))
    out.append("")
    notes = [(r.label, n) for r in results.values() for n in r.notes]
    if notes:
        out.append("Notes:")
        out.append("")
        for label, note in notes:
            out.append(f"- {label}: {note}")
        out.append("")
    out.append(
        "Details (extra figures per scenario). *New DB sessions* and *DB xacts/call* come "
        "from pg_stat_database, which PostgreSQL updates about once a second, and include "
        "the service's readiness probe (one new connection a second per worker process): "
        "treat them as approximate."
    )
    out.append("")
    out.append(
        markdown_table(
            ["Scenario", "Details"],
            [[r.label, _details(r)] for r in results.values() if r.extra],
        )
    )
    out.append("")
    out.append("## Targets")
    out.append("")
    out.append(
        markdown_table(
            ["Target", "Measured", "Status"],
            [[t.text, t.measured, _met(t.met)] for t in targets(results, statements)],
        )
    )
    out.append("")
    out.append("## Where the time goes")
    out.append("")
    out.extend(_profile_sections(profiles))
    out.append("")
    out.append("## Reading")
    out.append("")
    out.append(reading)
    out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def profile_rows(summary: ProfileSummary) -> list[tuple[str, int]]:
    """Where a method's samples were: by the innermost service function on the stack
    (with what it called), or, with none, by the leaf's layer in brackets."""
    return summary.by_service


def _profile_sections(profiles: dict[str, ProfileSummary]) -> list[str]:
    if not profiles:
        return ["_Not profiled in this run (`--only` without `profile`)._"]
    first = next(iter(profiles.values()))
    out = [
        f"`py-spy record --format raw --nolineno --gil --rate {first.rate}` of the one-worker "
        f"server for {first.seconds:.0f} s under each method's load in turn (runs of their "
        "own, after the measured ones). Samples are taken while a thread holds the GIL. Each "
        "sample counts once, for the innermost *service* function on its stack, together "
        "with the library code that function called; a sample with no service frame counts "
        "for its leaf's layer, in brackets: `[uvloop + gRPC C core]` is uvloop's C loop "
        "running gRPC's and asyncpg's Cython callbacks (reading, writing and framing "
        "messages), and `[sqlalchemy]` is mostly SQLAlchemy's greenlet-run code, whose "
        "stacks py-spy roots at `greenlet_spawn` without the service frames above it.",
        "",
    ]
    for label, summary in profiles.items():
        out.append(f"### {label}")
        out.append("")
        if summary.error:
            out.append(f"_Profiling failed: {summary.error}_")
            out.append("")
            continue
        held = summary.samples / (summary.seconds * summary.rate)
        layers = ", ".join(
            f"{name.split(' (')[0]} {count / summary.samples:.0%}"
            for name, count in summary.layers[:5]
        )
        out.append(
            f"{summary.samples:,} samples (GIL held {held:.0%} of the time). "
            f"Own samples by layer: {layers}."
        )
        out.append("")
        out.append(
            markdown_table(
                ["Where (innermost service function, or layer)", "Samples", "Share"],
                [
                    [f"`{f}`", f"{c:,}", f"{c / summary.samples:.0%}"]
                    for f, c in profile_rows(summary)[:12]
                ],
            )
        )
        out.append("")
    return out


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
