"""A throwaway Postfix instance (``postfix -c DIR``) to talk to pymta: it receives mail from pymta
(virtual maildirs) and relays mail to pymta (or anywhere the test says).

Two modes:

- plain peer (``smart_host=False``): ``mynetworks = 127.0.0.0/8`` may relay; STARTTLS offered.
- smart host (``smart_host=True``): relaying only after SMTP AUTH, and AUTH only after STARTTLS
  (``smtpd_tls_auth_only``); SASL is Dovecot's (``smtpd_sasl_type = dovecot``) from an auth-only
  Dovecot started with it (users alice@example.com/alicepw, bob@example.com/bobpw).

Mail for ``virtual_domains`` (default example.net) is delivered to maildirs under ``mail_root``
(``mailboxes``: address -> maildir relative path, default rcpt@ and other@example.net). Other
domains go to ``relayhost`` / ``transport`` (changeable while running: ``set_relayhost``,
``set_transport``, ``configure``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path

from .base import (
    Service,
    ServiceError,
    choose_port,
    kill_hard,
    require_binary,
    run,
    signal_pid,
    wait_for_greeting,
    wait_gone,
    wait_until,
)
from .dovecot import DovecotServer
from .tls import make_self_signed

PORT_ENV = "PYMTA_TEST_POSTFIX_PORT"
DEFAULT_PORT = 10025
SMARTHOST_PORT_ENV = "PYMTA_TEST_POSTFIX_SMARTHOST_PORT"
DEFAULT_SMARTHOST_PORT = 10587
MAIL_UID = 5000

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {T}/spool
data_directory = {T}/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = {syslog_name}
maillog_file = {T}/postfix.log
maillog_file_prefixes = {T}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {myhostname}
mydomain = {myhostname}
myorigin = $myhostname
mydestination =
mynetworks = {mynetworks}
smtpd_banner = $myhostname ESMTP
smtpd_relay_restrictions = {relay_restrictions}
smtpd_recipient_restrictions = {relay_restrictions}
virtual_mailbox_domains = {virtual_domains}
virtual_mailbox_base = {T}/mail
virtual_mailbox_maps = {virtual_maps}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
relayhost = {relayhost}
transport_maps = {transport_maps}
smtp_tls_security_level = may
smtp_connect_timeout = 5s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
bounce_queue_lifetime = 0
maximal_queue_lifetime = 1h
biff = no
"""

TLS_CF = """\
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
"""

SASL_CF = """\
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth_socket}
smtpd_tls_auth_only = yes
broken_sasl_auth_clients = no
"""

DEFAULT_MAILBOXES = {"rcpt@example.net": "rcpt/", "other@example.net": "other/"}


def inline_map(mapping: Mapping[str, str]) -> str:
    """A Postfix ``inline:{ k=v, ... }`` table ("" when empty)."""
    if not mapping:
        return ""
    return "inline:{ " + ", ".join(f"{{{k}={v}}}" for k, v in mapping.items()) + " }"


