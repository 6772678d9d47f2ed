"""The wiring: which adapter fills which contract, chosen by name from the configuration.

This is the one module of the core that names adapters (``pymta.backends``,
``pymta.delivery``) and the pre-queue stages; ``pymta.app`` builds a server with it, and
``pymta check-config``, ``pymta serve`` and the worker supervisor check a configuration with
it (:func:`check`) without building anything. Everything else in the core knows the
contracts only (``pymta.contracts``). Adapters are imported when they are used, so a server
without LDAP never imports ``ldap3``.

Four tables map names to adapters, each entry an :class:`Adapter`: :data:`RECIPIENT_LOOKUPS`
(``table``, ``ldap``, ``mysql``), :data:`AUTHENTICATORS` (the SASL methods, in the order
``Config.sasl_methods`` names them), :data:`DELIVERY_AGENTS` (``local``, ``lmtp``,
``relay``) and :data:`PIPELINE_STAGES` (in pipeline order). An entry says when the
configuration turns the adapter on (``active``), which setting does (named in errors), which
optional package it needs and from which extra (a missing one is a configuration error:
``LDAP_HOST: needs the ldap3 package (pip install 'pymta-server[ldap]')``, exit 2, never an
``ImportError`` at run time), how to check its settings (``check``: pure, no connection,
thread or file) and how to build it (``build``).

Each adapter owns its settings: it reads them from the :class:`~pymta.config.model.Config`
in a ``from_config`` classmethod and checks them there (or in a ``check_config`` that builds
nothing), raising :class:`~pymta.config.errors.ConfigError` with a message that starts with
the variable's name. ``load_config`` parses values into types only; what a value means to an
adapter (an LDAP filter, a SQL template, a regular expression, a password scheme, a DKIM key)
is the adapter's to say.

**One recipient lookup** (:func:`recipient_lookup`). Whatever the sources are, configured
(the ``MAIL_BOXES``/``MAIL_ALIASES`` table, then LDAP, then MySQL) or given by a library user
(``MTA(config, lookups=[...])``: lookups, mappings or callables,
:mod:`pymta.callbacks`), they go into one :class:`~pymta.backends.chain.LookupChain` (first
source that knows an address wins, aliases resolve across sources, a cache, expansion
limits). Around it, from the inside out: ``REGEX_ALIAS`` (a rewritten address is looked up
in the chain, the original when nobody knows the rewritten one), then the SRS reverse lookup
(``SRS0=...@srs-domain`` addresses, everything else passes through). The session (RCPT) and
the queue manager (recipients of DSNs) ask that one object.

Shared per server (:class:`Services`): the DNS resolver (``PYMTA_DNS_RESOLVER``: SPF, DKIM,
ARC, DMARC and MX lookups all use it; no process-wide resolver), the client-name lookup
(:class:`~pymta.peername.PeerNameResolver`: its cache is the server's), the SRS codec, the
DKIM key store. Building them does no I/O.

Adding an adapter: write it against its contract, give it ``from_config`` (and
``check_config`` when checking its settings needs no object), add an entry to its table
here (and the setting to ``pymta.config``), and a test that builds it from a Config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymta.callbacks import AgentLike, LookupLike, as_delivery_agent, as_recipient_lookup
from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.contracts import (
    Authenticator,
    DeliveryAgent,
    NoticeSigner,
    Probeable,
    RecipientLookup,
    Router,
)
from pymta.dns import DNSResolver
from pymta.peername import PeerNameResolver
from pymta.srs import SRS
from pymta.srs import build as build_srs

if TYPE_CHECKING:
    from pymta.pipeline import Pipeline
    from pymta.pipeline.dkimkeys import KeyStore

__all__ = ["AUTHENTICATORS", "DELIVERY_AGENTS", "PIPELINE_STAGES", "RECIPIENT_LOOKUPS",
           "Adapter", "Services", "backend_probes", "build_authenticator", "build_pipeline",
           "build_router", "check", "hash_password", "notice_signer", "recipient_lookup"]


# --------------------------------------------------------------------------- the entries


@dataclass(frozen=True, slots=True)
class Adapter:
    """One adapter by name.

    ``active(config)``: whether the configuration turns it on. ``variable``: the setting that
    does (errors about the adapter as a whole name it). ``requires``: ``(import name, package,
    extra)`` of each optional dependency. ``check(config)``: checks its settings, building
    nothing; ``build(config, services)``: the object.
    """

    name: str
    variable: str
    active: Callable[[Config], bool]
    build: Callable[[Config, Services], Any]
    check: Callable[[Config], None] | None = None
    requires: tuple[tuple[str, str, str], ...] = ()

    def require(self) -> None:
        """ConfigError naming :attr:`variable` and the extra to install when an optional
        dependency cannot be imported."""
        for module, package, extra in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"{self.variable}: needs the {package} package "
                                  f"(pip install 'pymta-server[{extra}]')") from None


@dataclass(slots=True)
class Services:
    """What the adapters of one server share, made once per ``MTA`` from its Config, without
    I/O: its DNS resolver, its SRS codec (None with ``SRS_ENABLE=no``; the secret is read at
    start), its DKIM/ARC key store (None when neither signs; keys are made at start) and
    its client-name lookup (through that DNS resolver when ``PYMTA_DNS_RESOLVER`` is set;
    None: every client is ``unknown``, for services made without a Config)."""

    dns: DNSResolver
    srs: SRS | None = None
    dkim_keys: KeyStore | None = None
    local_domains: frozenset[str] = field(default_factory=frozenset)
    peer_names: PeerNameResolver | None = None

    @classmethod
    def from_config(cls, config: Config) -> Services:
        srs = build_srs(config)
        keys = None
        if config.dkim_sign or config.arc:
            from pymta.pipeline.dkimkeys import KeyStore

            keys = KeyStore.from_config(config)
        domains = frozenset(d.lower() for d in config.mail_domain)
        if srs is not None:     # the SRS domain is one we accept mail for
            domains |= {srs.domain}
        dns = DNSResolver.from_config(config)
        return cls(dns, srs, keys, domains, PeerNameResolver.from_config(config, dns))


def _class(path: str) -> Any:
    """The class at ``module.Name``, imported now (adapters are imported when used)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _by_class(path: str) -> tuple[Callable[[Config, Services], Any], Callable[[Config], None]]:
    """``build`` and ``check`` of an adapter class that has ``from_config(config)`` and
    ``check_config(config)``."""
    return (lambda config, services: _class(path).from_config(config),
            lambda config: _class(path).check_config(config))


