"""What a SIGHUP reload applies and what it leaves for a restart (``pymta.reload.plan``), and
the SASL passwd file it reads again (``PYMTA_SASL_PASSWD_FILE``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymta.backends.passwd import PasswordFile, read_passwd_file
from pymta.config.errors import ConfigError
from pymta.config.model import Config, ListenAddress
from pymta.reload import is_reloadable, plan

BASE = Config(hostname="mx.example.com", mail_domain=("example.com",),
              mail_boxes="alice@example.com", smtpd_sasl_clientauth="u:{PLAIN}p")


def test_nothing_changed_is_an_empty_plan() -> None:
    step = plan(BASE, BASE)
    assert (step.config, step.changed, step.restart) == (BASE, (), ())


def test_tables_and_users_are_applied_the_rest_waits_for_a_restart() -> None:
    new = Config(hostname="mx.example.com", mail_domain=("example.com", "example.org"),
                 mail_boxes="alice@example.com bob@example.com",
                 smtpd_sasl_clientauth="u:{PLAIN}q", mynetworks=("10.0.0.0/8",),
                 max_recipients=5, smtp_listen=(ListenAddress("127.0.0.1", 2525),))
    step = plan(BASE, new)
    assert set(step.changed) == {"MAIL_BOXES", "SMTPD_SASL_CLIENTAUTH", "MYNETWORKS"}
    assert set(step.restart) == {"MAIL_DOMAIN", "PYMTA_MAX_RECIPIENTS", "PYMTA_SMTP_LISTEN"}
    merged = step.config
    assert merged.mail_boxes == new.mail_boxes
    assert merged.smtpd_sasl_clientauth == new.smtpd_sasl_clientauth
    assert merged.mynetworks == ("10.0.0.0/8",)
    # the running values of what waits for a restart
    assert merged.mail_domain == ("example.com",)
    assert merged.max_recipients == BASE.max_recipients
    assert merged.smtp_listen == BASE.smtp_listen


@pytest.mark.parametrize("change", [
    {"smtpd_use_tls": True},                        # TLS on: new ports would listen
    {"smtpd_sasl_clientauth": ""},                  # SASL off: the submission ports close
])
def test_turning_tls_or_sasl_on_or_off_needs_a_restart(change: dict[str, object]) -> None:
    new = Config(**{**{"hostname": "mx.example.com", "mail_domain": ("example.com",),
                       "mail_boxes": "carol@example.com",
                       "smtpd_sasl_clientauth": "u:{PLAIN}p"}, **change})  # type: ignore[arg-type]
    step = plan(BASE, new)
    assert step.changed == ()
    assert "MAIL_BOXES" in step.restart
    assert step.config == BASE


def test_certificate_settings_are_reloadable() -> None:
    assert is_reloadable("smtpd_tls_cert_file")
    assert is_reloadable("mail_aliases")
    assert not is_reloadable("state_dir")
    assert not is_reloadable("workers")


def test_passwd_file_reads_dovecot_lines(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\n\nalice:{PLAIN}secret:1000:1000::/home/alice::\n"
                    "bob:{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=\n")
    entries = read_passwd_file(str(path))
    assert entries == {"alice": "{PLAIN}secret",
                       "bob": "{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols="}


@pytest.mark.parametrize("text, words", [
    ("alice\n", "line 1: entries are user:{scheme}password"),
    ("alice:{NOPE}x\n", "line 1"),
    ("a:{PLAIN}x\na:{PLAIN}y\n", "user 'a' listed twice"),
])
def test_passwd_file_errors_name_the_variable_and_line(tmp_path: Path, text: str,
                                                       words: str) -> None:
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_passwd_file(str(path))
    message = str(err.value)
    assert message.startswith("PYMTA_SASL_PASSWD_FILE: ") and words in message
    assert "{PLAIN}" not in message, "an error must never show a password"


def test_passwd_file_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^PYMTA_SASL_PASSWD_FILE: cannot read"):
        read_passwd_file(str(tmp_path / "absent"))


def test_passwd_file_users_join_the_environment_ones(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("filed:{PLAIN}from-file\n")
    config = Config(smtpd_sasl_clientauth="inline:{PLAIN}from-env",
                    sasl_passwd_file=str(path))
    assert config.sasl_methods[0] == "passwd"
    auth = PasswordFile.from_config(config)
    assert repr(auth) == "PasswordFile(2 users)"
    path.write_text("inline:{PLAIN}other\n")
    with pytest.raises(ConfigError, match="user 'inline' is also in SMTPD_SASL_CLIENTAUTH"):
        PasswordFile.check_config(config)


def test_review_an_acme_file_that_appears_after_the_start_needs_a_restart(
        tmp_path: Path) -> None:
    """Issue 13 review: TLS depends on the file system too. pymta started before Traefik
    wrote acme.json runs without TLS; once the file is there, a reload must say that TLS
    needs a restart instead of "no setting changed"."""
    acme = tmp_path / "acme.json"
    config = Config(hostname="mx.example.com", mail_domain=("example.com",),
                    acme_file=str(acme))
    acme.write_text("{}")
    step = plan(config, config, tls_running=False)
    assert step.restart == ("TLS on (ACME_FILE appeared)",)
    assert plan(config, config, tls_running=True).restart == ()
