"""The Sender Rewriting Scheme codec (PostSRSd's job): SRS0/SRS1 addresses, their hash and
timestamp, and the secret they are signed with.

When we forward a message from a foreign sender to a foreign address, the next MTA checks
SPF of the envelope sender's domain against *our* address and fails it. SRS replaces the
envelope sender with an address in our own domain that encodes the original one, signed so
that nobody can use our server to bounce mail to arbitrary addresses::

    alice@origin.test          → SRS0=HHHH=TT=origin.test=alice@ours.test
    SRS0=hhhh=tt=origin.test=alice@hop1.test
                               → SRS1=HHHH=hop1.test==hhhh=tt=origin.test=alice@ours.test
    SRS1=xxxx=hop1.test==hhhh=tt=origin.test=alice@hop2.test
                               → SRS1=HHHH=hop1.test==hhhh=tt=origin.test=alice@ours.test

Implementation summary. The format is Shevek's (libsrs2, Mail::SRS) exactly as PostSRSd
implements it, so addresses made by one can be reversed by the other given the same secret:

* ``HHHH`` is the first 4 characters of the standard base64 encoding of HMAC-SHA1(secret,
  the fields concatenated), the fields lower-cased (ASCII only, as C's ``tolower``): for SRS0
  timestamp + domain + local part, for SRS1 the first hop's domain + the rest after ``SRS0``
  (which keeps its separator, hence the ``==``). Verification compares case-insensitively
  (mail systems smash case in local parts) and tries every configured secret, so a secret
  can be rotated by putting the new one first and keeping the old ones for a while.
* ``TT`` is the day number (Unix time / 86400) modulo 1024 in two base32 characters
  (``A-Z2-7``); an SRS0 address older than ``max_age`` days (default 21) is expired. The
  stamp wraps every 1024 days, as in PostSRSd. SRS1 addresses carry no stamp of their own.
* The separator after ``SRS0``/``SRS1`` may be ``=``, ``+`` or ``-`` on input; we write ``=``.
* A sender already in the SRS domain is not rewritten (PostSRSd's rule).

The secret is PostSRSd's secret file format: one secret per line, the first signs, all
verify. Unless ``SRS_SECRET`` is set it lives in ``<state dir>/srs/secret`` and is generated
(random, 0600) the first time it is needed; several worker processes may race to create it
and all end up with the same one (the file appears atomically by ``link``).

We write this ourselves rather than depending on ``srslib`` (0.1.5, unmaintained since 2017)
or ``pysrs`` (a sendmail milter bundle): the format is a page of code, and here it has an
injectable clock for tests, several secrets, and distinct reasons (forged, expired,
malformed) that become distinct SMTP replies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets as _secrets
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("pymta.srs")

HASH_LENGTH = 4
TIME_PRECISION = 86400           # one day
TIME_SLOTS = 1024                # two base32 characters
TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SEPARATORS = "=+-"
DEFAULT_MAX_AGE = 21             # days, PostSRSd's default


class SRSError(ValueError):
    """An address that looks like SRS but cannot be reversed. ``reason`` is ``forged`` (bad
    hash), ``expired`` (timestamp too old) or ``malformed``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_srs(local_part: str) -> bool:
    """Does a local part start like an SRS address (``SRS0=``, ``srs1+``, …)?"""
    local_part = _unquote(local_part)
    return (len(local_part) > 5 and local_part[:4].upper() in ("SRS0", "SRS1")
            and local_part[4] in SEPARATORS)


def _lower(text: str) -> bytes:
    # bytes.lower() folds ASCII only, like tolower() in the C locale PostSRSd runs in
    return text.encode("utf-8", "surrogateescape").lower()


def _unquote(local: str) -> str:
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = local[1:-1]
        out, escaped = [], False
        for ch in inner:
            if escaped or ch != "\\":
                out.append(ch)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return local


_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")


def _quote(local: str) -> str:
    """The local part as it must be written in an address (RFC 5321 dot-string or quoted)."""
    dot_string = local and all(
        atom and all(c in _ATEXT or ord(c) > 127 for c in atom) for atom in local.split("."))
    if dot_string:
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise SRSError("malformed", f"not an address with a domain: {address!r}")
    return _unquote(local), domain


