"""The server's TLS, swappable while it runs: :class:`ServerTLS`.

Listeners get one base ``SSLContext`` for their whole life: the STARTTLS listeners (25, 587)
hand it to ``loop.start_tls`` and the implicit-TLS one (465) to ``create_server``, which keeps
it. New certificates must still reach new connections without a restart and without
touching the connections already open. The base context's ``sni_callback`` does it: OpenSSL
calls it early in every handshake (with or without SNI from the client), and it points the
connection at the *current* context (``ssl_object.context = ...``), whose certificates the
handshake then uses. A connection already established keeps what it negotiated; replacing
the current context is one attribute assignment.

What is served, in order of precedence (the image's): the ``SMTPD_TLS_*`` files (any of them
given turns TLS on), else the certificate for the host name in ``ACME_FILE`` (Traefik's
``acme.json``; watched for changes, see :mod:`pymta.acme`), else the self-signed pair of
``SMTPD_USE_TLS=yes`` (:mod:`pymta.selfsigned`), which also stands in while an ``ACME_FILE`` present
at start holds no certificate for this host yet. The DH parameters of
``SMTPD_TLS_DH1024_PARAM_FILE`` (else ``<state_dir>/tls/dhparam.pem`` when ``pymta tls
dhparam`` wrote it) enable DHE for TLS 1.2 clients without ECDHE.

``reload(config)`` rebuilds everything from the files; a ConfigError leaves the old context
serving. It returns one line per change, for the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from pymta.acme import AcmeFile
from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.tlscerts import (
    CertPair,
    build_context,
    check_dh_params,
    pair_from_pem,
    pairs_from_chain_files,
    read_file,
)

log = logging.getLogger("pymta")

__all__ = ["ACME_POLL_INTERVAL", "ServerTLS", "check", "collect", "dhparam_path",
           "tls_configured"]

ACME_POLL_INTERVAL = 5.0
"""Seconds between two looks (one ``stat``) at ``ACME_FILE`` in each server process."""

_EXPLICIT = (("SMTPD_TLS_CERT_FILE", "SMTPD_TLS_KEY_FILE", "smtpd_tls_cert_file",
              "smtpd_tls_key_file"),
             ("SMTPD_TLS_ECCERT_FILE", "SMTPD_TLS_ECKEY_FILE", "smtpd_tls_eccert_file",
              "smtpd_tls_eckey_file"),
             ("SMTPD_TLS_DCERT_FILE", "SMTPD_TLS_DKEY_FILE", "smtpd_tls_dcert_file",
              "smtpd_tls_dkey_file"))


def explicit_files(config: Config) -> bool:
    """Whether any ``SMTPD_TLS_*`` certificate variable is set."""
    return bool(config.smtpd_tls_cert_file or config.smtpd_tls_eccert_file
                or config.smtpd_tls_dcert_file or config.smtpd_tls_chain_files)


def tls_configured(config: Config) -> bool:
    """TLS is on when a certificate variable is set, ``SMTPD_USE_TLS=yes``, or the
    ``ACME_FILE`` exists (the image's rule)."""
    return (explicit_files(config) or config.smtpd_use_tls
            or bool(config.acme_file and os.path.isfile(config.acme_file)))


def dhparam_path(config: Config) -> str:
    """Where ``pymta tls dhparam`` writes and the server looks when the variable is unset."""
    return config.smtpd_tls_dh1024_param_file or str(Path(config.state_dir) / "tls"
                                                     / "dhparam.pem")


@dataclasses.dataclass(frozen=True)
class TLSMaterial:
    """Everything one context is built from, checked."""

    pairs: tuple[CertPair, ...]
    dh: tuple[bytes, str] | None        # (PEM, where from)
    acme: bool                          # the pairs came from ACME_FILE

    def summary(self) -> str:
        """One line for ``check-config`` and the start-up log."""
        certs = "; ".join(f"{p.describe()} from {p.source}" for p in self.pairs)
        return certs + ("; DH parameters " + self.dh[1] if self.dh else "")


def collect(config: Config, *, store: bool = True) -> TLSMaterial:
    """Read and check every configured source (see the module docstring for the order).

    ``store``: write what ACME_FILE gave into the state directory and run the post hook when
    it is new (the server); ``check-config`` passes False and changes nothing (it does not
    generate the self-signed pair either: then the material has no pairs)."""
    pairs: list[CertPair] = []
    for cert_var, key_var, cert_field, key_field in _EXPLICIT:
        cert, key = getattr(config, cert_field), getattr(config, key_field)
        if bool(cert) != bool(key):
            missing, given = (key_var, cert_var) if cert else (cert_var, key_var)
            raise ConfigError(f"{missing}: not set, but {given} is: {cert or key!r}")
        if cert:
            pairs.append(pair_from_pem(
                read_file(cert, cert_var), read_file(key, key_var), cert_variable=cert_var,
                key_variable=key_var, cert_where=repr(cert), key_where=repr(key),
                source=f"{cert_var} {cert}"))
    if config.smtpd_tls_chain_files:
        pairs.extend(pairs_from_chain_files(config.smtpd_tls_chain_files))
    pairs = _one_per_kind(_without_dsa(pairs))
    acme = AcmeFile(config.acme_file, config.hostname, config.state_dir,
                    config.acme_posthook) if config.acme_file else None
    from_acme = False
    if explicit_files(config):
        if acme is not None and acme.exists():
            log.warning("tls: %s is not used: SMTPD_TLS_* certificate files are set and win "
                        "(set one or the other)", config.acme_file)
    elif acme is not None:
        found = acme.load()
        if found:
            if store:
                acme.store(found)
            pairs, from_acme = found, True
        elif acme.exists():
            log.warning("tls: %s holds no certificate for %s or its domain (yet); serving "
                        "the self-signed one meanwhile", config.acme_file, config.hostname)
    if not pairs and store:
        pairs = [_selfsigned(config)]
    return TLSMaterial(pairs=tuple(pairs), dh=_dh(config), acme=from_acme)


def check(config: Config) -> TLSMaterial:
    """What ``check-config`` verifies: every source read and checked, and OpenSSL's
    acceptance of them (a context is built and dropped). Writes nothing."""
    material = collect(config, store=False)
    build_context(material.pairs, _dh_for_openssl(material))
    return material


def _dh_for_openssl(material: TLSMaterial) -> tuple[bytes, str] | None:
    return (material.dh[0], "SMTPD_TLS_DH1024_PARAM_FILE") if material.dh else None


def _without_dsa(pairs: list[CertPair]) -> list[CertPair]:
    kept = [p for p in pairs if p.kind != "DSA"]
    for pair in pairs:
        if pair.kind == "DSA":
            log.warning("tls: %s: DSA certificates are not served: OpenSSL %s negotiates DSA "
                        "only at security level 0, which would weaken every handshake; "
                        "clients get the RSA or ECDSA certificate%s", pair.variable,
                        ssl.OPENSSL_VERSION.split()[1],
                        "" if kept else " (none given: the self-signed one)")
    return kept


def _one_per_kind(pairs: list[CertPair]) -> list[CertPair]:
    """OpenSSL holds one certificate per key type: a second of the same type would silently
    replace the first, so it is an error naming the later source."""
    seen: dict[str, CertPair] = {}
    for pair in pairs:
        if pair.kind in seen:
            raise ConfigError(f"{pair.variable}: a second {pair.kind} certificate "
                              f"({pair.source}); {seen[pair.kind].source} already gives one, "
                              "and only one per key type can be served")
        seen[pair.kind] = pair
    return list(seen.values())


def _selfsigned(config: Config) -> CertPair:
    from pymta.selfsigned import ensure_selfsigned

    cert, key = ensure_selfsigned(config)
    name = f"self-signed certificate {cert} (delete it and its key to regenerate)"
    return pair_from_pem(read_file(str(cert), name), read_file(str(key), name),
                         cert_variable=name, key_variable=name, cert_where=repr(str(cert)),
                         key_where=repr(str(key)), source=f"self-signed {cert}")


def _dh(config: Config) -> tuple[bytes, str] | None:
    variable = "SMTPD_TLS_DH1024_PARAM_FILE"
    path = config.smtpd_tls_dh1024_param_file
    if not path:
        path = dhparam_path(config)
        if not os.path.isfile(path):
            return None
        variable = f"{variable} (unset; {path} from 'pymta tls dhparam')"
    return check_dh_params(path, variable), path


class ServerTLS:
    """The server's TLS contexts (see the module docstring). ``context`` is the one to give
    listeners; it never changes. Build with :meth:`from_config`."""

    def __init__(self, config: Config, material: TLSMaterial) -> None:
        self.config = config
        self.material = material
        self.context = self._build(material)
        self.context.sni_callback = self._pick
        self._current = self.context
        self._lock = threading.Lock()     # one reload at a time (SIGHUP and the ACME watch)
        self._acme: AcmeFile | None = None
        self._acme_seen: tuple[int, int, int, int] | None = None
        self._acme_failed: tuple[int, int, int, int] | None = None
        self._follow_acme(config)

    @classmethod
    def from_config(cls, config: Config) -> ServerTLS | None:
        """None when TLS is not configured; ConfigError for any problem with the files."""
        if not tls_configured(config):
            return None
        return cls(config, collect(config))

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use."""
        return self._current

    @property
    def watches_acme(self) -> bool:
        return self._acme is not None

    def _build(self, material: TLSMaterial) -> ssl.SSLContext:
        return build_context(material.pairs, _dh_for_openssl(material))

    def _pick(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              context: ssl.SSLContext) -> None:
        current = self._current
        if current is not context:
            ssl_object.context = current

    def reload(self, config: Config | None = None) -> list[str]:
        """Read every source again and serve the result to new connections; the lines say
        what changed ([]: nothing, and nothing is swapped). A ConfigError leaves the old
        context in place. Blocking (files, key checks): call it in a thread."""
        with self._lock:
            return self._reload(config or self.config)

    def _reload(self, config: Config) -> list[str]:
        material = collect(config)
        changes = _changes(self.material, material)
        if changes:
            self._current = self._build(material)
            self.material = material
        self.config = config
        self._follow_acme(config)
        return changes

    def _follow_acme(self, config: Config) -> None:
        """Watch ``config``'s ACME_FILE from now on (none when explicit files win)."""
        if not config.acme_file or explicit_files(config):
            self._acme = None
            return
        acme = AcmeFile(config.acme_file, config.hostname, config.state_dir,
                        config.acme_posthook)
        old = self._acme
        if old is None or (old.path, old.hostname, old.posthook) != (
                acme.path, acme.hostname, acme.posthook):
            self._acme = acme
            self._acme_seen = acme.stat_key()    # just read: the next change is news

    async def watch_acme(self, interval: float | None = None,
                         on_change: Callable[[list[str]], None] | None = None) -> None:
        """Look at ``ACME_FILE`` every ``interval`` seconds for as long as the server runs
        (a reload may start or stop its use); when it changed, reload (in a thread).
        Problems are logged, the old certificate keeps serving and the next change is tried
        again."""
        while True:
            await asyncio.sleep(ACME_POLL_INTERVAL if interval is None else interval)
            acme = self._acme
            if acme is None:
                continue
            seen = acme.stat_key()
            if seen == self._acme_seen:
                continue
            self._acme_seen = seen
            try:
                changes = await asyncio.to_thread(self.reload)
            except ConfigError as exc:
                if self._acme_failed != seen:
                    # Perhaps read while Traefik was still writing it: look once more
                    self._acme_failed, self._acme_seen = seen, None
                    log.debug("tls: %s unusable, looking again: %s", acme.path, exc)
                else:
                    log.error("tls: %s changed, but the certificates stay as they were: "
                              "%s", acme.path, exc)
                continue
            except Exception:
                log.exception("tls: reading %s failed; the certificates stay as they were",
                              acme.path)
                continue
            for line in changes:
                log.log(25, "%s", line)
            if on_change is not None:
                on_change(changes)


def _changes(old: TLSMaterial, new: TLSMaterial) -> list[str]:
    before = {p.kind: p for p in old.pairs}
    after = {p.kind: p for p in new.pairs}
    lines = []
    for kind in [*before, *(k for k in after if k not in before)]:
        was, now = before.get(kind), after.get(kind)
        if now is None and was is not None:
            lines.append(f"tls: {was.describe()} no longer served")
        elif was is None and now is not None:
            lines.append(f"tls: {now.describe()} from {now.source} added")
        elif was is not None and now is not None and (
                was.fingerprint != now.fingerprint or was.cert_pem != now.cert_pem):
            lines.append(f"tls: {was.describe()} replaced by {now.describe()} from "
                         f"{now.source}")
    if (old.dh or (b"", ""))[0] != (new.dh or (b"", ""))[0]:
        lines.append(f"tls: DH parameters {'from ' + new.dh[1] if new.dh else 'removed'}")
    return lines
