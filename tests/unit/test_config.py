"""load_config: defaults, TOML versus environment, parsing, and one-line errors that name the
variable (the CLI prints them as they are)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pymta.config import load as load_mod
from pymta.config.errors import ConfigError
from pymta.config.load import default_workers, load_config, parse_duration, parse_listen
from pymta.config.model import Config, ListenAddress

BASE = {"MAIL_DOMAIN": "example.com"}


@pytest.fixture(autouse=True)
def _fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_host_fqdn", lambda: "mx1.example.net")


def env(**kw: str) -> dict[str, str]:
    return {**BASE, **kw}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pymta.toml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ defaults


def test_defaults_come_from_the_host_name() -> None:
    config = load_config({})
    assert config.hostname == "mx1.example.net"
    assert config.mail_domain == ("example.net",)
    assert config.smtp_listen == (ListenAddress("0.0.0.0", 25),)
    assert config.submission_listen == (ListenAddress("0.0.0.0", 587),)
    assert config.submissions_listen == (ListenAddress("0.0.0.0", 465),)
    assert config.workers == default_workers() >= 1   # one per core
    assert config.mail_dir == "/var/mail"
    assert config.message_size_limit == Config().message_size_limit
    assert config.smtpd_use_tls is False


def test_mail_domain_default_follows_myhostname() -> None:
    assert load_config({"MYHOSTNAME": "mx.corp.example"}).mail_domain == ("corp.example",)


def test_host_without_domain_needs_mail_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_host_fqdn", lambda: "localhost")
    with pytest.raises(ConfigError, match=r"^MAIL_DOMAIN: not set and the host name has no "
                                          r"domain part"):
        load_config({})
    assert load_config(BASE).hostname == "localhost"


def test_state_dir_default_depends_on_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod.os, "geteuid", lambda: 0)
    assert load_config(BASE).state_dir == "/srv/pymta"
    monkeypatch.setattr(load_mod.os, "geteuid", lambda: 1000)
    assert load_config(BASE).state_dir == "./var"


def test_every_config_field_has_a_variable() -> None:
    mapped = {s.field for s in load_mod._SETTINGS}
    assert mapped | {"extra"} == {f.name for f in dataclasses.fields(Config)}


# ------------------------------------------------------------------------------ values


def test_image_variables() -> None:
    config = load_config({
        "MAIL_DOMAIN": "Example.com, secondary.com. example.com",
        "MAIL_BOXES": "info@example.com abuse@example.com:abuse/",
        "MAIL_ALIASES": "root:info,info@example.com",
        "MESSAGE_SIZE_LIMIT": "25600000",
        "SYSLOG_LEVEL": "7",
        "SMTPD_USE_TLS": "YES",
        "MYHOSTNAME": "mx1.example.com",
    })
    assert config.mail_domain == ("example.com", "secondary.com")
    assert config.mail_boxes == "info@example.com abuse@example.com:abuse/"
    assert config.mail_aliases == "root:info,info@example.com"
    assert config.message_size_limit == 25600000
    assert config.syslog_level == 7
    assert config.smtpd_use_tls is True
    assert config.hostname == "mx1.example.com"


def test_pymta_variables() -> None:
    config = load_config(env(
        PYMTA_STATE_DIR="/tmp/s", PYMTA_MAIL_DIR="/tmp/m", PYMTA_WORKERS="4",
        PYMTA_MAX_RECIPIENTS="10", PYMTA_RETRY_FIRST="1m", PYMTA_RETRY_MAX="1h",
        PYMTA_QUEUE_LIFETIME="5d", PYMTA_LOG_JSON="on", PYMTA_IDLE_TIMEOUT="90",
    ))
    assert (config.state_dir, config.mail_dir, config.workers) == ("/tmp/s", "/tmp/m", 4)
    assert config.max_recipients == 10
    assert (config.queue_retry_first, config.queue_retry_max) == (60.0, 3600.0)
    assert config.queue_lifetime == 5 * 86400
    assert config.log_json is True
    assert config.idle_timeout == 90.0


def test_connection_rate_limit_is_off_by_default_as_in_postfix() -> None:
    assert load_config(BASE).connection_rate_limit == 0
    assert load_config(env(PYMTA_CONNECTION_RATE_LIMIT="30")).connection_rate_limit == 30
    assert load_config(env(PYMTA_CONNECTION_RATE_LIMIT="0")).connection_rate_limit == 0


def test_issue11_delay_warning_time_is_off_by_default_as_in_postfix() -> None:
    """PYMTA_DELAY_WARNING_TIME: a duration like the others (bare number = seconds), 0 off."""
    assert load_config(BASE).delay_warning_time == 0.0
    assert load_config(env(PYMTA_DELAY_WARNING_TIME="4h")).delay_warning_time == 14400.0
    assert load_config(env(PYMTA_DELAY_WARNING_TIME="90")).delay_warning_time == 90.0
    assert load_config(env(PYMTA_DELAY_WARNING_TIME="0")).delay_warning_time == 0.0


@pytest.mark.parametrize("value", ["soon", "-1h", "4 hours", "1e9999", "inf", "4h30m"])
def test_issue11_delay_warning_time_bad_values_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env(PYMTA_DELAY_WARNING_TIME=value))
    assert str(info.value).startswith("PYMTA_DELAY_WARNING_TIME: not a duration")
    assert "\n" not in str(info.value)


def test_issue11_delay_warning_time_from_toml(tmp_path: Path) -> None:
    for key in ("delay_warning_time", "pymta_delay_warning_time"):
        path = write(tmp_path, f'mail_domain = "example.com"\n{key} = "30m"\n')
        assert load_config({}, path=path).delay_warning_time == 1800.0
    path = write(tmp_path, 'mail_domain = "example.com"\ndelay_warning_time = true\n')
    with pytest.raises(ConfigError, match="^PYMTA_DELAY_WARNING_TIME: not a duration"):
        load_config({}, path=path)


def test_empty_variable_counts_as_unset() -> None:
    # docker-compose writes SYSLOG_LEVEL=${SYSLOG_LEVEL-}
    assert load_config(env(SYSLOG_LEVEL="", MESSAGE_SIZE_LIMIT=" ")).syslog_level == 5


def test_unknown_environment_variables_are_ignored() -> None:
    load_config(env(PYMTA_NO_SUCH_THING="x", LDAP_HOST="auth", PATH="/bin"))


@pytest.mark.parametrize("value", ["yes", "Yes", "true", "1", "on", "ON"])
def test_booleans_true(value: str) -> None:
    assert load_config(env(SMTPD_USE_TLS=value)).smtpd_use_tls is True


@pytest.mark.parametrize("value", ["no", "false", "0", "off", "NO"])
def test_booleans_false(value: str) -> None:
    assert load_config(env(SMTPD_USE_TLS=value)).smtpd_use_tls is False


@pytest.mark.parametrize(("text", "seconds"), [
    ("300", 300.0), ("300s", 300.0), ("5m", 300.0), ("4h", 14400.0), ("5d", 432000.0),
    ("1w", 604800.0), ("1.5h", 5400.0), (" 10 s ", 10.0), (0, 0.0), (2.5, 2.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration("X", text) == seconds


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0:25", [("0.0.0.0", 25)]),
    (":587", [("0.0.0.0", 587)]),
    ("*:25", [("0.0.0.0", 25)]),
    ("2525", [("0.0.0.0", 2525)]),
    ("[::1]:0", [("::1", 0)]),
    ("[::]:25", [("::", 25)]),
    ("127.0.0.1:0, [::1]:25  localhost:26", [("127.0.0.1", 0), ("::1", 25), ("localhost", 26)]),
    (":25 :25", [("0.0.0.0", 25)]),
    ("none", []),
    (["127.0.0.1:25", ":26"], [("127.0.0.1", 25), ("0.0.0.0", 26)]),
])
def test_listen_parsing(text: object, expected: list[tuple[str, int]]) -> None:
    assert parse_listen("PYMTA_SMTP_LISTEN", text) == tuple(ListenAddress(h, p)
                                                            for h, p in expected)


def test_listen_from_environment() -> None:
    config = load_config(env(PYMTA_SMTP_LISTEN="127.0.0.1:0", PYMTA_SUBMISSION_LISTEN=":1587"))
    assert config.smtp_listen == (ListenAddress("127.0.0.1", 0),)
    assert config.submission_listen == (ListenAddress("0.0.0.0", 1587),)
    assert str(parse_listen("X", "[::1]:25")[0]) == "[::1]:25"


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("name", "value", "message"), [
    ("MESSAGE_SIZE_LIMIT", "ten", "MESSAGE_SIZE_LIMIT: not a whole number: 'ten'"),
    ("MESSAGE_SIZE_LIMIT", "-1", "MESSAGE_SIZE_LIMIT: must be at least 0: '-1'"),
    ("MESSAGE_SIZE_LIMIT", "10M", "MESSAGE_SIZE_LIMIT: not a whole number: '10M'"),
    ("SYSLOG_LEVEL", "8", "SYSLOG_LEVEL: must be 0 (emerg) to 7 (debug): '8'"),
    ("SYSLOG_LEVEL", "debug", "SYSLOG_LEVEL: not a whole number: 'debug'"),
    ("SMTPD_USE_TLS", "maybe", "SMTPD_USE_TLS: not yes or no: 'maybe'"),
    ("PYMTA_WORKERS", "0", "PYMTA_WORKERS: must be at least 1: '0'"),
    ("PYMTA_LINE_LENGTH_LIMIT", "100", "PYMTA_LINE_LENGTH_LIMIT: must be at least 512: '100'"),
    ("PYMTA_QUEUE_LIFETIME", "5x", "PYMTA_QUEUE_LIFETIME: not a duration"),
    ("PYMTA_IDLE_TIMEOUT", "0", "PYMTA_IDLE_TIMEOUT: must be more than zero: '0'"),
    ("PYMTA_SMTP_LISTEN", "localhost", "PYMTA_SMTP_LISTEN: not host:port: 'localhost'"),
    ("PYMTA_SMTP_LISTEN", ":99999", "PYMTA_SMTP_LISTEN: not a port number (0-65535): ':99999'"),
    ("PYMTA_SMTP_LISTEN", ":smtp", "PYMTA_SMTP_LISTEN: not a port number"),
    ("PYMTA_SMTP_LISTEN", "::1:25", "PYMTA_SMTP_LISTEN: IPv6 addresses need brackets"),
    ("PYMTA_SMTP_LISTEN", "[nope]:25", "PYMTA_SMTP_LISTEN: not an IPv6 address: '[nope]:25'"),
    ("PYMTA_SMTP_LISTEN", "[::1]25", "PYMTA_SMTP_LISTEN: not [address]:port: '[::1]25'"),
    ("PYMTA_SMTP_LISTEN", "bad host:25", "PYMTA_SMTP_LISTEN: not host:port: 'bad'"),
    ("MAIL_DOMAIN", "user@example.com", "MAIL_DOMAIN: not a domain name: 'user@example.com'"),
    ("MAIL_DOMAIN", "exa..mple.com", "MAIL_DOMAIN: not a domain name: 'exa..mple.com'"),
    ("MYHOSTNAME", "mx 1", "MYHOSTNAME: not a host name: 'mx 1'"),
    ("PYMTA_CONNECTION_RATE_LIMIT", "-1",
     "PYMTA_CONNECTION_RATE_LIMIT: must be at least 0: '-1'"),
    ("PYMTA_CONNECTION_RATE_LIMIT", "30/m",
     "PYMTA_CONNECTION_RATE_LIMIT: not a whole number: '30/m'"),
])
def test_errors_name_the_variable_and_value(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env(**{name: value}))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_tls_cert_without_key_and_key_without_cert() -> None:
    with pytest.raises(ConfigError, match=r"^SMTPD_TLS_KEY_FILE: not set, but "
                                          r"SMTPD_TLS_CERT_FILE is: '/c.pem'"):
        load_config(env(SMTPD_TLS_CERT_FILE="/c.pem"))
    with pytest.raises(ConfigError, match=r"^SMTPD_TLS_CERT_FILE: not set"):
        load_config(env(SMTPD_TLS_KEY_FILE="/k.pem"))


def test_retry_first_longer_than_max() -> None:
    with pytest.raises(ConfigError, match=r"^PYMTA_RETRY_FIRST: longer than PYMTA_RETRY_MAX"):
        load_config(env(PYMTA_RETRY_FIRST="2h", PYMTA_RETRY_MAX="1h"))


# ------------------------------------------------------------------------------ TOML file


def test_toml_file_by_argument(tmp_path: Path) -> None:
    path = write(tmp_path, 'mail_domain = "example.com"\nmessage_size_limit = 20000000\n'
                           'smtp_listen = ["127.0.0.1:0"]\nworkers = 2\nsmtpd_use_tls = true\n'
                           'pymta_retry_first = "1m"\nqueue_lifetime = 3600\n'
                           '[extra]\nrelay = "smart.example"\n')
    config = load_config({}, path=path)
    assert config.mail_domain == ("example.com",)
    assert config.message_size_limit == 20000000
    assert config.smtp_listen == (ListenAddress("127.0.0.1", 0),)
    assert config.workers == 2
    assert config.smtpd_use_tls is True
    assert config.queue_retry_first == 60.0
    assert config.queue_lifetime == 3600.0
    assert config.extra == {"relay": "smart.example"}


def test_toml_file_by_pymta_config(tmp_path: Path) -> None:
    path = write(tmp_path, 'mail_domain = ["a.example", "b.example"]\n')
    assert load_config({"PYMTA_CONFIG": path}).mail_domain == ("a.example", "b.example")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'mail_domain = "file.example"\nmessage_size_limit = 100\n'
                           'syslog_level = 3\n')
    config = load_config({"MESSAGE_SIZE_LIMIT": "200", "PYMTA_CONFIG": path})
    assert config.message_size_limit == 200          # environment wins
    assert config.mail_domain == ("file.example",)   # file beats the default
    assert config.syslog_level == 3
    # the path argument beats PYMTA_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('mail_domain = "arg.example"\n')
    assert load_config({"PYMTA_CONFIG": path}, path=str(other)).mail_domain == ("arg.example",)


def test_toml_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'mail_domian = "example.com"\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'mail_domian' "
                                          r"\(did you mean 'mail_domain'\?\)"):
        load_config({}, path=path)


def test_toml_bad_value_names_variable_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'message_size_limit = "ten"\n')
    with pytest.raises(ConfigError) as info:
        load_config(BASE, path=path)
    assert str(info.value).startswith("MESSAGE_SIZE_LIMIT: not a whole number: 'ten'")
    assert path in str(info.value)
    path = write(tmp_path, "message_size_limit = 1.5\n")
    with pytest.raises(ConfigError, match="^MESSAGE_SIZE_LIMIT: not a whole number: 1.5"):
        load_config(BASE, path=path)


def test_toml_same_setting_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\npymta_workers = 3\n")
    with pytest.raises(ConfigError, match="^PYMTA_WORKERS: set twice"):
        load_config(BASE, path=path)


def test_toml_invalid_or_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "mail_domain = \n")
    with pytest.raises(ConfigError, match=r"is not valid TOML") as info:
        load_config({}, path=path)
    assert path in str(info.value)
    with pytest.raises(ConfigError, match=r"^PYMTA_CONFIG: cannot read '/no/such\.toml'"):
        load_config({"PYMTA_CONFIG": "/no/such.toml"})


def test_queue_minfree_is_a_byte_count() -> None:
    assert load_config(BASE).queue_minfree == 0
    assert load_config(env(PYMTA_QUEUE_MINFREE="100000000")).queue_minfree == 100000000
    with pytest.raises(ConfigError, match="PYMTA_QUEUE_MINFREE"):
        load_config(env(PYMTA_QUEUE_MINFREE="lots"))


# ------------------------------------------------------------------------------ outbound TLS


def test_issue15_tls_policy_from_the_environment_and_a_toml_table(tmp_path: Path) -> None:
    config = load_config(env(PYMTA_TLS_POLICY="Example.COM.=secure, .example.net=VERIFY",
                             SMTP_TLS_SECURITY_LEVEL="verify"))
    assert config.tls_policy == ("example.com=secure", ".example.net=verify")
    assert config.smtp_tls_security_level == "verify"
    path = write(tmp_path, 'mail_domain = "example.com"\n[tls_policy]\n'
                           '"example.org" = "secure"\n".example.net" = "encrypt"\n')
    assert load_config({}, path=path).tls_policy == ("example.org=secure",
                                                     ".example.net=encrypt")


@pytest.mark.parametrize("variables, message", [
    ({"PYMTA_TLS_POLICY": "example.com"}, "PYMTA_TLS_POLICY: not domain=level: 'example.com'"),
    ({"PYMTA_TLS_POLICY": "a.test=tlsa"}, "PYMTA_TLS_POLICY (a.test): must be one of"),
    ({"PYMTA_TLS_POLICY": "a.test=may A.test=none"}, "PYMTA_TLS_POLICY: 'a.test' given twice"),
    ({"PYMTA_TLS_POLICY": "a@b.test=may"}, "PYMTA_TLS_POLICY: not domain=level"),
    ({"SMTP_TLS_SECURITY_LEVEL": "strict"}, "SMTP_TLS_SECURITY_LEVEL: must be one of"),
    ({"PYMTA_SMTP_TLS_CA_FILE": "/nonexistent/ca.pem"},
     "PYMTA_SMTP_TLS_CA_FILE: cannot load certificates from '/nonexistent/ca.pem': No such"),
    ({"PYMTA_SMTP_TLS_CA_FILE": "/etc/hostname"},
     "PYMTA_SMTP_TLS_CA_FILE: cannot load certificates from '/etc/hostname': "),
])
def test_issue15_bad_tls_settings_name_the_variable(variables: dict[str, str],
                                                   message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env(**variables))
    assert str(info.value).startswith(message), info.value


def test_issue15_mta_sts_is_on_by_default_and_takes_yes_or_no(tmp_path: Path) -> None:
    assert load_config(BASE).mta_sts is True
    assert load_config(env(PYMTA_MTA_STS="no")).mta_sts is False
    assert load_config(env(PYMTA_MTA_STS="Yes")).mta_sts is True
    path = write(tmp_path, 'mail_domain = "example.com"\nmta_sts = false\n')
    assert load_config({}, path=path).mta_sts is False
    with pytest.raises(ConfigError) as info:
        load_config(env(PYMTA_MTA_STS="enforce"))
    assert str(info.value) == "PYMTA_MTA_STS: not yes or no: 'enforce'"
