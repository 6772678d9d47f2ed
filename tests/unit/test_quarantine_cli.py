"""``pymta quarantine ...`` against a real queue store on disk (each test with either store,
``kind``: the file layout or the SQLite database, which the command finds out itself), and the
quarantine marker contract (pymta/queue/quarantine.py) it relies on.

The CLI tests are plain functions: ``pymta quarantine release --rcpt`` and ``expire`` run
their own event loop (``asyncio.run``), as the command does when a user types it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pytest

from pymta.cli import quarantine as quarantine_cli
from pymta.cli.main import main
from pymta.cli.queue import body_file, close_store
from pymta.queue import quarantine
from pymta.queue.choice import KINDS, detect, make_store
from pymta.types import Envelope, RcptState, Recipient

BODY = (b"Received: from client.example.org by mx.example.com; Sat, 5 Dec 2026 10:00:00 +0000\r\n"
        b"From: alice@example.org\r\nSubject: invoice\r\n\r\nopen the attachment\r\n")
DAY = 86400.0


def open_store(root: Path) -> Any:
    """An open store of the kind ``root`` holds (the ``kind`` fixture made it)."""
    store = make_store(str(root), detect(str(root)), fsync=False)
    store.open()
    return store


def ids(root: Path) -> list[str]:
    store = open_store(root)
    try:
        return list(store.ids())
    finally:
        close_store(store)


def body(root: Path, qid: str) -> bytes:
    store = open_store(root)
    try:
        with body_file(store, qid) as fh:
            return fh.read()
    finally:
        close_store(store)


def enqueue(root: Path, rcpts: tuple[str, ...] = ("bob@example.com", "carol@example.com"),
            **kw: object) -> str:
    """A queued message (not quarantined), as the server leaves one."""
    async def go() -> str:
        store = open_store(root)
        await store.start()
        try:
            now = time.time()
            env = Envelope(sender="alice@example.org",
                           recipients=[Recipient(a, a) for a in rcpts],
                           received_at=now - 3600, next_attempt=now + 600,
                           **kw)  # type: ignore[arg-type]
            return await store.enqueue_bytes(env, BODY)
        finally:
            await store.aclose()

    return asyncio.run(go())


def quarantined(root: Path, kind: str = "virus", reason: str = "Eicar-Test-Signature", *,
                rcpts: tuple[str, ...] = ("bob@example.com", "carol@example.com"),
                blocked: list[int] | None = None, at: float | None = None) -> str:
    """A queued message marked as quarantined under its lock (quarantine.mark, then save)."""
    qid = enqueue(root, rcpts)
    store = open_store(root)
    lock = store.try_lock(qid)
    assert lock is not None
    try:
        env = store.load(qid)
        assert env is not None
        quarantine.mark(env, qid, reason, kind, blocked_indices=blocked, now=at)
        store.save_sync(qid, env)
    finally:
        lock.release()
        close_store(store)
    return qid


def load(root: Path, qid: str) -> Envelope | None:
    store = open_store(root)
    try:
        env: Envelope | None = store.load(qid)
        return env
    finally:
        close_store(store)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store of ``tmp_path/queue``, made (and closed) here, so ``detect`` finds it."""
    store = make_store(str(tmp_path / "queue"), request.param, fsync=False)
    store.open()
    close_store(store)
    assert detect(str(tmp_path / "queue")) == request.param
    return str(request.param)


