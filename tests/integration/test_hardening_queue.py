"""Issue 10 (hardening), the queue and delivery side, against real ``pymta serve`` processes
and a raw-socket next hop: the success-DSN reflector (defect 3), the duplicate local delivery
after a stop (defect 4), an unencodable envelope that was retried forever and leaked a
connection per attempt (defect 6), ``pymta queue flush`` after a dead MX comes back, and a
delivery agent that raises.

The next hop is ``Peer``: a deliberately small SMTP server on blocking sockets in threads,
which counts connections (total and still open) and can stall after the ``DATA`` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import serverproc
from serverproc import (
    PYTHON,
    REPO,
    ServerProc,
    clean_environ,
    free_port,
    make_message,
    queued_id,
    smtp_send,
    wait_until,
)

from pymta.app import MTA
from pymta.queue.store import QueueStore
from pymta.types import Envelope, Outcome, QueuedMessage, Recipient
from tests.conftest import make_config, wait_for
from tests.integration._support import ThreadedPeer

server_factory = serverproc.server_factory  # the fixture

SENDER = "sender@client.test"
MARKER = b"REFLECTED-BODY-MARKER-0123456789"
NO_CHECKS = {"PYMTA_SPF": "no", "PYMTA_DMARC": "no", "PYMTA_DKIM_VERIFY": "no",
             "PYMTA_ARC": "no"}


class Peer(ThreadedPeer):
    """A raw SMTP next hop on 127.0.0.1 (see the module docstring)."""

    def __init__(self, port: int = 0, *, stall_data: bool = False) -> None:
        super().__init__(port)
        self.stall_data = stall_data
        self.connections = 0
        self.open = 0
        self.lines: list[str] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self._lock = threading.Lock()

    def _session(self, rfile, wfile) -> None:
        with self._lock:
            self.connections += 1
            self.open += 1
        mail, rcpts = "", []
        try:
            wfile.write(b"220 peer.test ESMTP\r\n")
            while raw := rfile.readline():
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._lock:
                    self.lines.append(line)
                verb = line[:4].upper()
                if verb == "EHLO":
                    wfile.write(b"250-peer.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                                b"250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == "MAIL":
                    mail, rcpts = line[10:], []
                    wfile.write(b"250 2.1.0 Ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(line[8:])
                    wfile.write(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    if self.stall_data:
                        rfile.read()        # never answer: wait for the client to go
                        return
                    wfile.write(b"354 go ahead\r\n")
                    data = bytearray()
                    while (chunk := rfile.readline()) not in (b".\r\n", b""):
                        data += chunk
                    with self._lock:
                        self.messages.append((mail, rcpts, bytes(data)))
                    wfile.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == "QUIT":
                    wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    wfile.write(b"250 2.0.0 Ok\r\n")
        except OSError:
            return
        finally:
            with self._lock:
                self.open -= 1


def established_to(port: int) -> int:
    """ESTABLISHED TCP connections to 127.0.0.1:``port`` on this machine (``ss``)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def maildir_count(srv: ServerProc, box: str) -> int:
    new = srv.mail_dir / box / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def maildir_files(srv: ServerProc, box: str) -> list[bytes]:
    new = srv.mail_dir / box / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


# ------------------------------------------------------------------------------ defect 3


