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
import signal
from collections.abc import Callable

from pymta import exporter, wiring
from pymta.app import install_uvloop, serve_async
from pymta.config.model import Config
from pymta.log import setup_logging
from pymta.workers import Supervisor

__all__ = ["serve"]


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run a server until SIGTERM/SIGINT; the exit status for the CLI. The configuration is
    checked first (``pymta.wiring.check``: ConfigError naming the variable, before anything
    listens). ``reload_config`` loads the configuration again at SIGHUP (the CLI's: the same
    ``--config`` file and the environment)."""
    setup_logging(config)
    # SIGHUP's default action kills; until the server's handler is in place, it is ignored
    # (the server starts from the configuration as it is now: nothing to reload yet)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.workers > 1:
        # checks the configuration before any fork
        return Supervisor(config, reload_config).run()
    wiring.check(config)
    metrics = exporter.for_config(config)     # PYMTA_METRICS_LISTEN: counts in this process
    if metrics is not None:
        metrics.start()
    install_uvloop()
    try:
        return asyncio.run(serve_async(config, reload_config=reload_config))
    finally:
        if metrics is not None:
            metrics.close()
