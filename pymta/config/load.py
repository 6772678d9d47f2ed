"""Build the typed :class:`Config` from a TOML file and the environment.

Users come from a container image configured by environment variables, so the names of
``mlan/postfix-amavis`` (``MAIL_DOMAIN``, ``MESSAGE_SIZE_LIMIT``, ``SMTPD_USE_TLS`` ...) keep
working unchanged; pymta's own settings are ``PYMTA_*``. A TOML file (``--config`` or
``PYMTA_CONFIG``) may carry the same settings under their lower-case names (``mail_domain``,
``pymta_workers`` or ``workers``).

Precedence: built-in defaults < TOML file < environment. An empty environment variable counts
as unset, because docker-compose files write ``SYSLOG_LEVEL=${SYSLOG_LEVEL-}``. Unknown
environment variables are ignored (the environment is shared with everything else in the
container); unknown TOML keys are errors (a file is ours alone, and a typo there would
otherwise be silently ignored).

Every problem becomes one :class:`ConfigError` whose message starts with the variable name,
says what is wrong and quotes the value, so the CLI can print it as one line.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pymta.config.errors import ConfigError
from pymta.config.model import Config, ListenAddress, RelayHost

__all__ = ["load_config", "parse_bool", "parse_duration", "parse_listen", "parse_size",
           "setting_names"]

# ------------------------------------------------------------------------------ value parsers
# Each parser takes the variable name (for the message) and a raw value, which is a string
# from the environment or any TOML value, and returns the typed value or raises ConfigError.

_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}


def parse_bool(name: str, value: Any) -> bool:
    """yes/no, true/false, 1/0, on/off in any case; TOML booleans as they are."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}: not yes or no: {value!r}")


def parse_size(name: str, value: Any, minimum: int = 0) -> int:
    """A whole number ≥ ``minimum``. No suffixes: sizes in the image are plain byte counts."""
    if isinstance(value, bool | float):
        raise ConfigError(f"{name}: not a whole number: {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ConfigError(f"{name}: not a whole number: {value!r}")
        number = int(text)
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}: {value!r}")
    return number


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhdw]?)", re.IGNORECASE)


