"""pymta's log read by the real pflogsumm and fail2ban (issue 13, item 6).

A ``pymta serve`` process gets real traffic over SMTP and submission (STARTTLS + AUTH): mail
delivered to maildirs, recipients refused, logins failed, a message bounced by the next hop
(a second pymta refusing the recipient) and the bounce delivered to its sender. Then the
captured stderr goes, unchanged, to Debian's ``pflogsumm`` and to ``fail2ban-regex`` with the
shipped ``postfix`` filter in its default mode, ``mode=auth`` (the ``postfix-sasl`` jail) and
``mode=aggressive``; their counts must be what was sent, and the address they would ban
must be the misbehaving client's only, never the well-behaved one's.

The test command installs both packages (scripts/test.sh): a missing one is a failure here.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serverproc import (
    ServerProc,
    SMTPClient,
    free_port,
    make_message,
    queued_id,
    wait_until,
)

GOOD_IP = "127.0.0.1"
BAD_IP = "127.0.0.5"      # the client that probes recipients and guesses passwords
PASSWORD = "right-secret"
REJECTED_RCPTS = ["nobody1@example.com", "nobody2@example.com"]     # 550 5.1.1 user unknown
RELAY_DENIED = "someone@remote.test"                                # 554 5.7.1, no AUTH
WRONG_PASSWORDS = [["guess1", "guess2"], ["guess3", "guess4"]]      # per submission session


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert path, f"{name} is not installed; scripts/test.sh installs it (apt)"
    return path


def _log_lines(srv: ServerProc) -> str:
    """The server's stderr as a mail log: without the test harness's run markers."""
    return "".join(line + "\n" for line in srv.stderr.splitlines()
                   if line and not line.startswith("----- run"))


def _submission(port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    client.ehlo("client.test")
    client.starttls()
    client.ehlo("client.test")
    return client


def _auth_plain(client: smtplib.SMTP, user: str, password: str) -> int:
    """One AUTH PLAIN (not smtplib's login(), which tries every mechanism in turn)."""
    client.user, client.password = user, password
    try:
        code, _ = client.auth("PLAIN", client.auth_plain)
    except smtplib.SMTPAuthenticationError as exc:
        code = exc.smtp_code
    return code


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run the servers, send the traffic, stop them; the MX's log."""
    base = tmp_path_factory.mktemp("postfix-logs")
    # the next hop: a second pymta that knows only ok@remote.test, so it refuses nobody@
    relay = ServerProc(base / "relay", MAIL_DOMAIN="remote.test",
                       MAIL_BOXES="ok@remote.test:ok/", MAIL_ALIASES="")
    passwd = base / "users"
    passwd.write_text(f"user1:{{PLAIN}}{PASSWORD}\n")
    sub_port = free_port()
    srv = ServerProc(base / "mx", SMTPD_USE_TLS="yes", PYMTA_SASL_PASSWD_FILE=str(passwd),
                     PYMTA_SUBMISSION_LISTEN=f"127.0.0.1:{sub_port}", PYMTA_WORKERS="1",
                     PYMTA_AUTH_FAIL_DELAY="0", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{relay.port}",
                     SYSLOG_LEVEL="6")
    try:
        relay.start()
        srv.start()
        _send_traffic(srv, sub_port)
        srv.wait_queue_empty(60)
        wait_until(lambda: srv.stderr.count(": removed") >= 4, 30, what="every removed line")
        assert srv.stop() == 0
        assert relay.stop() == 0
        yield _log_lines(srv)
    finally:
        srv.cleanup()
        relay.cleanup()


def _send_traffic(srv: ServerProc, sub_port: int) -> None:
    # two messages delivered to local mailboxes (three recipients)
    with SMTPClient(srv.port) as client:
        client.cmd("EHLO client.test")
        code, text = client.send("s1@remote.test", ["alice@example.com"],
                                 make_message("s1@remote.test", "alice@example.com", "one"))
        assert code == 250, text
        code, text = client.send("s2@remote.test", ["alice@example.com", "bob@example.com"],
                                 make_message("s2@remote.test", "alice@example.com", "two"))
        assert code == 250, text
        assert client.cmd("QUIT")[0] == 221
    # a client probing recipients and trying to relay
    with SMTPClient(srv.port, source=BAD_IP) as client:
        client.cmd("EHLO probe.test")
        assert client.cmd("MAIL FROM:<spam@evil.test>")[0] == 250
        for rcpt in REJECTED_RCPTS:
            assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 550
        assert client.cmd(f"RCPT TO:<{RELAY_DENIED}>")[0] == 554
        assert client.cmd("QUIT")[0] == 221
    # ... guessing passwords on the submission port
    for guesses in WRONG_PASSWORDS:
        with _submission(sub_port, BAD_IP) as client:
            for guess in guesses:
                assert _auth_plain(client, "user1", guess) == 535
    # ... and leaving without QUIT
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                  source_address=(BAD_IP, 0)) as sock, \
            sock.makefile("rb") as reader:
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO gone.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
    wait_until(lambda: "lost connection after EHLO" in srv.stderr, 15, what="the lost line")
    # an authenticated user's message that the next hop refuses: bounced, and the notice
    # delivered to the sender's mailbox
    with _submission(sub_port, GOOD_IP) as client:
        assert _auth_plain(client, "user1", PASSWORD) == 235
        refused = client.sendmail("bob@example.com", ["nobody@remote.test"],
                                  make_message("bob@example.com", "nobody@remote.test", "three"))
        assert refused == {}


