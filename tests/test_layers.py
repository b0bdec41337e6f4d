"""The layers of ARCHITECTURE.md, beside the import contracts `make lint` checks (setup.cfg,
[importlinter]): what the contracts rest on, and the rules an import graph cannot see."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "app").rglob("*.py")), *sorted((ROOT / "workers").rglob("*.py"))]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def test_the_import_graph_the_contracts_check_holds_imports_made_inside_functions():
    graph = grimp.build_graph("app", "workers", include_external_packages=True, cache_dir=None)
    # Both are imports inside a function body, and nowhere else in their module.
    assert graph.direct_import_exists(importer="app", imported="app.api")
    assert graph.direct_import_exists(
        importer="workers.runtimes", imported="workers.runtimes.command"
    )


def test_importing_the_runtimes_loads_no_database_driver_and_no_flask():
    code = (
        "import sys\n"
        "import workers.runtimes.command, workers.runtimes.http\n"
        "import workers.runtimes.python, workers.runtimes.script\n"
        "print(sorted(m for m in ('sqlalchemy', 'psycopg', 'flask') if m in sys.modules))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


# Statements that change rows of the execution tables, wherever they are written.
_WRITES = re.compile(
    r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(executions|execution_attempts|execution_logs)\b",
    re.IGNORECASE,
)


def test_only_the_store_and_the_sweepers_leases_write_executions():
    allowed = {
        "app/executions/store.py",
        "app/executions/entries.py",
        "app/executions/leases.py",
        "app/executions/gates.py",
        # A durable execution's wait and wake (the status `waiting`).
        "app/executions/waiting.py",
    }
    writers = {
        str(path.relative_to(ROOT))
        for path in SOURCES
        if _WRITES.search(path.read_text(encoding="utf-8"))
    }
    assert writers <= allowed, f"SQL writing executions outside the store: {writers - allowed}"
    assert writers == allowed, "the check itself finds the writes it is about"


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_no_module_or_function_outgrows_one_role():
    long_modules = {
        str(path.relative_to(ROOT)): lines
        for path in SOURCES
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    long_functions = {
        name: lines
        for path in SOURCES
        for name, lines in _function_lengths(path)
        if lines > MAX_FUNCTION_LINES
    }
    assert not long_modules, f"split these by role: {long_modules}"
    assert not long_functions, f"split these by role: {long_functions}"