@pytest.fixture
def state(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYMTA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MAIL_DOMAIN", "example.com")
    monkeypatch.delenv("PYMTA_CONFIG", raising=False)
    monkeypatch.delenv("PYMTA_QUARANTINE_LIFETIME", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------ list, show


def test_list_shows_quarantined_messages_only(state: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = state / "queue"
    assert main(["quarantine", "list"]) == 0
    assert capsys.readouterr().out == "quarantine is empty\n"
    plain = enqueue(root)
    held = enqueue(root, held=True)
    virus = quarantined(root, at=time.time() - 7200)
    spam = quarantined(root, "spam", "score 12.3 >= 6.9", blocked=[1])
    assert main(["quarantine", "list"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "AGE", "KIND", "SIZE", "SENDER", "->", "BLOCKED", "REASON"]
    assert len(lines) == 2 and not any(plain in ln or held in ln for ln in lines)
    by_id = {ln.split()[0]: ln for ln in lines}
    assert by_id[virus].split()[1:4] == ["2h00m", "virus", str(len(BODY))]
    assert by_id[virus].endswith("<alice@example.org> -> <bob@example.com>, "
                                 "<carol@example.com>  Eicar-Test-Signature")
    assert by_id[spam].endswith("-> <carol@example.com>  score 12.3 >= 6.9")

    assert main(["quarantine", "list", "--json"]) == 0
    items = {item["id"]: item for item in json.loads(capsys.readouterr().out)}
    assert set(items) == {virus, spam}
    assert set(items[spam]) == {"id", "kind", "reason", "quarantined_at", "sender",
                                "recipients", "blocked", "size"}
    assert items[spam]["kind"] == "spam" and items[spam]["reason"] == "score 12.3 >= 6.9"
    assert items[spam]["recipients"] == ["bob@example.com", "carol@example.com"]
    assert items[spam]["blocked"] == ["carol@example.com"]
    assert items[spam]["size"] == len(BODY) and items[spam]["sender"] == "alice@example.org"
    assert abs(items[virus]["quarantined_at"] - (time.time() - 7200)) < 60


def test_show_prints_the_envelope_fields_first(state: Path,
                                               capsysbinary: pytest.CaptureFixture[bytes]
                                               ) -> None:
    qid = quarantined(state / "queue", blocked=[1])
    assert main(["quarantine", "show", qid]) == 0
    fields = (f"X-Quarantine-ID: <{qid}>\r\n"
              "X-Envelope-From: <alice@example.org>\r\n"
              "X-Envelope-To: <bob@example.com>,\r\n <carol@example.com>\r\n"
              "X-Envelope-To-Blocked: <carol@example.com>\r\n").encode()
    assert capsysbinary.readouterr().out == fields + BODY
    assert main(["quarantine", "show", "--headers", qid]) == 0
    assert capsysbinary.readouterr().out == fields + BODY.split(b"\r\n\r\n")[0] + b"\r\n"


# ------------------------------------------------------------------------------ release


def test_release_delivers_every_blocked_recipient_now(state: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    root = state / "queue"
    qid = quarantined(root, at=time.time() - 20 * DAY)
    assert main(["quarantine", "release", qid]) == 0
    assert capsys.readouterr().out == (f"released {qid} to <bob@example.com>, "
                                       "<carol@example.com>\n")
    env = load(root, qid)
    assert env is not None and not env.held and not quarantine.is_quarantined(env)
    assert env.prepend == f"X-Quarantine-ID: <{qid}>\r\n"
    assert [r.address for r in env.pending()] == ["bob@example.com", "carol@example.com"]
    now = time.time()
    assert env.next_attempt <= now and now - env.received_at < 60   # due, and not expired
    assert main(["quarantine", "list"]) == 0
    assert capsys.readouterr().out == "quarantine is empty\n"


def test_release_one_recipient_queues_a_new_message(state: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = state / "queue"
    qid = quarantined(root, rcpts=("bob@example.com", "carol@example.com", "dan@example.com"),
                      blocked=[0, 1])
    assert main(["quarantine", "release", qid, "--rcpt", "CAROL@example.com"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(rf"released {qid} to <carol@example.com> \(queued as (\S+)\)\n", out)
    assert match, out
    new = match.group(1)
    copy = load(root, new)
    assert copy is not None and not copy.held and not quarantine.is_quarantined(copy)
    assert [r.address for r in copy.recipients] == ["carol@example.com"]
    assert copy.prepend == f"X-Quarantine-ID: <{qid}>\r\n"      # no X-Envelope-* fields
    assert body(root, new) == BODY

    original = load(root, qid)
    assert original is not None and quarantine.is_quarantined(original) and original.held
    assert [original.recipients[i].address for i in quarantine.blocked(original)] == [
        "bob@example.com"]
    assert "X-Envelope-To-Blocked: <bob@example.com>\r\n" in original.prepend
    assert "carol" not in original.prepend.split("X-Envelope-To-Blocked:")[1]

    # the last blocked recipient released: the quarantined message goes
    assert main(["quarantine", "release", qid, "--rcpt", "bob@example.com"]) == 0
    assert "released" in capsys.readouterr().out
    assert load(root, qid) is None and not (root / "data" / qid).exists()
    left = [q for q in ids(root) if q != new]
    assert len(left) == 1
    second = load(root, left[0])
    assert second is not None and [r.address for r in second.recipients] == ["bob@example.com"]


# ------------------------------------------------------------------------------ delete, expire


def test_delete_removes_quarantined_messages_only(state: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = state / "queue"
    qid = quarantined(root)
    plain = enqueue(root, held=True)
    assert main(["quarantine", "delete", qid, plain]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{qid}: deleted\n"
    assert captured.err == (f"pymta: quarantine: message {plain} is not quarantined "
                            f"(see 'pymta queue show {plain}')\n")
    assert load(root, qid) is None and not (root / "data" / qid).exists()
    assert load(root, plain) is not None


def test_expire_removes_old_quarantined_messages(state: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = state / "queue"
    now = time.time()
    old = quarantined(root, at=now - 10 * DAY)
    young = quarantined(root, at=now - 3600)
    plain = enqueue(root)                  # old or not, not the quarantine's to remove
    monkeypatch.setenv("PYMTA_QUARANTINE_LIFETIME", "0")
    assert main(["quarantine", "expire"]) == 0
    assert capsys.readouterr().out.startswith("0 quarantined message(s) expired")
    assert all(load(root, q) is not None for q in (old, young, plain))

    monkeypatch.setenv("PYMTA_QUARANTINE_LIFETIME", "7d")
    assert main(["quarantine", "expire"]) == 0
    assert capsys.readouterr().out == "1 quarantined message(s) expired\n"
    assert load(root, old) is None and not (root / "data" / old).exists()
    assert load(root, young) is not None and load(root, plain) is not None

    monkeypatch.delenv("PYMTA_QUARANTINE_LIFETIME")      # the default: 30 days
    assert main(["quarantine", "expire"]) == 0
    assert capsys.readouterr().out == "0 quarantined message(s) expired\n"


async def test_expire_skips_a_message_someone_holds(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "queue"
    now = time.time()
    qids = [await asyncio.to_thread(quarantined, root, at=now - 10 * DAY) for _ in range(2)]
    store = open_store(root)
    lock = store.try_lock(qids[0])              # a release in progress
    try:
        assert await quarantine.expire_quarantine(store, 7 * DAY, now) == [qids[1]]
        assert store.load(qids[0]) is not None and store.load(qids[1]) is None
    finally:
        lock.release()  # type: ignore[union-attr]
    try:
        assert await quarantine.expire_quarantine(store, 0, now + 100 * DAY) == []
        assert await quarantine.expire_quarantine(store, 7 * DAY, now) == [qids[0]]
    finally:
        await store.aclose()


# ------------------------------------------------------------------------------ errors


def test_errors_are_one_line(state: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = state / "queue"
    qid = quarantined(root, blocked=[0])
    plain = enqueue(root, held=True)
    cases = [
        (["show", "NOSUCH"], "quarantine: no message NOSUCH"),
        (["release", "../etc"], "quarantine: no message ../etc"),
        (["delete", "NOSUCH"], "quarantine: no message NOSUCH"),
        (["show", plain], f"quarantine: message {plain} is not quarantined"),
        (["release", plain], f"quarantine: message {plain} is not quarantined"),
        (["release", qid, "--rcpt", "carol@example.com"],      # a recipient, not blocked
         f"quarantine: message {qid}: carol@example.com is not a blocked recipient "
         "(blocked: <bob@example.com>)"),
        (["release", qid, "--rcpt", "bob@example.com", "--rcpt", "x@example.com"],
         f"quarantine: message {qid}: x@example.com is not a blocked recipient"),
    ]
    for args, text in cases:
        assert main(["quarantine", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(f"pymta: {text}") and err.count("\n") == 1, err
    env = load(root, qid)
    assert env is not None and quarantine.blocked(env) == [0]    # nothing changed
    assert len(ids(root)) == 2

    monkeypatch.setattr(quarantine_cli, "LOCK_TIMEOUT", 0.1)
    holder = open_store(root)
    lock = holder.try_lock(qid)                 # a delivery attempt, or another release
    try:
        assert main(["quarantine", "release", qid]) == 1
        assert capsys.readouterr().err == (f"pymta: quarantine: message {qid} is busy "
                                           "(being delivered); try again\n")
    finally:
        lock.release()  # type: ignore[union-attr]
        close_store(holder)

    assert main(["quarantine"]) == 2
    assert "which action?" in capsys.readouterr().err
    os.rename(root, state / "elsewhere")
    assert main(["quarantine", "list"]) == 1
    assert "no queue directory" in capsys.readouterr().err


def test_help() -> None:
    done = subprocess.run([sys.executable, "-m", "pymta", "quarantine", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == ""
    for action in ("list", "show", "release", "delete", "expire"):
        assert re.search(rf"^\s+{action}\s", done.stdout, re.MULTILINE), done.stdout


# ------------------------------------------------------------------------------ quarantine.py


ODD = ['"john doe"@example.com', '"a;b"@example.com', '"a,b"@example.com', 'a,b@example.com',
       'a:b@example.com', 'x(y)@example.com', 'a<b>@example.com', '"a b" <c@example.com>',
       'bob\r\nBcc: evil@example.net', 'a\u2028b@example.com', 'a\x85b@example.com',
       'tab\there@example.com', '"\\"q\\\\"@example.com', 'ü@bücher.example', 'no-domain',
       'a@b@example.com', 'x' * 400 + '@example.com', '']


def envelope(*addresses: str, prepend: str = "") -> Envelope:
    return Envelope(sender=addresses[0], recipients=[Recipient(a, a) for a in addresses],
                    received_at=1.0, next_attempt=1.0, prepend=prepend)


def check_fields(text: str) -> dict[str, str]:
    """The fields of a header block, unfolded; asserts its syntax line by line."""
    assert text.endswith("\r\n")
    fields: dict[str, str] = {}
    name = ""
    for line in text[:-2].split("\r\n"):
        assert "\r" not in line and "\n" not in line and len(line.encode()) <= 998
        assert not any(c in line for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        if line[:1] in (" ", "\t"):
            fields[name] += line
            continue
        name, colon, value = line.partition(":")
        assert colon and re.fullmatch(r"[!-9;-~]+", name), line
        fields[name] = value
    return fields


@pytest.mark.parametrize("address", ODD)
def test_odd_addresses_never_break_the_header_syntax(address: str) -> None:
    env = envelope(address, "ok@example.com", address)
    quarantine.mark(env, "QID1", "virus found", "virus", blocked_indices=[0, 2], now=5.0)
    fields = check_fields(env.prepend)
    assert list(fields) == ["X-Quarantine-ID", "X-Envelope-From", "X-Envelope-To",
                            "X-Envelope-To-Blocked"]
    assert fields["X-Envelope-From"].count("<") == fields["X-Envelope-From"].count(">") == 1
    # one address per recipient for any RFC 5322 reader, in order
    to = getaddresses([fields["X-Envelope-To"]])
    assert len(to) == 3 and to[1][1] == "ok@example.com"
    assert len(getaddresses([fields["X-Envelope-To-Blocked"]])) == 2
    assert quarantine.blocked(env) == [0, 2] and env.held
    assert env.extra[quarantine.QUARANTINED_AT] == "5.0"

    released = quarantine.release(env, [address] if address else None)
    assert [r.address for r in released] == [address, address]
    assert env.prepend == "X-Quarantine-ID: <QID1>\r\n"


def test_good_addresses_are_written_as_they_are() -> None:
    env = envelope('"john doe"@example.com', "ü@bücher.example", "bob@[192.0.2.1]")
    fields = quarantine.envelope_fields("QID1", env, env.recipients[1:])
    assert fields == ('X-Quarantine-ID: <QID1>\r\n'
                      'X-Envelope-From: <"john doe"@example.com>\r\n'
                      'X-Envelope-To: <"john doe"@example.com>,\r\n <ü@bücher.example>,\r\n'
                      ' <bob@[192.0.2.1]>\r\n'
                      'X-Envelope-To-Blocked: <ü@bücher.example>,\r\n <bob@[192.0.2.1]>\r\n')
    assert quarantine.envelope_fields("Q", envelope(""), []).startswith(
        "X-Quarantine-ID: <Q>\r\nX-Envelope-From: <>\r\n")


def test_release_keeps_other_folded_fields() -> None:
    others = ("Authentication-Results: mx.example.com;\r\n\tspf=pass smtp.mailfrom=a.example\r\n"
              "X-Spam-Status: Yes, score=12.3\r\n tests=FOO,BAR\r\n")
    env = envelope("alice@example.org", "bob@example.com", "carol@example.com",
                   "dan@example.com", prepend=others)
    env.recipients[0].state = RcptState.DELIVERED
    quarantine.mark(env, "QID1", "spam", "spam", blocked_indices=[1, 2])
    assert env.prepend.endswith(others)
    released = quarantine.release(env, ["BOB@example.com"])
    assert [r.address for r in released] == ["bob@example.com"]
    assert env.recipients == released and released[0].state is RcptState.PENDING
    assert env.prepend == "X-Quarantine-ID: <QID1>\r\n" + others
    assert not env.held and not quarantine.is_quarantined(env)
    assert quarantine.QUARANTINED_AT not in env.extra and quarantine.BLOCKED not in env.extra


def test_release_of_a_recipient_not_blocked_is_refused() -> None:
    env = envelope("alice@example.org", "bob@example.com")
    quarantine.mark(env, "QID1", "", "banned", blocked_indices=[1])
    assert env.extra[quarantine.QUARANTINE] == "quarantined"
    before = (list(env.recipients), env.prepend, dict(env.extra))
    with pytest.raises(ValueError):
        quarantine.release(env, ["alice@example.org"])
    assert (env.recipients, env.prepend, env.extra) == before


def test_keep_blocked_rewrites_the_blocked_field_in_place() -> None:
    env = envelope("alice@example.org", "bob@example.com", "carol@example.com",
                   prepend="Authentication-Results: x; none\r\n")
    quarantine.mark(env, "QID1", "virus", "virus")
    quarantine.keep_blocked(env, [2])
    fields = check_fields(env.prepend)
    assert list(fields) == ["X-Quarantine-ID", "X-Envelope-From", "X-Envelope-To",
                            "X-Envelope-To-Blocked", "Authentication-Results"]
    assert fields["X-Envelope-To-Blocked"] == " <carol@example.com>"
    assert quarantine.blocked(env) == [2]
    quarantine.keep_blocked(env, [])
    assert "X-Envelope-To-Blocked" not in check_fields(env.prepend)
    assert quarantine.blocked(env) == []


def test_expired_and_odd_markers() -> None:
    env = envelope("alice@example.org", "bob@example.com")
    assert not quarantine.expired(env, 1.0, 1e12)             # not quarantined
    quarantine.mark(env, "QID1", "virus", "virus", now=1000.0)
    assert quarantine.expired(env, 100.0, 1100.0)
    assert not quarantine.expired(env, 100.0, 1099.0)
    assert not quarantine.expired(env, 0, 1e12)                # 0: kept for ever
    env.extra[quarantine.BLOCKED] = "1 ² 7 x -1"               # an edited envelope file
    assert quarantine.blocked(env) == [1]
    env.extra[quarantine.QUARANTINED_AT] = "soon"
    assert quarantine.quarantined_at(env) == env.received_at


def test_issue12_review_queue_release_leaves_quarantined_messages_alone(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pymta queue release` must not deliver blocked content (with the X-Envelope-* fields
    naming every recipient): an ID is refused, --all skips it."""
    root = state / "queue"
    qid = quarantined(root)
    held = enqueue(root, held=True)
    assert main(["queue", "release", qid]) == 1
    err = capsys.readouterr().err
    assert err == (f"pymta: queue: {qid} is quarantined; use 'pymta quarantine release "
                   f"{qid}'\n")
    assert main(["queue", "release", "--all"]) == 0
    assert capsys.readouterr().out == f"{held}: released\n"
    env = load(root, qid)
    assert env is not None and env.held and quarantine.is_quarantined(env)
