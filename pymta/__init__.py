"""pymta: a pure-Python asyncio Mail Transfer Agent.

``pymta.MTA(config)`` serves inside any asyncio program; ``python -m pymta serve`` runs it as
a daemon. ``pymta.load_config()`` builds a ``Config`` from the environment and a TOML file.

The names in ``__all__`` are the stable API, for programs that embed an MTA and for adapters
written outside this repository: the server and its configuration, every extension point
(the ``typing.Protocol`` interfaces of :mod:`pymta.contracts`), the values those interfaces
pass (:mod:`pymta.types`), what a pre-queue check or modifier is given
(:mod:`pymta.pipeline`), and :func:`message_bytes` for a delivery callback. They keep their
names and meaning across releases; everything else (module paths included) may move, so
import these from ``pymta``. README.md, "Embedding", says what each is for.

Names are imported lazily so that the CLI's light commands (check-config, queue) do not load
the whole server.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymta.app import MTA
    from pymta.callbacks import message_bytes
    from pymta.config.errors import ConfigError
    from pymta.config.load import load_config
    from pymta.config.model import Config
    from pymta.contracts import (
        Authenticator,
        Check,
        Closeable,
        CramMD5Authenticator,
        DeliveryAgent,
        FlushableAgent,
        MessageLock,
        Modifier,
        Probeable,
        ProgressReportingAgent,
        QueueStore,
        RecipientLookup,
        Router,
        Spool,
        StoppableAgent,
    )
    from pymta.daemon import serve
    from pymta.pipeline import CannotEvaluate, Pipeline, SpooledBody, Transaction
    from pymta.types import (
        Action,
        Address,
        ConnInfo,
        Decision,
        Destination,
        Envelope,
        Identity,
        Outcome,
        OutcomeKind,
        QueuedMessage,
        QueueId,
        Recipient,
        Reply,
        SMTPError,
        Target,
        TemporaryFailure,
        Verdict,
    )

#: Where each stable name lives now (the lazy import's table; not part of the API).
_WHERE = {
    # the server and its configuration
    "MTA": "pymta.app", "serve": "pymta.daemon", "load_config": "pymta.config.load",
    "Config": "pymta.config.model", "ConfigError": "pymta.config.errors",
    "message_bytes": "pymta.callbacks",
    # the extension points
    **dict.fromkeys(
        ("Authenticator", "Check", "Closeable", "CramMD5Authenticator", "DeliveryAgent",
         "FlushableAgent", "MessageLock", "Modifier", "Probeable", "ProgressReportingAgent",
         "QueueStore", "RecipientLookup", "Router", "Spool", "StoppableAgent"),
        "pymta.contracts"),
    # what a check or modifier is given, and the pipeline MTA(pipeline=...) takes
    **dict.fromkeys(("CannotEvaluate", "Pipeline", "SpooledBody", "Transaction"),
                    "pymta.pipeline"),
    # the values the extension points pass
    **dict.fromkeys(
        ("Action", "Address", "ConnInfo", "Decision", "Destination", "Envelope", "Identity",
         "Outcome", "OutcomeKind", "QueueId", "QueuedMessage", "Recipient", "Reply",
         "SMTPError", "Target", "TemporaryFailure", "Verdict"), "pymta.types"),
}

# A literal list (what type checkers and linters read); it names exactly the keys of _WHERE.
__all__ = [
    # the server and its configuration
    "MTA", "Config", "ConfigError", "load_config", "message_bytes", "serve",
    # the extension points (pymta.contracts)
    "Authenticator", "Check", "Closeable", "CramMD5Authenticator", "DeliveryAgent",
    "FlushableAgent", "MessageLock", "Modifier", "Probeable", "ProgressReportingAgent",
    "QueueStore", "RecipientLookup", "Router", "Spool", "StoppableAgent",
    # what a check or modifier is given; the pipeline MTA(pipeline=...) takes
    "CannotEvaluate", "Pipeline", "SpooledBody", "Transaction",
    # the values (pymta.types)
    "Action", "Address", "ConnInfo", "Decision", "Destination", "Envelope", "Identity",
    "Outcome", "OutcomeKind", "QueueId", "QueuedMessage", "Recipient", "Reply", "SMTPError",
    "Target", "TemporaryFailure", "Verdict",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pymta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value     # imported once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
