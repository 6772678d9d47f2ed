"""The ``pymta`` command (also ``python -m pymta``): serve, check-config, config dump (the
effective configuration as TOML), health, queue management, ``passwd hash`` (``{SCHEME}``
password hashes for ``SMTPD_SASL_CLIENTAUTH``) and ``dkim show``/``dkim keygen`` (signing
keys and the DNS TXT records to publish).

The CLI is what an operator touches first, often with a mistyped variable, so every expected
problem is one line on stderr and an exit status, never a traceback: configuration errors
exit 2 (as argparse usage errors do), queue errors (unknown id, busy message) exit 1.
Set ``PYMTA_TRACEBACK=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from pymta.config.errors import ConfigError
from pymta.config.model import Config

EX_USAGE_OR_CONFIG = 2
EX_SOFTWARE = 70


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of usage text plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE_OR_CONFIG,
                  f"pymta: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    config_opt = _Parser(add_help=False)
    config_opt.add_argument("--config", metavar="FILE",
                            help="TOML configuration file (default: $PYMTA_CONFIG)")
    queue_opt = _Parser(add_help=False, parents=[config_opt])
    queue_opt.add_argument("--state-dir", metavar="DIR",
                           help="use this state directory instead of the configured one")

    parser = _Parser(prog="pymta", description="A pure-Python asyncio mail transfer agent.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("serve", parents=[config_opt], help="run the server")
    sub.add_parser("check-config", parents=[config_opt],
                   help="check the configuration and print a summary")
    health = sub.add_parser("health", parents=[queue_opt],
                            help="check listeners, queue, scanners and backends "
                                 "(exit 0: healthy)")
    health.add_argument("--json", action="store_true", help="machine-readable output")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="deadline of each check (default 5)")

    queue = sub.add_parser("queue", help="list and manage the mail queue")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=_Parser)
    q_list = qsub.add_parser("list", parents=[queue_opt], help="list queued messages")
    q_list.add_argument("--json", action="store_true", help="machine-readable output")
    q_show = qsub.add_parser("show", parents=[queue_opt], help="show one message")
    q_show.add_argument("id", metavar="ID")
    qsub.add_parser("flush", parents=[queue_opt], help="attempt delivery of all messages now")
    q_del = qsub.add_parser("delete", parents=[queue_opt], help="delete messages")
    q_del.add_argument("ids", metavar="ID", nargs="*")
    q_del.add_argument("--all", action="store_true", help="delete every message")
    for name, text in (("hold", "hold messages (no delivery attempts)"),
                       ("release", "release held messages")):
        q = qsub.add_parser(name, parents=[queue_opt], help=text)
        q.add_argument("ids", metavar="ID", nargs="*")
        q.add_argument("--all", action="store_true", help=f"{name} every message")
    _quarantine_parser(sub, queue_opt)
    pw = sub.add_parser("passwd", help="password hashes for SMTPD_SASL_CLIENTAUTH")
    pwsub = pw.add_subparsers(dest="passwd_command", metavar="ACTION", parser_class=_Parser)
    pw_hash = pwsub.add_parser(
        "hash", help="read a password (prompt, or one line of stdin) and print {SCHEME}hash")
    pw_hash.add_argument("--scheme", default="SHA512-CRYPT", metavar="SCHEME",
                         help="Dovecot scheme name (default SHA512-CRYPT)")
    learn = sub.add_parser("learn", parents=[config_opt],
                           help="teach the spam engine (PYMTA_SPAMD or PYMTA_RSPAMD) messages")
    learn.add_argument("kind", choices=("spam", "ham"), help="what the messages are")
    learn.add_argument("files", metavar="FILE", nargs="+", help="one message per file")
    learn.set_defaults(handler=_learn)
    cf = sub.add_parser("config", help="the effective configuration")
    cfsub = cf.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    cf_dump = cfsub.add_parser("dump", parents=[config_opt],
                               help="print the configuration serve uses as TOML "
                                    "(secrets masked)")
    cf_dump.add_argument("--show-secrets", action="store_true",
                         help="write passwords and keys instead of ********")
    cf_dump.add_argument("-o", "--output", metavar="FILE",
                         help="write to FILE (mode 0600) instead of stdout")
    _tls_parser(sub, queue_opt)
    dk = sub.add_parser("dkim", help="DKIM signing keys and the DNS records to publish")
    dksub = dk.add_subparsers(dest="dkim_command", metavar="ACTION", parser_class=_Parser)
    dk_show = dksub.add_parser("show", parents=[queue_opt],
                               help="print the TXT record(s) to publish (all domains)")
    dk_show.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain")
    dk_gen = dksub.add_parser("keygen", parents=[queue_opt],
                              help="make a new key (replaces the domain's key file)")
    dk_gen.add_argument("--domain", metavar="D", help="domain (default: every MAIL_DOMAIN)")
    dk_gen.add_argument("--selector", metavar="S", help="selector (default: DKIM_SELECTOR)")
    dk_gen.add_argument("--bits", metavar="N", help="RSA key size (default: DKIM_KEYBITS)")
    dk_gen.add_argument("--algorithm", choices=("rsa", "ed25519"),
                        help="key type (default: DKIM_ALGORITHM)")
    return parser


def _tls_parser(sub: argparse._SubParsersAction[_Parser], queue_opt: _Parser) -> None:
    tls = sub.add_parser("tls", help="server TLS tools")
    tsub = tls.add_subparsers(dest="tls_command", metavar="ACTION", parser_class=_Parser)
    dh = tsub.add_parser("dhparam", parents=[queue_opt],
                         help="make new DH parameters (the image's update_postfix_dhparam)")
    dh.add_argument("--bits", type=int, default=2048, metavar="N",
                    help="size in bits (default 2048)")
    dh.add_argument("--out", metavar="FILE", help="where to write (default: "
                    "SMTPD_TLS_DH1024_PARAM_FILE, else <state dir>/tls/dhparam.pem)")
    tls.set_defaults(handler=_tls)


def _tls(args: argparse.Namespace) -> int:
    if args.tls_command != "dhparam":
        raise _UsageError("tls: which action? dhparam (see 'pymta tls --help')")
    from pymta.cli import tls as tls_cli

    # --out needs no configuration (a fresh container may not have one yet)
    return tls_cli.dhparam(args, None if args.out else _load(args), sys.stdout)


def _learn(args: argparse.Namespace) -> int:
    from pymta.cli import learn

    return learn.run(args, _load(args))


def _quarantine_parser(sub: argparse._SubParsersAction[_Parser],
                       queue_opt: _Parser) -> None:
    quar = sub.add_parser("quarantine", help="list, show, release and expire the messages "
                          "the content filter blocked")
    qsub = quar.add_subparsers(dest="quarantine_command", metavar="ACTION",
                               parser_class=_Parser)
    q_list = qsub.add_parser("list", parents=[queue_opt], help="list quarantined messages")
    q_list.add_argument("--json", action="store_true", help="machine-readable output")
    q_show = qsub.add_parser("show", parents=[queue_opt],
                             help="print a quarantined message as it is kept")
    q_show.add_argument("id", metavar="ID")
    q_show.add_argument("--headers", action="store_true", help="the header section only")
    q_rel = qsub.add_parser("release", parents=[queue_opt],
                            help="deliver a quarantined message now")
    q_rel.add_argument("id", metavar="ID")
    q_rel.add_argument("--rcpt", metavar="ADDR", action="append",
                       help="only this blocked recipient (repeatable)")
    q_del = qsub.add_parser("delete", parents=[queue_opt], help="delete quarantined messages")
    q_del.add_argument("ids", metavar="ID", nargs="+")
    qsub.add_parser("expire", parents=[queue_opt],
                    help="delete those older than PYMTA_QUARANTINE_LIFETIME")


# ------------------------------------------------------------------------------ commands


def _passwd_hash(args: argparse.Namespace) -> int:
    """What ``doveadm pw -s SCHEME`` does: the password from a prompt (asked twice) or, when
    stdin is not a terminal, its first line; the hash on stdout. Never takes the password as
    an argument (it would show in ``ps`` and the shell history)."""
    import getpass

    from pymta.wiring import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Enter new password: ")
        if getpass.getpass("Retype new password: ") != password:
            raise _UsageError("passwd hash: passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _UsageError("passwd hash: empty password")
    try:
        print(hash_password(password, args.scheme))
    except ValueError as exc:      # the password file's SchemeError
        raise _UsageError(f"passwd hash: {exc}") from None
    return 0


def _load(args: argparse.Namespace) -> Config:
    from pymta.config.load import load_config

    return load_config(path=args.config)


def _check(args: argparse.Namespace, config: Config) -> None:
    """The adapters' checks of their settings and optional packages (``pymta.wiring``),
    building nothing; an error says ``(in FILE)`` when the value is the TOML file's."""
    from pymta import wiring
    from pymta.config.load import in_file

    try:
        wiring.check(config)
    except ConfigError as exc:
        raise in_file(exc, path=args.config) from None


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _check(args, config)
    from pymta.log import setup_logging

    setup_logging(config)
    from pymta.daemon import serve

    sys.exit(serve(config, reload_config=lambda: _load(args)))


