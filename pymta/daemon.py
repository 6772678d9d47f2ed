"""``pymta serve``: run the server until SIGTERM/SIGINT, in this process or, with
``PYMTA_WORKERS`` above 1, as the supervisor of that many worker processes.

The top of the process structure, above the two ways to run: :mod:`pymta.workers` (the
supervisor, whose workers each run :func:`pymta.app.serve_async`) and
:func:`pymta.app.serve_async` itself (one process). Neither of those imports this module,
so the layers are ``cli > daemon > workers > app`` with no cycle (the import contracts in
``pyproject.toml`` say so).
"""

from __future__ import annotations

import asyncio

from pymta import wiring
from pymta.app import install_uvloop, serve_async
from pymta.config.model import Config
from pymta.log import setup_logging
from pymta.workers import Supervisor

__all__ = ["serve"]


def serve(config: Config) -> int:
    """Run a server until SIGTERM/SIGINT; the exit status for the CLI. The configuration is
    checked first (``pymta.wiring.check``: ConfigError naming the variable, before anything
    listens)."""
    setup_logging(config)
    if config.workers > 1:
        return Supervisor(config).run()     # checks the configuration before any fork
    wiring.check(config)
    install_uvloop()
    return asyncio.run(serve_async(config))
