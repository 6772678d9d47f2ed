"""The stable API (issue 11, item 5): what ``pymta.__all__`` promises an embedder resolves,
is visible, and is the object the documentation means; everything else is an error."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pymta
from pymta import contracts, types

# What README.md, "Embedding", and examples/embed.py use: they must stay exported.
DOCUMENTED = {
    "MTA", "Config", "ConfigError", "load_config", "serve", "message_bytes",
    "RecipientLookup", "Authenticator", "Check", "Modifier", "DeliveryAgent",
    "ProgressReportingAgent", "Router", "QueueStore", "Closeable",
    "Address", "Destination", "Target", "Recipient", "QueuedMessage", "Envelope", "Outcome",
    "OutcomeKind", "Reply", "SMTPError", "TemporaryFailure", "Verdict", "Action", "Decision",
    "ConnInfo", "Identity", "Transaction", "SpooledBody", "CannotEvaluate", "Pipeline",
}


def test_every_exported_name_resolves() -> None:
    missing = [name for name in pymta.__all__ if getattr(pymta, name, None) is None]
    assert missing == []
    assert len(set(pymta.__all__)) == len(pymta.__all__)


def test_documented_names_are_exported() -> None:
    assert DOCUMENTED - set(pymta.__all__) == set()


def test_dir_shows_the_exported_names() -> None:
    assert set(pymta.__all__) <= set(dir(pymta))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        pymta.NoSuchThing  # noqa: B018
    assert not hasattr(pymta, "wiring_tables")


def test_exported_protocols_and_values_are_the_contracts() -> None:
    # pymta.QueueStore is the extension point, not the local store class of pymta.queue
    for name in contracts.__all__:
        assert getattr(pymta, name) is getattr(contracts, name), name
    assert pymta.TemporaryFailure is types.TemporaryFailure
    assert issubclass(pymta.TemporaryFailure, pymta.SMTPError)


def test_star_import_gives_exactly_the_stable_names() -> None:
    namespace: dict[str, object] = {}
    exec("from pymta import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(pymta.__all__)


def test_import_pymta_loads_no_server() -> None:
    """The CLI's light commands import pymta; the names load when first used."""
    code = ("import sys, pymta; "
            "print(sorted(m for m in ('pymta.app', 'pymta.queue.manager', 'pymta.pipeline') "
            "if m in sys.modules)); "
            "pymta.MTA; print('pymta.app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
