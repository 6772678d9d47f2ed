"""Real services for pymta's integration tests, started by the tests themselves.

See ``tests/services/README.md``. Pytest fixtures are in ``tests/integration/conftest.py``.
"""

from .base import Service, ServiceError, free_port, stop_all
from .dns import DNSTestServer
from .dovecot import DovecotServer
from .mariadb import MariaDBServer
from .postfix_peer import PostfixPeer
from .slapd import SlapdServer
from .tls import make_self_signed

__all__ = [
    "DNSTestServer",
    "DovecotServer",
    "MariaDBServer",
    "PostfixPeer",
    "Service",
    "ServiceError",
    "SlapdServer",
    "free_port",
    "make_self_signed",
    "stop_all",
]
