"""A throwaway HAProxy in TCP mode in front of one backend, sending the PROXY protocol header.

Two frontends on free loopback ports: ``port_v1`` forwards with ``send-proxy`` (the v1 text
line), ``port_v2`` with ``send-proxy-v2`` (binary). The backend is given at construction (a
pymta listener started before, on a port of its own), so an instance belongs to one server:
start one per test, it takes a few tens of milliseconds. Runs in the foreground (``-db``) as
our child, its configuration and log in the scratch dir.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .base import Service, ServiceError, free_port, require_binary, wait_until

CONFIG = """\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend proxy_v1
    bind {host}:{port_v1}
    default_backend pymta_v1

frontend proxy_v2
    bind {host}:{port_v2}
    default_backend pymta_v2

backend pymta_v1
    server pymta {backend} send-proxy

backend pymta_v2
    server pymta {backend} send-proxy-v2
"""


class HAProxy(Service):
    """HAProxy on ``127.0.0.1:port_v1`` (v1 header) and ``127.0.0.1:port_v2`` (v2) in front
    of ``backend`` (``host:port``)."""

    name = "haproxy"
    host = "127.0.0.1"

    def __init__(self, backend: str, base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir)
        self.backend = backend
        self.port_v1 = 0
        self.port_v2 = 0

    def log_paths(self) -> list[Path]:
        return [self.dir / "haproxy.log"]

    def _start(self) -> None:
        haproxy = require_binary("haproxy", "haproxy")
        self.port_v1, self.port_v2 = free_port(), free_port()
        conf = self.dir / "haproxy.cfg"
        conf.write_text(CONFIG.format(host=self.host, port_v1=self.port_v1,
                                      port_v2=self.port_v2, backend=self.backend))
        check = self.dir / "check.log"
        self._spawn([haproxy, "-c", "-f", str(conf)], check)
        assert self._popen is not None
        if self._popen.wait(timeout=20) != 0:
            raise ServiceError(f"haproxy -c rejected {conf}:\n{check.read_text()}")
        self._spawn([haproxy, "-db", "-f", str(conf)], self.dir / "haproxy.log")
        wait_until(self._ready, 20.0, interval=0.05,
                   what=f"haproxy listening on {self.port_v1}/{self.port_v2}",
                   on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"haproxy exited during start-up\n{self.logs()}")
        for port in (self.port_v1, self.port_v2):
            try:
                with socket.create_connection((self.host, port), timeout=1):
                    pass
            except OSError:
                return False
        return True
