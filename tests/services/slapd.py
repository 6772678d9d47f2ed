"""A throwaway OpenLDAP slapd (``slapd -f slapd.conf``, back_mdb) with the pymta test directory.

Data: ``dc=example,dc=com``; people under ``ou=people`` (alice: {SSHA} password from
``slappasswd``; bob: cleartext), aliases in ``mailLocalAddress``, posixGroup ``cn=staff`` and
groupOfNames ``cn=list`` under ``ou=groups``. Admin: ``cn=admin,dc=example,dc=com`` / ``adminpw``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .base import Service, ServiceError, choose_port, require_binary, run, wait_until

PORT_ENV = "PYMTA_TEST_SLAPD_PORT"
DEFAULT_PORT = 3389

SLAPD_CONF = """\
include         /etc/ldap/schema/core.schema
include         /etc/ldap/schema/cosine.schema
include         /etc/ldap/schema/inetorgperson.schema
include         /etc/ldap/schema/nis.schema
include         /etc/ldap/schema/misc.schema

pidfile         {T}/run/slapd.pid
argsfile        {T}/run/slapd.args
modulepath      /usr/lib/ldap
moduleload      back_mdb

database        mdb
maxsize         16777216
suffix          "{base_dn}"
rootdn          "{admin_dn}"
rootpw          {admin_password}
directory       {T}/db
index           objectClass eq
index           uid,mail,mailLocalAddress,memberUid eq

access to attrs=userPassword
        by self write
        by anonymous auth
        by * none
access to *
        by * read
"""

DATA_LDIF = """\
dn: dc=example,dc=com
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=com
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=com
objectClass: organizationalUnit
ou: groups

dn: uid=alice,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
objectClass: posixAccount
objectClass: inetLocalMailRecipient
uid: alice
cn: Alice Example
sn: Example
mail: alice@example.com
mailLocalAddress: alice.alias@example.com
mailLocalAddress: postmaster@example.com
uidNumber: 10001
gidNumber: 10000
homeDirectory: /home/alice
loginShell: /bin/false
userPassword: {alice_hash}

dn: uid=bob,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
objectClass: posixAccount
objectClass: inetLocalMailRecipient
uid: bob
cn: Bob Example
sn: Example
mail: bob@example.com
mailLocalAddress: robert@example.com
uidNumber: 10002
gidNumber: 10000
homeDirectory: /home/bob
loginShell: /bin/false
userPassword: bobpw

dn: cn=staff,ou=groups,dc=example,dc=com
objectClass: posixGroup
cn: staff
gidNumber: 10000
memberUid: alice
memberUid: bob

dn: cn=list,ou=groups,dc=example,dc=com
objectClass: groupOfNames
cn: list
member: uid=alice,ou=people,dc=example,dc=com
member: uid=bob,ou=people,dc=example,dc=com
"""

# Anonymous LDAPv3 simple bind, message id 1, and the start of a success BindResponse.
_ANON_BIND = bytes.fromhex("300c020101600702010304008000")
_BIND_RESP = bytes.fromhex("02010161")  # msgid 1, [APPLICATION 1] BindResponse
_RESULT_OK = bytes.fromhex("0a0100")  # resultCode ENUMERATED 0 (success)


class SlapdServer(Service):
    """OpenLDAP on ``ldap://127.0.0.1:PORT`` (default 3389, env ``PYMTA_TEST_SLAPD_PORT``)."""

    name = "slapd"
    stop_timeout = 10.0

    host = "127.0.0.1"
    base_dn = "dc=example,dc=com"
    people_dn = "ou=people,dc=example,dc=com"
    groups_dn = "ou=groups,dc=example,dc=com"
    admin_dn = "cn=admin,dc=example,dc=com"
    admin_password = "adminpw"
    # uid -> (dn, password, mail, aliases)
    users = {
        "alice": ("uid=alice,ou=people,dc=example,dc=com", "alicepw", "alice@example.com",
                  ("alice.alias@example.com", "postmaster@example.com")),
        "bob": ("uid=bob,ou=people,dc=example,dc=com", "bobpw", "bob@example.com",
                ("robert@example.com",)),
    }

    def __init__(self, port: int | None = None, base_dir: str | os.PathLike[str] | None = None):
        super().__init__(base_dir)
        self._want_port = port
        self.port = 0
        self.url = ""
        self.alice_hash = ""

    def log_paths(self) -> list[Path]:
        return [self.dir / "slapd.log"]

    def _start(self) -> None:
        slapd = require_binary("slapd", "slapd")
        slappasswd = require_binary("slappasswd", "slapd")
        slapadd = require_binary("slapadd", "slapd")
        self.port, self.ports_fixed = choose_port(PORT_ENV, DEFAULT_PORT, self._want_port)
        self.url = f"ldap://{self.host}:{self.port}"
        T = self.dir
        (T / "db").mkdir()
        (T / "run").mkdir()
        conf = T / "slapd.conf"
        conf.write_text(SLAPD_CONF.format(T=T, base_dn=self.base_dn, admin_dn=self.admin_dn,
                                          admin_password=self.admin_password))
        self.alice_hash = run([slappasswd, "-s", "alicepw", "-h", "{SSHA}"]).stdout.strip()
        ldif = T / "data.ldif"
        ldif.write_text(DATA_LDIF.format(alice_hash=self.alice_hash))
        run([slapadd, "-f", str(conf), "-l", str(ldif)])
        # -d 256 (stats): stay in the foreground as our child and log connections/ops to the log.
        self._spawn([slapd, "-d", "256", "-f", str(conf), "-h", f"{self.url}/"], T / "slapd.log")
        wait_until(self._ready, 15.0, what=f"slapd bind on {self.url}",
                   on_timeout=self.logs)

    def _ready(self) -> bool:
        if not self._child_alive():
            raise ServiceError(f"slapd exited during start-up\n{self.logs()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.settimeout(1)
                s.sendall(_ANON_BIND)
                data = s.recv(64)
        except OSError:
            return False
        return _BIND_RESP in data and _RESULT_OK in data

    # helpers --------------------------------------------------------------------------------
    def ldapmodify(self, ldif: str, add: bool = False) -> str:
        """Apply LDIF as the admin with ``ldapmodify`` (``add=True``: ``-a``, entries without
        changetype are added). Returns its output; raises ServiceError on failure."""
        tool = require_binary("ldapmodify", "ldap-utils")
        argv = [tool, "-x", "-H", self.url, "-D", self.admin_dn, "-w", self.admin_password]
        if add:
            argv.append("-a")
        return run(argv, input=ldif).stdout

    def user_dn(self, uid: str) -> str:
        return f"uid={uid},{self.people_dn}"
