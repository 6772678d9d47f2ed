"""The envelope file format: every field round-trips, the bytes are stable, damage is detected."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pymta.queue import codec
from pymta.types import Envelope, RcptState, Recipient


def full_envelope() -> Envelope:
    """Every field set to a non-default value, so a field the codec forgets shows up."""
    return Envelope(
        sender="s\u00e9nder@exampl\u00e9.com",
        recipients=[
            Recipient(address="alice@example.com", original="team@example.com", local=True,
                      mailbox="alice/", notify="SUCCESS,FAILURE", orcpt="rfc822;team@example.com",
                      state=RcptState.DELIVERED, attempts=3, last_reply="250 2.0.0 Ok",
                      last_attempt=1700000000.25, next_hop="maildir"),
            Recipient(address="bob@remote.example", original="bob@remote.example", local=False,
                      mailbox=None, notify="NEVER", orcpt=None, state=RcptState.FAILED,
                      attempts=7, last_reply="550 5.1.1 no such user", last_attempt=1.5,
                      next_hop="mx.remote.example"),
            Recipient(address="carol@example.com", original="carol@example.com",
                      state=RcptState.PENDING, last_reply="451 4.4.1 \udcff\udcfe timeout"),
        ],
        received_at=1700000000.123456,
        next_attempt=math.inf,
        client_ip="2001:db8::1",
        helo="client.example",
        auth_user="alice",
        body_type="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="QQ314159",
        size=123456789,
        held=True,
        is_bounce=True,
        protocol="ESMTPSA",
        extra={"quarantine": "spam", "x-\u00fc": "\U0001f4e7"},
    )


def test_roundtrip_every_field() -> None:
    env = full_envelope()
    back = codec.decode(codec.encode(env))
    assert back == env
    assert [r.state for r in back.recipients] == [RcptState.DELIVERED, RcptState.FAILED,
                                                   RcptState.PENDING]
    assert all(isinstance(r.state, RcptState) for r in back.recipients)


def test_codec_covers_every_dataclass_field() -> None:
    """A field added to Envelope or Recipient must be added to the codec too."""
    doc = json.loads(codec.encode(full_envelope()))
    assert set(doc) - {"v"} == {f.name for f in dataclasses.fields(Envelope)}
    assert set(doc["recipients"][0]) == {f.name for f in dataclasses.fields(Recipient)}


def test_defaults_roundtrip() -> None:
    env = Envelope(sender="", recipients=[Recipient("a@b", "a@b")], received_at=0.0,
                   next_attempt=0.0)
    assert codec.decode(codec.encode(env)) == env


def test_bytes_are_stable_ascii_and_versioned() -> None:
    env = full_envelope()
    data = codec.encode(env)
    assert data == codec.encode(codec.decode(data))
    data.decode("ascii")
    assert json.loads(data)["v"] == 1


def test_missing_optional_fields_take_defaults() -> None:
    """Files written before a field existed stay readable."""
    data = json.dumps({"v": 1, "sender": "a@b", "received_at": 1, "next_attempt": 2,
                       "recipients": [{"address": "c@d", "original": "c@d"}]}).encode()
    env = codec.decode(data)
    assert env.received_at == 1.0 and isinstance(env.received_at, float)
    assert env.recipients[0].state is RcptState.PENDING
    assert env.body_type == "7BIT" and env.extra == {}


@pytest.mark.parametrize("data", [
    b"",
    b"{",
    b"\xff\xfe",
    b"[]",
    b'{"sender": "a@b"}',                                         # no version
    b'{"v": "1", "sender": "a@b"}',
    b'{"v": 1, "recipients": [], "received_at": 0, "next_attempt": 0}',   # no sender
    b'{"v": 1, "sender": 5, "recipients": [], "received_at": 0, "next_attempt": 0}',
    b'{"v": 1, "sender": "", "recipients": {}, "received_at": 0, "next_attempt": 0}',
    b'{"v": 1, "sender": "", "recipients": [], "received_at": "x", "next_attempt": 0}',
    b'{"v": 1, "sender": "", "recipients": [], "received_at": 0, "next_attempt": 0,'
    b' "size": 1.5}',
    b'{"v": 1, "sender": "", "recipients": [], "received_at": 0, "next_attempt": 0,'
    b' "held": 1}',
    b'{"v": 1, "sender": "", "recipients": [], "received_at": 0, "next_attempt": 0,'
    b' "extra": {"a": 1}}',
    b'{"v": 1, "sender": "", "recipients": [{"address": "a", "original": "a",'
    b' "state": "lost"}], "received_at": 0, "next_attempt": 0}',
    b'{"v": 1, "sender": "", "recipients": ["a@b"], "received_at": 0, "next_attempt": 0}',
])
def test_damage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(data)


def test_newer_version_is_not_corruption() -> None:
    with pytest.raises(codec.UnsupportedVersion):
        codec.decode(b'{"v": 2, "whatever": true}')
    assert issubclass(codec.UnsupportedVersion, codec.CodecError)


@pytest.mark.parametrize("state", list(RcptState))
def test_every_recipient_state_roundtrips(state: RcptState) -> None:
    """Including states added later (issue 10: a failure whose notice is still owed)."""
    env = full_envelope()
    env.recipients[0].state = state
    assert codec.decode(codec.encode(env)).recipients[0].state is state


@pytest.mark.parametrize("data", [
    b"[" * 200_000 + b"]" * 200_000,                                 # deeper than the stack
    b'{"v":1,"sender":"a","recipients":[],"received_at":1' + b"0" * 400
    + b',"next_attempt":0}',                                          # beyond a float
    b'{"v":1,"sender":"a","recipients":[],"received_at":' + b"9" * 5000
    + b',"next_attempt":0}',                                          # beyond int parsing
    b'{"v":1,"sender":"a","recipients":[{"address":"x","original":"x","attempts":1'
    + b"0" * 400 + b'}],"received_at":0,"next_attempt":0}',
    b'{"v":1,"sender":"a","recipients":[],"received_at":0,"next_attempt":0,"size":-5}',
    b'{"v":1,"sender":"a","recipients":[],"received_at":NaN,"next_attempt":0}',
], ids=["nested", "huge-number", "huge-int-literal", "huge-attempts", "negative-size",
        "nan-time"])
def test_hostile_queue_files_are_codec_errors(data: bytes) -> None:
    """Issue 10: a queue file is input too. The first two raised RecursionError /
    OverflowError out of ``decode`` (the queue manager logged a traceback for them at every
    scan); the others were accepted as counts, sizes and times no envelope can have."""
    with pytest.raises(codec.CodecError):
        codec.decode(data)


def test_mutated_envelopes_decode_or_fail_cleanly() -> None:
    """A small deterministic fuzz: any damage to a valid file is an envelope or a
    CodecError, nothing else (the store quarantines on CodecError)."""
    import random

    good = codec.encode(full_envelope())
    rng = random.Random(10)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos:pos + rng.randint(1, 40)]
            else:
                data[pos:pos] = rng.choice([b"[", b"{", b'"', b"1e999", b"-", b"null",
                                            b"true", b"9" * 30, b"\\ud800", b","])
        try:
            env = codec.decode(bytes(data))
        except codec.CodecError:
            continue
        assert isinstance(env, Envelope)
