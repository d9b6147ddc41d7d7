#!/usr/bin/env python3
"""Import direction (docs/ARCHITECTURE.md, "What each folder may import"): api ->
repositories -> db, with errors and config as leaves. Reads every module under service/
with `ast` (imports inside functions and TYPE_CHECKING blocks count too) and prints each
import that points the wrong way; exits 1 if there is one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "service"

# (modules the rule covers, imported modules it forbids, why). A module is covered when
# its dotted name is one of the prefixes or starts with one followed by a dot; likewise
# for what it imports.
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("service.api",),
        ("sqlalchemy", "service.db", "service.filtering"),
        "servicers take the unit of work from service.repositories and nothing of SQL",
    ),
    (
        ("service.repositories",),
        ("blog", "google.protobuf", "grpc", "service.api", "service.server"),
        "repositories know SQL and domain errors, never protobuf or the servicers",
    ),
    (
        ("service.db",),
        ("blog", "google.protobuf", "service.api", "service.repositories", "service.server"),
        "db is the bottom layer: engines, schema, error translation",
    ),
    (
        ("service.errors", "service.config"),
        ("service",),
        "errors and config are leaves every layer uses",
    ),
    (
        ("service.observability",),
        ("blog", "service.api", "service.repositories", "service.db", "service.server"),
        "observability is set up once and handed to the layers; it knows none of them",
    ),
    (
        (
            "service.tokens",
            "service.filtering",
            "service.auth",
            "service.logs",
            "service.startup",
            "service.memory",
            "service.tasks",
            "service.deadline",
        ),
        ("service.api", "service.repositories", "service.db", "service.server"),
        "helpers below every layer import only the leaves",
    ),
]
# Names that must not be imported into a module from anywhere (e.g. `from x import Y`).
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {"service.api": ("AsyncSession",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(path: Path, module: str) -> list[tuple[int, list[str], list[str]]]:
    """Per import statement: its line, the modules it may import (for `from a import b`,
    `a` and then `a.b`, which may be a module) and the names it imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, list[str], list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, [alias.name], []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            found.append((node.lineno, [base, *(f"{base}.{name}" for name in names)], names))
    return found


def main() -> int:
    faults: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        where = path.relative_to(ROOT)
        for line, candidates, names in imports_of(path, module):
            for covered, forbidden, why in RULES:
                if not within(module, covered):
                    continue
                wrong = next((c for c in candidates if within(c, forbidden)), None)
                if wrong is not None:
                    faults.append(f"{where}:{line}: {module} imports {wrong}: {why}")
            for prefix, banned in FORBIDDEN_NAMES.items():
                if within(module, (prefix,)):
                    faults.extend(
                        f"{where}:{line}: {module} imports {name}: {prefix} never sees it"
                        for name in names
                        if name in banned
                    )
    for fault in faults:
        print(fault)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
