"""Fuzz target: the queue's envelope record codec (``pymta.queue.codec``).

Input: the bytes of an ``env/`` file, as a disk, a crash or a human may have left it.

Contract checked (module docstring of ``codec``): ``decode`` returns an Envelope or raises
``CodecError`` (``UnsupportedVersion`` is one) -- never another exception, because the store
quarantines exactly that and anything else would stop the queue on every start; a decoded
envelope encodes to bytes that decode and encode to the same bytes again (the format is a
fixed point after one round).
"""

from __future__ import annotations

from fuzz.harness import require
from pymta.queue.codec import CodecError, decode, encode


def test_one_input(data: bytes) -> None:
    try:
        envelope = decode(data)
    except CodecError:
        return
    first = encode(envelope)
    require(isinstance(first, bytes) and first.isascii(), "encode is not ASCII bytes")
    second = encode(decode(first))
    require(first == second, "encode(decode(encode(x))) != encode(x)", (first[:200], second[:200]))
