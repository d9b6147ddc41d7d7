"""The command line: `python -m service serve` and `python -m service migrate`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from service import logs
from service.config import Settings

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="blog.v1 gRPC service. Configuration comes from the environment "
        "(see README.md); flags override it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC until SIGTERM or SIGINT")
    serve.add_argument("--listen", help="address to listen on (GRPC_LISTEN)")
    serve.add_argument("--database-url", help="SQLAlchemy URL (DATABASE_URL)")
    serve.add_argument(
        "--migrate", action="store_true", help="migrate the schema first instead of refusing"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port through SO_REUSEPORT (default 1)",
    )
    migrate = commands.add_parser("migrate", help="bring the schema to the newest revision")
    migrate.add_argument("--database-url", help="SQLAlchemy URL (DATABASE_URL)")
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


def _migrate(settings: Settings) -> None:
    from service.db.engine import create_engine
    from service.db.migrations import schema_status, upgrade

    async def run() -> None:
        engine = create_engine(settings)
        try:
            await upgrade(engine)
            status = await schema_status(engine)
            log.info("schema at %s", ", ".join(status.database))
        finally:
            await engine.dispose()

    _run(run())


def _serve(settings: Settings, *, migrate: bool, reuse_port: bool) -> None:
    from service.server import ListenError, SchemaBehindError, serve

    try:
        _run(serve(settings, migrate=migrate, reuse_port=reuse_port))
    except SchemaBehindError as error:
        log.error("%s", error)
        sys.exit(2)
    except ListenError as error:
        log.error("%s", error)
        sys.exit(1)


def _worker(overrides: dict[str, Any], index: int) -> None:
    """A child of `serve --workers N`: a fresh interpreter with its own server and pool.

    It reads its settings as the parent did (the environment it inherits, plus the
    parent's flags), so secrets never pass through a serialised Settings object
    (pydantic writes SecretStr as asterisks)."""
    settings = Settings(**overrides)
    logs.configure(settings.log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns ^C into SIGTERM
    _serve(settings, migrate=False, reuse_port=True)


def _serve_workers(
    settings: Settings, overrides: dict[str, Any], workers: int, *, migrate: bool
) -> None:
    """Start N spawned children on one SO_REUSEPORT port; forward SIGTERM/SIGINT; wait."""
    if migrate:
        _migrate(settings)
    context = multiprocessing.get_context("spawn")  # never fork a process with gRPC state
    # By its importable name: under `python -m service` this module runs as __main__,
    # which a spawned child does not re-import (multiprocessing skips `*.__main__`),
    # so a target pickled as `__main__._worker` cannot be found there.
    worker = importlib.import_module("service.__main__")._worker
    children = [
        context.Process(target=worker, args=(overrides, i), name=f"worker-{i}", daemon=False)
        for i in range(workers)
    ]
    for child in children:
        child.start()
    log.info("started %d workers: %s", workers, [c.pid for c in children])

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    exit_code = 0
    running = list(children)
    while running:
        # Whichever child ends first, not the first in the list.
        ended = multiprocessing.connection.wait([c.sentinel for c in running])
        for child in [c for c in running if c.sentinel in ended]:
            child.join()
            running.remove(child)
            if child.exitcode:
                log.error("%s exited with %s", child.name, child.exitcode)
                exit_code = 1
                forward(signal.SIGTERM, None)  # one worker failed: take the others down too
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    overrides = _overrides(args)
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(f"invalid configuration:\n{error}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        _migrate(settings)
    elif args.workers > 1:
        _serve_workers(settings, overrides, args.workers, migrate=args.migrate)
    elif args.workers == 1:
        _serve(settings, migrate=args.migrate, reuse_port=False)
    else:
        print("--workers must be at least 1", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
