"""The typed configuration of a pymta server: one frozen dataclass, built by ``load``.

Field names are the lower-case forms of the environment variables users know from
``mlan/postfix-amavis`` (``MAIL_DOMAIN`` → ``mail_domain``) or pymta's own ``PYMTA_*``
variables without the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RelayHost:
    """``SMTP_RELAY_HOSTAUTH``: the smart host. ``mx_lookup`` is False for ``[host]`` (as in
    Postfix: brackets mean "this host", no MX lookup). The password never appears in a repr."""

    host: str
    port: int = 25
    mx_lookup: bool = False
    username: str = ""
    password: str = field(default="", repr=False)

    def __str__(self) -> str:
        name = self.host if self.mx_lookup else f"[{self.host}]"
        return f"{name}:{self.port}" + (f" (AUTH as {self.username})" if self.username else "")


@dataclass(frozen=True, slots=True)
class Config:
    # identity and recipients
    hostname: str = "localhost"                      # MYHOSTNAME / the host's name (load)
    mail_domain: tuple[str, ...] = ()                # MAIL_DOMAIN (space separated)
    mail_boxes: str = ""                             # MAIL_BOXES (raw; parsed by the table backend)
    mail_aliases: str = ""                           # MAIL_ALIASES (raw)
    regex_alias: str = ""                            # REGEX_ALIAS (raw /pattern/ replacement rules)
    # directory lookups (backends/ldap.py, backends/mysql.py, backends/chain.py)
    ldap_host: str = ""                              # LDAP_HOST (name, host:port, ldap[s]:// URL)
    ldap_user_base: str = ""                         # LDAP_USER_BASE
    ldap_query_filter_user: str = ""                 # LDAP_QUERY_FILTER_USER
    ldap_query_attrs_user: str = "mail"              # LDAP_QUERY_ATTRS_USER (mailbox path attr)
    ldap_group_base: str = ""                        # LDAP_GROUP_BASE
    ldap_query_filter_alias: str = ""                # LDAP_QUERY_FILTER_ALIAS
    ldap_query_filter_group: str = ""                # LDAP_QUERY_FILTER_GROUP
    ldap_query_filter_expand: str = ""               # LDAP_QUERY_FILTER_EXPAND
    ldap_bind_dn: str = ""                           # LDAP_BIND_DN
    ldap_bind_pw: str = field(default="", repr=False)  # LDAP_BIND_PW
    ldap_tls_ca_file: str = ""                       # PYMTA_LDAP_TLS_CA_FILE (ldaps:// CA bundle)
    mysql_host: str = ""                             # MYSQL_HOST (host or host:port)
    mysql_database: str = ""                         # MYSQL_DATABASE
    mysql_user: str = ""                             # MYSQL_USER
    mysql_password: str = field(default="", repr=False)  # MYSQL_PASSWORD
    mysql_query_user: str = ""                       # MYSQL_QUERY_USER (Postfix-style, %s)
    mysql_query_alias: str = ""                      # MYSQL_QUERY_ALIAS
    lookup_cache_ttl: float = 60.0                   # PYMTA_LOOKUP_CACHE_TTL (0: no cache)
    lookup_negative_ttl: float = 30.0                # PYMTA_LOOKUP_NEGATIVE_TTL (unknown addrs)
    lookup_timeout: float = 5.0                      # PYMTA_LOOKUP_TIMEOUT (connect/query)
    # limits
    message_size_limit: int = 10240000               # MESSAGE_SIZE_LIMIT
    queue_minfree: int = 0                           # PYMTA_QUEUE_MINFREE (bytes; 452 at MAIL)
    max_recipients: int = 1000                       # PYMTA_MAX_RECIPIENTS
    max_errors: int = 20                             # PYMTA_MAX_ERRORS
    idle_timeout: float = 300.0                      # PYMTA_IDLE_TIMEOUT (seconds)
    shutdown_timeout: float = 30.0                   # PYMTA_SHUTDOWN_TIMEOUT (SIGTERM drain)
    max_connections: int = 2000                      # PYMTA_MAX_CONNECTIONS
    max_connections_per_ip: int = 50                 # PYMTA_MAX_CONNECTIONS_PER_IP
    connection_rate_limit: int = 0                   # PYMTA_CONNECTION_RATE_LIMIT (/IP/min, 0 off)
    max_line_length: int = 2048                      # PYMTA_LINE_LENGTH_LIMIT (commands)
    header_size_limit: int = 1048576                 # PYMTA_HEADER_SIZE_LIMIT (whole header)
    max_received_headers: int = 50                   # PYMTA_MAX_RECEIVED_HEADERS
    # listeners
    smtp_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 25),)
    submission_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 587),)
    submissions_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 465),)
    workers: int = 1                                 # PYMTA_WORKERS (load_config: one per core)
    metrics_listen: ListenAddress | None = None      # PYMTA_METRICS_LISTEN (Prometheus; None off)
    # TLS
    smtpd_use_tls: bool = False                      # SMTPD_USE_TLS
    smtpd_tls_cert_file: str = ""                    # SMTPD_TLS_CERT_FILE
    smtpd_tls_key_file: str = ""                     # SMTPD_TLS_KEY_FILE
    smtpd_tls_eccert_file: str = ""                  # SMTPD_TLS_ECCERT_FILE (ECDSA, beside RSA)
    smtpd_tls_eckey_file: str = ""                   # SMTPD_TLS_ECKEY_FILE
    smtpd_tls_dcert_file: str = ""                   # SMTPD_TLS_DCERT_FILE (DSA: not served)
    smtpd_tls_dkey_file: str = ""                    # SMTPD_TLS_DKEY_FILE
    smtpd_tls_chain_files: tuple[str, ...] = ()      # SMTPD_TLS_CHAIN_FILES (key then its chain)
    smtpd_tls_dh1024_param_file: str = ""            # SMTPD_TLS_DH1024_PARAM_FILE (DHE params)
    acme_file: str = "/acme/acme.json"               # ACME_FILE (Traefik's; absent: not used)
    acme_posthook: str = ""                          # ACME_POSTHOOK (shell, after a new ACME cert)
    # SMTP AUTH (submission ports listen only when at least one SASL method is configured)
    smtpd_sasl_clientauth: str = field(default="", repr=False)  # SMTPD_SASL_CLIENTAUTH
    sasl_passwd_file: str = ""                       # PYMTA_SASL_PASSWD_FILE (re-read on HUP)
    smtpd_sasl_imaphost: str = ""                    # SMTPD_SASL_IMAPHOST (host or host:port)
    ldap_query_attrs_pass: str = ""                  # LDAP_QUERY_ATTRS_PASS (uid=user)
    ldap_query_filter_pass: str = ""                 # LDAP_QUERY_FILTER_PASS (default: derived)
    mysql_query_pass: str = ""                       # MYSQL_QUERY_PASS (returns {SCHEME}hash)
    dovecot_auth_username_format: str = "%Lu"        # DOVECOT_AUTH_USERNAME_FORMAT (%Ln: no domain)
    auth_fail_delay: float = 0.5                     # PYMTA_AUTH_FAIL_DELAY (× failures per IP)
    auth_fail_delay_max: float = 5.0                 # PYMTA_AUTH_FAIL_DELAY_MAX
    # relay policy
    mynetworks: tuple[str, ...] = ()                 # MYNETWORKS (CIDR list; may relay w/o AUTH)
    proxy_protocol_from: tuple[str, ...] = ()        # PYMTA_PROXY_PROTOCOL_FROM (CIDRs)
    # paths
    state_dir: str = "./var"                         # PYMTA_STATE_DIR
    mail_dir: str = "/var/mail"                      # PYMTA_MAIL_DIR
    # queue
    queue_retry_first: float = 300.0                 # PYMTA_RETRY_FIRST (minimal_backoff_time)
    queue_retry_max: float = 4000.0                  # PYMTA_RETRY_MAX (maximal_backoff_time)
    queue_lifetime: float = 5 * 86400.0              # PYMTA_QUEUE_LIFETIME (maximal_queue_lifetime)
    delay_warning_time: float = 0.0                  # PYMTA_DELAY_WARNING_TIME (0: off; Postfix's)
    queue_scan_interval: float = 60.0                # PYMTA_QUEUE_SCAN_INTERVAL
    delivery_concurrency: int = 20                   # PYMTA_DELIVERY_CONCURRENCY
    hold_incoming: bool = False                      # PYMTA_HOLD_INCOMING (queue on hold)
    queue_store: str = "sqlite"                      # PYMTA_QUEUE_STORE sqlite|files
    # outbound delivery (SMTP client, LMTP, DNS)
    smtp_relay: RelayHost | None = None              # SMTP_RELAY_HOSTAUTH
    smtp_tls_security_level: str = "may"             # SMTP_TLS_SECURITY_LEVEL (tlspolicy.LEVELS)
    smtp_tls_wrappermode: bool = False               # SMTP_TLS_WRAPPERMODE (smart host only)
    smtp_tls_ca_file: str = ""                       # PYMTA_SMTP_TLS_CA_FILE (verify/secure roots)
    tls_policy: tuple[str, ...] = ()                 # PYMTA_TLS_POLICY "domain=level" ...
    mta_sts: bool = True                             # PYMTA_MTA_STS (RFC 8461 policies of MX mail)
    virtual_transport: str = ""                      # VIRTUAL_TRANSPORT lmtp:H:PORT, lmtp:unix:PATH
    dns_resolver: tuple[str, ...] = ()               # PYMTA_DNS_RESOLVER host:port (empty: system)
    dns_timeout: float = 5.0                         # PYMTA_DNS_TIMEOUT
    peername_lookup: bool = True                     # PYMTA_PEERNAME_LOOKUP (client PTR, FCrDNS)
    mx_port: int = 25                                # PYMTA_MX_PORT (MX and address next hops)
    destination_concurrency: int = 20                # PYMTA_DESTINATION_CONCURRENCY
    smtp_connect_timeout: float = 30.0               # PYMTA_SMTP_CONNECT_TIMEOUT
    smtp_timeout: float = 300.0                      # PYMTA_SMTP_TIMEOUT (each command/reply)
    connection_cache_time: float = 2.0               # PYMTA_CONNECTION_CACHE_TIME (idle reuse)
    connection_reuse_limit: int = 100                # PYMTA_CONNECTION_REUSE_LIMIT (msgs/conn)
    dead_host_time: float = 60.0                     # PYMTA_DEAD_HOST_TIME
    # pre-queue pipeline
    pipeline_timeout: float = 30.0                   # PYMTA_PIPELINE_TIMEOUT (per stage)
    # sender authentication of inbound mail (pymta/pipeline/spf.py, dmarc.py, authresults.py)
    spf_check: bool = True                           # PYMTA_SPF (SPF of untrusted clients)
    spf_reject_fail: bool = False                    # SPF_REJECT_FAIL (fail → 550 5.7.23)
    dmarc_check: bool = True                         # PYMTA_DMARC
    dmarc_enforce: bool = True                       # DMARC_ENFORCE (no: tag, never hold/reject)
    authserv_id: str = ""                            # PYMTA_AUTHSERV_ID (empty: hostname)
    # DKIM and ARC (pymta/pipeline/dkimverify.py, dkimsign.py, dkimkeys.py, arc.py)
    dkim_verify: bool = True                         # PYMTA_DKIM_VERIFY (inbound signatures)
    dkim_sign: bool = True                           # PYMTA_DKIM_SIGN (our users' mail)
    dkim_selector: str = "default"                   # DKIM_SELECTOR
    dkim_keybits: int = 2048                         # DKIM_KEYBITS (new RSA keys)
    dkim_algorithm: str = "rsa"                      # DKIM_ALGORITHM rsa|ed25519 (new keys)
    dkim_private_key: str = field(default="", repr=False)  # DKIM_PRIVATEKEY (PEM or base64)
    arc: bool = True                                 # PYMTA_ARC (verify chains, seal forwards)
    # SRS (sender rewriting of forwarded mail, PostSRSd's job; pymta/srs/)
    srs_enable: bool = True                          # SRS_ENABLE
    srs_domain: str = ""                             # SRS_DOMAIN (empty: first MAIL_DOMAIN)
    srs_secret: str = field(default="", repr=False)  # SRS_SECRET (empty: state dir file)
    srs_max_age: int = 21                            # SRS_MAX_AGE (days)
    # content filtering, the amavis part (pymta/content/)
    clamd: str = ""                                  # PYMTA_CLAMD unix:/path or host:port
    spamd: str = ""                                  # PYMTA_SPAMD (SpamAssassin's spamd)
    rspamd: str = ""                                 # PYMTA_RSPAMD (normal worker)
    rspamd_controller: str = ""                      # PYMTA_RSPAMD_CONTROLLER (learning)
    rspamd_password: str = field(default="", repr=False)  # PYMTA_RSPAMD_PASSWORD
    scanner_timeout: float = 20.0                    # PYMTA_SCANNER_TIMEOUT (one exchange)
    scanner_concurrency: int = 8                     # PYMTA_SCANNER_CONCURRENCY (per worker)
    virus_on_error: str = "tempfail"                 # PYMTA_VIRUS_ON_ERROR tempfail|pass
    spam_on_error: str = "pass"                      # PYMTA_SPAM_ON_ERROR pass|tempfail
    banned_check: bool = True                        # PYMTA_BANNED_CHECK
    banned_files: tuple[str, ...] = ()               # PYMTA_BANNED_FILES (+ext, +type/sub)
    allowed_files: tuple[str, ...] = ()              # PYMTA_ALLOWED_FILES (minus the same)
    bad_header_check: bool = True                    # PYMTA_BAD_HEADER_CHECK
    sa_tag_level_deflt: float | None = 2.0           # SA_TAG_LEVEL_DEFLT (X-Spam-* added)
    sa_tag2_level_deflt: float | None = 6.2          # SA_TAG2_LEVEL_DEFLT (X-Spam-Flag: YES)
    sa_kill_level_deflt: float | None = 6.9          # SA_KILL_LEVEL_DEFLT (spam destiny)
    spam_subject_tag: str = ""                       # PYMTA_SPAM_SUBJECT_TAG (at tag2 level)
    final_virus_destiny: str = "discard"             # FINAL_VIRUS_DESTINY D_PASS|D_BOUNCE|..
    final_banned_destiny: str = "discard"            # FINAL_BANNED_DESTINY
    final_spam_destiny: str = "pass"                 # FINAL_SPAM_DESTINY
    final_bad_header_destiny: str = "pass"           # FINAL_BAD_HEADER_DESTINY
    quarantine_lifetime: float = 30 * 86400.0        # PYMTA_QUARANTINE_LIFETIME (0: forever)
    kopano_spamd_lib: str = "/var/lib/kopano/spamd"  # KOPANO_SPAMD_LIB (spam/, ham/ taught)
    learn_interval: float = 10.0                     # PYMTA_LEARN_INTERVAL (folder polling)
    # logging
    syslog_level: int = 5                            # SYSLOG_LEVEL 0..7
    log_syslog: bool = False                         # PYMTA_LOG_SYSLOG
    log_json: bool = False                           # PYMTA_LOG_JSON
    log_format: str = ""                             # PYMTA_LOG_FORMAT postfix|json; "": LOG_JSON
    syslog_name: str = "postfix"                     # PYMTA_SYSLOG_NAME (Postfix's syslog_name)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def sasl_methods(self) -> tuple[str, ...]:
        """The SASL methods the variables activate, in the order they are tried (the image:
        a method is active when its required variables are set)."""
        methods = []
        if self.smtpd_sasl_clientauth.strip() or self.sasl_passwd_file:
            methods.append("passwd")
        if self.ldap_query_attrs_pass and getattr(self, "ldap_host", ""):
            methods.append("ldap")
        if self.mysql_query_pass and getattr(self, "mysql_host", ""):
            methods.append("mysql")
        if self.smtpd_sasl_imaphost:
            methods.append("imap")
        return tuple(methods)

    @property
    def spam_engine(self) -> str:
        """``spamd``, ``rspamd`` or empty: the one spam engine configured."""
        return "spamd" if self.spamd else "rspamd" if self.rspamd else ""

    @property
    def content_filter(self) -> bool:
        """Whether any content check is on (the ``content`` pipeline stage runs)."""
        return bool(self.clamd or self.spam_engine or self.banned_check
                    or self.bad_header_check)

    @property
    def first_domain(self) -> str:
        return self.mail_domain[0] if self.mail_domain else self.hostname

    @property
    def postmaster(self) -> str:
        return f"postmaster@{self.first_domain}"
