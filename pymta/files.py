"""Durable file writing, shared by the queue store and the mailbox writers (maildir, mbox).

Both promise the same thing: once they report success (``250`` to a client, a delivery
recorded), a crash cannot undo it. That takes the same few steps everywhere, and they are
here once.

* :func:`write_all`: ``os.write`` may write less than it was given (a signal, a pipe, a
  file system near its quota); the rest is written in further calls, and any error
  (``ENOSPC``, ``EIO``) is raised to the caller, which removes or truncates what it wrote.
  An interrupted call (``EINTR``) is retried by Python itself (PEP 475).
* A new file is durable only when its directory entry is, and a new directory only when
  the entry in *its* parent is: fsyncing a file and its directory is not enough for the
  first message of a new mailbox, whose ``tmp/new/cur`` (and maybe the mailbox directory
  and a domain directory above it) exist only in the page cache until their parents are
  flushed. A crash then loses the whole mailbox, message included, after the queue has
  already removed its copy. :func:`makedirs_durable` fsyncs the parent of every directory
  it creates before the caller goes on, as Postfix's ``make_dirs`` + ``fsync`` of the
  maildir does; only a mailbox's first delivery creates anything, so the hot path pays
  nothing. :func:`fsync_dir` flushes one directory, :func:`open_dir` opens one for a caller
  that keeps it open to fsync it often (the queue store's ``data/`` and ``env/``).
* :func:`replace_file`: a small file (a certificate, a key, DH parameters, a configuration
  dump) replaced whole: readers see the old content or the new, never a part, and a crash
  leaves one of the two.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["fsync_dir", "makedirs_durable", "open_dir", "replace_file", "write_all"]


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd``, in as many ``os.write`` calls as it takes.
    Raises OSError as ``os.write`` does; what was written before stays written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync it, give it ``mode``
    (``os.open``'s is filtered by the umask) and rename it over ``path``. Raises OSError;
    the temporary file is removed then."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def open_dir(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the directory ``path`` (not inherited by child processes),
    for ``os.fsync`` and the ``*at`` calls (``dir_fd=``)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries to disk."""
    fd = open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str, mode: int = 0o700) -> bool:
    """``os.makedirs(path, mode, exist_ok=True)``, with every directory it created made
    durable (its parent fsynced). True when something was created.

    As with ``os.makedirs``, ``mode`` applies to ``path`` itself; directories above it get
    the default mode. A directory another writer creates at the same moment counts as ours:
    its entry is fsynced too, so neither of us reports a delivery that a crash could undo.
    """
    path = os.path.abspath(path)
    missing: list[str] = []
    probe = path
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not missing:
        return False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode if directory == path else 0o777)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
    for directory in reversed(missing):
        fsync_dir(os.path.dirname(directory))
    return True


def create_locked(path: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """Create ``path`` exclusively (``flags`` | O_CREAT | O_EXCL) and ``flock`` it: a file
    a live process holds, which start-up clean-up of another process leaves alone.
    FileExistsError if it exists; any other failure leaves nothing behind."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd
