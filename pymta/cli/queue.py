"""``pymta queue ...``: look at and change the on-disk queue of a running or stopped server.

Postfix splits this over mailq, postqueue and postsuper; here it is one command group. It
works directly on ``<state_dir>/queue`` through the store the directory holds (the file layout
or the SQLite database, :func:`pymta.queue.choice.detect`: the commands read the queue the
server writes, whatever their own environment says), taking the store's per-message lock
before a change, so it never races a delivery attempt in the server. After a change it sends
SIGUSR1 to the server named in ``<state_dir>/pymta.pid`` so the queue manager rescans at once
instead of at its next periodic scan.

``flush`` leaves a new token in ``<state_dir>/queue/flush`` before the signal, so every
worker process can tell a flush from other queue changes: a worker that sees a new token
forgets its dead hosts (Postfix's flush does the same), makes due every message nobody has
tried since, and tries the messages it had in flight once more as soon as their attempt ends.
Only when no server runs, or the token cannot be written, are the envelopes themselves made
due (see ``cmd_flush``).

Everything printed that came from a client or a remote server (addresses, replies, HELO) is
shown with non-printable characters escaped: one queue entry, one set of lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from pymta.queue import quarantine
from pymta.queue.deliverylog import printable as _p
from pymta.types import Envelope, RcptState

LOCK_TIMEOUT = 10.0        # one named message: wait for a running attempt to finish
FLUSH_LOCK_TIMEOUT = 0.0   # flush: a message being delivered is the server's (see above)
HEADER_LIMIT = 1 << 20     # queue show: never print more than this much header text
FLUSH_FILE = "flush"       # under <state_dir>/queue; pymta.queue.manager.FLUSH_FILE
_WAITING = (RcptState.PENDING, RcptState.NOTICE_OWED)


class QueueCommandError(Exception):
    """A user-facing queue problem (unknown id, busy message): one line, exit status 1."""


def pid_file(state_dir: str) -> Path:
    return Path(state_dir) / "pymta.pid"


def open_store(state_dir: str) -> Any:
    """The queue store of ``state_dir``, of the kind the directory holds (a server may run
    with either); refuses to create a queue where none exists, since a mistyped
    PYMTA_STATE_DIR would otherwise show an empty queue."""
    root = Path(state_dir) / "queue"
    if not root.is_dir():
        raise QueueCommandError(f"queue: no queue directory {str(root)!r} "
                                "(is PYMTA_STATE_DIR right?)")
    from pymta.queue.choice import detect, make_store

    store = make_store(str(root), detect(str(root)))
    store.open()
    return store


def close_store(store: Any) -> None:
    """Let go of the store (its claims, connections, directories): a command run inside a
    longer-lived process (tests, an embedder) must not keep the database open. Called from
    within an event loop (an embedder's coroutine), the close runs on a loop of its own in a
    thread, since this one cannot be re-entered."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(store.aclose())
        return
    with ThreadPoolExecutor(1, thread_name_prefix="pymta-queue-close") as worker:
        worker.submit(asyncio.run, store.aclose()).result()     # its error raised here


@contextmanager
def body_file(store: Any, qid: str) -> Iterator[BinaryIO]:
    """The message body to read, FileNotFoundError when the message is gone. A store that
    can hand the body over (``read_body``, the SQLite store's) is asked for it: its
    ``body_path`` would copy a small body into a scratch file kept until the store closes."""
    read_body = getattr(store, "read_body", None)
    if read_body is None:
        with open(store.body_path(qid), "rb") as fh:
            yield fh
        return
    data = read_body(qid)
    if data is None:
        raise FileNotFoundError(errno.ENOENT, "no such message", qid)
    yield io.BytesIO(data)


def _valid_id(qid: str) -> bool:
    from pymta.queue.ids import is_valid

    return is_valid(qid)


def _missing(store: Any, qid: str) -> QueueCommandError:
    """The error for an id that is not in the queue. When the store has moved a file of that
    id aside to ``corrupt/``, or the SQLite store its row to the table ``set_aside`` (just
    now, reading it for this command, or earlier), that is where the message is, and "no
    message" would send the user looking elsewhere."""
    if not _valid_id(qid):
        return QueueCommandError(f"queue: no message {qid}")
    set_aside = getattr(store, "set_aside_ids", None)
    if set_aside is not None and qid in set_aside():
        return QueueCommandError(f"queue: message {qid} was set aside in "
                                 f"{store.db_path} (its queue entry could not be used; see "
                                 "the server log)")
    corrupt = getattr(store, "corrupt_dir", None)
    if isinstance(corrupt, str):
        try:
            names = os.listdir(corrupt)
        except OSError:
            names = []
        # <qid>, <qid>.<ns> (a second one), <qid>.body, stray-env-<qid>, stray-data-<qid>
        if any(n == qid or n.startswith(qid + ".") or n.endswith("-" + qid) for n in names):
            return QueueCommandError(f"queue: message {qid} was moved to {corrupt}/ (its "
                                     "queue file could not be used; see the server log)")
    return QueueCommandError(f"queue: no message {qid}")


@contextmanager
def _locked(store: Any, qid: str, timeout: float) -> Iterator[Envelope]:
    """Hold the message's lock and yield its envelope; QueueCommandError if it is gone or
    stays busy (a delivery attempt holds the lock)."""
    if not _valid_id(qid):
        raise QueueCommandError(f"queue: no message {qid}")
    lock = store.lock(qid, timeout)
    if lock is None:
        if store.load(qid) is None:
            raise _missing(store, qid)
        raise QueueCommandError(f"queue: message {qid} is busy (being delivered); try again")
    try:
        env = store.load(qid)
        if env is None:
            raise _missing(store, qid)
        yield env
    finally:
        lock.release()


def signal_server(state_dir: str, err: TextIO) -> bool:
    """SIGUSR1 to the running server; False (quietly) when none runs.

    A stale pid file may name a pid now used by an unrelated process, for which SIGUSR1's
    default action is to terminate, so where /proc exists the pid must be a pymta process.
    """
    try:
        pid = int(pid_file(state_dir).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if pid <= 1:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            if b"pymta" not in cmdline.read_bytes():
                return False
        except OSError:
            return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return False
    except PermissionError:
        print(f"pymta: queue: cannot signal the server (pid {pid}): permission denied; "
              "it will notice at its next queue scan", file=err)
        return False
    return True


# ------------------------------------------------------------------------------ reading


def _age(seconds: float) -> str:
    """``42s``, ``5m``, ``2h05m``, ``3d04h``: short enough for a column."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _last_error(env: Envelope) -> str:
    """The most recent reply of a recipient that is not delivered."""
    failing = [r for r in env.recipients if r.state is not RcptState.DELIVERED and r.last_reply]
    if not failing:
        return ""
    return _p(max(failing, key=lambda r: r.last_attempt).last_reply)


def _size(store: Any, qid: str, env: Envelope) -> int:
    if env.size:
        return env.size
    try:
        with body_file(store, qid) as fh:
            return fh.seek(0, io.SEEK_END)
    except OSError:
        return 0


def _entries(store: Any) -> list[tuple[str, Envelope]]:
    """(id, envelope) of every message, oldest first; messages that vanish while we read
    (delivered meanwhile) are skipped."""
    out = []
    for qid in store.ids():
        env = store.load(qid)
        if env is not None:
            out.append((qid, env))
    out.sort(key=lambda item: (item[1].received_at, item[0]))
    return out


def _as_json(store: Any, qid: str, env: Envelope, now: float) -> dict[str, Any]:
    return {
        "id": qid,
        "age": round(now - env.received_at, 3),
        "received_at": env.received_at,
        "next_attempt": env.next_attempt,
        "size": _size(store, qid, env),
        "sender": env.sender,
        "held": env.held,
        "is_bounce": env.is_bounce,
        "requiretls": env.requiretls,
        "tls_optional": env.tls_optional,
        "last_error": _last_error(env),
        "recipients": [
            {"address": r.address, "original": r.original, "state": r.state.value,
             "attempts": r.attempts, "next_hop": r.next_hop, "last_reply": r.last_reply}
            for r in env.recipients
        ],
    }


def _tls_flag(env: Envelope, form: str) -> str:
    """What the sender asked of TLS on the way out (RFC 8689), in ``form``; "" when nothing:
    ``REQUIRETLS`` (verified TLS to a next hop offering REQUIRETLS, or a bounce) or
    ``TLS-Required: No`` (TLS policy may be ignored)."""
    if env.requiretls:
        return form.format("REQUIRETLS")
    if env.tls_optional:
        return form.format("TLS-Required: No")
    return ""


def cmd_list(store: Any, as_json: bool, out: TextIO) -> int:
    now = time.time()
    entries = _entries(store)
    if as_json:
        json.dump([_as_json(store, qid, env, now) for qid, env in entries], out, indent=1)
        out.write("\n")
        return 0
    if not entries:
        print("queue is empty", file=out)
        return 0
    print(f"{'ID':<16} {'AGE':>6} {'SIZE':>9}  SENDER", file=out)
    for qid, env in entries:
        flags = (" (held)" if env.held else "") + _tls_flag(env, " ({})")
        print(f"{qid:<16} {_age(now - env.received_at):>6} {_size(store, qid, env):>9}  "
              f"<{_p(env.sender)}>{flags}", file=out)
        for r in env.recipients:
            tries = f"  ({r.attempts} attempt{'' if r.attempts == 1 else 's'}" + (
                f", via {_p(r.next_hop)})" if r.next_hop else ")") if r.attempts else ""
            print(f"{'':<16} {r.state.value:>16}  <{_p(r.address)}>{tries}", file=out)
            if r.last_reply and r.state is not RcptState.DELIVERED:
                print(f"{'':<16} {'':>16}    {_p(r.last_reply)}", file=out)
        error = _last_error(env)
        if error:
            print(f"{'':<16} {'last error':>16}  {error}", file=out)
    print(f"-- {len(entries)} message(s)", file=out)
    return 0


def _when(ts: float, now: float) -> str:
    if not ts:
        return "-"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))
    delta = ts - now
    rel = f"in {_age(delta)}" if delta > 0 else f"{_age(-delta)} ago"
    return f"{stamp} ({rel})"


def _headers(fh: BinaryIO) -> str:
    """The header section of the spooled message, up to the first empty line."""
    lines: list[str] = []
    total = 0
    for raw in fh:
        if raw in (b"\r\n", b"\n"):
            break
        total += len(raw)
        if total > HEADER_LIMIT:
            lines.append("[... header truncated]")
            break
        lines.append(_p(raw.rstrip(b"\r\n").decode("utf-8", "replace")))
    return "\n".join(lines)


def cmd_show(store: Any, qid: str, out: TextIO) -> int:
    env = store.load(qid) if _valid_id(qid) else None
    if env is None:
        raise _missing(store, qid)
    now = time.time()
    rows = [
        ("id", qid),
        ("sender", f"<{env.sender}>"),
        ("received", _when(env.received_at, now)),
        ("next attempt", "held" if env.held else _when(env.next_attempt, now)),
        ("size", str(_size(store, qid, env))),
        ("client", f"{env.helo or '-'} [{env.client_ip or '-'}]"),
        ("protocol", env.protocol),
        ("auth user", env.auth_user or "-"),
        ("body", env.body_type + (" SMTPUTF8" if env.smtputf8 else "")),
        ("dsn", f"ret={env.ret or '-'} envid={env.envid or '-'}"),
        ("bounce", "yes" if env.is_bounce else "no"),
        ("tls", _tls_flag(env, "{}") or "-"),
    ]
    for label, value in rows:
        print(f"{label + ':':<14}{_p(value)}", file=out)
    for r in env.recipients:
        print(f"recipient:    <{_p(r.address)}>" + (f" (for <{_p(r.original)}>)"
                                                     if r.original != r.address else ""),
              file=out)
        print(f"  state:      {r.state.value}, attempts {r.attempts}", file=out)
        print(f"  next hop:   {_p(r.next_hop) or '-'}", file=out)
        print(f"  last try:   {_when(r.last_attempt, now)}", file=out)
        print(f"  last reply: {_p(r.last_reply) or '-'}", file=out)
    print("", file=out)
    try:
        with body_file(store, qid) as fh:
            print(_headers(fh), file=out)
    except OSError as exc:
        print(f"(message body unreadable: {exc.strerror or exc})", file=out)
    return 0


# ------------------------------------------------------------------------------ changing


def write_flush_token(state_dir: str) -> None:
    """A new token in ``<state_dir>/queue/flush`` (atomic rename; see the module docstring)."""
    root = Path(state_dir) / "queue"
    token = f"{time.time_ns()}.{os.getpid()}\n"
    tmp = root / f"{FLUSH_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(token)
        os.replace(tmp, root / FLUSH_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def cmd_flush(store: Any, state_dir: str, out: TextIO, err: TextIO) -> int:
    """Make every non-held message due now (Postfix ``postqueue -f``) and tell the server
    to forget its dead hosts.

    With a server running, the request is the token and the signal: the server makes due
    every message nobody has tried since (every worker sees the token; whoever holds a
    message tries it once). Nothing is rewritten, so a flush costs no fsync per message and
    waits for no lock: rewriting a large queue under load one envelope (two fsyncs) at a
    time, and waiting up to a second for each message being delivered, is what made a flush
    seen under load take longer than 20 s to reach the server. Without a server, the
    envelopes are made due on disk, for the next start.

    When the token cannot be written (a full or read-only queue file system, no permission)
    a running server would only rescan and find nothing due: then the envelopes are made
    due on disk as without a server and the server is signalled to rescan, but it cannot
    be told to forget its dead hosts, so the command says so and exits with status 1.
    """
    try:
        write_flush_token(state_dir)
        token_error = ""
    except OSError as exc:
        token_error = str(exc.strerror or exc)
        print(f"pymta: queue: cannot write the flush request: {token_error}", file=err)
    if not token_error and signal_server(state_dir, err):
        count = 0
        for qid in store.ids():
            env = store.load(qid)
            if env is not None and not env.held and _waiting(env):
                count += 1
        print(f"{count} message(s) due now", file=out)
        return 0
    now = time.time()
    count = busy = failed = 0
    for qid in store.ids():
        try:
            with _locked(store, qid, FLUSH_LOCK_TIMEOUT) as env:
                if env.held or not _waiting(env):
                    continue
                env.next_attempt = now
                store.save_sync(qid, env)
                count += 1
        except QueueCommandError as exc:
            busy += "busy" in str(exc)
            continue  # delivered meanwhile, or locked by a process we could not signal
        except OSError as exc:
            failed += 1
            if failed == 1:
                print(f"pymta: queue: cannot update {qid}: {exc.strerror or exc}", file=err)
    note = (f", {busy} busy" if busy else "") + (f", {failed} not updated" if failed else "")
    if not token_error:
        print(f"{count} message(s) due now{note} (no running server)", file=out)
        return 1 if failed else 0
    running = signal_server(state_dir, err)
    print(f"{count} message(s) due now{note}" + ("" if running else " (no running server)"),
          file=out)
    if running:
        print("pymta: queue: the running server was not told to forget its dead hosts; "
              "messages to a host it remembers as dead wait until it expires", file=err)
    return 1 if running or failed else 0


def _waiting(env: Envelope) -> bool:
    return any(r.state in _WAITING for r in env.recipients)


def _each(store: Any, qids: Sequence[str], change: Any, err: TextIO) -> int:
    """Apply ``change(qid, env)`` to each message under its lock; 1 if any id failed."""
    status = 0
    for qid in qids:
        try:
            with _locked(store, qid, LOCK_TIMEOUT) as env:
                change(qid, env)
        except QueueCommandError as exc:
            print(f"pymta: {exc}", file=err)
            status = 1
    return status


def cmd_delete(store: Any, state_dir: str, qids: Sequence[str], delete_all: bool,
               out: TextIO, err: TextIO) -> int:
    targets = list(store.ids()) if delete_all else list(qids)
    done: list[str] = []

    def remove(qid: str, env: Envelope) -> None:
        store.remove_sync(qid)
        done.append(qid)

    status = _each(store, targets, remove, err)
    if delete_all:
        status = 0  # messages delivered while we went through the list are not an error
    for qid in done:
        print(f"{qid}: deleted", file=out)
    if done:
        signal_server(state_dir, err)
    return status


def cmd_hold(store: Any, state_dir: str, qids: Sequence[str], hold: bool,
             out: TextIO, err: TextIO, every: bool = False) -> int:
    """Hold (never attempt) or release messages; a release makes the message due now.
    ``every``: all messages in the queue (a message delivered meanwhile is not an error).
    Quarantined messages are not released here (``--all`` leaves them, an ID is refused)."""
    word = "held" if hold else "released"
    if every:
        qids = list(store.ids())

    def change(qid: str, env: Envelope) -> None:
        if not hold and quarantine.is_quarantined(env):
            # blocked content: only `pymta quarantine release` delivers it (it also takes
            # away the X-Envelope-* fields naming every recipient)
            if every:
                return
            raise QueueCommandError(f"queue: {qid} is quarantined; use 'pymta quarantine "
                                    f"release {qid}'")
        env.held = hold
        if not hold:
            env.next_attempt = min(env.next_attempt, time.time())
        store.save_sync(qid, env)
        print(f"{qid}: {word}", file=out)

    status = _each(store, qids, change, err)
    signal_server(state_dir, err)
    return 0 if every else status


# The helpers ``pymta quarantine`` (pymta/cli/quarantine.py) shares, under public names.
locked = _locked
missing = _missing
entries = _entries
age = _age
message_size = _size
valid_id = _valid_id


def run(args: Any, state_dir: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Dispatch a parsed ``queue`` subcommand (output to sys.stdout/sys.stderr by default)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    store = open_store(state_dir)
    try:
        return _dispatch(args, store, state_dir, out, err)
    finally:
        close_store(store)


def _dispatch(args: Any, store: Any, state_dir: str, out: TextIO, err: TextIO) -> int:
    if args.queue_command == "list":
        return cmd_list(store, args.json, out)
    if args.queue_command == "show":
        return cmd_show(store, args.id, out)
    if args.queue_command == "flush":
        return cmd_flush(store, state_dir, out, err)
    if args.queue_command == "delete":
        return cmd_delete(store, state_dir, args.ids, args.all, out, err)
    if args.queue_command in ("hold", "release"):
        return cmd_hold(store, state_dir, args.ids, args.queue_command == "hold", out, err,
                        every=getattr(args, "all", False))
    raise AssertionError(args.queue_command)