class PostfixPeer(Service):
    """A second Postfix on ``127.0.0.1:port`` (default 10025, env ``PYMTA_TEST_POSTFIX_PORT``;
    smart host: 10587, env ``PYMTA_TEST_POSTFIX_SMARTHOST_PORT``)."""

    name = "postfix"
    stop_timeout = 15.0
    host = "127.0.0.1"

    def __init__(self, port: int | None = None, *, smart_host: bool = False,
                 virtual_domains: tuple[str, ...] = ("example.net",),
                 mailboxes: Mapping[str, str] | None = None,
                 relayhost: str = "", transport: Mapping[str, str] | None = None,
                 myhostname: str | None = None, tls: bool = True,
                 base_dir: str | os.PathLike[str] | None = None):
        super().__init__(base_dir)
        self._want_port = port
        self.smart_host = smart_host
        self.virtual_domains = tuple(virtual_domains)
        self.mailboxes = dict(mailboxes if mailboxes is not None else DEFAULT_MAILBOXES)
        self.relayhost = relayhost
        self.transport = dict(transport or {})
        self.myhostname = myhostname or ("smarthost.test" if smart_host else "peer.test")
        self.tls = tls or smart_host
        self.port = 0
        self.config_dir = Path()
        self.mail_root = Path()
        self.cert_file: Path | None = None
        self.key_file: Path | None = None
        self.dovecot: DovecotServer | None = None
        self.sasl_users: dict[str, str] = {}
        self.auth_socket = ""

    def children(self) -> list[Service]:
        return [self.dovecot] if self.dovecot is not None else []

    def log_paths(self) -> list[Path]:
        paths = [self.dir / "postfix.log", self.dir / "master.out"]
        if self.dovecot is not None:
            paths.extend(self.dovecot.log_paths())
        return paths

    @property
    def log_file(self) -> Path:
        return self.dir / "postfix.log"

    def _postconf(self, *args: str) -> None:
        run([self._bin["postconf"], "-c", str(self.config_dir), *args])

    def _start(self) -> None:
        self._bin = {
            "postfix": require_binary("postfix", "postfix"),
            "postconf": require_binary("postconf", "postfix"),
            "postqueue": require_binary("postqueue", "postfix"),
        }
        dist = Path("/usr/share/postfix/master.cf.dist")
        if not dist.exists():
            raise ServiceError(f"{dist} missing: install the Debian package 'postfix'")
        env, default = ((SMARTHOST_PORT_ENV, DEFAULT_SMARTHOST_PORT) if self.smart_host
                        else (PORT_ENV, DEFAULT_PORT))
        self.port, self.ports_fixed = choose_port(env, default, self._want_port)
        T = self.dir
        self.config_dir = T / "etc"
        self.mail_root = T / "mail"
        for sub in ("etc", "spool", "mail"):
            (T / sub).mkdir()
        os.chown(self.mail_root, MAIL_UID, MAIL_UID)
        shutil.copy(dist, self.config_dir / "master.cf")

        if self.smart_host:
            self.dovecot = DovecotServer(imap=False, lmtp=False, tls=False, base_dir=T)
            self.dovecot.start()
            self.sasl_users = dict(self.dovecot.users)
            self.auth_socket = self.dovecot.auth_socket

        main = MAIN_CF.format(
            T=T, syslog_name=f"postfix-{T.name}", myhostname=self.myhostname,
            mynetworks="" if self.smart_host else "127.0.0.0/8",
            relay_restrictions=("permit_sasl_authenticated, reject_unauth_destination"
                                if self.smart_host
                                else "permit_mynetworks, reject_unauth_destination"),
            virtual_domains=", ".join(self.virtual_domains),
            virtual_maps=inline_map(self.mailboxes), uid=MAIL_UID,
            relayhost=self.relayhost, transport_maps=inline_map(self.transport),
        )
        if self.tls:
            self.cert_file, self.key_file = make_self_signed(T / "tls", self.myhostname)
            main += TLS_CF.format(cert=self.cert_file, key=self.key_file)
        if self.smart_host:
            main += SASL_CF.format(auth_socket=self.auth_socket)
        (self.config_dir / "main.cf").write_text(main)
        self._postconf("-F", "*/*/chroot = n")
        self._postconf("-MX", "smtp/inet")
        self._postconf("-Me", f"{self.host}:{self.port}/inet = "
                              f"{self.host}:{self.port} inet n - n - - smtpd")
        # `postfix` prints its errors only to a terminal: run it under `script`. `check` creates
        # the queue directories; then the master runs in the foreground (-d) as our child.
        run([self._bin["postfix"], "-c", str(self.config_dir), "check"], tty=True)
        self._start_master()

    def _start_master(self) -> None:
        master = require_binary("master", "postfix")
        env = {**os.environ, "MAIL_CONFIG": str(self.config_dir)}
        self._spawn([master, "-c", str(self.config_dir), "-d"], self.dir / "master.out", env=env)
        wait_for_greeting(self.host, self.port, b"220", 20.0, self._child_alive,
                          self.logs, "postfix smtpd")

    def _stop_master(self) -> None:
        signal_pid(self.pid, signal.SIGTERM)
        if not wait_gone(self.pid, self.stop_timeout, self._popen):
            kill_hard(self.pid, self._popen)
        self.pid = None
        self._popen = None

    # helpers --------------------------------------------------------------------------------
    def configure(self, **params: str) -> None:
        """``postconf -e name=value ...``, then restart the master (~1 s; the queue is kept).

        Not ``postfix reload``: after a reload this Postfix serves new connections only from
        the old idle smtpd, so a second concurrent connection hangs until the first ends.
        E.g. ``configure(relayhost="[127.0.0.1]:2525", smtpd_tls_security_level="encrypt")``.
        """
        if not params:
            return
        self._postconf("-e", *(f"{k}={v}" for k, v in params.items()))
        self.restart()

    def restart(self) -> None:
        """Stop and start the master with the current configuration (queue and maildirs kept)."""
        self._stop_master()
        self._start_master()

    def set_relayhost(self, host: str, port: int) -> None:
        """Relay everything not local to ``[host]:port`` (no MX lookup)."""
        self.relayhost = f"[{host}]:{port}"
        self.configure(relayhost=self.relayhost)

    def set_transport(self, transport: Mapping[str, str]) -> None:
        """Per-domain next hops, e.g. ``{"example.com": "smtp:[127.0.0.1]:2525"}``."""
        self.transport = dict(transport)
        self.configure(transport_maps=inline_map(self.transport))

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``)."""
        run([self._bin["postqueue"], "-c", str(self.config_dir), "-f"])

    def queue(self) -> str:
        """``postqueue -p`` output ("Mail queue is empty" when empty)."""
        return run([self._bin["postqueue"], "-c", str(self.config_dir), "-p"]).stdout

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the maillog matches the regex ``pattern``; return the match."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log_text()), timeout,  # type: ignore[return-value]
                          what=f"postfix log /{pattern}/", on_timeout=self.logs)

    def maildir(self, mailbox: str) -> Path:
        """The maildir of ``rcpt@example.net`` (looked up in ``mailboxes``) or of a relative
        maildir path like ``"rcpt/"``."""
        rel = self.mailboxes.get(mailbox, mailbox)
        return self.mail_root / rel

    def delivered_files(self, mailbox: str | None = None) -> list[Path]:
        """Delivered message files (``new`` + ``cur``) of one mailbox, or of all of them."""
        boxes = [mailbox] if mailbox is not None else list(self.mailboxes)
        files: list[Path] = []
        for box in boxes:
            md = self.maildir(box)
            for sub in ("new", "cur"):
                if (md / sub).is_dir():
                    files.extend((md / sub).iterdir())
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def count_delivered(self, mailbox: str | None = None) -> int:
        return len(self.delivered_files(mailbox))

    def messages(self, mailbox: str | None = None) -> list[bytes]:
        return [p.read_bytes() for p in self.delivered_files(mailbox)]