def _listeners(config: Config) -> str:
    def show(addrs: Sequence[object]) -> str:
        return ", ".join(str(a) for a in addrs) or "none"

    sasl = "" if config.sasl_methods else " (inactive: no SASL method configured)"
    return (f"smtp {show(config.smtp_listen)}; submission {show(config.submission_listen)}; "
            f"submissions {show(config.submissions_listen)}{sasl}")


def _tls_summary(config: Config) -> str:
    """Checks every certificate source (files, ``ACME_FILE``, DH parameters); never
    generates the self-signed pair nor writes the ACME files (that is ``serve``'s job, and
    check-config must not change anything)."""
    from pymta.servertls import check, tls_configured
    from pymta.tls import selfsigned_paths

    if tls_configured(config):
        material = check(config)
        if material.pairs:
            return material.summary()
        cert, key = selfsigned_paths(config)
        if cert.exists() and key.exists():
            return f"self-signed {cert}"
        return f"self-signed (generated at first start into {cert.parent})"
    return "off"


def _content_summary(config: Config) -> str:
    """The content filter in one line: scanners, checks, destinies."""
    if not config.content_filter:
        return "off"
    parts = [f"clamd {config.clamd}" if config.clamd else "no virus scan"]
    engine = config.spam_engine
    parts.append(f"{engine} {config.spamd or config.rspamd}" if engine else "no spam check")
    parts += [name for name, on in (("banned files", config.banned_check),
                                    ("bad headers", config.bad_header_check)) if on]
    destinies = " ".join(f"{kind}=D_{value.upper()}" for kind, value in (
        ("virus", config.final_virus_destiny), ("banned", config.final_banned_destiny),
        ("spam", config.final_spam_destiny), ("bad-header", config.final_bad_header_destiny)))
    return "; ".join(parts) + f"; {destinies}"


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args)
    _check(args, config)  # every adapter's settings and optional packages; builds nothing
    tls = _tls_summary(config)
    source = args.config or os.environ.get("PYMTA_CONFIG") or "none (environment only)"
    rows = [
        ("config file", source),
        ("hostname", config.hostname),
        ("domains", " ".join(config.mail_domain)),
        ("mailboxes", str(len(config.mail_boxes.split()))),
        ("aliases", str(len(config.mail_aliases.split()))),
        ("listeners", _listeners(config)),
        ("tls", tls),
        ("sasl", " ".join(config.sasl_methods) or "none"),
        ("mynetworks", " ".join(config.mynetworks) or "none"),
        ("state dir", config.state_dir),
        ("mail dir", config.mail_dir),
        ("workers", str(config.workers)),
        ("size limit", str(config.message_size_limit or "none")),
        ("local mail", config.virtual_transport or f"maildir/mbox under {config.mail_dir}"),
        ("remote mail", (f"smart host {config.smtp_relay}" if config.smtp_relay
                         else f"MX lookup, port {config.mx_port}")
         + f"; TLS {config.smtp_tls_security_level}"
         + (" (wrapper mode)" if config.smtp_tls_wrappermode and config.smtp_relay else "")),
        ("dns", " ".join(config.dns_resolver) or "system resolv.conf"),
        ("content", _content_summary(config)),
    ]
    print("pymta: configuration OK", file=out)
    for label, value in rows:
        print(f"  {label + ':':<13}{value}", file=out)
    return 0


