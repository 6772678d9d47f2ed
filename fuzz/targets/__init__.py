"""The fuzz targets, by name. Each module has ``test_one_input(data: bytes) -> None`` and a
docstring stating the contract it checks; its seed corpus is ``fuzz/corpus/<name>/``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

TARGETS: dict[str, str] = {
    "engine": "fuzz.targets.engine",      # sans-I/O SMTP engine, bytes in pieces
    "params": "fuzz.targets.params",      # MAIL/RCPT paths and ESMTP parameters
    "headers": "fuzz.targets.headers",    # header scanner, splitter, filters, stage helpers
    "trace": "fuzz.targets.trace",        # Received / Received-SPF / Authentication-Results
    "mime": "fuzz.targets.mime",          # 8-bit to quoted-printable downgrade
    "dsn": "fuzz.targets.dsn",            # DSN built from a stored message
    "codec": "fuzz.targets.codec",        # queue envelope records
    "content": "fuzz.targets.content",    # banned files, bad headers, the filter's texts
}


def load(name: str) -> ModuleType:
    if name not in TARGETS:
        raise KeyError(f"unknown fuzz target {name!r}; known: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name])


def entry(name: str) -> Callable[[bytes], None]:
    return load(name).test_one_input
