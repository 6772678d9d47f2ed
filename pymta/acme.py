"""Certificates from Traefik's ``acme.json`` (``ACME_FILE``, ``ACME_POSTHOOK``), as
``mlan/postfix-amavis`` takes them.

Traefik keeps the certificates it obtained by ACME (Let's Encrypt) in one JSON file; mounting
its ``/acme`` directory into the mail server's container is how the image reuses them. Two
layouts exist:

- Traefik v1: ``{"Account": ..., "Certificates": [{"Domain": {"Main": ..., "SANs": [...]},
  "Certificate": B64, "Key": B64}]}``
- Traefik v2 and later: ``{"<resolver>": {"Account": ..., "Certificates": [{"domain":
  {"main": ..., "sans": [...]}, "certificate": B64, "key": B64, "Store": ...}]}, ...}``, one
  object per certificate resolver.

``Certificate`` and ``Key`` are the base64 of the PEM chain and key. The certificate used is
the one whose main name or a SAN is the host name (``MYHOSTNAME``), a wildcard covering it,
or the host name's parent domain (the image's ``DOMAIN=${HOSTNAME#*.}``), best match first,
then the one valid longest; one per key type (a resolver may hold RSA, another ECDSA).

What was chosen is written to ``<state_dir>/tls/acme.crt`` and ``acme.key`` (more key types:
``acme-ecdsa.crt`` ...) under a lock, and only the process that wrote new content runs
``ACME_POSTHOOK``: with several workers polling the same file, the hook runs once per change
on the machine (e.g. to reload a Dovecot that uses the same files), not once per worker. A
failing hook is logged, never fatal.

Everything read from the file is untrusted: wrong types, bad base64, bad PEM are a
ConfigError starting with ``ACME_FILE`` that says where, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pymta.config.errors import ConfigError
from pymta.files import replace_file
from pymta.tlscerts import CertPair, pair_from_pem

log = logging.getLogger("pymta")

__all__ = ["AcmeEntry", "AcmeFile", "parse_acme", "select_pairs"]

VARIABLE = "ACME_FILE"
MAX_SIZE = 64 * 1024 * 1024
"""Larger files are refused: Traefik's file for thousands of domains stays far below."""
HOOK_TIMEOUT = 300.0
"""Seconds an ``ACME_POSTHOOK`` may run before it is killed (and the failure logged)."""

_KIND_ORDER = {"RSA": 0, "ECDSA": 1}   # at equal match, RSA first: every client takes it


@dataclasses.dataclass(frozen=True)
class AcmeEntry:
    """One certificate entry of the file, its base64 fields not decoded yet."""

    resolver: str          # "" in the v1 layout
    index: int             # its position in that resolver's list
    main: str
    sans: tuple[str, ...]
    certificate: str
    key: str

    @property
    def where(self) -> str:
        resolver = f"resolver {self.resolver!r} " if self.resolver else ""
        return f"{resolver}certificate {self.index} ({self.main or 'no main name'})"


