"""Free space of the queue's file system, checked before a client starts sending.

Postfix refuses ``MAIL FROM`` with ``452 4.3.1 Insufficient system storage`` when the queue
file system has less free space than ``queue_minfree``, and never less than 1.5 times
``message_size_limit`` (so one more message of the largest size can always be finished), or
when a declared ``SIZE`` would not fit (more than the free space above that reserve, or more
than half of all free space). A read-only queue file system gets ``451 4.3.0`` there too:
nothing could be queued, and the client should not send the message first to learn that.

Implementation summary. ``statvfs`` is cheap but not free, and this check runs for every
``MAIL FROM``; the figure is cached for ``ttl`` seconds (one ``statvfs`` per second at most on
the hot path). A write that fails with ``ENOSPC`` calls ``invalidate`` so that the next
``MAIL FROM`` sees the full disk at once, and freed space is seen within ``ttl``. The answer
is advisory: a disk can still fill up during the transaction, and the store's write and
flush errors remain the real guard (``452 4.3.1`` at end of data).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pymta.queue")

# errno values meaning "no room": the file system is full, or the user's quota is.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(err: BaseException | None) -> bool:
    """True if ``err`` (or an error it was raised from) says the disk or a quota is full."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def reserve_for(message_size_limit: int, queue_minfree: int = 0) -> int:
    """Bytes that must stay free before a new message is taken (Postfix's rule)."""
    return max(queue_minfree, int(1.5 * message_size_limit))


@dataclass(frozen=True, slots=True)
class Sample:
    """One ``statvfs`` of the queue: bytes an unprivileged writer may still use, and whether
    the file system (or its mount) is read-only."""

    free: int
    read_only: bool


class FreeSpace:
    """Cached free space of the file system holding ``path``."""

    def __init__(self, path: str, ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.path = path
        self.ttl = ttl
        self._clock = clock
        self._statvfs = statvfs
        self._sample: Sample | None = None
        self._expires = 0.0
        self.calls = 0          # statvfs calls made, for tests and benchmarks

    def sample(self) -> Sample | None:
        """The current figure (at most ``ttl`` old); None if ``statvfs`` itself fails, which
        is no reason to refuse mail: the writes will tell."""
        now = self._clock()
        if self._sample is not None and now < self._expires:
            return self._sample
        try:
            st = self._statvfs(self.path)
        except OSError as e:
            log.warning("queue %s: statvfs failed: %s", self.path, e)
            self._sample, self._expires = None, now + self.ttl
            return None
        self.calls += 1
        self._sample = Sample(st.f_bavail * st.f_frsize, bool(st.f_flag & os.ST_RDONLY))
        self._expires = now + self.ttl
        return self._sample

    def invalidate(self) -> None:
        """Forget the cached figure (a write just failed for lack of space)."""
        self._sample = None
        self._expires = 0.0


def shortage(sample: Sample | None, size: int, reserve: int) -> bool:
    """Postfix's ``smtpd_check_size`` rule: too little space for a message of ``size``
    (0 when undeclared) while keeping ``reserve`` bytes free."""
    if sample is None:
        return False
    free = sample.free
    return free <= reserve or size >= free - reserve or size >= free // 2
