"""``pymta health`` against a running ``pymta serve``: healthy when the listener greets, the
queue is writable and the configured scanners answer; exit 1 naming what failed otherwise
(issue 12: a scanner that is down shows in the health output, not only in the log)."""

from __future__ import annotations

import json

import serverproc
from serverproc import ServerProc

from tests.services.clamd import ClamdServer
from tests.services.spamd import SpamdServer

server_factory = serverproc.server_factory  # the fixture


def test_issue12_health_is_ok_with_the_scanners_answering(
        server_factory, clamd: ClamdServer, spamd: SpamdServer) -> None:
    srv: ServerProc = server_factory("h", PYMTA_CLAMD=clamd.address, PYMTA_SPAMD=spamd.address)
    srv.start()
    proc = srv.cli("health")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"ok   smtp 127.0.0.1:{srv.port}: 220 ") for line in lines)
    assert any(line.startswith("ok   queue directory") for line in lines)
    assert any(line.startswith(f"ok   clamd {clamd.address}: ClamAV") for line in lines)
    assert any(line.startswith(f"ok   spamd {spamd.address}") for line in lines)


def test_issue12_health_names_a_scanner_that_is_down(server_factory, clamd: ClamdServer) -> None:
    srv: ServerProc = server_factory("h", PYMTA_CLAMD=clamd.address,
                                     PYMTA_SPAMD="127.0.0.1:9")    # nothing listens there
    srv.start()
    proc = srv.cli("health", "--json", "--timeout", "2")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["healthy"] is False
    failed = [c["name"] for c in data["checks"] if not c["ok"]]
    assert failed == ["spamd 127.0.0.1:9"]


def test_issue12_health_fails_when_the_server_is_not_running(server_factory) -> None:
    srv: ServerProc = server_factory("h")
    proc = srv.cli("health", "--timeout", "2")
    assert proc.returncode == 1
    assert f"FAIL smtp 127.0.0.1:{srv.port}" in proc.stdout
    assert "FAIL queue directory" in proc.stdout
    assert "Traceback" not in proc.stderr