def test_issue10_defect3_success_dsn_to_unverified_sender_carries_headers_only(
        server_factory) -> None:
    """``MAIL FROM:<victim@foreign.test>``, ``RCPT TO:<alice> NOTIFY=SUCCESS``, ``RET=FULL``:
    the success notice reaches the victim's next hop with the header section only."""
    peer = Peer().start()
    try:
        srv: ServerProc = server_factory("d3", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer.port}",
                                         **NO_CHECKS)
        srv.start()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO attacker.test\r\n")
            while f.readline()[3:4] == b"-":
                pass
            for cmd in (b"MAIL FROM:<victim@foreign.test> RET=FULL",
                        b"RCPT TO:<alice@example.com> NOTIFY=SUCCESS", b"DATA"):
                s.sendall(cmd + b"\r\n")
                assert f.readline()[:1] in (b"2", b"3")
            s.sendall(b"Subject: payload\r\n\r\n" + (MARKER + b"\r\n") * 200 + b".\r\n")
            assert f.readline().startswith(b"250 2.0.0")
        wait_until(lambda: peer.messages, 15, 0.05, "the success DSN at the next hop")
        mail, rcpts, data = peer.messages[0]
        assert mail.startswith("<>") and rcpts[0].startswith("<victim@foreign.test>")
        assert b"Action: delivered" in data
        assert b"Content-Type: text/rfc822-headers" in data
        assert b"message/rfc822" not in data
        assert b"Subject: payload" in data          # the headers are there ...
        assert MARKER not in data                   # ... the body is not
        assert maildir_count(srv, "alice") == 1
    finally:
        peer.stop()


def test_issue10_review_success_dsn_stops_at_first_non_field_line(server_factory) -> None:
    """``Subject: hello`` and 3,000 spam lines with no empty line between (accepted since
    defect 9), ``NOTIFY=SUCCESS`` from ``victim@foreign.test``: the success notice at the
    victim's next hop returns the header fields only (ours and ``Subject``), none of the
    spam. Before the fix it returned everything up to the (missing) empty line: 176 KB."""
    peer = Peer().start()
    try:
        srv: ServerProc = server_factory("rv1", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer.port}",
                                         SRS_ENABLE="no", **NO_CHECKS)
        srv.start()
        spam = b"SPAM LINE %06d buy cheap pills at http://evil.example/\r\n"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO attacker.test\r\n")
            while f.readline()[3:4] == b"-":
                pass
            for cmd in (b"MAIL FROM:<victim@foreign.test>",
                        b"RCPT TO:<alice@example.com> NOTIFY=SUCCESS", b"DATA"):
                s.sendall(cmd + b"\r\n")
                assert f.readline()[:1] in (b"2", b"3")
            s.sendall(b"Subject: hello\r\n" + b"".join(spam % i for i in range(3000))
                      + b".\r\n")
            assert f.readline().startswith(b"250 2.0.0")
        wait_until(lambda: peer.messages, 15, 0.05, "the success DSN at the next hop")
        mail, rcpts, data = peer.messages[0]
        assert rcpts[0].startswith("<victim@foreign.test>")
        assert b"Action: delivered" in data
        assert b"SPAM LINE" not in data
        returned = data.split(b"Content-Type: text/rfc822-headers\r\n", 1)[1]
        returned = returned.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
        assert returned.startswith(b"Received: from attacker.test")
        assert returned.endswith(b"\r\nSubject: hello\r\n")
        assert len(data) < 5000
        [delivered] = maildir_files(srv, "alice")       # the message itself is delivered whole
        assert delivered.count(b"SPAM LINE") == 3000
    finally:
        peer.stop()


# ------------------------------------------------------------------------------ defect 4


def test_issue10_defect4_stop_during_slow_relay_leaves_one_local_copy(server_factory) -> None:
    """alice (maildir) and an alias forwarded to a next hop that never answers DATA; SIGTERM
    while that attempt hangs, restart: alice has exactly one copy, and only the forward is
    tried again."""
    peer = Peer(stall_data=True).start()
    try:
        # the stop lets the hanging attempt run for PYMTA_SHUTDOWN_TIMEOUT, then cancels it
        srv: ServerProc = server_factory("d4", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer.port}",
                                         SRS_ENABLE="no", PYMTA_SHUTDOWN_TIMEOUT="2",
                                         **NO_CHECKS)
        srv.start()
        code, text = smtp_send(srv.port, SENDER, ["alice@example.com", "fwd@example.com"],
                               make_message(SENDER, "alice@example.com", "defect 4"))
        assert code == 250, text
        qid = queued_id(text)
        wait_until(lambda: maildir_count(srv, "alice") == 1, 10, 0.05, "alice's copy")
        wait_until(lambda: "DATA" in peer.lines and peer.open == 1, 10, 0.05,
                   "the forward to stall in DATA")
        assert srv.stop() == 0
        assert maildir_count(srv, "alice") == 1
        show = srv.cli("queue", "show", qid, check=True).stdout
        assert re.search(r"<alice@example.com>\n  state:      delivered, attempts 1", show), show
        srv.start()
        # the restarted server's attempt reaches the next hop again: by then any second
        # local delivery would have been made too (the groups of one attempt run together)
        wait_until(lambda: peer.connections >= 2, 15, 0.05, "the retry of the forward")
        time.sleep(1.0)
        assert maildir_count(srv, "alice") == 1, "alice got a duplicate after the restart"
        assert srv.stop() == 0
    finally:
        peer.stop()


