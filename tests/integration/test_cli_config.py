"""``python -m pymta check-config`` as an operator runs it: a mistyped variable gives exit 2
and one line naming it, never a traceback; a good environment gives exit 0 and a summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymta.config.load import _SETTINGS

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in {s.env for s in _SETTINGS} and k != "PYMTA_CONFIG"}
    clean.update({"PYMTA_STATE_DIR": str(tmp_path / "state"), **env})
    return subprocess.run([sys.executable, "-m", "pymta", *args], cwd=REPO, env=clean,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("name", "value"), [
    ("MESSAGE_SIZE_LIMIT", "ten"),
    ("SYSLOG_LEVEL", "9"),
    ("SMTPD_USE_TLS", "perhaps"),
    ("PYMTA_SMTP_LISTEN", "::1:25"),
    ("PYMTA_QUEUE_LIFETIME", "forever"),
    ("SMTPD_TLS_CERT_FILE", "/no/such/cert.pem"),
])
def test_bad_variable_is_one_line_exit_2(tmp_path: Path, name: str, value: str) -> None:
    extra = {"SMTPD_TLS_KEY_FILE": "/no/such/key.pem"} if name == "SMTPD_TLS_CERT_FILE" else {}
    proc = run(["check-config"], tmp_path, MAIL_DOMAIN="example.com", **{name: value}, **extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pymta: {name}: ")
    assert proc.stdout == ""


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("mail_domian = 'example.com'\n")
    proc = run(["check-config", "--config", str(bad)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "mail_domian" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_good_environment_exit_0(tmp_path: Path) -> None:
    proc = run(["check-config"], tmp_path, MAIL_DOMAIN="example.com example.org",
               MAIL_BOXES="info@example.com abuse@example.com",
               PYMTA_SMTP_LISTEN="127.0.0.1:0", SMTPD_USE_TLS="yes")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "example.com example.org" in proc.stdout
    assert "mailboxes:   2" in proc.stdout
    assert "127.0.0.1:0" in proc.stdout
    assert str(tmp_path / "state") in proc.stdout
    assert not (tmp_path / "state").exists()  # check-config changes nothing


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["frobnicate"], ["queue"], ["queue", "delete"]):
        proc = run(args, tmp_path, MAIL_DOMAIN="example.com")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_unknown_queue_id(tmp_path: Path) -> None:
    (tmp_path / "state" / "queue").mkdir(parents=True)
    proc = run(["queue", "show", "NOSUCHID"], tmp_path, MAIL_DOMAIN="example.com")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "pymta: queue: no message NOSUCHID\n"


def test_serve_with_bad_variable_does_not_start(tmp_path: Path) -> None:
    proc = run(["serve"], tmp_path, MAIL_DOMAIN="example.com", PYMTA_WORKERS="many")
    assert proc.returncode == 2
    assert proc.stderr == "pymta: PYMTA_WORKERS: not a whole number: 'many'\n"


_LDAP = {"LDAP_HOST": "ldap://127.0.0.1:1", "LDAP_USER_BASE": "dc=example,dc=com",
         "LDAP_QUERY_FILTER_USER": "(mail=%s)"}
_MYSQL = {"MYSQL_HOST": "127.0.0.1:1", "MYSQL_DATABASE": "mail",
          "MYSQL_QUERY_USER": "select mail from users where mail='%s'"}


@pytest.mark.parametrize(("hidden", "env", "variable", "extra"), [
    ("ldap3", _LDAP, "LDAP_HOST", "ldap"),
    ("aiomysql", _MYSQL, "MYSQL_HOST", "mysql"),
    ("aioimaplib", {"SMTPD_SASL_IMAPHOST": "127.0.0.1:1"}, "SMTPD_SASL_IMAPHOST", "imap"),
    ("ldap3", {"LDAP_QUERY_ATTRS_PASS": "uid=user", **_LDAP}, "LDAP_HOST", "ldap"),
])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_issue11_missing_optional_dependency_is_a_config_error(
        tmp_path: Path, command: str, hidden: str, env: dict[str, str], variable: str,
        extra: str) -> None:
    """Issue 11: ``LDAP_HOST`` set without ``ldap3`` installed gave ``pymta: internal error:
    ModuleNotFoundError`` (exit 70) at start-up. A missing optional package is a
    configuration error naming the variable and the extra to install, exit 2, from
    ``check-config`` and ``serve`` alike, before anything listens. The package is hidden
    from the child process by a ``sitecustomize`` that makes its import fail."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{hidden!r}] = None\n")
    proc = run([command], tmp_path, MAIL_DOMAIN="example.com", PYTHONPATH=str(shim),
               PYMTA_WORKERS="1", PYMTA_SMTP_LISTEN="127.0.0.1:0", SMTPD_USE_TLS="yes",
               PYMTA_SUBMISSION_LISTEN="127.0.0.1:0", PYMTA_SUBMISSIONS_LISTEN="127.0.0.1:0",
               **env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"pymta: {variable}: needs the {hidden} package "
                           f"(pip install 'pymta-server[{extra}]')\n")
    assert proc.stdout == ""
