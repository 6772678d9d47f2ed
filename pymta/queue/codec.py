"""Envelope <-> bytes for the queue's ``env/`` files.

The format is JSON with a ``"v": 1`` field, written with sorted keys and pure ASCII so the same
envelope always gives the same bytes (diffable, testable) and so strings holding
``surrogateescape`` bytes from non-UTF-8 clients survive the round trip as ``\\udcXX`` escapes.
Field names are spelled out here rather than derived from the dataclasses: renaming a Python
attribute must not silently change the on-disk format of messages already queued.

Decoding is tolerant of missing optional fields (they take the dataclass default, so adding a
field later needs no migration) and strict about types (a file that decodes to the wrong shape
is corrupt, and the store quarantines it rather than delivering something half-understood).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pymta.types import Envelope, RcptState, Recipient

VERSION = 1

# allow_nan stays on: a deliberately infinite next_attempt must round-trip, not fail a commit.
# One encoder for every call: ``json.dumps`` with options builds a new one each time.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class CodecError(ValueError):
    """The bytes are not an envelope this code can read (corrupt or truncated)."""


class UnsupportedVersion(CodecError):
    """A well-formed envelope from another (newer) format version: not corrupt, not ours."""


def encode(envelope: Envelope) -> bytes:
    doc = {
        "v": VERSION,
        "sender": envelope.sender,
        "recipients": [_rcpt_to_dict(r) for r in envelope.recipients],
        "received_at": envelope.received_at,
        "next_attempt": envelope.next_attempt,
        "client_ip": envelope.client_ip,
        "client_name": envelope.client_name,
        "helo": envelope.helo,
        "auth_user": envelope.auth_user,
        "body_type": envelope.body_type,
        "smtputf8": envelope.smtputf8,
        "ret": envelope.ret,
        "envid": envelope.envid,
        "size": envelope.size,
        "held": envelope.held,
        "is_bounce": envelope.is_bounce,
        "prepend": envelope.prepend,
        "protocol": envelope.protocol,
        "extra": dict(envelope.extra),
        "requiretls": envelope.requiretls,
        "tls_optional": envelope.tls_optional,
    }
    return _ENCODER.encode(doc).encode("ascii")


def decode(data: bytes) -> Envelope:
    """The envelope in ``data``; CodecError (UnsupportedVersion for a newer format) for
    anything else, whatever the bytes: a queue file is input too, and one bad file must
    become one quarantined message, never an exception escaping into the queue manager."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"not JSON: {e}") from None
    except RecursionError:      # "[[[[...": nesting deeper than the interpreter's stack
        raise CodecError("not JSON: nested too deeply") from None
    try:
        return _envelope(doc)
    except (OverflowError, RecursionError) as e:   # e.g. an integer beyond a float's range
        raise CodecError(f"bad value: {e}") from None


def _envelope(doc: Any) -> Envelope:
    if not isinstance(doc, dict):
        raise CodecError("not a JSON object")
    version = doc.get("v")
    if version != VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise UnsupportedVersion(f"envelope format v{version}, this code reads v{VERSION}")
        raise CodecError(f"bad version field {version!r}")
    rcpts = doc.get("recipients")
    if not isinstance(rcpts, list):
        raise CodecError("recipients is not a list")
    extra = doc.get("extra", {})
    if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise CodecError("extra is not a str->str object")
    d = _Fields(doc)
    return Envelope(
        sender=d.text("sender"),
        recipients=[_rcpt_from_dict(r) for r in rcpts],
        received_at=d.number("received_at"),
        next_attempt=d.number("next_attempt"),
        client_ip=d.text("client_ip", ""),
        client_name=d.text("client_name", ""),
        helo=d.text("helo", ""),
        auth_user=d.opt_text("auth_user"),
        body_type=d.text("body_type", "7BIT"),
        smtputf8=d.flag("smtputf8", False),
        ret=d.opt_text("ret"),
        envid=d.opt_text("envid"),
        size=d.integer("size", 0),
        held=d.flag("held", False),
        is_bounce=d.flag("is_bounce", False),
        prepend=d.text("prepend", ""),
        protocol=d.text("protocol", "ESMTP"),
        extra=dict(extra),
        # RFC 8689 flags (issue 15): absent from envelopes written before them, so False
        requiretls=d.flag("requiretls", False),
        tls_optional=d.flag("tls_optional", False),
    )


def _rcpt_to_dict(r: Recipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "original": r.original,
        "local": r.local,
        "mailbox": r.mailbox,
        "notify": r.notify,
        "orcpt": r.orcpt,
        "state": r.state.value,
        "attempts": r.attempts,
        "last_reply": r.last_reply,
        "last_attempt": r.last_attempt,
        "next_hop": r.next_hop,
    }


def _rcpt_from_dict(doc: Any) -> Recipient:
    if not isinstance(doc, dict):
        raise CodecError("recipient is not a JSON object")
    d = _Fields(doc)
    state = d.text("state", RcptState.PENDING.value)
    try:
        rstate = RcptState(state)
    except ValueError:
        raise CodecError(f"unknown recipient state {state!r}") from None
    return Recipient(
        address=d.text("address"),
        original=d.text("original"),
        local=d.flag("local", True),
        mailbox=d.opt_text("mailbox"),
        notify=d.opt_text("notify"),
        orcpt=d.opt_text("orcpt"),
        state=rstate,
        attempts=d.integer("attempts", 0),
        last_reply=d.text("last_reply", ""),
        last_attempt=d.number("last_attempt", 0.0),
        next_hop=d.text("next_hop", ""),
    )


_MISSING: Any = object()


class _Fields:
    """Typed access to one JSON object; a wrong type or a missing required key is corruption."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self._doc = doc

    def _get(self, key: str, default: Any) -> Any:
        value = self._doc.get(key, default)
        if value is _MISSING:
            raise CodecError(f"missing field {key!r}")
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise CodecError(f"field {key!r} is not a string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._doc.get(key)
        if value is not None and not isinstance(value, str):
            raise CodecError(f"field {key!r} is not a string or null")
        return value

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise CodecError(f"field {key!r} is not a boolean")
        return value

    def integer(self, key: str, default: Any = _MISSING) -> int:
        """A count or a size: never negative, and within 64 bits (a corrupt 400-digit
        value must not reach arithmetic that would take it at its word)."""
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CodecError(f"field {key!r} is not an integer")
        if not 0 <= value < 2**63:
            raise CodecError(f"field {key!r} is out of range")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        """A time: a finite float or infinity (never NaN, which no comparison orders)."""
        value = self._get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CodecError(f"field {key!r} is not a number")
        value = float(value)
        if math.isnan(value):
            raise CodecError(f"field {key!r} is not a number")
        return value
