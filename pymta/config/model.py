"""The typed configuration of a pymta server: one frozen dataclass, built by ``load``.

Field names are the lower-case forms of the environment variables users know from the seed
(``MAIL_DOMAIN`` → ``mail_domain``) or pymta's own ``PYMTA_*`` variables without the prefix.
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
class Config:
    # identity and recipients
    hostname: str = "localhost"                      # MYHOSTNAME / socket.getfqdn()
    mail_domain: tuple[str, ...] = ()                # MAIL_DOMAIN (space separated)
    mail_boxes: str = ""                             # MAIL_BOXES (raw; parsed by the table backend)
    mail_aliases: str = ""                           # MAIL_ALIASES (raw)
    # limits
    message_size_limit: int = 10240000               # MESSAGE_SIZE_LIMIT
    max_recipients: int = 1000                       # PYMTA_MAX_RECIPIENTS
    max_errors: int = 20                             # PYMTA_MAX_ERRORS
    idle_timeout: float = 300.0                      # PYMTA_IDLE_TIMEOUT (seconds)
    max_connections: int = 2000                      # PYMTA_MAX_CONNECTIONS
    max_connections_per_ip: int = 50                 # PYMTA_MAX_CONNECTIONS_PER_IP
    max_line_length: int = 2048                      # PYMTA_LINE_LENGTH_LIMIT (commands)
    header_size_limit: int = 1048576                 # PYMTA_HEADER_SIZE_LIMIT (whole header)
    max_received_headers: int = 50                   # PYMTA_MAX_RECEIVED_HEADERS
    # listeners
    smtp_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 25),)
    submission_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 587),)
    submissions_listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 465),)
    workers: int = 1                                 # PYMTA_WORKERS
    # TLS
    smtpd_use_tls: bool = False                      # SMTPD_USE_TLS
    smtpd_tls_cert_file: str = ""                    # SMTPD_TLS_CERT_FILE
    smtpd_tls_key_file: str = ""                     # SMTPD_TLS_KEY_FILE
    # SASL (methods added by the AUTH issue; submission ports listen only when non-empty)
    sasl_methods: tuple[str, ...] = ()
    # paths
    state_dir: str = "./var"                         # PYMTA_STATE_DIR
    mail_dir: str = "/var/mail"                      # PYMTA_MAIL_DIR
    # queue
    queue_retry_first: float = 300.0                 # PYMTA_RETRY_FIRST (minimal_backoff_time)
    queue_retry_max: float = 4000.0                  # PYMTA_RETRY_MAX (maximal_backoff_time)
    queue_lifetime: float = 5 * 86400.0              # PYMTA_QUEUE_LIFETIME (maximal_queue_lifetime)
    queue_scan_interval: float = 60.0                # PYMTA_QUEUE_SCAN_INTERVAL
    delivery_concurrency: int = 20                   # PYMTA_DELIVERY_CONCURRENCY
    # logging
    syslog_level: int = 5                            # SYSLOG_LEVEL 0..7
    log_syslog: bool = False                         # PYMTA_LOG_SYSLOG
    log_json: bool = False                           # PYMTA_LOG_JSON
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def first_domain(self) -> str:
        return self.mail_domain[0] if self.mail_domain else self.hostname

    @property
    def postmaster(self) -> str:
        return f"postmaster@{self.first_domain}"