def _always(config: Config) -> bool:
    return True


_LDAP = (("ldap3", "ldap3", "ldap"),)
_MYSQL = (("aiomysql", "aiomysql", "mysql"),)
_IMAP = (("aioimaplib", "aioimaplib", "imap"),)


# --------------------------------------------------------------------------- recipient lookups


def _table(config: Config, services: Services) -> RecipientLookup:
    from pymta.backends.table import TableLookup

    # with a directory too, a local alias target missing from the table is left to the chain
    return TableLookup.from_config(config, other_sources=bool(config.ldap_host
                                                              or config.mysql_host))


def _check_table(config: Config) -> None:
    _table(config, Services(DNSResolver()))     # a pure parse of the two variables


def _check_mysql(config: Config) -> None:
    _class("pymta.backends.mysql.MysqlLookup").check_config(config)


#: The recipient sources, in the order the chain asks them.
RECIPIENT_LOOKUPS: Mapping[str, Adapter] = {
    "table": Adapter("table", "MAIL_BOXES", _always, _table, _check_table),
    "ldap": Adapter("ldap", "LDAP_HOST", lambda c: bool(c.ldap_host),
                    *_by_class("pymta.backends.ldap.LdapLookup"), _LDAP),
    # the check runs whenever a MYSQL_* query is set: a typo stops start-up even unused
    "mysql": Adapter("mysql", "MYSQL_HOST", lambda c: bool(c.mysql_host),
                     *_by_class("pymta.backends.mysql.MysqlLookup"), _MYSQL),
}


def _check_regex(config: Config) -> None:
    from pymta.backends.regex import RegexRewrite

    RegexRewrite.check_config(config)