def test_issue10_review_stop_during_mbox_lock_wait_leaves_one_local_copy(server_factory) -> None:
    """alice (maildir) and bob (an mbox dot-locked by a live process) in one message: alice's
    copy is written, bob's delivery waits for the lock. SIGTERM, then a restart with the lock
    gone: bob gets the message and alice still has exactly one copy. Before the fix the stop
    cancelled the local agent's call after 3 s with alice written but not recorded, and the
    restart wrote her a second copy."""
    srv: ServerProc = server_factory("rv2", SRS_ENABLE="no", PYMTA_DNS_RESOLVER="127.0.0.1:9",
                                     MAIL_BOXES="alice@example.com:alice/ bob@example.com:bob",
                                     **NO_CHECKS)
    srv.start()
    lock = srv.mail_dir / "bob.lock"
    lock.write_text(f"{os.getpid()}\n")            # a MUA holds bob's mbox
    code, text = smtp_send(srv.port, SENDER, ["alice@example.com", "bob@example.com"],
                           make_message(SENDER, "alice@example.com", "once"))
    assert code == 250, text
    qid = queued_id(text)
    wait_until(lambda: maildir_count(srv, "alice") == 1, 10, 0.05, "alice's copy")
    assert srv.stop(timeout=60) == 0
    show = srv.cli("queue", "show", qid, check=True).stdout
    assert re.search(r"<alice@example.com>\n  state:      delivered", show), show
    assert re.search(r"<bob@example.com>\n  state:      pending", show), show
    lock.unlink()
    srv.start()
    srv.wait_queue_empty(30)
    assert (srv.mail_dir / "bob").read_bytes().count(b"\nSubject: once") == 1
    assert maildir_count(srv, "alice") == 1, "alice got a duplicate after the restart"
    assert srv.stop() == 0


# ------------------------------------------------------------------------------ defect 6


async def _inject(queue_dir: Path, envelopes: Sequence[Envelope], body: bytes) -> list[str]:
    store = QueueStore(str(queue_dir))
    await store.start()
    try:
        return [await store.enqueue_bytes(env, body) for env in envelopes]
    finally:
        await store.aclose()


