"""Issue 11, item 6: mypy checks pymta with its adapters under their installed names
(``scripts/typecheck.py`` over the layout of ``scripts/layout.py``), with zero errors, and an
error names the checkout's file, so a developer can open it from the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.layout import build_layout
from scripts.typecheck import to_checkout

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "typecheck.py"


def typecheck(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_pymta_and_its_adapters_type_check_clean() -> None:
    result = typecheck()
    assert result.returncode == 0, result.stdout + result.stderr
    # every module of the three folders was checked: the adapters as part of pymta
    modules = sum(len(list((REPO / folder).rglob("*.py")))
                  for folder in ("pymta", "backends", "delivery"))
    assert f"Success: no issues found in {modules} source files" in result.stdout


def test_an_adapter_error_names_the_checkout_file(tmp_path: Path) -> None:
    """The probe is reachable only as ``pymta.delivery._probe`` and imports an adapter by
    that name: mypy resolves both (the error is about the argument, not a missing module)
    and reports the file where it is in the checkout, relative to the working directory."""
    checkout = tmp_path / "checkout"
    (checkout / "delivery").mkdir(parents=True)
    probe = checkout / "delivery" / "_probe.py"
    probe.write_text("from pymta.delivery.lmtp import parse_transport\n\nparse_transport(24)\n")
    layout = build_layout(tmp_path / "layout")
    (layout / "pymta" / "delivery" / "_probe.py").symlink_to(probe)
    result = typecheck("--layout", str(layout), "--cache-dir", str(tmp_path / "cache"),
                       cwd=checkout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ('delivery/_probe.py:3: error: Argument 1 to "parse_transport" has incompatible '
            'type "int"; expected "str"  [arg-type]') in result.stdout.splitlines()
    assert "pymta/delivery/_probe.py" not in result.stdout


def test_report_lines_map_to_the_checkout(tmp_path: Path) -> None:
    layout = build_layout(tmp_path)
    line = 'pymta/backends/table.py:7: error: Name "x" is not defined  [name-defined]'
    assert (to_checkout(line, layout, REPO)
            == 'backends/table.py:7: error: Name "x" is not defined  [name-defined]')
    assert to_checkout("pymta/queue/store.py:1:5: note: x", layout, REPO) == (
        "pymta/queue/store.py:1:5: note: x")
    # outside the working directory: absolute, still the checkout's file
    assert to_checkout(line, layout, tmp_path).startswith(f"{REPO}/backends/table.py:7: ")
    # not a path in the layout: as mypy said it
    for other in ("Found 2 errors in 1 file (checked 81 source files)",
                  "/etc/pyproject.toml: note: unused section(s)"):
        assert to_checkout(other, layout, REPO) == other
