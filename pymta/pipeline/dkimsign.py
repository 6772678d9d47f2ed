"""DKIM signing (RFC 6376; rsa-sha256, or ed25519-sha256 per RFC 8463) of mail our own users
send: from authenticated clients, and from ``MYNETWORKS`` clients whose sender is in one of
our domains.

Implementation summary. The modifier runs last, after every other stage has added its header
fields, and signs exactly what receivers will see: ``txn.prepend`` (our trace and result
fields, newest first) above the spooled message (our ``Received:`` first). The signature is
added with ``add_header``, so it is the top-most field. Signing (body hash plus one RSA or
ed25519 operation) runs in a worker thread.

Which domain signs: the ``From:`` header's domain when it is one of ``MAIL_DOMAIN`` (DMARC
alignment), else the envelope sender's domain when local, else (authenticated clients only,
whose mail we vouch for) the first domain. Signed header fields: dkimpy's RFC 6376 §5.4.1
list of those present, ``From`` oversigned (so no second ``From`` can be added), never
``Received``/``Return-Path``/``Authentication-Results``; canonicalization relaxed/relaxed.
A message without ``From:`` cannot be signed (RFC 6376 §5.4): it goes out unsigned, logged.

The notices the queue writes itself (DSNs: bounces, delay and success reports) never pass
through the pipeline; :class:`FromDomainSigner` signs them (issue 15, item 7), handed to the
queue manager by the wiring as its ``NoticeSigner``. Their ``From:`` is
``MAILER-DAEMON@<MYHOSTNAME>``, and the host name is normally a host inside a
``MAIL_DOMAIN`` rather than one itself, so a notice is signed when its From domain is one of
the domains we sign for (the rule for our users' mail) or a subdomain of one: then with that
domain's key and ``d=`` it, which DMARC's default relaxed alignment accepts (as OpenDKIM's
``SubDomains yes`` does; Postfix's own bounces usually come from ``$myorigin``, the parent
domain). A notice from any other domain goes out unsigned, exactly as before.

A message dkimpy cannot parse as it is (issue 10, defect 9) is still accepted. When the only
trouble is blanks before a colon (``Subject :``), it is signed over
:func:`.headers.strict_view`: with relaxed/relaxed canonicalization the hashes are those of
the message as sent, so the signature verifies for any receiver that reads the obsolete
syntax. When the header section does not end with an empty line, where the body begins is
a guess: the message goes out unsigned (:class:`~pymta.pipeline.CannotEvaluate`, logged),
as it would with a milter signer that cannot parse it.

Bounded work (issue 10 review): dkimpy's helpers are the linear ones of
:func:`.dkimverify.harden_dkimpy`; a header section of more than :data:`MAX_SIGN_FIELDS`
fields is not signed (dkimpy signs every instance of every field its default list names, so
140,000 ``To:`` fields made a 735 KB signature); the ``From:`` value is read for its address
only up to :data:`MAX_FROM_VALUE` characters.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Iterable

import dkim

from pymta.pipeline import CannotEvaluate, SpooledBody, Transaction, dkimrsa
from pymta.pipeline.dkimkeys import DkimKey, KeyStore
from pymta.pipeline.dkimverify import harden_dkimpy
from pymta.pipeline.headers import field_name, field_value, split_fields, strict_view

log = logging.getLogger("pymta.pipeline.dkim")

#: A header section with more fields than this is not signed (see the module docstring)
MAX_SIGN_FIELDS = 1000
#: Longest ``From:`` value read for its address (see :func:`from_domain`)
MAX_FROM_VALUE = 8192


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""


def header_value(header: bytes, name: str | bytes) -> str | None:
    """The unfolded value of the first ``name`` (lower-case) field of a header section, or
    None; fields split as Postfix splits them, so any header section can be read."""
    if isinstance(name, bytes):
        name = name.decode("ascii")
    for field in split_fields(header):
        if field_name(field) == name:
            return field_value(field)
    return None


def from_domain(header: bytes) -> str:
    """The domain of the (first) ``From:`` address, or '' without one, or when the value
    is longer than :data:`MAX_FROM_VALUE` or the stdlib parser gives up on it
    (``getaddresses`` costs ~2 µs a character on the event loop, and recurses once per
    nested comment)."""
    value = header_value(header, "from")
    if value is None or len(value) > MAX_FROM_VALUE:
        return ""
    try:
        addresses = email.utils.getaddresses([value])
    except (RecursionError, ValueError, IndexError):
        return ""
    for _, addr in addresses:
        if "@" in addr:
            return _domain_of(addr)
    return ""


def message_as_sent(txn: Transaction, spooled: bytes) -> bytes:
    """What delivery agents write: the prepended fields, then the spooled message."""
    prepend = "".join(txn.prepend)
    return prepend.encode("utf-8", "surrogateescape") + spooled if prepend else spooled


def sign_message(message: bytes, key: DkimKey) -> bytes:
    """The ``DKIM-Signature: ...`` field (CRLF-terminated, folded) for ``message``."""
    return dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                     key.dkimpy_private, canonicalize=(b"relaxed", b"relaxed"),
                     signature_algorithm=key.signature_algorithm,
                     include_headers=None, linesep=b"\r\n")


class DkimSign:
    """The Modifier. ``keys`` gives the key per domain (generated on first use if missing)."""

    name = "dkim-sign"

    def __init__(self, keys: KeyStore, first_domain: str) -> None:
        dkimrsa.install()   # RSA by OpenSSL: ~10× faster than dkimpy's, same signature
        harden_dkimpy()     # linear parsing and hashing helpers, same signature
        self.keys = keys
        self.first_domain = first_domain.lower()

    def signing_domain(self, txn: Transaction, header: bytes) -> str | None:
        """The domain to sign as, or None when this message is not ours to sign."""
        local = txn.local_domains
        author = from_domain(header)
        sender = _domain_of(txn.sender)
        if txn.auth_user is not None:
            for domain in (author, sender):
                if domain in local:
                    return domain
            return self.first_domain
        if txn.trusted and (author in local or sender in local):
            return author if author in local else sender
        return None

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        header = body.header_bytes()
        domain = self.signing_domain(txn, header)
        if domain is None:
            return
        spooled = await body.read_async()
        message = message_as_sent(txn, spooled)
        try:
            field = await asyncio.to_thread(self._sign, message, domain)
        except dkim.ParameterError as exc:  # no From:, or nothing signable
            log.warning("%s: not DKIM-signed: %s", txn.qid, exc)
            return
        txn.add_header(field.decode("ascii").rstrip("\r\n"))
        log.info("%s: DKIM-signed d=%s s=%s a=%s", txn.qid, domain, self.keys.selector,
                 self.keys.get(domain).signature_algorithm.decode())

    def _sign(self, message: bytes, domain: str) -> bytes:
        if len(split_fields(message)) > MAX_SIGN_FIELDS:
            raise CannotEvaluate(f"more than {MAX_SIGN_FIELDS} header fields: not DKIM-signed")
        key = self.keys.get(domain)  # may read or generate the key file: in this thread
        try:
            return sign_message(message, key)
        except dkim.MessageFormatError:
            view = strict_view(message)
        if view.separated:
            raise CannotEvaluate("no empty line after the header section: not DKIM-signed")
        try:
            return sign_message(view.data, key)  # relaxed: the hashes of the message as sent
        except dkim.MessageFormatError as exc:
            raise CannotEvaluate(f"message cannot be parsed: not DKIM-signed ({exc})") from exc


def covering_domain(domain: str, domains: Iterable[str]) -> str | None:
    """The domain of ``domains`` that signs for author domain ``domain``: the domain itself
    when listed, else its closest listed parent (``mx.example.com`` → ``example.com``,
    aligned with it under DMARC's relaxed rule), else None."""
    domain = domain.strip().rstrip(".").lower()
    listed = frozenset(domains)
    if domain in listed:
        return domain
    labels = domain.split(".")
    for i in range(1, len(labels) - 1):   # parents, never a bare top-level label
        candidate = ".".join(labels[i:])
        if candidate in listed:
            return candidate
    return None


class FromDomainSigner:
    """Signs a message pymta writes itself (a DSN) for its ``From:`` domain: the queue
    manager's ``NoticeSigner`` (:class:`pymta.contracts.NoticeSigner`).

    ``domains`` are those whose keys the server made or loaded at start (``MAIL_DOMAIN``
    with ``PYMTA_DKIM_SIGN`` on): signing for any other would generate a key nobody has
    published. Same signature as the modifier's (relaxed/relaxed, the configured selector
    and key, dkimpy's header list with ``From`` oversigned). Called in a worker thread;
    raises when it cannot sign (an unreadable key), and the caller queues the notice
    unsigned."""

    def __init__(self, keys: KeyStore, domains: Iterable[str]) -> None:
        dkimrsa.install()
        harden_dkimpy()
        self.keys = keys
        self.domains = frozenset(d.strip().rstrip(".").lower() for d in domains if d.strip())

    def signing_domain(self, message: bytes) -> str | None:
        """The ``d=`` for ``message``, or None when its From domain is not ours to sign."""
        author = from_domain(message)
        return covering_domain(author, self.domains) if author else None

    def __call__(self, message: bytes) -> bytes:
        """The ``DKIM-Signature:`` field (CRLF-terminated) to put on top of ``message``, or
        b"" when it is not ours to sign."""
        domain = self.signing_domain(message)
        if domain is None:
            return b""
        if len(split_fields(message)) > MAX_SIGN_FIELDS:
            raise CannotEvaluate(f"more than {MAX_SIGN_FIELDS} header fields")
        return sign_message(message, self.keys.get(domain))
