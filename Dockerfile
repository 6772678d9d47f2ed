# pymta in three variants, like mlan/postfix-amavis's tags; each stage adds to the one before
# and the last, `full`, is what a plain `docker build` makes:
#   docker build --target mini -t pymta:mini .  the core: MAIL_BOXES/MAIL_ALIASES tables, local
#                                               maildir/mbox, LMTP and relay delivery, queue,
#                                               TLS, SPF/DKIM/DMARC/ARC, SRS, password-file AUTH,
#                                               the clamd/spamd/rspamd clients (stdlib only)
#   docker build --target base -t pymta:base .  + LDAP and MySQL lookups and AUTH, IMAP AUTH
#                                               (SMTPD_SASL_IMAPHOST)
#   docker build -t pymta .                     full: + everything in the `all` extra (uvloop)
#   docker run -p 25:25 -e MAIL_DOMAIN=example.com -e MAIL_BOXES="box@example.com:box/" \
#              -v pymta-data:/srv pymta
# Unlike the image's `full`, no scanner daemon is inside: pymta talks to clamd, spamd and rspamd
# over the network (PYMTA_CLAMD, PYMTA_SPAMD, PYMTA_RSPAMD), so they run as containers of
# their own, each with its own updates and memory (demo/docker-compose.yml).
# slim-bookworm: the same Debian release the test suite runs on, without compilers; every
# runtime dependency ships manylinux wheels, so nothing is built here.
FROM python:3.11-slim-bookworm AS mini

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYMTA_STATE_DIR=/srv/state \
    PYMTA_MAIL_DIR=/srv/mail

# A fixed uid so volume ownership stays stable across rebuilds (and matches the mail uid of a
# Dovecot reading the same maildirs); a system user without a shell because nothing should
# ever log in as the MTA.
RUN groupadd --system --gid 5000 pymta \
    && useradd --system --uid 5000 --gid pymta --home-dir /srv --shell /usr/sbin/nologin pymta \
    && mkdir -p /srv/state /srv/mail \
    && chown -R pymta:pymta /srv

WORKDIR /opt/pymta
# Only what the build needs (see .dockerignore): a change to tests or benchmarks does not
# invalidate the install layer.
COPY pyproject.toml README.md* ./
COPY pymta ./pymta
COPY backends ./backends
COPY delivery ./delivery
# The local project is the thing installed; its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir .

# Runs unprivileged: Docker (>= 20.10) sets net.ipv4.ip_unprivileged_port_start=0 inside a
# container's network namespace, so binding 25/465/587 needs no root. With --network host
# that sysctl is the host's; then run with --user root or map high ports instead.
USER 5000:5000
WORKDIR /srv
VOLUME ["/srv"]
EXPOSE 25 465 587

# Healthy means every listener greets with 220 (what a peer MTA checks, not merely "port
# open"), the queue directory is writable and the configured scanners answer: `pymta health`.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-m", "pymta", "health", "--timeout", "4"]

ENTRYPOINT ["python", "-m", "pymta"]
CMD ["serve"]


FROM mini AS base
# Installing needs root; the server itself never runs as root (USER again below).
USER 0
WORKDIR /opt/pymta
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[imap,ldap,mysql]"
USER 5000:5000
WORKDIR /srv


FROM base AS full
USER 0
WORKDIR /opt/pymta
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[all]"
USER 5000:5000
WORKDIR /srv
