"""Check the import contracts of pyproject.toml (``[tool.importlinter]``) over pymta as it is
installed: ``python scripts/lint_imports.py``; exit status 0 when every contract is kept.

Why not plain ``lint-imports``: the adapters live beside the core in the source tree
(``backends/``, ``delivery/``) and become ``pymta.backends`` / ``pymta.delivery`` only when
installed (``[tool.setuptools.package-dir]``). Import Linter's graph (grimp) walks the
``pymta/`` folder it finds on ``sys.path`` and never sees them: an import of an adapter by
the core would be dropped from the graph, and the contract about it would pass whatever the
code does. So this script builds the installed layout first, in a temporary folder: a
``pymta/`` tree of real folders whose files are symbolic links to the checkout's, with each
mapped folder at its installed place, and runs Import Linter there. Nothing is copied or
installed; the links read the files as they are now.

``--layout DIR`` checks a layout built before (by :func:`build_layout`) instead: the tests
add a deliberate violation to one and see the contract fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pymta"


def mapped_folders(repo: Path = REPO) -> dict[str, Path]:
    """The subpackages that setuptools maps from other folders, by installed name
    (``{"pymta.backends": <repo>/backends, ...}``), read from pyproject.toml."""
    with open(repo / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    mapping = project.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: repo / folder for name, folder in mapping.items() if name}


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a tree of real folders holding a link to each Python file of ``source``
    (so a test can add a file to a copy without touching the checkout)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name == "__pycache__" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            if (entry / "__init__.py").is_file():
                _link_tree(entry, dest / entry.name)
        elif entry.suffix == ".py":
            (dest / entry.name).symlink_to(entry)


def build_layout(dest: Path, repo: Path = REPO) -> Path:
    """Build the installed layout of pymta under ``dest`` (``dest/pymta/...``); ``dest``."""
    _link_tree(repo / PACKAGE, dest / PACKAGE)
    for name, folder in mapped_folders(repo).items():
        parts = name.split(".")
        if parts[0] != PACKAGE:
            raise SystemExit(f"pyproject.toml package-dir maps {name!r} outside {PACKAGE}")
        _link_tree(folder, dest.joinpath(*parts))
    return dest


def lint(layout: Path, config: Path, *, verbose: bool = False) -> int:
    """Run Import Linter with ``config`` over ``layout``; its exit status."""
    from importlinter.cli import lint_imports

    # Import Linter puts the working directory first on sys.path; grimp finds the package
    # through it. The checkout's own pymta/ (in sys.path by `python -m`, or an editable
    # install's finder) must not be found before the layout's.
    cwd = os.getcwd()
    os.chdir(layout)
    sys.path[:] = [str(layout)] + [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        return lint_imports(config_filename=str(config), no_cache=True, no_logo=True,
                            verbose=verbose)
    finally:
        os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", type=Path, help="check this layout instead of building one")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = REPO / "pyproject.toml"
    if args.layout is not None:
        return lint(args.layout.resolve(), config, verbose=args.verbose)
    with tempfile.TemporaryDirectory(prefix="pymta-layout-") as tmp:
        return lint(build_layout(Path(tmp)), config, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
