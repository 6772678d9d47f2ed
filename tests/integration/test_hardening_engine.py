"""Issue 10, the SMTP engine's part, against a real ``pymta serve`` over raw sockets.

One server for the module (one worker, ``MESSAGE_SIZE_LIMIT=1000000``,
``PYMTA_MAX_RECIPIENTS=3``, content checks off so nothing waits for DNS), driven byte by byte
as the defects were reproduced:

* defect 2: a run of CR/LF in DATA must cost O(1) per received byte: after ``x`` and 6 MB of
  ``<CR><LF>``, two-byte packets must cost the server (almost) no CPU, another client must
  get its greeting at once, and the message is refused for its size at the end;
* defect 6: undecodable bytes, line separators and controls in addresses, parameters and
  the HELO name are refused at the SMTP boundary with the replies Postfix gives;
* defect 8: recipients beyond ``PYMTA_MAX_RECIPIENTS`` are refused with ``452`` without
  counting as errors, so the transaction survives;
* NUL in DATA or BDAT: refused (``554 5.6.0``) after the end of the message, in step.

Precise timings are measured separately, outside the test suite; the bounds here
are generous so that a loaded two-core machine does not make them flaky.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serverproc import ServerProc, wait_until

TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = ServerProc(tmp_path_factory.mktemp("hardening-engine"),
                        MESSAGE_SIZE_LIMIT="1000000", PYMTA_MAX_RECIPIENTS="3",
                        PYMTA_WORKERS="1", PYMTA_SPF="no", PYMTA_DMARC="no",
                        PYMTA_DKIM_VERIFY="no", PYMTA_DKIM_SIGN="no", PYMTA_ARC="no",
                        SYSLOG_LEVEL="5")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


class Raw:
    """A blocking byte-level client: sends exactly what it is given, reads whole replies."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        greeting = self.replies(1)
        assert greeting[0].startswith(b"220"), greeting

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, count: int) -> list[bytes]:
        """The next ``count`` replies (their last lines), or fewer and ``b"<EOF>"``."""
        out: list[bytes] = []
        while len(out) < count:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return [*out, b"<EOF>"]
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                out.append(line)
        return out

    def cmd(self, line: bytes | str) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.replies(1)[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


@pytest.fixture
def client(srv: ServerProc) -> Iterator[Raw]:
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test").startswith(b"250 ")
    yield c
    c.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def settle(pid: int, timeout: float = 60.0) -> None:
    """Wait until the server stops using CPU (it has digested what it was sent)."""
    def quiet() -> bool:
        before = cpu_seconds(pid)
        time.sleep(0.3)
        return cpu_seconds(pid) - before < 0.03
    wait_until(quiet, timeout, 0, "the server to go idle")


def delivered(srv: ServerProc, box: str, marker: bytes) -> list[bytes]:
    new = srv.mail_dir / box / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir()) if marker in p.read_bytes()]


def code(reply: bytes) -> bytes:
    """``ddd x.y.z`` of a reply line."""
    return reply[:9]


# ---------------------------------------------------------------------------- defect 2


def test_issue10_defect2_crlf_run_in_data_is_linear(srv: ServerProc, client: Raw) -> None:
    for line in ("MAIL FROM:<a@sender.test>", "RCPT TO:<alice@example.com>"):
        assert client.cmd(line).startswith(b"250 ")
    assert client.cmd("DATA").startswith(b"354 ")
    client.send(b"x" + b"\r\n" * (3 * 1024 * 1024))          # 6 MB of CRLF
    settle(srv.pid)

    greetings: list[float] = []
    stop = threading.Event()

    def second_client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            other = Raw(srv.port, timeout=30.0)
            greetings.append(time.monotonic() - start)
            other.close()
            time.sleep(0.05)

    prober = threading.Thread(target=second_client)
    prober.start()
    try:
        before = cpu_seconds(srv.pid)
        for _ in range(20):
            client.send(b"\r\n")
            time.sleep(0.1)
        spent = cpu_seconds(srv.pid) - before
    finally:
        stop.set()
        prober.join(60)
    # Before the fix each two-byte packet rescanned the whole run: ~250 ms of CPU per read,
    # the server busy for the whole two seconds, another client's greeting up to 1 s late.
    assert spent < 0.5, f"20 two-byte packets cost the server {spent:.2f} s of CPU"
    assert greetings and max(greetings) < 2.0, greetings
    assert code(client.cmd(".")) == b"552 5.3.4"   # the stream ends in CRLF: ".\r\n" ends it
    assert client.cmd("NOOP").startswith(b"250 ")


# ---------------------------------------------------------------------------- defect 6


