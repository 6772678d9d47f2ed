"""``pymta health`` against a running ``pymta serve``: healthy when the listener greets, the
queue is writable and the configured scanners and backends answer; exit 1 naming what failed
otherwise (issue 12: a scanner that is down shows in the health output, not only in the log;
issue 13: so does an LDAP directory, a MySQL database or a SASL IMAP server, real ones)."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import serverproc
from serverproc import ServerProc

from tests.services.clamd import ClamdServer
from tests.services.dovecot import DovecotServer
from tests.services.mariadb import MariaDBServer
from tests.services.slapd import SlapdServer
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


# ------------------------------------------------------------------------------ backends (13)

USER_FILTER = "(&(objectClass=posixAccount)(mail=%s))"


def backend_env(ldap_url: str, ldap_base: str, mysql_host: str, imap_host: str,
                **extra: str) -> dict[str, str]:
    """Every probed backend on: LDAP lookup + LDAP SASL, MySQL lookup + MySQL SASL, IMAP SASL
    (the variables of the image's LDAP, MySQL and remote IMAP set-ups)."""
    return {"LDAP_HOST": ldap_url, "LDAP_USER_BASE": ldap_base,
            "LDAP_QUERY_FILTER_USER": USER_FILTER, "LDAP_QUERY_ATTRS_PASS": "uid=user",
            "MYSQL_HOST": mysql_host, "MYSQL_DATABASE": "mailtest", "MYSQL_USER": "pymta",
            "MYSQL_PASSWORD": "pymtapw",
            "MYSQL_QUERY_USER": "select email from users where email='%s'",
            "MYSQL_QUERY_PASS": "select password from users where email = '%u'",
            "SMTPD_SASL_IMAPHOST": imap_host, **extra}


def checks(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    data = json.loads(proc.stdout)
    assert data["healthy"] is (proc.returncode == 0)
    return {c["name"]: c for c in data["checks"]}


def failed(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(name for name, c in checks(proc).items() if not c["ok"])


def test_issue13_health_asks_every_backend(server_factory, slapd: SlapdServer,
                                           mariadb: MariaDBServer,
                                           dovecot: DovecotServer) -> None:
    mysql, imap = f"{mariadb.host}:{mariadb.port}", f"{dovecot.host}:{dovecot.imap_port}"
    assert (mariadb.user, mariadb.password, mariadb.database) == ("pymta", "pymtapw",
                                                                  "mailtest")
    srv: ServerProc = server_factory("h", **backend_env(slapd.url, slapd.people_dn, mysql, imap))
    srv.start()
    proc = srv.cli("health", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = checks(proc)
    assert {f"ldap lookup {slapd.url}", f"ldap auth {slapd.url}", f"mysql lookup {mysql}",
            f"mysql auth {mysql}", f"imap auth {imap}"} <= set(found)
    assert found[f"ldap lookup {slapd.url}"]["detail"] == \
        f"bound anonymously, {slapd.people_dn} found"
    assert "database mailtest answers (server " in str(found[f"mysql auth {mysql}"]["detail"])
    assert found[f"imap auth {imap}"]["detail"] == "IMAP greeting and TLS, LOGIN allowed"
    text = srv.cli("health")
    assert text.returncode == 0
    assert f"ok   imap auth {imap}: IMAP greeting and TLS" in text.stdout


def test_issue13_health_names_each_backend_as_it_stops(server_factory) -> None:
    """Real services of our own, stopped one after the other: each health run fails naming
    exactly the backends that are down, and says why."""
    ldap, db, imap = SlapdServer(), MariaDBServer(), DovecotServer(lmtp=False)
    try:
        for service in (ldap, db, imap):
            service.start()
        mysql, imap_host = f"{db.host}:{db.port}", f"{imap.host}:{imap.imap_port}"
        srv: ServerProc = server_factory("h", **backend_env(ldap.url, ldap.people_dn, mysql,
                                                            imap_host))
        srv.start()
        assert srv.cli("health", "--json").returncode == 0
        ldap.stop()
        proc = srv.cli("health", "--json", "--timeout", "3")
        assert proc.returncode == 1
        assert failed(proc) == [f"ldap auth {ldap.url}", f"ldap lookup {ldap.url}"]
        assert "Connection refused" in str(checks(proc)[f"ldap lookup {ldap.url}"]["detail"]) \
            or "socket" in str(checks(proc)[f"ldap lookup {ldap.url}"]["detail"])
        imap.stop()
        proc = srv.cli("health", "--timeout", "3")
        assert proc.returncode == 1
        assert f"FAIL imap auth {imap_host}: " in proc.stdout
        assert f"ok   mysql lookup {mysql}" in proc.stdout
        db.stop()
        proc = srv.cli("health", "--json", "--timeout", "3")
        assert failed(proc) == sorted([f"ldap auth {ldap.url}", f"ldap lookup {ldap.url}",
                                       f"imap auth {imap_host}", f"mysql auth {mysql}",
                                       f"mysql lookup {mysql}"])
        assert "Can't connect" in str(checks(proc)[f"mysql lookup {mysql}"]["detail"])
        assert f"ok   smtp 127.0.0.1:{srv.port}" in srv.cli("health").stdout  # still serving
    finally:
        for service in (ldap, db, imap):
            service.stop()


def test_issue13_health_says_what_is_wrong_without_the_password(
        server_factory, slapd: SlapdServer, mariadb: MariaDBServer) -> None:
    mysql = f"{mariadb.host}:{mariadb.port}"
    srv: ServerProc = server_factory(
        "h", LDAP_HOST=slapd.url, LDAP_USER_BASE="ou=nobody,dc=example,dc=com",
        LDAP_QUERY_FILTER_USER=USER_FILTER, MYSQL_HOST=mysql, MYSQL_DATABASE="mailtest",
        MYSQL_USER="pymta", MYSQL_PASSWORD="Wrong-Pw-42",
        MYSQL_QUERY_USER="select email from users where email='%s'")
    srv.start()
    proc = srv.cli("health", "--json", "--timeout", "3")
    assert proc.returncode == 1
    found = checks(proc)
    assert found[f"ldap lookup {slapd.url}"]["detail"] == \
        "LDAP_USER_BASE 'ou=nobody,dc=example,dc=com' not found"
    assert "Access denied" in str(found[f"mysql lookup {mysql}"]["detail"])
    srv.env.update(LDAP_USER_BASE=slapd.people_dn, LDAP_BIND_DN=slapd.admin_dn,
                   LDAP_BIND_PW="Wrong-Pw-43")
    proc = srv.cli("health", "--json", "--timeout", "3")
    assert checks(proc)[f"ldap lookup {slapd.url}"]["detail"] == \
        f"bind as {slapd.admin_dn} failed: invalidCredentials"
    assert "Wrong-Pw" not in proc.stdout + proc.stderr


def test_issue13_health_is_bounded_by_its_timeout_when_backends_hang(server_factory) -> None:
    """A peer that accepts and never speaks: every backend fails within --timeout, even
    with PYMTA_LOOKUP_TIMEOUT far longer (an LDAP bind waits in a thread no deadline can
    stop, so its own timeout is cut to ours)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        srv: ServerProc = server_factory("h", PYMTA_LOOKUP_TIMEOUT="30",
                                         **backend_env(f"ldap://{where}", "dc=example,dc=com",
                                                       where, where))
        srv.start()
        started = time.monotonic()
        proc = srv.cli("health", "--json", "--timeout", "2")
        elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert failed(proc) == sorted(f"{n} ldap://{where}" if n.startswith("ldap") else
                                  f"{n} {where}" for n in ("ldap auth", "ldap lookup",
                                                           "mysql auth", "mysql lookup",
                                                           "imap auth"))
    assert checks(proc)[f"imap auth {where}"]["detail"] == "no answer within 2s"
    assert elapsed < 12, elapsed