def recipient_lookup(config: Config, sources: Sequence[LookupLike] | LookupLike | None = None,
                     *, services: Services | None = None) -> RecipientLookup:
    """The server's one recipient lookup (module docstring): ``sources`` (None: the
    configured ones; a single lookup, mapping or callable counts as a list of one) in one
    :class:`~pymta.backends.chain.LookupChain` with the configured cache and limits, inside
    ``REGEX_ALIAS`` when it is set, inside the SRS reverse lookup when ``services`` carry an
    SRS codec (the server's, shared with the pipeline's SRS stage). A single source that is
    a LookupChain already is used as the chain, with its own cache and limits."""
    from pymta.backends.chain import LookupChain

    services = services if services is not None else Services(DNSResolver())
    if sources is None:
        chosen = [a for a in RECIPIENT_LOOKUPS.values() if a.active(config)]
        for adapter in chosen:
            adapter.require()
        found: list[RecipientLookup] = [a.build(config, services) for a in chosen]
    elif isinstance(sources, Sequence) and not isinstance(sources, str):
        found = [as_recipient_lookup(s) for s in sources]
    else:
        found = [as_recipient_lookup(sources)]
    lookup: RecipientLookup
    if len(found) == 1 and isinstance(found[0], LookupChain):
        lookup = found[0]
    else:
        lookup = LookupChain(found, config.mail_domain, ttl=config.lookup_cache_ttl,
                             negative_ttl=config.lookup_negative_ttl)
    if config.regex_alias:
        from pymta.backends.regex import RegexRewrite

        lookup = RegexRewrite.from_config(config, lookup)
    if services.srs is not None:
        from pymta.srs.reverse import SRSLookup

        lookup = SRSLookup(services.srs, services.local_domains, lookup)
    return lookup


# --------------------------------------------------------------------------- authenticators


#: The SASL methods by the names ``Config.sasl_methods`` gives, tried in that order.
AUTHENTICATORS: Mapping[str, Adapter] = {
    "passwd": Adapter("passwd", "SMTPD_SASL_CLIENTAUTH", lambda c: "passwd" in c.sasl_methods,
                      *_by_class("pymta.backends.passwd.PasswordFile")),
    "ldap": Adapter("ldap", "LDAP_QUERY_ATTRS_PASS", lambda c: "ldap" in c.sasl_methods,
                    *_by_class("pymta.backends.ldapauth.LdapBindAuthenticator"), _LDAP),
    "mysql": Adapter("mysql", "MYSQL_QUERY_PASS", lambda c: "mysql" in c.sasl_methods,
                     *_by_class("pymta.backends.mysqlauth.MysqlAuthenticator"), _MYSQL),
    "imap": Adapter("imap", "SMTPD_SASL_IMAPHOST", lambda c: "imap" in c.sasl_methods,
                    *_by_class("pymta.backends.imapauth.ImapAuthenticator"), _IMAP),
}


def _check_username_format(config: Config) -> None:
    from pymta.backends.authchain import AuthChain

    AuthChain.check_config(config)


def build_authenticator(config: Config) -> Authenticator | None:
    """The SASL methods the configuration turns on, in order, as one
    :class:`~pymta.backends.authchain.AuthChain` (which applies
    ``DOVECOT_AUTH_USERNAME_FORMAT``); None when there is none (no submission ports)."""
    chosen = [AUTHENTICATORS[name] for name in config.sasl_methods]
    if not chosen:
        return None
    for adapter in chosen:
        adapter.require()
    from pymta.backends.authchain import AuthChain

    services = Services(DNSResolver())
    return AuthChain([a.build(config, services) for a in chosen],
                     config.dovecot_auth_username_format)


# --------------------------------------------------------------------------- health


#: The adapters with a service behind them, by name, and the setting whose value their health
#: line shows (where the service is). An adapter that gains a ``probe`` is added here.
_WHERE = {"ldap": "ldap_host", "mysql": "mysql_host", "imap": "smtpd_sasl_imaphost"}


