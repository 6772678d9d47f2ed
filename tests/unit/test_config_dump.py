"""``pymta config dump``: the effective configuration as TOML that ``--config`` reads back to
the same Config, for every kind of setting; secrets masked (and said so) unless asked for."""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from pathlib import Path

import pytest

from pymta.cli.main import main
from pymta.config import load as load_mod
from pymta.config.dump import MASK, dump_toml, secret_fields
from pymta.config.load import _SETTINGS, load_config
from pymta.config.model import Config

BASE = {"MYHOSTNAME": "mx1.example.net", "MAIL_DOMAIN": "example.com"}

#: A value other than the default for each setting, as an operator writes it in the
#: environment. Settings missing here still get their default round-tripped (below), and
#: every kind of value (the Config field's type) must have at least one sample.
SAMPLES: dict[str, str] = {
    "MYHOSTNAME": "mail.example.org",
    "MAIL_DOMAIN": "example.org, Second.Example. third.example",
    "MAIL_BOXES": "info@example.org abuse@example.org:example.org/abuse/",
    "MAIL_ALIASES": "root:info,info@example.org postmaster:root",
    "REGEX_ALIAS": '/([^+]+)[+-].*@(.+)/ $1@$2\n/^"quoted\\\\back"@(.*)$/ x@$1',
    "LDAP_HOST": "ldaps://auth.example.org:1636",
    "LDAP_USER_BASE": "ou=people,dc=example,dc=org",
    "LDAP_QUERY_FILTER_USER": "(&(objectclass=posixAccount)(mail=%s))",
    "LDAP_QUERY_ATTRS_USER": "mailMessageStore",
    "LDAP_GROUP_BASE": "ou=groups,dc=example,dc=org",
    "LDAP_QUERY_FILTER_ALIAS": "(&(objectclass=posixAccount)(mailLocalAddress=%s))",
    "LDAP_QUERY_FILTER_GROUP": "(&(objectclass=posixGroup)(cn=%u))",
    "LDAP_QUERY_FILTER_EXPAND": "(&(objectclass=posixAccount)(uid=%s))",
    "LDAP_BIND_DN": "uid=admin,dc=example,dc=org",
    "LDAP_BIND_PW": ' s3cr"et\\ with spaces ',
    "PYMTA_LDAP_TLS_CA_FILE": "/srv/tls/ldap ca.pem",
    "MYSQL_HOST": "db:3307",
    "MYSQL_DATABASE": "postfix",
    "MYSQL_USER": "mta",
    "MYSQL_PASSWORD": "pä$$\tword",
    "MYSQL_QUERY_USER": "select mail from users where mail='%s' limit 1;",
    "MYSQL_QUERY_ALIAS": "select goto from aliases where alias='%s'",
    "PYMTA_LOOKUP_CACHE_TTL": "5m",
    "PYMTA_LOOKUP_NEGATIVE_TTL": "0",
    "PYMTA_LOOKUP_TIMEOUT": "0.1",
    "MESSAGE_SIZE_LIMIT": "25600000",
    "PYMTA_QUEUE_MINFREE": "100000000",
    "PYMTA_MAX_RECIPIENTS": "7",
    "PYMTA_MAX_ERRORS": "3",
    "PYMTA_IDLE_TIMEOUT": "1.5m",
    "PYMTA_SHUTDOWN_TIMEOUT": "45s",
    "PYMTA_MAX_CONNECTIONS": "10000",
    "PYMTA_MAX_CONNECTIONS_PER_IP": "9",
    "PYMTA_CONNECTION_RATE_LIMIT": "60",
    "PYMTA_LINE_LENGTH_LIMIT": "4096",
    "PYMTA_HEADER_SIZE_LIMIT": "262144",
    "PYMTA_MAX_RECEIVED_HEADERS": "30",
    "PYMTA_SMTP_LISTEN": "127.0.0.1:2525, [::1]:2525 *:26",
    "PYMTA_SUBMISSION_LISTEN": "none",
    "PYMTA_SUBMISSIONS_LISTEN": "localhost:4650",
    "PYMTA_WORKERS": "3",
    "PYMTA_METRICS_LISTEN": "[::1]:9325",
    "PYMTA_PIPELINE_TIMEOUT": "10s",
    "PYMTA_SPF": "no",
    "SPF_REJECT_FAIL": "yes",
    "PYMTA_DMARC": "off",
    "DMARC_ENFORCE": "0",
    "PYMTA_AUTHSERV_ID": "mx.example.org",
    "PYMTA_DKIM_VERIFY": "false",
    "PYMTA_DKIM_SIGN": "no",
    "DKIM_SELECTOR": "2024A",
    "DKIM_KEYBITS": "4096",
    "DKIM_ALGORITHM": "ED25519",
    "DKIM_PRIVATEKEY": "MIIEpAIBAAKCAQEA04up8hoqzS...1+APIB0RhjXyObwHQnOzhAk",
    "PYMTA_ARC": "no",
    "SRS_ENABLE": "no",
    "SRS_DOMAIN": "srs.example.org",
    "SRS_SECRET": "tops3cret",
    "SRS_MAX_AGE": "4w",
    "SMTPD_USE_TLS": "yes",
    "SMTPD_TLS_CERT_FILE": "/srv/tls/cert.pem",
    "SMTPD_TLS_KEY_FILE": "/srv/tls/key.pem",
    "SMTPD_TLS_ECCERT_FILE": "/srv/tls/ec-cert.pem",
    "SMTPD_TLS_ECKEY_FILE": "/srv/tls/ec-key.pem",
    "SMTPD_TLS_DCERT_FILE": "/srv/tls/dsa-cert.pem",
    "SMTPD_TLS_DKEY_FILE": "/srv/tls/dsa-key.pem",
    "SMTPD_TLS_CHAIN_FILES": "/srv/tls/rsa-chain.pem, /srv/tls/ec-chain.pem",
    "SMTPD_TLS_DH1024_PARAM_FILE": "/srv/tls/dh2048.pem",
    "ACME_FILE": "/traefik/acme.json",
    "ACME_POSTHOOK": "kill -HUP 1 && echo 'reloaded \"now\"'",
    "SMTPD_SASL_CLIENTAUTH": "client1:{plain}passwd1 client2:{SHA512-CRYPT}$6$x$y",
    "PYMTA_SASL_PASSWD_FILE": "/srv/etc/passwd",
    "SMTPD_SASL_IMAPHOST": "app:143",
    "LDAP_QUERY_ATTRS_PASS": "uid=user",
    "LDAP_QUERY_FILTER_PASS": "(&(objectclass=posixAccount)(uid=%u))",
    "MYSQL_QUERY_PASS": "select password, userid as user from users where userid = '%u'",
    "DOVECOT_AUTH_USERNAME_FORMAT": "%Ln",
    "PYMTA_AUTH_FAIL_DELAY": "1s",
    "PYMTA_AUTH_FAIL_DELAY_MAX": "10s",
    "MYNETWORKS": "172.16.0.0/12 10.1.2.3 [::1]/128",
    "PYMTA_PROXY_PROTOCOL_FROM": "10.0.0.5/32",
    "PYMTA_STATE_DIR": "/srv/pymta-state",
    "PYMTA_MAIL_DIR": "/srv/mail",
    "PYMTA_RETRY_FIRST": "1m",
    "PYMTA_RETRY_MAX": "1h",
    "PYMTA_QUEUE_LIFETIME": "3d",
    "PYMTA_DELAY_WARNING_TIME": "4h",
    "PYMTA_QUEUE_SCAN_INTERVAL": "30s",
    "PYMTA_DELIVERY_CONCURRENCY": "50",
    "PYMTA_HOLD_INCOMING": "yes",
    "SMTP_RELAY_HOSTAUTH": "[SMTP.Example.net]:587 me@example.org:pa:ss",
    "SMTP_TLS_SECURITY_LEVEL": "encrypt",
    "SMTP_TLS_WRAPPERMODE": "yes",
    "VIRTUAL_TRANSPORT": "lmtp:[::1]:2003",
    "PYMTA_DNS_RESOLVER": "127.0.0.1:5353 127.0.0.2:5353",
    "PYMTA_DNS_TIMEOUT": "2",
    "PYMTA_PEERNAME_LOOKUP": "no",
    "PYMTA_MX_PORT": "2525",
    "PYMTA_DESTINATION_CONCURRENCY": "4",
    "PYMTA_SMTP_CONNECT_TIMEOUT": "10",
    "PYMTA_SMTP_TIMEOUT": "2m",
    "PYMTA_CONNECTION_CACHE_TIME": "0",
    "PYMTA_CONNECTION_REUSE_LIMIT": "5",
    "PYMTA_DEAD_HOST_TIME": "0.25",
    "PYMTA_CLAMD": "unix:/run/clamav/clamd.ctl",
    "PYMTA_SPAMD": "spamd:783",
    "PYMTA_RSPAMD_CONTROLLER": "rspamd:11334",
    "PYMTA_RSPAMD_PASSWORD": "q1",
    "PYMTA_SCANNER_TIMEOUT": "5",
    "PYMTA_SCANNER_CONCURRENCY": "2",
    "PYMTA_VIRUS_ON_ERROR": "pass",
    "PYMTA_SPAM_ON_ERROR": "tempfail",
    "PYMTA_BANNED_CHECK": "no",
    "PYMTA_BANNED_FILES": ".iso application/x-msdownload",
    "PYMTA_ALLOWED_FILES": "exe",
    "PYMTA_BAD_HEADER_CHECK": "no",
    "SA_TAG_LEVEL_DEFLT": "none",
    "SA_TAG2_LEVEL_DEFLT": "-999",
    "SA_KILL_LEVEL_DEFLT": "10.25",
    "PYMTA_SPAM_SUBJECT_TAG": "***SPAM*** ",
    "FINAL_VIRUS_DESTINY": "D_REJECT",
    "FINAL_BANNED_DESTINY": "d_bounce",
    "FINAL_SPAM_DESTINY": "D_DISCARD",
    "FINAL_BAD_HEADER_DESTINY": "reject",
    "PYMTA_QUARANTINE_LIFETIME": "14d",
    "KOPANO_SPAMD_LIB": "/srv/learn",
    "PYMTA_LEARN_INTERVAL": "1m",
    "SYSLOG_LEVEL": "7",
    "PYMTA_LOG_SYSLOG": "yes",
    "PYMTA_LOG_JSON": "yes",
    "PYMTA_LOG_FORMAT": "json",
    "PYMTA_SYSLOG_NAME": "postfix/submission",
}
# PYMTA_RSPAMD is left out: it cannot be set together with PYMTA_SPAMD (one spam engine).
SEPARATE = {"PYMTA_RSPAMD": "127.0.0.1:11333"}
#: Settings that must be set in pairs (both files or neither).
PAIRS = {"SMTPD_TLS_CERT_FILE": "SMTPD_TLS_KEY_FILE", "SMTPD_TLS_ECCERT_FILE":
         "SMTPD_TLS_ECKEY_FILE", "SMTPD_TLS_DCERT_FILE": "SMTPD_TLS_DKEY_FILE"}
