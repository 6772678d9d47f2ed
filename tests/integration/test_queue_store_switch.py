"""Issue 14: a queue directory in the file layout is taken over by the SQLite store at the
first start with nothing lost, and the way back is refused while the database holds mail."""

from __future__ import annotations

import sqlite3
from email.parser import BytesHeaderParser
from pathlib import Path

from tests.integration import serverproc
from tests.integration.serverproc import ServerProc, make_message, queued_id, smtp_send

server_factory = serverproc.server_factory  # the fixture


def _maildir(srv: ServerProc) -> list[Path]:
    new = srv.mail_dir / "alice" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_a_file_layout_queue_is_converted_at_the_first_sqlite_start(server_factory) -> None:
    srv = server_factory(PYMTA_QUEUE_STORE="files", PYMTA_HOLD_INCOMING="yes",
                         PYMTA_WORKERS="1").start()
    qids = []
    for n in range(5):
        code, text = smtp_send(srv.port, "s@remote.test", ["alice@example.com"],
                               make_message("s@remote.test", "alice@example.com", f"old {n}"))
        assert code == 250, text
        qids.append(queued_id(text))
    assert srv.stop() == 0
    root = srv.state_dir / "queue"
    assert sorted((root / "env").iterdir()) and not (root / "queue.db").exists()

    srv.env.update(PYMTA_QUEUE_STORE="sqlite", PYMTA_HOLD_INCOMING="no")
    srv.start()
    with sqlite3.connect(f"file:{root / 'queue.db'}?mode=ro", uri=True) as db:
        held = {row[0] for row in db.execute("SELECT qid FROM messages")}
    assert held == set(qids), "every queued message is in the database"
    env_dir = root / "env"
    assert not env_dir.exists() or not any(env_dir.iterdir()), "converted files are removed"
    released = srv.cli("queue", "release", "--all")
    assert released.returncode == 0, released.stderr
    serverproc.wait_until(lambda: len(_maildir(srv)) == 5, 30, what="the converted messages")
    parser = BytesHeaderParser()
    subjects = sorted(str(parser.parsebytes(p.read_bytes())["Subject"]) for p in _maildir(srv))
    assert subjects == [f"old {n}" for n in range(5)]
    assert srv.stop() == 0


def test_going_back_to_files_is_refused_while_the_database_holds_mail(server_factory) -> None:
    srv = server_factory(PYMTA_QUEUE_STORE="sqlite", PYMTA_HOLD_INCOMING="yes",
                         PYMTA_WORKERS="1").start()
    code, text = smtp_send(srv.port, "s@remote.test", ["alice@example.com"],
                           make_message("s@remote.test", "alice@example.com", "kept"))
    assert code == 250, text
    assert srv.stop() == 0
    srv.env.update(PYMTA_QUEUE_STORE="files")
    srv.start(wait=False)
    assert srv.wait(30) == 2
    assert "PYMTA_QUEUE_STORE: 'files', but" in srv.stderr
    assert "Traceback" not in srv.stderr