def backend_probes(config: Config) -> list[tuple[str, Probeable]]:
    """``pymta health``'s backends: every recipient source and SASL method the configuration
    turns on that can be asked whether its service answers (:class:`~pymta.contracts.Probeable`:
    LDAP, MySQL, remote IMAP; a table or password file has no service), built now as the
    server builds them (no I/O), each with the name its health line shows (``ldap lookup
    ldap://auth:389``, ``imap auth app:143``). The caller probes each and closes it.

    Delivery targets (``VIRTUAL_TRANSPORT``, ``SMTP_RELAY_HOSTAUTH``) are not here on
    purpose: one that is down defers mail, which the queue keeps; the server still accepts
    mail, so it is healthy (the queue and the delivery log tell that story)."""
    services = Services(DNSResolver())
    out: list[tuple[str, Probeable]] = []
    chosen = [("lookup", a) for a in RECIPIENT_LOOKUPS.values() if a.active(config)]
    chosen += [("auth", AUTHENTICATORS[name]) for name in config.sasl_methods]
    for role, adapter in chosen:
        if adapter.name not in _WHERE:      # a table, a password file: nothing to ask
            continue
        adapter.require()
        built = adapter.build(config, services)
        if isinstance(built, Probeable):
            out.append((f"{adapter.name} {role} {getattr(config, _WHERE[adapter.name])}",
                        built))
    return out


def hash_password(password: str, scheme: str) -> str:
    """``pymta passwd hash``: ``{SCHEME}hash`` for ``SMTPD_SASL_CLIENTAUTH`` (the password
    file's schemes). ValueError for a scheme it does not make."""
    from pymta.backends.passwd import hash_password as make

    return make(password, scheme)


# --------------------------------------------------------------------------- delivery


def _local(config: Config, services: Services) -> DeliveryAgent:
    from pymta.delivery.local import LocalDeliveryAgent

    return LocalDeliveryAgent.from_config(config)


def _lmtp(config: Config, services: Services) -> DeliveryAgent:
    from pymta.delivery.lmtp import LMTPDeliveryAgent

    return LMTPDeliveryAgent.from_config(config)


def _relay(config: Config, services: Services) -> DeliveryAgent:
    from pymta.delivery.relay import SMTPRelayAgent

    return SMTPRelayAgent.from_config(config, resolver=services.dns)


#: Transports: ``local`` (maildir/mbox) or ``lmtp`` (``VIRTUAL_TRANSPORT``) for local
#: recipients, ``relay`` (smart host or MX) for the others.
DELIVERY_AGENTS: Mapping[str, Adapter] = {
    "local": Adapter("local", "PYMTA_MAIL_DIR", lambda c: not c.virtual_transport, _local),
    "lmtp": Adapter("lmtp", "VIRTUAL_TRANSPORT", lambda c: bool(c.virtual_transport), _lmtp),
    "relay": Adapter("relay", "SMTP_RELAY_HOSTAUTH", _always, _relay),
}


def build_router(config: Config, services: Services, *,
                 agent: AgentLike | None = None) -> Router:
    """Local recipients to ``agent`` (a library user's; :mod:`pymta.callbacks`) or else the
    configured local transport, remote recipients to the relay, keyed for batching."""
    from pymta.delivery.relay import SMTPRelayAgent
    from pymta.delivery.router import StaticRouter

    if agent is not None:
        local, key = as_delivery_agent(agent), "local"
    else:
        name = "lmtp" if DELIVERY_AGENTS["lmtp"].active(config) else "local"
        local, key = DELIVERY_AGENTS[name].build(config, services), name
    relay = DELIVERY_AGENTS["relay"].build(config, services)
    assert isinstance(relay, SMTPRelayAgent)
    return StaticRouter(local, relay, local_key=key, remote_key=relay.destination)


# --------------------------------------------------------------------------- pipeline stages


def _spf(config: Config, services: Services) -> Any:
    from pymta.pipeline.spf import SPFCheck

    return SPFCheck(receiver=config.hostname, reject_fail=config.spf_reject_fail,
                    timeout=max(1.0, min(20.0, config.pipeline_timeout - 1.0)),
                    resolver=services.dns)


def _dkim_verify(config: Config, services: Services) -> Any:
    from pymta.pipeline.dkimverify import DkimVerify

    return DkimVerify(resolver=services.dns)


def _arc_verify(config: Config, services: Services) -> Any:
    from pymta.pipeline.arc import ArcVerify

    return ArcVerify(resolver=services.dns)


def _dmarc(config: Config, services: Services) -> Any:
    from pymta.pipeline.dmarc import DMARCCheck

    return DMARCCheck(enforce=config.dmarc_enforce, resolver=services.dns)


