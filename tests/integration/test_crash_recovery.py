"""Crash safety of a real ``pymta serve`` process: SIGKILL under load loses nothing acknowledged.

Twenty concurrent SMTP sessions send numbered messages to alice (maildir) and bob (mbox) and
record every ``250 2.0.0 Ok: queued as QID``. The server is SIGKILLed once in the middle of the
load and once right after a load has finished (deliveries still running), and restarted on the
same state directory each time. Once the queue has drained, every acknowledged message must be
in each of its mailboxes, complete (its whole body, up to an end marker), parseable, and not
duplicated more than a little (a delivery interrupted after the mailbox write but before the
queue update is legitimately repeated: at-least-once delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import mailbox
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import serverproc
from serverproc import ServerProc, make_message, queued_id, smtp_send, wait_until

server_factory = serverproc.server_factory  # the fixture

SESSIONS = 20
PER_SESSION = 10
CUT_EVERY = 7       # every 7th message of a session is left halfway (then a new session)
DRAIN_TIMEOUT = 90.0
SENDER = "load@client.test"
ALICE, BOB = "alice@example.com", "bob@example.com"
BODY_LINES = 60


def body_for(token: str) -> str:
    """The body of message ``token`` (LF line ends), ending in a marker: a truncated
    delivery misses the marker or some lines."""
    lines = [f"{token} line {i:03d} " + "x" * 50 for i in range(BODY_LINES)]
    return "\n".join(lines) + f"\nEND-OF-BODY {token}\n"


def rcpts_for(n: int) -> list[str]:
    return [[ALICE], [BOB], [ALICE, BOB]][n % 3]


@dataclass
class Load:
    """Acknowledged messages of all rounds: token → (qid, recipients)."""

    acked: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    # messages whose whole text (up to the final dot) the client sent: only these may be
    # delivered without a 250 (committed, then the reply lost with the killed server)
    sent: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)   # answered 4xx/5xx: never to be delivered
    cut: set[str] = field(default_factory=set)       # the client left halfway through the text
    temp_failed: int = 0
    perm_failed: int = 0
    broken_sessions: int = 0


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        lines.append(line.decode("utf-8", "replace"))
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), "".join(lines)


async def _session(port: int, prefix: str, wid: int, load: Load, stop: asyncio.Event) -> None:
    """Sessions one after another until ``stop``; every reply bounded by a timeout."""
    serial = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        try:
            cut = False
            async with asyncio.timeout(30):
                code, _ = await _reply(reader)
                assert code == 220
                writer.write(b"EHLO load.test\r\n")
                await _reply(reader)
                for _ in range(PER_SESSION):
                    if stop.is_set():
                        break
                    serial += 1
                    token = f"{prefix}-w{wid:02d}-m{serial:04d}"
                    rcpts = rcpts_for(serial + wid)
                    data = make_message(SENDER, ", ".join(rcpts), f"crash {token}",
                                        body_for(token).replace("\n", "\r\n"))
                    if serial % CUT_EVERY == 0:
                        # a client that goes away in the middle of its message text
                        await _cut_transaction(reader, writer, rcpts, data)
                        load.cut.add(token)
                        cut = True
                        break
                    code, text = await _transaction(reader, writer, rcpts, data,
                                                    lambda t=token: load.sent.add(t))
                    if code == 250:
                        load.acked[token] = (queued_id(text), rcpts)
                    else:
                        load.refused.add(token)
                        if code >= 500:
                            load.perm_failed += 1
                        else:
                            load.temp_failed += 1
                if not cut:
                    writer.write(b"QUIT\r\n")
                    await _reply(reader)
        except (OSError, TimeoutError, ConnectionError, AssertionError):
            load.broken_sessions += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _cut_transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           rcpts: list[str], data: bytes) -> None:
    """MAIL, RCPT, DATA and half the text, then the connection is dropped (RST)."""
    for line in [f"MAIL FROM:<{SENDER}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA"]:
        writer.write(line.encode() + b"\r\n")
        code, _ = await _reply(reader)
        if code >= 400:
            break
    else:
        writer.write(data[:len(data) // 2])
        await writer.drain()
    writer.transport.abort()


async def _transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       rcpts: list[str], data: bytes,
                       on_sent: Callable[[], None] = lambda: None) -> tuple[int, str]:
    writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
    code, text = await _reply(reader)
    if code != 250:
        return code, text
    for rcpt in rcpts:
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        code, text = await _reply(reader)
        if code != 250:
            writer.write(b"RSET\r\n")
            await _reply(reader)
            return code, text
    writer.write(b"DATA\r\n")
    code, text = await _reply(reader)
    if code != 354:
        return code, text
    writer.write(data + b".\r\n")
    on_sent()
    return await _reply(reader)


async def run_load(srv: ServerProc, prefix: str, load: Load, *, until_acks: int,
                   kill_at_threshold: bool) -> int:
    """Run SESSIONS sessions until ``until_acks`` more acknowledgements; then either SIGKILL
    the server at once (mid-load) or stop the clients, and SIGKILL right after. Returns the
    exit status of the killed server."""
    stop = asyncio.Event()
    start = len(load.acked)
    tasks = [asyncio.create_task(_session(srv.port, prefix, w, load, stop))
             for w in range(SESSIONS)]
    try:
        deadline = time.monotonic() + 120
        while len(load.acked) - start < until_acks:
            assert time.monotonic() < deadline, "load generator made no progress"
            assert srv.running, f"server died under load:\n{srv.stderr[-4000:]}"
            await asyncio.sleep(0.005)
        if kill_at_threshold:
            srv.signal(signal.SIGKILL)
            stop.set()
        else:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            srv.signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return await asyncio.to_thread(srv.wait, 10)


# ---------------------------------------------------------------------------- verification


@dataclass
class Mailboxes:
    counts: Counter[tuple[str, str]]       # (mailbox owner, token) → deliveries
    bad: list[str]                         # descriptions of unparseable/partial messages
    messages: int


def _check_message(owner: str, msg: email.message.Message, out: Mailboxes) -> None:
    subject = str(msg.get("Subject", ""))
    if not subject.startswith("crash "):
        out.bad.append(f"{owner}: message without a test subject: {subject!r}")
        return
    token = subject.split(" ", 1)[1].strip()
    payload = msg.get_payload(decode=True) or b""
    text = payload.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    if text != body_for(token).rstrip("\n"):
        out.bad.append(f"{owner}: {token}: body differs ({len(text)} chars, "
                       f"ends {text[-60:]!r})")
    delivered_to = str(msg.get("Delivered-To", ""))
    if delivered_to.lower() != f"{owner}@example.com":
        out.bad.append(f"{owner}: {token}: Delivered-To {delivered_to!r}")
    out.counts[(owner, token)] += 1
    out.messages += 1


def read_mailboxes(mail_dir: Path) -> Mailboxes:
    out = Mailboxes(Counter(), [], 0)
    new = mail_dir / "alice" / "new"
    for name in sorted(os.listdir(new)) if new.is_dir() else []:
        raw = (new / name).read_bytes()
        size = name.rpartition(",S=")[2]
        if size.isdigit() and int(size) != len(raw):
            out.bad.append(f"alice: {name}: {len(raw)} bytes, name says {size}")
        _check_message("alice", email.message_from_bytes(raw, policy=email.policy.compat32),
                       out)
    mbox_path = mail_dir / "bob"
    if mbox_path.exists():
        raw = mbox_path.read_bytes()
        if raw and not raw.startswith(b"From "):
            out.bad.append("bob: mbox does not start with a From line")
        box = mailbox.mbox(str(mbox_path), create=False)
        try:
            for msg in box:
                _check_message("bob", msg, out)
        finally:
            box.close()
    return out


def verify(srv: ServerProc, load: Load, label: str,
           report: Callable[[str], None], kills: int = 1) -> dict[str, int]:
    boxes = read_mailboxes(srv.mail_dir)
    missing = [f"{owner}:{token} ({qid})"
               for token, (qid, rcpts) in load.acked.items()
               for owner in (r.split("@")[0] for r in rcpts)
               if boxes.counts[(owner, token)] == 0]
    expected = sum(len(r) for _, r in load.acked.values())
    duplicates = sum(n - 1 for n in boxes.counts.values() if n > 1)
    unacked = sum(1 for (_, token) in boxes.counts if token not in load.acked)
    never_sent = sorted({token for (_, token) in boxes.counts
                         if token not in load.acked and token not in load.sent})
    refused_delivered = sorted({token for (_, token) in boxes.counts if token in load.refused})
    cut_delivered = sorted({token for (_, token) in boxes.counts if token in load.cut})
    leftovers = len(os.listdir(srv.mail_dir / "alice" / "tmp"))
    figures = {"acked messages": len(load.acked), "acked deliveries": expected,
               "cut halfway": len(load.cut),
               "delivered": boxes.messages, "duplicates": duplicates,
               "delivered but not acked": unacked, "maildir tmp leftovers": leftovers,
               "4xx": load.temp_failed, "5xx": load.perm_failed,
               "broken sessions": load.broken_sessions}
    report(f"{label}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert not boxes.bad, f"{label}: damaged messages: {boxes.bad[:10]}"
    # a message the client never finished sending must never be delivered; one it finished
    # may be, without its 250 (committed, then the reply lost with the killed server; the
    # client would send it again: counted as "delivered but not acked")
    assert not never_sent, f"{label}: delivered, never sent whole: {never_sent[:10]}"
    assert not cut_delivered, f"{label}: delivered, the client left halfway: {cut_delivered[:10]}"
    assert not refused_delivered, (f"{label}: delivered although refused with 4xx/5xx: "
                                   f"{refused_delivered[:10]}")
    assert not missing, (f"{label}: {len(missing)} acknowledged deliveries lost, e.g. "
                         f"{missing[:10]}")
    assert load.perm_failed == 0
    # at-least-once: a crash may repeat the deliveries that were in flight, no more
    assert duplicates <= kills * (SESSIONS * 2 + 20), figures
    assert srv.queue_files("corrupt") == [], f"{label}: quarantined messages"
    return figures


# ---------------------------------------------------------------------------- tests


def test_sigkill_under_load_loses_no_acknowledged_message(server_factory, capsys) -> None:
    srv: ServerProc = server_factory("crash", PYMTA_RETRY_FIRST="0.2", PYMTA_RETRY_MAX="1",
                                     PYMTA_QUEUE_SCAN_INTERVAL="1", SYSLOG_LEVEL="5")
    load = Load()
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        with capsys.disabled():
            print("\n" + line)

    # 1. SIGKILL in the middle of the load
    srv.start()
    rc = asyncio.run(run_load(srv, "r1", load, until_acks=300, kill_at_threshold=True))
    assert rc == -signal.SIGKILL
    assert (srv.state_dir / "pymta.pid").exists()  # a killed server leaves its pid file
    round1 = len(load.acked)
    srv.start()
    srv.wait_queue_empty(DRAIN_TIMEOUT)
    verify(srv, load, "round 1 (kill during load)", report)

    # 2. SIGKILL right after a load has finished: deliveries are still running
    rc = asyncio.run(run_load(srv, "r2", load, until_acks=300, kill_at_threshold=False))
    assert rc == -signal.SIGKILL
    assert len(load.acked) > round1
    srv.start()
    srv.wait_queue_empty(DRAIN_TIMEOUT)
    verify(srv, load, "round 2 (kill right after load)", report)

    assert srv.queue_files("data") == [], "message bodies left after the queue drained"
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr, srv.stderr[-4000:]


async def run_load_then_kill(srv: ServerProc, prefix: str, load: Load, *, kill_after: float,
                             clients_first: bool) -> int:
    """SESSIONS sessions for ``kill_after`` seconds, then SIGKILL: at once (mid-load: some
    messages being received, some committed, some delivered) or, with ``clients_first``, once
    the clients have stopped (deliveries and queue updates still running)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_session(srv.port, prefix, w, load, stop))
             for w in range(SESSIONS)]
    try:
        await asyncio.sleep(kill_after)
        assert srv.running, f"server died under load:\n{srv.stderr[-4000:]}"
        if clients_first:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        srv.signal(signal.SIGKILL)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return await asyncio.to_thread(srv.wait, 10)