def test_issue10_defect6_unencodable_envelope_bounces_and_leaks_no_connection(
        server_factory) -> None:
    """A queued sender holding raw ``\\xff\\xfe`` (an old queue file: the receiving side refuses
    it now) bounces with 5.1.7 at once instead of being retried until it expires, and no
    attempt leaves a connection to the next hop open; a malformed ORCPT in another message is
    replaced, and that message is delivered."""
    peer = Peer().start()
    try:
        srv: ServerProc = server_factory(
            "d6", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer.port}", PYMTA_RETRY_FIRST="0.3",
            PYMTA_RETRY_MAX="0.6", PYMTA_CONNECTION_CACHE_TIME="0",
            MAIL_ALIASES="postmaster:alice@example.com", **NO_CHECKS)
        srv.start()
        srv.stop()
        now = time.time()
        body = (b"From: <x@sender.test>\r\nTo: <someone@remote.test>\r\n"
                b"Subject: bad bytes\r\n\r\nhi\r\n")
        bad_sender = Envelope("\udcff\udcfe@sender.test",
                              [Recipient("someone@remote.test", "someone@remote.test",
                                         local=False)],
                              now, now, smtputf8=True, body_type="8BITMIME", size=len(body))
        bad_orcpt = Envelope("ok@sender.test",
                             [Recipient("other@remote.test", "other@remote.test", local=False,
                                        orcpt="\udcff\udcfe;x")], now, now, size=len(body))
        asyncio.run(_inject(srv.queue_dir, [bad_sender, bad_orcpt], body))
        srv.start()
        srv.wait_queue_empty(15)
        time.sleep(1.5)     # several retry intervals: nothing comes back, nothing stays open
        assert peer.open == 0 and established_to(peer.port) == 0
        assert peer.connections == 1                  # the good message; none for the bad
        [(mail, rcpts, _)] = peer.messages
        assert mail.startswith("<ok@sender.test>")
        assert rcpts == ["<other@remote.test> ORCPT=rfc822;other@remote.test"]
        [dsn] = maildir_files(srv, "alice")           # the postmaster's copy of the bounce
        assert b"Status: 5.1.7" in dsn
        assert b"Bad sender address syntax" in dsn
        assert "Traceback" not in srv.stderr and "UnicodeEncodeError" not in srv.stderr
    finally:
        peer.stop()


# --------------------------------------------------------------------------------- flush


def test_issue10_flush_after_dead_mx_comes_back_delivers_at_once(server_factory) -> None:
    """MX down: deferred, and its address remembered as dead (PYMTA_DEAD_HOST_TIME 60 s);
    retries minutes apart. The MX comes back, ``pymta queue flush``: delivered within a few
    seconds, by whichever of two workers holds the message."""
    port = free_port()
    srv: ServerProc = server_factory("fl", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{port}",
                                     PYMTA_RETRY_FIRST="300", PYMTA_RETRY_MAX="600",
                                     PYMTA_QUEUE_SCAN_INTERVAL="300", PYMTA_WORKERS="2",
                                     **NO_CHECKS)
    srv.start()
    qids = []
    for i in range(3):
        code, text = smtp_send(srv.port, SENDER, ["fwd@example.com"],
                               make_message(SENDER, "fwd@example.com", f"flush {i}"))
        assert code == 250, text
        qids.append(queued_id(text))

    def deferred() -> bool:
        entries = srv.queue_json()
        return len(entries) == 3 and all(r["attempts"] >= 1 for e in entries
                                         for r in e["recipients"])

    wait_until(deferred, 20, 0.1, "every message deferred once")
    peer = Peer(port).start()
    try:
        time.sleep(1.0)
        assert peer.connections == 0          # dead host and a long retry: nothing by itself
        started = time.monotonic()
        proc = srv.cli("queue", "flush", check=True)
        assert "3 message(s) due now" in proc.stdout, proc.stdout
        wait_until(lambda: len(peer.messages) == 3, 5, 0.05, "delivery after the flush")
        srv.wait_queue_empty(5)
        assert time.monotonic() - started < 5
    finally:
        peer.stop()


# ------------------------------------------------------------------- a raising agent


