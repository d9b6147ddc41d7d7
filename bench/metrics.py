"""What a scenario costs: CPU of process trees, peak RSS, PostgreSQL backends, percentiles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, round(q / 100 * len(values) + 0.5) - 1))
    return values[rank]


def _processes(roots: Iterable[int]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


_POSTMASTER: int | None = None


def postmaster_pid() -> int | None:
    """The PostgreSQL postmaster: a `postgres` process whose parent is not one."""
    global _POSTMASTER
    if _POSTMASTER is not None and psutil.pid_exists(_POSTMASTER):
        return _POSTMASTER
    for proc in psutil.process_iter(["name", "ppid"]):
        if proc.info["name"] != "postgres":
            continue
        try:
            if psutil.Process(proc.info["ppid"]).name() != "postgres":
                _POSTMASTER = int(proc.pid)
                return _POSTMASTER
        except psutil.NoSuchProcess:
            continue
    return None


def postgres_backends(db_name: str) -> list[psutil.Process]:
    """Backends connected to one database (their title is `postgres: [cluster: ]user db
    host state`), found cheaply through the postmaster's children list."""
    needle = f" {db_name} "
    master = postmaster_pid()
    pids: list[int] = []
    if master is not None:
        try:
            with open(f"/proc/{master}/task/{master}/children") as handle:
                pids = [int(p) for p in handle.read().split()]
        except OSError:
            pids = [c.pid for c in psutil.Process(master).children()]
    backends = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in title:
            try:
                backends.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return backends


Snapshot = dict[tuple[int, float], float]  # (pid, create_time) -> cpu seconds


def _cpu(processes: Iterable[psutil.Process]) -> Snapshot:
    result: Snapshot = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
            result[(proc.pid, proc.create_time())] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return result


def _delta(before: Snapshot, after: Snapshot) -> float:
    return sum(value - before.get(key, 0.0) for key, value in after.items())


def _box() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    steal = getattr(t, "steal", 0.0)
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - idle - steal, steal


def _rss(processes: Iterable[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


@dataclass
class WindowStats:
    seconds: float
    server_cpu: float  # CPU seconds of the server process tree(s)
    client_cpu: float
    db_cpu: float  # backends of the bench database
    peak_rss: int  # bytes, server tree
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, progress)
    per_process_cpu: dict[int, float] = field(default_factory=dict)  # server tree, by pid
    loadavg: float = 0.0
    box_busy: float = 0.0  # CPU seconds the whole machine was busy (all processes)
    steal: float = 0.0  # CPU seconds stolen by the hypervisor

    @property
    def foreign_cores(self) -> float:
        """Cores busy with processes that are not ours (other users, other tests)."""
        if self.seconds <= 0:
            return 0.0
        ours = self.server_cpu + self.client_cpu + self.db_cpu
        return max(0.0, self.box_busy - ours) / self.seconds


class Watch:
    """CPU deltas of the server tree, the clients and the database's backends over a
    window, and the server tree's RSS sampled every `interval` seconds meanwhile.

    `progress` (optional) is read at every RSS sample, e.g. rows received so far.
    """

    def __init__(
        self,
        server_pids: Sequence[int],
        client_pids: Sequence[int] = (),
        db_name: str | None = None,
        *,
        interval: float = 0.1,
        progress: Callable[[], int] | None = None,
    ) -> None:
        self._server_pids = list(server_pids)
        self._client_pids = list(client_pids)
        self._db_name = db_name
        self._interval = interval
        self._progress = progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[tuple[float, int, int]] = []
        self._peak = 0
        self._started = 0.0

    def _server(self) -> list[psutil.Process]:
        return _processes(self._server_pids)

    def _db(self) -> list[psutil.Process]:
        return postgres_backends(self._db_name) if self._db_name else []

    def start(self) -> None:
        self._server_before = _cpu(self._server())
        self._client_before = _cpu(_processes(self._client_pids))
        self._db_before = _cpu(self._db())
        self._db_seen: Snapshot = dict(self._db_before)
        self._load_before = psutil.getloadavg()[0]
        self._box_before = _box()
        self._started = time.monotonic()
        self._stop.clear()
        self._samples = []
        self._peak = _rss(self._server())
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        processes = self._server()
        refreshed = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed > 1.0:
                processes, refreshed = self._server(), now
            rss = _rss(processes)
            if self._db_name:
                # Backends that exit inside the window (pool churn) keep their last value.
                self._db_seen.update(_cpu(self._db()))
            progress = self._progress() if self._progress else 0
            self._samples.append((now - self._started, rss, progress))
            self._peak = max(self._peak, rss)
            self._stop.wait(self._interval)

    def stop(self) -> WindowStats:
        seconds = time.monotonic() - self._started
        box_after = _box()
        server_after = _cpu(self._server())
        client_after = _cpu(_processes(self._client_pids))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._db_seen.update(_cpu(self._db()))
        db_after = self._db_seen
        per_process = {
            key[0]: value - self._server_before.get(key, 0.0) for key, value in server_after.items()
        }
        return WindowStats(
            seconds=seconds,
            server_cpu=_delta(self._server_before, server_after),
            client_cpu=_delta(self._client_before, client_after),
            db_cpu=_delta(self._db_before, db_after),
            peak_rss=max(self._peak, _rss(self._server())),
            rss_samples=list(self._samples),
            per_process_cpu=per_process,
            loadavg=self._load_before,
            box_busy=box_after[0] - self._box_before[0],
            steal=box_after[1] - self._box_before[1],
        )
