"""pymta: a pure-Python asyncio Mail Transfer Agent.

``pymta.MTA(config)`` serves inside any asyncio program; ``python -m pymta serve`` runs it as
a daemon. ``pymta.load_config()`` builds a ``Config`` from the environment and a TOML file.
"""

from pymta.app import MTA, serve
from pymta.config.load import load_config
from pymta.config.model import Config

__all__ = ["MTA", "Config", "load_config", "serve"]
__version__ = "0.1.0"