PAIRS.update({v: k for k, v in PAIRS.items()})
_KNOWN = {s.env for s in _SETTINGS}


@pytest.fixture(autouse=True)
def _fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_host_fqdn", lambda: "mx1.example.net")


def round_trip(tmp_path: Path, config: Config, name: str = "dump.toml") -> Config:
    """``config`` dumped with its secrets, then read as ``--config`` with no environment."""
    path = tmp_path / name
    path.write_text(dump_toml(config, show_secrets=True), encoding="utf-8")
    return load_config({}, path=str(path))


def present(samples: dict[str, str]) -> dict[str, str]:
    """The samples whose setting exists (another change may not be in this tree yet)."""
    return {k: v for k, v in samples.items() if k in _KNOWN}


def test_every_sample_round_trips_alone(tmp_path: Path) -> None:
    for variable, raw in {**present(SAMPLES), **present(SEPARATE)}.items():
        environ = {**BASE, variable: raw}
        if variable in PAIRS:
            environ[PAIRS[variable]] = SAMPLES[PAIRS[variable]]
        original = load_config(environ)
        field = next(s.field for s in _SETTINGS if s.env == variable)
        assert getattr(original, field) != getattr(Config(), field) or field in (
            "hostname", "mail_domain"), f"{variable}: sample is the default"
        again = round_trip(tmp_path, original)
        assert getattr(again, field) == getattr(original, field), variable
        assert again == original, variable


