"""MTA-STS (RFC 8461): a recipient domain's published demand that mail to it travels only to
the MX hosts it names, over TLS with a certificate a public CA vouches for.

Without DNSSEC an attacker who can forge DNS or strip STARTTLS makes opportunistic TLS
worthless; MTA-STS closes that hole for domains that publish a policy, at the price of one
HTTPS fetch per policy change, by trusting the web PKI instead of DNS.

- **Discovery.** The TXT record ``_mta-sts.<domain>`` (through the server's
  :class:`~pymta.dns.DNSResolver`: the resolver the operator configured, and the test DNS
  server in tests) must be exactly one ``v=STSv1; id=...;`` record; none, several or an
  invalid one mean "no live policy" (§3.1). Its ``id`` says whether the cached policy is
  still current.
- **Fetch.** ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with our own small HTTP/1.1
  client over asyncio streams (one GET, no redirects, no HTTP caching, only ``200`` with
  ``text/plain``, at most 64 KiB, one deadline for the whole fetch, the DNS of the policy
  host included): pymta has no HTTP library and needs none for one request of one resource.
  The certificate must chain to ``PYMTA_SMTP_TLS_CA_FILE``'s roots, else the system's, and
  name ``mta-sts.<domain>`` (§3.3).
- **Cache.** Per domain, until its ``max_age``; refetched when the TXT ``id`` changes or the
  policy is older than a day (§3.3's proactive refresh). A fetch that fails leaves a cached
  unexpired policy in force (§3.3, the point of the cache: an attacker who blocks the fetch
  must not switch enforcement off), and without one the domain has no policy; a failed fetch
  is not retried for the same ``id`` within :data:`RETRY_AFTER_FAILURE` (§3.3's suggestion).
  A TXT lookup that fails or finds no record also keeps the cached policy. The cache is
  written to ``<state_dir>/mta-sts.json`` (merged with what other worker processes wrote), so
  a restart keeps enforcing.
- **Application** (:class:`Plan`, used by ``delivery.relay``): ``enforce``: only MX hosts the
  policy names are tried, each at TLS level ``verify`` at least (the certificate trusted and
  naming the MX host, §4.2); ``testing``: delivery as before, but each host is first tried as
  ``enforce`` would, and what it would have refused is logged; ``none``: nothing.
- **TLS-RPT** (RFC 8460): every failure is logged as one ``tlsrpt`` line with the report's
  own field names (``policy-type=sts policy-domain=... result-type=...
  receiving-mx-hostname=... receiving-ip=...``) and the reason after ``": "``, from which a
  daily report can be aggregated. No report is built or sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pymta.dns import DNSFailure, DNSResolver
from pymta.files import replace_file

from .tlspolicy import ascii_name

__all__ = ["CachedPolicy", "FetchError", "MTASTSPolicies", "Plan", "Policy", "PolicyError",
           "fetch_policy_text", "make_plan", "mx_matches", "parse_policy", "record_id",
           "tls_result_type", "tlsrpt"]

# the smtp client's logger family: these lines are the smtp daemon's (pymta.log.SERVICES)
log = logging.getLogger("pymta.delivery.relay.mtasts")

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31_557_600          # §3.2: a year
MAX_POLICY_BYTES = 64 * 1024        # §3.3's suggested limit
MAX_HEAD_BYTES = 16 * 1024          # status line and header fields of the response
FETCH_TIMEOUT = 20.0                # seconds for a whole fetch (§3.3 suggests at most 60)
RETRY_AFTER_FAILURE = 300.0         # §3.3: no new fetch for the same id for 5 minutes
REFRESH_AFTER = 86_400.0            # §3.3: refresh cached policies about once a day
ABSENT_TTL = 300.0                  # a domain without a record is asked again after this
CACHE_ENTRIES = 10_000              # domains remembered (each kind of memory)
WELL_KNOWN = "/.well-known/mta-sts.txt"
#: levels an ``enforce`` policy raises to ``verify``; ``verify``, ``secure`` and ``dane``
#: already authenticate the peer (and a failing DANE check is never overridden, §2)
WEAK_LEVELS = frozenset(("none", "may", "encrypt"))

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_RECORD_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_STATUS = re.compile(r"HTTP/1\.[01] ([0-9]{3})(?: .*)?")
V = TypeVar("V")


class PolicyError(ValueError):
    """A policy text that is not a valid STSv1 policy (the domain then has none)."""


class FetchError(Exception):
    """A policy that could not be fetched; ``result_type`` is TLS-RPT's name for why."""

    def __init__(self, text: str, result_type: str = "sts-policy-fetch-error") -> None:
        super().__init__(text)
        self.text = text
        self.result_type = result_type