def parse_acme(data: bytes, path: str) -> list[AcmeEntry]:
    """Every certificate entry of an ``acme.json`` (either layout). Raises ConfigError
    starting with ``ACME_FILE`` for anything not shaped as Traefik writes it."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{VARIABLE}: not JSON ({exc}): {path!r}") from None
    except RecursionError:      # nesting deeper than the parser's stack: not Traefik's
        raise ConfigError(f"{VARIABLE}: not JSON (nested too deeply): {path!r}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{VARIABLE}: not a JSON object: {path!r}")
    if "Certificates" in doc or "Account" in doc:      # v1: one store, capitalised keys
        resolvers: dict[str, Any] = {"": doc}
    else:
        resolvers = doc
    entries: list[AcmeEntry] = []
    for name, store in resolvers.items():
        label = f"resolver {name!r}" if name else "the file"
        if store is None:
            continue
        if not isinstance(store, dict):
            raise ConfigError(f"{VARIABLE}: {label} is not an object: {path!r}")
        certs = store.get("Certificates")
        if certs is None:
            continue
        if not isinstance(certs, list):
            raise ConfigError(f"{VARIABLE}: \"Certificates\" of {label} is not a list: "
                              f"{path!r}")
        for index, item in enumerate(certs):
            entries.append(_entry(name, index, item, path))
    return entries


def _entry(resolver: str, index: int, item: Any, path: str) -> AcmeEntry:
    where = (f"resolver {resolver!r} " if resolver else "") + f"certificate {index}"

    def field(obj: dict[str, Any], *names: str) -> Any:
        for name in names:
            if name in obj:
                return obj[name]
        return None

    if not isinstance(item, dict):
        raise ConfigError(f"{VARIABLE}: {where} is not an object: {path!r}")
    domain = field(item, "domain", "Domain")
    if not isinstance(domain, dict):
        raise ConfigError(f"{VARIABLE}: {where}: \"domain\" is not an object: {path!r}")
    main = field(domain, "main", "Main")
    sans = field(domain, "sans", "SANs", "Sans") or []
    if not isinstance(main, str):
        raise ConfigError(f"{VARIABLE}: {where}: \"main\" is not a string: {path!r}")
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise ConfigError(f"{VARIABLE}: {where}: \"sans\" is not a list of names: {path!r}")
    cert, key = field(item, "certificate", "Certificate"), field(item, "key", "Key")
    for value, what in ((cert, "certificate"), (key, "key")):
        if not isinstance(value, str):
            raise ConfigError(f"{VARIABLE}: {where}: \"{what}\" is not a string: {path!r}")
    return AcmeEntry(resolver=resolver, index=index, main=main.lower().rstrip("."),
                     sans=tuple(s.lower().rstrip(".") for s in sans), certificate=cert,
                     key=key)


def _score(entry: AcmeEntry, hostname: str) -> int:
    """3: names the host; 2: a wildcard covers it; 1: names its parent domain; 0: none."""
    host = hostname.lower().rstrip(".")
    parent = host.partition(".")[2]
    names = (entry.main, *entry.sans)
    if host in names:
        return 3
    if parent and f"*.{parent}" in names:
        return 2
    if parent and "." in parent and parent in names:
        return 1
    return 0


def select_pairs(entries: Sequence[AcmeEntry], hostname: str, path: str) -> list[CertPair]:
    """The certificates to serve for ``hostname``: per key type the best match (then the one
    valid longest), preferred first. Broken candidates are skipped with a warning while
    another one serves; when every candidate is broken the first problem is raised."""
    candidates = sorted(((score, e) for e in entries if (score := _score(e, hostname))),
                        key=lambda c: -c[0])
    best: dict[str, tuple[int, CertPair]] = {}
    problems: list[ConfigError] = []
    for score, entry in candidates:
        try:
            pair = _decode(entry, path)
        except ConfigError as exc:
            problems.append(exc)
            continue
        held = best.get(pair.kind)
        if held is None or (score, pair.not_after) > (held[0], held[1].not_after):
            best[pair.kind] = (score, pair)
    if not best and problems:
        raise problems[0]
    for problem in problems:
        log.warning("%s (skipped)", problem)
    ranked = sorted(best.values(), key=lambda sp: (-sp[0], _KIND_ORDER.get(sp[1].kind, 9)))
    return [pair for _, pair in ranked]


def _decode(entry: AcmeEntry, path: str) -> CertPair:
    def b64(text: str, what: str) -> bytes:
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{VARIABLE}: {entry.where}: the {what} is not base64: "
                              f"{path!r}") from None

    where = f"{entry.where} in {path!r}"
    return pair_from_pem(b64(entry.certificate, "certificate"), b64(entry.key, "key"),
                         cert_variable=VARIABLE, key_variable=VARIABLE, cert_where=where,
                         key_where=where, source=f"{VARIABLE} {path} ({entry.where})")


class AcmeFile:
    """``ACME_FILE`` for one server: its certificates for the host name, their files in the
    state directory, the post hook. Not thread-safe by itself; its users serialise."""

    def __init__(self, path: str, hostname: str, state_dir: str, posthook: str = "") -> None:
        self.path = path
        self.hostname = hostname
        self.tls_dir = Path(state_dir) / "tls"
        self.posthook = posthook.strip()

    def stat_key(self) -> tuple[int, int, int, int] | None:
        """What changes when Traefik rewrites the file (it writes a new file and renames it:
        inode and mtime change); None while there is no file."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def load(self) -> list[CertPair]:
        """The certificates for the host name, best first ([] when the file is absent or
        has none for this host). Reads only: ``check-config`` uses it too."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_SIZE + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"{VARIABLE}: cannot read: {exc.strerror or exc}: "
                              f"{self.path!r}") from None
        if len(data) > MAX_SIZE:
            raise ConfigError(f"{VARIABLE}: larger than {MAX_SIZE} bytes: {self.path!r}")
        return select_pairs(parse_acme(data, self.path), self.hostname, self.path)

    def files(self, pairs: Sequence[CertPair]) -> dict[Path, bytes]:
        """Where each chosen pair is written: the first as ``acme.crt``/``acme.key``, others
        as ``acme-<type>.crt``/``.key``."""
        out: dict[Path, bytes] = {}
        for i, pair in enumerate(pairs):
            stem = "acme" if i == 0 else f"acme-{pair.kind.lower()}"
            out[self.tls_dir / f"{stem}.crt"] = pair.cert_pem
            out[self.tls_dir / f"{stem}.key"] = pair.key_pem
        return out

    def store(self, pairs: Sequence[CertPair]) -> bool:
        """Write the pairs' files unless they already hold exactly this; True when this call
        wrote (and so ran ``ACME_POSTHOOK``). Under a lock shared by every process of the
        state directory, so of several workers seeing one change only one writes."""
        wanted = self.files(pairs)
        if not wanted:
            return False
        try:
            self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _locked(self.tls_dir / ".acme.lock"):
                if all(_content(p) == data for p, data in wanted.items()):
                    return False
                for p, data in wanted.items():
                    replace_file(p, data, 0o600 if p.suffix == ".key" else 0o644)
        except OSError as exc:
            raise ConfigError(f"PYMTA_STATE_DIR: cannot write the ACME certificate into "
                              f"{self.tls_dir}: {exc.strerror or exc}") from None
        log.log(25, "tls: certificate from %s written to %s", self.path,
                ", ".join(str(p) for p in wanted if p.suffix == ".crt"))
        self.run_posthook()
        return True

    def run_posthook(self) -> None:
        """``ACME_POSTHOOK`` through the shell; its failure is logged, never raised."""
        if not self.posthook:
            return
        # The hook is the administrator's program, not ours: SIGHUP as the default (we ignore
        # it while starting, and an ignored signal stays ignored across exec, so a daemon the
        # hook starts could never be reloaded) and none of our metrics' environment.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        try:
            proc = subprocess.run(self.posthook, shell=True, timeout=HOOK_TIMEOUT,
                                  stdin=subprocess.DEVNULL, capture_output=True, check=False,
                                  env=env, preexec_fn=_default_sighup)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("tls: ACME_POSTHOOK failed: %s", exc)
            return
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
            log.error("tls: ACME_POSTHOOK exited with status %d: %s", proc.returncode,
                      tail.replace("\n", " | "))
        else:
            log.info("tls: ACME_POSTHOOK ran: %s", self.posthook)


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


