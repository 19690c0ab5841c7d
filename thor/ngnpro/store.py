"""NGNPro's durable storage: domains, accounts and aliases in PostgreSQL.

Every operation is one transaction; it returns only after COMMIT, with the
changes it made. A change is what nodes cache:

    {"kind": "account" | "alias" | "domain", "key": "alice@example.com", "seq": 1042, "data": {...} | None}

(a domain's key is the domain, and every node keeps every domain.)

seq comes from one sequence for every change, so a node keeps, per key, the
change with the highest seq; data None is a deletion. The schema is created
and migrated by NGNPro itself (ngnpro_schema holds the version); several
instances serialize migrations on an advisory lock.
"""

import contextlib
import logging

import gevent.lock
import psycopg2

from thor.ngnpro.model import account_record, sip_key
from thor.pgsql import connect, cooperative, one_line

__all__ = ["ConflictError", "NotFoundError", "OutcomeUnknownError", "Store", "StoreUnavailableError"]

log = logging.getLogger("thor.ngnpro")

SCHEMA_LOCK = 0x6E676E70  # "ngnp": pg_advisory_xact_lock key of the migrations

MIGRATIONS = [
    # 1: the first schema.
    """
    CREATE SEQUENCE ngnpro_changes;
    CREATE TABLE ngnpro_domains (
        name text PRIMARY KEY,
        created timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE ngnpro_accounts (
        username text NOT NULL,
        domain text NOT NULL REFERENCES ngnpro_domains (name),
        ha1 text NOT NULL,
        ha1b text NOT NULL,
        first_name text NOT NULL DEFAULT '',
        last_name text NOT NULL DEFAULT '',
        email text NOT NULL DEFAULT '',
        enabled boolean NOT NULL DEFAULT true,
        created timestamptz NOT NULL DEFAULT now(),
        updated timestamptz NOT NULL DEFAULT now(),
        seq bigint NOT NULL,
        PRIMARY KEY (username, domain)
    );
    CREATE TABLE ngnpro_aliases (
        username text NOT NULL,
        domain text NOT NULL REFERENCES ngnpro_domains (name),
        target_username text NOT NULL,
        target_domain text NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (username, domain),
        FOREIGN KEY (target_username, target_domain) REFERENCES ngnpro_accounts (username, domain)
    );
    CREATE INDEX ngnpro_aliases_target ON ngnpro_aliases (target_username, target_domain);
    """,
    # 2: loads page through accounts and aliases in (domain, username) order, listings and
    # domain deletions select by domain: without these, every page of a load scans the table.
    """
    CREATE INDEX ngnpro_accounts_by_domain ON ngnpro_accounts (domain, username);
    CREATE INDEX ngnpro_aliases_by_domain ON ngnpro_aliases (domain, username);
    """,
    # 3: domains are changes too (every node keeps the domains served, to refuse the others).
    """
    ALTER TABLE ngnpro_domains ADD COLUMN seq bigint NOT NULL DEFAULT nextval('ngnpro_changes');
    """,
]

ACCOUNT_COLUMNS = "username, domain, ha1, ha1b, first_name, last_name, email, enabled"


class StoreUnavailableError(Exception):
    """The database cannot be reached (or none is announced); nothing was changed. str() says why."""


class OutcomeUnknownError(StoreUnavailableError):
    """The connection failed during COMMIT: the change may or may not have been made."""


class NotFoundError(LookupError):
    pass


class ConflictError(ValueError):
    pass


