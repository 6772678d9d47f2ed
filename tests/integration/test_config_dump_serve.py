"""``pymta config dump`` as an operator uses it (issue 13, item 9): dump what a server
configured by environment variables uses, then run ``pymta serve --config`` from that file
alone, with no variables: the same server answers, and dumping again gives the same file."""

from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from pathlib import Path

import serverproc
from serverproc import PYTHON, REPO, ServerProc, clean_environ, smtp_send

server_factory = serverproc.server_factory  # the fixture


def body(text: str) -> str:
    """The dump without its header comment (which says where the values came from)."""
    return text.split("\n\n", 1)[1]


def run(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "pymta", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_issue13_serve_from_a_dumped_file_alone(server_factory, tmp_path: Path) -> None:
    srv: ServerProc = server_factory(
        "env", MYHOSTNAME="mx9.example.org", MAIL_DOMAIN="example.org example.com",
        MAIL_BOXES="alice@example.org:alice/", MESSAGE_SIZE_LIMIT="123456",
        LDAP_BIND_PW="dir-secret", SMTP_RELAY_HOSTAUTH="[127.0.0.1]:1 me:relay-secret",
        PYMTA_RETRY_FIRST="1.5", MYNETWORKS="10.0.0.0/8 [::1]/128")
    dumped = tmp_path / "pymta.toml"
    proc = srv.cli("config", "dump", "--show-secrets", "-o", str(dumped))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(dumped).st_mode) == 0o600
    data = tomllib.loads(dumped.read_text())
    assert data["ldap_bind_pw"] == "dir-secret"
    assert data["message_size_limit"] == 123456
    masked = srv.cli("config", "dump")
    assert "dir-secret" not in masked.stdout and "relay-secret" not in masked.stdout
    assert "SECRETS MASKED" in masked.stdout

    # the file alone: no pymta variable in the environment at all
    only_file = clean_environ(PYMTA_CONFIG=str(dumped))
    again = run(only_file, "config", "dump", "--show-secrets")
    assert again.returncode == 0, again.stderr
    assert body(again.stdout) == body(dumped.read_text())
    assert run(only_file, "check-config").stdout == srv.cli("check-config").stdout.replace(
        "none (environment only)", str(dumped))

    alone = server_factory("file")       # its own defaults replaced by the file, not added
    alone.env = {"PYMTA_CONFIG": str(dumped)}
    alone.port = srv.port
    alone.start()
    with serverproc.SMTPClient(srv.port) as client:
        assert "mx9.example.org" in client.greeting[1]
        code, text = client.cmd("EHLO client.example.net")
        assert code == 250 and "SIZE 123456" in text
    code, text = smtp_send(srv.port, "someone@example.net", ["alice@example.org"],
                           b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 250, text
