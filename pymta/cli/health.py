"""``pymta health [--json]``: is the server there and can it do its job? For the Docker
HEALTHCHECK and for monitoring.

Each check is one line (``ok`` or ``FAIL``, what, the detail); the exit status is 0 when all
pass, 1 when any fails, so ``docker ps`` and a monitoring probe read the same answer:

- every listener the configuration opens greets with ``220`` (a wildcard address is asked on
  loopback);
- the queue directory is writable (a file is created and removed in it);
- every configured content scanner answers (clamd ``PING``, spamd ``PING``, rspamd
  ``/ping``): a scanner that is down shows here as well as in the server's log (issue 12);
- every configured backend answers (issue 13): the LDAP directory and the MySQL database of
  the recipient lookups and of SASL, and the IMAP server of ``SMTPD_SASL_IMAPHOST``. Each is
  asked through the adapter's own ``probe()`` (:class:`~pymta.contracts.Probeable`, found by
  ``pymta.wiring.backend_probes``): a bind and a read of the search base, ``SELECT
  VERSION()``, the IMAP greeting with ``CAPABILITY`` and ``STARTTLS``. A backend that is down
  makes the server answer ``451``/``454`` to every client, so it is unhealthy. A delivery
  target that is down (LMTP, smart host) is not asked: the queue keeps that mail, and the
  server is still doing its job.

Every check has its own deadline (``--timeout``, default 5 s; the backends' own connect and
query timeouts are cut to it too), and they run at once, so the command ends within about
that time whatever hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

from pymta.config.model import Config, ListenAddress
from pymta.contracts import Closeable, Probeable

_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    ok: bool
    detail: str


def _listeners(config: Config) -> list[tuple[str, ListenAddress, bool]]:
    """(kind, address, implicit TLS) of every listener ``pymta serve`` opens."""
    out = [("smtp", a, False) for a in config.smtp_listen]
    tls = bool(config.smtpd_use_tls or config.smtpd_tls_cert_file)
    if config.sasl_methods and tls:
        out += [("submission", a, False) for a in config.submission_listen]
        out += [("submissions", a, True) for a in config.submissions_listen]
    return out


async def _greeting(where: ListenAddress, implicit_tls: bool) -> str:
    import ssl

    host = _LOOPBACK.get(where.host, where.host)
    context = None
    if implicit_tls:
        context = ssl.create_default_context()
        context.check_hostname = False          # a health probe, not a peer we trust
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, where.port, ssl=context)
    try:
        line = await reader.readline()
        writer.write(b"QUIT\r\n")
    finally:
        writer.close()
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("220"):
        raise OSError(f"greeted with {text[:80]!r}")
    return text[:80]


def _queue_writable(config: Config) -> str:
    queue = os.path.join(config.state_dir, "queue")
    if not os.path.isdir(queue):
        raise OSError(f"{queue}: no queue directory (has the server started?)")
    fd, path = tempfile.mkstemp(prefix=".health-", dir=queue)
    os.close(fd)
    os.unlink(path)
    return queue


def _scanners(config: Config, timeout: float) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    out: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    if config.clamd:
        from pymta.content.clamd import ClamdClient

        clamd = ClamdClient(config.clamd, timeout=timeout)
        out.append((f"clamd {config.clamd}", clamd.version))
    from pymta.content.learn import spam_client

    client = spam_client(config, timeout)
    if client is not None:
        out.append((f"{config.spam_engine} {config.spamd or config.rspamd}", client.ping))
    return out


def _backends(config: Config,
              timeout: float) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """The configured backends' probes, built with their timeouts no longer than ours (an
    LDAP connect runs in a thread that a deadline cannot stop)."""
    from pymta import wiring

    bounded = dataclasses.replace(config, lookup_timeout=min(config.lookup_timeout, timeout))
    return [(name, functools.partial(_probe, adapter))
            for name, adapter in wiring.backend_probes(bounded)]


async def _probe(adapter: Probeable) -> str:
    try:
        return await adapter.probe()
    finally:
        if isinstance(adapter, Closeable):
            with contextlib.suppress(Exception):
                await adapter.aclose()


async def _one(name: str, work: Callable[[], Awaitable[Any]], timeout: float) -> Result:
    try:
        async with asyncio.timeout(timeout):
            detail = await work()
    except TimeoutError:
        return Result(name, False, f"no answer within {timeout:g}s")
    except Exception as exc:  # noqa: BLE001 - any failure is this check's answer
        return Result(name, False, str(exc) or type(exc).__name__)
    return Result(name, True, str(detail) if detail else "answers")


async def run_checks(config: Config, timeout: float = 5.0) -> list[Result]:
    """Every check at once, each under ``timeout``."""
    checks: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    for kind, where, implicit in _listeners(config):
        checks.append((f"{kind} {where}", functools.partial(_greeting, where, implicit)))
    checks.append(("queue directory",
                   lambda: asyncio.to_thread(_queue_writable, config)))
    checks += _scanners(config, timeout)
    checks += _backends(config, timeout)
    return list(await asyncio.gather(*(_one(n, w, timeout) for n, w in checks)))


def report(results: list[Result], as_json: bool, out: TextIO) -> int:
    healthy = all(r.ok for r in results)
    if as_json:
        json.dump({"healthy": healthy,
                   "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail}
                              for r in results]}, out, indent=2)
        out.write("\n")
    else:
        for r in results:
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}", file=out)
    return 0 if healthy else 1


def run(config: Config, as_json: bool, timeout: float, out: TextIO) -> int:
    return report(asyncio.run(run_checks(config, timeout)), as_json, out)
