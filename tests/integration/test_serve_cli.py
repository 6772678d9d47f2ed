"""``python -m pymta serve`` refusing to start: one clear line, a non-zero status, no traceback,
nothing listening and no pid file left behind."""

from __future__ import annotations

import socket

import pytest
import serverproc
from serverproc import ServerProc, port_open

server_factory = serverproc.server_factory  # the fixture


@pytest.mark.parametrize(("name", "value"), [
    ("MESSAGE_SIZE_LIMIT", "ten"),
    ("PYMTA_SMTP_LISTEN", "nonsense"),
    ("MAIL_BOXES", "bad@other.test"),
    ("MAIL_ALIASES", "loop:loop2 loop2:loop"),
    ("PYMTA_RETRY_FIRST", "soon"),
])
@pytest.mark.parametrize("level", ["", "7"])
def test_bad_config_exit_2_one_line(server_factory, name: str, value: str, level: str) -> None:
    """At the default log level stderr is exactly the one line; at SYSLOG_LEVEL=7 debug lines
    (asyncio's "Using selector") may come first, but the error is still one line, last."""
    srv: ServerProc = server_factory("bad", **{name: value, "SYSLOG_LEVEL": level})
    srv.start(wait=False)
    rc = srv.wait(30)
    assert rc == 2, srv.stderr
    assert "Traceback" not in srv.stderr
    lines = [ln for ln in srv.stderr.splitlines() if not ln.startswith("----- run")]
    errors = [ln for ln in lines if ln.startswith("pymta: ")]
    assert len(errors) == 1, srv.stderr
    assert lines[-1] == errors[0]
    if not level:
        assert len(lines) == 1, srv.stderr
    assert errors[0].startswith(f"pymta: {name}: "), errors[0]
    assert value.split(":")[0].split("@")[0] in errors[0]
    assert not port_open(srv.port)
    assert not (srv.state_dir / "pymta.pid").exists()


def test_port_in_use(server_factory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        srv: ServerProc = server_factory("busy", port=port, SYSLOG_LEVEL="5")
        srv.start(wait=False)
        rc = srv.wait(30)
    assert rc != 0
    assert "Traceback" not in srv.stderr, srv.stderr
    lines = [ln for ln in srv.stderr.splitlines() if not ln.startswith("----- run")]
    assert len(lines) == 1, srv.stderr
    assert "in use" in lines[0].lower(), lines[0]
    assert str(port) in lines[0], lines[0]
    assert not (srv.state_dir / "pymta.pid").exists()


def test_port_in_use_by_a_running_pymta(server_factory) -> None:
    """A second server on the same port (and state dir) must not start, nor disturb the first."""
    first: ServerProc = server_factory("one")
    first.start()
    second = ServerProc(first.base, port=first.port, SYSLOG_LEVEL="5")
    try:
        second.start(wait=False)
        rc = second.wait(30)
    finally:
        second.cleanup()
    assert rc != 0
    assert "Traceback" not in second.stderr, second.stderr
    assert "in use" in second.stderr.lower()
    assert first.running
    # the first server's pid file is still its own
    assert (first.state_dir / "pymta.pid").read_text().split() == [str(first.pid)]
    first.wait_ready(5)
    assert first.stop() == 0
