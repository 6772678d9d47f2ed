"""``pymta config dump``: the effective :class:`Config` as a TOML file that ``pymta serve
--config`` reads back to the same Config.

pymta reads its environment at every start and the environment wins (``load.py``); nothing is
seeded into the volume as ``mlan/postfix-amavis`` does. Those who want a file anyway (to keep
in the volume, to diff between two deployments, to see what a default became) get the
configuration the server would use, every setting written out, defaults included.

Keys are the environment variables' names in lower case (``mail_domain``, ``pymta_workers``,
``smtp_relay_hostauth``), one of the names ``load.py`` accepts for each setting, in the order
of its settings table; ``[extra]`` last. Each value is written in a form the setting's own
parser reads back to the same typed value (a duration as seconds, a list as a TOML array, a
smart host as ``"[host]:port user:password"``), which the unit tests check for every kind of
value. Secrets (the ``repr=False`` fields of the Config and any setting named like a
password, secret or key) are written as ``"********"`` unless ``show_secrets`` is asked for,
and a comment at the top says which ones were masked: such a file does not reproduce them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pymta.config.load import _DEFAULTS, _SETTINGS
from pymta.config.model import Config, ListenAddress, RelayHost

__all__ = ["MASK", "dump_toml", "secret_fields"]

MASK = "********"

# A setting is a secret when its Config field hides its value from repr, or when its variable
# is named like one (a setting added later without repr=False is still masked).
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|_PW$|PRIVATEKEY|CLIENTAUTH|HOSTAUTH")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def secret_fields() -> frozenset[str]:
    """The Config fields whose values ``dump_toml`` masks."""
    hidden = {f.name for f in dataclasses.fields(Config) if not f.repr}
    named = {s.field for s in _SETTINGS if _SECRET_NAME.search(s.env)}
    return frozenset(hidden | named) - {"extra"}


def _string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped (TOML 1.0 §
    String: all of U+0000-U+001F except tab, and U+007F, must be)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif (code < 0x20 and char != "\t") or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            # a lone surrogate (an undecodable byte of the environment, os.fsdecode):
            # not representable in TOML; written as U+FFFD so the file stays valid
            out.append("\\uFFFD")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _relay(relay: RelayHost, mask: bool) -> str:
    """``SMTP_RELAY_HOSTAUTH`` as ``parse_relay_hostauth`` reads it: ``[host]`` unless the MX
    is looked up, the port always, ``user:password`` when there is a user."""
    host = f"[{relay.host}]" if not relay.mx_lookup or ":" in relay.host else relay.host
    text = f"{host}:{relay.port}"
    if relay.username:
        password = MASK if mask and relay.password else relay.password
        text += f" {relay.username}:{password}"
    return text


def _value(field: str, value: Any, mask: bool) -> str:
    """One typed Config value as a TOML value its setting parses back to ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)          # shortest repr: reads back as the same float
    if isinstance(value, str):
        return _string(MASK if mask and value else value)
    if isinstance(value, ListenAddress):
        return _string(str(value))
    if isinstance(value, RelayHost):
        return _string(_relay(value, mask))
    if value is None:
        return '""'                 # an empty value parses to "unset" (None)
    if isinstance(value, tuple | list):
        items = [_value(field, item, mask) for item in value]
        return "[" + ", ".join(items) + "]"
    raise TypeError(f"config dump: no TOML form for {field} ({type(value).__name__})")


def dump_toml(config: Config, *, show_secrets: bool = False, source: str = "") -> str:
    """``config`` as TOML text (module docstring); ``source`` names where it came from, for
    the header comment."""
    secrets = secret_fields()
    masked: list[str] = []
    lines: list[str] = []
    for setting in _SETTINGS:
        value = getattr(config, setting.field)
        key = setting.env.lower()
        if value in (None, "", ()) and value == getattr(_DEFAULTS, setting.field):
            # unset, as an empty environment variable is: some parsers refuse an empty
            # value from a file (only the environment's empty means "unset")
            lines.append(f"# {key}: not set")
            continue
        hide = not show_secrets and setting.field in secrets
        if hide and (value.password if isinstance(value, RelayHost) else value):
            masked.append(key)
        lines.append(f"{key} = {_value(setting.field, value, hide)}")
    if config.extra:
        lines += ["", "[extra]"]
        for name, text in config.extra.items():
            hide = not show_secrets and bool(_SECRET_NAME.search(name.upper())) and bool(text)
            if hide:
                masked.append(f"extra.{name}")
            lines.append(f"{_key(name)} = {_string(MASK if hide else text)}")
    header = ["# pymta configuration: the settings `pymta serve` uses, written by "
              "`pymta config dump`",
              f"# from {source or 'the environment and the defaults'}; keys are the "
              "variables' names in lower case.",
              "# Use it with `pymta serve --config FILE` (or PYMTA_CONFIG=FILE); environment "
              "variables still win over it."]
    if masked:
        header += [f"# SECRETS MASKED as \"{MASK}\": {', '.join(masked)}.",
                   "# Put the real values in (or dump with --show-secrets) before serving "
                   "with this file."]
    return "\n".join(header + [""] + lines) + "\n"
