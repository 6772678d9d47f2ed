"""Check the import contracts of pyproject.toml (``[tool.importlinter]``) over pymta as it is
installed: ``python scripts/lint_imports.py``; exit status 0 when every contract is kept.

Why not plain ``lint-imports``: the adapters live beside the core in the source tree
(``backends/``, ``delivery/``) and become ``pymta.backends`` / ``pymta.delivery`` only when
installed (``[tool.setuptools.package-dir]``). Import Linter's graph (grimp) walks the
``pymta/`` folder it finds on ``sys.path`` and never sees them: an import of an adapter by
the core would be dropped from the graph, and the contract about it would pass whatever the
code does. So this script builds the installed layout first, in a temporary folder
(``scripts/layout.py``: real folders, links to the checkout's files), and runs Import Linter
there.

``--layout DIR`` checks a layout built before (by :func:`build_layout`) instead: the tests
add a deliberate violation to one and see the contract fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__:     # imported as scripts.lint_imports (the tests)
    from scripts.layout import REPO, build_layout
else:               # run as a file: its own folder is first on sys.path
    from layout import REPO, build_layout

__all__ = ["build_layout", "lint", "main"]


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
