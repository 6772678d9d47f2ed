"""``pymta queue ...`` against a real queue store on disk (as for a stopped server), each test
with either store (``kind``: the file layout, the SQLite database): the commands find out
which one the directory holds, as they must with a server on either."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pymta.cli import queue as queue_cli
from pymta.cli.main import main
from pymta.queue.choice import KINDS, detect, make_store
from pymta.types import Envelope, RcptState, Recipient

BODY = b"From: alice@example.com\r\nSubject: hello\r\n\r\nbody text\r\n"


def store_of(root: Path) -> Any:
    """An open store of the kind ``root`` holds (the ``state`` fixture made it)."""
    store = make_store(str(root), detect(str(root)), fsync=False)
    store.open()
    return store


async def enqueue(root: Path, **kw: object) -> str:
    store = store_of(root)
    await store.start()
    try:
        rcpts = [Recipient("bob@example.net", "bob@example.net", local=False,
                           attempts=2, last_reply="451 4.7.1 greylisted", last_attempt=time.time(),
                           next_hop="mx.example.net"),
                 Recipient("carol@example.com", "team@example.com", state=RcptState.DELIVERED)]
        now = time.time()
        env = Envelope(sender="alice@example.com", recipients=rcpts, received_at=now - 3600,
                       next_attempt=now + 600, size=len(BODY), **kw)  # type: ignore[arg-type]
        return await store.enqueue_bytes(env, BODY)
    finally:
        await store.aclose()


def load(root: Path, qid: str) -> Envelope | None:
    store = store_of(root)
    try:
        env: Envelope | None = store.load(qid)
        return env
    finally:
        queue_cli.close_store(store)


@pytest.fixture
def bare_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYMTA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MAIL_DOMAIN", "example.com")
    monkeypatch.delenv("PYMTA_CONFIG", raising=False)
    return tmp_path


@pytest.fixture(params=KINDS)
def state(request: pytest.FixtureRequest, bare_state: Path) -> Path:
    """A state directory whose queue is of the store ``request.param``, made (and closed)
    here, so ``detect`` finds it."""
    store = make_store(str(bare_state / "queue"), request.param, fsync=False)
    store.open()
    queue_cli.close_store(store)
    assert detect(str(bare_state / "queue")) == request.param
    return bare_state


async def test_list_and_show(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qid = await enqueue(state / "queue")
    assert main(["queue", "list"]) == 0
    out = capsys.readouterr().out
    assert qid in out and "<alice@example.com>" in out and "1h00m" in out
    assert "pending" in out and "delivered" in out and "451 4.7.1 greylisted" in out

    assert main(["queue", "list", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["id"] == qid and entry["size"] == len(BODY)
    assert entry["last_error"] == "451 4.7.1 greylisted"
    assert [r["state"] for r in entry["recipients"]] == ["pending", "delivered"]

    assert main(["queue", "show", qid]) == 0
    out = capsys.readouterr().out
    assert "mx.example.net" in out and "attempts 2" in out
    assert "(for <team@example.com>)" in out
    assert out.rstrip().endswith("Subject: hello")
    assert "body text" not in out


async def test_hold_release_flush_delete(state: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = state / "queue"
    qid = await enqueue(root)
    assert main(["queue", "hold", qid]) == 0
    assert load(root, qid).held is True  # type: ignore[union-attr]
    assert main(["queue", "flush"]) == 0
    assert load(root, qid).next_attempt > time.time()  # type: ignore[union-attr]  # held: kept
    assert main(["queue", "release", qid]) == 0
    env = load(root, qid)
    assert env is not None and not env.held and env.next_attempt <= time.time()
    assert main(["queue", "delete", qid]) == 0
    assert load(root, qid) is None and not os.path.exists(root / "data" / qid)
    capsys.readouterr()
    assert main(["queue", "list"]) == 0
    assert "queue is empty" in capsys.readouterr().out


async def test_delete_all(state: Path) -> None:
    root = state / "queue"
    ids = [await enqueue(root), await enqueue(root)]
    assert main(["queue", "delete", "--all"]) == 0
    assert all(load(root, q) is None for q in ids)


async def test_unknown_and_busy_ids(state: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = state / "queue"
    qid = await enqueue(root)
    for args in (["show", "NOSUCH"], ["hold", "NOSUCH"], ["delete", "../etc"]):
        assert main(["queue", *args]) == 1
        assert capsys.readouterr().err == f"pymta: queue: no message {args[1]}\n"
    monkeypatch.setattr(queue_cli, "LOCK_TIMEOUT", 0.1)
    store = store_of(root)
    lock = store.try_lock(qid)   # a delivery attempt in progress
    try:
        assert lock is not None
        assert main(["queue", "hold", qid]) == 1
        assert "is busy" in capsys.readouterr().err
    finally:
        lock.release()
        await store.aclose()
    assert main(["queue", "hold", qid]) == 0        # free again: the lock was what refused


def test_missing_queue_directory(bare_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = bare_state
    assert main(["queue", "list"]) == 1
    assert "no queue directory" in capsys.readouterr().err
    assert not (state / "queue").exists()


def test_signal_ignores_stale_pid_file(tmp_path: Path) -> None:
    import io
    import subprocess

    pid_file = tmp_path / "pymta.pid"
    pid_file.write_text("999999999\n")
    assert queue_cli.signal_server(str(tmp_path), io.StringIO()) is False
    pid_file.write_text("garbage\n")
    assert queue_cli.signal_server(str(tmp_path), io.StringIO()) is False
    # A reused pid of an unrelated process: SIGUSR1 would kill it, so it must not be sent.
    other = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(f"{other.pid}\n")
        assert queue_cli.signal_server(str(tmp_path), io.StringIO()) is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


async def test_issue10_review_flush_without_a_token_still_makes_messages_due(
        state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush token cannot be written (a read-only or full queue file system) while a
    server runs: the server, signalled, would only rescan and find nothing due. So the
    envelopes are made due on disk instead, the server is signalled to rescan, and the exit
    status says the flush was not complete (its dead hosts are not forgotten). Before: "1
    message(s) due now", status 0, and the message still waited for its next_attempt."""
    qid = await enqueue(state / "queue")
    signals: list[str] = []

    def no_token(state_dir: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(queue_cli, "write_flush_token", no_token)
    monkeypatch.setattr(queue_cli, "signal_server",
                        lambda state_dir, err: signals.append(state_dir) or True)
    before = time.time()
    assert main(["queue", "flush"]) == 1
    captured = capsys.readouterr()
    env = load(state / "queue", qid)
    assert env is not None and env.next_attempt <= time.time()
    assert env.next_attempt >= before
    assert signals                                   # the server rescans and finds it due
    assert captured.out == "1 message(s) due now\n"
    assert "cannot write the flush request: Read-only file system" in captured.err
    assert "dead hosts" in captured.err


async def test_show_and_size_read_the_body_where_it_is(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A body over the SQLite store's inline limit lives in ``data/``, a small one in its
    row: both shown, and sized from the body when the envelope does not say (an envelope of
    an older version); nothing of either is left behind in ``spool/`` by reading it."""
    root = state / "queue"
    big = b"From: alice@example.com\r\nSubject: big\r\n\r\n" + b"x" * 300_000 + b"\r\n"
    store = store_of(root)
    await store.start()
    try:
        now = time.time()
        ids = {}
        for name, body in (("small", BODY), ("big", big)):
            env = Envelope(sender="alice@example.com",
                           recipients=[Recipient("bob@example.net", "bob@example.net")],
                           received_at=now, next_attempt=now)
            qid = await store.enqueue_bytes(env, body)
            env.size = 0                    # as an envelope that does not say
            store.save_sync(qid, env)
            ids[name] = qid
    finally:
        await store.aclose()
    assert main(["queue", "list", "--json"]) == 0
    sizes = {e["id"]: e["size"] for e in json.loads(capsys.readouterr().out)}
    assert sizes == {ids["small"]: len(BODY), ids["big"]: len(big)}
    for name, subject in (("small", "Subject: hello"), ("big", "Subject: big")):
        assert main(["queue", "show", ids[name]]) == 0
        out = capsys.readouterr().out
        assert out.rstrip().endswith(subject) and "xxxx" not in out
    spool = root / "spool"
    assert not spool.is_dir() or os.listdir(spool) == []


async def test_an_unusable_message_is_reported_where_it_went(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An envelope the store cannot read is set aside (the file store: ``corrupt/``; the
    SQLite store: the table ``set_aside``) while this very command reads it; that command,
    the next one and a change of it say where it went, not "no message"."""
    import sqlite3

    root = state / "queue"
    qid = await enqueue(root)
    other = await enqueue(root)
    if detect(str(root)) == "sqlite":
        with sqlite3.connect(root / "queue.db") as db:
            db.execute("UPDATE messages SET envelope = ? WHERE qid = ?",
                       (b"\x00 not an envelope", qid))
        where = f"was set aside in {root / 'queue.db'} "
    else:
        (root / "env" / qid).write_bytes(b"\x00 not an envelope")
        where = f"was moved to {root / 'corrupt'}/ "
    for argv in (["queue", "show", qid], ["queue", "show", qid], ["queue", "hold", qid]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"pymta: queue: message {qid} {where}"), (argv, err)
        assert err.count("\n") == 1
    assert main(["queue", "show", other]) == 0      # the others are as they were
    assert main(["queue", "show", "0000000000NONE0"]) == 1
    assert capsys.readouterr().err.endswith("pymta: queue: no message 0000000000NONE0\n")
