"""SASL password file: ``SMTPD_SASL_CLIENTAUTH="user:{scheme}password …"`` and Dovecot schemes.

``mlan/postfix-amavis`` lets Dovecot check a passwd-file built from ``SMTPD_SASL_CLIENTAUTH``; an
entry is ``username:{SCHEME}secret`` and the scheme names are Dovecot's (``doveadm pw -l``), in any
case. This module verifies those strings, so hashes made by ``doveadm pw`` keep working and
``pymta passwd hash`` makes hashes Dovecot accepts. The same verifier serves the MySQL method
(``MYSQL_QUERY_PASS`` returns a ``{SCHEME}`` hash).

Library: **libpass** (the maintained fork of passlib; same ``passlib.hash`` API, works with
bcrypt 4/5) for the crypt(3) family and Argon2, with ``bcrypt`` and ``argon2-cffi`` as its
back ends. The digest schemes (``{PLAIN-MD5}``, ``{SHA256}``, ``{SSHA}``, ``{SSHA512}`` …) are
a few lines of hashlib, compared with :func:`hmac.compare_digest`; passlib's verifiers compare
in constant time too.

Schemes verified: PLAIN (CLEAR, CLEARTEXT), PLAIN-MD5, LDAP-MD5, MD5 (= MD5-CRYPT, as in
Dovecot), SMD5, SHA (SHA1), SSHA, SHA256, SSHA256, SHA512, SSHA512, CRYPT (any crypt(3) form:
bcrypt, SHA-512/256-crypt, MD5-crypt, DES), MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, BLF-CRYPT,
ARGON2I, ARGON2ID. An entry without ``{…}`` is CRYPT, Dovecot's passwd-file default. Anything
else (PBKDF2, SCRAM-*, DIGEST-MD5 …) is a ConfigError at start-up naming the user.

Hash checks of the slow schemes run in a worker thread, so a bcrypt or Argon2 verify never
holds the event loop. An unknown user costs a dummy comparison (no early exit to time).
CRAM-MD5 needs the secret itself: :attr:`PasswordFile.supports_cram_md5` is true only when
every entry is ``{PLAIN}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pymta.config.errors import ConfigError
from pymta.types import ConnInfo, Identity

if TYPE_CHECKING:   # passlib itself is imported when a crypt scheme is first used
    from passlib.ifc import PasswordHash

VAR = "SMTPD_SASL_CLIENTAUTH"

# Dovecot name → canonical name.
_ALIASES = {
    "CLEAR": "PLAIN", "CLEARTEXT": "PLAIN", "PLAIN": "PLAIN",
    "PLAIN-MD5": "PLAIN-MD5", "LDAP-MD5": "LDAP-MD5", "MD5": "MD5-CRYPT", "SMD5": "SMD5",
    "SHA": "SHA1", "SHA1": "SHA1", "SSHA": "SSHA", "SHA256": "SHA256", "SSHA256": "SSHA256",
    "SHA512": "SHA512", "SSHA512": "SSHA512",
    "CRYPT": "CRYPT", "DES-CRYPT": "CRYPT", "MD5-CRYPT": "MD5-CRYPT",
    "SHA256-CRYPT": "SHA256-CRYPT", "SHA512-CRYPT": "SHA512-CRYPT", "BLF-CRYPT": "BLF-CRYPT",
    "ARGON2I": "ARGON2I", "ARGON2ID": "ARGON2ID",
}
_DIGESTS = {"PLAIN-MD5": "md5", "LDAP-MD5": "md5", "SHA1": "sha1", "SHA256": "sha256",
            "SHA512": "sha512"}
_SALTED = {"SMD5": "md5", "SSHA": "sha1", "SSHA256": "sha256", "SSHA512": "sha512"}
_SLOW = {"CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2I",
         "ARGON2ID"}

#: Schemes ``hash_password`` can produce (what ``pymta passwd hash --scheme`` accepts).
HASH_SCHEMES = ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "ARGON2I", "SSHA512",
                "SSHA256", "SSHA", "MD5-CRYPT", "SHA512", "SHA256", "PLAIN-MD5", "PLAIN")


class SchemeError(ValueError):
    """An unknown or malformed ``{SCHEME}`` string (the message never includes the secret)."""


def split_scheme(stored: str, default: str = "CRYPT") -> tuple[str, str]:
    """``"{SHA256}abc"`` → ``("SHA256", "abc")``; no braces → ``(default, stored)``."""
    if stored.startswith("{"):
        close = stored.find("}")
        if close > 1:
            name = stored[1:close].upper()
            scheme = _ALIASES.get(name)
            if scheme is None:
                raise SchemeError(f"unsupported password scheme {{{name}}}")
            return scheme, stored[close + 1:]
    return _ALIASES[default], stored


def _b64_or_hex(text: str) -> bytes | None:
    text = text.strip()
    try:
        if len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
            return bytes.fromhex(text)
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None


def _crypt_handler(scheme: str, value: str) -> type[PasswordHash]:
    from passlib import hash as ph

    if scheme == "CRYPT":
        if value.startswith(("$2a$", "$2b$", "$2y$")):
            return ph.bcrypt
        if value.startswith("$6$"):
            return ph.sha512_crypt
        if value.startswith("$5$"):
            return ph.sha256_crypt
        if value.startswith("$1$"):
            return ph.md5_crypt
        return ph.des_crypt
    by_scheme: dict[str, type[PasswordHash]] = {
        "MD5-CRYPT": ph.md5_crypt, "SHA256-CRYPT": ph.sha256_crypt,
        "SHA512-CRYPT": ph.sha512_crypt, "BLF-CRYPT": ph.bcrypt,
        "ARGON2I": ph.argon2, "ARGON2ID": ph.argon2}
    return by_scheme[scheme]


def verify_password(password: str, stored: str, default_scheme: str = "CRYPT") -> bool:
    """True when ``password`` matches the Dovecot-style ``stored`` value. Synchronous and
    possibly slow (bcrypt, Argon2): call :func:`averify_password` from async code."""
    try:
        scheme, value = split_scheme(stored, default_scheme)
    except SchemeError:
        return False
    secret = password.encode("utf-8")
    if scheme == "PLAIN":
        return hmac.compare_digest(secret, value.encode("utf-8"))
    if scheme in _DIGESTS:
        want = _b64_or_hex(value)
        got = hashlib.new(_DIGESTS[scheme], secret).digest()
        return want is not None and hmac.compare_digest(got, want)
    if scheme in _SALTED:
        raw = _b64_or_hex(value)
        size = hashlib.new(_SALTED[scheme]).digest_size
        if raw is None or len(raw) <= size:
            return False
        digest, salt = raw[:size], raw[size:]
        return hmac.compare_digest(hashlib.new(_SALTED[scheme], secret + salt).digest(), digest)
    if scheme in ("ARGON2I", "ARGON2ID") and not value.startswith(f"${scheme.lower()}$"):
        return False
    handler = _crypt_handler(scheme, value)
    try:
        return bool(handler.verify(password, value))
    except (ValueError, TypeError):  # malformed hash, or a password bcrypt refuses (>72 bytes)
        return False


def needs_thread(stored: str) -> bool:
    try:
        return split_scheme(stored)[0] in _SLOW
    except SchemeError:
        return False


async def averify_password(password: str, stored: str, default_scheme: str = "CRYPT") -> bool:
    """:func:`verify_password` that runs the slow schemes in a worker thread."""
    try:
        slow = split_scheme(stored, default_scheme)[0] in _SLOW
    except SchemeError:
        return False
    if slow:
        return await asyncio.to_thread(verify_password, password, stored, default_scheme)
    return verify_password(password, stored, default_scheme)


def hash_password(password: str, scheme: str = "SHA512-CRYPT") -> str:
    """A ``{SCHEME}hash`` string for ``password`` (what ``doveadm pw -s SCHEME`` prints).

    The crypt schemes use libpass's default cost (stronger than Dovecot's defaults; Dovecot
    and glibc read the cost from the hash, so they verify it all the same).
    """
    from passlib import hash as ph

    name = scheme.upper()
    canonical = _ALIASES.get(name)
    if canonical is None or name not in HASH_SCHEMES:
        raise SchemeError(f"cannot make {{{name}}} hashes; choose one of "
                          + ", ".join(HASH_SCHEMES))
    secret = password.encode("utf-8")
    if canonical == "PLAIN":
        value = password
    elif canonical == "PLAIN-MD5":
        value = hashlib.md5(secret).hexdigest()
    elif canonical in _DIGESTS:
        value = base64.b64encode(hashlib.new(_DIGESTS[canonical], secret).digest()).decode()
    elif canonical in _SALTED:
        salt = os.urandom(8 if canonical in ("SSHA", "SMD5") else 16)
        digest = hashlib.new(_SALTED[canonical], secret + salt).digest()
        value = base64.b64encode(digest + salt).decode()
    elif canonical == "BLF-CRYPT":
        value = ph.bcrypt.using(ident="2y").hash(password)
    elif canonical in ("ARGON2I", "ARGON2ID"):
        value = ph.argon2.using(type="i" if canonical == "ARGON2I" else "id").hash(password)
    else:
        value = _crypt_handler(canonical, "").hash(password)
    return f"{{{name}}}{value}"


# ------------------------------------------------------------------------------ user names


def format_username(username: str, template: str) -> str:
    """Apply Dovecot's ``auth_username_format`` (``DOVECOT_AUTH_USERNAME_FORMAT``).

    Supported: ``%u`` (whole name), ``%n`` (part before ``@``), ``%d`` (domain), ``%%``, each
    with Dovecot's ``L`` (lower-case) or ``U`` (upper-case) modifier, e.g. ``%Ln`` (the image's
    value: lower-case, domain dropped) or ``%Lu`` (Dovecot's default).
    """
    local, _, domain = username.partition("@")
    values = {"u": username, "n": local, "d": domain}
    out: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if char != "%" or i + 1 >= len(template):
            out.append(char)
            i += 1
            continue
        i += 1
        modifier = ""
        if template[i] in "LU" and i + 1 < len(template):
            modifier = template[i]
            i += 1
        key = template[i]
        i += 1
        if key == "%":
            out.append("%")
            continue
        value = values.get(key)
        if value is None:
            out.append("%" + modifier + key)
            continue
        out.append(value.lower() if modifier == "L" else value.upper() if modifier == "U"
                   else value)
    return "".join(out)


def check_username_format(template: str, var: str = "DOVECOT_AUTH_USERNAME_FORMAT") -> str:
    probe = template
    for token in ("%%", "%Lu", "%Ln", "%Ld", "%Uu", "%Un", "%Ud", "%u", "%n", "%d"):
        probe = probe.replace(token, "")
    if "%" in probe or not template:
        raise ConfigError(f"{var}: only %u, %n, %d (optionally %L…/%U…) are supported: "
                          f"{template!r}")
    return template


# ------------------------------------------------------------------------------ the method


def parse_clientauth(text: str, var: str = VAR) -> dict[str, str]:
    """``"user:{scheme}secret user2:secret2"`` → ``{user: stored}``. Errors name the user,
    never the secret."""
    entries: dict[str, str] = {}
    for word in text.split():
        user, sep, stored = word.partition(":")
        if not sep or not user or not stored:
            shown = user if sep else "(an entry without ':')"
            raise ConfigError(f"{var}: entries are user:{{scheme}}password; bad entry for "
                              f"{shown!r}")
        _add_entry(entries, user, stored, var)
    return entries


def _add_entry(entries: dict[str, str], user: str, stored: str, where: str) -> None:
    """Check one entry's ``{SCHEME}`` and that its user is new, then add it; errors start
    with ``where`` and name the user, never the secret."""
    try:
        split_scheme(stored)
    except SchemeError as exc:
        raise ConfigError(f"{where}: {exc} for user {user!r}") from None
    if user in entries:
        raise ConfigError(f"{where}: user {user!r} listed twice")
    entries[user] = stored


FILE_VAR = "PYMTA_SASL_PASSWD_FILE"
MAX_FILE_BYTES = 64 * 1024 * 1024


def read_passwd_file(path: str, var: str = FILE_VAR) -> dict[str, str]:
    """A Dovecot passwd-file (``user:{scheme}secret[:uid:gid:gecos:home:shell:extra]`` per
    line; ``#`` comments and blank lines skipped; the fields after the password are
    Dovecot's and ignored here) → ``{user: stored}``. Errors name the line and the user,
    never a secret. Read at start and at every SIGHUP, so an administrator edits users
    without a restart, as with Dovecot's own passwd-file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read: {exc.strerror or exc}: {path!r}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{var}: larger than {MAX_FILE_BYTES} bytes: {path!r}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{var}: not UTF-8 text: {path!r}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        stored = rest.split(":", 1)[0]
        where = f"{var}: {path!r} line {number}"
        if not sep or not user or not stored:
            raise ConfigError(f"{where}: entries are user:{{scheme}}password")
        _add_entry(entries, user, stored, where)
    return entries


def configured_entries(config: Any) -> dict[str, str]:
    """The users of ``PYMTA_SASL_PASSWD_FILE`` and ``SMTPD_SASL_CLIENTAUTH`` together; a
    user in both is an error (which of two passwords is meant cannot be guessed)."""
    entries = parse_clientauth(config.smtpd_sasl_clientauth.strip())
    path = getattr(config, "sasl_passwd_file", "")
    if path:
        from_file = read_passwd_file(path)
        both = sorted(set(from_file) & set(entries))
        if both:
            raise ConfigError(f"{FILE_VAR}: user {both[0]!r} is also in {VAR}")
        entries.update(from_file)
    return entries


class PasswordFile:
    """An :class:`~pymta.contracts.Authenticator` over ``SMTPD_SASL_CLIENTAUTH`` entries and
    those of ``PYMTA_SASL_PASSWD_FILE``.

    ``username_format`` is applied to the name the client gives before the table is consulted
    (the table's own names are taken as they are written).
    """

    name = "passwd"

    def __init__(self, entries: Mapping[str, str], username_format: str = "%u") -> None:
        self._entries = dict(entries)
        self._format = username_format

    @classmethod
    def from_text(cls, text: str, username_format: str = "%u") -> PasswordFile:
        return cls(parse_clientauth(text), username_format)

    @classmethod
    def from_config(cls, config: Any) -> PasswordFile:
        """The table of ``SMTPD_SASL_CLIENTAUTH`` and ``PYMTA_SASL_PASSWD_FILE`` (user names
        as the client gives them: the chain applies ``DOVECOT_AUTH_USERNAME_FORMAT``
        before)."""
        return cls(configured_entries(config))

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``SMTPD_SASL_CLIENTAUTH`` and the file (entry syntax, known ``{SCHEME}``s;
        errors name the user, never a secret)."""
        configured_entries(config)

    def __repr__(self) -> str:
        return f"PasswordFile({len(self._entries)} users)"

    @property
    def supports_cram_md5(self) -> bool:
        return bool(self._entries) and all(
            split_scheme(v)[0] == "PLAIN" for v in self._entries.values())

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        name = format_username(username, self._format)
        stored = self._entries.get(name)
        if stored is None:
            hmac.compare_digest(password.encode(), password.encode())  # same work either way
            return None
        if await averify_password(password, stored):
            return Identity(name)
        return None

    async def authenticate_cram_md5(self, username: str, challenge: str, digest: str,
                                    conn: ConnInfo) -> Identity | None:
        """RFC 2195: ``digest`` is hex HMAC-MD5(secret, challenge)."""
        name = format_username(username, self._format)
        stored = self._entries.get(name)
        if stored is None or split_scheme(stored)[0] != "PLAIN":
            return None
        secret = split_scheme(stored)[1].encode("utf-8")
        want = hmac.new(secret, challenge.encode(), "md5").hexdigest()
        return Identity(name) if hmac.compare_digest(want, digest.lower()) else None