class Store:
    """A small pool of connections to the database dsn_source() names (None: none known yet)."""

    def __init__(self, dsn_source, pool_size=8, connect_timeout=5, statement_timeout=15):
        cooperative()
        self.dsn_source = dsn_source
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        # A caller waits at most this long for a free connection, then gets an answer.
        self.wait_timeout = connect_timeout + statement_timeout
        self._idle = []  # (dsn, connection): a connection only ever serves the database it was opened to
        self._dsn = None
        self._slots = gevent.lock.BoundedSemaphore(pool_size)
        self._migrated = set()
        self.errors = 0  # transactions the database failed (unavailable, refused, outcome unknown)

    @contextlib.contextmanager
    def transaction(self):
        """A cursor in one transaction, committed when the block ends without an exception."""
        try:
            with self._transaction() as cursor:
                yield cursor
        except (StoreUnavailableError, OutcomeUnknownError):
            self.errors += 1
            raise

    @contextlib.contextmanager
    def _transaction(self):
        if not self._slots.acquire(timeout=self.wait_timeout):
            raise StoreUnavailableError(
                f"all {self.pool_size} connections to the provisioning database stayed busy for {self.wait_timeout} s"
            )
        try:
            dsn, connection = self._take()
            committing = False
            try:
                with connection.cursor() as cursor:
                    yield cursor
                committing = True
                connection.commit()
            except psycopg2.IntegrityError as error:  # a concurrent change won a race the checks could not see
                _roll_back(connection)
                raise ConflictError(one_line(error)) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
                if not _connection_lost(connection, error):
                    # A statement or lock timeout, a deadlock: the transaction is rolled back, the
                    # connection is fine.
                    _roll_back(connection)
                    raise StoreUnavailableError(f"the provisioning database refused: {one_line(error)}") from None
                connection.close()
                self.close()  # after a restart of the database, the idle ones are dead too
                if committing:
                    raise OutcomeUnknownError(
                        f"the provisioning database failed during COMMIT: {one_line(error)}"
                    ) from None
                raise StoreUnavailableError(f"the provisioning database failed: {one_line(error)}") from None
            except BaseException:
                _roll_back(connection)
                raise
            finally:
                if connection.closed or dsn != self._dsn:
                    connection.close()
                else:
                    self._idle.append((dsn, connection))
        finally:
            self._slots.release()

    def _take(self):
        dsn = self.dsn_source()
        if dsn is None:
            raise StoreUnavailableError("no provisioning database is announced (is thor-database running?)")
        if dsn != self._dsn:  # the database moved: forget the old connections (those in use close when done)
            self.close()
            self._dsn = dsn
        while self._idle:
            idle_dsn, connection = self._idle.pop()
            if not connection.closed and idle_dsn == dsn:
                return dsn, connection
            connection.close()
        try:
            connection = connect(dsn, self.connect_timeout, self.statement_timeout)
        except psycopg2.Error as error:
            raise StoreUnavailableError(f"cannot connect to the provisioning database: {one_line(error)}") from None
        if dsn not in self._migrated:
            try:
                self._migrate(connection)
            except psycopg2.Error as error:
                connection.close()
                raise StoreUnavailableError(f"migrating the provisioning database failed: {one_line(error)}") from None
            except StoreUnavailableError:
                connection.close()
                raise
            self._migrated.add(dsn)
        return dsn, connection

    def close(self):
        while self._idle:
            self._idle.pop()[1].close()

    def _migrate(self, connection):
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cursor.execute("CREATE TABLE IF NOT EXISTS ngnpro_schema (version integer NOT NULL)")
            cursor.execute("SELECT version FROM ngnpro_schema")
            row = cursor.fetchone()
            version = row[0] if row else 0
            if row is None:
                cursor.execute("INSERT INTO ngnpro_schema (version) VALUES (0)")
            if version > len(MIGRATIONS):
                raise StoreUnavailableError(
                    f"the provisioning database has schema {version}, newer than this ngnpro knows ({len(MIGRATIONS)})"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                cursor.execute(MIGRATIONS[number - 1])
                cursor.execute("UPDATE ngnpro_schema SET version = %s", (number,))
                log.info("provisioning database migrated to schema %s", number)

    # Domains

    def add_domain(self, domain):
        with self.transaction() as cursor:
            cursor.execute(
                "INSERT INTO ngnpro_domains (name, seq) VALUES (%s, nextval('ngnpro_changes')) "
                "ON CONFLICT DO NOTHING RETURNING seq",
                (domain,),
            )
            row = cursor.fetchone()
            if row is None:
                raise ConflictError(f"domain {domain} exists")
        return [_domain_change(domain, row[0], present=True)]

    def delete_domain(self, domain):
        with self.transaction() as cursor:
            cursor.execute("SELECT count(*) FROM ngnpro_accounts WHERE domain = %s", (domain,))
            if cursor.fetchone()[0]:
                raise ConflictError(f"domain {domain} still has accounts; delete them first")
            cursor.execute("SELECT count(*) FROM ngnpro_aliases WHERE domain = %s", (domain,))
            if cursor.fetchone()[0]:
                raise ConflictError(f"domain {domain} still has aliases; delete them first")
            cursor.execute("DELETE FROM ngnpro_domains WHERE name = %s RETURNING nextval('ngnpro_changes')", (domain,))
            row = cursor.fetchone()
            if row is None:
                raise NotFoundError(f"domain {domain} does not exist")
        return [_domain_change(domain, row[0], present=False)]

    def domains(self):
        with self.transaction() as cursor:
            cursor.execute("SELECT name FROM ngnpro_domains ORDER BY name")
            return [row[0] for row in cursor.fetchall()]

    # Accounts

    def add_account(self, fields):
        with self.transaction() as cursor:
            self._require_domain(cursor, fields["domain"])
            self._require_free(cursor, fields["username"], fields["domain"])
            cursor.execute(
                f"INSERT INTO ngnpro_accounts ({ACCOUNT_COLUMNS}, seq) "
                "VALUES (%(username)s, %(domain)s, %(ha1)s, %(ha1b)s, %(first_name)s, %(last_name)s, %(email)s, "
                f"%(enabled)s, nextval('ngnpro_changes')) RETURNING {ACCOUNT_COLUMNS}, seq",
                fields,
            )
            return [_account_change(cursor.fetchone())]

    def update_account(self, username, domain, fields):
        """Change the given fields (a subset of first_name, last_name, email, enabled, ha1, ha1b)."""
        assignments = ", ".join(f"{name} = %({name})s" for name in fields)
        with self.transaction() as cursor:
            cursor.execute(
                f"UPDATE ngnpro_accounts SET {assignments}{', ' if fields else ''}updated = now(), "
                "seq = nextval('ngnpro_changes') WHERE username = %(username__)s AND domain = %(domain__)s "
                f"RETURNING {ACCOUNT_COLUMNS}, seq",
                {**fields, "username__": username, "domain__": domain},
            )
            row = cursor.fetchone()
            if row is None:
                raise NotFoundError(f"account {username}@{domain} does not exist")
            return [_account_change(row)]

    def delete_account(self, username, domain):
        """Delete the account and its aliases."""
        with self.transaction() as cursor:
            cursor.execute(
                "DELETE FROM ngnpro_aliases WHERE target_username = %s AND target_domain = %s "
                "RETURNING username, domain, nextval('ngnpro_changes')",
                (username, domain),
            )
            changes = [_deletion("alias", alias, alias_domain, seq) for alias, alias_domain, seq in cursor.fetchall()]
            cursor.execute(
                "DELETE FROM ngnpro_accounts WHERE username = %s AND domain = %s RETURNING nextval('ngnpro_changes')",
                (username, domain),
            )
            row = cursor.fetchone()
            if row is None:
                raise NotFoundError(f"account {username}@{domain} does not exist")
            return [*changes, _deletion("account", username, domain, row[0])]

    def account(self, username, domain):
        with self.transaction() as cursor:
            cursor.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM ngnpro_accounts WHERE username = %s AND domain = %s",
                (username, domain),
            )
            row = cursor.fetchone()
            if row is None:
                raise NotFoundError(f"account {username}@{domain} does not exist")
            return account_record(row)

    def accounts(self, domain, limit=1000, offset=0):
        with self.transaction() as cursor:
            self._require_domain(cursor, domain)
            cursor.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM ngnpro_accounts WHERE domain = %s ORDER BY username LIMIT %s OFFSET %s",
                (domain, limit, offset),
            )
            return [account_record(row) for row in cursor.fetchall()]

    # Aliases

    def add_alias(self, username, domain, target_username, target_domain):
        with self.transaction() as cursor:
            self._require_domain(cursor, domain)
            self._require_free(cursor, username, domain)
            cursor.execute(
                "SELECT 1 FROM ngnpro_accounts WHERE username = %s AND domain = %s", (target_username, target_domain)
            )
            if cursor.fetchone() is None:
                raise NotFoundError(f"account {target_username}@{target_domain} does not exist")
            cursor.execute(
                "INSERT INTO ngnpro_aliases (username, domain, target_username, target_domain, seq) "
                "VALUES (%s, %s, %s, %s, nextval('ngnpro_changes')) RETURNING seq",
                (username, domain, target_username, target_domain),
            )
            return [_alias_change(username, domain, target_username, target_domain, cursor.fetchone()[0])]

    def delete_alias(self, username, domain):
        with self.transaction() as cursor:
            cursor.execute(
                "DELETE FROM ngnpro_aliases WHERE username = %s AND domain = %s RETURNING nextval('ngnpro_changes')",
                (username, domain),
            )
            row = cursor.fetchone()
            if row is None:
                raise NotFoundError(f"alias {username}@{domain} does not exist")
            return [_deletion("alias", username, domain, row[0])]

    def aliases(self, target_username, target_domain):
        with self.transaction() as cursor:
            cursor.execute(
                "SELECT username, domain FROM ngnpro_aliases WHERE target_username = %s AND target_domain = %s "
                "ORDER BY domain, username",
                (target_username, target_domain),
            )
            return [f"{username}@{domain}" for username, domain in cursor.fetchall()]

    # What nodes load

    def snapshot(self, batch=2000):
        """Every domain, account and alias as changes, read in one consistent snapshot, in batches (a generator)."""
        with self.transaction() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("SELECT name, seq FROM ngnpro_domains ORDER BY name")
            domains = [_domain_change(name, seq, present=True) for name, seq in cursor.fetchall()]
            for start in range(0, len(domains), batch):
                yield domains[start : start + batch]
            yield from _pages(cursor, f"SELECT {ACCOUNT_COLUMNS}, seq FROM ngnpro_accounts", batch, _account_change)
            aliases = "SELECT username, domain, target_username, target_domain, seq FROM ngnpro_aliases"
            yield from _pages(cursor, aliases, batch, lambda row: _alias_change(*row))

    def counts(self):
        with self.transaction() as cursor:
            cursor.execute(
                "SELECT (SELECT count(*) FROM ngnpro_domains), (SELECT count(*) FROM ngnpro_accounts), "
                "(SELECT count(*) FROM ngnpro_aliases)"
            )
            domains, accounts, aliases = cursor.fetchone()
            return {"domains": domains, "accounts": accounts, "aliases": aliases}

    # Checks inside a transaction

    def _require_domain(self, cursor, domain):
        cursor.execute("SELECT 1 FROM ngnpro_domains WHERE name = %s", (domain,))
        if cursor.fetchone() is None:
            raise NotFoundError(f"domain {domain} does not exist")

    def _require_free(self, cursor, username, domain):
        # Lock the name against a concurrent add of the other kind.
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{username}@{domain}",))
        cursor.execute(
            "SELECT 'account' FROM ngnpro_accounts WHERE username = %s AND domain = %s "
            "UNION ALL SELECT 'alias' FROM ngnpro_aliases WHERE username = %s AND domain = %s",
            (username, domain, username, domain),
        )
        row = cursor.fetchone()
        if row is not None:
            raise ConflictError(f"{username}@{domain} exists as an {row[0]}")


