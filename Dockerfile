# pymta: one image; pick integrations with the EXTRAS build argument, e.g.
#   docker build --build-arg EXTRAS=speed -t pymta .
#   docker run -p 25:25 -e MAIL_DOMAIN=example.com -e MAIL_BOXES="box@example.com:box/" \
#              -v pymta-data:/srv pymta
# slim-bookworm: the same Debian release the test suite runs on, without compilers; every
# runtime dependency (cryptography, uvloop) ships manylinux wheels, so nothing is built here.
FROM python:3.11-slim-bookworm

ARG EXTRAS=speed

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYMTA_STATE_DIR=/srv/state \
    PYMTA_MAIL_DIR=/srv/mail

# A fixed uid so volume ownership stays stable across rebuilds; a system user without a shell
# because nothing should ever log in as the MTA.
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
RUN pip install --no-cache-dir ".[${EXTRAS}]"

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