def _health(args: argparse.Namespace, out: TextIO) -> int:
    import dataclasses

    from pymta.cli import health

    config = _load(args)
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    if not args.timeout > 0:
        raise _UsageError(f"health: --timeout must be more than zero: {args.timeout!r}")
    return health.run(config, args.json, args.timeout, out)


def _config_dump(args: argparse.Namespace, out: TextIO) -> int:
    """``config dump``: what ``serve`` would use (loaded and checked as it does), as TOML;
    with ``-o`` into a new file only the owner can read (it may hold secrets)."""
    from pymta.config.dump import dump_toml

    config = _load(args)
    _check(args, config)
    named = args.config or os.environ.get("PYMTA_CONFIG", "").strip()
    source = (f"the defaults, {named} and the environment" if named
              else "the defaults and the environment")
    text = dump_toml(config, show_secrets=args.show_secrets, source=source)
    if not args.output:
        out.write(text)
        return 0
    from pymta.files import replace_file

    replace_file(args.output, text.encode("utf-8"), 0o600)
    print(f"pymta: configuration written to {args.output}", file=sys.stderr)
    return 0


def _queue(args: argparse.Namespace) -> int:
    from pymta.cli import queue

    if (args.queue_command in ("delete", "hold", "release")
            and bool(args.ids) == bool(args.all)):
        raise _UsageError(f"queue {args.queue_command}: give message IDs or --all, "
                          "not both or neither")
    state_dir = args.state_dir or _load(args).state_dir
    return queue.run(args, state_dir)