# ------------------------------------------------------------------------------ pflogsumm


def _section(report: str, title: str) -> dict[str, int]:
    """``count  name`` lines of a pflogsumm section, up to the next blank line."""
    lines = report.split(f"\n{title}\n", 1)[1].split("\n")[1:]      # skip the ---- line
    rows: dict[str, int] = {}
    for line in lines:
        if not line.strip():
            break
        count, name = line.split(None, 1)
        rows[name.strip()] = int(count)
    return rows


def test_pflogsumm_counts_what_was_sent(traffic: str, tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text(traffic)
    report = subprocess.run([_tool("pflogsumm"), str(log)], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    totals = {m[2]: int(m[1]) for m in re.finditer(r"^\s+(\d+)\s+(\w[\w ]*?)\s*(?:\(|$)",
                                                   report.split("Per-Hour")[0], re.M)}
    assert totals["received"] == 3, report          # two on port 25, one on submission
    assert totals["delivered"] == 4, report         # 1 + 2 recipients, and the bounce notice
    assert totals["bounced"] == 1, report
    assert totals["rejected"] == len(REJECTED_RCPTS) + 1, report
    assert totals["deferred"] == 0 and totals["discarded"] == 0, report
    assert _section(report, "Senders by message count") == {
        "s1@remote.test": 1, "s2@remote.test": 1, "bob@example.com": 1}, report
    assert _section(report, "Recipients by message count") == {
        "alice@example.com": 2, "bob@example.com": 2}, report
    rejects = report.split("message reject detail")[1].split("message reject warning")[0]
    assert re.search(r"Recipient address rejected: User unknown in virtual mailbox table "
                     r"\(total: 2\)", rejects), rejects
    assert all(rcpt in rejects for rcpt in REJECTED_RCPTS), rejects
    assert re.search(r"Relay access denied \(total: 1\)\s+1\s+" + re.escape(BAD_IP), rejects)
    bounces = report.split("message bounce detail")[1].split("message reject detail")[0]
    assert "(total: 1)" in bounces and "User unknown" in bounces, bounces


# ------------------------------------------------------------------------------ fail2ban


def _fail2ban(log: Path, filt: str) -> tuple[int, list[str]]:
    """fail2ban-regex with a shipped filter: the matched line count and the address of each
    match (``-o ip``)."""
    out = subprocess.run([_tool("fail2ban-regex"), str(log), filt], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    match = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched, \d+ missed", out, re.M)
    assert match, out
    ips = subprocess.run([_tool("fail2ban-regex"), "-o", "ip", str(log), filt],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return int(match[1]), ips


@pytest.mark.parametrize(("filt", "expected"), [
    # the default mode (jail [postfix]): the RCPT rejects
    ("postfix", len(REJECTED_RCPTS) + 1),
    # jail [postfix-sasl]: every failed AUTH
    ("postfix[mode=auth]", sum(map(len, WRONG_PASSWORDS))),
    # all of it, and the sessions that ended with failed AUTHs only (disconnect ... auth=0/2)
    # or went away after EHLO (lost connection after EHLO)
    ("postfix[mode=aggressive]",
     len(REJECTED_RCPTS) + 1 + sum(map(len, WRONG_PASSWORDS)) + len(WRONG_PASSWORDS) + 1),
])
def test_fail2ban_postfix_filters_match_the_bad_client_only(traffic: str, tmp_path: Path,
                                                            filt: str, expected: int) -> None:
    log = tmp_path / "mail.log"
    log.write_text(traffic)
    matched, ips = _fail2ban(log, filt)
    assert matched == expected, traffic
    assert ips == [BAD_IP] * expected, ips


def test_the_lines_read_are_postfix_lines(traffic: str) -> None:
    """What the tools key on, word for word: the tag, the queue id shared by the smtpd,
    cleanup, qmgr and delivery lines, the disconnect line's command counts."""
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d mx "
    for line in traffic.splitlines():
        assert re.match(stamp + r"postfix/(smtpd|cleanup|qmgr|local|smtp|bounce|master|pymta)"
                        r"\[\d+\]: ", line), line
    qid = re.search(r"postfix/smtpd\[\d+\]: (\w+): client=localhost\[127\.0\.0\.1\]\n.*"
                    r"postfix/cleanup\[\d+\]: \1: message-id=<", traffic)
    assert qid, traffic
    for tagged in ("postfix/qmgr[", "postfix/local["):
        assert re.search(re.escape(tagged) + r"\d+\]: " + qid[1] + r": ", traffic), tagged
    assert re.search(r"postfix/smtpd\[\d+\]: \w+: client=localhost\[127\.0\.0\.1\], "
                     r"sasl_method=PLAIN, sasl_username=user1$", traffic, re.M), traffic
    assert re.search(r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 mail=2 rcpt=3 data=2 "
                     r"quit=1 commands=9$", traffic, re.M), traffic
    assert re.search(rf"disconnect from unknown\[{re.escape(BAD_IP)}\] ehlo=2 starttls=1 "
                     r"auth=0/2 quit=1 commands=4/6$", traffic, re.M), traffic


# ------------------------------------------------------------------------------ JSON lines


def test_json_lines_carry_the_fields(tmp_path: Path) -> None:
    srv = ServerProc(tmp_path / "json", PYMTA_LOG_FORMAT="json", PYMTA_WORKERS="1",
                     SYSLOG_LEVEL="6")
    try:
        srv.start()
        with SMTPClient(srv.port) as client:
            client.cmd("EHLO client.test")
            code, text = client.send("s1@remote.test", ["alice@example.com"],
                                     make_message("s1@remote.test", "alice@example.com", "j"))
            assert code == 250, text
            assert client.cmd("RCPT TO:<x@remote.test>")[0] == 503     # no MAIL: not logged
            client.cmd("MAIL FROM:<s1@remote.test>")
            assert client.cmd("RCPT TO:<nobody@example.com>")[0] == 550
        qid = queued_id(text)
        srv.wait_queue_empty(30)
        wait_until(lambda: f"{qid}: removed" in srv.stderr, 15, what="the removed line")
        assert srv.stop() == 0
    finally:
        srv.cleanup()
    entries = [json.loads(line) for line in _log_lines(srv).splitlines()]
    by_message = {e["message"]: e for e in entries}
    received = by_message[f"{qid}: client=localhost[127.0.0.1]"]
    assert (received["program"], received["qid"], received["client"]) == \
        ("postfix/smtpd", qid, "localhost[127.0.0.1]")
    [sent] = [e for e in entries if e.get("event") == "recipient"]
    assert (sent["program"], sent["qid"], sent["to"], sent["status"], sent["dsn"]) == \
        ("postfix/local", qid, "alice@example.com", "sent", "2.0.0")
    assert sent["message"].startswith(f"{qid}: to=<alice@example.com>, relay=local, delay=")
    [active] = [e for e in entries if e.get("event") == "active"]
    assert (active["program"], active["from"], active["nrcpt"]) == \
        ("postfix/qmgr", "s1@remote.test", 1)
    [reject] = [e for e in entries if e.get("verdict") == "reject"]
    assert reject["qid"] == "NOQUEUE" and reject["stage"] == "RCPT"
    assert reject["message"].startswith("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: "
                                        "550 5.1.1 <nobody@example.com>:")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d", e["time"])
               for e in entries)
