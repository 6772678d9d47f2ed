"""A throwaway rspamd (no redis): normal worker and controller on TCP, everything variable in the
scratch dir.

The packaged ``/etc/rspamd/rspamd.conf`` is used as is; ``--var`` moves ``LOCAL_CONFDIR``,
``DBDIR``, ``RUNDIR`` and ``LOGDIR`` into the scratch dir, and ``override.d`` there sets the
ports, one normal worker, the controller password, no proxy worker and no ``fuzzy_check``
(it resolves public servers at config time). A five-line ``url_tld`` list replaces the
public-suffix list, whose hyperscan compile makes a cold start take ~10 s instead of ~1 s.
Without redis the modules needing it (Bayes, greylist, ratelimit ...) switch themselves off,
so rspamd refuses learning; that is logged, not an error. With ``redis`` (``host:port`` of a
``RedisServer``) Bayes stores its tokens there and learning works. DNS goes to ``nameserver`` (the
test DNS server) when given, else to an unused local port (lookups fail fast).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from .base import (
    Service,
    ServiceError,
    choose_port,
    free_port,
    require_binary,
    run,
    wait_until,
)

PORT_ENV = "PYMTA_TEST_RSPAMD_PORT"
CONTROLLER_PORT_ENV = "PYMTA_TEST_RSPAMD_CONTROLLER_PORT"
DEFAULT_PORT = 11333
DEFAULT_CONTROLLER_PORT = 11334
RSPAMD_USER = "_rspamd"
PASSWORD = "testpw"

OPTIONS_INC = """\
dns {{
  nameserver = ["{nameserver}"];
  timeout = 1s;
  retransmits = 1;
}}
url_tld = "{T}/etc/tld.dat";
"""


class RspamdServer(Service):
    """rspamd worker on ``127.0.0.1:port`` (default 11333, env ``PYMTA_TEST_RSPAMD_PORT``),
    controller on ``controller_port`` (default 11334, env ``PYMTA_TEST_RSPAMD_CONTROLLER_PORT``)
    with password ``testpw``."""

    name = "rspamd"
    stop_timeout = 10.0
    host = "127.0.0.1"
    password = PASSWORD

    def __init__(self, port: int | None = None, controller_port: int | None = None, *,
                 nameserver: str | None = None, redis: str | None = None,
                 base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir)
        self.redis = redis
        self._want_port = port
        self._want_controller_port = controller_port
        self.nameserver = nameserver
        self.port = 0
        self.controller_port = 0
        self.address = ""
        self.controller = ""

    def log_paths(self) -> list[Path]:
        return [self.dir / "log" / "rspamd.log", self.dir / "stdout.log"]

    def _start(self) -> None:
        rspamd = require_binary("rspamd", "rspamd")
        rspamadm = require_binary("rspamadm", "rspamd")
        self.port, fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        self.controller_port, cfixed = choose_port(CONTROLLER_PORT_ENV, DEFAULT_CONTROLLER_PORT,
                                                   self._want_controller_port)
        if self.controller_port == self.port:
            self.controller_port = free_port()
        self.ports_fixed = fixed or cfixed
        self.address = f"{self.host}:{self.port}"
        self.controller = f"{self.host}:{self.controller_port}"
        T = self.dir
        etc = T / "etc"
        (etc / "override.d").mkdir(parents=True)
        (etc / "local.d").mkdir()
        (etc / "override.d" / "worker-normal.inc").write_text(
            f'bind_socket = "{self.address}";\ncount = 1;\n')
        (etc / "override.d" / "worker-controller.inc").write_text(
            f'bind_socket = "{self.controller}";\npassword = "{PASSWORD}";\n')
        (etc / "override.d" / "worker-proxy.inc").write_text("enabled = false;\n")
        (etc / "override.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
        (etc / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
        nameserver = self.nameserver or f"127.0.0.1:{free_port()}"
        (etc / "local.d" / "options.inc").write_text(OPTIONS_INC.format(nameserver=nameserver,
                                                                         T=T))
        if self.redis:
            (etc / "local.d" / "redis.conf").write_text(f'servers = "{self.redis}";\n')
        for sub in ("db", "run", "log"):
            (T / sub).mkdir()
        run(["chown", "-R", f"{RSPAMD_USER}:{RSPAMD_USER}",
             str(T / "db"), str(T / "run"), str(T / "log")])
        variables = [f"--var=LOCAL_CONFDIR={etc}", f"--var=DBDIR={T}/db",
                     f"--var=RUNDIR={T}/run", f"--var=LOGDIR={T}/log"]
        run([rspamadm, *variables, "configtest", "-c", "/etc/rspamd/rspamd.conf"])
        # -f: stay in the foreground as our child (stopped by its PID like the others).
        self._spawn([rspamd, "-f", "-c", "/etc/rspamd/rspamd.conf", *variables,
                     "-u", RSPAMD_USER, "-g", RSPAMD_USER], T / "stdout.log")
        wait_until(self._ready, 60.0, interval=0.1, what=f"rspamd /ping on {self.address}",
                   on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"rspamd exited during start-up\n{self.logs()}")
        for port in (self.port, self.controller_port):
            try:
                with urllib.request.urlopen(f"http://{self.host}:{port}/ping", timeout=1) as r:
                    if r.read().strip() != b"pong":
                        return False
            except OSError:
                return False
        return True