class FlakyAgent:
    """Raises on its first ``failures`` calls, then delivers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        from pymta.types import OutcomeKind, Reply

        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("custom agent bug")
        return [Outcome(r.address, OutcomeKind.DELIVERED, Reply(250, "2.0.0", "Ok"), "custom")
                for r in rcpts]


class OneAgentRouter:
    def __init__(self, agent: FlakyAgent) -> None:
        self.agent = agent

    def route(self, rcpt: Recipient) -> tuple[str, FlakyAgent]:
        return "custom", self.agent


async def test_issue10_raising_custom_agent_defers_with_4xx_and_retries(tmp_path: Path) -> None:
    """A custom delivery agent that raises: the message stays queued with ``451 4.3.0`` in
    ``pymta queue show``, is retried later, and is delivered once the agent works."""
    agent = FlakyAgent(failures=2)
    config = make_config(tmp_path, queue_retry_first=1.0, queue_retry_max=1.0)
    async with MTA(config, router=OneAgentRouter(agent)) as mta:
        host, port = mta.addresses["smtp"][0]
        code, text = await asyncio.to_thread(
            smtp_send, port, SENDER, ["alice@example.com"],
            make_message(SENDER, "alice@example.com", "raising agent"))
        assert code == 250, text
        qid = queued_id(text)
        await wait_for(lambda: agent.calls >= 1, 10)
        await asyncio.sleep(0.2)
        env = clean_environ(PYMTA_STATE_DIR=config.state_dir, MAIL_DOMAIN="example.com")
        show = await asyncio.to_thread(
            subprocess.run, [PYTHON, "-m", "pymta", "queue", "show", qid], cwd=REPO,
            env=env, capture_output=True, text=True, timeout=60)
        assert show.returncode == 0, show.stderr
        assert "state:      pending" in show.stdout
        assert "last reply: 451 4.3.0 Local error in processing" in show.stdout
        await wait_for(lambda: qid not in mta.store.ids(), 15)
        assert agent.calls == 3                  # two failures, retried, then delivered
    with contextlib.suppress(FileNotFoundError):
        assert not list((Path(config.mail_dir) / "alice" / "new").iterdir())


# ------------------------------------------ defect 6: every error path closes the socket


def _relay_message(tmp_path: Path) -> tuple[QueuedMessage, list[Recipient]]:
    body = tmp_path / "body"
    body.write_bytes(b"Subject: x\r\n\r\nhello\r\n")
    env = Envelope("a@example.org", [], 1.0, 1.0)
    return QueuedMessage("Q1", env, str(body)), [Recipient("b@remote.test", "b@remote.test",
                                                           local=False)]


async def test_issue10_defect6_relay_closes_connection_when_a_transaction_raises(
        tmp_path: Path, monkeypatch) -> None:
    """An unexpected exception in the middle of a transaction (here: building the RCPT
    parameters) is a temporary failure, and the connection is closed, not left open at the
    next hop; the next message gets a fresh connection and is delivered."""
    from pymta.config.model import RelayHost
    from pymta.delivery import relay as relay_mod
    from pymta.delivery.relay import SMTPRelayAgent
    from pymta.types import OutcomeKind

    peer = Peer().start()
    agent = SMTPRelayAgent(hostname="mx.example.org", tls_level="none",
                           smart_host=RelayHost("127.0.0.1", peer.port), cache_time=30.0)
    real = relay_mod.rcpt_options

    def boom(*args, **kwargs):
        raise UnicodeEncodeError("ascii", "\udcff", 0, 1, "surrogates not allowed")

    try:
        monkeypatch.setattr(relay_mod, "rcpt_options", boom)
        msg, rcpts = _relay_message(tmp_path)
        [out] = await agent.deliver(msg, rcpts)
        assert out.kind is OutcomeKind.TEMPORARY and out.reply.code == 451
        await wait_for(lambda: peer.open == 0, 5)
        monkeypatch.setattr(relay_mod, "rcpt_options", real)
        [out] = await agent.deliver(msg, rcpts)
        assert out.kind is OutcomeKind.DELIVERED
        assert peer.connections == 2 and len(peer.messages) == 1
    finally:
        await agent.aclose()
        peer.stop()


async def test_issue10_defect6_relay_closes_connection_when_cancelled(tmp_path: Path) -> None:
    """A stop cancels an attempt stalled in DATA: the connection is closed at once."""
    from pymta.config.model import RelayHost
    from pymta.delivery.relay import SMTPRelayAgent

    peer = Peer(stall_data=True).start()
    agent = SMTPRelayAgent(hostname="mx.example.org", tls_level="none",
                           smart_host=RelayHost("127.0.0.1", peer.port))
    try:
        msg, rcpts = _relay_message(tmp_path)
        task = asyncio.create_task(agent.deliver(msg, rcpts))
        await wait_for(lambda: "DATA" in peer.lines, 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_for(lambda: peer.open == 0, 5)
    finally:
        await agent.aclose()
        peer.stop()
