"""The command line: `python -m service serve` and `python -m service migrate`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from service import logs, startup
from service.config import Settings
from service.observability.metrics import (
    MULTIPROC_ENV,
    MetricsServer,
    mark_process_dead,
    multiprocess_registry,
)

log = logging.getLogger("service")


def _parser(prog: str) -> argparse.ArgumentParser:
    fields = Settings.model_fields
    listen_default = fields["grpc_listen"].default
    url_default = fields["database_url"].default
    parser = argparse.ArgumentParser(
        prog=prog,
        description="blog.v1 gRPC service. Configuration comes from the environment "
        "(every variable and its default: README.md, Configuration); flags override it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve gRPC until SIGTERM or SIGINT (SIGHUP re-reads tokens and certificates)",
        description="Serve gRPC until SIGTERM or SIGINT; SIGHUP re-reads AUTH_TOKENS_FILE "
        "and the TLS certificate and key.",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to listen on (default: $GRPC_LISTEN, else {listen_default})",
    )
    serve.add_argument(
        "--database-url",
        metavar="URL",
        help=f"SQLAlchemy URL (default: $DATABASE_URL, else {url_default})",
    )
    serve.add_argument(
        "--migrate",
        action="store_true",
        help="migrate the schema first instead of refusing one that is behind (default: off)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes sharing the port through SO_REUSEPORT (default: 1)",
    )
    migrate = commands.add_parser(
        "migrate",
        help="bring the schema to the newest revision",
        description="Bring the schema to the newest revision; a schema newer than this "
        "release is left as it is (exit 0).",
    )
    migrate.add_argument(
        "--database-url",
        metavar="URL",
        help=f"SQLAlchemy URL (default: $DATABASE_URL, else {url_default})",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What the flags set; the environment gives the rest."""
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["grpc_listen"] = args.listen
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    return overrides