@pytest.mark.parametrize(("line", "reply"), [
    (b"MAIL FROM:<\xff\xfe@sender.test> SMTPUTF8", b"500 5.5.2"),
    (b"MAIL FROM:<\xff\xfe@sender.test>", b"500 5.5.2"),
    ("MAIL FROM:<a\u2028b@sender.test> SMTPUTF8".encode(), b"501 5.1.7"),
    ("MAIL FROM:<a\u0085b@sender.test> SMTPUTF8".encode(), b"501 5.1.7"),
    ("MAIL FROM:<a\u202eb@sender.test> SMTPUTF8".encode(), b"501 5.1.7"),
    ("MAIL FROM:<a@exa\u00admple.test> SMTPUTF8".encode(), b"501 5.1.7"),
    ("MAIL FROM:<j\u00f6rg@sender.test>".encode(), b"553 5.6.7"),
    (b"MAIL FROM:<a@sender.test> ENVID=a+0D+0Ab", b"501 5.5.4"),
    (b"MAIL FROM:<a@sender.test> AUTH=x+0D+0AReceived:+20forged", b"501 5.5.4"),
    ("MAIL FROM:<a@sender.test> ENVID=\u00e9".encode(), b"501 5.5.4"),
    (b"EHLO a\x01b", b"501 5.5.4"),
    (b"EHLO " + b"a" * 256, b"501 5.5.4"),
    (b"EHLO a\xffb", b"500 5.5.2"),
])
def test_issue10_defect6_sender_and_helo_refused_at_the_boundary(
        client: Raw, line: bytes, reply: bytes) -> None:
    assert code(client.cmd(line)) == reply
    assert client.cmd("NOOP").startswith(b"250 ")      # the session goes on


@pytest.mark.parametrize(("line", "reply"), [
    ("RCPT TO:<a\u2028b@example.com>".encode(), b"501 5.1.3"),
    ("RCPT TO:<a\u0085b@example.com>".encode(), b"501 5.1.3"),
    (b"RCPT TO:<\xff\xfe@example.com>", b"500 5.5.2"),
    (b"RCPT TO:<alice@example.com> ORCPT=\xff\xfe;x", b"500 5.5.2"),
    (b"RCPT TO:<alice@example.com> ORCPT=rfc822;a+0D+0Ab@x.test", b"501 5.5.4"),
    (b"RCPT TO:<alice@example.com> ORCPT=x(y;a@x.test", b"501 5.5.4"),
    (b"RCPT TO:<alice@example.com> ORCPT=utf-8;a\\x{0}b@x.test", b"501 5.5.4"),
])
def test_issue10_defect6_recipient_and_parameters_refused_at_the_boundary(
        client: Raw, line: bytes, reply: bytes) -> None:
    assert client.cmd("MAIL FROM:<a@sender.test> SMTPUTF8").startswith(b"250 ")
    assert code(client.cmd(line)) == reply
    ok = client.cmd("RCPT TO:<alice@example.com> ORCPT=utf-8;alice@example.com")
    assert ok.startswith(b"250 ")                        # the transaction goes on


def test_helo_that_postfix_takes_is_still_taken(client: Raw) -> None:
    assert client.cmd("EHLO evil.test;dkim=pass").startswith(b"250 ")
    assert client.cmd(b"EHLO " + b"a" * 255).startswith(b"250 ")


# ---------------------------------------------------------------------------- defect 8


def test_issue10_defect8_recipient_overshoot_keeps_the_transaction(
        srv: ServerProc, client: Raw) -> None:
    assert client.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
    client.send(b"RCPT TO:<alice@example.com>\r\n" * 25)
    replies = client.replies(25)
    assert [code(r) for r in replies] == [b"250 2.1.5"] * 3 + [b"452 4.5.3"] * 22, replies
    assert client.cmd("DATA").startswith(b"354 ")
    reply = client.cmd(b"Subject: issue10-defect8\r\n\r\nstill here\r\n.")
    assert code(reply) == b"250 2.0.0", reply
    wait_until(lambda: delivered(srv, "alice", b"issue10-defect8"), 20, 0.1, "delivery")


# ---------------------------------------------------------------------------- NUL


def test_issue10_nul_in_data_is_refused_in_step(srv: ServerProc, client: Raw) -> None:
    for line in ("MAIL FROM:<a@sender.test>", "RCPT TO:<alice@example.com>"):
        assert client.cmd(line).startswith(b"250 ")
    assert client.cmd("DATA").startswith(b"354 ")
    reply = client.cmd(b"Subject: issue10-nul-data\r\n\r\nbefore\x00after\r\n"
                       b"\r\n\x00.\r\nMAIL FROM:<smuggled@evil.test>\r\n.")
    assert reply == b"554 5.6.0 Error: message contains a NUL character", reply
    assert client.cmd("NOOP").startswith(b"250 ")
    assert client.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")   # no transaction left
    time.sleep(1.0)
    assert delivered(srv, "alice", b"issue10-nul-data") == []


def test_issue10_nul_in_bdat_is_refused_after_the_last_chunk(
        srv: ServerProc, client: Raw) -> None:
    for line in ("MAIL FROM:<a@sender.test>", "RCPT TO:<alice@example.com>"):
        assert client.cmd(line).startswith(b"250 ")
    first = b"Subject: issue10-nul-bdat\r\n\r\na\x00b\r\n"
    client.send(b"BDAT %d\r\n" % len(first) + first + b"BDAT 6 LAST\r\nmore\r\n")
    replies = client.replies(2)
    assert code(replies[0]) == b"250 2.0.0" and code(replies[1]) == b"554 5.6.0", replies
    assert client.cmd("NOOP").startswith(b"250 ")
    time.sleep(1.0)
    assert delivered(srv, "alice", b"issue10-nul-bdat") == []
