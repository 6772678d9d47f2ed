"""A throwaway Dovecot 2.3: IMAP (STARTTLS offered, not required), POP3 when asked, LMTP on TCP
and on a unix socket, and an auth socket usable as Postfix's ``smtpd_sasl_type = dovecot`` path.

Users (passwd-file): ``alice@example.com`` / ``alicepw`` ({PLAIN}) and ``bob@example.com`` /
``bobpw`` ({SHA512-CRYPT} from ``doveadm pw``); mail as uid/gid 5000 in
``<dir>/mail/<domain>/<local>/Maildir``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import (
    Service,
    ServiceError,
    choose_port,
    require_binary,
    run,
    wait_for_greeting,
)
from .tls import make_self_signed

IMAP_PORT_ENV = "PYMTA_TEST_IMAP_PORT"
LMTP_PORT_ENV = "PYMTA_TEST_LMTP_PORT"
POP3_PORT_ENV = "PYMTA_TEST_POP3_PORT"
DEFAULT_IMAP_PORT = 1143
DEFAULT_LMTP_PORT = 2424
DEFAULT_POP3_PORT = 1110
MAIL_UID = 5000

DOVECOT_CONF = """\
instance_name = {instance}
base_dir = {T}/run
state_dir = {T}/state
protocols = {protocols}
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {T}/dovecot.log
auth_verbose = yes
auth_failure_delay = 0
mail_location = maildir:~/Maildir
first_valid_uid = 500

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {T}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {T}/users
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{pop3_service}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  unix_listener {lmtp_socket} {{
    mode = 0666
  }}
}}
service auth {{
  # for Postfix (smtpd_sasl_type = dovecot, smtpd_sasl_path = this absolute path) and others
  unix_listener {auth_socket} {{
    mode = 0666
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@example.com
}}
# tests: no per-IP auth penalty (otherwise each failed login delays later ones 2..15 s)
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

# only when POP3 is on, so an instance without it keeps the configuration it always had
POP3_SERVICE = """\
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
}}"""

SSL_ON = """\
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}"""


class DovecotServer(Service):
    """Dovecot IMAP (default 1143, env ``PYMTA_TEST_IMAP_PORT``) + LMTP (default 2424, env
    ``PYMTA_TEST_LMTP_PORT``; also ``lmtp_socket``) + ``auth_socket``; POP3 (default 1110, env
    ``PYMTA_TEST_POP3_PORT``) only with ``pop3=True`` (Debian package ``dovecot-pop3d``).

    ``imap=False`` / ``lmtp=False`` leave that protocol out (e.g. an auth-only instance for a
    Postfix smart host; its ports are then 0). ``tls=False``: no STARTTLS.
    """

    name = "dovecot"
    stop_timeout = 10.0

    host = "127.0.0.1"
    default_users = {"alice@example.com": "alicepw", "bob@example.com": "bobpw"}

    def __init__(self, imap_port: int | None = None, lmtp_port: int | None = None, *,
                 imap: bool = True, lmtp: bool = True, tls: bool = True, pop3: bool = False,
                 pop3_port: int | None = None,
                 users: dict[str, str] | None = None,
                 base_dir: str | os.PathLike[str] | None = None):
        super().__init__(base_dir)
        self._want_imap, self._want_lmtp, self._want_pop3 = imap_port, lmtp_port, pop3_port
        self.imap_enabled, self.lmtp_enabled, self.tls = imap, lmtp, tls
        self.pop3_enabled = pop3
        self.users: dict[str, str] = dict(users if users is not None else self.default_users)
        self.imap_port = 0
        self.lmtp_port = 0
        self.pop3_port = 0
        self.lmtp_socket = ""
        self.auth_socket = ""
        self.config = Path()
        self.mail_root = Path()
        self.cert_file: Path | None = None
        self.key_file: Path | None = None

    def log_paths(self) -> list[Path]:
        return [self.dir / "dovecot.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        dovecot = require_binary("dovecot", "dovecot-core")
        self._doveadm = require_binary("doveadm", "dovecot-core")
        if self.imap_enabled and not os.path.exists("/usr/lib/dovecot/imap"):
            raise ServiceError("dovecot imap not found: install the Debian package 'dovecot-imapd'")
        if self.lmtp_enabled and not os.path.exists("/usr/lib/dovecot/lmtp"):
            raise ServiceError("dovecot lmtp not found: install the Debian package 'dovecot-lmtpd'")
        if self.pop3_enabled and not os.path.exists("/usr/lib/dovecot/pop3"):
            raise ServiceError("dovecot pop3 not found: install the Debian package 'dovecot-pop3d'")
        fixed = False
        if self.imap_enabled:
            self.imap_port, f = choose_port(IMAP_PORT_ENV, DEFAULT_IMAP_PORT, self._want_imap)
            fixed |= f
        if self.lmtp_enabled:
            self.lmtp_port, f = choose_port(LMTP_PORT_ENV, DEFAULT_LMTP_PORT, self._want_lmtp)
            fixed |= f
        if self.pop3_enabled:
            self.pop3_port, f = choose_port(POP3_PORT_ENV, DEFAULT_POP3_PORT, self._want_pop3)
            fixed |= f
        self.ports_fixed = fixed
        T = self.dir
        shutil.rmtree(T / "run", ignore_errors=True)  # a stale anvil socket delays start by 5 s
        for sub in ("run", "state", "mail"):
            (T / sub).mkdir()
        self.mail_root = T / "mail"
        os.chown(self.mail_root, MAIL_UID, MAIL_UID)
        self.lmtp_socket = str(T / "lmtp.sock")
        self.auth_socket = str(T / "auth-client.sock")
        ssl = "ssl = no"
        if self.tls:
            self.cert_file, self.key_file = make_self_signed(T / "tls", "imap.example.com")
            ssl = SSL_ON.format(cert=self.cert_file, key=self.key_file)
        protocols = " ".join(p for p, on in (("imap", self.imap_enabled),
                                             ("pop3", self.pop3_enabled),
                                             ("lmtp", self.lmtp_enabled)) if on) or "none"
        self.config = T / "dovecot.conf"
        self.config.write_text(DOVECOT_CONF.format(
            instance=f"pymta-test-{T.name}", T=T, protocols=protocols, ssl=ssl,
            imap_port=self.imap_port, lmtp_port=self.lmtp_port, lmtp_socket=self.lmtp_socket,
            pop3_service=POP3_SERVICE.format(pop3_port=self.pop3_port) if self.pop3_enabled
            else "",
            auth_socket=self.auth_socket,
        ))
        self._write_users()
        self._spawn([dovecot, "-F", "-c", str(self.config)], T / "stdout.log")
        if self.imap_enabled:
            wait_for_greeting(self.host, self.imap_port, b"* OK", 20.0, self._child_alive,
                              self.logs, "dovecot imap")
        if self.lmtp_enabled:
            wait_for_greeting(self.host, self.lmtp_port, b"220", 20.0, self._child_alive,
                              self.logs, "dovecot lmtp")
        if self.pop3_enabled:
            wait_for_greeting(self.host, self.pop3_port, b"+OK", 20.0, self._child_alive,
                              self.logs, "dovecot pop3")
        if not self.imap_enabled and not self.lmtp_enabled and not self.pop3_enabled:
            # auth only: ready when the auth socket answers a good login
            import time
            deadline = time.monotonic() + 20
            while not self.auth_test(*next(iter(self.users.items()))):
                if time.monotonic() > deadline or not self._child_alive():
                    raise ServiceError(f"dovecot auth not ready\n{self.logs()}")
                time.sleep(0.05)

    def _hash(self, password: str, scheme: str) -> str:
        if scheme == "PLAIN":
            return "{PLAIN}" + password
        return run([self._doveadm, "pw", "-s", scheme, "-p", password]).stdout.strip()

    def _write_users(self) -> None:
        lines = []
        for i, (email, password) in enumerate(self.users.items()):
            local, _, domain = email.partition("@")
            # alternate schemes so both a cleartext and a crypt hash are exercised
            scheme = "PLAIN" if i % 2 == 0 else "SHA512-CRYPT"
            home = self.mail_root / (domain or "localdomain") / local
            lines.append(f"{email}:{self._hash(password, scheme)}:{MAIL_UID}:{MAIL_UID}::{home}::")
        users = self.dir / "users"
        tmp = self.dir / "users.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        tmp.replace(users)

    # helpers --------------------------------------------------------------------------------
    def add_user(self, email: str, password: str) -> None:
        """Add (or change) a user while running; Dovecot re-reads the passwd-file by mtime."""
        self.users[email] = password
        self._write_users()

    def maildir(self, user: str) -> Path:
        """``<mail_root>/<domain>/<local>/Maildir`` for ``local@domain`` (``alice`` ->
        example.com)."""
        local, _, domain = user.partition("@")
        return self.mail_root / (domain or "example.com") / local / "Maildir"

    def delivered_files(self, user: str) -> list[Path]:
        """Message files in the user's INBOX (``new`` and ``cur``), oldest first."""
        md = self.maildir(user)
        files = [p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def messages(self, user: str) -> list[bytes]:
        return [p.read_bytes() for p in self.delivered_files(user)]

    def auth_test(self, user: str, password: str) -> bool:
        """``doveadm auth test``: True when the password is accepted."""
        proc = run([self._doveadm, "-c", str(self.config), "auth", "test", user, password],
                   check=False)
        return proc.returncode == 0
