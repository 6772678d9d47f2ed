"""The TLS contexts: the server's for STARTTLS (25, 587) and implicit TLS (465), and the one
client context of every outbound connection (SMTP relay, IMAP for SASL).

As in ``mlan/postfix-amavis``, TLS is on when a certificate variable (``SMTPD_TLS_CERT_FILE``,
``SMTPD_TLS_ECCERT_FILE``, ``SMTPD_TLS_CHAIN_FILES`` ...; :mod:`pymta.tlscerts`) is given, the
``ACME_FILE`` exists (:mod:`pymta.acme`) or ``SMTPD_USE_TLS=yes`` (with no files: the
self-signed pair of :mod:`pymta.selfsigned`). :mod:`pymta.servertls` builds the server's
context and swaps its certificates while it serves. Problems with the files become
ConfigError naming the variable, so ``pymta check-config`` and ``serve`` report them as one
line.

The client side encrypts opportunistically and verifies nothing (:func:`client_ssl_context`),
the same for the relay and the IMAP check, in one place so they cannot drift apart.
"""

from __future__ import annotations

import ssl
from typing import Any

from pymta.config.model import Config
from pymta.selfsigned import ensure_selfsigned, selfsigned_paths

__all__ = ["client_ssl_context", "describe_tls", "ensure_selfsigned", "selfsigned_paths",
           "server_ssl_context"]


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server SSLContext, or None when TLS is not configured (see
    :mod:`pymta.servertls`, which builds it and can swap its certificates while it serves).

    Raises ConfigError naming the variable when a file is missing, unreadable, not PEM, the
    key is encrypted or does not match the certificate, or the certificate has expired.
    """
    from pymta.servertls import ServerTLS

    server = ServerTLS.from_config(config)
    return server.context if server is not None else None


def client_ssl_context() -> ssl.SSLContext:
    """The context of pymta's outbound TLS: it encrypts, but checks neither the certificate
    nor the host name. SMTP between MTAs is opportunistic (Postfix's ``may`` and ``encrypt``
    levels verify nothing either: a check an MX cannot pass would only send the mail in the
    clear), and Dovecot's remote-IMAP passdb, which ``SMTPD_SASL_IMAPHOST`` replaces, does
    not verify by default. A new context per call: callers keep theirs for their lifetime.
    Protocol floor and ciphers are Python's defaults (TLS 1.2 and up)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------------------ reporting


def describe_tls(ssl_object: Any) -> str:
    """``version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256`` for Received headers and
    logs; accepts an ``ssl.SSLObject`` or ``ssl.SSLSocket`` (anything with version/cipher)."""
    if ssl_object is None:
        return ""
    version = ssl_object.version() or "unknown"
    cipher = ssl_object.cipher()
    if not cipher:
        return f"version={version}"
    return f"version={version} cipher={cipher[0]} bits={cipher[2]}"
