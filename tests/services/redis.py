"""A throwaway redis-server on loopback TCP: rspamd's Bayes store for the learning tests.

Nothing persists (no RDB snapshots, no append-only file), everything lives in the scratch dir,
and the server stays in the foreground as our child.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .base import Service, ServiceError, choose_port, require_binary, wait_until

PORT_ENV = "PYMTA_TEST_REDIS_PORT"
DEFAULT_PORT = 16379


class RedisServer(Service):
    """redis on ``127.0.0.1:PORT`` (default 16379, env ``PYMTA_TEST_REDIS_PORT``)."""

    name = "redis"
    host = "127.0.0.1"

    def __init__(self, port: int | None = None,
                 base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir)
        self._want_port = port
        self.port = 0
        self.address = ""

    def log_paths(self) -> list[Path]:
        return [self.dir / "redis.log"]

    def _start(self) -> None:
        redis = require_binary("redis-server", "redis-server")
        self.port, self.ports_fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        self.address = f"{self.host}:{self.port}"
        self._spawn([redis, "--bind", self.host, "--port", str(self.port), "--save", "",
                     "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                     "--protected-mode", "yes"], self.dir / "redis.log")
        wait_until(self._ready, 20.0, interval=0.05, what=f"redis PONG on {self.address}",
                   on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"redis-server exited during start-up\n{self.logs()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
