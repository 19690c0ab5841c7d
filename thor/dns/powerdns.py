"""The powerdns backend: the zone lives in PowerDNS's gpgsql schema in PostgreSQL.

Each change is one transaction that locks the zone's row in `domains`,
compares the wanted records with the stored ones, deletes and inserts only
the rows that differ and raises the SOA serial when anything did. Several
thor-dns instances writing the same database serialize on that lock and,
given the same status, find nothing left to change: they do not fight.
Sliced record sets are stored as LUA records with pickrandomsample(), which
PowerDNS evaluates on every query (enable-lua-records=yes).
"""

import logging
import os
import time

import psycopg2

from thor.pgsql import connect, cooperative, one_line

__all__ = ["PowerDNSError", "PowerDNSZone"]

log = logging.getLogger("thor.dns")


class PowerDNSError(Exception):
    pass


def _bare(name):
    """gpgsql stores names without the trailing dot."""
    return name.rstrip(".")


def _lua_list(values):
    return "{" + ", ".join("'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'" for value in values) + "}"


def rows_for(records, answer_limit):
    """The gpgsql rows (name, type, content, ttl, prio) for a record set, SOA excluded."""
    rows = set()
    for rrset in records.values():
        name = _bare(rrset.name)
        if rrset.sliced:
            expression = f"pickrandomsample({answer_limit}, {_lua_list(rrset.rdatas)})"
            rows.add((name, "LUA", f'{rrset.rdtype} "{expression}"', rrset.ttl, 0))
            continue
        for rdata in rrset.rdatas:
            if rrset.rdtype in ("SRV", "MX"):
                # gsql keeps the priority in its own column, in front of the content.
                priority, _, rest = rdata.partition(" ")
                rows.add((name, rrset.rdtype, rest, rrset.ttl, int(priority)))
            else:
                rows.add((name, rrset.rdtype, rdata, rrset.ttl, 0))
    return rows


class PowerDNSZone:
    def __init__(self, dsn, schema_path=None, connect_timeout=5):
        cooperative()
        self.dsn = dsn
        self.schema_path = schema_path
        self.connect_timeout = connect_timeout
        self._connection = None

    def _connect(self):
        if self._connection is None or self._connection.closed:
            # Another thor-dns holding the zone's lock, or a stuck statement, fails in bounded time.
            self._connection = connect(self.dsn, connect_timeout=self.connect_timeout)
            self._ensure_schema()
        return self._connection

    def close(self):
        if self._connection is not None and not self._connection.closed:
            self._connection.close()
        self._connection = None

    def _ensure_schema(self):
        """Create PowerDNS's tables when the database is empty (the schema file ships with pdns-backend-pgsql)."""
        with self._connection, self._connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('public.domains') IS NOT NULL")
            if cursor.fetchone()[0]:
                return
            if not self.schema_path or not os.path.exists(self.schema_path):
                raise PowerDNSError(
                    f"the database has no PowerDNS schema and the schema file {self.schema_path} is missing"
                )
            with open(self.schema_path) as stream:
                cursor.execute(stream.read())
            log.info("created the PowerDNS schema from %s", self.schema_path)

    def apply(self, settings, records):
        """Make the stored zone equal to records; returns (rows deleted, rows inserted, serial)."""
        try:
            connection = self._connect()
            with connection, connection.cursor() as cursor:
                return self._apply(cursor, settings, records)
        except psycopg2.Error as error:
            self.close()
            raise PowerDNSError(one_line(error)) from None

    def _apply(self, cursor, settings, records):
        zone = _bare(settings.origin)
        cursor.execute("SELECT id FROM domains WHERE name = %s FOR UPDATE", (zone,))
        found = cursor.fetchone()
        if found is None:
            cursor.execute("INSERT INTO domains (name, type) VALUES (%s, 'NATIVE') RETURNING id", (zone,))
            domain_id = cursor.fetchone()[0]
            log.info("created zone %s in PowerDNS", zone)
        else:
            domain_id = found[0]
        cursor.execute(
            "SELECT id, name, type, content, ttl, prio FROM records WHERE domain_id = %s AND type <> 'SOA'",
            (domain_id,),
        )
        stored = {}
        for row_id, name, rdtype, content, ttl, prio in cursor.fetchall():
            stored.setdefault((name, rdtype, content, ttl, prio or 0), []).append(row_id)
        wanted = rows_for(records, settings.answer_limit)
        stale = [row_id for key, ids in stored.items() for row_id in (ids if key not in wanted else ids[1:])]
        missing = [row for row in wanted if row not in stored]
        if stale:
            cursor.execute("DELETE FROM records WHERE id = ANY(%s)", (stale,))
        for name, rdtype, content, ttl, prio in missing:
            cursor.execute(
                "INSERT INTO records (domain_id, name, type, content, ttl, prio, disabled, auth) "
                "VALUES (%s, %s, %s, %s, %s, %s, false, true)",
                (domain_id, name, rdtype, content, ttl, prio),
            )
        serial = self._soa(cursor, domain_id, settings, changed=bool(stale or missing))
        return len(stale), len(missing), serial

    def _soa(self, cursor, domain_id, settings, changed):
        cursor.execute("SELECT id, content FROM records WHERE domain_id = %s AND type = 'SOA'", (domain_id,))
        rows = cursor.fetchall()
        serial = int(rows[0][1].split()[2]) if rows else 0
        primary = settings.absolute(settings.nameservers[0][0]) if settings.nameservers else settings.origin

        def content_for(number):
            return f"{_bare(primary)} {_bare(settings.hostmaster)} {number} 3600 600 604800 {settings.ttl}"

        if rows and not changed and rows[0][1] == content_for(serial) and len(rows) == 1:
            return serial
        # A serial that grows on every change, close to the time when changes are rare.
        serial = max(serial + 1, int(time.time()))
        cursor.execute("DELETE FROM records WHERE domain_id = %s AND type = 'SOA'", (domain_id,))
        cursor.execute(
            "INSERT INTO records (domain_id, name, type, content, ttl, prio, disabled, auth) "
            "VALUES (%s, %s, 'SOA', %s, %s, 0, false, true)",
            (domain_id, _bare(settings.origin), content_for(serial), settings.ttl),
        )
        return serial