# ------------------------------------------------------------------------------ parsing


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (§3.2): its mode, the MX patterns it allows, its lifetime."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Does one of the policy's ``mx`` patterns cover the MX host ``host``?"""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: a pattern names a host exactly, or ``*.example.com`` stands for exactly one
    leftmost label (``mx.example.com``, not ``example.com`` nor ``a.b.example.com``).
    Case-insensitive, names compared in their ASCII form."""
    pattern, host = pattern.lower().rstrip("."), ascii_name(host)
    if pattern.startswith("*."):
        head, dot, tail = host.partition(".")
        return bool(head) and bool(dot) and tail == pattern[2:]
    return pattern == host


def _valid_pattern(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return (0 < len(name) <= 253 and len(labels) >= 2
            and all(_LABEL.fullmatch(label) for label in labels))


def parse_policy(text: str) -> Policy:
    """The policy in ``text`` (CRLF or LF line ends); PolicyError when it is not one.

    Unknown keys are ignored (§3.2); of a repeated ``version``, ``mode`` or ``max_age`` the
    first counts. ``max_age`` above a year is taken as a year. ``mx`` is required unless the
    mode is ``none``."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or not _KEY.fullmatch(key):
            raise PolicyError(f"line {number}: not key: value")
        key = key.lower()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_pattern(pattern):
                raise PolicyError(f"line {number}: not an MX pattern: {value[:80]!r}")
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            fields.setdefault(key, value)
    for key in ("version", "mode", "max_age"):
        if key not in fields:
            raise PolicyError(f"no {key}")
    if fields["version"] != "STSv1":
        raise PolicyError(f"version {fields['version'][:20]!r} is not STSv1")
    mode = fields["mode"].lower()
    if mode not in MODES:
        raise PolicyError(f"mode {fields['mode'][:20]!r} is not enforce, testing or none")
    age = fields["max_age"]
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError(f"max_age {age[:20]!r} is not a number of seconds")
    if not mx and mode != "none":
        raise PolicyError(f"no mx in a policy of mode {mode}")
    return Policy(mode, tuple(dict.fromkeys(mx)), min(int(age), MAX_AGE_LIMIT))


def record_id(texts: Iterable[str]) -> str | None:
    """The ``id`` of the one valid ``v=STSv1`` record among a name's TXT records (each the
    concatenation of its strings), or None: other records are ignored, and none, several
    or an invalid one mean no policy (§3.1)."""
    records = [t for t in texts if re.match(r"v=STSv1[ \t]*;", t)]
    if len(records) != 1:
        return None
    found: str | None = None
    parts = re.split(r"[ \t]*;[ \t]*", records[0].strip(" \t"))
    if parts and parts[-1] == "":
        parts.pop()               # a final delimiter is allowed
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _RECORD_VALUE.fullmatch(value):
            return None
        if key == "id" and found is None:
            if not _ID.fullmatch(value):
                return None
            found = value
    return found


# ------------------------------------------------------------------------------ fetching


