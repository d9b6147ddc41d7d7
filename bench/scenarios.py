"""Every scenario and ceiling, measured the same way against the seeded database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]

from bench import procs
from bench import profile as profiling
from bench.client import ClientPool, LoadSpec, merge
from bench.metrics import Watch, WindowStats, percentile
from bench.report import Result
from bench.seed import BenchDatabase, tag_names


@dataclass(frozen=True)
class Profile:
    name: str
    users: int
    posts: int
    tags: int
    warmup: float
    duration: float
    page_duration: float  # each of page 1 / page 1000
    profile_seconds: float
    stream_timeout: float
    ceiling_duration: float  # the database ceilings (no gRPC), each
    clients: int = 2
    concurrency: int = 16  # per client process: 2 x 16 = 32 in flight
    channels: int = 4  # per client process
    batch_concurrency: int = 2  # BatchCreateUsers calls in flight per client process


QUICK = Profile(
    "quick",
    users=10_000,
    posts=100_000,
    tags=50,
    warmup=1.0,
    duration=4.0,
    page_duration=2.0,
    profile_seconds=3.0,
    stream_timeout=60.0,
    ceiling_duration=3.0,
)
FULL = Profile(
    "full",
    users=100_000,
    posts=1_000_000,
    tags=200,
    warmup=2.0,
    duration=8.0,
    page_duration=6.0,
    profile_seconds=6.0,
    stream_timeout=300.0,
    ceiling_duration=10.0,
)

# The service's environment in every run (documented in BENCHMARKS.md).
# Every service server runs as the Kubernetes manifests run it: /metrics on a port of its
# own (METRICS_LISTEN, set per server) and a JSON access-log line per call (to its log
# file), except "service_off", which get_user_observed compares them with.
SERVICE_ENV = {
    "DB_POOL_SIZE": "32",
    "DB_MAX_OVERFLOW": "0",
    "LOG_LEVEL": "WARNING",
    "SHUTDOWN_GRACE": "1",
    "ACCESS_LOG": "true",
    "LOG_FORMAT": "json",
}
# What "service_off" turns off (METRICS_LISTEN is not set for it either).
UNOBSERVED_ENV = {"ACCESS_LOG": "false", "LOG_FORMAT": "text"}
# The order get_user_observed measures its two servers in (ABBA).
OBSERVED_ORDER = ("get_user_obs_off", "get_user_obs_on", "get_user_obs_on", "get_user_obs_off")

# Scenario groups, in run order; `--only` takes these names.
ORDER = (
    "asyncpg",
    "sqlalchemy",
    "echo",
    "naive",
    "session_floor",
    "get_user",
    "get_user_observed",
    "list_posts",
    "deep_paging",
    "stream_ceiling",
    "stream_posts",
    "get_user_half_peak",
    "update_user",
    "create_post",
    "copy",
    "batch_create_users",
    "profile",
    "workers2",  # last: it stops the other servers first, to stay within max_connections
)


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    ready: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Runner:
    def __init__(
        self, profile: Profile, db: BenchDatabase, workdir: Path, clients: ClientPool, log: Any
    ) -> None:
        self.p = profile
        self.db = db
        self.workdir = workdir
        self.clients = clients
        self.log = log
        self.results: dict[str, Result] = {}
        self.servers: dict[str, Server] = {}
        self.profiles: dict[str, profiling.ProfileSummary] = {}  # by method
        self.problems: list[str] = []  # loud findings for the report (e.g. a broken CLI)
        self._tokens: dict[str, Any] | None = None

    # -- servers ---------------------------------------------------------------------------

    def launch(self, kind: str) -> Server:
        """Start a server without waiting for it (see `server`)."""
        if kind in self.servers:
            return self.servers[kind]
        port = procs.free_port()
        log = self.workdir / f"{kind}.log"
        env = {"PYTHONUNBUFFERED": "1"}
        if kind in ("service", "service2", "service2shim", "service_off", "service_observed"):
            workers = "2" if kind in ("service2", "service2shim") else "1"
            env.update(SERVICE_ENV)
            env.update({"DATABASE_URL": self.db.url, "GRPC_LISTEN": f"127.0.0.1:{port}"})
            if kind == "service_off":
                env.update(UNOBSERVED_ENV)
            else:
                env["METRICS_LISTEN"] = f"127.0.0.1:{procs.free_port()}"
            module = "bench.serve_workers" if kind == "service2shim" else "service"
            args = procs.python("-m", module, "serve", "--workers", workers)
        elif kind == "ceiling":
            args = procs.python(
                "-m", "bench.ceiling_server", "--port", str(port), "--database-url", self.db.url
            )
        elif kind == "floor":
            args = procs.python(
                "-m",
                "bench.ceiling_server",
                "--port",
                str(port),
                "--database-url",
                self.db.url,
                "--get-user",
                "session",
                "--pool-size",
                SERVICE_ENV["DB_POOL_SIZE"],
            )
        elif kind == "naive":
            args = procs.python(
                "-m", "bench.naive_server", "--port", str(port), "--database-url", self.db.url
            )
        else:
            raise ValueError(kind)
        proc = procs.start(args, env=env, log_path=log)
        server = Server(kind, proc, port, log)
        self.servers[kind] = server
        return server

    def server(self, kind: str) -> Server:
        server = self.launch(kind)
        if not server.ready:
            took = procs.wait_serving(server.proc, server.port, log_path=server.log)
            self.log(f"  {kind} server SERVING on :{server.port} after {took:.1f}s")
            server.ready = True
        if server.proc.poll() is not None:
            raise procs.ProcessFailed(
                f"{kind} server exited with {server.proc.returncode}:\n{procs.tail(server.log)}"
            )
        return server

    def _check_alive(self, server: Server) -> None:
        if server.proc.poll() is not None:
            self.servers.pop(server.kind, None)
            raise procs.ProcessFailed(
                f"{server.kind} server died during the scenario (exit {server.proc.returncode})"
                f":\n{procs.tail(server.log)}"
            )

    def stop_server(self, kind: str) -> None:
        server = self.servers.pop(kind, None)
        if server is not None:
            procs.stop(server.proc)

    def close(self) -> None:
        for kind in list(self.servers):
            self.stop_server(kind)

    # -- database counters -------------------------------------------------------------------

    def _db_counters(self) -> tuple[int, int]:
        async def fetch() -> tuple[int, int]:
            con = await asyncpg.connect(self.db.dsn.rsplit("/", 1)[0] + "/postgres", timeout=5)
            try:
                row = await con.fetchrow(
                    "SELECT sessions, xact_commit + xact_rollback AS xacts"
                    " FROM pg_stat_database WHERE datname = $1",
                    self.db.name,
                )
                return int(row["sessions"] or 0), int(row["xacts"] or 0)
            finally:
                await con.close()

        try:
            return asyncio.run(fetch())
        except Exception:
            return (0, 0)

    # -- measuring -------------------------------------------------------------------------------

    def _finish(
        self,
        result: Result,
        stats: WindowStats,
        calls: int,
        per_units: float,
        counters: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ) -> Result:
        """Fill CPU and RSS figures; `per_units` is how many calls (or 1k-row units) ran."""
        if per_units > 0:
            result.server_cpu_us = stats.server_cpu / per_units * 1e6
            result.db_cpu_us = stats.db_cpu / per_units * 1e6
            result.client_cpu_us = stats.client_cpu / per_units * 1e6 if stats.client_cpu else None
        result.peak_rss_mb = stats.peak_rss / 1e6
        result.extra["window_s"] = round(stats.seconds, 2)
        result.extra["server_cpu_s"] = round(stats.server_cpu, 2)
        result.extra["client_cpu_s"] = round(stats.client_cpu, 2)
        result.extra["db_cpu_s"] = round(stats.db_cpu, 2)
        result.extra["loadavg"] = round(stats.loadavg, 2)
        if stats.seconds > 0:
            result.extra["server_cores_busy"] = round(stats.server_cpu / stats.seconds, 2)
            result.extra["foreign_cores_busy"] = round(stats.foreign_cores, 2)
            if stats.steal / stats.seconds > 0.05:
                result.extra["steal_cores"] = round(stats.steal / stats.seconds, 2)
            if stats.foreign_cores > 0.3:
                result.notes.append(
                    f"other processes on the machine kept {stats.foreign_cores:.1f} of "
                    f"{psutil.cpu_count()} cores busy during this window: figure perturbed"
                )
            clients = result.extra.pop("_clients", 0)
            if clients and stats.client_cpu / stats.seconds / clients > 0.85:
                result.notes.append(
                    f"client processes averaged {stats.client_cpu / stats.seconds / clients:.0%}"
                    " of a core each: load generation may be a co-bottleneck here"
                )
        if counters is not None and calls >= 500:  # readiness probes add a few per second
            (s0, x0), (s1, x1) = counters
            result.extra["new_db_sessions"] = s1 - s0
            result.extra["db_xacts_per_call"] = round((x1 - x0) / calls, 2)
        if result.first_error:
            result.notes.append(f"first error: {result.first_error[:200]}")
        self.results[result.name] = result
        self.log("  " + summary_line(result))
        return result

    def unary(
        self,
        name: str,
        label: str,
        kind: str,
        workload: str,
        params: dict[str, Any],
        *,
        ceiling: str | None = "echo",
        naive: bool = True,
        concurrency: int | None = None,
        clients: int | None = None,
        rate: float = 0.0,
        duration: float | None = None,
        unit: str = "QPS",
        timeout: float = 10.0,
        short: str = "",
    ) -> Result:
        server = self.server(kind)
        n_clients = clients or self.p.clients
        duration = duration or self.p.duration
        spec = LoadSpec(
            target=server.target,
            workload=workload,
            params=params,
            concurrency=concurrency or self.p.concurrency,
            channels=self.p.channels,
            warmup=self.p.warmup,
            duration=duration,
            rate=rate / n_clients if rate else 0.0,
            timeout=timeout,
        )
        before = self._db_counters()
        specs = [LoadSpec(**{**spec.__dict__, "seed": i + 1}) for i in range(n_clients)]
        t0 = self.clients.start(specs)
        watch = Watch([server.proc.pid], self.clients.pids[:n_clients], self.db.name)
        _sleep_until(t0 + spec.warmup)
        watch.start()
        _sleep_until(t0 + spec.warmup + duration)
        stats = watch.stop()
        merged = merge(self.clients.results(n_clients, timeout + 30))
        after = self._db_counters()
        self._check_alive(server)
        value = (merged.rows if unit == "rows/s" else merged.ok) / duration
        result = Result(
            name=name,
            label=label,
            short=short,
            group="service" if kind.startswith("service") else "ceiling",
            unit=unit,
            value=value,
            p50_ms=_ms(percentile(merged.latencies, 50)),
            p99_ms=_ms(percentile(merged.latencies, 99)),
            calls=merged.ok,
            errors=merged.errors,
            first_error=merged.first_error,
            per="call" if unit != "rows/s" else "1k rows",
            ceiling=ceiling,
            naive=naive,
        )
        result.extra["_clients"] = n_clients
        result.extra["p999_ms"] = _ms(percentile(merged.latencies, 99.9))
        result.extra["in_flight"] = (
            (concurrency or self.p.concurrency) * n_clients if not rate else None
        )
        if rate:
            result.extra["offered_qps"] = round(rate)
        if len(stats.per_process_cpu) > 1:
            busy = sorted(
                (round(v, 2) for v in stats.per_process_cpu.values() if v > 0.05), reverse=True
            )
            result.extra["cpu_s_by_process"] = busy
        units = merged.ok if unit != "rows/s" else merged.rows / 1000
        return self._finish(result, stats, merged.ok, units, (before, after))

    def dbceil(
        self,
        name: str,
        label: str,
        mode: str,
        *,
        ceiling: str | None,
        unit: str = "QPS",
        extra: dict[str, Any] | None = None,
        duration: float | None = None,
        short: str = "",
    ) -> Result:
        config = {
            "mode": mode,
            "url": self.db.url,
            "users": self.p.users,
            "concurrency": 32,
            "warmup": self.p.warmup / 2,  # no gRPC channels to warm: pools are made first
            "duration": duration or self.p.ceiling_duration,
            **(extra or {}),
        }
        log = self.workdir / f"dbceil-{mode}.log"
        proc = procs.start(
            procs.python("-m", "bench.dbceil", json.dumps(config)), log_path=log, stdout_pipe=True
        )
        watch = Watch([proc.pid], (), self.db.name)
        payload: dict[str, Any] | None = None
        stats: WindowStats | None = None
        deadline = time.monotonic() + config["warmup"] + config["duration"] + self.p.stream_timeout
        try:
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    self.log(f"  dbceil {mode}: unreadable line {line[:80]!r}")
                    continue
                if event["event"] == "measure_start":
                    watch.start()
                elif event["event"] == "measure_end":
                    stats = watch.stop()
                elif event["event"] == "result":
                    payload = event
                    break
            proc.wait(timeout=30)
        finally:
            procs.stop(proc)
        if payload is None or stats is None:
            raise procs.ProcessFailed(f"dbceil {mode} gave no result:\n{procs.tail(log)}")
        pct = payload["percentiles_ms"]
        seconds = payload["seconds"]
        value = (payload["rows"] if unit == "rows/s" else payload["ok"]) / seconds
        per_units = payload["ok"] if unit == "QPS" else payload["rows"] / 1000
        result = Result(
            name=name,
            label=label,
            short=short,
            group="ceiling",
            unit=unit,
            value=value,
            p50_ms=pct.get("50"),
            p99_ms=pct.get("99"),
            calls=payload["ok"],
            errors=payload["errors"],
            first_error=payload.get("first_error"),
            per="call" if unit == "QPS" else "1k rows",
            ceiling=ceiling,
        )
        if pct.get("99.9") is not None:
            result.extra["p999_ms"] = pct["99.9"]
        return self._finish(result, stats, payload["ok"], per_units)

    def stream(
        self, name: str, label: str, kind: str, *, ceiling: str | None, short: str = ""
    ) -> Result:
        server = self.server(kind)
        spec = LoadSpec(
            target=server.target,
            workload="stream_posts",
            params={},
            timeout=self.p.stream_timeout,
            channels=1,
        )
        progress = self.clients.progress[0]
        t0 = self.clients.start([spec])
        watch = Watch(
            [server.proc.pid],
            self.clients.pids[:1],
            self.db.name,
            interval=0.05,
            progress=lambda: int(progress.value),
        )
        _sleep_until(t0)
        watch.start()
        deadline = time.monotonic() + self.p.stream_timeout + 10
        while not self.clients.poll_done(1) and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = watch.stop()
        merged = merge(self.clients.results(1, 30))
        self._check_alive(server)
        raw = merged.raw[0]
        elapsed = raw["elapsed"]
        result = Result(
            name=name,
            label=label,
            short=short,
            group="service" if kind.startswith("service") else "ceiling",
            unit="rows/s",
            value=raw["rows"] / elapsed if elapsed and not merged.errors else None,
            p50_ms=_ms(percentile(merged.latencies, 50)),
            p99_ms=_ms(percentile(merged.latencies, 99)),
            calls=raw["rows"],
            errors=merged.errors,
            first_error=merged.first_error,
            per="1k rows",
            ceiling=ceiling,
        )
        at_10k = next((rss for _, rss, rows in stats.rss_samples if rows >= 10_000), None)
        peak = max((rss for _, rss, _ in stats.rss_samples), default=stats.peak_rss)
        start_rss = stats.rss_samples[0][1] if stats.rss_samples else None
        result.extra.update(
            rows=raw["rows"],
            messages=raw["messages"],
            elapsed_s=round(elapsed, 2),
            first_message_ms=round(_ms(raw["first_message"]) or 0, 1),
            rss_start_mb=_mb(start_rss),
            rss_at_10k_rows_mb=_mb(at_10k),
            rss_peak_mb=_mb(peak),
            rss_growth_mb=_mb(peak - at_10k) if at_10k is not None else None,
        )
        first_ms = _ms(raw["first_message"]) or 0.0
        result.notes.append(
            f"{raw['rows']:,} rows in {raw['messages']:,} messages, {elapsed:.2f} s; first "
            f"message after {first_ms:.0f} ms; server RSS {_mb(start_rss)} MB at start, "
            f"{_mb(at_10k)} MB after 10,000 rows, {_mb(peak)} MB peak "
            f"(growth {result.extra['rss_growth_mb']} MB)"
        )
        return self._finish(result, stats, raw["rows"], raw["rows"] / 1000)

    # -- tokens ------------------------------------------------------------------------------

    def tokens(self) -> dict[str, Any]:
        """Page tokens: 50 positions 1,000 rows apart (for random pages) and the token of
        page 1,000 at page_size 50 (row 49,950), gathered with page_size 1,000 strides
        (tokens are bound to filter and order, not to the page size)."""
        if self._tokens is not None:
            return self._tokens
        import grpc

        from blog.v1 import post_pb2, post_pb2_grpc

        server = self.server("service")
        started = time.monotonic()
        with grpc.insecure_channel(server.target) as channel:
            stub = post_pb2_grpc.PostServiceStub(channel).ListPosts
            token = ""
            strides = [""]
            for _ in range(49):
                token = stub(
                    post_pb2.ListPostsRequest(page_size=1000, page_token=token), timeout=30
                ).next_page_token
                strides.append(token)
            for _ in range(19):
                token = stub(
                    post_pb2.ListPostsRequest(page_size=50, page_token=token), timeout=30
                ).next_page_token
            first = stub(post_pb2.ListPostsRequest(page_size=50), timeout=30).posts[0].id
            deep = (
                stub(post_pb2.ListPostsRequest(page_size=50, page_token=token), timeout=30)
                .posts[0]
                .id
            )
        self._tokens = {
            "strides": strides,
            "page1000": token,
            "first_id": first,
            "deep_first_id": deep,
        }
        self.log(f"  gathered page tokens in {time.monotonic() - started:.1f}s")
        return self._tokens

    # -- the scenarios -------------------------------------------------------------------

    def run(self, name: str) -> None:
        getattr(self, f"s_{name}")()

    def s_asyncpg(self) -> None:
        self.dbceil(
            "asyncpg_pool",
            "Ceiling: asyncpg pool, pk select, default reset",
            "asyncpg_pool",
            ceiling="asyncpg_noreset",
            short="asyncpg pool",
        )
        self.dbceil(
            "asyncpg_noreset",
            "Ceiling: asyncpg pool, pk select, reset disabled",
            "asyncpg_pool_noreset",
            ceiling="asyncpg_direct",
            short="asyncpg pool, no reset",
        )
        self.dbceil(
            "asyncpg_direct",
            "Ceiling: asyncpg direct connections, pk select",
            "asyncpg_direct",
            ceiling=None,
            short="asyncpg direct",
        )

    def s_sqlalchemy(self) -> None:
        self.dbceil(
            "sa_core",
            "Ceiling: SQLAlchemy Core select (AUTOCOMMIT)",
            "sa_core",
            ceiling="asyncpg_noreset",
            short="SQLAlchemy Core",
        )
        self.dbceil(
            "sa_orm",
            "Ceiling: SQLAlchemy ORM session.get (AUTOCOMMIT)",
            "sa_orm",
            ceiling="asyncpg_noreset",
            short="SQLAlchemy ORM",
        )

    def s_echo(self) -> None:
        self.unary(
            "echo",
            "Ceiling: bare grpc.aio unary echo",
            "ceiling",
            "get_user",
            {"users": self.p.users},
            ceiling=None,
            naive=False,
            short="echo",
        )

    def s_naive(self) -> None:
        self.unary(
            "naive",
            "Naive twin: GetUser via session.get",
            "naive",
            "get_user",
            {"users": self.p.users},
            ceiling="echo",
            naive=False,
            short="naive twin",
        )

    def s_session_floor(self) -> None:
        self.unary(
            "session_floor",
            "Ceiling: GetUser with an AsyncSession per call, nothing else",
            "floor",
            "get_user",
            {"users": self.p.users},
            short="session floor",
        )

    def s_get_user(self) -> None:
        self.unary(
            "get_user",
            "GetUser (random ids)",
            "service",
            "get_user",
            {"users": self.p.users},
            short="GetUser 1 worker",
        )

    def s_get_user_observed(self) -> None:
        """What metrics and the access log cost: GetUser on two servers set up alike but
        for them, one with both off and one with METRICS_LISTEN and ACCESS_LOG=true,
        LOG_FORMAT=json, both started together for this scenario and warmed unmeasured,
        then measured in the order OBSERVED_ORDER (ABBA) so drift in the box's
        throughput hits both alike; each figure is the mean of its windows, every
        window's shown in the details, and the ratio is also given pair by pair."""
        kinds = {"get_user_obs_off": "service_off", "get_user_obs_on": "service_observed"}
        for kind in kinds.values():  # two fresh servers, started together
            self.launch(kind)
        params = {"users": self.p.users}
        for name in kinds:
            self.unary(name, "warm-up", kinds[name], "get_user", params, duration=2.0)
        windows: dict[str, list[Result]] = {name: [] for name in kinds}
        for name in OBSERVED_ORDER:
            observed = name == "get_user_obs_on"
            windows[name].append(
                self.unary(
                    name,
                    "GetUser, metrics + JSON access log on (ABBA)"
                    if observed
                    else "GetUser, metrics and access log off (ABBA)",
                    kinds[name],
                    "get_user",
                    params,
                    ceiling="get_user_obs_off" if observed else None,
                    naive=False,
                    short="GetUser, observability on" if observed else "GetUser, observability off",
                )
            )
        for name, measured in windows.items():
            # The mean of the windows: in ABBA order a linear drift of the box's
            # throughput cancels out of the means (not out of a median of two).
            kept = measured[-1]
            values = [r.value for r in measured if r.value]
            cpu = [r.server_cpu_us for r in measured if r.server_cpu_us]
            kept.value = sum(values) / len(values) if values else None
            kept.server_cpu_us = sum(cpu) / len(cpu) if cpu else None
            kept.extra["windows"] = [round(v) for v in values]
            self.results[name] = kept
        off, on = self.results["get_user_obs_off"], self.results["get_user_obs_on"]
        pairs = zip(windows["get_user_obs_on"], windows["get_user_obs_off"], strict=True)
        on.extra["ratio_by_pair"] = [
            round(a.value / b.value, 3) for a, b in pairs if a.value and b.value
        ]
        if off.value and on.value:
            on.extra["cost_vs_off_pct"] = round((1 - on.value / off.value) * 100, 1)
        if off.server_cpu_us and on.server_cpu_us:
            on.extra["server_cpu_cost_us"] = round(on.server_cpu_us - off.server_cpu_us)
        for kind in kinds.values():
            self.stop_server(kind)

    def s_list_posts(self) -> None:
        tokens = self.tokens()["strides"]
        for view, tag in ((1, "BASIC"), (2, "FULL")):
            self.unary(
                f"list_posts_{tag.lower()}",
                f"ListPosts page 50 {tag}",
                "service",
                "list_posts",
                {"tokens": tokens, "page_size": 50, "view": view},
            )

    def s_deep_paging(self) -> None:
        tokens = self.tokens()
        for name, label, token in (
            ("list_page1", "ListPosts page 1 (p50, 1 call in flight)", ""),
            ("list_page1000", "ListPosts page 1000 (p50, 1 call in flight)", tokens["page1000"]),
        ):
            r = self.unary(
                name,
                label,
                "service",
                "list_posts",
                {"tokens": [token], "page_size": 50, "view": 1},
                ceiling="list_page1" if name == "list_page1000" else None,
                naive=False,
                short="page 1",
                concurrency=1,
                clients=1,
                duration=self.p.page_duration,
            )
            r.value, r.unit = r.p50_ms, "ms"
            r.lower_is_better = True
            r.extra["qps"] = round(r.calls / self.p.page_duration, 1)

    def s_stream_ceiling(self) -> None:
        self.dbceil(
            "cursor_raw",
            "Ceiling: raw asyncpg cursor over all posts (no gRPC)",
            "cursor_raw",
            ceiling=None,
            unit="rows/s",
            short="raw cursor",
        )
        self.stream(
            "stream_ceiling",
            "Ceiling: asyncpg cursor → 1k-row batches → gRPC stream",
            "ceiling",
            ceiling="cursor_raw",
            short="stream ceiling",
        )

    def s_stream_posts(self) -> None:
        self.stream(
            "stream_posts", "StreamPosts (all posts, BASIC)", "service", ceiling="stream_ceiling"
        )

    def s_get_user_half_peak(self) -> None:
        peak = self.results.get("get_user")
        if peak is None or not peak.value:
            self.s_get_user()
            peak = self.results["get_user"]
        rate = (peak.value or 0.0) * 0.5
        r = self.unary(
            "get_user_half_peak",
            f"GetUser p99 at half peak ({rate:,.0f} QPS offered, open loop)",
            "service",
            "get_user",
            {"users": self.p.users},
            rate=rate,
            naive=False,
            ceiling=None,
        )
        r.extra["achieved_qps"] = round(r.value or 0)
        r.value, r.unit = r.p99_ms, "ms"
        r.lower_is_better = True

    def s_update_user(self) -> None:
        self.unary(
            "update_user",
            "UpdateUser (display_name mask)",
            "service",
            "update_user",
            {"users": self.p.users},
        )

    def s_create_post(self) -> None:
        self.unary(
            "create_post",
            "CreatePost (2 tags)",
            "service",
            "create_post",
            {"users": self.p.users, "tags": tag_names(self.p.tags)},
        )

    def s_copy(self) -> None:
        self.dbceil(
            "copy",
            "Ceiling: asyncpg COPY of user rows (1,000 a statement, 4 connections)",
            "copy_users",
            ceiling=None,
            unit="rows/s",
            short="COPY",
            extra={"concurrency": 4, "prefix": f"c{int(time.time()) % 100000}"},
        )

    def s_batch_create_users(self) -> None:
        self.unary(
            "batch_create_users",
            "BatchCreateUsers (1,000 a call)",
            "service",
            "batch_create_users",
            {"batch": 1000, "prefix": f"{int(time.time()) % 100000}"},
            ceiling="copy",
            naive=False,
            concurrency=self.p.batch_concurrency,
            unit="rows/s",
            timeout=60.0,
        )

    def s_workers2(self) -> None:
        # The one-worker figure again, right beside the two-worker one: the machine's
        # other load drifts over a run, so the pair is compared with itself.
        self.unary(
            "get_user_1w_pair",
            "GetUser, 1 worker (re-run beside --workers 2)",
            "service",
            "get_user",
            {"users": self.p.users},
            short="GetUser 1 worker, adjacent",
        )
        # Two workers hold two pools: release every other server's connections first.
        for other in ("service", "naive", "ceiling"):
            self.stop_server(other)
        kind, label = "service2", "GetUser, serve --workers 2"
        try:
            self.server(kind)
        except procs.ProcessFailed as error:
            first = str(error).splitlines()
            reason = next((line for line in reversed(first) if "Error" in line), first[0])
            self.problems.append(
                "`python -m service serve --workers 2` does not start: "
                f"`{reason.strip()}`. Measured through `python -m bench.serve_workers` "
                "(the same `service.__main__` code imported as a module) instead."
            )
            self.log(f"  PROBLEM: serve --workers 2 failed ({reason.strip()}); using the shim")
            self.stop_server(kind)
            kind, label = "service2shim", "GetUser, --workers 2 (via bench.serve_workers shim)"
        try:
            r = self.unary(
                "get_user_workers2",
                label,
                kind,
                "get_user",
                {"users": self.p.users},
                ceiling="get_user_1w_pair",
            )
            if kind == "service2shim":
                r.notes.append(
                    "`python -m service serve --workers 2` fails at start-up; see "
                    "Problems. Figure measured through the bench.serve_workers shim."
                )
        finally:
            self.stop_server(kind)

    def profiled_methods(self) -> list[tuple[str, str, dict[str, Any], int]]:
        """(label, workload, params, calls in flight per client) for each method profiled."""
        page = {"tokens": self.tokens()["strides"], "page_size": 50}
        return [
            ("GetUser", "get_user", {"users": self.p.users}, self.p.concurrency),
            ("ListPosts page 50 BASIC", "list_posts", {**page, "view": 1}, self.p.concurrency),
            ("ListPosts page 50 FULL", "list_posts", {**page, "view": 2}, self.p.concurrency),
            ("StreamPosts", "stream_posts", {}, 1),
            ("UpdateUser", "update_user", {"users": self.p.users}, self.p.concurrency),
            (
                "CreatePost",
                "create_post",
                {"users": self.p.users, "tags": tag_names(self.p.tags)},
                self.p.concurrency,
            ),
            (
                "BatchCreateUsers",
                "batch_create_users",
                {"batch": 1000, "prefix": f"p{int(time.time()) % 100000}"},
                self.p.batch_concurrency,
            ),
        ]

    def s_profile(self) -> None:
        """py-spy on the one-worker server under each method's load in turn (a run of its
        own, after the measured ones): where each method's time goes. BENCH_PROFILE_ONLY
        (comma-separated labels' first words, e.g. `GetUser,ListPosts`) narrows it."""
        server = self.server(os.environ.get("BENCH_PROFILE_SERVER", "service"))
        seconds = self.p.profile_seconds
        wanted = {w for w in os.environ.get("BENCH_PROFILE_ONLY", "").split(",") if w}
        rate = 250
        for label, workload, params, concurrency in self.profiled_methods():
            if wanted and label.split()[0] not in wanted:
                continue
            out = self.workdir / f"{workload}{params.get('view', '')}.pyspy.txt"
            spec = LoadSpec(
                target=server.target,
                workload=workload,
                params=params,
                concurrency=concurrency,
                channels=min(self.p.channels, concurrency),
                warmup=self.p.warmup,
                duration=seconds + 1.0,
                timeout={"stream_posts": self.p.stream_timeout, "batch_create_users": 60.0}.get(
                    workload, 10.0
                ),
            )
            specs = [LoadSpec(**{**spec.__dict__, "seed": 100 + i}) for i in range(self.p.clients)]
            t0 = self.clients.start(specs)
            _sleep_until(t0 + spec.warmup)
            spy = profiling.start(server.proc.pid, seconds, out, rate=rate)
            if spy is None:
                self.profiles[label] = profiling.ProfileSummary(
                    0, seconds, rate, error="py-spy not found"
                )
            else:
                try:
                    spy.wait(timeout=seconds + 30)
                finally:
                    procs.stop(spy)
            self.clients.results(self.p.clients, spec.timeout + seconds + 60)
            if spy is None:
                continue
            if out.exists() and out.stat().st_size > 0:
                summary = profiling.summarise(out, seconds, rate, top=40)
                self.profiles[label] = summary
                self.log(
                    f"  profile {label}: {summary.samples} samples; top total: "
                    + ", ".join(f"{f} {c}" for f, c in summary.total[:3])
                )
            else:
                self.profiles[label] = profiling.ProfileSummary(
                    0,
                    seconds,
                    rate,
                    error=f"py-spy wrote nothing: {procs.tail(out.with_suffix('.log'), 5)}",
                )


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


def summary_line(r: Result) -> str:
    value = (
        "—"
        if r.value is None
        else (f"{r.value:.2f} ms" if r.unit == "ms" else f"{r.value:,.0f} {r.unit}")
    )
    parts = [f"{r.label}: {value}"]
    if r.unit != "ms" and r.p50_ms is not None:
        parts.append(f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms")
    if r.server_cpu_us is not None:
        per = "call" if r.per == "call" else r.per
        parts.append(f"server {r.server_cpu_us:,.0f} µs/{per}")
    if r.errors:
        parts.append(f"errors {r.errors}")
    foreign = r.extra.get("foreign_cores_busy")
    if foreign is not None:
        parts.append(f"other processes {foreign:.2f} cores")
    return "; ".join(parts)
