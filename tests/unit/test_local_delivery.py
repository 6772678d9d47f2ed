"""Maildir and mbox writers, the local delivery agent and the static router."""

from __future__ import annotations

import asyncio
import errno
import logging
import mailbox
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pymta.delivery import maildir as maildir_mod
from pymta.delivery import mbox as mbox_mod
from pymta.delivery._crlf import crlf_to_lf
from pymta.delivery.local import LocalDeliveryAgent, _failure_reply, delivery_prefix
from pymta.delivery.maildir import deliver_maildir
from pymta.delivery.mbox import MailboxLockTimeout, deliver_mbox
from pymta.delivery.router import StaticRouter
from pymta.types import (
    DeliveryAgent,
    Envelope,
    OutcomeKind,
    QueuedMessage,
    Recipient,
    Router,
)

PREFIX = b"Return-Path: <s@example.net>\r\nDelivered-To: r@example.com\r\n"
BODY = (
    b"Subject: test\r\n"
    b"From: s@example.net\r\n"
    b"\r\n"
    b"8-bit: caf\xc3\xa9 \xff\xfe\r\n"
    + b"L" * 998 + b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b"From the start of a line\r\n"
    b">From already quoted\r\n"
    b"Fromage is not quoted\r\n"
    b"lone\rcarriage return\r\n"
    b"last line\r\n"
)


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def quoted(data: bytes) -> bytes:
    """mboxo quoting the way a reader would expect it, for the test oracle."""
    return b"".join(b">" + ln if ln.startswith(b"From ") else ln
                    for ln in data.splitlines(keepends=True))


@pytest.fixture
def body(tmp_path: Path) -> str:
    path = tmp_path / "spool-body"
    path.write_bytes(BODY)
    return str(path)


# ------------------------------------------------------------------ CRLF conversion


def test_crlf_split_across_pieces() -> None:
    assert b"".join(crlf_to_lf([b"a\r", b"\nb\r", b"x\r", b"\n", b"\r"])) == b"a\nb\rx\n\r"


# ------------------------------------------------------------------ maildir


def test_maildir_delivery_content_exact(tmp_path: Path, body: str) -> None:
    mail_dir = tmp_path / "mail"
    name = deliver_maildir(str(mail_dir), "example.com/r/", PREFIX, body, "mx.example.com")
    root = mail_dir / "example.com" / "r"
    assert sorted(p.name for p in root.iterdir()) == ["cur", "new", "tmp"]
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "cur") == []
    assert os.listdir(root / "new") == [name]
    assert name.endswith(f".mx.example.com,S={len(lf(PREFIX + BODY))}")
    assert (root / "new" / name).read_bytes() == lf(PREFIX + BODY)
    assert (root.stat().st_mode & 0o777) == 0o700
    md = mailbox.Maildir(str(root), factory=None, create=False)
    [key] = md.keys()
    assert md.get_bytes(key) == lf(PREFIX + BODY)


def test_maildir_names_unique_and_hostname_escaped(tmp_path: Path, body: str) -> None:
    names = {deliver_maildir(str(tmp_path), "box/", b"", body, "h/o:st") for _ in range(5)}
    assert len(names) == 5
    assert all("h\\057o\\072st" in n for n in names)
    assert len(mailbox.Maildir(str(tmp_path / "box"), create=False)) == 5


def test_maildir_cr_at_chunk_boundary(tmp_path: Path) -> None:
    # the CR of a CRLF is the last byte of the first 64 KiB read, its LF the first of the next
    data = b"x" * (64 * 1024 - 1) + b"\r\n" + b"y\r\n" + b"\r"
    src = tmp_path / "b"
    src.write_bytes(data)
    name = deliver_maildir(str(tmp_path), "m/", b"", str(src), "h")
    assert (tmp_path / "m" / "new" / name).read_bytes() == b"x" * (64 * 1024 - 1) + b"\ny\n\r"


