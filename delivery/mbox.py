"""mbox delivery, compatible with Postfix ``local`` and the MUAs that read the same files.

An mbox is one shared file, so every writer must agree on locking. We take both locks the
Unix world uses -- a ``<file>.lock`` dotlock (works over NFS and with old MUAs) and a POSIX
``lockf`` lock (Dovecot, mutt) -- plus a per-process thread lock, because POSIX locks do not
exclude threads of one process and are dropped when *any* descriptor of the file is closed.

The format is "mboxo" as written by Postfix: a ``From sender date`` line, the message with
LF line endings and lines starting with ``From `` quoted as ``>From ``, then a blank line.
A failed delivery truncates the file back to its old size, so readers never see half a
message and a retry does not leave a duplicate fragment behind. A new mbox file (and any
directory made for it) is durable in its parent directory before the delivery counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from itertools import chain

from pymta.files import fsync_dir, makedirs_durable, write_all

from ._crlf import CHUNK, BodySource, crlf_to_lf, open_body, read_lines

LOCK_TIMEOUT = 20.0      # seconds; Postfix: deliver_lock_attempts(20) x deliver_lock_delay(1s)
STALE_LOCK_AGE = 300.0   # a dotlock older than this is left over from a crash
_POLL = 0.1
EMPTY_LOCK_AGE = 5.0

_thread_locks = [threading.Lock() for _ in range(64)]  # striped: bounded memory, per path


class MailboxLockTimeout(TimeoutError):
    """The mailbox stayed locked by someone else for too long (a temporary condition)."""


def _thread_lock(path: str) -> threading.Lock:
    return _thread_locks[zlib.crc32(os.path.abspath(path).encode("utf-8", "surrogateescape"))
                         % len(_thread_locks)]


def acquire_dotlock(path: str, timeout: float = LOCK_TIMEOUT,
                    stale_after: float = STALE_LOCK_AGE,
                    stop: threading.Event | None = None) -> str:
    """Create ``<path>.lock`` exclusively, waiting up to ``timeout``; return the lock path.

    A lock file older than ``stale_after`` seconds is assumed abandoned and removed.
    """
    lock = path + ".lock"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            try:
                if (time.time() - os.stat(lock).st_mtime > stale_after
                        or _owner_is_dead(lock)):
                    os.unlink(lock)
                    continue
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                raise MailboxLockTimeout(errno.ETIMEDOUT,
                                         "mailbox is locked (dotlock)", lock) from None
            time.sleep(_POLL)
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return lock


def _owner_is_dead(lock: str) -> bool:
    """True when the lock file names a process id that no longer exists on this machine.

    A crash (or SIGKILL) between creating and removing the dot-lock leaves the file behind;
    waiting out its age would stall every delivery to that mailbox for minutes. Lock files
    written by other programs may hold no pid at all: those are left to the age rule.
    """
    try:
        with open(lock, "rb") as f:
            text = f.read(32).strip()
        if not text:
            # Killed between creating the file and writing its pid: abandoned once it is
            # older than a writer could ever take for those two steps.
            return time.time() - os.stat(lock).st_mtime > EMPTY_LOCK_AGE
        pid = int(text)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lockf(fd: int, path: str, deadline: float, stop: threading.Event | None = None) -> None:
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            raise MailboxLockTimeout(errno.ETIMEDOUT, "mailbox is locked (fcntl)", path)
        time.sleep(_POLL)


def from_line(sender: str, now: float) -> bytes:
    """``From <sender> <ctime>``; whitespace and controls dropped so the line stays parseable."""
    who = "".join(c for c in sender if c.isprintable() and not c.isspace()) or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.localtime(now))}\n".encode("utf-8", "surrogateescape")


def quote_from(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Prefix ``>`` to lines starting with ``From `` (mboxo); input pieces are line-bounded."""
    at_bol = True
    pending = b""
    for piece in pieces:
        if pending:
            piece = pending + piece
            pending = b""
        if at_bol and len(piece) < 5 and not piece.endswith(b"\n"):
            pending = piece  # too short to tell yet: wait for the rest of the line
            continue
        if at_bol and piece.startswith(b"From "):
            yield b">"
        yield piece
        at_bol = piece.endswith(b"\n")
    if pending:
        yield pending


def deliver_mbox(mail_dir: str, mailbox: str, sender: str, prefix: bytes, body: BodySource,
                 now: float, lock_timeout: float = LOCK_TIMEOUT,
                 stop: threading.Event | None = None) -> None:
    """Append one message to ``<mail_dir>/<mailbox>`` under both locks; raise OSError on failure.

    ``stop`` ends a wait for a lock early (the server is stopping; the message stays queued).
    ``mailbox`` is relative to ``mail_dir`` (the caller checked it stays inside). ``now`` is the
    timestamp for the ``From`` line. On any failure the file is truncated to its old size.
    """
    path = os.path.join(mail_dir, mailbox)
    parent = os.path.dirname(path) or "."
    makedirs_durable(parent, 0o700)     # a new directory is durable before the file in it
    deadline = time.monotonic() + lock_timeout
    thread_lock = _thread_lock(path)
    while not thread_lock.acquire(timeout=_POLL):
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            raise MailboxLockTimeout(errno.ETIMEDOUT, "mailbox is locked (in process)", path)
    try:
        lock = acquire_dotlock(path, timeout=max(0.0, deadline - time.monotonic()), stop=stop)
        try:
            created = not os.path.exists(path)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _lockf(fd, path, deadline, stop)
                _append(fd, sender, prefix, body, now)
            finally:
                os.close(fd)  # also releases the lockf lock
            if created:
                fsync_dir(parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
    finally:
        thread_lock.release()


def _append(fd: int, sender: str, prefix: bytes, body: BodySource,
            now: float) -> None:
    """Write the message at the end of ``fd``; on failure cut the file back and re-raise."""
    size = os.fstat(fd).st_size
    try:
        buf = bytearray()
        # pread on our own fd: opening (and closing) a second descriptor would drop the
        # lockf lock, which POSIX ties to the process, not the descriptor
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            buf += b"\n"  # a previous writer left no final newline
        buf += from_line(sender, now)
        last = b"\n"
        with open_body(body) as reader:
            for piece in quote_from(crlf_to_lf(chain((prefix,), read_lines(reader)))):
                buf += piece
                last = piece
                if len(buf) >= CHUNK:
                    write_all(fd, buf)
                    buf.clear()
        if not last.endswith(b"\n"):
            buf += b"\n"
        buf += b"\n"
        write_all(fd, buf)
        os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            pass
        raise