class SRS:
    """Forward and reverse SRS addresses for one SRS domain (see the module docstring).

    ``secrets`` are tried in order for verification; the first signs. They may be given as
    a callable, called once on first use (or by :meth:`load`): building a server's stages then
    touches no file until it starts. ``clock`` returns Unix time (tests move it).
    """

    def __init__(self, secrets: Sequence[bytes | str] | Callable[[], Sequence[bytes | str]],
                 domain: str, *, max_age: int = DEFAULT_MAX_AGE,
                 hash_length: int = HASH_LENGTH,
                 clock: Callable[[], float] = time.time) -> None:
        self._source = secrets
        self._keys: list[bytes] | None = None
        self.domain = domain.lower().rstrip(".")
        self.max_age = max_age
        self.hash_length = hash_length
        self._clock = clock
        if not callable(secrets):
            self.load()

    def load(self) -> list[bytes]:
        """The secrets as bytes, read once; ValueError/OSError when there is none usable."""
        if self._keys is None:
            source = self._source
            given = source() if callable(source) else source
            keys = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in given]
            if not keys or not all(keys):
                raise ValueError("SRS needs at least one non-empty secret")
            self._keys = keys
        return self._keys

    # ------------------------------------------------------------------ pieces

    def _hash(self, secret: bytes, *fields: str) -> str:
        mac = hmac.new(secret, b"".join(_lower(f) for f in fields), hashlib.sha1).digest()
        return base64.b64encode(mac).decode("ascii")[: self.hash_length]

    def make_hash(self, *fields: str) -> str:
        return self._hash(self.load()[0], *fields)

    def check_hash(self, given: str, *fields: str) -> bool:
        """Case-insensitive, any secret; a longer hash is compared on our length (PostSRSd)."""
        if len(given) < self.hash_length:
            return False
        probe = given[: self.hash_length].lower().encode("ascii", "replace")
        ok = False
        for secret in self.load():
            # no early exit: every secret costs the same whether or not an earlier one matched
            ok |= hmac.compare_digest(probe, self._hash(secret, *fields).lower().encode())
        return ok

    def timestamp(self, now: float | None = None) -> str:
        day = int((self._clock() if now is None else now) // TIME_PRECISION)
        return TIME_CHARS[(day >> 5) & 31] + TIME_CHARS[day & 31]

    def timestamp_age(self, stamp: str) -> int:
        """Days since ``stamp`` was made (modulo the 1024-day cycle); SRSError if malformed."""
        if len(stamp) != 2:
            raise SRSError("malformed", f"bad SRS timestamp {stamp!r}")
        then = 0
        for ch in stamp.upper():
            index = TIME_CHARS.find(ch)
            if index < 0:
                raise SRSError("malformed", f"bad base32 character in SRS timestamp {stamp!r}")
            then = (then << 5) | index
        now = int(self._clock() // TIME_PRECISION) % TIME_SLOTS
        return (now - then) % TIME_SLOTS

    # ------------------------------------------------------------------ forward

    def forward(self, sender: str) -> str:
        """The SRS address to use as envelope sender instead of ``sender``.

        SRS0 for an ordinary address, SRS1 for one that is already SRS0 or SRS1 (bounces then
        go straight back to the first forwarder). A null sender, an address without a domain
        and one already in our SRS domain are returned unchanged.
        """
        if not sender or "@" not in sender:
            return sender
        try:
            local, host = _split(sender)
        except SRSError:
            return sender
        if host.lower().rstrip(".") == self.domain:
            return sender
        tag = local[:4].upper()
        if len(local) > 5 and tag == "SRS1" and local[4] in SEPARATORS:
            parts = local[5:].split("=", 2)  # hash, first hop, rest (starts with a separator)
            if len(parts) == 3 and all(parts[:2]) and parts[2]:
                _, first_hop, rest = parts
                return self._srs1(first_hop, rest)
        elif len(local) > 5 and tag == "SRS0" and local[4] in SEPARATORS:
            return self._srs1(host, local[4:])
        stamp = self.timestamp()
        digest = self.make_hash(stamp, host, local)
        return f"{_quote(f'SRS0={digest}={stamp}={host}={local}')}@{self.domain}"

    def _srs1(self, first_hop: str, rest: str) -> str:
        digest = self.make_hash(first_hop, rest)
        return f"{_quote(f'SRS1={digest}={first_hop}={rest}')}@{self.domain}"

    # ------------------------------------------------------------------ reverse

    def reverse(self, address: str) -> str:
        """The address an SRS address stands for: the original sender for SRS0, the first
        forwarder's SRS0 address for SRS1. Raises SRSError (forged, expired, malformed); the
        domain of ``address`` is not checked here (the lookup does that)."""
        local, _ = _split(address)
        if not is_srs(local):
            raise SRSError("malformed", f"not an SRS address: {address!r}")
        tag, body = local[:4].upper(), local[5:]
        if tag == "SRS1":
            parts = body.split("=", 2)
            if len(parts) != 3 or not all(parts):
                raise SRSError("malformed", f"malformed SRS1 address: {address!r}")
            digest, first_hop, rest = parts
            if not self.check_hash(digest, first_hop, rest):
                raise SRSError("forged", f"invalid hash in SRS1 address: {address!r}")
            return f"{_quote('SRS0' + rest)}@{first_hop}"
        parts = body.split("=", 3)
        if len(parts) != 4 or not all(parts):
            raise SRSError("malformed", f"malformed SRS0 address: {address!r}")
        digest, stamp, host, user = parts
        if not self.check_hash(digest, stamp, host, user):
            raise SRSError("forged", f"invalid hash in SRS0 address: {address!r}")
        age = self.timestamp_age(stamp)
        if age > self.max_age:
            raise SRSError("expired", f"SRS0 address is {age} days old (limit "
                                      f"{self.max_age}): {address!r}")
        return f"{_quote(user)}@{host}"


# ---------------------------------------------------------------------- secrets


def load_secrets(path: str) -> list[bytes]:
    """The secrets in ``path`` (one per line, first signs), creating the file with a random
    secret (mode 0600, directory 0700) when it does not exist. Safe against concurrent
    creation by several processes: exactly one file wins and everyone reads it."""
    try:
        return _read_secrets(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{_secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            # 24 random bytes in base64, like PostSRSd's generated secret (printable, no spaces)
            f.write(base64.b64encode(_secrets.token_bytes(24)) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.log(25, "generated a new SRS secret in %s", path)
        except FileExistsError:
            pass  # another process was first; use its secret
    finally:
        os.unlink(tmp)
    return _read_secrets(path)


def _read_secrets(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        keys = [line.strip(b"\r\n") for line in f]
    keys = [k for k in keys if k.strip()]
    if not keys:
        raise ValueError(f"{path}: no SRS secret in the file")
    return keys
