"""pymta: a pure-Python asyncio Mail Transfer Agent.

``pymta.MTA(config)`` serves inside any asyncio program; ``python -m pymta serve`` runs it as
a daemon. ``pymta.load_config()`` builds a ``Config`` from the environment and a TOML file.
Names are imported lazily so that the CLI's light commands (check-config, queue) do not load
the whole server.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymta.app import MTA
    from pymta.config.load import load_config
    from pymta.config.model import Config
    from pymta.daemon import serve

__all__ = ["MTA", "Config", "load_config", "serve"]
__version__ = "0.1.0"

_WHERE = {"MTA": "pymta.app", "serve": "pymta.daemon", "load_config": "pymta.config.load",
          "Config": "pymta.config.model"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pymta' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


# The adapter packages live beside the core in the source tree (``backends/``, ``delivery/``)
# and are installed as ``pymta.backends`` / ``pymta.delivery`` (package-dir in pyproject.toml).
# Run from a checkout (``python -m pymta`` in the repository root, where ``pymta/`` shadows the
# installed package), the core must map them in the same way, or the server cannot start.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ADAPTERS = {
    f"{__name__}.{name}": os.path.join(os.path.dirname(_HERE), name)
    for name in ("backends", "delivery")
    if not os.path.isdir(os.path.join(_HERE, name))
    and os.path.isfile(os.path.join(os.path.dirname(_HERE), name, "__init__.py"))
}


class _SourceTreeAdapters(importlib.abc.MetaPathFinder):
    """Finds ``pymta.backends`` and ``pymta.delivery`` in a source checkout; nothing else."""

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        folder = _ADAPTERS.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


# First in line: a checkout's core must get the checkout's adapters, not those of another
# tree that an editable install elsewhere maps (mixed trees would be code no one wrote).
if _ADAPTERS and not any(isinstance(f, _SourceTreeAdapters) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeAdapters())
