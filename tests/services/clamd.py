"""A throwaway ClamAV clamd with one test signature and no official databases (no freshclam).

The signature ``PyMTA.Test.EICAR`` is a body-based ``.ndb`` line (target 0: any file) for the
EICAR test string, so it matches the string inline in a mail body and inside a decoded
attachment; clamd reports it as ``PyMTA.Test.EICAR.UNOFFICIAL``. (A ``.hdb`` hash signature
only matches a part that is exactly the 68 bytes: it missed the string inline.) The EICAR
string is only ever built at run time from two halves (:func:`eicar`), so no file of this
repository contains it whole and no scanner flags the repository itself.

clamd listens on a unix socket and on TCP; ``StreamMaxLength`` is small (1 MiB by default) so a
test can exceed it cheaply.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .base import Service, ServiceError, choose_port, require_binary, wait_until

PORT_ENV = "PYMTA_TEST_CLAMD_PORT"
DEFAULT_PORT = 13310  # not 3310: never the machine's own clamd
SIGNATURE = "PyMTA.Test.EICAR"
DETECTED_AS = SIGNATURE + ".UNOFFICIAL"

CLAMD_CONF = """\
# Foreground: our child, stopped by its PID like the other test services.
Foreground yes
LogFile {T}/clamd.log
LogTime yes
DatabaseDirectory {T}/db
LocalSocket {T}/clamd.sock
TCPSocket {port}
TCPAddr 127.0.0.1
StreamMaxLength {stream_max}
# no official databases: no bytecode, no self-check reloads during a test run
Bytecode no
SelfCheck 0
"""


def eicar() -> bytes:
    """The 68-byte EICAR test string, joined here so that no file holds it whole."""
    data = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    assert len(data) == 68
    return data


class ClamdServer(Service):
    """clamd on ``127.0.0.1:PORT`` (default 13310, env ``PYMTA_TEST_CLAMD_PORT``) and on the
    unix socket ``socket``; ``address``/``unix_address`` are the ``host:port`` /
    ``unix:/path`` forms the client takes. ``stream_max``: clamd's ``StreamMaxLength``."""

    name = "clamd"
    stop_timeout = 10.0
    host = "127.0.0.1"

    def __init__(self, port: int | None = None, stream_max: str = "1M",
                 base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir)
        self._want_port = port
        self.stream_max = stream_max
        self.port = 0
        self.socket = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def unix_address(self) -> str:
        return f"unix:{self.socket}"

    def log_paths(self) -> list[Path]:
        return [self.dir / "clamd.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        clamd = require_binary("clamd", "clamav-daemon")
        self.port, self.ports_fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        T = self.dir
        (T / "db").mkdir()
        (T / "db" / "pymta-test.ndb").write_text(f"{SIGNATURE}:0:*:{eicar().hex()}\n")
        self.socket = str(T / "clamd.sock")
        conf = T / "clamd.conf"
        conf.write_text(CLAMD_CONF.format(T=T, port=self.port, stream_max=self.stream_max))
        self._spawn([clamd, "-c", str(conf)], T / "stdout.log")
        wait_until(self._ready, 30.0, what=f"clamd PONG on {self.address}", on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            log = self.logs()
            if "Address already in use" in log:
                raise ServiceError(f"clamd: port {self.port}: Address already in use\n{log}")
            raise ServiceError(f"clamd exited during start-up\n{log}")
        return self.ping_tcp() and self.ping_unix()

    def ping_tcp(self) -> bool:
        return self._ping(socket.AF_INET, (self.host, self.port))

    def ping_unix(self) -> bool:
        return self._ping(socket.AF_UNIX, self.socket)

    @staticmethod
    def _ping(family: int, where: object) -> bool:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(where)
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False
