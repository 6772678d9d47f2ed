"""Type-check pymta, pymta.backends and pymta.delivery with mypy (``[tool.mypy]`` of
pyproject.toml) under their installed names: ``python scripts/typecheck.py``; mypy's exit
status (0: no errors).

Why not plain ``mypy pymta``: in the checkout the adapters are the folders ``backends/`` and
``delivery/``, so every ``import pymta.backends...`` of the wiring is "not found" and the
adapters themselves are never checked as the package they are. This script runs mypy over
the installed layout that ``scripts/layout.py`` builds in a temporary folder (links to the
checkout's files) and writes each path mypy reports back as the checkout's file
(``pymta/backends/table.py:12`` becomes ``backends/table.py:12``), relative to the working
directory, so an editor or terminal opens the file that is really there.

The cache is the checkout's ``.mypy_cache`` (mypy keys it by module, so a new temporary
folder each run still finds it); a second run takes well under a second. Arguments after
the options go to mypy as they are (``--strict``, ``--no-incremental`` ...).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__:     # imported as scripts.typecheck (the tests)
    from scripts.layout import PACKAGE, REPO, build_layout
else:               # run as a file: its own folder is first on sys.path
    from layout import PACKAGE, REPO, build_layout

# "pymta/x.py:12: error: ...", "pymta/x.py:12:5: note: ...", "pymta/x.py: note: ..."
_LOCATION = re.compile(r"^(?P<path>[^\s:]+\.pyi?)(?=:)")


def to_checkout(line: str, layout: Path, cwd: Path) -> str:
    """``line`` of mypy's output with a path inside ``layout`` replaced by the checkout's
    file it links to, relative to ``cwd`` when it is below it (else absolute)."""
    found = _LOCATION.match(line)
    if found is None:
        return line
    path = Path(found["path"])
    linked = path if path.is_absolute() else layout / path
    if not linked.is_symlink():
        return line
    target = linked.resolve()
    shown = target.relative_to(cwd) if target.is_relative_to(cwd) else target
    return f"{shown}{line[found.end():]}"


def typecheck(layout: Path, mypy_args: list[str], *, cwd: Path | None = None) -> int:
    """Run mypy over the ``pymta`` package of ``layout``, print its report with the
    checkout's paths; mypy's exit status."""
    cwd = Path.cwd() if cwd is None else cwd
    command = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
               "--cache-dir", str(REPO / ".mypy_cache"), *mypy_args, "-p", PACKAGE]
    # mypy finds the package in its working directory, before the checkout's (the editable
    # install's finder is invisible to it): the layout's pymta, with the adapters in it.
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    result = subprocess.run(command, cwd=layout, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        print(to_checkout(line, layout, cwd))
    sys.stderr.write(result.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--layout", type=Path, help="check this layout instead of building one")
    args, mypy_args = parser.parse_known_args(argv)
    if args.layout is not None:
        return typecheck(args.layout.resolve(), mypy_args)
    with tempfile.TemporaryDirectory(prefix="pymta-typecheck-") as tmp:
        return typecheck(build_layout(Path(tmp)), mypy_args)


if __name__ == "__main__":
    sys.exit(main())
