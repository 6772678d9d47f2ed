"""``python -m pymta queue ...`` against a running ``pymta serve`` on the same state directory.

A message to ``fwd@example.com`` (an alias forwarding to a foreign domain) is relayed to a smart
host that refuses connections, so it is deferred (``451 4.4.x``) on every attempt. That makes
the attempt counter a clock: it grows at each retry, stops while the message is held, and
jumps on a flush.

Every test runs once per queue store (``PYMTA_QUEUE_STORE``: the file layout, the SQLite
database): the commands find out which one the server's queue directory holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
import serverproc
from serverproc import ServerProc, dead_relay, make_message, queued_id, smtp_send, wait_until

from pymta.cli.main import main
from pymta.queue.choice import KINDS, make_store
from pymta.types import Envelope, Recipient

server_factory = serverproc.server_factory_each_store  # the fixture, once per queue store

SENDER = "sender@client.test"
FWD = "fwd@example.com"
DEFERRED = re.compile(r"4\d\d 4\.4\.\d ")   # 451 4.4.0 (no transport) / 4.4.1 (no answer)


def send_deferred(srv: ServerProc, subject: str) -> str:
    code, text = smtp_send(srv.port, SENDER, [FWD], make_message(SENDER, FWD, subject))
    assert code == 250, text
    return queued_id(text)


def attempts(srv: ServerProc, qid: str) -> int:
    entry = srv.queue_entry(qid)
    assert entry is not None, f"{qid} not in the queue"
    return sum(r["attempts"] for r in entry["recipients"])


def wait_deferred(srv: ServerProc, qid: str, at_least: int = 1) -> None:
    wait_until(lambda: (e := srv.queue_entry(qid)) is not None
               and sum(r["attempts"] for r in e["recipients"]) >= at_least
               and DEFERRED.match(e["last_error"]), 15, 0.2, f"{qid} to be deferred")


def test_list_show_hold_release_delete(server_factory) -> None:
    # SRS off: this test reads the client's own sender back from the queue listing.
    srv: ServerProc = server_factory("q", SMTP_RELAY_HOSTAUTH=dead_relay(), SRS_ENABLE="no",
                                     PYMTA_RETRY_FIRST="0.3", PYMTA_RETRY_MAX="0.6")
    srv.start()
    qid = send_deferred(srv, "queue cli one")
    wait_deferred(srv, qid)

    # list: id, sender, recipient, last error
    out = srv.cli("queue", "list", check=True).stdout
    assert qid in out
    assert f"<{SENDER}>" in out
    assert "<someone@remote.test>" in out
    assert re.search(r"last error +4\d\d 4\.4\.\d ", out), out
    assert "1 message(s)" in out

    # list --json
    data = json.loads(srv.cli("queue", "list", "--json", check=True).stdout)
    assert [e["id"] for e in data] == [qid]
    entry = data[0]
    assert entry["sender"] == SENDER
    assert entry["held"] is False
    assert DEFERRED.match(entry["last_error"]), entry
    (rcpt,) = entry["recipients"]
    assert rcpt["address"] == "someone@remote.test"
    assert rcpt["original"] == FWD
    assert rcpt["state"] == "pending"

    # show: the envelope and the message headers
    proc = srv.cli("queue", "show", qid, check=True)
    show = proc.stdout
    assert proc.stderr == ""
    assert f"id:           {qid}" in show
    assert f"sender:       <{SENDER}>" in show
    assert "recipient:    <someone@remote.test> (for <fwd@example.com>)" in show
    assert re.search(r"last reply: 4\d\d 4\.4\.\d ", show), show
    assert "Subject: queue cli one" in show
    assert f"From: <{SENDER}>" in show
    assert "Received: from " in show       # the header the server added
    assert "hello" not in show             # headers only, not the body

    # hold: no more attempts over several retry intervals
    proc = srv.cli("queue", "hold", qid, check=True)
    assert f"{qid}: held" in proc.stdout
    time.sleep(0.5)  # an attempt already running when the hold came may still finish
    held_at = attempts(srv, qid)
    entry = srv.queue_entry(qid)
    assert entry is not None and entry["held"] is True
    assert "(held)" in srv.cli("queue", "list", check=True).stdout
    time.sleep(2.5)  # > 4 retry intervals of at most 0.6 s
    assert attempts(srv, qid) == held_at, "a held message was retried"

    # release: retried again
    proc = srv.cli("queue", "release", qid, check=True)
    assert f"{qid}: released" in proc.stdout
    wait_until(lambda: attempts(srv, qid) > held_at, 10, 0.2, "a retry after release")
    entry = srv.queue_entry(qid)
    assert entry is not None and entry["held"] is False

    # delete: gone from the list and from the disk
    proc = srv.cli("queue", "delete", qid, check=True)
    assert f"{qid}: deleted" in proc.stdout
    assert srv.queue_entry(qid) is None
    assert qid not in srv.queue_files("env")
    assert qid not in srv.queue_files("data")
    assert not [n for n in srv.queue_files("tmp") if n.startswith(qid)]
    assert "queue is empty" in srv.cli("queue", "list", check=True).stdout
    # the server carries on without it
    time.sleep(1.0)
    assert srv.running
    assert "Traceback" not in srv.stderr, srv.stderr[-3000:]

    # delete a message twice: the second one is an error, one line
    proc = srv.cli("queue", "delete", qid)
    assert proc.returncode == 1
    assert proc.stderr == f"pymta: queue: no message {qid}\n"


def test_delete_all(server_factory) -> None:
    srv: ServerProc = server_factory("qa", SMTP_RELAY_HOSTAUTH=dead_relay(),
                                     PYMTA_RETRY_FIRST="0.3", PYMTA_RETRY_MAX="0.6")
    srv.start()
    qids = [send_deferred(srv, f"queue cli all {i}") for i in range(4)]
    for qid in qids:
        wait_deferred(srv, qid)
    srv.cli("queue", "hold", qids[0], check=True)
    proc = srv.cli("queue", "delete", "--all", check=True)
    for qid in qids:
        assert f"{qid}: deleted" in proc.stdout
    assert srv.queue_json() == []
    assert srv.queue_files("env") == []
    assert srv.queue_files("data") == []
    # new mail is still accepted and queued after the purge
    qid = send_deferred(srv, "queue cli after purge")
    wait_deferred(srv, qid)
    assert [e["id"] for e in srv.queue_json()] == [qid]
    assert srv.stop() == 0


def test_flush_makes_a_deferred_message_due_now(server_factory) -> None:
    """With a long retry interval nothing happens on its own; ``queue flush`` (through the pid
    file and SIGUSR1) gets an attempt within a second or two."""
    srv: ServerProc = server_factory("qf", SMTP_RELAY_HOSTAUTH=dead_relay(),
                                     PYMTA_RETRY_FIRST="300", PYMTA_RETRY_MAX="600",
                                     PYMTA_QUEUE_SCAN_INTERVAL="300")
    srv.start()
    qid = send_deferred(srv, "queue cli flush")
    wait_deferred(srv, qid)
    first = attempts(srv, qid)
    time.sleep(1.0)
    assert attempts(srv, qid) == first  # the next retry is minutes away
    started = time.monotonic()
    proc = srv.cli("queue", "flush", check=True)
    assert "1 message(s) due now" in proc.stdout, proc.stdout
    assert "no running server" not in proc.stdout
    wait_until(lambda: attempts(srv, qid) > first, 5, 0.1, "an attempt after flush")
    assert time.monotonic() - started < 5
    entry = srv.queue_entry(qid)
    assert entry is not None and DEFERRED.match(entry["last_error"])
    # a held message is not flushed
    srv.cli("queue", "hold", qid, check=True)
    time.sleep(0.3)
    count = attempts(srv, qid)
    proc = srv.cli("queue", "flush", check=True)
    assert "0 message(s) due now" in proc.stdout
    time.sleep(1.5)
    assert attempts(srv, qid) == count


def test_show_unknown_id(server_factory) -> None:
    srv: ServerProc = server_factory("qs")
    srv.start()
    for args in (["show", "NOSUCHID"], ["show", "1K13NT7DXCA00EB0"], ["hold", "NOSUCHID"],
                 ["release", "NOSUCHID"], ["delete", "NOSUCHID"]):
        proc = srv.cli("queue", *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, (args, proc.stderr)
        assert lines[0] == f"pymta: queue: no message {args[1]}"
    assert srv.running


def test_hold_incoming_keeps_mail_until_release_all(server_factory) -> None:
    """``PYMTA_HOLD_INCOMING=yes``: mail is accepted (fsynced, 250) but never attempted until
    ``queue release --all``; then it is delivered at once."""
    srv: ServerProc = server_factory("qh", PYMTA_HOLD_INCOMING="yes",
                                     PYMTA_QUEUE_SCAN_INTERVAL="0.2")
    srv.start()
    maildir = srv.mail_dir / "alice" / "new"
    qids = []
    for i in range(3):
        code, text = smtp_send(srv.port, SENDER, ["alice@example.com"],
                               make_message(SENDER, "alice@example.com", f"held {i}"))
        assert code == 250, text
        qids.append(queued_id(text))
    time.sleep(1.0)     # several queue scans: a held message is never picked up
    assert not maildir.exists() or list(maildir.iterdir()) == []
    data = srv.queue_json()
    assert sorted(e["id"] for e in data) == sorted(qids)
    assert all(e["held"] for e in data)

    proc = srv.cli("queue", "release", "--all", check=True)
    for qid in qids:
        assert f"{qid}: released" in proc.stdout
    wait_until(lambda: maildir.exists() and len(list(maildir.iterdir())) == 3, 10, 0.1,
               "the released messages in alice's maildir")
    srv.wait_queue_empty(10)
    proc = srv.cli("queue", "release")
    assert proc.returncode == 2 and "give message IDs or --all" in proc.stderr
    assert srv.stop() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_issue10_show_of_a_message_moved_to_corrupt_says_so(kind: str, tmp_path: Path,
                                                            monkeypatch, capsys) -> None:
    """``queue show ID`` whose envelope the store finds unusable (and moves aside to
    ``corrupt/``, or the SQLite store to its table ``set_aside``, while reading it for this
    very command), then the same id again, and a ``hold`` of it: each says where the message
    went instead of "no message"."""
    monkeypatch.setenv("PYMTA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MAIL_DOMAIN", "example.com")
    monkeypatch.delenv("PYMTA_CONFIG", raising=False)
    body = b"Subject: corrupt\r\n\r\nhi\r\n"

    async def enqueue() -> str:
        store = make_store(str(tmp_path / "queue"), kind, fsync=False)
        await store.start()
        try:
            now = time.time()
            env = Envelope(SENDER, [Recipient(FWD, FWD)], now, now, size=len(body))
            return await store.enqueue_bytes(env, body)
        finally:
            await store.aclose()

    qid = asyncio.run(enqueue())
    if kind == "sqlite":
        db = tmp_path / "queue" / "queue.db"
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE messages SET envelope = ? WHERE qid = ?",
                        (b"\x00 not an envelope", qid))
        where = f"was set aside in {db} "
    else:
        (tmp_path / "queue" / "env" / qid).write_bytes(b"\x00 not an envelope")
        where = f"was moved to {tmp_path / 'queue' / 'corrupt'}/"
    for argv in (["queue", "show", qid], ["queue", "show", qid], ["queue", "hold", qid]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"pymta: queue: message {qid} {where}" in err, (argv, err)
        assert "no message" not in err
    assert main(["queue", "show", "0000000000NONE0"]) == 1
    assert "pymta: queue: no message 0000000000NONE0" in capsys.readouterr().err