def _authresults(config: Config, services: Services) -> Any:
    from pymta.pipeline.authresults import AuthResultsModifier

    return AuthResultsModifier(config.authserv_id or config.hostname)


def _arc_seal(config: Config, services: Services) -> Any:
    from pymta.pipeline.arc import ArcSeal

    assert services.dkim_keys is not None
    return ArcSeal(services.dkim_keys, config.first_domain,
                   config.authserv_id or config.hostname)


def _dkim_sign(config: Config, services: Services) -> Any:
    from pymta.pipeline.dkimsign import DkimSign

    assert services.dkim_keys is not None
    return DkimSign(services.dkim_keys, config.first_domain)


def _check_dkim_key(config: Config) -> None:
    from pymta.pipeline.dkimkeys import KeyStore

    KeyStore.check_config(config)


def _srs_rewrite(config: Config, services: Services) -> Any:
    from pymta.srs.rewrite import SRSRewrite

    assert services.srs is not None
    return SRSRewrite(services.srs)


def _content_policy(config: Config) -> Any:
    from pymta.content.filter import BAD_HEADER, BANNED, SPAM, VIRUS, ContentPolicy

    return ContentPolicy(
        hostname=config.hostname, tag_level=config.sa_tag_level_deflt,
        tag2_level=config.sa_tag2_level_deflt, kill_level=config.sa_kill_level_deflt,
        destinies={VIRUS: config.final_virus_destiny, BANNED: config.final_banned_destiny,
                   SPAM: config.final_spam_destiny, BAD_HEADER: config.final_bad_header_destiny},
        virus_on_error=config.virus_on_error, spam_on_error=config.spam_on_error,
        subject_tag=config.spam_subject_tag)


def _scanner_timeout(config: Config) -> float:
    """A scanner's deadline: inside the pipeline's, so that the on-error policy, not the
    framework's timeout, decides what a hung scanner means."""
    return max(1.0, min(config.scanner_timeout, config.pipeline_timeout - 1.0))


def _content(config: Config, services: Services) -> Any:
    from pymta.content.badheader import BadHeader
    from pymta.content.banned import BannedFiles
    from pymta.content.clamd import ClamdClient
    from pymta.content.filter import ContentCheck

    timeout = _scanner_timeout(config)
    virus = (ClamdClient(config.clamd, timeout=timeout,
                         max_in_flight=config.scanner_concurrency) if config.clamd else None)
    banned = None
    if config.banned_check:
        banned = BannedFiles(
            extra_extensions=[w for w in config.banned_files if "/" not in w],
            extra_types=[w for w in config.banned_files if "/" in w],
            allowed_extensions=[w for w in config.allowed_files if "/" not in w],
            allowed_types=[w for w in config.allowed_files if "/" in w],
            max_bytes=max(config.message_size_limit, 1 << 20) * 2)
    return ContentCheck(policy=_content_policy(config), virus=virus,
                        spam=_spam_engine(config, timeout),
                        banned=banned,
                        bad_header=BadHeader() if config.bad_header_check else None)


def _spam_engine(config: Config, timeout: float) -> Any:
    """The one spam engine (``PYMTA_SPAMD`` or ``PYMTA_RSPAMD``) as the check scores with it;
    None without one. Its client is built as the learning folders' is (``spam_client``),
    with a deadline inside the pipeline's."""
    from pymta.content import filter as content
    from pymta.content.learn import spam_client
    from pymta.content.spamd import SpamdClient

    client = spam_client(config, timeout)
    if client is None:
        return None
    if isinstance(client, SpamdClient):
        return content.SpamdEngine(client)
    return content.RspamdEngine(client)


def _check_content(config: Config) -> None:
    """Scanner addresses parse (``unix:/path``, ``host:port``): a typo stops start-up."""
    from pymta.content.learn import spam_client
    from pymta.content.netio import parse_address

    if config.clamd:
        try:
            parse_address(config.clamd)
        except ValueError as exc:
            raise ConfigError(f"PYMTA_CLAMD: {exc}") from None
    spam_client(config)     # builds a client object only: no connection


def _content_tags(config: Config, services: Services) -> Any:
    from pymta.content.filter import ContentTags

    return ContentTags(_content_policy(config))


