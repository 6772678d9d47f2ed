"""Issue 11, item 4: the layout shows the flow, and the rules that keep it so are checked.

``pymta/smtp/`` is the sans-I/O protocol engine: no sockets, no event loop, nothing of pymta
but itself and the values of ``pymta.types`` (what it imports today: dataclasses, re,
unicodedata, base64, binascii, and os/time for a Message-ID's randomness and clock; none of
them waits for I/O). The import contracts of pyproject.toml hold, checked by
``scripts/lint_imports.py`` over the installed layout, and each one breaks on a violation,
including an adapter import that only that layout can see (``pymta.delivery`` is the
``delivery/`` folder until installed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.lint_imports import build_layout

REPO = Path(__file__).resolve().parents[2]
LINT = REPO / "scripts" / "lint_imports.py"

# What waits for (or does) I/O, or runs concurrently: none of it belongs in the engine.
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "selectors", "select", "threading",
                        "subprocess", "multiprocessing", "concurrent"})
ENGINE_MAY_IMPORT = ("pymta.smtp", "pymta.types")


def impure_imports(source: str) -> list[str]:
    """The imports in a module of ``pymta/smtp/`` that a sans-I/O engine may not have."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue                        # ``from . import x``: inside pymta.smtp
            if node.level > 1:
                found.append("." * node.level + (node.module or ""))
                continue
            module = node.module or ""
            names = ([f"{module}.{a.name}" for a in node.names] if module == "pymta"
                     else [module])
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in IO_MODULES or (top == "pymta" and not any(
                    name == ok or name.startswith(ok + ".") for ok in ENGINE_MAY_IMPORT)):
                found.append(name)
    return found


def test_the_smtp_package_is_sans_io() -> None:
    modules = sorted((REPO / "pymta" / "smtp").glob("*.py"))
    assert {p.name for p in modules} >= {"engine.py", "events.py", "params.py"}
    offenders = {p.name: impure_imports(p.read_text()) for p in modules}
    assert {name: found for name, found in offenders.items() if found} == {}


@pytest.mark.parametrize(("source", "expected"), [
    ("import asyncio", ["asyncio"]),
    ("import os, socket", ["socket"]),
    ("from ssl import SSLContext", ["ssl"]),
    ("from concurrent.futures import ThreadPoolExecutor", ["concurrent.futures"]),
    ("from pymta import queue, types", ["pymta.queue"]),
    ("from pymta.receiving.session import Session", ["pymta.receiving.session"]),
    ("from .. import wiring", [".."]),
    ("from pymta.types import Reply\nfrom pymta.smtp import events\nfrom . import params", []),
])
def test_the_sans_io_check_finds_what_it_must(source: str, expected: list[str]) -> None:
    assert impure_imports(source) == expected


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LINT), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_the_import_contracts_hold() -> None:
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("path", "line", "contracts"), [
    # plain lint-imports in the checkout would not see either import: no pymta/delivery there
    ("pymta/_probe.py", "import pymta.delivery.relay", ["The core names no adapter"]),
    ("pymta/queue/_probe.py", "from pymta.backends.table import TableLookup",
     ["The core names no adapter"]),
    ("pymta/smtp/_probe.py", "from pymta.receiving import session",
     ["pymta.smtp is the sans-I/O engine", "No import cycles"]),   # receiving uses smtp
    ("pymta/types.py", "from pymta import log", ["pymta.types holds values only"]),
    # the cycle of before: app.serve imported workers, whose workers imported app
    ("pymta/app.py", "from pymta import workers",
     ["The CLI runs the daemon", "No import cycles"]),
    ("pymta/receiving/headerscan.py", "from pymta.receiving import session",
     ["No import cycles"]),
])
def test_a_violation_breaks_its_contract(tmp_path: Path, path: str, line: str,
                                         contracts: list[str]) -> None:
    """The violation goes into a copy of the file in a layout of links: the checkout is
    untouched."""
    layout = build_layout(tmp_path)
    target = layout / path
    text = target.read_text() if target.exists() else ""
    target.unlink(missing_ok=True)      # a link to the checkout's file: replaced by a copy
    target.write_text(f"{text}\n{line}  # noqa\n")
    result = lint("--layout", str(layout))
    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[-1]
    for name in contracts:
        assert name in broken, result.stdout
    assert f"{len(contracts)} broken" in result.stdout
