"""Queue ids: short names for queued messages that are unique across processes and restarts.

An id is 16 characters of Crockford base32 (digits and upper-case letters without I, L, O, U):
11 characters of microseconds since the Unix epoch, then 5 characters of the process id. The
alphabet is in ASCII order, so ids sort by creation time (``ls env/`` is a time-ordered
listing, as with Postfix's long queue ids), and contain nothing a filename or a log parser could
trip over.

Uniqueness: within one process the time part is forced strictly increasing (two ids in the same
microsecond get consecutive values), and the pid part separates live processes. A restarted
process that reuses a pid would collide only if the clock went backwards; the store creates
spool files with ``O_EXCL`` and draws a new id in that case, so a collision can cost a retry but
never overwrite a message.
"""

from __future__ import annotations

import os
import re
import threading
import time

from pymta.types import QueueId

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11          # 55 bits of microseconds: good until the year 3111
PID_CHARS = 5            # 25 bits; Linux pid_max is at most 2**22
LENGTH = TIME_CHARS + PID_CHARS

_DECODE = {c: i for i, c in enumerate(ALPHABET)}
# Deliberately looser than what we generate: the store must keep managing messages whose ids
# came from another version or another generator, but still refuse anything that could walk
# out of the spool directory ("..", "/") or hide (leading dot).
_SAFE = re.compile(r"[0-9A-Za-z]{1,64}")


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


class QueueIdGenerator:
    """Hands out ids; one per process is enough (the module-level ``new_qid``)."""

    def __init__(self) -> None:
        self._last = 0
        # Ids are made on the event loop, but the CLI and to_thread helpers may call in too.
        self._lock = threading.Lock()
        self._pid_part = ""     # encoded once per process (not a getpid per id)
        if hasattr(os, "register_at_fork"):
            # A forked worker must not reuse its parent's pid part: it is reset in the child.
            os.register_at_fork(after_in_child=self._forget_pid)

    def _forget_pid(self) -> None:
        self._pid_part = ""

    def _pid_suffix(self) -> str:
        part = self._pid_part
        if not part:
            part = self._pid_part = _b32(os.getpid() & ((1 << 25) - 1), PID_CHARS)
        return part

    def __call__(self) -> QueueId:
        now = time.time_ns() // 1000
        with self._lock:
            if now <= self._last:
                now = self._last + 1
            self._last = now
        return _b32(now, TIME_CHARS) + self._pid_suffix()


new_qid = QueueIdGenerator()


def is_valid(qid: str) -> bool:
    """True if ``qid`` is safe to use as a file name inside the spool (not only ours)."""
    return _SAFE.fullmatch(qid) is not None


def qid_time(qid: QueueId) -> float | None:
    """The Unix time an id was made, or None for an id this generator did not make."""
    if len(qid) != LENGTH:
        return None
    n = 0
    for c in qid[:TIME_CHARS]:
        v = _DECODE.get(c)
        if v is None:
            return None
        n = n * 32 + v
    return n / 1_000_000
