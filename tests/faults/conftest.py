"""Fixtures of the fault suite (`make test-faults`): one PostgreSQL cluster it owns,
a database per promise, and the figures written to docs/RELIABILITY.md at the end."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Figures, OwnedCluster, write_reliability

_FIGURES = Figures()


@pytest.fixture(scope="session")
def cluster() -> Iterator[OwnedCluster]:
    owned = OwnedCluster()
    try:
        yield owned
    finally:
        owned.close()


@pytest.fixture
def database(cluster: OwnedCluster) -> str:
    return cluster.database(f"faults_{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES.rows:
        terminalreporter.section("fault suite figures")
        for line in _FIGURES.lines():
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _FIGURES.rows:
        write_reliability(_FIGURES, time.strftime("%Y-%m-%d"))
