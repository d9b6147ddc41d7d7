"""Acknowledged writes survive database cuts and a PostgreSQL restart (fast shutdown)."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
from harness import ROOT, Figures, OwnedCluster, ServerProcess, fetch, ready

from support.postgres import with_host_port
from support.tcp_proxy import TcpProxy

CLIENTS = 3
LOAD_SECONDS = 24.0
READINESS_BOUND = 5.0


async def watch_readiness(
    target: str, samples: list[tuple[float, bool]], stop: asyncio.Event
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        while not stop.is_set():
            samples.append((time.monotonic(), await ready(channel)))
            await asyncio.sleep(0.1)


def transitions(
    samples: list[tuple[float, bool]], fault: float, healed: float
) -> tuple[float, float]:
    """Seconds from the fault to the first NOT_SERVING, and from the heal to SERVING."""
    down = next((t for t, ok in samples if t >= fault and not ok), None)
    up = next((t for t, ok in samples if t >= healed and ok), None)
    return (
        (down - fault) if down is not None else float("inf"),
        (up - healed) if up is not None else float("inf"),
    )


async def test_acknowledged_writes_survive_cuts_and_restarts(
    cluster: OwnedCluster, database: str, log_dir: Path, figures: Figures
) -> None:
    async with TcpProxy("127.0.0.1", cluster.port) as proxy:
        url = with_host_port(database, "127.0.0.1", proxy.port)
        server = ServerProcess(
            url,
            {
                "DB_POOL_TIMEOUT": "2",
                "HEALTH_CHECK_INTERVAL": "0.5",
                "HEALTH_CHECK_TIMEOUT": "1",
                "LOG_LEVEL": "ERROR",
            },
        ).start(log_dir)
        try:
            await server.wait_ready()
            outputs = [log_dir / f"load-{i}.jsonl" for i in range(CLIENTS)]
            loads = [
                subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, str(Path(__file__).with_name("write_load.py")),
                     server.target, str(LOAD_SECONDS), str(i)],
                    stdout=open(outputs[i], "w"),  # noqa: SIM115, ASYNC230
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
                for i in range(CLIENTS)
            ]  # fmt: skip
            samples: list[tuple[float, bool]] = []
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_readiness(server.target, samples, stop))
            faults: list[tuple[str, float, float]] = []
            await asyncio.sleep(3)
            for kind in ("cut", "restart", "cut"):
                began = time.monotonic()
                if kind == "cut":
                    await proxy.cut()
                    await asyncio.sleep(3)
                    await proxy.restore()
                else:
                    await asyncio.to_thread(cluster.stop)
                    await asyncio.sleep(2)
                    await asyncio.to_thread(cluster.start)
                faults.append((kind, began, time.monotonic()))
                await asyncio.sleep(5)
            for load in loads:
                await asyncio.to_thread(load.wait, LOAD_SECONDS + 120)
            stop.set()
            await watcher
        finally:
            server.kill()
    records = [
        json.loads(line)
        for out in outputs
        for line in out.read_text().splitlines()
        if line.startswith("{")
    ]
    problems = [
        line for out in outputs for line in out.read_text().splitlines() if not line.startswith("{")
    ]
    assert not problems, problems[:20]
    summaries = [r for r in records if r["op"] == "summary"]
    assert len(summaries) == CLIENTS
    codes: collections.Counter[str] = collections.Counter()
    retries: collections.Counter[str] = collections.Counter()
    for s in summaries:
        codes.update(s["codes"])
        retries.update(s["retries"])

    # Every acknowledged write is in the database (read straight from PostgreSQL).
    users = {r["id"]: r["username"] for r in records if r["op"] == "CreateUser"}
    for r in records:
        if r["op"] == "BatchCreateUsers":
            users.update(zip(r["ids"], r["usernames"], strict=True))
    rows = await fetch(
        database, "SELECT id, username, display_name FROM users WHERE id = ANY($1)", list(users)
    )
    stored = {row["id"]: row for row in rows}
    lost_users = [
        i for i, name in users.items() if i not in stored or stored[i]["username"] != name
    ]
    post_acks = {r["id"]: r["title"] for r in records if r["op"] == "CreatePost"}
    rows = await fetch(database, "SELECT id, title FROM posts WHERE id = ANY($1)", list(post_acks))
    lost_posts = [i for i in post_acks if i not in {row["id"] for row in rows}]
    last_update: dict[int, tuple[int, str]] = {}
    for r in records:
        if r["op"] == "UpdateUser" and r["seq"] >= last_update.get(r["id"], (-1, ""))[0]:
            last_update[r["id"]] = (r["seq"], r["value"])
    lost_updates = [
        i for i, (_, v) in last_update.items() if stored.get(i) and stored[i]["display_name"] != v
    ]
    # Duplicates: a post title (unique per request) stored twice, a retried create that
    # answered ALREADY_EXISTS, or an ambiguous batch whose users are not all there.
    dup_rows = await fetch(
        database,
        "SELECT title, count(*) AS n FROM posts WHERE title LIKE 't w%' "
        "GROUP BY title HAVING count(*) > 1",
    )
    ambiguous = [r for r in records if r["op"] == "BatchAmbiguous"]
    partial = 0
    for r in ambiguous:
        found = await fetch(
            database, "SELECT count(*) AS n FROM users WHERE username = ANY($1)", r["usernames"]
        )
        if found[0]["n"] not in (0, 5):
            partial += 1
    duplicates = len(dup_rows) + retries["ALREADY_EXISTS after retry"]
    acked = len(users) + len(post_acks) + sum(1 for r in records if r["op"] == "UpdateUser")
    lost = len(lost_users) + len(lost_posts) + len(lost_updates)
    unexpected = {
        c: n
        for c, n in codes.items()
        if c not in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
    }
    readiness = [(kind, *transitions(samples, began, healed)) for kind, began, healed in faults]
    worst = max(max(d, u) for _, d, u in readiness)
    seen = dict(sorted(codes.items()))
    figure = (
        f"{acked} acknowledged rows/updates ({codes['OK']} OK calls) over {len(faults)} "
        f"faults (cut 3 s, PostgreSQL restart, cut 3 s): lost {lost}, duplicates after "
        f"retries {duplicates}, partial batches {partial}; codes {seen}; readiness down/up "
        + ", ".join(f"{k} {d:.1f}/{u:.1f}s" for k, d, u in readiness)
    )
    ok = not lost and not duplicates and not partial and not unexpected and worst <= READINESS_BOUND
    figures.record(
        "writes",
        f"{CLIENTS} client processes (tests/faults/write_load.py) writing for "
        f"{LOAD_SECONDS:g} s through a TCP proxy the suite cuts, while it also restarts its "
        "own PostgreSQL (pg_ctl -m fast); failed calls retried with their request_id; "
        "acknowledged rows read back from PostgreSQL; readiness polled every 100 ms",
        figure,
        passed=ok,
    )
    assert not lost, (lost_users[:5], lost_posts[:5], lost_updates[:5])
    assert not duplicates, (dup_rows[:5], retries)
    assert not partial
    assert not unexpected, unexpected
    assert worst <= READINESS_BOUND, readiness
