"""`python -m bench --quick | --full [--only NAME[,NAME]] [--output docs/BENCHMARKS.md]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import asyncpg

from bench import procs, report, seed, statements
from bench.client import ClientPool
from bench.report import Result
from bench.scenarios import FULL, ORDER, QUICK, SERVICE_ENV, Runner

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

SERVERS: dict[str, tuple[str, ...]] = {
    "echo": ("ceiling",),
    "stream_ceiling": ("ceiling",),
    "naive": ("naive",),
    "get_user": ("service",),
    "list_posts": ("service",),
    "deep_paging": ("service",),
    "stream_posts": ("service",),
    "get_user_half_peak": ("service",),
    "update_user": ("service",),
    "create_post": ("service",),
    "batch_create_users": ("service",),
    "profile": ("service",),
    "workers2": ("service", "service2"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the blog.v1 service against its ceilings on a fresh, seeded "
        "PostgreSQL database (BENCH_DATABASE_URL, default " + DEFAULT_URL + ").",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="10k users, 100k posts, 4 s a scenario (default)"
    )
    size.add_argument("--full", action="store_true", help="100k users, 1M posts, 12 s a scenario")
    parser.add_argument(
        "--only",
        help="comma-separated scenario groups to run: " + ", ".join(ORDER),
    )
    parser.add_argument(
        "--output", default="docs/BENCHMARKS.md", help="markdown report path ('-' for none)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="run every scenario this many times and report medians with their spread "
        "(default: 3 with --full, 1 with --quick)",
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="do not drop the bench database (debugging)"
    )
    return parser


def _log(message: str) -> None:
    print(message, flush=True)


def _pg_facts(db: seed.BenchDatabase) -> tuple[str, int]:
    """The server version, and how many connection slots are free right now."""

    async def fetch() -> tuple[str, int]:
        con = await asyncpg.connect(db.dsn, timeout=10)
        try:
            version = str(await con.fetchval("SHOW server_version"))
            free = await con.fetchval(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
                " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
            return version, int(free)
        finally:
            await con.close()

    return asyncio.run(fetch())


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    profile = FULL if args.full else QUICK
    selected = list(ORDER)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in ORDER]
        if unknown:
            sys.exit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
        selected = [n for n in ORDER if n in wanted]
    procs.install_cleanup()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="blogbench-"))
    admin_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL)
    loadavg = os.getloadavg()[0]
    _log(f"bench --{profile.name}: {', '.join(selected)}; logs in {workdir}")
    if loadavg > 0.5:
        _log(f"note: load average is {loadavg:.2f} before the run; figures may be perturbed")

    db = seed.create_database(admin_url)
    _log(f"database {db.name}")
    clients: ClientPool | None = None
    runner: Runner | None = None
    failures: list[str] = []
    exit_code = 0
    try:
        clients = ClientPool(profile.clients)  # spawning overlaps with the seeding
        t = time.monotonic()
        seed.migrate(db)
        _log(f"migrated in {time.monotonic() - t:.1f}s")
        runner = Runner(profile, db, workdir, clients, _log)
        kinds = sorted({k for n in selected for k in SERVERS.get(n, ())})
        for kind in kinds:
            runner.launch(kind)  # they boot while the seeding runs
        info = seed.seed(db, n_users=profile.users, n_posts=profile.posts, n_tags=profile.tags)
        _log(
            f"seeded {info.users:,} users, {info.posts:,} posts, {info.tags} tags, "
            f"{info.post_tags:,} post_tags in {info.seconds:.1f}s (COPY, indexes rebuilt, "
            "VACUUM ANALYZE)"
        )
        pg_version, free = _pg_facts(db)
        if free < 80:
            _log(
                f"note: only {free} PostgreSQL connection slots are free; the service's pool "
                "(32, twice with --workers 2) and the database ceilings (32) may not fit"
            )
        for kind in kinds:  # every server SERVING before the first measurement
            try:
                runner.server(kind)
            except procs.ProcessFailed as error:
                _log(f"PROBLEM: {kind} server did not come up:\n{error}")
        repeats = args.repeat or (3 if args.full else 1)
        rounds: list[dict[str, Result]] = []
        for round_number in range(repeats):
            runner.results = {}
            # The profile is taken once; the other scenarios each round.
            names = [n for n in selected if n != "profile" or round_number == 0]
            for index, name in enumerate(names):
                _log(f"[{time.monotonic() - started:5.1f}s] {name} ({round_number + 1}/{repeats})")
                try:
                    runner.run(name)
                except Exception:
                    failures.append(name)
                    _log(f"  FAILED:\n{traceback.format_exc()}")
                # Servers no later scenario needs give their connections and CPU back.
                later = {k for n in names[index + 1 :] for k in SERVERS.get(n, ())}
                if round_number + 1 < repeats:
                    later |= {k for n in names for k in SERVERS.get(n, ())}
                for kind in list(runner.servers):
                    if kind not in later:
                        runner.stop_server(kind)
            rounds.append(runner.results)
        runner.results = report.medians(rounds)
        round_trips: dict[str, tuple[int, str]] = {}
        try:
            round_trips = statements.count(db.url)
        except Exception:
            failures.append("statements")
            _log(f"  round trips not counted:\n{traceback.format_exc()}")
        results = runner.results
        for problem in runner.problems:
            _log(f"PROBLEM: {problem}")
        _log("")
        _log(report.console_table(results))
        _log("")
        for target in report.targets(results, round_trips):
            status = "not measured" if target.met is None else ("met" if target.met else "NOT MET")
            _log(f"  {status:12} {target.text}: {target.measured}")
        if round_trips:
            _log("\nround trips to PostgreSQL per call:")
            for name, (n, summary) in round_trips.items():
                _log(f"  {n:3}  {name}: {summary[:160]}")
        for method, spied in runner.profiles.items():
            if spied.samples:
                _log(f"\nwhere {method}'s time goes (total samples):")
                for func, count in report.profile_rows(spied)[:8]:
                    _log(f"  {count / spied.samples:6.1%}  {func}")
        seconds = time.monotonic() - started
        if args.output != "-":
            output = Path(args.output)
            if not output.is_absolute():
                output = procs.ROOT / output
            setup = [
                f"Profile `--{profile.name}`: {info.users:,} users, {info.posts:,} posts, "
                f"{info.tags} tags, {info.post_tags:,} post_tags (posts skewed towards low "
                "author ids, create_time spread over three years), seeded by asyncpg COPY in "
                f"{info.seconds:.1f} s, then VACUUM ANALYZE; table sizes "
                + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(info.sizes_mb.items())),
                f"Each closed-loop scenario: {profile.warmup:g} s warm-up, then "
                f"{profile.duration:g} s measured; {profile.clients} client processes "
                f"(multiprocessing spawn, uvloop, grpc.aio) x {profile.concurrency} calls in "
                f"flight over {profile.channels} channels (separate TCP connections) each = "
                f"{profile.clients * profile.concurrency} in flight; BatchCreateUsers "
                f"{profile.batch_concurrency} per client process. Database ceilings: one "
                "process, 32 concurrent tasks, uvloop, pool of 32.",
                "Service: `python -m service serve [--workers 2]` with "
                + " ".join(f"{k}={v}" for k, v in SERVICE_ENV.items())
                + " METRICS_LISTEN=127.0.0.1:(a free port) (other settings default): metrics "
                "and the JSON access log on, as deploy/ runs it, except where GetUser is "
                "measured with both off beside it. Ceiling servers use the service's "
                "`server_options`; the naive twin uses grpc and SQLAlchemy defaults; the "
                "session floor (`bench.ceiling_server --get-user session`, DECISIONS 44) is "
                "a GetUser with an AsyncSession per call on a pool of DB_POOL_SIZE "
                "connections and nothing else.",
                "Deep paging: page tokens gathered first (1,000-row strides, then 50-row "
                "pages to row 49,950); page 1 and page 1000 each measured with one call in "
                f"flight for {profile.page_duration:g} s; the figure is p50 latency.",
                "GetUser at half peak: open loop (calls scheduled at a fixed rate, latency "
                "from the scheduled instant, so queueing is not hidden) at half the "
                "closed-loop GetUser QPS of this run.",
                "Stream ceiling: one asyncpg connection, REPEATABLE READ READ ONLY, a cursor in "
                "the service's default order, 1,000 rows a fetch, that batch's tags in one "
                "query, the batch built in place as one StreamPostsResponse and yielded; "
                "sequential (fetch, build, send), like the service.",
                (
                    f"Every scenario ran {repeats} times, one round after another; each row "
                    "is the round with the median result, its *Details* give every round's "
                    "figure and the spread (max - min), and ratios are between medians. "
                    if repeats > 1
                    else "Every figure is one measurement, not a median of repeats. "
                )
                + "The machine is shared: compare rows measured close together, and "
                "discount rows whose *Other procs* figure is high.",
                "StreamPosts: one stream of every post (BASIC view) into one client process; "
                "rows/s from the call's start to its end; RSS growth = peak server RSS during "
                "the stream minus RSS after 10,000 rows.",
            ]
            report.write_markdown(
                output,
                results=results,
                profiles=runner.profiles,
                run={
                    "args": " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": report.utc_now(),
                    "seconds": seconds,
                    "loadavg": loadavg,
                    "setup": setup,
                },
                pg_version=pg_version,
                statements=round_trips,
                problems=runner.problems
                + [f"scenario `{f}` failed (see the console log)" for f in failures],
            )
            _log(f"\nwrote {output}")
        _log(f"total {seconds:.0f}s")
        if failures:
            _log(f"FAILED scenarios: {', '.join(failures)}")
            exit_code = 1
    except procs.ProcessFailed as error:
        _log(f"\nFAILED: {error}")
        exit_code = 2
    except (KeyboardInterrupt, SystemExit):
        _log("\ninterrupted: stopping every process and dropping the database")
        exit_code = 130
    finally:
        # Cleanup is bounded (every stop has a timeout): do not let a second ^C or
        # SIGTERM cut it short and leave servers or the database behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if runner is not None:
            runner.close()
        if clients is not None:
            clients.close()
        procs.stop_all()
        if args.keep_db:
            _log(f"kept database {db.name}")
        else:
            try:
                seed.drop_database(db)
            except Exception as error:
                _log(f"could not drop database {db.name}: {error!r}")
    sys.exit(exit_code)
