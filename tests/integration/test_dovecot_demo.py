"""The demo's topology without Docker: pymta delivers into maildirs that a real Dovecot serves.

``demo/docker-compose.yml`` runs pymta (uid 5000) and Dovecot on one shared volume; here the
same two run as processes: ``python -m pymta serve`` as uid 5000 (the image's ``USER``), its
``PYMTA_MAIL_DIR`` the mail root of a throwaway Dovecot whose passwd-file users are uid 5000
too, with ``mail_location = maildir:~/Maildir`` and each user's home at
``<root>/<domain>/<local>``; so ``MAIL_BOXES`` names ``<domain>/<local>/Maildir/``. What a
user sees:

- over IMAP, the message pymta stored: the bytes sent with our trace fields in front, its size
  as Dovecot computes it from the file, ``\\Seen`` written back into the file's name;
- over POP3, the same messages (``STAT``/``LIST`` sizes, ``RETR`` bodies);
- a submission client authenticating to pymta with a password only Dovecot knows
  (``SMTPD_SASL_IMAPHOST``: pymta asks Dovecot's IMAP), its message then read over IMAP;
- the demo's own files doing the same: ``demo/openldap`` (slapd.conf, seed.ldif),
  ``demo/dovecot`` (dovecot.conf, dovecot-ldap.conf.ext) and pymta's environment from
  ``demo/docker-compose.yml``, with only host names, ports and paths changed (the scanners
  are left out: they have their own tests).

Both sides must be uid 5000 because pymta writes maildirs private to its uid (0700/0600) and
Dovecot refuses mail access as root. The server's interpreter must then be one uid 5000 can
execute: the venv's when it can (a Debian python3), else the system's python of the same
minor version with the venv's site-packages on ``PYTHONPATH`` (a pyenv build under ``/root``).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import smtplib
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration._support import client_tls_context
from tests.integration.serverproc import (
    REPO,
    ServerProc,
    clean_environ,
    free_port,
    smtp_send,
    wait_until,
)
from tests.services.base import (
    Service,
    choose_port,
    make_scratch_dir,
    require_binary,
    run,
    wait_for_greeting,
)
from tests.services.base import wait_until as service_wait
from tests.services.dovecot import MAIL_UID, DovecotServer
from tests.services.slapd import SlapdServer

# Dovecot's passwd-file alternates {PLAIN} and {SHA512-CRYPT} hashes in this order: bob and
# dave have crypt hashes, so pymta cannot be checking the password itself.
USERS = {"alice@example.com": "alicepw", "bob@example.com": "bobpw",
         "carol@example.com": "carolpw", "dave@example.com": "davepw"}
DELIVERY_TIMEOUT = 30.0


def _as_vmail() -> None:
    """preexec_fn: the server runs as the mail uid/gid, as in the image (``USER 5000:5000``)."""
    os.setgroups([])
    os.setgid(MAIL_UID)
    os.setuid(MAIL_UID)


def vmail_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) with which uid 5000 can import pymta; fails saying why not."""
    paths = sysconfig.get_paths()
    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for exe in (sys.executable, f"/usr/bin/python{version}"):
        try:
            proc = subprocess.run(
                [exe, "-c", "import pymta.app, pymta.delivery.local, pymta.backends.imapauth"],
                cwd=REPO, env=clean_environ(PYTHONPATH=pythonpath), preexec_fn=_as_vmail,
                capture_output=True, text=True, timeout=60)
        except OSError as exc:
            tried.append(f"{exe}: {exc}")
            continue
        if proc.returncode == 0:
            return exe, pythonpath
        tried.append(f"{exe}: exit {proc.returncode}: {proc.stderr[-500:]}")
    pytest.fail(f"no Python {version} that uid {MAIL_UID} can run pymta with:\n"
                + "\n".join(tried))


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(lmtp=False, pop3=True, users=USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mta(dovecot: DovecotServer) -> Iterator[ServerProc]:
    # pytest's tmp_path is 0700 root: uid 5000 could not reach it
    base = make_scratch_dir("demo")
    os.chown(base, MAIL_UID, MAIL_UID)
    boxes = " ".join(f"{u}:{u.partition('@')[2]}/{u.partition('@')[0]}/Maildir/" for u in USERS)
    python, pythonpath = vmail_python()
    srv = ServerProc(
        base, python=python, preexec_fn=_as_vmail,
        PYTHONPATH=pythonpath,
        PYTHONDONTWRITEBYTECODE="1",
        MAIL_BOXES=boxes,
        MAIL_ALIASES="",
        PYMTA_MAIL_DIR=str(dovecot.mail_root),
        SMTPD_USE_TLS="yes",
        PYMTA_SUBMISSION_LISTEN=f"127.0.0.1:{free_port()}",
        SMTPD_SASL_IMAPHOST=f"{dovecot.host}:{dovecot.imap_port}",
        PYMTA_AUTH_FAIL_DELAY="0.01",
        PYMTA_AUTH_FAIL_DELAY_MAX="0.05",
        # no DNS on the test machine: SPF of remote.test would only wait for a timeout
        PYMTA_SPF="no",
    )
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def submission_port(srv: ServerProc) -> int:
    return int(srv.env["PYMTA_SUBMISSION_LISTEN"].rpartition(":")[2])


def message(sender: str, rcpt: str, subject: str) -> bytes:
    """A message with what a mail store could get wrong: a leading dot, 8-bit text, a long
    line, a blank line inside the body; CRLF line ends as sent on the wire."""
    lines = [f"From: <{sender}>", f"To: <{rcpt}>", f"Subject: {subject}",
             f"Date: {formatdate()}", f"Message-ID: <{subject.replace(' ', '.')}@client.test>",
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: 8bit", "",
             f"Hello, this is {subject}.", ".a line that starts with a dot", "",
             "Gr\u00fc\u00dfe aus K\u00f6ln", "x" * 900, "-- ", "the end"]
    return ("\r\n".join(lines) + "\r\n").encode()


def wait_for_files(dovecot: DovecotServer, user: str, count: int) -> list[Path]:
    return wait_until(lambda: (files := dovecot.delivered_files(user)) and
                      len(files) >= count and files, DELIVERY_TIMEOUT, 0.1,
                      f"{count} message(s) in {user}'s maildir")


def as_served(stored: bytes) -> bytes:
    """The file (LF line ends, as maildir keeps them) as IMAP and POP3 serve it: CRLF."""
    return stored.replace(b"\n", b"\r\n")


def assert_sent_with_trace(served: bytes, sent: bytes, rcpt: str) -> bytes:
    """``served`` is ``sent`` with header fields in front, among them our Received: for
    ``rcpt``; returns that prefix."""
    assert served.endswith(sent), served[:2000]
    prefix = served[:-len(sent)]
    assert re.match(rb"(?:[!-9;-~]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+\Z", prefix), prefix
    assert re.search(rb"^Received: from .*\r\n(?:\t.*\r\n)*\tby mx\.example\.com \(pymta\)",
                     prefix, re.M), prefix
    assert f"for <{rcpt}>".encode() in prefix, prefix
    return prefix


def imap_login(dovecot: DovecotServer, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    typ, _ = client.login(user, USERS[user])
    assert typ == "OK"
    return client


def fetch_item(client: imaplib.IMAP4, item: str) -> bytes:
    """The raw untagged FETCH answer for message 1 (literals joined in)."""
    typ, data = client.fetch("1", f"({item})")
    assert typ == "OK", data
    parts = [b"".join(p) if isinstance(p, tuple) else p for p in data if p is not None]
    return b"".join(parts)


def fetch_body(client: imaplib.IMAP4, seq: str) -> bytes:
    typ, data = client.fetch(seq, "(BODY.PEEK[])")
    assert typ == "OK", data
    literal = data[0]
    assert isinstance(literal, tuple), data
    return literal[1]


def fetch_flags(client: imaplib.IMAP4) -> list[str]:
    match = re.search(rb"FLAGS \(([^)]*)\)", fetch_item(client, "FLAGS"))
    assert match, "no FLAGS in the answer"
    return match.group(1).decode().split()


# ------------------------------------------------------------------------------ IMAP


def test_imap_serves_what_pymta_delivered(dovecot: DovecotServer, mta: ServerProc) -> None:
    user = "alice@example.com"
    sent = message("sender@remote.test", user, "imap check")
    code, text = smtp_send(mta.port, "sender@remote.test", [user], sent)
    assert code == 250, text
    [path] = wait_for_files(dovecot, user, 1)
    assert path.parent.name == "new"
    stored = path.read_bytes()
    assert b"\r\n" not in stored          # maildir keeps LF; the servers give CRLF
    assert path.stat().st_uid == MAIL_UID

    client = imap_login(dovecot, user)
    try:
        typ, boxes = client.list()
        assert typ == "OK" and any(b.endswith(b" INBOX") for b in boxes if isinstance(b, bytes)), \
            boxes
        typ, count = client.select("INBOX")
        assert typ == "OK" and count == [b"1"], count
        served = fetch_body(client, "1")
        assert served == as_served(stored)
        assert_sent_with_trace(served, sent, user)
        size = re.search(rb"RFC822\.SIZE (\d+)", fetch_item(client, "RFC822.SIZE"))
        assert size and int(size.group(1)) == len(served) == len(stored) + stored.count(b"\n")
        assert "\\Seen" not in fetch_flags(client)
        typ, _ = client.store("1", "+FLAGS", "\\Seen")
        assert typ == "OK"
        assert "\\Seen" in fetch_flags(client)
    finally:
        client.logout()

    # the flag lives in the file's name (cur/...:2,S), the content untouched
    [seen] = dovecot.delivered_files(user)
    assert seen.parent.name == "cur" and seen.name.endswith(":2,S"), seen
    assert seen.name.startswith(path.name)     # pymta's unique name, kept by Dovecot
    assert seen.read_bytes() == stored
    client = imap_login(dovecot, user)         # a new session sees the flag too
    try:
        client.select("INBOX", readonly=True)
        assert "\\Seen" in fetch_flags(client)
    finally:
        client.logout()


# ------------------------------------------------------------------------------ POP3


def test_pop3_serves_what_pymta_delivered(dovecot: DovecotServer, mta: ServerProc) -> None:
    user = "bob@example.com"
    sent = [message("sender@remote.test", user, f"pop3 check {n}") for n in (1, 2)]
    for data in sent:
        code, text = smtp_send(mta.port, "sender@remote.test", [user], data)
        assert code == 250, text
    files = wait_for_files(dovecot, user, 2)
    stored = {as_served(p.read_bytes()) for p in files}
    assert len(stored) == 2

    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        client.user(user)
        assert client.pass_(USERS[user]).startswith(b"+OK")
        count, total = client.stat()
        assert count == 2 and total == sum(len(s) for s in stored)
        _, listing, _ = client.list()
        sizes = dict(line.decode().split() for line in listing)
        served = set()
        for number, size in sizes.items():
            _, lines, _ = client.retr(int(number))
            body = b"\r\n".join(lines) + b"\r\n"
            assert len(body) == int(size)
            served.add(body)
        assert served == stored
        for data in sent:
            assert sum(body.endswith(data) for body in served) == 1
            [body] = [b for b in served if b.endswith(data)]
            assert_sent_with_trace(body, data, user)
    finally:
        client.quit()


# ------------------------------------------------------------------------------ submission


def login(port: int, user: str, password: str) -> smtplib.SMTP:
    """587 with STARTTLS (pymta's self-signed certificate) and AUTH; raises on 535."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("client.test")
        client.starttls(context=client_tls_context())      # pymta's self-signed pair
        client.ehlo("client.test")
        client.login(user, password)
    except BaseException:
        client.close()
        raise
    return client


def test_submission_authenticated_by_dovecot(dovecot: DovecotServer, mta: ServerProc) -> None:
    port = submission_port(mta)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        login(port, "dave@example.com", "not-davepw")
    assert refused.value.smtp_code == 535

    sender, rcpt = "dave@example.com", "carol@example.com"
    sent = message(sender, rcpt, "submission check")
    client = login(port, sender, USERS[sender])     # a {SHA512-CRYPT} user of Dovecot's
    try:
        assert client.sendmail(sender, [rcpt], sent) == {}
    finally:
        client.quit()
    # the password was checked by Dovecot's IMAP login (after STARTTLS), not by pymta
    log = (dovecot.dir / "dovecot.log").read_text(errors="replace")
    assert re.search(r"imap-login: Info: Login: user=<dave@example\.com>, .*\bTLS\b", log), \
        log[-2000:]

    wait_for_files(dovecot, rcpt, 1)
    imap = imap_login(dovecot, rcpt)
    try:
        imap.select("INBOX", readonly=True)
        served = fetch_body(imap, "1")
    finally:
        imap.logout()
    prefix = assert_sent_with_trace(served, sent, rcpt)
    assert b"(Authenticated sender: dave@example.com)" in prefix, prefix
    assert b"with ESMTPSA id" in prefix, prefix

    # a user Dovecot gets while both run can submit: no copy of the users in pymta (Dovecot
    # looks at its passwd-file again at most once a second: a few tries)
    dovecot.add_user("erin@example.com", "erinpw")

    def erin_logs_in() -> bool:
        try:
            login(port, "erin@example.com", "erinpw").quit()
        except smtplib.SMTPAuthenticationError:
            return False
        return True

    wait_until(erin_logs_in, 10.0, 0.3, "a new Dovecot user accepted by pymta")


# ------------------------------------------------------------------------------ demo/ itself

DEMO = REPO / "demo"


def replaced(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; fails when the demo file no longer has ``old``, so a
    change there cannot leave this test checking something else."""
    assert old in text, f"{old!r} not in the demo file"
    return text.replace(old, new)


class DemoSlapd(SlapdServer):
    """slapd with ``demo/openldap/slapd.conf`` and ``seed.ldif`` (pid file and database moved
    into the scratch dir)."""

    def _start(self) -> None:
        slapd = require_binary("slapd", "slapd")
        slapadd = require_binary("slapadd", "slapd")
        self.port, self.ports_fixed = choose_port("PYMTA_TEST_DEMO_SLAPD_PORT", 3390)
        self.url = f"ldap://{self.host}:{self.port}"
        T = self.dir
        (T / "db").mkdir()
        text = (DEMO / "openldap" / "slapd.conf").read_text()
        text = replaced(text, "/run/slapd/slapd.pid", str(T / "slapd.pid"))
        text = replaced(text, "directory       /var/lib/ldap", f"directory       {T}/db")
        conf = T / "slapd.conf"
        conf.write_text(text)
        run([slapadd, "-f", str(conf), "-l", str(DEMO / "openldap" / "seed.ldif")])
        self._spawn([slapd, "-d", "256", "-f", str(conf), "-h", f"{self.url}/"], T / "slapd.log")
        service_wait(self._ready, 15.0, what=f"slapd bind on {self.url}", on_timeout=self.logs)


class DemoDovecot(Service):
    """Dovecot with ``demo/dovecot/dovecot.conf`` and its LDAP passdb file; listeners, run
    and log paths, the LDAP host and the mail root moved to this machine's scratch dir."""

    name = "dovecot-demo"
    stop_timeout = 10.0
    host = "127.0.0.1"

    def __init__(self, ldap: DemoSlapd) -> None:
        super().__init__()
        self.ldap = ldap
        self.imap_port = self.pop3_port = 0
        self.mail_root = Path()

    def log_paths(self) -> list[Path]:
        return [self.dir / "dovecot.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        dovecot = require_binary("dovecot", "dovecot-core")
        if not Path("/usr/lib/dovecot/modules/auth/libauthdb_ldap.so").exists():
            raise AssertionError("dovecot's LDAP driver not found: install the Debian package "
                                 "'dovecot-ldap' (scripts/test.sh does)")
        T = self.dir
        self.imap_port, self.pop3_port = free_port(), free_port()
        for sub in ("run", "state", "mail"):
            (T / sub).mkdir()
        self.mail_root = T / "mail"
        os.chown(self.mail_root, MAIL_UID, MAIL_UID)   # as the image's /srv/mail
        ldap_conf = (DEMO / "dovecot" / "dovecot-ldap.conf.ext").read_text()
        ldap_conf = replaced(ldap_conf, "hosts = openldap:389",
                             f"hosts = {self.ldap.host}:{self.ldap.port}")
        (T / "dovecot-ldap.conf.ext").write_text(ldap_conf)
        conf = (DEMO / "dovecot" / "dovecot.conf").read_text()
        conf = replaced(conf, "/etc/dovecot/dovecot-ldap.conf.ext",
                        str(T / "dovecot-ldap.conf.ext"))
        conf = replaced(conf, "home=/srv/mail/", f"home={self.mail_root}/")
        conf = replaced(conf, "log_path = /dev/stderr", f"log_path = {T}/dovecot.log")
        # later settings win in Dovecot's configuration: where this instance runs, and no
        # waiting after a refused password (2 s and more by default)
        conf += f"""
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
instance_name = pymta-test-{T.name}
base_dir = {T}/run
state_dir = {T}/state
listen = {self.host}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""
        (T / "dovecot.conf").write_text(conf)
        self._spawn([dovecot, "-F", "-c", str(T / "dovecot.conf")], T / "stdout.log")
        wait_for_greeting(self.host, self.imap_port, b"* OK", 20.0, self._child_alive,
                          self.logs, "demo dovecot imap")
        wait_for_greeting(self.host, self.pop3_port, b"+OK", 20.0, self._child_alive,
                          self.logs, "demo dovecot pop3")


def compose_pymta_env() -> dict[str, str]:
    """pymta's environment in demo/docker-compose.yml, ``${VAR-default}`` at its default."""
    data: Any = yaml.safe_load((DEMO / "docker-compose.yml").read_text())
    env = {}
    for item in data["services"]["pymta"]["environment"]:
        name, _, value = item.partition("=")
        env[name] = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*-([^}]*)\}", r"\1", value)
    return env


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[DemoSlapd, DemoDovecot, ServerProc]]:
    ldap = DemoSlapd()
    ldap.start()
    dovecot = DemoDovecot(ldap)
    base = make_scratch_dir("demo-mta")
    os.chown(base, MAIL_UID, MAIL_UID)
    srv: ServerProc | None = None
    try:
        dovecot.start()
        env = compose_pymta_env()
        env = {**env,
               "LDAP_HOST": ldap.url if env["LDAP_HOST"] == "ldap://openldap:389" else "",
               "SMTPD_SASL_IMAPHOST": replaced(env["SMTPD_SASL_IMAPHOST"], "dovecot:143",
                                               f"{dovecot.host}:{dovecot.imap_port}"),
               "PYMTA_CLAMD": "", "PYMTA_RSPAMD": "", "PYMTA_RSPAMD_CONTROLLER": "",
               "PYMTA_MAIL_DIR": str(dovecot.mail_root), "MAIL_BOXES": "", "MAIL_ALIASES": "",
               "PYMTA_SUBMISSION_LISTEN": f"127.0.0.1:{free_port()}", "PYMTA_SPF": "no",
               "PYMTA_AUTH_FAIL_DELAY": "0.01", "PYMTA_AUTH_FAIL_DELAY_MAX": "0.05"}
        python, pythonpath = vmail_python()
        srv = ServerProc(base, python=python, preexec_fn=_as_vmail, PYTHONPATH=pythonpath,
                         PYTHONDONTWRITEBYTECODE="1", **env)
        srv.start()
        yield ldap, dovecot, srv
    finally:
        if srv is not None:
            srv.cleanup()
        dovecot.stop()
        ldap.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_demo_files_deliver_serve_and_authenticate(
        demo: tuple[DemoSlapd, DemoDovecot, ServerProc]) -> None:
    ldap, dovecot, mta = demo
    # README.md's users: password = name; maildir from LDAP's homeDirectory
    maildir = dovecot.mail_root / "example.com" / "demo" / "Maildir"
    sent = message("someone@remote.test", "demo@example.com", "demo mx")
    code, text = smtp_send(mta.port, "someone@remote.test", ["demo@example.com"], sent)
    assert code == 250, text
    code, text = smtp_send(mta.port, "someone@remote.test", ["nobody@example.com"], sent)
    assert code == 550, text                    # not in the directory
    wait_until(lambda: list((maildir / "new").glob("*")) if (maildir / "new").is_dir() else [],
               DELIVERY_TIMEOUT, 0.1, "the demo user's maildir")

    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("demo@example.com", "not-demo")       # Dovecot's LDAP bind refuses it
    imap.login("demo@example.com", "demo")
    try:
        typ, count = imap.select("INBOX", readonly=True)
        assert typ == "OK" and count == [b"1"], count
        assert_sent_with_trace(fetch_body(imap, "1"), sent, "demo@example.com")
    finally:
        imap.logout()

    # alice submits with her directory password: pymta -> Dovecot IMAP -> LDAP bind
    submitted = message("alice@example.com", "demo@example.com", "demo submission")
    client = login(submission_port(mta), "alice@example.com", "alice")
    try:
        assert client.sendmail("alice@example.com", ["demo@example.com"], submitted) == {}
    finally:
        client.quit()
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(submission_port(mta), "alice@example.com", "demo")

    def two_messages() -> list[Path]:
        return [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()] \
            if len(list((maildir / "new").iterdir()) + list((maildir / "cur").iterdir())) == 2 \
            else []

    # read before POP3 logs in: Dovecot then moves new/ to cur/
    stored = {as_served(p.read_bytes())
              for p in wait_until(two_messages, DELIVERY_TIMEOUT, 0.1, "the submitted message")}
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.user("demo@example.com")
        pop.pass_("demo")
        count, total = pop.stat()
        assert count == 2 and total == sum(len(s) for s in stored)
        bodies = [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in (1, 2)]
    finally:
        pop.quit()
    assert set(bodies) == stored
    assert sum(b.endswith(submitted) for b in bodies) == 1
    [mine] = [b for b in bodies if b.endswith(submitted)]
    assert b"(Authenticated sender: alice@example.com)" in assert_sent_with_trace(
        mine, submitted, "demo@example.com")
