"""``pymta quarantine ...``: the messages the content filter blocked (amavis-ls and
amavisd-release in one command group).

A quarantined message is a queued message, held and marked (:mod:`pymta.queue.quarantine`),
so this works like ``pymta queue`` (whose helpers it uses): directly on
``<state_dir>/queue``, each change under the message's lock, the server signalled after a
release so it delivers at once. Every command refuses a message that is in the queue but not
quarantined (a held message, a DMARC quarantine): those are ``pymta queue``'s.

A released message is due at once and counts as received at its release, as a message
amavisd-release re-injects is: otherwise one quarantined for longer than the queue lifetime
would bounce at its first temporary failure, and its delay notices would come at once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, TextIO

from pymta.cli.queue import (
    LOCK_TIMEOUT,
    QueueCommandError,
    age,
    body_file,
    close_store,
    entries,
    locked,
    message_size,
    missing,
    open_store,
    signal_server,
    valid_id,
)
from pymta.queue import quarantine
from pymta.queue.deliverylog import printable as _p
from pymta.types import Envelope, QueueId, Recipient, TemporaryFailure


def _error(text: str) -> QueueCommandError:
    return QueueCommandError(f"quarantine: {text}")


def _ours(exc: QueueCommandError) -> QueueCommandError:
    """The queue helpers' error ("queue: no message X") as this command's."""
    return _error(str(exc).removeprefix("queue: "))


def _not_quarantined(qid: str) -> QueueCommandError:
    return _error(f"message {qid} is not quarantined (see 'pymta queue show {qid}')")


@contextmanager
def _quarantined(store: Any, qid: str) -> Iterator[Envelope]:
    """The message's envelope under its lock; QueueCommandError when it is gone, busy or not
    a quarantined message."""
    try:
        with locked(store, qid, LOCK_TIMEOUT) as env:
            if not quarantine.is_quarantined(env):
                raise _not_quarantined(qid)
            yield env
    except QueueCommandError as exc:
        if str(exc).startswith("queue: "):
            raise _ours(exc) from None
        raise


def _load(store: Any, qid: str) -> Envelope:
    """The envelope of a quarantined message, without its lock (for reading)."""
    env = store.load(qid) if valid_id(qid) else None
    if env is None:
        raise _ours(missing(store, qid))
    if not quarantine.is_quarantined(env):
        raise _not_quarantined(qid)
    return env


def _blocked(env: Envelope) -> list[Recipient]:
    return [env.recipients[i] for i in quarantine.blocked(env)]


def _addresses(rcpts: Sequence[Recipient]) -> str:
    return ", ".join(f"<{_p(r.address)}>" for r in rcpts)


# ------------------------------------------------------------------------------ reading


def _as_json(store: Any, qid: str, env: Envelope) -> dict[str, Any]:
    return {
        "id": qid,
        "kind": env.extra.get(quarantine.KIND, ""),
        "reason": env.extra.get(quarantine.QUARANTINE, ""),
        "quarantined_at": quarantine.quarantined_at(env),
        "sender": env.sender,
        "recipients": [r.address for r in env.recipients],
        "blocked": [r.address for r in _blocked(env)],
        "size": message_size(store, qid, env),
    }


def cmd_list(store: Any, as_json: bool, out: TextIO) -> int:
    """One line per message under a header line (amavis-ls), oldest first."""
    items = [(qid, env) for qid, env in entries(store) if quarantine.is_quarantined(env)]
    if as_json:
        json.dump([_as_json(store, qid, env) for qid, env in items], out, indent=1)
        out.write("\n")
        return 0
    if not items:
        print("quarantine is empty", file=out)
        return 0
    now = time.time()
    print(f"{'ID':<16} {'AGE':>6} {'KIND':<10} {'SIZE':>9}  SENDER -> BLOCKED  REASON",
          file=out)
    for qid, env in items:
        kind = _p(env.extra.get(quarantine.KIND, ""))
        print(f"{qid:<16} {age(now - quarantine.quarantined_at(env)):>6} {kind:<10} "
              f"{message_size(store, qid, env):>9}  <{_p(env.sender)}> -> "
              f"{_addresses(_blocked(env))}  {_p(env.extra.get(quarantine.QUARANTINE, ''))}",
              file=out)
    return 0


def _binary(out: TextIO) -> BinaryIO | None:
    """The byte stream under ``out`` (``sys.stdout.buffer``), None for a text-only one."""
    out.flush()
    return getattr(out, "buffer", None)


def cmd_show(store: Any, qid: str, headers_only: bool, out: TextIO) -> int:
    """The quarantined copy as it is: the envelope's fields first (X-Quarantine-ID,
    X-Envelope-*), then the spooled message; ``headers_only`` stops at its empty line."""
    env = _load(store, qid)
    with body_file(store, qid) as body:
        raw = _binary(out)
        if raw is None:         # a text stream (an embedder's StringIO): decoded
            data = body.read()
            if headers_only:
                data = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
            out.write(env.prepend + data.decode("utf-8", "replace"))
            return 0
        raw.write(env.prepend.encode("utf-8", "replace"))
        if not headers_only:
            shutil.copyfileobj(body, raw)
        else:
            for line in body:
                if line in (b"\r\n", b"\n"):
                    break
                raw.write(line)
        raw.flush()
    return 0


# ------------------------------------------------------------------------------ changing


def _due(env: Envelope, now: float) -> None:
    """A released message: due now, received now (see the module docstring)."""
    env.received_at = now
    env.next_attempt = now


def _matches(rcpt: Recipient, address: str) -> bool:
    """The rule :func:`pymta.queue.quarantine.release` chooses recipients by."""
    wanted = address.lower()
    return rcpt.address.lower() == wanted or rcpt.original.lower() == wanted


def cmd_release(store: Any, state_dir: str, qid: str, addresses: Sequence[str] | None,
                out: TextIO, err: TextIO) -> int:
    """Deliver the blocked recipients now; with ``addresses``, only those, as a new message
    (the quarantined one keeps the others, and goes when none is left)."""
    if addresses:
        return _release_some(store, state_dir, qid, addresses, out, err)
    with _quarantined(store, qid) as env:
        released = quarantine.release(env)
        if released:
            _due(env, time.time())
            store.save_sync(qid, env)
        else:               # nobody was blocked: nothing to deliver, nothing to keep
            store.remove_sync(qid)
    if not released:
        print(f"{qid}: deleted (no blocked recipient)", file=out)
        return 0
    print(f"released {qid} to {_addresses(released)}", file=out)
    signal_server(state_dir, err)
    return 0


def _release_some(store: Any, state_dir: str, qid: str, addresses: Sequence[str],
                  out: TextIO, err: TextIO) -> int:
    with _quarantined(store, qid) as env:
        blocked = quarantine.blocked(env)
        for address in addresses:
            if not any(_matches(env.recipients[i], address) for i in blocked):
                raise _error(f"message {qid}: {_p(address)} is not a blocked recipient "
                             f"(blocked: {_addresses(_blocked(env)) or 'none'})")
        left = [i for i in blocked
                if not any(_matches(env.recipients[i], a) for a in addresses)]
        released_env = copy.deepcopy(env)
        released = quarantine.release(released_env, addresses)
        _due(released_env, time.time())
        with body_file(store, qid) as body:
            data = body.read()
        new_qid = asyncio.run(_split(store, qid, env, released_env, data, left))
    print(f"released {qid} to {_addresses(released)} (queued as {new_qid})", file=out)
    signal_server(state_dir, err)
    return 0


async def _split(store: Any, qid: QueueId, env: Envelope, released_env: Envelope,
                 data: bytes, left: list[int]) -> QueueId:
    """Queue the released copy, then narrow (or remove) the quarantined one, in that order:
    a crash in between delivers the copy and leaves the recipients quarantined as well,
    never neither."""
    await store.start()
    try:
        try:
            new_qid: QueueId = await store.enqueue_bytes(released_env, data)
        except TemporaryFailure as exc:
            raise _error(f"message {qid}: cannot queue the released copy: {exc.reply}"
                         ) from None
        if left:
            quarantine.keep_blocked(env, left)
            store.save_sync(qid, env)
        else:
            store.remove_sync(qid)
        return new_qid
    finally:
        await store.aclose()


def cmd_delete(store: Any, state_dir: str, qids: Sequence[str], out: TextIO,
               err: TextIO) -> int:
    """Remove quarantined messages; 1 if any id was not one (the others are removed)."""
    status = 0
    done: list[str] = []
    for qid in qids:
        try:
            with _quarantined(store, qid):
                store.remove_sync(qid)
                done.append(qid)
        except QueueCommandError as exc:
            print(f"pymta: {exc}", file=err)
            status = 1
    for qid in done:
        print(f"{qid}: deleted", file=out)
    if done:
        signal_server(state_dir, err)
    return status


def cmd_expire(store: Any, lifetime: float, out: TextIO) -> int:
    removed = asyncio.run(quarantine.expire_quarantine(store, lifetime, time.time()))
    note = "" if lifetime > 0 else " (PYMTA_QUARANTINE_LIFETIME is 0: kept for ever)"
    print(f"{len(removed)} quarantined message(s) expired{note}", file=out)
    return 0


def _lifetime(args: Any) -> float:
    """``args.lifetime`` when the caller set it, else ``PYMTA_QUARANTINE_LIFETIME``."""
    given = getattr(args, "lifetime", None)
    if given is not None:
        return float(given)
    from pymta.config.load import load_config

    return load_config(path=getattr(args, "config", None)).quarantine_lifetime


def run(args: Any, state_dir: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Dispatch a parsed ``quarantine`` subcommand (output to sys.stdout/sys.stderr by
    default)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    command = args.quarantine_command
    lifetime = _lifetime(args) if command == "expire" else 0.0
    store = open_store(state_dir)
    try:
        return _dispatch(args, command, lifetime, store, state_dir, out, err)
    finally:
        close_store(store)


def _dispatch(args: Any, command: str, lifetime: float, store: Any, state_dir: str,
              out: TextIO, err: TextIO) -> int:
    if command == "list":
        return cmd_list(store, args.json, out)
    if command == "show":
        return cmd_show(store, args.id, args.headers, out)
    if command == "release":
        return cmd_release(store, state_dir, args.id, args.rcpt, out, err)
    if command == "delete":
        return cmd_delete(store, state_dir, args.ids, out, err)
    if command == "expire":
        return cmd_expire(store, lifetime, out)
    raise AssertionError(command)
