"""A throwaway SpamAssassin spamd on TCP with the rules Debian ships, no network tests.

``--local`` turns off DNSBLs, Razor, Pyzor and DCC (no network here, and verdicts must not
depend on it); no ``sa-update`` is needed, the packaged rules in ``/usr/share/spamassassin``
are the default rules dir. ``--allow-tell`` lets clients teach Bayes (``TELL``); the site
config is a copy of ``/etc/spamassassin`` plus a ``bayes_path`` inside the scratch dir, so
learning never touches the machine's own Bayes database. spamd stays in the foreground as our
child (its children run the checks as ``debian-spamd``), logging to ``spamd.log``.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from .base import Service, ServiceError, choose_port, require_binary, run, wait_until

PORT_ENV = "PYMTA_TEST_SPAMD_PORT"
DEFAULT_PORT = 7830
SPAMD_USER = "debian-spamd"


class SpamdServer(Service):
    """spamd on ``127.0.0.1:PORT`` (default 7830, env ``PYMTA_TEST_SPAMD_PORT``)."""

    name = "spamd"
    stop_timeout = 10.0
    host = "127.0.0.1"

    def __init__(self, port: int | None = None, base_dir: str | os.PathLike[str] | None = None):
        super().__init__(base_dir)
        self._want_port = port
        self.port = 0
        self.address = ""

    def log_paths(self) -> list[Path]:
        return [self.dir / "spamd.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        spamd = require_binary("spamd", "spamd")
        self.port, self.ports_fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        self.address = f"{self.host}:{self.port}"
        T = self.dir
        site = T / "site"
        shutil.copytree("/etc/spamassassin", site, ignore=shutil.ignore_patterns("*.d"))
        bayes = T / "bayes"
        bayes.mkdir()
        with open(site / "local.cf", "a") as f:
            f.write(f"\nuse_bayes 1\nbayes_path {bayes}/bayes\nbayes_file_mode 0770\n"
                    "bayes_auto_learn 0\nlock_method flock\n")
        run(["chown", "-R", f"{SPAMD_USER}:{SPAMD_USER}", str(bayes)])
        self._spawn([spamd, f"--listen={self.address}", f"--allowed-ips={self.host}",
                     f"--username={SPAMD_USER}", f"--groupname={SPAMD_USER}",
                     f"--siteconfigpath={site}", "--local", "--nouser-config", "--allow-tell",
                     "--max-children=2", "--min-children=1", f"--syslog={T}/spamd.log"],
                    T / "stdout.log")
        wait_until(self._ready, 30.0, interval=0.1, what=f"spamd PONG on {self.address}",
                   on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"spamd exited during start-up\n{self.logs()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.settimeout(2)
                s.sendall(b"PING SPAMC/1.5\r\n\r\n")
                data = s.recv(64)
        except OSError:
            return False
        return b"PONG" in data