def test_maildir_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        deliver_maildir(str(tmp_path), "m/", b"", str(tmp_path / "missing"), "h")
    assert os.listdir(tmp_path / "m" / "new") == []
    assert os.listdir(tmp_path / "m" / "tmp") == []


# ------------------------------------------------------------------ maildir: O_TMPFILE + linkat


@pytest.fixture
def unnamed(monkeypatch: pytest.MonkeyPatch) -> maildir_mod._UnnamedFiles:
    """A fresh decision cache: what earlier tests refused does not leak into this one."""
    fresh = maildir_mod._UnnamedFiles()
    monkeypatch.setattr(maildir_mod, "UNNAMED", fresh)
    return fresh


def _entries(root: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(root / sub)) for sub in ("tmp", "new", "cur")}


def _fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


async def _commit_all(items: list[maildir_mod.PendingMaildirFile]) -> list[str]:
    committer = maildir_mod.MaildirCommitter()
    try:
        return list(await asyncio.gather(*(committer.commit(item) for item in items)))
    finally:
        await committer.aclose()


async def test_maildir_unnamed_files_invisible_until_the_batch_names_them(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles) -> None:
    root = tmp_path / "example.com" / "r"
    items = [maildir_mod.write_maildir_tmp(str(tmp_path), "example.com/r/", PREFIX, body, "mx")
             for _ in range(5)]
    # written, not named: no reader can see any of them, and nothing is in tmp/
    assert _entries(root) == {"tmp": [], "new": [], "cur": []}
    for item in items:
        assert item.tmp_path is None
        target = _fd_target(item.fd)       # "<new>/#<inode> (deleted)": in new/, no name
        assert target.startswith(f"{root / 'new'}/") and target.endswith(" (deleted)"), target
    names = await _commit_all(items)
    assert _entries(root) == {"tmp": [], "new": sorted(names), "cur": []}
    for name in names:
        assert (root / "new" / name).read_bytes() == lf(PREFIX + BODY)
        assert name.endswith(f".mx,S={len(lf(PREFIX + BODY))}")
        assert (root / "new" / name).stat().st_nlink == 1
    for item in items:                      # every descriptor closed by the batch
        with pytest.raises(OSError):
            os.fstat(item.fd)
    assert len(mailbox.Maildir(str(root), factory=None, create=False)) == 5
    assert unnamed.refused == set()


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL])
async def test_maildir_falls_back_to_tmp_when_o_tmpfile_is_refused(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        refusal: int) -> None:
    tries: list[str] = []

    def refuse(new_dir: str) -> int:
        tries.append(new_dir)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(maildir_mod, "_open_unnamed", refuse)
    root = tmp_path / "r"
    with caplog.at_level(logging.WARNING, logger="pymta"):
        items = [maildir_mod.write_maildir_tmp(str(tmp_path), "r/", PREFIX, body, "mx")
                 for _ in range(4)]
        # the classic way: whole files under tmp/, none in new/ yet
        assert _entries(root)["tmp"] == sorted(os.path.basename(str(i.tmp_path)) for i in items)
        assert _entries(root)["new"] == []
        names = await _commit_all(items)
        other = maildir_mod.deliver_maildir(str(tmp_path), "other/", b"", body, "mx")
    assert _entries(root) == {"tmp": [], "new": sorted(names), "cur": []}
    for name in names:
        assert (root / "new" / name).read_bytes() == lf(PREFIX + BODY)
    assert (tmp_path / "other" / "new" / other).read_bytes() == lf(BODY)
    # decided once for the file system (the other maildir is on it too), logged once
    assert len(tries) == 1
    assert unnamed.refused == {os.stat(tmp_path).st_dev}
    assert caplog.text.count("refused O_TMPFILE") == 1, caplog.text