#: The pre-queue stages in the order they run. Checks first: SPF and DKIM before DMARC, which
#: reads their results; ARC verification after DKIM; the content filter last among the checks.
#: Then the modifiers:
#: Authentication-Results after every check, the content filter's header fields, ARC seal
#: above the A-R it attests, DKIM signing over the final header block
#: (``pymta/pipeline/arc.py`` explains the order), SRS last, since it changes the envelope
#: sender the others saw as given.
PIPELINE_STAGES: Mapping[str, Adapter] = {
    "spf": Adapter("spf", "PYMTA_SPF", lambda c: c.spf_check, _spf),
    "dkim": Adapter("dkim", "PYMTA_DKIM_VERIFY", lambda c: c.dkim_verify, _dkim_verify),
    "arc": Adapter("arc", "PYMTA_ARC", lambda c: c.arc, _arc_verify),
    "dmarc": Adapter("dmarc", "PYMTA_DMARC", lambda c: c.dmarc_check, _dmarc),
    "content": Adapter("content", "PYMTA_CLAMD", lambda c: c.content_filter, _content,
                       _check_content),
    "authresults": Adapter("authresults", "PYMTA_AUTHSERV_ID", _always, _authresults),
    "content-tags": Adapter("content-tags", "PYMTA_SPAMD", lambda c: c.content_filter,
                            _content_tags),
    "arc-seal": Adapter("arc-seal", "PYMTA_ARC", lambda c: c.arc, _arc_seal),
    "dkim-sign": Adapter("dkim-sign", "PYMTA_DKIM_SIGN", lambda c: c.dkim_sign, _dkim_sign),
    "srs": Adapter("srs", "SRS_ENABLE", lambda c: c.srs_enable, _srs_rewrite),
}


def build_pipeline(config: Config, services: Services | None = None) -> Pipeline:
    """The configured stages (:data:`PIPELINE_STAGES`) under ``PYMTA_PIPELINE_TIMEOUT``."""
    from pymta.contracts import Check, Modifier
    from pymta.pipeline import Pipeline

    services = services if services is not None else Services.from_config(config)
    checks: list[Check] = []
    modifiers: list[Modifier] = []
    for adapter in PIPELINE_STAGES.values():
        if adapter.active(config):
            stage = adapter.build(config, services)
            if isinstance(stage, Check):
                checks.append(stage)
            else:
                modifiers.append(stage)
    return Pipeline(checks, modifiers, timeout=config.pipeline_timeout)


def notice_signer(config: Config, services: Services) -> NoticeSigner | None:
    """What DKIM-signs the DSNs the queue manager writes (issue 15): the keys of the
    ``dkim-sign`` stage, for the same domains (``MAIL_DOMAIN``, whose keys are made at
    start) and their subdomains (the notices come from ``MAILER-DAEMON@MYHOSTNAME``); None
    when ``PYMTA_DKIM_SIGN`` is off, and the notices go out unsigned as before."""
    if not config.dkim_sign or services.dkim_keys is None or not config.mail_domain:
        return None
    from pymta.pipeline.dkimsign import FromDomainSigner

    return FromDomainSigner(services.dkim_keys, config.mail_domain)


# --------------------------------------------------------------------------- checking


def check(config: Config) -> None:
    """Check every adapter setting of ``config`` and the optional packages the active
    adapters need, building nothing (no connection, thread, file or key): what ``pymta
    check-config``, ``pymta serve`` and the worker supervisor run before starting. Raises
    ConfigError naming the variable."""
    # Settings an adapter owns are checked whenever they are set, used or not (a typo
    # stops start-up either way), as load_config checked them before the adapters did.
    if config.regex_alias:
        _check_regex(config)
    for table in (RECIPIENT_LOOKUPS, AUTHENTICATORS, DELIVERY_AGENTS, PIPELINE_STAGES):
        for adapter in table.values():
            if adapter.active(config):
                adapter.require()
                if adapter.check is not None:
                    adapter.check(config)
    if not RECIPIENT_LOOKUPS["mysql"].active(config):
        _check_mysql(config)            # MYSQL_QUERY_* set without MYSQL_HOST
    _check_username_format(config)      # DOVECOT_AUTH_USERNAME_FORMAT, SASL or not
    _check_dkim_key(config)             # DKIM_PRIVATEKEY, signing or not

