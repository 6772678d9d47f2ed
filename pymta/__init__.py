"""pymta: a pure-Python asyncio Mail Transfer Agent.

``pymta.MTA(config)`` serves inside any asyncio program; ``python -m pymta serve`` runs it as
a daemon. ``pymta.load_config()`` builds a ``Config`` from the environment and a TOML file.
Names are imported lazily so that the CLI's light commands (check-config, queue) do not load
the whole server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymta.app import MTA, serve
    from pymta.config.load import load_config
    from pymta.config.model import Config

__all__ = ["MTA", "Config", "load_config", "serve"]
__version__ = "0.1.0"

_WHERE = {"MTA": "pymta.app", "serve": "pymta.app", "load_config": "pymta.config.load",
          "Config": "pymta.config.model"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pymta' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