def test_maildir_other_open_errors_are_not_a_refusal(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(new_dir: str) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", new_dir)

    monkeypatch.setattr(maildir_mod, "_open_unnamed", denied)
    (tmp_path / "r" / "new").mkdir(parents=True)
    with pytest.raises(PermissionError):
        maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    assert unnamed.refused == set()     # a fault to report (temporary), not a reason to fall back
    assert os.listdir(tmp_path / "r" / "new") == []


def test_maildir_without_proc_uses_tmp(tmp_path: Path, body: str,
                                       unnamed: maildir_mod._UnnamedFiles,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(maildir_mod, "_PROC_FD", str(tmp_path / "no-proc" / "self" / "fd"))
    with caplog.at_level(logging.WARNING, logger="pymta"):
        item = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
        assert item.tmp_path is not None and os.path.exists(item.tmp_path)
        [name] = maildir_mod.commit_batch([item])
        maildir_mod.deliver_maildir(str(tmp_path), "r/", b"", body, "mx")
    assert (tmp_path / "r" / "new" / str(name)).read_bytes() == lf(BODY)
    assert os.listdir(tmp_path / "r" / "tmp") == []
    assert caplog.text.count("is not mounted") == 1, caplog.text


def test_maildir_link_never_replaces_a_taken_name(tmp_path: Path, body: str,
                                                  unnamed: maildir_mod._UnnamedFiles) -> None:
    item = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    taken = tmp_path / "r" / "new" / item.name
    taken.write_bytes(b"someone else's message\n")
    [name] = maildir_mod.commit_batch([item])
    assert isinstance(name, str) and name != taken.name
    assert taken.read_bytes() == b"someone else's message\n"
    assert (tmp_path / "r" / "new" / name).read_bytes() == lf(BODY)


def test_review_the_tmp_fallback_never_replaces_a_taken_name(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of issue 14: on the tmp/ path (NFS, no O_TMPFILE) the rename replaced a message
    of the same name in new/ (two hosts of one name sharing a maildir). Now link, then unlink
    the tmp/ name: a taken name gets a new one."""
    monkeypatch.setattr(maildir_mod, "_open_unnamed", lambda d: (_ for _ in ()).throw(
        OSError(errno.EOPNOTSUPP, "not here")))
    item = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    assert item.tmp_path is not None
    taken = tmp_path / "r" / "new" / item.name
    taken.write_bytes(b"someone else's message\n")
    [name] = maildir_mod.commit_batch([item])
    assert isinstance(name, str) and name != taken.name
    assert taken.read_bytes() == b"someone else's message\n"
    assert (tmp_path / "r" / "new" / name).read_bytes() == lf(BODY)
    assert os.listdir(tmp_path / "r" / "tmp") == []


def test_review_an_error_making_a_new_maildir_is_no_o_tmpfile_refusal(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of issue 14: an EINVAL while making a new maildir durable was taken for the
    file system refusing O_TMPFILE (cached for good) and the message written anyway. Now the
    delivery fails with that error and O_TMPFILE stays in use."""
    real = maildir_mod._make_maildir

    def failing(root: str) -> None:
        real(root)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(maildir_mod, "_make_maildir", failing)
    with pytest.raises(OSError):
        maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    monkeypatch.setattr(maildir_mod, "_make_maildir", real)
    item = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    assert item.tmp_path is None, "O_TMPFILE must still be used on this file system"
    maildir_mod.commit_batch([item])


def test_maildir_link_refused_fails_that_delivery_and_the_next_uses_tmp(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """linkat refused by the system (a security module, say): the delivery is a temporary
    failure with nothing left behind, and the retry goes through tmp/ and succeeds."""
    item = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    real_link = os.link

    def link(src: str, dst: str, **kw: object) -> None:
        if src.startswith("/proc/self/fd/"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_link(src, dst, **kw)   # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    [result] = maildir_mod.commit_batch([item])
    assert isinstance(result, PermissionError)
    assert _entries(tmp_path / "r") == {"tmp": [], "new": [], "cur": []}
    retry = maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
    assert retry.tmp_path is not None
    [name] = maildir_mod.commit_batch([retry])
    assert _entries(tmp_path / "r") == {"tmp": [], "new": [str(name)], "cur": []}


@pytest.mark.parametrize("way", ["unnamed", "tmp"])
def test_maildir_new_dir_fsync_error_fails_the_batch_and_removes_it(
        tmp_path: Path, body: str, unnamed: maildir_mod._UnnamedFiles,
        monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    if way == "tmp":
        monkeypatch.setattr(maildir_mod, "_open_unnamed", lambda d: (_ for _ in ()).throw(
            OSError(errno.EOPNOTSUPP, "not here")))
    items = [maildir_mod.write_maildir_tmp(str(tmp_path), "r/", b"", body, "mx")
             for _ in range(3)]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results = maildir_mod.commit_batch(items)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
    # linked or renamed, but maybe not durable: not delivered, and nothing left to deliver twice
    assert _entries(tmp_path / "r") == {"tmp": [], "new": [], "cur": []}


_CHILD = """
import os, sys, time
from pymta.delivery import maildir
if sys.argv[3] == "tmp":
    def refuse(new_dir):
        raise OSError(95, "Operation not supported")
    maildir._open_unnamed = refuse
item = maildir.write_maildir_tmp(sys.argv[1], "r/", b"", sys.argv[2], "mx")
print(item.fd, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("way", ["unnamed", "tmp"])
def test_maildir_sigkill_between_write_and_link_leaves_nothing(tmp_path: Path,
                                                               way: str) -> None:
    """A crash after the message was written and before it was named: the unnamed file dies
    with the process. (Through tmp/ it stays there: the test tells the two apart.)"""
    src = tmp_path / "body"
    src.write_bytes(b"Subject: crash\r\n\r\n" + b"z" * 998 * 1024 + b"\r\n")   # ~1 MB
    mail = tmp_path / "mail"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(mail), str(src), way],
                             stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert child.stdout is not None
        fd = int(child.stdout.readline())
        written = os.readlink(f"/proc/{child.pid}/fd/{fd}")
        size = os.stat(f"/proc/{child.pid}/fd/{fd}").st_size
        assert size == len(lf(src.read_bytes()))    # the whole message is written ...
    finally:
        child.kill()
        child.wait()
    leftovers = _entries(mail / "r")
    if way == "unnamed":
        assert written.startswith(f"{mail / 'r' / 'new'}/#") and written.endswith("(deleted)")
        assert leftovers == {"tmp": [], "new": [], "cur": []}      # ... and gone with it
    else:
        assert leftovers["new"] == [] and len(leftovers["tmp"]) == 1


# ------------------------------------------------------------------ mbox


def test_mbox_two_deliveries_appended(tmp_path: Path, body: str) -> None:
    now = time.mktime((2024, 3, 1, 12, 0, 0, 0, 0, -1))
    deliver_mbox(str(tmp_path), "sub/dir/r.mbox", "s@example.net", PREFIX, body, now)
    deliver_mbox(str(tmp_path), "sub/dir/r.mbox", "", b"", body, now)
    path = tmp_path / "sub" / "dir" / "r.mbox"
    data = path.read_bytes()
    stamp = time.asctime(time.localtime(now)).encode()
    first = b"From s@example.net " + stamp + b"\n" + quoted(lf(PREFIX + BODY)) + b"\n"
    second = b"From MAILER-DAEMON " + stamp + b"\n" + quoted(lf(BODY)) + b"\n"
    assert data == first + second
    assert b"\n>From the start of a line\n" in data
    assert b"\n>From already quoted\n" in data  # mboxo: not quoted twice
    assert b"\nFromage is not quoted\n" in data
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not (tmp_path / "sub" / "dir" / "r.mbox.lock").exists()

    box = mailbox.mbox(str(path), create=False)
    msgs = [box.get_bytes(k) for k in box.iterkeys()]
    assert msgs == [quoted(lf(PREFIX + BODY)), quoted(lf(BODY))]
    assert box[0].get_from().startswith("s@example.net ")
    assert box[1].get_from().startswith("MAILER-DAEMON ")


def test_mbox_adds_missing_newlines(tmp_path: Path) -> None:
    (tmp_path / "box").write_bytes(b"From x Thu Jan  1 00:00:00 1970\nno final newline")
    src = tmp_path / "b"
    src.write_bytes(b"Subject: x\r\n\r\nno newline at end")
    deliver_mbox(str(tmp_path), "box", "a@b", b"", str(src), 0.0)
    data = (tmp_path / "box").read_bytes()
    assert data.startswith(b"From x Thu Jan  1 00:00:00 1970\nno final newline\nFrom a@b ")
    assert data.endswith(b"\n\nno newline at end\n\n")
    assert len(mailbox.mbox(str(tmp_path / "box"), create=False)) == 2


def test_mbox_long_line_not_quoted_mid_line(tmp_path: Path) -> None:
    # "From " lands exactly at a 64 KiB readline cut: it is not the start of a line
    line = b"a" * (64 * 1024) + b"From not a line start\r\n"
    src = tmp_path / "b"
    src.write_bytes(b"\r\n" + line + b"From yes\r\n")
    deliver_mbox(str(tmp_path), "box", "a@b", b"", str(src), 0.0)
    data = (tmp_path / "box").read_bytes()
    assert data.split(b"\n", 1)[1] == b"\n" + lf(line) + b">From yes\n\n"


def test_mbox_stale_dotlock_is_removed(tmp_path: Path, body: str) -> None:
    lock = tmp_path / "box.lock"
    lock.write_bytes(b"12345\n")
    old = time.time() - 600
    os.utime(lock, (old, old))
    deliver_mbox(str(tmp_path), "box", "a@b", b"", body, 0.0, lock_timeout=2)
    assert not lock.exists()
    assert len(mailbox.mbox(str(tmp_path / "box"), create=False)) == 1


def test_mbox_fresh_dotlock_times_out_and_is_kept(tmp_path: Path, body: str) -> None:
    (tmp_path / "box").write_bytes(b"")
    lock = tmp_path / "box.lock"
    lock.write_bytes(f"{os.getppid()}\n".encode())  # a live process holds it
    with pytest.raises(MailboxLockTimeout):
        deliver_mbox(str(tmp_path), "box", "a@b", b"", body, 0.0, lock_timeout=0.3)
    assert lock.exists()
    assert (tmp_path / "box").read_bytes() == b""


def test_mbox_dotlock_of_a_dead_process_is_removed(tmp_path: Path, body: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now names no process
    lock = tmp_path / "box.lock"
    lock.write_bytes(f"{child.pid}\n".encode())
    deliver_mbox(str(tmp_path), "box", "a@b", b"", body, 0.0, lock_timeout=2.0)
    assert not lock.exists()
    assert (tmp_path / "box").read_bytes().startswith(b"From a@b ")


def test_mbox_wait_for_a_lock_ends_when_stopping(tmp_path: Path, body: str) -> None:
    lock = tmp_path / "box.lock"
    lock.write_bytes(f"{os.getppid()}\n".encode())
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(MailboxLockTimeout):
        deliver_mbox(str(tmp_path), "box", "a@b", b"", body, 0.0, lock_timeout=30, stop=stop)
    assert time.monotonic() - started < 5


def test_mbox_failure_truncates_to_original_size(tmp_path: Path, monkeypatch) -> None:
    original = b"From x Thu Jan  1 00:00:00 1970\nold message\n\n"
    (tmp_path / "box").write_bytes(original)
    src = tmp_path / "b"
    src.write_bytes(b"line\r\n" * 50_000)  # > 64 KiB: several writes
    real_write = mbox_mod.write_all
    calls = []

    def failing_write(fd: int, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(mbox_mod, "write_all", failing_write)
    with pytest.raises(OSError) as info:
        deliver_mbox(str(tmp_path), "box", "a@b", b"", str(src), 0.0)
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "box").read_bytes() == original
    assert not (tmp_path / "box.lock").exists()


# ------------------------------------------------------------------ LocalDeliveryAgent


def message(tmp_path: Path, rcpts: list[Recipient], sender: str = "s@example.net"
            ) -> QueuedMessage:
    path = tmp_path / "body"
    path.write_bytes(BODY)
    env = Envelope(sender=sender, recipients=rcpts, received_at=0.0, next_attempt=0.0)
    return QueuedMessage("Q1", env, str(path))


async def test_agent_outcomes(tmp_path: Path) -> None:
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    (mail_dir / "blocker").write_bytes(b"a regular file, not a directory")
    rcpts = [
        Recipient("md@example.com", "md@example.com", mailbox="md/"),
        Recipient("mb@example.com", "alias@example.com", mailbox="mb@example.com"),
        Recipient("none@example.com", "none@example.com", mailbox=None),
        Recipient("bad@example.com", "bad@example.com", mailbox="blocker/inbox"),
        Recipient("bad2@example.com", "bad2@example.com", mailbox="blocker/md/"),
        Recipient("evil@example.com", "evil@example.com", mailbox="../escape"),
    ]
    agent = LocalDeliveryAgent(str(mail_dir), "mx.example.com")
    assert isinstance(agent, DeliveryAgent)
    outcomes = await agent.deliver(message(tmp_path, rcpts), rcpts)
    by = {o.recipient: o for o in outcomes}
    assert len(outcomes) == len(rcpts) == len(by)

    assert by["md@example.com"].kind is OutcomeKind.DELIVERED
    assert str(by["md@example.com"].reply) == "250 2.0.0 delivered to maildir"
    assert by["md@example.com"].relay == "local"
    assert str(by["mb@example.com"].reply) == "250 2.0.0 delivered to mbox"
    assert by["none@example.com"].kind is OutcomeKind.PERMANENT
    assert str(by["none@example.com"].reply) == "550 5.1.1 no mailbox"
    for addr in ("bad@example.com", "bad2@example.com"):
        assert by[addr].kind is OutcomeKind.TEMPORARY
        assert (by[addr].reply.code, by[addr].reply.enhanced) == (451, "4.3.0")
    assert by["evil@example.com"].kind is OutcomeKind.TEMPORARY
    assert not (tmp_path / "escape").exists()

    [name] = os.listdir(mail_dir / "md" / "new")
    prefix = b"Return-Path: <s@example.net>\nDelivered-To: md@example.com\n"
    assert (mail_dir / "md" / "new" / name).read_bytes() == prefix + lf(BODY)
    box = mailbox.mbox(str(mail_dir / "mb@example.com"), create=False)
    [msg] = list(box)
    assert msg["Delivered-To"] == "mb@example.com"
    assert msg["Return-Path"] == "<s@example.net>"


async def test_agent_delivers_a_body_in_memory_without_asking_for_a_file(
        tmp_path: Path) -> None:
    """A first attempt's body comes in memory (issue 14): the maildir and mbox writers read
    it from there; a path is made only for agents that ask for one."""
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    (mail_dir / "blocker").write_bytes(b"a regular file, not a directory")
    rcpts = [Recipient("md@example.com", "md@example.com", mailbox="md/"),
             Recipient("mb@example.com", "mb@example.com", mailbox="mb"),
             Recipient("bad@example.com", "bad@example.com", mailbox="blocker/md/")]
    env = Envelope(sender="s@example.net", recipients=rcpts, received_at=0.0,
                   next_attempt=0.0)

    def no_file() -> str:
        raise AssertionError("a file was asked for")

    msg = QueuedMessage("Q1", env, body=BODY, materialize=no_file)
    outcomes = await LocalDeliveryAgent(str(mail_dir), "h").deliver(msg, rcpts)
    by = {o.recipient: o.kind for o in outcomes}
    assert by == {"md@example.com": OutcomeKind.DELIVERED,
                  "mb@example.com": OutcomeKind.DELIVERED,
                  "bad@example.com": OutcomeKind.TEMPORARY}   # its own failure only
    [name] = os.listdir(mail_dir / "md" / "new")
    prefix = b"Return-Path: <s@example.net>\nDelivered-To: md@example.com\n"
    assert (mail_dir / "md" / "new" / name).read_bytes() == prefix + lf(BODY)
    [got] = list(mailbox.mbox(str(mail_dir / "mb"), create=False))
    assert got["Delivered-To"] == "mb@example.com"


async def test_agent_null_sender(tmp_path: Path) -> None:
    rcpts = [Recipient("r@example.com", "r@example.com", mailbox="r")]
    [out] = await LocalDeliveryAgent(str(tmp_path), "h").deliver(
        message(tmp_path, rcpts, sender=""), rcpts)
    assert out.kind is OutcomeKind.DELIVERED
    data = (tmp_path / "r").read_bytes()
    assert data.startswith(b"From MAILER-DAEMON ")
    assert b"\nReturn-Path: <>\n" in data


def test_delivery_prefix() -> None:
    assert delivery_prefix("s@x", "r@y") == b"Return-Path: <s@x>\r\nDelivered-To: r@y\r\n"


@pytest.mark.parametrize(("exc", "code", "enhanced"), [
    (OSError(errno.ENOSPC, "No space left on device"), 452, "4.2.2"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 452, "4.2.2"),
    (OSError(errno.EIO, "Input/output error"), 451, "4.3.0"),
    (MailboxLockTimeout(errno.ETIMEDOUT, "locked"), 451, "4.3.0"),
    (RuntimeError("boom"), 451, "4.3.0"),
])
def test_failure_replies_are_temporary(exc: Exception, code: int, enhanced: str) -> None:
    reply = _failure_reply(exc, "mbox", "box")
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.is_temporary


# ------------------------------------------------------------------ StaticRouter


async def test_static_router(tmp_path: Path) -> None:
    local = LocalDeliveryAgent(str(tmp_path), "h")
    remote = LocalDeliveryAgent(str(tmp_path), "other")
    loc = Recipient("a@example.com", "a@example.com", local=True, mailbox="a")
    rem = Recipient("b@gmail.com", "x@example.com", local=False)

    router = StaticRouter(local, remote)
    assert isinstance(router, Router)
    assert router.route(loc) == ("local", local)
    assert router.route(rem) == ("relay", remote)

    key, agent = StaticRouter(local).route(rem)
    assert key == "unroutable"
    [out] = await agent.deliver(message(tmp_path, [rem]), [rem])
    assert out.kind is OutcomeKind.TEMPORARY
    assert str(out.reply) == "451 4.4.0 No relay transport configured for remote recipients"
    assert out.relay == "none"


def test_mbox_waits_for_fcntl_lock_of_another_process(tmp_path: Path, body: str) -> None:
    box = tmp_path / "box"
    box.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(30)\n", str(box)],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxLockTimeout):
            deliver_mbox(str(tmp_path), "box", "a@b", b"", body, 0.0, lock_timeout=0.3)
        assert box.read_bytes() == b""
        assert not (tmp_path / "box.lock").exists()  # our dotlock was released
    finally:
        holder.kill()
        holder.wait()


def test_mbox_concurrent_threads_do_not_interleave(tmp_path: Path, body: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: deliver_mbox(str(tmp_path), "box", f"s{i}@x", b"", body, 0.0),
                      range(16)))
    box = mailbox.mbox(str(tmp_path / "box"), create=False)
    assert [box.get_bytes(k) for k in box.iterkeys()] == [quoted(lf(BODY))] * 16
