"""pymta as it is installed, built from the checkout: for tools that find modules by folder.

The adapters live beside the core in the source tree (``backends/``, ``delivery/``) and become
``pymta.backends`` / ``pymta.delivery`` only when installed (``[tool.setuptools.package-dir]``
of pyproject.toml). A tool that walks the ``pymta/`` folder (Import Linter's grimp, mypy)
never sees them there: an import of an adapter is dropped or "not found". So the scripts that
run those tools (``lint_imports.py``, ``typecheck.py``) first build the installed layout in a
temporary folder: a ``pymta/`` tree of real folders whose files are symbolic links to the
checkout's, each mapped folder at its installed place. Nothing is copied or installed; the
links read the files as they are now, and resolving a link gives the checkout's path back.
"""

from __future__ import annotations

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
        elif entry.suffix in (".py", ".pyi"):
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
