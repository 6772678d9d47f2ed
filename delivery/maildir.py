"""Maildir delivery (https://cr.yp.to/proto/maildir.html).

Maildir needs no locking: a message is written under a unique name in ``tmp/``, fsynced, and
renamed into ``new/`` -- readers only ever see complete messages. We fsync the file before the
rename and ``new/`` after it, because the queue deletes its copy once we return: returning
before the data is durable could lose mail on a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from itertools import chain

from ._crlf import crlf_to_lf, read_chunks

_counter = itertools.count(1)  # next() on a count is atomic under the GIL: thread-safe


def _safe_hostname(hostname: str) -> str:
    """The maildir spec escapes '/' and ':' in the host part so names stay parseable."""
    host = hostname or socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def unique_name(hostname: str) -> str:
    """``<time>.M<usec>P<pid>Q<counter>.<host>``: unique per host, process and delivery."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{_safe_hostname(hostname)}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def deliver_maildir(mail_dir: str, mailbox: str, prefix: bytes, body_path: str,
                    hostname: str) -> str:
    """Deliver ``prefix`` + the spooled body into the maildir; return the name in ``new/``.

    ``mailbox`` is relative to ``mail_dir`` (the caller checked it stays inside). Raises
    OSError on any failure, leaving nothing behind in ``new/``.
    """
    root = os.path.join(mail_dir, mailbox)
    os.makedirs(root, mode=0o700, exist_ok=True)  # the maildir itself private, not just subdirs
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
    base = unique_name(hostname)
    tmp_path = os.path.join(root, "tmp", base)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = 0
        try:
            with open(body_path, "rb") as body:
                for piece in crlf_to_lf(chain((prefix,), read_chunks(body))):
                    _write_all(fd, piece)
                    size += len(piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        name = f"{base},S={size}"
        os.rename(tmp_path, os.path.join(root, "new", name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    _fsync_dir(os.path.join(root, "new"))
    return name