def _quarantine(args: argparse.Namespace) -> int:
    from pymta.cli import quarantine

    state_dir = args.state_dir or _load(args).state_dir
    return quarantine.run(args, state_dir)


def _dkim(args: argparse.Namespace, out: TextIO) -> int:
    """``dkim show``: the records of the configured keys, made first when missing (as the
    server does at first start); ``dkim keygen``: new key files and records. The private key
    is never printed."""
    import dataclasses

    from pymta.config.load import load_config
    from pymta.config.load import parse_domains as _domains
    from pymta.pipeline.dkimkeys import KeyStore, record_path

    config = load_config(path=args.config)
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    domains = list(config.mail_domain)
    wanted = args.domain
    if wanted:
        chosen = _domains("DOMAIN", wanted)
        if len(chosen) != 1:
            raise _UsageError(f"dkim: one domain, please: {wanted!r}")
        if chosen[0] not in domains:
            raise _UsageError(f"dkim: {chosen[0]} is not one of MAIL_DOMAIN "
                              f"({' '.join(domains)})")
        domains = [chosen[0]]
    store = KeyStore.from_config(config)
    if args.dkim_command == "show":
        for domain in domains:
            key = store.get(domain)
            print(key.zone_line(), file=out)
        return 0
    from pymta.config.load import _dkim_keybits, _dkim_selector

    selector = _dkim_selector("--selector", args.selector) if args.selector else None
    bits = _dkim_keybits("--bits", args.bits) if args.bits else None
    if store.configured is not None:
        print("pymta: note: DKIM_PRIVATEKEY is set and signs instead of the new key file",
              file=sys.stderr)
    for domain in domains:
        key = store.generate(domain, selector=selector, algorithm=args.algorithm, bits=bits)
        print(f"; new key {store.state_dir}/dkim/{domain}.{key.selector}.key; publish "
              f"(also in {record_path(store.state_dir, domain, key.selector)}):", file=out)
        print(key.zone_line(), file=out)
    if selector and selector != config.dkim_selector:
        print(f"pymta: note: signing uses DKIM_SELECTOR={config.dkim_selector}; set "
              f"DKIM_SELECTOR={selector} to sign with the new key", file=sys.stderr)
    print("pymta: restart the server to sign with the new key", file=sys.stderr)
    return 0


class _UsageError(Exception):
    pass


# ------------------------------------------------------------------------------ entry point


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args, sys.stdout)
    if args.command == "health":
        return _health(args, sys.stdout)
    if args.command == "queue":
        if not args.queue_command:
            raise _UsageError("queue: which action? list, show, flush, delete, hold or "
                              "release (see 'pymta queue --help')")
        return _queue(args)
    if args.command == "quarantine":
        if not args.quarantine_command:
            raise _UsageError("quarantine: which action? list, show, release, delete or "
                              "expire (see 'pymta quarantine --help')")
        return _quarantine(args)
    if args.command == "dkim":
        if args.dkim_command not in ("show", "keygen"):
            raise _UsageError("dkim: which action? show or keygen (see 'pymta dkim --help')")
        return _dkim(args, sys.stdout)
    if args.command == "passwd":
        if args.passwd_command != "hash":
            raise _UsageError("passwd: which action? hash (see 'pymta passwd --help')")
        return _passwd_hash(args)
    if args.command == "config":
        if args.config_command != "dump":
            raise _UsageError("config: which action? dump (see 'pymta config --help')")
        return _config_dump(args, sys.stdout)
    if getattr(args, "handler", None) is not None:     # learn, tls: their own modules
        return int(args.handler(args))
    parser.print_help(sys.stderr)
    return EX_USAGE_OR_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to sys.exit)."""
    from pymta.cli.queue import QueueCommandError

    try:
        return _dispatch(argv)
    except ConfigError as exc:
        print(f"pymta: {exc}", file=sys.stderr)
        return EX_USAGE_OR_CONFIG
    except _UsageError as exc:
        print(f"pymta: {exc}", file=sys.stderr)
        return EX_USAGE_OR_CONFIG
    except QueueCommandError as exc:
        print(f"pymta: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pymta queue list | head`: the reader left; say nothing, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        if os.environ.get("PYMTA_TRACEBACK"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pymta: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("PYMTA_TRACEBACK"):
            raise
        print(f"pymta: internal error: {type(exc).__name__}: {exc} "
              "(set PYMTA_TRACEBACK=1 for details)", file=sys.stderr)
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
