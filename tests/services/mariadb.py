"""A throwaway MariaDB server: own datadir, own unix socket, TCP on 127.0.0.1:13306 by default.

Never touches the machine's own MariaDB (which may listen on 3306). Database ``mailtest`` with
user ``pymta``/``pymtapw`` (from 127.0.0.1 and localhost) and tables:

- ``users(id, email UNIQUE, password, active)``: alice ``{PLAIN-MD5}<md5 of alicepw>``,
  bob ``{PLAIN-MD5}<md5 of bobpw>``, both active;
- ``aliases(id, alias, goto)``: ``postmaster@example.com -> alice@example.com``,
  ``list@example.com -> alice@example.com,bob@example.com``,
  ``robert@example.com -> bob@example.com``;
- ``domains(domain)``: ``example.com``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .base import (
    Service,
    ServiceError,
    choose_port,
    read_greeting,
    require_binary,
    run,
    wait_until,
)

PORT_ENV = "PYMTA_TEST_MARIADB_PORT"
DEFAULT_PORT = 13306

SCHEMA_SQL = """\
CREATE DATABASE mailtest CHARACTER SET utf8mb4;
CREATE USER 'pymta'@'127.0.0.1' IDENTIFIED BY 'pymtapw';
CREATE USER 'pymta'@'localhost' IDENTIFIED BY 'pymtapw';
GRANT ALL PRIVILEGES ON mailtest.* TO 'pymta'@'127.0.0.1';
GRANT ALL PRIVILEGES ON mailtest.* TO 'pymta'@'localhost';
CREATE TABLE mailtest.users (
  id INT AUTO_INCREMENT PRIMARY KEY,
  email VARCHAR(255) NOT NULL UNIQUE,
  password VARCHAR(255) NOT NULL,
  active TINYINT(1) NOT NULL DEFAULT 1
);
INSERT INTO mailtest.users (email, password) VALUES
  ('alice@example.com', CONCAT('{PLAIN-MD5}', MD5('alicepw'))),
  ('bob@example.com',   CONCAT('{PLAIN-MD5}', MD5('bobpw')));
CREATE TABLE mailtest.aliases (
  id INT AUTO_INCREMENT PRIMARY KEY,
  alias VARCHAR(255) NOT NULL,
  goto TEXT NOT NULL,
  KEY (alias)
);
INSERT INTO mailtest.aliases (alias, goto) VALUES
  ('postmaster@example.com', 'alice@example.com'),
  ('list@example.com', 'alice@example.com,bob@example.com'),
  ('robert@example.com', 'bob@example.com');
CREATE TABLE mailtest.domains (
  domain VARCHAR(255) NOT NULL PRIMARY KEY
);
INSERT INTO mailtest.domains (domain) VALUES ('example.com');
"""


class MariaDBServer(Service):
    """Own ``mariadbd`` (``--user=root``) with datadir, socket and logs in its scratch dir."""

    name = "mariadb"
    stop_timeout = 20.0

    host = "127.0.0.1"
    user = "pymta"
    password = "pymtapw"
    database = "mailtest"

    def __init__(self, port: int | None = None, base_dir: str | os.PathLike[str] | None = None):
        super().__init__(base_dir)
        self._want_port = port
        self.port = 0
        self.socket = ""
        self.datadir = Path()
        self._client = ""

    def log_paths(self) -> list[Path]:
        return [self.dir / "error.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        mariadbd = require_binary("mariadbd", "mariadb-server")
        install_db = require_binary("mariadb-install-db", "mariadb-server")
        self._client = require_binary("mariadb", "mariadb-client-core")
        self.port, self.ports_fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        T = self.dir
        self.datadir = T / "data"
        self.socket = str(T / "mysqld.sock")
        (T / "tmp").mkdir()
        run([install_db, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
             "--skip-test-db", "--auth-root-authentication-method=socket"], timeout=120)
        self._spawn([
            mariadbd, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
            f"--socket={self.socket}", f"--pid-file={T / 'mariadbd.pid'}",
            "--bind-address=127.0.0.1", f"--port={self.port}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M", "--log-warnings=1", f"--tmpdir={T / 'tmp'}",
            f"--log-error={T / 'error.log'}", "--skip-log-bin",
        ], T / "stdout.log")
        wait_until(self._ready, 60.0, what=f"mariadbd greeting on {self.host}:{self.port}",
                   on_timeout=self.logs)
        self.execute(SCHEMA_SQL)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"mariadbd exited during start-up\n{self.logs()}")
        if not os.path.exists(self.socket):
            return False
        # MySQL protocol: the server speaks first, with a handshake packet (protocol version 10)
        # or, before our users exist, an error packet (0xff, 1130 "Host ... is not allowed").
        data = read_greeting(self.host, self.port)
        if len(data) < 5 or struct.unpack("<I", data[:3] + b"\0")[0] == 0:
            return False
        return data[4] == 10 or data[4:7] == b"\xff" + struct.pack("<H", 1130)

    # helpers --------------------------------------------------------------------------------
    def execute(self, sql: str, database: str | None = None) -> list[tuple[str, ...]]:
        """Run SQL as root over the unix socket (``mariadb`` client, batch mode). Returns the
        rows of the last result set as tuples of strings (NULL -> "NULL"), without header."""
        argv = [self._client, "--no-defaults", f"--socket={self.socket}", "-u", "root",
                "--batch", "--skip-column-names", "--raw"]
        if database:
            argv.append(database)
        out = run(argv, input=sql).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def connect_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``aiomysql.connect``/``create_pool`` (or PyMySQL) over TCP."""
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password, "db": self.database}