def torture_plan() -> tuple[int, int]:
    """(seed, kills): ``PYMTA_TORTURE_SEED`` (default 1) makes a run repeatable; the number of
    kills grows with the test command's budget (``--fuzz-seconds``, exported as
    ``PYMTA_FUZZ_SECONDS``: 5 s gives 5 kills, an hour's budget 200)."""
    seed = int(os.environ.get("PYMTA_TORTURE_SEED", "1"))
    budget = int(float(os.environ.get("PYMTA_FUZZ_SECONDS", "5") or 5))
    return seed, max(3, min(200, budget))


def test_torture_sigkill_at_random_moments(server_factory, capsys) -> None:
    """Issue 14 item 4: SIGKILL at seeded random moments while the server accepts and
    delivers, restart on the same state directory each time; at the end every acknowledged
    message is delivered at least once, nothing the client did not send whole is delivered,
    nothing is
    damaged, and the duplicates (deliveries repeated after a kill) are counted and reported.
    "Delivered but not acked" is a message the client sent whole whose 250 was lost with the
    killed server: legitimate (the commit came first), counted; one never sent whole, one the
    client left halfway (every CUT_EVERY-th) or one answered 4xx/5xx fails the test. A seed
    repeats the kill schedule (moments and kinds); what the sessions did by then varies with
    the machine's speed."""
    import random

    seed, kills = torture_plan()
    rng = random.Random(seed)
    srv: ServerProc = server_factory("torture", PYMTA_RETRY_FIRST="0.2", PYMTA_RETRY_MAX="1",
                                     PYMTA_QUEUE_SCAN_INTERVAL="1", SYSLOG_LEVEL="5")
    load = Load()
    moments = []
    for round_ in range(kills):
        kill_after = round(rng.uniform(0.05, 1.5), 3)
        clients_first = rng.random() < 0.3
        moments.append(f"{kill_after}s{'+drain' if clients_first else ''}")
        srv.start()
        rc = asyncio.run(run_load_then_kill(srv, f"t{round_:03d}", load,
                                            kill_after=kill_after,
                                            clients_first=clients_first))
        assert rc == -signal.SIGKILL, f"kill {round_}: exit {rc}"
    srv.start()
    srv.wait_queue_empty(DRAIN_TIMEOUT)

    def report(line: str) -> None:
        with capsys.disabled():
            print(f"\ntorture seed={seed} kills={kills} at {' '.join(moments)}\n{line}")

    figures = verify(srv, load, "torture", report, kills=kills)
    assert figures["acked messages"] > 0, "no message was acknowledged: nothing was tested"
    assert figures["cut halfway"] > 0, "no message was cut halfway: that case was not tested"
    assert srv.queue_files("data") == [], "message bodies left after the queue drained"
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr, srv.stderr[-4000:]