async def fetch_policy_text(host: str, addresses: Sequence[str], *, port: int,
                            context: ssl.SSLContext) -> str:
    """GET the policy from ``host`` at each of its ``addresses`` in turn until one answers
    (FetchError otherwise). The caller bounds the time."""
    last: FetchError | None = None
    for ip in addresses:
        where = f"{host}[{ip}]:{port}"
        try:
            reader, writer = await asyncio.open_connection(
                ip, port, ssl=context, server_hostname=host, limit=MAX_HEAD_BYTES)
        except ssl.SSLCertVerificationError as exc:
            last = FetchError(f"certificate of {where} not trusted: "
                              f"{exc.verify_message or exc}", "sts-webpki-invalid")
            continue
        except ssl.SSLError as exc:
            last = FetchError(f"TLS handshake with {where} failed: {exc}")
            continue
        except OSError as exc:
            last = FetchError(f"cannot connect to {where}: {exc.strerror or exc}")
            continue
        try:
            text = await _get(reader, writer, host, where)
        except BaseException:
            writer.transport.abort()
            raise
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        return text
    raise last if last is not None else FetchError(f"no address for {host}")


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
               where: str) -> str:
    """One ``GET`` of the well-known URL and its checked answer (§3.3)."""
    writer.write(f"GET {WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pymta\r\n"
                 f"Accept: text/plain\r\nCache-Control: no-cache\r\nConnection: close\r\n"
                 f"\r\n".encode("ascii"))
    try:
        await writer.drain()
        status, headers = await _read_head(reader, where)
        if status != 200:
            why = " (redirects are not followed)" if 300 <= status < 400 else ""
            raise FetchError(f"{where} answered HTTP status {status}{why}")
        media = headers.get("content-type", "").split(";", 1)[0].strip(" \t").lower()
        if media != "text/plain":
            raise FetchError(f"{where}: media type {media or 'none'!r}, not text/plain")
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise FetchError(f"{where}: content encoding {headers['content-encoding']!r}")
        body = await _read_body(reader, headers, where)
    except (asyncio.IncompleteReadError, OSError) as exc:
        if isinstance(exc, ssl.SSLError):
            raise FetchError(f"{where}: TLS error: {exc}") from None
        raise FetchError(f"{where}: connection closed early: {exc}") from None
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise FetchError(f"{where}: malformed response: {exc}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"{where}: the policy is not UTF-8 text",
                         "sts-policy-invalid") from None


async def _line(reader: asyncio.StreamReader) -> str:
    """One line of the response head, without its line end (LimitOverrunError when longer
    than the reader's limit, IncompleteReadError at the end of the stream)."""
    raw = await reader.readuntil(b"\n")
    return raw.decode("latin-1").rstrip("\r\n")