def test_all_samples_together_round_trip(tmp_path: Path) -> None:
    original = load_config(present(SAMPLES))
    assert round_trip(tmp_path, original) == original
    # and a dump of that file is the same text: nothing drifts on a second pass
    again = round_trip(tmp_path, original)
    assert dump_toml(again, show_secrets=True) == dump_toml(original, show_secrets=True)


def test_every_setting_round_trips_its_default(tmp_path: Path) -> None:
    original = load_config(BASE)
    assert round_trip(tmp_path, original) == original
    text = dump_toml(original)
    written = set(tomllib.loads(text))
    for setting in _SETTINGS:     # every setting is in the file, or says it is not set
        key = setting.env.lower()
        assert key in written or f"\n# {key}: not set\n" in text, key


def test_every_kind_of_value_has_a_sample() -> None:
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Config)}
    sampled = {kinds[s.field] for s in _SETTINGS if s.env in SAMPLES or s.env in SEPARATE}
    missing = {s.env: kinds[s.field] for s in _SETTINGS if kinds[s.field] not in sampled}
    assert not missing, f"add a sample of this kind of value to SAMPLES: {missing}"


def test_extra_table_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "in.toml"
    source.write_text('mail_domain = "example.com"\n[extra]\nplain = "x"\n"odd key" = "a\\"b"\n'
                      'api_password = "hidden"\n')
    original = load_config({"MYHOSTNAME": "mx.example.com"}, path=str(source))
    assert original.extra == {"plain": "x", "odd key": 'a"b', "api_password": "hidden"}
    assert round_trip(tmp_path, original) == original
    masked = tomllib.loads(dump_toml(original))
    assert masked["extra"] == {"plain": "x", "odd key": 'a"b', "api_password": MASK}


