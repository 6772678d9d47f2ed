#!/bin/sh
# Seed the directory on first start (an empty volume), then run slapd in the foreground as
# the openldap user.
set -eu
if [ ! -e /var/lib/ldap/data.mdb ]; then
    slapadd -f /etc/ldap/slapd.conf -l /etc/ldap/seed.ldif
fi
mkdir -p /run/slapd
chown -R openldap:openldap /var/lib/ldap /run/slapd
exec slapd -d 0 -u openldap -g openldap -f /etc/ldap/slapd.conf -h "ldap:///"