async def _read_head(reader: asyncio.StreamReader, where: str,
                     ) -> tuple[int, dict[str, str]]:
    """The status code and the header fields (names in lower case, the first of each)."""
    status_line = await _line(reader)
    match = _STATUS.fullmatch(status_line)
    if match is None:
        raise FetchError(f"{where}: not an HTTP/1.x response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    size = len(status_line)
    while True:
        line = await _line(reader)
        if not line:
            return int(match.group(1)), headers
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise FetchError(f"{where}: response header over {MAX_HEAD_BYTES} bytes")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise FetchError(f"{where}: malformed header field {line[:80]!r}")
        name = name.lower()
        value = value.strip(" \t")
        if (name in ("content-length", "transfer-encoding") and name in headers
                and headers[name] != value):
            raise FetchError(f"{where}: conflicting {name} fields")
        headers.setdefault(name, value)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], where: str,
                     ) -> bytes:
    """The body, chunked, of a declared length or up to the end of the stream; never more
    than :data:`MAX_POLICY_BYTES`."""
    too_big = FetchError(f"{where}: policy larger than {MAX_POLICY_BYTES} bytes",
                         "sts-policy-invalid")
    coding = headers.get("transfer-encoding", "").lower()
    if coding:
        if coding.rsplit(",", 1)[-1].strip(" \t") != "chunked" or "," in coding:
            raise FetchError(f"{where}: transfer coding {coding!r} not supported")
        chunks: list[bytes] = []
        total = 0
        while True:
            size_text = (await _line(reader)).split(";", 1)[0].strip(" \t")
            if not re.fullmatch(r"[0-9A-Fa-f]{1,8}", size_text):
                raise FetchError(f"{where}: malformed chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while await _line(reader):      # trailer fields, up to the empty line
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_POLICY_BYTES:
                raise too_big
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise FetchError(f"{where}: malformed chunk")
    length = headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise FetchError(f"{where}: malformed Content-Length {length[:20]!r}")
        if int(length) > MAX_POLICY_BYTES:
            raise too_big
        return await reader.readexactly(int(length))
    body = bytearray()
    while chunk := await reader.read(MAX_POLICY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise too_big
    return bytes(body)


# ------------------------------------------------------------------------------ the cache


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A fetched policy of ``domain``, the TXT ``id`` it was fetched for, and when (wall
    clock seconds: the cache outlives the process)."""

    domain: str
    id: str
    policy: Policy
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def to_json(self) -> dict[str, object]:
        p = self.policy
        return {"id": self.id, "fetched": self.fetched, "mode": p.mode, "mx": list(p.mx),
                "max_age": p.max_age}

    @classmethod
    def from_json(cls, domain: str, data: object) -> CachedPolicy | None:
        """An entry of the cache file, checked as a fetched policy is; None when it is not
        one (a damaged or hand-edited file must not invent a policy)."""
        if not isinstance(data, dict):
            return None
        mode, mx, age = data.get("mode"), data.get("mx"), data.get("max_age")
        ident, fetched = data.get("id"), data.get("fetched")
        if (mode not in MODES or not isinstance(mx, list)
                or not all(isinstance(m, str) and _valid_pattern(m) for m in mx)
                or (not mx and mode != "none")
                or not isinstance(age, int) or not 0 <= age <= MAX_AGE_LIMIT
                or not isinstance(ident, str) or not _ID.fullmatch(ident)
                or not isinstance(fetched, int | float) or not math.isfinite(fetched)
                or fetched > time.time() + 86400):
            return None     # a fetch time from the future would never expire
        return cls(domain, ident, Policy(str(mode), tuple(mx), age), float(fetched))


def _remember(table: dict[str, V], key: str, value: V) -> None:
    """Set ``table[key]``, the oldest entry leaving when the table is full."""
    table.pop(key, None)
    if len(table) >= CACHE_ENTRIES:
        table.pop(next(iter(table)), None)
    table[key] = value


class MTASTSPolicies:
    """The MTA-STS policies of one relay (module docstring): discovery, fetch, cache.

    ``resolver``: the server's DNS. ``ca_file``: the roots the policy host's certificate
    must chain to (empty: the system's). ``cache_path``: the file the cache survives
    restarts in (empty: memory only). ``https_port`` (tests) and ``fetch_timeout``: where
    and how long a fetch goes. ``clock``: wall-clock seconds (tests move it)."""

    def __init__(self, resolver: DNSResolver, *, ca_file: str = "", cache_path: str = "",
                 https_port: int = 443, fetch_timeout: float = FETCH_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.ca_file = ca_file
        self.cache_path = cache_path
        self.https_port = https_port
        self.fetch_timeout = fetch_timeout
        self._clock = clock
        self._context: ssl.SSLContext | None = None
        self._cache: dict[str, CachedPolicy] = {}
        self._absent: dict[str, float] = {}               # domain → ask again after
        self._failed: dict[str, tuple[str, float]] = {}   # domain → (id, retry after)
        self._inflight: dict[str, asyncio.Task[CachedPolicy | None]] = {}
        self._unsure: set[str] = set()      # domains whose TXT lookup last failed
        self._loaded = not cache_path
        self._file_lock = asyncio.Lock()
        self.fetches = 0            # counters for tests and metrics

    # -------------------------------------------------------------- what the relay asks

    async def plan(self, domain: str, hosts: Sequence[str]) -> Plan | None:
        """What the policy of ``domain`` makes of a delivery to its MX ``hosts`` (in their
        order), or None without a policy (or mode ``none``). Never raises but for a
        cancellation: a fault here is logged and means no policy."""
        try:
            cached = await self.policy(domain)
        except Exception:
            log.exception("MTA-STS policy of %s: local error", domain)
            cached = self._cache.get(ascii_name(domain))  # an unexpired policy still holds
            if cached is None or cached.expires <= self._clock():
                return None
        if cached is None or cached.policy.mode == "none":
            return None
        return make_plan(cached, hosts)

    def unsettled(self, domain: str) -> bool:
        """Did the last look at ``domain`` fail in a way that may pass (its TXT lookup, or
        the fetch of the policy its record announces)? Then "no policy" is not known, and
        what depends on it (REQUIRETLS's route) waits instead of failing for good."""
        name = ascii_name(domain)
        return name in self._unsure or name in self._failed

    async def policy(self, domain: str) -> CachedPolicy | None:
        """The policy in force for ``domain`` now: fetched when the TXT record says it
        changed, else the cached one; None when the domain has none."""
        domain = ascii_name(domain)
        if domain.startswith("*") or not _valid_pattern(domain):
            return None             # not a host name: nothing to look up or to ask for
        if not self._loaded:
            await self._load()
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires <= now:
            del self._cache[domain]
            cached = None
        if self._absent.get(domain, 0.0) > now:
            return cached
        try:
            ident = await self._discover(domain)
        except DNSFailure as failure:
            log.info("MTA-STS record of %s: %s", domain, failure.text)
            if len(self._unsure) < CACHE_ENTRIES:
                self._unsure.add(domain)
            return cached                  # no live policy: the cached one applies
        self._unsure.discard(domain)
        if ident is None:
            if cached is None:
                _remember(self._absent, domain, now + ABSENT_TTL)
            return cached
        self._absent.pop(domain, None)
        if cached is not None and cached.id == ident and now - cached.fetched < REFRESH_AFTER:
            return cached
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == ident and failed[1] > now:
            return cached
        task = self._inflight.get(domain)
        if task is None:      # one fetch per domain at a time, every caller waiting for it
            task = asyncio.get_running_loop().create_task(self._refresh(domain, ident))
            self._inflight[domain] = task
            task.add_done_callback(lambda _t: self._inflight.pop(domain, None))
        return await asyncio.shield(task)

    # -------------------------------------------------------------- discovery and fetch

    async def _discover(self, domain: str) -> str | None:
        """The ``id`` of the domain's record; None without (a valid) one. DNSFailure for a
        lookup that failed (NXDOMAIN is no record)."""
        try:
            rdata = await self.resolver.query(f"_mta-sts.{domain}", "TXT")
        except DNSFailure as failure:
            if failure.permanent:
                return None
            raise
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in rdata or ()]
        ident = record_id(texts)
        if ident is None and any(t.startswith("v=STSv1") for t in texts):
            log.info("MTA-STS record of %s: not exactly one valid v=STSv1 record", domain)
        return ident

    async def _refresh(self, domain: str, ident: str) -> CachedPolicy | None:
        """Fetch and parse the policy for record ``ident``; the cached policy (or None)
        when that fails, logged as TLS-RPT does."""
        cached = self._cache.get(domain)
        self.fetches += 1
        try:
            policy = parse_policy(await self._fetch(domain))
        except (FetchError, PolicyError) as exc:
            result = (exc.result_type if isinstance(exc, FetchError)
                      else "sts-policy-invalid")
            text = exc.text if isinstance(exc, FetchError) else f"invalid policy: {exc}"
            _remember(self._failed, domain,
                      (ident, self._clock() + RETRY_AFTER_FAILURE))
            tlsrpt(domain, cached.policy.mode if cached is not None else "", result,
                   text + ("; the cached policy stays in force" if cached is not None
                           else "; no policy applies"))
            return cached
        self._failed.pop(domain, None)
        fresh = CachedPolicy(domain, ident, policy, self._clock())
        if policy.max_age > 0:
            _remember(self._cache, domain, fresh)
        else:
            self._cache.pop(domain, None)
        if cached is None or cached.policy != policy:
            log.info("MTA-STS policy of %s: mode %s, mx %s, max_age %d (id %s)", domain,
                     policy.mode, " ".join(policy.mx) or "none", policy.max_age, ident)
        await self._save()
        return fresh

    async def _fetch(self, domain: str) -> str:
        """The policy text of ``domain`` (FetchError), within :attr:`fetch_timeout`."""
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.fetch_timeout):
                try:
                    addresses = await self.resolver.addresses(host)
                except DNSFailure as failure:
                    raise FetchError(failure.text) from None
                return await fetch_policy_text(host, addresses, port=self.https_port,
                                               context=self._tls())
        except TimeoutError:
            raise FetchError(f"fetching https://{host}{WELL_KNOWN} took longer than "
                             f"{self.fetch_timeout:g}s") from None

    def _tls(self) -> ssl.SSLContext:
        """The web PKI context of policy fetches: the chain checked and the name too."""
        if self._context is None:
            try:
                # the system's roots, and PYMTA_SMTP_TLS_CA_FILE's beside them: a private
                # CA for one relay must not turn every public policy fetch off
                context = ssl.create_default_context()
                if self.ca_file:
                    context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise FetchError(f"trusted roots not loaded from "
                                 f"{self.ca_file or 'system'}: {exc}") from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2    # §7.2
            self._context = context
        return self._context

    # -------------------------------------------------------------- the cache file

    async def _load(self) -> None:
        async with self._file_lock:
            if self._loaded:
                return
            entries = await asyncio.to_thread(_read_cache, self.cache_path)
            now = self._clock()
            for domain, cached in entries.items():
                if cached.expires > now and domain not in self._cache:
                    self._cache[domain] = cached
            self._loaded = True

    async def _save(self) -> None:
        if not self.cache_path:
            return
        snapshot = dict(self._cache)
        async with self._file_lock:
            try:
                await asyncio.to_thread(_write_cache, self.cache_path, snapshot,
                                        self._clock())
            except OSError as exc:
                log.warning("MTA-STS policy cache %s not written: %s", self.cache_path,
                            exc.strerror or exc)


def _read_cache(path: str) -> dict[str, CachedPolicy]:
    """The entries of the cache file that are valid policies (nothing when it is missing
    or damaged: a cache, not a source of truth)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("MTA-STS policy cache %s not read: %s", path, exc)
        return {}
    policies = data.get("policies") if isinstance(data, dict) else None
    if not isinstance(policies, dict):
        return {}
    out: dict[str, CachedPolicy] = {}
    for domain, entry in policies.items():
        cached = CachedPolicy.from_json(str(domain), entry)
        if cached is not None:
            out[cached.domain] = cached
    return out


def _write_cache(path: str, entries: dict[str, CachedPolicy], now: float) -> None:
    """Write ``entries`` and the unexpired ones other processes wrote meanwhile (the newer
    fetch of a domain wins), replacing the file whole."""
    merged = {d: c for d, c in _read_cache(path).items() if c.expires > now}
    for domain, cached in entries.items():
        other = merged.get(domain)
        if other is None or other.fetched <= cached.fetched:
            merged[domain] = cached
    data = {"version": 1, "policies": {d: c.to_json() for d, c in sorted(merged.items())}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    replace_file(path, json.dumps(data, indent=1).encode(), 0o600)


# ------------------------------------------------------------------------------ applying


@dataclass(frozen=True, slots=True)
class Plan:
    """What a policy does to one delivery: ``hosts``, the MX hosts to try in their order
    (``enforce``: only those the policy names; ``testing``: all of them), and ``refused``,
    those it does not name."""

    cached: CachedPolicy
    hosts: list[str]
    refused: list[str]

    @property
    def domain(self) -> str:
        return self.cached.domain

    @property
    def mode(self) -> str:
        return self.cached.policy.mode

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    def refusal(self) -> str:
        """The reason of a deferral when ``enforce`` leaves no MX host to try."""
        return (f"MTA-STS policy of {self.domain} (mode enforce, mx "
                f"{' '.join(self.cached.policy.mx)}) allows none of its MX hosts "
                f"({' '.join(self.refused) or 'none'})")

    def level(self, level: str) -> str:
        """The TLS level a host gets: ``enforce`` raises the weak ones to ``verify``."""
        return "verify" if self.enforced and level in WEAK_LEVELS else level

    def probes(self, level: str) -> bool:
        """``testing``: try the host at ``verify`` first, as ``enforce`` would?"""
        return self.mode == "testing" and level in WEAK_LEVELS

    def observe(self, host: str, ip: str, reply_text: str) -> bool:
        """A failed attempt at ``host``: when it is a TLS failure the policy accounts for,
        log it (TLS-RPT) and say so."""
        result = tls_result_type(reply_text)
        if result is None:
            return False
        what = "deferred" if self.enforced else "enforce would defer; tried as before"
        tlsrpt(self.domain, self.mode, result, f"{reply_text} ({what})", mx=host, ip=ip)
        return True

    def failed(self, host: str, ip: str, reply_text: str, level: str) -> None:
        """An attempt at ``host`` at ``level`` failed: under ``enforce`` at ``verify``, a
        TLS failure is the policy's (TLS-RPT); ``testing`` logged its own at the probe."""
        if self.enforced and level == "verify":
            self.observe(host, ip, reply_text)


def make_plan(cached: CachedPolicy, hosts: Sequence[str]) -> Plan:
    """The plan of ``cached`` for MX ``hosts``; each host it does not name logged as
    TLS-RPT's ``validation-failure`` (skipped at ``enforce``, tried at ``testing``)."""
    policy = cached.policy
    refused = [h for h in hosts if not policy.allows(h)]
    for host in refused:
        what = "not tried" if policy.mode == "enforce" else "enforce would skip it"
        tlsrpt(cached.domain, policy.mode, "validation-failure",
               f"MX host {host} is not in the policy's mx list ({' '.join(policy.mx)}; "
               f"{what})", mx=host)
    kept = [h for h in hosts if h not in refused] if policy.mode == "enforce" else list(hosts)
    return Plan(cached, kept, refused)


def tls_result_type(reply_text: str) -> str | None:
    """TLS-RPT's result type (RFC 8460 §4.3) of the relay's reply for a failed host, or
    None when the failure was not about TLS (a refused connection, a timeout)."""
    if "TLS is required, but was not offered" in reply_text or "STARTTLS refused" in reply_text:
        return "starttls-not-supported"
    if "Server certificate not trusted" in reply_text:
        return "certificate-expired" if "expired" in reply_text else "certificate-not-trusted"
    if "Server certificate not verified" in reply_text:
        return ("certificate-host-mismatch" if "do not match" in reply_text
                else "validation-failure")
    if "Cannot start TLS" in reply_text or "cannot verify" in reply_text:
        return "validation-failure"
    return None


def tlsrpt(domain: str, mode: str, result: str, reason: str, *, mx: str = "",
           ip: str = "") -> None:
    """One failure, in RFC 8460's field names (``policy-mode``: the mode of the policy in
    force, none when there is none), the free text after ``": "``."""
    fields = [f"policy-type=sts policy-domain={domain}"]
    if mode:
        fields.append(f"policy-mode={mode}")
    fields.append(f"result-type={result}")
    if mx:
        fields.append(f"receiving-mx-hostname={mx}")
    if ip:
        fields.append(f"receiving-ip={ip}")
    log.warning("tlsrpt %s: %s", " ".join(fields), reason)
