"""SIGHUP reloads and SIGTERM drains a real ``pymta serve`` process (issue 13, item 3).

What an administrator sees: ``kill -HUP`` after editing the TOML file's tables or the SASL
passwd file makes every worker use the new ones, says in the log what changed and what waits
for a restart, and a broken file changes nothing; ``kill -TERM`` lets the mail transactions
under way finish (their ``250`` sent and the message kept), answers ``421 4.3.2`` to
everything new, and exits 0 with nothing acknowledged lost.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
from email.parser import BytesHeaderParser
from pathlib import Path

from pymta.app import DELIVERY_STOP_GRACE, MTA
from tests.conftest import RawClient, make_config
from tests.integration import serverproc
from tests.integration.serverproc import (
    ServerProc,
    SMTPClient,
    free_port,
    make_message,
    queued_id,
    wait_until,
)
from tests.tlsca import TestCA

server_factory = serverproc.server_factory  # the fixture

TOML_BOXES = 'mail_boxes = "{boxes}"\npymta_max_recipients = {max_rcpt}\n'


def _write_toml(path: Path, boxes: str, max_rcpt: int = 1000) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(TOML_BOXES.format(boxes=boxes, max_rcpt=max_rcpt))
    tmp.replace(path)


def _rcpt_code(port: int, rcpt: str) -> int:
    with SMTPClient(port) as client:
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<someone@remote.test>")
        code, _ = client.cmd(f"RCPT TO:<{rcpt}>")
        client.cmd("QUIT")
        return code


def _log_count(srv: ServerProc, text: str) -> int:
    return srv.stderr.count(text)


def _maildir_files(srv: ServerProc, box: str) -> list[Path]:
    new = srv.mail_dir / box / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


# ---------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_toml_tables_in_every_worker(server_factory, tmp_path: Path) -> None:
    toml = tmp_path / "pymta.toml"
    _write_toml(toml, "alice@example.com:alice/")
    srv = server_factory(PYMTA_CONFIG=str(toml), MAIL_BOXES="", PYMTA_WORKERS="2").start()
    assert _rcpt_code(srv.port, "carol@example.com") == 550

    _write_toml(toml, "alice@example.com:alice/ carol@example.com:carol/", max_rcpt=5)
    srv.signal(signal.SIGHUP)
    wait_until(lambda: _log_count(srv, "reloaded: MAIL_BOXES") >= 2, 15,
               what="both workers to log the reload")
    assert srv.running, "SIGHUP must not stop the server"
    assert "applied only by a restart: PYMTA_MAX_RECIPIENTS" in srv.stderr
    # the kernel spreads connections over both workers: every one knows carol now
    assert {_rcpt_code(srv.port, "carol@example.com") for _ in range(12)} == {250}
    with SMTPClient(srv.port) as client:
        client.cmd("EHLO client.test")
        code, text = client.send("someone@remote.test", ["carol@example.com"],
                                 make_message("someone@remote.test", "carol@example.com",
                                              "after reload"))
        assert code == 250, text
    wait_until(lambda: _maildir_files(srv, "carol"), 15, what="delivery to carol")
    assert srv.stop() == 0


def test_sighup_with_a_bad_configuration_keeps_the_running_one(server_factory,
                                                               tmp_path: Path) -> None:
    toml = tmp_path / "pymta.toml"
    _write_toml(toml, "alice@example.com:alice/ carol@example.com:carol/")
    srv = server_factory(PYMTA_CONFIG=str(toml), MAIL_BOXES="", PYMTA_WORKERS="2").start()
    assert _rcpt_code(srv.port, "carol@example.com") == 250

    toml.write_text('mail_boxes = "alice@example.com:alice/"\nmail_boxes_typo = 1\n')
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused, the running configuration stays" in srv.stderr, 15,
               what="the refusal in the log")
    assert "unknown setting 'mail_boxes_typo'" in srv.stderr
    time.sleep(0.5)    # the workers were never asked: nothing of the file may be applied
    assert "reloaded:" not in srv.stderr
    assert {_rcpt_code(srv.port, "carol@example.com") for _ in range(8)} == {250}

    toml.write_text("this is [ not TOML")
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "is not valid TOML" in srv.stderr, 15, what="the TOML error")
    assert srv.running
    assert _rcpt_code(srv.port, "carol@example.com") == 250
    assert srv.stop() == 0


def test_sighup_rereads_the_sasl_passwd_file(server_factory, tmp_path: Path) -> None:
    passwd = tmp_path / "users"
    passwd.write_text("# users of the submission port\nuser1:{PLAIN}first-secret\n")
    sub_port = free_port()
    srv = server_factory(SMTPD_USE_TLS="yes", PYMTA_SASL_PASSWD_FILE=str(passwd),
                         PYMTA_SUBMISSION_LISTEN=f"127.0.0.1:{sub_port}",
                         PYMTA_WORKERS="1", PYMTA_AUTH_FAIL_DELAY="0").start()

    def login(password: str) -> int:
        with smtplib.SMTP("127.0.0.1", sub_port, timeout=20) as client:
            client.starttls()
            try:
                code, _ = client.login("user1", password)
            except smtplib.SMTPAuthenticationError as exc:
                code = exc.smtp_code
            return code

    assert login("first-secret") == 235
    assert login("second-secret") == 535
    passwd.write_text("user1:{PLAIN}second-secret\n")
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded:" in srv.stderr, 15, what="the reload")
    assert login("second-secret") == 235
    assert login("first-secret") == 535

    passwd.write_text("user1:{NO-SUCH-SCHEME}x\n")     # a broken file: the old users stay
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in srv.stderr, 15, what="the refusal")
    assert "PYMTA_SASL_PASSWD_FILE" in srv.stderr.split("reload refused", 1)[1]
    assert login("second-secret") == 235
    assert srv.stop() == 0


def _served_cn(port: int) -> str:
    """The CN of the certificate a STARTTLS client gets (the real ``openssl s_client``)."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-starttls", "smtp"], input=b"", capture_output=True,
                         timeout=30).stdout.decode("utf-8", "replace")
    return next((line.split("CN = ", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("subject=") and "CN = " in line), "")


def test_sighup_serves_replaced_certificate_files(server_factory, tmp_path: Path) -> None:
    """A certbot-style renewal: new files in place, ``kill -HUP``; open sessions keep theirs."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.write("mx", ("old.example.com", "mx.example.com"))
    srv = server_factory(SMTPD_TLS_CERT_FILE=str(cert), SMTPD_TLS_KEY_FILE=str(key),
                         PYMTA_WORKERS="2").start()
    assert _served_cn(srv.port) == "old.example.com"

    new_cert, new_key = ca.issue(("new.example.com", "mx.example.com"))
    cert.write_bytes(new_cert)
    key.write_bytes(new_key)
    srv.signal(signal.SIGHUP)
    wait_until(lambda: _log_count(srv, "reloaded:") >= 2, 15, what="both workers to reload")
    assert {_served_cn(srv.port) for _ in range(6)} == {"new.example.com"}

    _, other_key = ca.issue(("new.example.com",))
    key.write_bytes(other_key)            # a key of another certificate: refused
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in srv.stderr, 15, what="the refusal")
    assert "SMTPD_TLS_KEY_FILE" in srv.stderr.split("reload refused", 1)[1]
    assert {_served_cn(srv.port) for _ in range(4)} == {"new.example.com"}
    assert srv.stop() == 0


# ---------------------------------------------------------------------------- SIGTERM


def _open_transaction(port: int, subject: str) -> SMTPClient:
    """A session in the middle of its message text: MAIL, RCPT, DATA and half the text."""
    client = SMTPClient(port)
    client.cmd("EHLO client.test")
    assert client.cmd("MAIL FROM:<someone@remote.test>")[0] == 250
    assert client.cmd("RCPT TO:<alice@example.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.sock.sendall(make_message("someone@remote.test", "alice@example.com", subject)
                        + b"first half\r\n")
    return client


def test_sigterm_lets_a_transaction_finish_and_refuses_new_ones(server_factory) -> None:
    srv = server_factory(PYMTA_WORKERS="1", PYMTA_SHUTDOWN_TIMEOUT="20").start()
    busy = _open_transaction(srv.port, "drained")
    idle = SMTPClient(srv.port)
    assert idle.cmd("EHLO client.test")[0] == 250
    time.sleep(0.3)
    srv.signal(signal.SIGTERM)

    # outside a transaction: told at once
    code, text = idle.reply()
    assert (code, text.split()[1]) == (421, "4.3.2"), text
    # nothing new is accepted
    wait_until(lambda: not _connects(srv.port), 10, what="the listener to close")
    time.sleep(0.5)
    assert srv.running, "the server must wait for the transaction under way"

    busy.sock.sendall(b"second half\r\n.\r\n")
    code, text = busy.reply()
    assert code == 250, text
    qid = queued_id(text)
    code, text = busy.cmd("MAIL FROM:<someone@remote.test>")    # a new transaction
    assert (code, text.split()[1]) == (421, "4.3.2"), text
    assert srv.wait(20) == 0
    # the acknowledged message is kept: delivered already, or delivered after a restart
    srv.start()
    wait_until(lambda: _maildir_files(srv, "alice"), 20, what="the drained message")
    [mail] = _maildir_files(srv, "alice")
    assert b"second half" in mail.read_bytes()
    assert qid in srv.stderr
    assert srv.stop() == 0


def test_sigterm_drops_a_transaction_that_outlasts_the_timeout(server_factory) -> None:
    srv = server_factory(PYMTA_WORKERS="1", PYMTA_SHUTDOWN_TIMEOUT="1").start()
    slow = _open_transaction(srv.port, "too slow")
    time.sleep(0.3)
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    code, text = slow.reply()
    assert (code, text.split()[1]) == (421, "4.3.2"), text
    assert srv.wait(20) == 0
    assert time.monotonic() - started < 10
    srv.start()
    time.sleep(1.0)
    assert _maildir_files(srv, "alice") == [], "a message never acknowledged was delivered"
    assert srv.stop() == 0


def test_sigterm_under_load_loses_nothing_acknowledged(server_factory) -> None:
    srv = server_factory(PYMTA_WORKERS="2", PYMTA_SHUTDOWN_TIMEOUT="20").start()
    acknowledged: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set():
            subject = f"load-{worker}-{n}"
            n += 1
            try:
                with SMTPClient(srv.port, timeout=30) as client:
                    if client.greeting[0] != 220 or client.cmd("EHLO c.test")[0] != 250:
                        return
                    code, _ = client.send("someone@remote.test", ["alice@example.com"],
                                          make_message("someone@remote.test",
                                                       "alice@example.com", subject,
                                                       "x" * 2000 + "\r\n"))
            except OSError:
                return          # refused or cut: the server is stopping
            with lock:
                if code == 250:
                    acknowledged.append(subject)
                else:
                    refused.append(code)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 30, 30, what="some traffic")
    srv.signal(signal.SIGTERM)
    assert srv.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    # a session that had not begun its transaction is told to come back later
    assert set(refused) <= {421}, refused

    srv.start()     # delivers what the stopped server had queued
    want = set(acknowledged)

    def delivered() -> list[str]:
        parser = BytesHeaderParser()
        return [str(parser.parsebytes(path.read_bytes())["Subject"])
                for path in _maildir_files(srv, "alice")]

    wait_until(lambda: want <= set(delivered()), 30, what="every acknowledged message")
    got = delivered()
    assert len(got) == len(set(got)), "a message was delivered twice"
    assert set(got) == want, f"delivered but never acknowledged: {set(got) - want}"
    assert srv.stop() == 0


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(2.0)
            return s.recv(3) == b"220"
    except OSError:
        return False


async def test_review_a_drain_that_used_its_time_leaves_deliveries_their_grace(
        tmp_path: Path) -> None:
    """Issue 13 review: the delivery attempts running at a stop got only what was left of
    the drain (nothing, when a slow session used it all) and could be cancelled after their
    peer took the message: sent twice after the restart. They always get at least
    DELIVERY_STOP_GRACE."""
    mta = MTA(make_config(tmp_path))
    await mta.start()
    assert mta.manager is not None
    graces: list[float | None] = []
    original = mta.manager.stop

    async def recording_stop(grace: float | None = None) -> None:
        graces.append(grace)
        await original(grace)

    mta.manager.stop = recording_stop     # type: ignore[method-assign]
    client = await RawClient.connect(*mta.addresses["smtp"][0])
    try:
        await client.reply()
        for line, code in ((b"EHLO c.test", 250), (b"MAIL FROM:<s@remote.test>", 250),
                           (b"RCPT TO:<alice@example.com>", 250), (b"DATA", 354)):
            await client.send(line + b"\r\n")
            assert (await client.reply())[0] == code
        await client.send(b"Subject: never ends\r\n\r\nhalf")   # holds the drain to its end
        await mta.stop(drain=0.5)
    finally:
        await client.close()
    assert graces and graces[0] is not None and graces[0] >= DELIVERY_STOP_GRACE


def _worker_pids(srv: ServerProc) -> list[int]:
    children = Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_review_supervisor_refuses_certificates_the_workers_would(server_factory,
                                                                  tmp_path: Path) -> None:
    """Issue 13 review: the supervisor checked a reloaded configuration without its
    certificates, kept it, and every worker it forked later (after a crash) failed to start
    from it, in a loop. Now it refuses as the workers do; a replaced worker serves the
    running certificate."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.write("good", ("good.example.com", "mx.example.com"))
    bad_cert, _ = ca.write("bad", ("bad.example.com",))
    toml = tmp_path / "pymta.toml"
    toml.write_text(f'smtpd_tls_cert_file = "{cert}"\nsmtpd_tls_key_file = "{key}"\n')
    srv = server_factory(PYMTA_CONFIG=str(toml), PYMTA_WORKERS="2").start()
    toml.write_text(f'smtpd_tls_cert_file = "{bad_cert}"\nsmtpd_tls_key_file = "{key}"\n')
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in srv.stderr, 15, what="the refusal")
    time.sleep(0.5)
    assert srv.stderr.count("reload refused") == 1, "the workers must not be asked"
    os.kill(_worker_pids(srv)[0], signal.SIGKILL)
    wait_until(lambda: "restarting" in srv.stderr and len(_worker_pids(srv)) == 2, 15,
               what="the replacement worker")
    time.sleep(2.5)     # a crash loop would restart it again (one second apart)
    assert srv.stderr.count("restarting") == 1, srv.stderr[-3000:]
    assert {_served_cn(srv.port) for _ in range(6)} == {"good.example.com"}
    assert srv.stop() == 0


def test_review_sighup_while_draining_is_ignored(server_factory) -> None:
    """Issue 13 review: a reload could start on a server being stopped (and leave what it
    built open); now it is ignored, and the drain goes on."""
    srv = server_factory(PYMTA_WORKERS="1", PYMTA_SHUTDOWN_TIMEOUT="20").start()
    busy = _open_transaction(srv.port, "hup while draining")
    srv.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in srv.stderr, 10, what="the drain")
    srv.signal(signal.SIGHUP)
    wait_until(lambda: "reload ignored: the server is stopping" in srv.stderr, 10,
               what="the ignored reload")
    busy.sock.sendall(b"second half\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert srv.wait(20) == 0
    assert "reloaded:" not in srv.stderr
