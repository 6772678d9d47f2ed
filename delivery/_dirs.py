"""Durable directory creation for the mailbox writers (maildir, mbox).

A new file is durable only when its directory entry is, and a new directory only when the
entry in *its* parent is: fsyncing the file and ``new/`` is not enough for the first message
of a new mailbox, whose ``tmp/new/cur`` (and maybe the mailbox directory and a domain
directory above it) exist only in the page cache until their parents are flushed. A crash
then loses the whole mailbox, message included, after the queue has already removed its copy.
So every directory created here has its parent fsynced before the caller goes on, as Postfix's
``make_dirs`` + ``fsync`` of the maildir does. This costs nothing on the hot path: only a
mailbox's first delivery creates anything.
"""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Flush a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