def parse_duration(name: str, value: Any, positive: bool = False) -> float:
    """Seconds, or Postfix style with a unit: ``300s``, ``5m``, ``4h``, ``5d``, ``1w``.

    ``positive`` rejects zero for settings where zero would make no sense (a zero idle
    timeout would drop every client at once).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.fullmatch(str(value).strip())
        if not match:
            raise ConfigError(
                f"{name}: not a duration (seconds, or a number with s/m/h/d/w): {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"{name}: not a duration: {value!r}")
    if positive and seconds == 0:
        raise ConfigError(f"{name}: must be more than zero: {value!r}")
    return seconds


def _words(value: Any) -> list[str]:
    """A list from a TOML array or a space/comma separated string."""
    if isinstance(value, list | tuple):
        out: list[str] = []
        for item in value:
            out.extend(_words(item))
        return out
    return [w for w in re.split(r"[\s,]+", str(value)) if w]


_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_\-\u0080-\U0010ffff]{1,63}(?<!-)")


def _is_hostname(text: str) -> bool:
    text = text.rstrip(".")
    return bool(text) and len(text) <= 253 and all(
        _LABEL_RE.fullmatch(label) for label in text.split("."))


def parse_domains(name: str, value: Any) -> tuple[str, ...]:
    """Space/comma separated domain names, lower-cased, trailing dot removed, no duplicates."""
    out: list[str] = []
    for word in _words(value):
        if not _is_hostname(word) or "@" in word:
            raise ConfigError(f"{name}: not a domain name: {word!r}")
        domain = word.rstrip(".").lower()
        if domain not in out:
            out.append(domain)
    return tuple(out)


def parse_hostname(name: str, value: Any) -> str:
    text = str(value).strip()
    if not _is_hostname(text):
        raise ConfigError(f"{name}: not a host name: {value!r}")
    return text.rstrip(".")


def parse_listen(name: str, value: Any) -> tuple[ListenAddress, ...]:
    """Listen addresses: ``host:port``, ``:port`` or ``*:port`` (all IPv4 interfaces),
    ``[v6]:port`` or a bare port, separated by spaces or commas; ``none`` listens nowhere.

    Port 0 is allowed: the kernel picks a free port, which tests rely on.
    """
    words = _words(value)
    if [w.lower() for w in words] == ["none"]:
        return ()
    out: list[ListenAddress] = []
    for word in words:
        address = _parse_one_listen(name, word)
        if address not in out:
            out.append(address)
    return tuple(out)


def _parse_one_listen(name: str, word: str) -> ListenAddress:
    if word.isdigit():
        host, port_text = "", word
    elif word.startswith("["):
        close = word.find("]")
        if close < 0 or word[close + 1:close + 2] != ":":
            raise ConfigError(f"{name}: not [address]:port: {word!r}")
        host, port_text = word[1:close], word[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{name}: not an IPv6 address: {word!r}") from None
    else:
        host, sep, port_text = word.rpartition(":")
        if not sep:
            raise ConfigError(f"{name}: not host:port: {word!r}")
        if ":" in host:
            raise ConfigError(f"{name}: IPv6 addresses need brackets, as in [::1]:25: {word!r}")
        if host not in ("", "*") and not _is_hostname(host):
            raise ConfigError(f"{name}: not a host name or address: {word!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{name}: not a port number (0-65535): {word!r}")
    if host in ("", "*"):
        host = "0.0.0.0"
    return ListenAddress(host, int(port_text))


def parse_metrics_listen(name: str, value: Any) -> ListenAddress | None:
    """``PYMTA_METRICS_LISTEN``: one ``host:port`` (or ``[v6]:port``, or a bare port: all
    IPv4 interfaces) for the Prometheus endpoint; empty (the default) or ``none``: off."""
    words = _words(value)
    if not words or [w.lower() for w in words] == ["none"]:
        return None
    if len(words) > 1:
        raise ConfigError(f"{name}: one host:port, not {len(words)}: {value!r}")
    return _parse_one_listen(name, words[0])


def _parse_string(name: str, value: Any) -> str:
    if isinstance(value, dict | list | bool):
        raise ConfigError(f"{name}: not a string: {value!r}")
    return str(value).strip()


def _path_words(name: str, value: Any) -> tuple[str, ...]:
    """File names separated by commas or white space (Postfix's list syntax), in order."""
    if isinstance(value, dict | bool):
        raise ConfigError(f"{name}: not a list of file names: {value!r}")
    return tuple(_words(value))


def parse_relay_hostauth(name: str, value: Any) -> RelayHost | None:
    """``SMTP_RELAY_HOSTAUTH``: ``"[host]:port user:password"`` (Postfix's relayhost plus
    the SASL credentials). ``[host]`` means no MX lookup; the port defaults to 25; user and
    password are optional. Empty means "no smart host". The password may contain colons,
    the user name may not."""
    text = _parse_string(name, value)
    if not text:
        return None
    words = text.split()
    if len(words) > 2:
        raise ConfigError(f"{name}: not \"host:port user:password\": too many words")
    where = words[0]
    mx_lookup = True
    if where.startswith("["):
        close = where.find("]")
        if close < 0:
            raise ConfigError(f"{name}: unbalanced brackets in {where!r}")
        host, rest = where[1:close], where[close + 1:]
        mx_lookup = False
    else:
        host, sep, port_part = where.partition(":")
        rest = sep + port_part
    port = 25
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            raise ConfigError(f"{name}: not a port number (1-65535) in {where!r}")
        port = int(rest[1:])
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    if not is_ip and not _is_hostname(host):
        raise ConfigError(f"{name}: not a host name or address: {host!r}")
    username = password = ""
    if len(words) == 2:
        username, sep, password = words[1].partition(":")
        if not sep or not username:
            raise ConfigError(f"{name}: credentials must be user:password (password not shown)")
    return RelayHost(host=host.rstrip(".").lower(), port=port, mx_lookup=mx_lookup and not is_ip,
                     username=username, password=password)


TLS_LEVELS = ("none", "may", "encrypt", "dane", "verify", "secure")


def parse_tls_level(name: str, value: Any) -> str:
    level = _parse_string(name, value).lower()
    if level not in TLS_LEVELS:
        raise ConfigError(f"{name}: must be one of {', '.join(TLS_LEVELS)}: {value!r}")
    return level


def parse_tls_policy(name: str, value: Any) -> tuple[str, ...]:
    """``PYMTA_TLS_POLICY``: per-destination TLS levels (Postfix's ``smtp_tls_policy_maps``),
    ``domain=level`` words separated by spaces or commas, or in a TOML file a table
    ``[tls_policy]`` of ``"domain" = "level"``. ``.example.com`` covers every host under
    example.com. Normalized to ``domain=level`` strings (lower case, no final dot), in
    order, each domain once."""
    words = ([f"{k}={v}" for k, v in value.items()] if isinstance(value, dict)
             else _words(value))
    seen: dict[str, str] = {}
    for word in words:
        domain, sep, level = word.partition("=")
        domain = domain.strip().lower().rstrip(".")
        bare = domain[1:] if domain.startswith(".") else domain
        if not sep or not _is_hostname(bare) or "@" in bare:
            raise ConfigError(f"{name}: not domain=level: {word!r}")
        if domain in seen:
            raise ConfigError(f"{name}: {domain!r} given twice")
        seen[domain] = parse_tls_level(f"{name} ({domain})", level)
    return tuple(f"{d}={lv}" for d, lv in seen.items())


def parse_virtual_transport(name: str, value: Any) -> str:
    """``lmtp:HOST:PORT``, ``lmtp:[v6]:PORT``, ``lmtp:unix:PATH`` or empty (local delivery)."""
    text = _parse_string(name, value)
    if not text:
        return ""
    kind, sep, rest = text.partition(":")
    if kind.lower() != "lmtp" or not sep or not rest:
        raise ConfigError(f"{name}: must be lmtp:HOST:PORT or lmtp:unix:PATH: {value!r}")
    if rest.startswith("unix:"):
        if not rest[5:]:
            raise ConfigError(f"{name}: no socket path: {value!r}")
        return "lmtp:" + rest
    _parse_one_listen(name, rest)  # host:port / [v6]:port syntax
    if rest.rpartition(":")[2] == "0":
        raise ConfigError(f"{name}: port 0: {value!r}")
    return "lmtp:" + rest


def parse_nameservers(name: str, value: Any) -> tuple[str, ...]:
    from pymta.dns import parse_nameserver

    words = _words(value)
    ports = set()
    for word in words:
        try:
            ports.add(parse_nameserver(word)[1])
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if len(ports) > 1:
        raise ConfigError(f"{name}: all resolvers must use the same port: {value!r}")
    return tuple(words)


def _port(name: str, value: Any) -> int:
    port = parse_size(name, value, 1)
    if port > 65535:
        raise ConfigError(f"{name}: not a port number (1-65535): {value!r}")
    return port


def _parse_secret(name: str, value: Any) -> str:
    """A password: taken as given (spaces included); never quoted in a message."""
    if isinstance(value, dict | list | bool):
        raise ConfigError(f"{name}: not a string (value not shown)")
    return str(value)


def _stripped_secret(name: str, value: Any) -> str:
    """A secret list or key (``SMTPD_SASL_CLIENTAUTH``, ``DKIM_PRIVATEKEY``): surrounding
    blanks removed, never quoted in a message. What it means is its adapter's to check."""
    return _parse_secret(name, value).strip()


def _srs_domain(name: str, value: Any) -> str:
    """One domain name (or empty: the first MAIL_DOMAIN)."""
    domains = parse_domains(name, value)
    if len(domains) > 1:
        raise ConfigError(f"{name}: one domain only: {value!r}")
    return domains[0] if domains else ""


def _srs_max_age(name: str, value: Any) -> int:
    """Days, as in PostSRSd (a bare number), or a duration with a unit (``3w``); the SRS
    timestamp counts whole days and wraps after 1024 of them."""
    text = str(value).strip()
    if isinstance(value, int | float) and not isinstance(value, bool) or text.isdigit():
        days = parse_size(name, value, 1)
    else:
        days = int(parse_duration(name, value, positive=True) // 86400)
        if days < 1:
            raise ConfigError(f"{name}: must be at least one day: {value!r}")
    if days > 1000:
        raise ConfigError(f"{name}: at most 1000 days (the timestamp wraps): {value!r}")
    return days


def _authserv_id(name: str, value: Any) -> str:
    """RFC 8601's authserv-id: one token (a host name, usually), no blanks or separators."""
    text = _parse_string(name, value).strip()
    if text and (not text.isascii() or any(c in text for c in ' \t;()"\\')
                 or not text.isprintable()):
        raise ConfigError(f"{name}: not a single token: {value!r}")
    return text


def _dkim_selector(name: str, value: Any) -> str:
    """A DKIM selector: one or more DNS labels (RFC 6376 §3.1), e.g. ``default``, ``2024a``."""
    text = _parse_string(name, value)
    if not _is_hostname(text) or text.endswith("."):
        raise ConfigError(f"{name}: not a selector (DNS labels): {value!r}")
    return text.lower()


def _dkim_keybits(name: str, value: Any) -> int:
    bits = parse_size(name, value, 1024)
    if bits > 8192:
        raise ConfigError(f"{name}: at most 8192 bits: {value!r}")
    return bits


def _dkim_algorithm(name: str, value: Any) -> str:
    text = _parse_string(name, value).lower()
    if text not in ("rsa", "ed25519"):
        raise ConfigError(f"{name}: must be rsa or ed25519: {value!r}")
    return text


# ------------------------------------------------------------------------------ the settings


@dataclass(frozen=True, slots=True)
class _Setting:
    field: str                             # Config field name
    env: str                               # environment variable name
    parse: Callable[[str, Any], Any]


def _size(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, value: parse_size(name, value, minimum)


def _duration(positive: bool) -> Callable[[str, Any], float]:
    return lambda name, value: parse_duration(name, value, positive)


def _level(name: str, value: Any) -> int:
    level = parse_size(name, value)
    if level > 7:
        raise ConfigError(f"{name}: must be 0 (emerg) to 7 (debug): {value!r}")
    return level


_SYSLOG_NAME = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def _syslog_name(name: str, value: Any) -> str:
    """``PYMTA_SYSLOG_NAME``: the program part of every log line's tag, as Postfix's
    ``syslog_name`` (``postfix``, ``postfix-out``, ``postfix/submission``): no blanks, no
    brackets or colons, which would end the tag for a log reader."""
    text = _parse_string(name, value)
    if not _SYSLOG_NAME.fullmatch(text):
        raise ConfigError(f"{name}: letters, digits, '.', '_', '-' and inner '/' only: "
                          f"{value!r}")
    return text


_DESTINIES = ("pass", "bounce", "reject", "discard")


def parse_destiny(name: str, value: Any) -> str:
    """``FINAL_*_DESTINY``: ``D_PASS``, ``D_BOUNCE``, ``D_REJECT``, ``D_DISCARD`` (amavis's
    names; the ``D_`` prefix and case optional). Returned as ``pass`` ... ``discard``."""
    text = _parse_string(name, value).lower()
    word = text[2:] if text.startswith("d_") else text
    if word not in _DESTINIES:
        raise ConfigError(f"{name}: not one of D_PASS, D_BOUNCE, D_REJECT, D_DISCARD: "
                          f"{value!r}")
    return word


def _on_error(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        word = _parse_string(name, value).lower()
        if word not in choices:
            raise ConfigError(f"{name}: not one of {', '.join(choices)}: {value!r}")
        return word
    return parse


def parse_level(name: str, value: Any) -> float | None:
    """A spam score level (``SA_*_LEVEL_DEFLT``): a number, or ``none`` for "unset" (rspamd's
    own action decides then; an empty variable keeps the default, as for every setting)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: not a number: {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = str(value).strip()
        if text.lower() in ("", "none", "off", "unset"):
            return None
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{name}: not a number: {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}: not a number: {value!r}")
    return number


_FILE_WORD = re.compile(r"\.?[a-z0-9_+-]{1,32}|[a-z][a-z0-9.+-]{0,63}/[a-z0-9][a-z0-9.+-]{0,63}")


def _file_words(name: str, value: Any) -> tuple[str, ...]:
    """``PYMTA_BANNED_FILES``/``PYMTA_ALLOWED_FILES``: extensions (``exe``, ``.exe``) and
    MIME types (``application/x-foo``), space/comma separated."""
    out: list[str] = []
    for word in _words(value):
        item = word.strip().lower()
        if not _FILE_WORD.fullmatch(item):
            raise ConfigError(f"{name}: not a file extension or MIME type: {word!r}")
        out.append(item.lstrip("."))
    return tuple(dict.fromkeys(out))


def parse_mynetworks(name: str, value: Any) -> tuple[str, ...]:
    """``MYNETWORKS``: networks (CIDR) or single addresses, space/comma separated; Postfix's
    ``[::1]/128`` bracket form is accepted. Returned normalised (``10.0.0.0/8``)."""
    out: list[str] = []
    for word in _words(value):
        text = word.replace("[", "").replace("]", "")
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: not a network (address/prefix): {word!r}") from None
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("hostname", "MYHOSTNAME", parse_hostname),
    _Setting("mail_domain", "MAIL_DOMAIN", parse_domains),
    _Setting("mail_boxes", "MAIL_BOXES", _parse_string),
    _Setting("mail_aliases", "MAIL_ALIASES", _parse_string),
    _Setting("regex_alias", "REGEX_ALIAS", _parse_string),
    _Setting("ldap_host", "LDAP_HOST", _parse_string),
    _Setting("ldap_user_base", "LDAP_USER_BASE", _parse_string),
    _Setting("ldap_query_filter_user", "LDAP_QUERY_FILTER_USER", _parse_string),
    _Setting("ldap_query_attrs_user", "LDAP_QUERY_ATTRS_USER", _parse_string),
    _Setting("ldap_group_base", "LDAP_GROUP_BASE", _parse_string),
    _Setting("ldap_query_filter_alias", "LDAP_QUERY_FILTER_ALIAS", _parse_string),
    _Setting("ldap_query_filter_group", "LDAP_QUERY_FILTER_GROUP", _parse_string),
    _Setting("ldap_query_filter_expand", "LDAP_QUERY_FILTER_EXPAND", _parse_string),
    _Setting("ldap_bind_dn", "LDAP_BIND_DN", _parse_string),
    _Setting("ldap_bind_pw", "LDAP_BIND_PW", _parse_secret),
    _Setting("ldap_tls_ca_file", "PYMTA_LDAP_TLS_CA_FILE", _parse_string),
    _Setting("mysql_host", "MYSQL_HOST", _parse_string),
    _Setting("mysql_database", "MYSQL_DATABASE", _parse_string),
    _Setting("mysql_user", "MYSQL_USER", _parse_string),
    _Setting("mysql_password", "MYSQL_PASSWORD", _parse_secret),
    _Setting("mysql_query_user", "MYSQL_QUERY_USER", _parse_string),
    _Setting("mysql_query_alias", "MYSQL_QUERY_ALIAS", _parse_string),
    _Setting("lookup_cache_ttl", "PYMTA_LOOKUP_CACHE_TTL", _duration(False)),
    _Setting("lookup_negative_ttl", "PYMTA_LOOKUP_NEGATIVE_TTL", _duration(False)),
    _Setting("lookup_timeout", "PYMTA_LOOKUP_TIMEOUT", _duration(True)),
    _Setting("message_size_limit", "MESSAGE_SIZE_LIMIT", _size(0)),
    # Postfix's queue_minfree: below this much free space (and never below 1.5 x the message
    # size limit) MAIL FROM gets 452 4.3.1
    _Setting("queue_minfree", "PYMTA_QUEUE_MINFREE", _size(0)),
    _Setting("max_recipients", "PYMTA_MAX_RECIPIENTS", _size(1)),
    _Setting("max_errors", "PYMTA_MAX_ERRORS", _size(1)),
    _Setting("idle_timeout", "PYMTA_IDLE_TIMEOUT", _duration(True)),
    _Setting("shutdown_timeout", "PYMTA_SHUTDOWN_TIMEOUT", _duration(False)),
    _Setting("max_connections", "PYMTA_MAX_CONNECTIONS", _size(1)),
    _Setting("max_connections_per_ip", "PYMTA_MAX_CONNECTIONS_PER_IP", _size(1)),
    # Postfix's smtpd_client_connection_rate_limit: connections per client per minute, 0 off
    _Setting("connection_rate_limit", "PYMTA_CONNECTION_RATE_LIMIT", _size(0)),
    # RFC 5321 §4.5.3.1.4: a command line may be 512 octets; a smaller limit breaks clients.
    _Setting("max_line_length", "PYMTA_LINE_LENGTH_LIMIT", _size(512)),
    _Setting("header_size_limit", "PYMTA_HEADER_SIZE_LIMIT", _size(1)),
    _Setting("max_received_headers", "PYMTA_MAX_RECEIVED_HEADERS", _size(1)),
    _Setting("smtp_listen", "PYMTA_SMTP_LISTEN", parse_listen),
    _Setting("submission_listen", "PYMTA_SUBMISSION_LISTEN", parse_listen),
    _Setting("submissions_listen", "PYMTA_SUBMISSIONS_LISTEN", parse_listen),
    _Setting("workers", "PYMTA_WORKERS", _size(1)),
    _Setting("metrics_listen", "PYMTA_METRICS_LISTEN", parse_metrics_listen),
    _Setting("pipeline_timeout", "PYMTA_PIPELINE_TIMEOUT", _duration(True)),
    _Setting("spf_check", "PYMTA_SPF", parse_bool),
    _Setting("spf_reject_fail", "SPF_REJECT_FAIL", parse_bool),
    _Setting("dmarc_check", "PYMTA_DMARC", parse_bool),
    _Setting("dmarc_enforce", "DMARC_ENFORCE", parse_bool),
    _Setting("authserv_id", "PYMTA_AUTHSERV_ID", _authserv_id),
    _Setting("dkim_verify", "PYMTA_DKIM_VERIFY", parse_bool),
    _Setting("dkim_sign", "PYMTA_DKIM_SIGN", parse_bool),
    _Setting("dkim_selector", "DKIM_SELECTOR", _dkim_selector),
    _Setting("dkim_keybits", "DKIM_KEYBITS", _dkim_keybits),
    _Setting("dkim_algorithm", "DKIM_ALGORITHM", _dkim_algorithm),
    _Setting("dkim_private_key", "DKIM_PRIVATEKEY", _stripped_secret),
    _Setting("arc", "PYMTA_ARC", parse_bool),
    _Setting("srs_enable", "SRS_ENABLE", parse_bool),
    _Setting("srs_domain", "SRS_DOMAIN", _srs_domain),
    _Setting("srs_secret", "SRS_SECRET", _parse_secret),
    _Setting("srs_max_age", "SRS_MAX_AGE", _srs_max_age),
    _Setting("smtpd_use_tls", "SMTPD_USE_TLS", parse_bool),
    _Setting("smtpd_tls_cert_file", "SMTPD_TLS_CERT_FILE", _parse_string),
    _Setting("smtpd_tls_key_file", "SMTPD_TLS_KEY_FILE", _parse_string),
    _Setting("smtpd_tls_eccert_file", "SMTPD_TLS_ECCERT_FILE", _parse_string),
    _Setting("smtpd_tls_eckey_file", "SMTPD_TLS_ECKEY_FILE", _parse_string),
    _Setting("smtpd_tls_dcert_file", "SMTPD_TLS_DCERT_FILE", _parse_string),
    _Setting("smtpd_tls_dkey_file", "SMTPD_TLS_DKEY_FILE", _parse_string),
    # Postfix's smtpd_tls_chain_files: files read in order, each private key then its chain
    _Setting("smtpd_tls_chain_files", "SMTPD_TLS_CHAIN_FILES", _path_words),
    _Setting("smtpd_tls_dh1024_param_file", "SMTPD_TLS_DH1024_PARAM_FILE", _parse_string),
    _Setting("acme_file", "ACME_FILE", _parse_string),
    _Setting("acme_posthook", "ACME_POSTHOOK", _parse_string),
    _Setting("smtpd_sasl_clientauth", "SMTPD_SASL_CLIENTAUTH", _stripped_secret),
    _Setting("sasl_passwd_file", "PYMTA_SASL_PASSWD_FILE", _parse_string),
    _Setting("smtpd_sasl_imaphost", "SMTPD_SASL_IMAPHOST", _parse_string),
    _Setting("ldap_query_attrs_pass", "LDAP_QUERY_ATTRS_PASS", _parse_string),
    _Setting("ldap_query_filter_pass", "LDAP_QUERY_FILTER_PASS", _parse_string),
    _Setting("mysql_query_pass", "MYSQL_QUERY_PASS", _parse_string),
    _Setting("dovecot_auth_username_format", "DOVECOT_AUTH_USERNAME_FORMAT", _parse_string),
    _Setting("auth_fail_delay", "PYMTA_AUTH_FAIL_DELAY", _duration(False)),
    _Setting("auth_fail_delay_max", "PYMTA_AUTH_FAIL_DELAY_MAX", _duration(False)),
    _Setting("mynetworks", "MYNETWORKS", parse_mynetworks),
    # peers (HAProxy) whose connections start with a PROXY protocol header (v1 or v2)
    _Setting("proxy_protocol_from", "PYMTA_PROXY_PROTOCOL_FROM", parse_mynetworks),
    _Setting("state_dir", "PYMTA_STATE_DIR", _parse_string),
    _Setting("mail_dir", "PYMTA_MAIL_DIR", _parse_string),
    _Setting("queue_retry_first", "PYMTA_RETRY_FIRST", _duration(True)),
    _Setting("queue_retry_max", "PYMTA_RETRY_MAX", _duration(True)),
    _Setting("queue_lifetime", "PYMTA_QUEUE_LIFETIME", _duration(False)),
    _Setting("delay_warning_time", "PYMTA_DELAY_WARNING_TIME", _duration(False)),
    _Setting("queue_scan_interval", "PYMTA_QUEUE_SCAN_INTERVAL", _duration(True)),
    _Setting("delivery_concurrency", "PYMTA_DELIVERY_CONCURRENCY", _size(1)),
    _Setting("hold_incoming", "PYMTA_HOLD_INCOMING", parse_bool),
    _Setting("queue_store", "PYMTA_QUEUE_STORE", _on_error("files", "sqlite")),
    _Setting("smtp_relay", "SMTP_RELAY_HOSTAUTH", parse_relay_hostauth),
    _Setting("smtp_tls_security_level", "SMTP_TLS_SECURITY_LEVEL", parse_tls_level),
    _Setting("smtp_tls_wrappermode", "SMTP_TLS_WRAPPERMODE", parse_bool),
    _Setting("smtp_tls_ca_file", "PYMTA_SMTP_TLS_CA_FILE", _parse_string),
    _Setting("tls_policy", "PYMTA_TLS_POLICY", parse_tls_policy),
    _Setting("mta_sts", "PYMTA_MTA_STS", parse_bool),
    _Setting("virtual_transport", "VIRTUAL_TRANSPORT", parse_virtual_transport),
    _Setting("dns_resolver", "PYMTA_DNS_RESOLVER", parse_nameservers),
    _Setting("dns_timeout", "PYMTA_DNS_TIMEOUT", _duration(True)),
    # Postfix's smtpd_peername_lookup: the client's forward-confirmed PTR name (pymta/peername.py)
    _Setting("peername_lookup", "PYMTA_PEERNAME_LOOKUP", parse_bool),
    _Setting("mx_port", "PYMTA_MX_PORT", _port),
    _Setting("destination_concurrency", "PYMTA_DESTINATION_CONCURRENCY", _size(1)),
    _Setting("smtp_connect_timeout", "PYMTA_SMTP_CONNECT_TIMEOUT", _duration(True)),
    _Setting("smtp_timeout", "PYMTA_SMTP_TIMEOUT", _duration(True)),
    _Setting("connection_cache_time", "PYMTA_CONNECTION_CACHE_TIME", _duration(False)),
    _Setting("connection_reuse_limit", "PYMTA_CONNECTION_REUSE_LIMIT", _size(1)),
    _Setting("dead_host_time", "PYMTA_DEAD_HOST_TIME", _duration(False)),
    _Setting("clamd", "PYMTA_CLAMD", _parse_string),
    _Setting("spamd", "PYMTA_SPAMD", _parse_string),
    _Setting("rspamd", "PYMTA_RSPAMD", _parse_string),
    _Setting("rspamd_controller", "PYMTA_RSPAMD_CONTROLLER", _parse_string),
    _Setting("rspamd_password", "PYMTA_RSPAMD_PASSWORD", _parse_secret),
    _Setting("scanner_timeout", "PYMTA_SCANNER_TIMEOUT", _duration(True)),
    _Setting("scanner_concurrency", "PYMTA_SCANNER_CONCURRENCY", _size(1)),
    _Setting("virus_on_error", "PYMTA_VIRUS_ON_ERROR", _on_error("tempfail", "pass")),
    _Setting("spam_on_error", "PYMTA_SPAM_ON_ERROR", _on_error("pass", "tempfail")),
    _Setting("banned_check", "PYMTA_BANNED_CHECK", parse_bool),
    _Setting("banned_files", "PYMTA_BANNED_FILES", _file_words),
    _Setting("allowed_files", "PYMTA_ALLOWED_FILES", _file_words),
    _Setting("bad_header_check", "PYMTA_BAD_HEADER_CHECK", parse_bool),
    _Setting("sa_tag_level_deflt", "SA_TAG_LEVEL_DEFLT", parse_level),
    _Setting("sa_tag2_level_deflt", "SA_TAG2_LEVEL_DEFLT", parse_level),
    _Setting("sa_kill_level_deflt", "SA_KILL_LEVEL_DEFLT", parse_level),
    _Setting("spam_subject_tag", "PYMTA_SPAM_SUBJECT_TAG", _parse_string),
    _Setting("final_virus_destiny", "FINAL_VIRUS_DESTINY", parse_destiny),
    _Setting("final_banned_destiny", "FINAL_BANNED_DESTINY", parse_destiny),
    _Setting("final_spam_destiny", "FINAL_SPAM_DESTINY", parse_destiny),
    _Setting("final_bad_header_destiny", "FINAL_BAD_HEADER_DESTINY", parse_destiny),
    _Setting("quarantine_lifetime", "PYMTA_QUARANTINE_LIFETIME", _duration(False)),
    _Setting("kopano_spamd_lib", "KOPANO_SPAMD_LIB", _parse_string),
    _Setting("learn_interval", "PYMTA_LEARN_INTERVAL", _duration(True)),
    _Setting("syslog_level", "SYSLOG_LEVEL", _level),
    _Setting("log_syslog", "PYMTA_LOG_SYSLOG", parse_bool),
    _Setting("log_json", "PYMTA_LOG_JSON", parse_bool),
    _Setting("log_format", "PYMTA_LOG_FORMAT", _on_error("postfix", "json")),
    _Setting("syslog_name", "PYMTA_SYSLOG_NAME", _syslog_name),
)


def setting_names() -> dict[str, str]:
    """Config field → the variable that sets it (the name a log line or an error uses)."""
    names: dict[str, str] = {}
    for setting in _SETTINGS:
        names.setdefault(setting.field, setting.env)
    return names


def _toml_keys() -> dict[str, _Setting]:
    """Every name a TOML file may use for a setting: the field name, the lower-case variable
    name, and that name without ``pymta_`` (``workers``, ``pymta_workers``, ``retry_first``)."""
    keys: dict[str, _Setting] = {}
    for setting in _SETTINGS:
        lower = setting.env.lower()
        for key in (setting.field, lower, lower.removeprefix("pymta_")):
            keys[key] = setting
    return keys


_TOML_KEYS = _toml_keys()
_ENV_OF_FIELD = {s.field: s.env for s in _SETTINGS}
_DEFAULTS = Config()


def env_name(field_name: str) -> str:
    """The environment variable of a Config field, for messages elsewhere (TLS, logging)."""
    return _ENV_OF_FIELD.get(field_name, field_name.upper())


# ------------------------------------------------------------------------------ sources


def _config_path(environ: Mapping[str, str], path: str | None) -> tuple[str, str] | None:
    """(path, how it was named) of the TOML file, or None when there is none."""
    if path:
        return path, "config file"
    if environ.get("PYMTA_CONFIG", "").strip():
        return environ["PYMTA_CONFIG"].strip(), "PYMTA_CONFIG"
    return None


def _read_toml(path: str, named_by: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{named_by}: cannot read {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{named_by}: {path!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{named_by}: {path!r} is not UTF-8 text") from None


def _from_toml(data: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Typed values by field name from a parsed TOML file, plus its ``[extra]`` table."""
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    extra: dict[str, str] = {}
    for key, raw in data.items():
        if key == "extra":
            if not isinstance(raw, dict):
                raise ConfigError(f"extra: must be a table in {path!r}")
            extra = {str(k): str(v) for k, v in raw.items()}
            continue
        setting = _TOML_KEYS.get(key)
        if setting is None:
            hint = difflib.get_close_matches(key, [*_TOML_KEYS, "extra"], n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{also}")
        if setting.field in seen:
            raise ConfigError(
                f"{setting.env}: set twice in {path!r}, as {seen[setting.field]!r} and {key!r}")
        seen[setting.field] = key
        try:
            values[setting.field] = setting.parse(setting.env, raw)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
    return values, extra


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in _SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or not raw.strip():
            continue
        values[setting.field] = setting.parse(setting.env, raw)
    return values


# ------------------------------------------------------------------------------ defaults


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "localhost6",
                   "localhost6.localdomain6", "ip6-localhost", "ip6-loopback")


def _is_loopback_name(name: str) -> bool:
    name = name.lower().rstrip(".")
    return name in _LOOPBACK_NAMES or name.startswith("localhost.")


def _host_fqdn() -> str:
    """``MYHOSTNAME`` when unset: Postfix's ``myhostname`` default, the machine's name
    (``gethostname()``) made fully qualified when the resolver knows a qualified name for it
    (``getfqdn``), else the machine's name as it is.

    ``socket.getfqdn()`` alone is not that: it returns the first name of the address the host
    name resolves to, which on the common ``/etc/hosts`` of containers and VMs (``127.0.0.1
    localhost`` above ``127.0.0.1 vm``) is ``localhost``: the server greeted and wrote
    ``Received: by localhost`` on a host named ``vm`` (issue 11). A qualified name that is a
    loopback name (``localhost.localdomain``) is never the machine's."""
    name = socket.gethostname().strip().rstrip(".")
    if "." in name or not name:
        return name or "localhost"
    with contextlib.suppress(OSError, UnicodeError):
        fqdn = socket.getfqdn(name).strip().rstrip(".")
        if "." in fqdn and not _is_loopback_name(fqdn):
            return fqdn
    return name


def _default_state_dir() -> str:
    """Root runs the container image (state on the ``/srv`` volume, as in
    ``mlan/postfix-amavis``); a developer running as themselves gets a directory beside the
    checkout."""
    return "/srv/pymta" if os.geteuid() == 0 else "./var"


def _domain_of(hostname: str) -> str:
    """``hostname -d``: the host name minus its first label."""
    try:
        ipaddress.ip_address(hostname)
        return ""
    except ValueError:
        pass
    return hostname.partition(".")[2]


def _check_together(values: dict[str, Any]) -> None:
    """Rules that involve more than one setting."""
    cert, key = values.get("smtpd_tls_cert_file", ""), values.get("smtpd_tls_key_file", "")
    if cert and not key:
        raise ConfigError(f"SMTPD_TLS_KEY_FILE: not set, but SMTPD_TLS_CERT_FILE is: {cert!r}")
    if key and not cert:
        raise ConfigError(f"SMTPD_TLS_CERT_FILE: not set, but SMTPD_TLS_KEY_FILE is: {key!r}")
    for kind in ("EC", "D"):  # the ECDSA and DSA pairs: both files or neither
        cert = values.get(f"smtpd_tls_{kind.lower()}cert_file", "")
        key = values.get(f"smtpd_tls_{kind.lower()}key_file", "")
        if bool(cert) != bool(key):
            given, missing = ((f"SMTPD_TLS_{kind}CERT_FILE", f"SMTPD_TLS_{kind}KEY_FILE")
                              if cert else (f"SMTPD_TLS_{kind}KEY_FILE",
                                            f"SMTPD_TLS_{kind}CERT_FILE"))
            raise ConfigError(f"{missing}: not set, but {given} is: {cert or key!r}")
    ca_file = values.get("smtp_tls_ca_file", "")
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"PYMTA_SMTP_TLS_CA_FILE: cannot load certificates from "
                              f"{ca_file!r}: {why}") from None
    if values.get("spamd") and values.get("rspamd"):
        raise ConfigError("PYMTA_RSPAMD: set, but so is PYMTA_SPAMD: one spam engine at a time")
    first = values.get("queue_retry_first", _DEFAULTS.queue_retry_first)
    most = values.get("queue_retry_max", _DEFAULTS.queue_retry_max)
    if first > most:
        raise ConfigError(
            f"PYMTA_RETRY_FIRST: longer than PYMTA_RETRY_MAX ({most:g}s): {first:g}s")


def default_workers() -> int:
    """``PYMTA_WORKERS`` when unset: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_config(environ: Mapping[str, str] | None = None, path: str | None = None) -> Config:
    """Return the Config from defaults, the TOML file (``path`` or ``PYMTA_CONFIG``) and the
    environment (``os.environ`` when ``environ`` is None), the environment winning.

    Raises ConfigError for any invalid value; the message names the variable. Values are
    parsed into their types here; what a value means to an adapter (an LDAP filter, a SQL
    template, a ``REGEX_ALIAS`` pattern, a password scheme, a DKIM key) is checked by that
    adapter (``pymta.wiring.check``, and when ``MTA`` builds it).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    extra: dict[str, str] = {}
    source = _config_path(environ, path)
    if source is not None:
        values, extra = _from_toml(_read_toml(*source), source[0])
    values.update(_from_env(environ))

    if "hostname" not in values:
        values["hostname"] = parse_hostname("MYHOSTNAME (from the host name)", _host_fqdn())
    if not values.get("mail_domain"):
        domain = _domain_of(values["hostname"])
        if not domain:
            raise ConfigError("MAIL_DOMAIN: not set and the host name has no domain part: "
                              f"{values['hostname']!r}")
        values["mail_domain"] = (domain.lower(),)
    values.setdefault("state_dir", _default_state_dir())
    # One worker process per core: a process runs Python on one core at a time.
    values.setdefault("workers", default_workers())
    _check_together(values)
    return Config(**values, extra=extra)


def in_file(error: ConfigError, environ: Mapping[str, str] | None = None,
            path: str | None = None) -> ConfigError:
    """``error`` (raised after ``load_config``, by an adapter's check of its settings) with
    `` (in FILE)`` added when the variable it names has its value from the TOML file (set
    there, not in the environment): the same words ``load_config``'s own errors use."""
    environ = os.environ if environ is None else environ
    source = _config_path(environ, path)
    if source is None:
        return error
    variable = str(error).partition(":")[0]
    setting = next((s for s in _SETTINGS if s.env == variable), None)
    if setting is None or (environ.get(setting.env) or "").strip():
        return error
    try:
        data = _read_toml(*source)
    except ConfigError:
        return error
    keys = {k for k, v in _TOML_KEYS.items() if v is setting}
    if keys & set(data):
        return ConfigError(f"{error} (in {source[0]})")
    return error