def test_sigterm_exits_cleanly_and_removes_pid_file(server_factory) -> None:
    srv: ServerProc = server_factory("term")
    srv.start()
    pid_file = srv.state_dir / "pymta.pid"
    assert pid_file.read_text().split() == [str(srv.pid)]
    code, text = smtp_send(srv.port, SENDER, [ALICE],
                           make_message(SENDER, ALICE, "crash term", body_for("term")
                                        .replace("\n", "\r\n")))
    assert code == 250, text
    wait_until(lambda: os.path.isdir(srv.mail_dir / "alice" / "new")
               and os.listdir(srv.mail_dir / "alice" / "new"), 30, what="delivery")
    assert srv.stop() == 0, srv.stderr[-4000:]
    assert not pid_file.exists()
    assert "Traceback" not in srv.stderr
    assert "pymta stopping" in srv.stderr
    assert not srv.running
    # and it comes back on the same state directory
    srv.start()
    assert srv.stop() == 0
    assert not pid_file.exists()


def test_sigterm_with_open_sessions_and_a_deferred_message(server_factory) -> None:
    """Stopping must not wait for idle clients nor lose a queued (deferred) message."""
    srv: ServerProc = server_factory("term2", SMTP_RELAY_HOSTAUTH=serverproc.dead_relay())
    srv.start()
    code, text = smtp_send(srv.port, SENDER, ["fwd@example.com"],
                           make_message(SENDER, "fwd@example.com", "crash deferred"))
    assert code == 250, text
    qid = queued_id(text)
    idle = [_open_idle(srv.port) for _ in range(3)]
    try:
        started = time.monotonic()
        assert srv.stop() == 0, srv.stderr[-4000:]
        assert time.monotonic() - started < 10
    finally:
        for sock in idle:
            sock.close()
    assert not (srv.state_dir / "pymta.pid").exists()
    assert qid in srv.queue_files("env")
    assert qid in srv.queue_files("data")


def _open_idle(port: int) -> socket.socket:
    """A connected socket that has read its greeting and then says nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert sock.recv(1024).startswith(b"220")
    return sock