def _run(coroutine: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


def _explained(settings: Settings, run: Callable[[], None]) -> None:
    """Run a command; a start-up failure a person can fix is one line and exit 1 (2 for
    a schema that is behind), never a traceback. Anything else is a bug: it keeps its
    traceback."""
    from service.server import ListenError, SchemaBehindError

    try:
        startup.preflight(settings)
        run()
    except SchemaBehindError as error:
        log.error("%s", error)
        sys.exit(2)
    except ListenError as error:
        log.error("%s", error)
        sys.exit(1)
    except Exception as error:
        message = startup.explain(error, settings)
        if message is None:
            raise
        log.error("%s", message)
        sys.exit(1)


def _migrate(settings: Settings) -> None:
    from service.db.engine import create_engine
    from service.db.migrations import SchemaState, describe_revisions, schema_status, upgrade

    async def run() -> None:
        engine = create_engine(settings)
        try:
            if await upgrade(engine, lock_timeout=settings.migration_lock_timeout) is (
                SchemaState.CURRENT
            ):
                status = await schema_status(engine)
                log.info("schema at %s", describe_revisions(status.database))
        finally:
            await engine.dispose()

    _explained(settings, lambda: _run(run()))


def _serve(settings: Settings, *, migrate: bool, reuse_port: bool) -> None:
    from service.server import serve

    # Until the server installs its SIGHUP handler, a reload request must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _explained(settings, lambda: _run(serve(settings, migrate=migrate, reuse_port=reuse_port)))


def _worker(overrides: dict[str, Any], index: int, command: str) -> None:
    """A child of `serve --workers N`: a fresh interpreter with its own server and pool.

    It reads its settings as the parent did (the environment it inherits, plus the
    parent's flags), so secrets never pass through a serialised Settings object
    (pydantic writes SecretStr as asterisks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns ^C into SIGTERM
    startup.set_command(command)
    settings = Settings(**overrides)
    logs.configure(settings.log_level, settings.log_format, access_log=settings.access_log)
    _serve(settings, migrate=False, reuse_port=True)


def _serve_workers(
    settings: Settings, overrides: dict[str, Any], workers: int, *, migrate: bool
) -> None:
    """Start N spawned children on one SO_REUSEPORT port; forward SIGTERM/SIGINT; wait.

    With METRICS_LISTEN, the workers write their metrics to a directory this process
    makes (prometheus-client's multi-process mode, through PROMETHEUS_MULTIPROC_DIR,
    which they inherit), and this process serves /metrics from it, so one scrape sees
    every worker; the directory is removed at exit."""
    if migrate:
        _migrate(settings)
    metrics_dir = None
    if settings.metrics_listen is not None:
        metrics_dir = tempfile.mkdtemp(prefix="blog-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        _run_workers(settings, overrides, workers, metrics_dir)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(
    settings: Settings, overrides: dict[str, Any], workers: int, metrics_dir: str | None
) -> None:
    context = multiprocessing.get_context("spawn")  # never fork a process with gRPC state
    # By its importable name: under `python -m service` this module runs as __main__,
    # which a spawned child does not re-import (multiprocessing skips `*.__main__`),
    # so a target pickled as `__main__._worker` cannot be found there.
    worker = importlib.import_module("service.__main__")._worker
    children = [
        context.Process(
            target=worker,
            args=(overrides, i, startup.command()),
            name=f"worker-{i}",
            daemon=False,
        )
        for i in range(workers)
    ]
    started: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    def send(child: multiprocessing.process.BaseProcess, signum: int) -> None:
        if child.pid is not None and child.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def stop(_signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in started:
            send(child, signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        for child in started:
            send(child, signal.SIGHUP)

    # Before any child exists, so a signal during start-up is never lost or fatal.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for child in children:
        child.start()
        started.append(child)
        if stopping:  # the signal came while this child was being started
            send(child, signal.SIGTERM)
    log.info("started %d workers: %s", workers, ", ".join(str(c.pid) for c in children))

    running = list(children)
    metrics_server = None
    if metrics_dir is not None and settings.metrics_listen is not None:

        def alive() -> list[tuple[str, int]]:
            return [(c.name, c.pid) for c in running if c.pid is not None]

        try:
            metrics_server = MetricsServer(
                settings.metrics_listen, multiprocess_registry(metrics_dir, alive)
            )
        except OSError as error:
            log.error(
                "could not serve metrics on METRICS_LISTEN=%s: %s", settings.metrics_listen, error
            )
            stop()
            sys.exit(1)
        log.info("metrics of all workers on http://%s/metrics", settings.metrics_listen)

    exit_code = 0
    while running:
        # Whichever child ends first, not the first in the list.
        ended = multiprocessing.connection.wait([c.sentinel for c in running])
        for child in [c for c in running if c.sentinel in ended]:
            child.join()
            running.remove(child)
            if metrics_dir is not None and child.pid is not None:
                mark_process_dead(child.pid, metrics_dir)  # its live gauges go
            if stopping and child.exitcode == -signal.SIGTERM:
                # The SIGTERM this process forwarded reached the child before its handler
                # was installed (it was still starting): it stopped as asked.
                log.info("%s stopped by SIGTERM while starting", child.name)
            elif child.exitcode:
                log.error("%s exited with %s", child.name, child.exitcode)
                exit_code = 1
                stop()  # one worker failed: take the others down too
    if metrics_server is not None:
        metrics_server.close()
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    prog = startup.set_command(sys.argv[0] if sys.argv else "")
    parser = _parser(prog)
    args = parser.parse_args(argv)
    overrides = _overrides(args)
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(
            f"{prog}: invalid configuration: {startup.describe_settings_error(error)} "
            "(fix the environment variable, or the flag that sets it)",
            file=sys.stderr,
        )
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format, access_log=settings.access_log)
    # Multi-process metrics are the business of `serve --workers N` alone: a variable
    # inherited from elsewhere would make a single server write files nobody serves.
    os.environ.pop(MULTIPROC_ENV, None)
    if args.command == "migrate":
        _migrate(settings)
    elif args.workers > 1:
        _serve_workers(settings, overrides, args.workers, migrate=args.migrate)
    elif args.workers == 1:
        _serve(settings, migrate=args.migrate, reuse_port=False)
    else:
        parser.error("--workers must be at least 1")


if __name__ == "__main__":
    main()
