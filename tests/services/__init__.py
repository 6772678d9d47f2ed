"""Real services for pymta's integration tests, started by the tests themselves.

See ``tests/services/README.md``. Pytest fixtures are in ``tests/integration/conftest.py``.
"""

from .base import Service, ServiceError, free_port, stop_all
from .clamd import ClamdServer
from .dns import DNSTestServer
from .dovecot import DovecotServer
from .haproxy import HAProxy
from .mariadb import MariaDBServer
from .postfix_peer import PostfixPeer
from .redis import RedisServer
from .rspamd import RspamdServer
from .slapd import SlapdServer
from .spamd import SpamdServer
from .tls import make_self_signed

__all__ = [
    "ClamdServer",
    "DNSTestServer",
    "DovecotServer",
    "HAProxy",
    "MariaDBServer",
    "PostfixPeer",
    "RedisServer",
    "RspamdServer",
    "Service",
    "ServiceError",
    "SlapdServer",
    "SpamdServer",
    "free_port",
    "make_self_signed",
    "stop_all",
]