def test_strings_that_need_escaping_stay_valid_toml(tmp_path: Path) -> None:
    nasty = 'a"b\\c\x01\x1f\x7f\té€😀\r\nend'
    original = dataclasses.replace(load_config(BASE), mail_boxes=nasty, ldap_bind_pw=nasty)
    again = round_trip(tmp_path, original)
    assert again.ldap_bind_pw == nasty          # secrets are taken exactly as written
    assert again.mail_boxes == nasty.strip()    # the others are stripped, as load does


def test_secrets_are_masked_and_the_header_says_which(tmp_path: Path) -> None:
    config = load_config(present(SAMPLES))
    text = dump_toml(config)
    data = tomllib.loads(text)
    for key in ("ldap_bind_pw", "mysql_password", "dkim_privatekey", "srs_secret",
                "smtpd_sasl_clientauth", "pymta_rspamd_password"):
        assert data[key] == MASK, key
        assert key in text.splitlines()[3]
    assert data["smtp_relay_hostauth"] == f"[smtp.example.net]:587 me@example.org:{MASK}"
    for secret in ("s3cr", "pä$$", "tops3cret", "passwd1", "pa:ss", "MIIEpAIB"):
        assert secret not in text, secret
    assert text.startswith("# pymta configuration")
    assert "SECRETS MASKED" in text and "--show-secrets" in text
    assert data["ldap_bind_dn"] == "uid=admin,dc=example,dc=org"   # not a secret
    # what a masked file means when it is served: the mask, not the secret
    path = tmp_path / "masked.toml"
    path.write_text(text)
    assert load_config({}, path=str(path)).mysql_password == MASK


def test_nothing_to_mask_says_nothing_and_empty_secrets_stay_empty() -> None:
    text = dump_toml(load_config(BASE))
    assert "MASKED" not in text
    assert "\n# ldap_bind_pw: not set\n" in text
    assert "ldap_bind_pw" not in tomllib.loads(text)


def test_secret_fields_cover_the_hidden_and_the_password_named() -> None:
    hidden = {f.name for f in dataclasses.fields(Config) if not f.repr}
    assert hidden <= secret_fields()
    assert {"mysql_password", "rspamd_password", "srs_secret", "smtp_relay"} <= secret_fields()
    assert "ldap_bind_dn" not in secret_fields()


# ------------------------------------------------------------------------------ the command


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (*_KNOWN, "PYMTA_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MYHOSTNAME", "mx.example.com")
    monkeypatch.setenv("PYMTA_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_cli_dump_prints_masked_toml_and_env_wins_over_file(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = clean_env / "site.toml"
    source.write_text('mail_domain = "file.example"\nmessage_size_limit = 1000\n'
                      'mysql_password = "from-file"\n')
    monkeypatch.setenv("MESSAGE_SIZE_LIMIT", "2000")
    assert main(["config", "dump", "--config", str(source)]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)
    assert data["mail_domain"] == ["file.example"]
    assert data["message_size_limit"] == 2000
    assert data["mysql_password"] == MASK and "from-file" not in out
    assert f"from the defaults, {source} and the environment" in out
    assert main(["config", "dump", "--config", str(source), "--show-secrets"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["mysql_password"] == "from-file"


def test_cli_dump_to_a_file_only_the_owner_reads(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LDAP_BIND_PW", "secret-pw")
    target = clean_env / "out.toml"
    target.write_text("old")
    assert main(["config", "dump", "--show-secrets", "-o", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(target) in captured.err
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert tomllib.loads(target.read_text())["ldap_bind_pw"] == "secret-pw"
    assert [p.name for p in clean_env.iterdir() if p.name.startswith("out.toml.")] == []


def test_cli_dump_of_a_bad_configuration_is_one_line_exit_2(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYMTA_WORKERS", "many")
    assert main(["config", "dump"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pymta: PYMTA_WORKERS:") and len(err.splitlines()) == 1
    monkeypatch.delenv("PYMTA_WORKERS")
    monkeypatch.setenv("MYSQL_QUERY_USER", "select %q")      # an adapter's own check
    assert main(["config", "dump"]) == 2
    assert capsys.readouterr().err.startswith("pymta: MYSQL_QUERY_USER:")


def test_cli_config_without_action_is_a_usage_error(
        clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 2
    assert "config: which action? dump" in capsys.readouterr().err