def _pages(cursor, select, batch, change):
    """The changes of select's rows (username and domain first) in (domain, username) order, a
    batch at a time: each page starts after the last key of the one before, on the index."""
    after = ("", "")
    while True:
        cursor.execute(
            f"{select} WHERE (domain, username) > (%s, %s) ORDER BY domain, username LIMIT %s", (*after, batch)
        )
        rows = cursor.fetchall()
        if not rows:
            return
        yield [change(row) for row in rows]
        after = (rows[-1][1], rows[-1][0])


def _connection_lost(connection, error):
    """Whether error means the connection is gone (not a timeout or deadlock inside a live one)."""
    code = getattr(error, "pgcode", None)
    return bool(connection.closed) or isinstance(error, psycopg2.InterfaceError) or code is None or code[:2] == "08"


def _roll_back(connection):
    if not connection.closed:
        try:
            connection.rollback()
        except psycopg2.Error:
            connection.close()


def _domain_change(domain, seq, present):
    return {"kind": "domain", "key": domain, "seq": seq, "data": {} if present else None}


def _account_change(row):
    record = account_record(row[:8])
    return {"kind": "account", "key": sip_key(record["username"], record["domain"]), "seq": row[8], "data": record}


def _alias_change(username, domain, target_username, target_domain, seq):
    return {
        "kind": "alias",
        "key": sip_key(username, domain),
        "seq": seq,
        "data": {"username": username, "domain": domain, "target": f"{target_username}@{target_domain}"},
    }


def _deletion(kind, username, domain, seq):
    return {"kind": kind, "key": sip_key(username, domain), "seq": seq, "data": None}
