"""Scale-out figures in one run: the same load against one process, `serve --workers 2`,
one process through PgBouncer (transaction mode, DB_PGBOUNCER=true) and one process
reading from a streaming replica (DATABASE_READ_URL).

    python -m bench.scale [--seconds 5] [--users 10000] [--posts 50000]

It makes its own throwaway primary, a `pg_basebackup -R` standby and a PgBouncer 1.18
(the integration tests' helpers in tests/support, so it needs the same Debian packages:
postgresql, pgbouncer), seeds them with bench.seed, and drives each configuration with
bench.client's spawned closed-loop clients. Every process it starts is stopped at the
end. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs, seed
from bench.client import ClientPool, LoadSpec, merge
from bench.metrics import percentile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.pgbouncer import start_pgbouncer  # noqa: E402
from support.postgres import start_cluster, start_standby  # noqa: E402

CLIENTS = 2
CONCURRENCY = 16
BOUNCER_POOL = 8


@dataclass
class Figure:
    config: str
    workload: str
    calls_per_s: float
    rows_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, int]


def _serve(port: int, env: dict[str, str], workers: int, log: Path) -> Any:
    args = [sys.executable, "-m", "service", "serve", "--workers", str(workers)]
    proc = procs.start(
        args,
        env={**env, "GRPC_LISTEN": f"127.0.0.1:{port}", "LOG_LEVEL": "WARNING"},
        log_path=log,
    )
    procs.wait_serving(proc, port, log_path=log)
    return proc


def _measure(
    pool: ClientPool, target: str, workload: str, params: dict[str, Any], seconds: float
) -> tuple[float, float, float | None, float | None, dict[str, int]]:
    specs = [
        LoadSpec(
            target=target,
            workload=workload,
            params=params,
            concurrency=CONCURRENCY if workload != "stream_posts" else 2,
            channels=4,
            warmup=1.0,
            duration=seconds,
            timeout=60.0,  # a stream of every post takes seconds on a busy machine
            seed=i,
        )
        for i in range(CLIENTS)
    ]
    pool.start(specs)
    results = pool.results(CLIENTS, seconds + 60)
    merged = merge(results)
    if workload == "stream_posts":
        # A stream client runs one stream and reports its rows and elapsed time; the
        # latencies are gaps between messages, not call latencies.
        rate = sum(r["rows"] / r["elapsed"] for r in results if r["elapsed"] > 0)
        return merged.ok / seconds, rate, None, None, merged.errors
    lat = merged.latencies
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return (
        merged.ok / seconds,
        merged.rows / seconds,
        None if p50 is None else p50 * 1000,
        None if p99 is None else p99 * 1000,
        merged.errors,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--posts", type=int, default=50_000)
    args = parser.parse_args(argv)
    procs.install_cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    primary = start_cluster({"max_connections": "200"})
    standby = bouncer = pool = None
    figures: list[Figure] = []
    try:
        db = seed.create_database(primary.url)
        seed.migrate(db)
        info = seed.seed(db, n_users=args.users, n_posts=args.posts, n_tags=200)
        print(f"seeded {info.users} users, {info.posts} posts in {info.seconds:.1f}s", flush=True)
        standby = start_standby(primary)
        replica_url = db.url.replace(f":{primary.port}/", f":{standby.port}/")
        bouncer = start_pgbouncer(primary.url, default_pool_size=BOUNCER_POOL)
        configs = [
            ("one process", {"DATABASE_URL": db.url}, 1),
            ("serve --workers 2", {"DATABASE_URL": db.url}, 2),
            (
                f"one process via PgBouncer (pool {BOUNCER_POOL})",
                {
                    "DATABASE_URL": bouncer.url_for(db.url),
                    "DB_PGBOUNCER": "true",
                    "STREAM_MAX_CONCURRENT": "6",
                },
                1,
            ),
            (
                "one process, reads on the replica",
                {"DATABASE_URL": db.url, "DATABASE_READ_URL": replica_url},
                1,
            ),
        ]
        workloads = [
            ("get_user", {"users": args.users}),
            ("list_posts", {"page_size": 50}),
            ("stream_posts", {}),
        ]
        pool = ClientPool(CLIENTS)
        for label, env, workers in configs:
            port = procs.free_port()
            log = workdir / f"serve-{port}.log"
            server = _serve(port, env, workers, log)
            try:
                for workload, params in workloads:
                    calls, rows, p50, p99, errors = _measure(
                        pool, f"127.0.0.1:{port}", workload, params, args.seconds
                    )
                    figures.append(Figure(label, workload, calls, rows, p50, p99, errors))
                    print(f"  {label:45} {workload:13} {calls:8.0f}/s", flush=True)
            finally:
                procs.stop(server)
            time.sleep(1.0)
    finally:
        if pool is not None:
            pool.close()
        if bouncer is not None:
            bouncer.close()
        if standby is not None:
            standby.destroy()
        primary.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| configuration | workload | calls/s | rows/s | p50 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---|")
    for f in figures:
        p50 = "-" if f.p50_ms is None else f"{f.p50_ms:.1f}"
        p99 = "-" if f.p99_ms is None else f"{f.p99_ms:.1f}"
        print(
            f"| {f.config} | {f.workload} | {f.calls_per_s:.0f} | {f.rows_per_s:.0f} | "
            f"{p50} | {p99} | {f.errors or ''} |"
        )


if __name__ == "__main__":
    main()
