"""PostgreSQL through psycopg2 under gevent: a slow database blocks only the greenlet that asked."""

import gevent.socket
import psycopg2
import psycopg2.extensions

__all__ = ["SSL_MODES", "connect", "cooperative", "make_dsn", "one_line"]

# How a connection is protected (libpq's sslmode): verify-full checks that the server's
# certificate is issued by the CA of sslrootcert for the address connected to; verify-ca only
# the CA; require encrypts unchecked (a man in the middle may answer); disable sends the
# password and the data in the clear.
SSL_MODES = ("verify-full", "verify-ca", "require", "disable")

# A database host that vanishes (no reset) fails a connection within about this many seconds,
# rather than the kernel's 15 minutes of retransmissions: keepalives for a connection that waits
# on an answer, a user timeout for one whose data goes unacknowledged.
DEAD_PEER_SECONDS = 10


class _BoundedConnection(psycopg2.extensions.connection):
    """A connection no single wait of which outlasts wait_limit seconds (None: unbounded).

    A server whose host is frozen still has its kernel complete handshakes and acknowledge
    data: libpq enforces no connect_timeout on asynchronous (gevent) connections, the
    statement_timeout runs on the frozen server, and keepalives are answered. Without a
    bound of its own, a greenlet would wait for ever."""

    wait_limit = None


def _gevent_wait(connection):
    limit = getattr(connection, "wait_limit", None)
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        try:
            if state == psycopg2.extensions.POLL_READ:
                gevent.socket.wait_read(connection.fileno(), timeout=limit)
            elif state == psycopg2.extensions.POLL_WRITE:
                gevent.socket.wait_write(connection.fileno(), timeout=limit)
            else:
                raise psycopg2.OperationalError(f"unexpected poll state {state}")
        except TimeoutError:
            raise psycopg2.OperationalError(f"the database server answered nothing for {limit:g} s") from None


def cooperative():
    """Make every psycopg2 connection of this process wait through gevent (call before connecting)."""
    psycopg2.extensions.set_wait_callback(_gevent_wait)


def make_dsn(host, port, dbname, user, password, sslmode, sslrootcert):
    """A libpq connection string (quoted as libpq wants it, whatever the password holds)."""
    fields = dict(host=host, port=port, dbname=dbname, user=user, password=password or None, sslmode=sslmode)
    if sslmode.startswith("verify-"):
        fields["sslrootcert"] = sslrootcert
    return psycopg2.extensions.make_dsn(**fields)


def connect(dsn, connect_timeout=5, statement_timeout=15, lock_timeout=5):
    """A connection whose statements, locks and dead or frozen peers all fail in bounded time."""
    limit = max(connect_timeout, statement_timeout) + DEAD_PEER_SECONDS
    factory = type("BoundedConnection", (_BoundedConnection,), {"wait_limit": limit})
    return psycopg2.connect(
        dsn,
        connection_factory=factory,
        connect_timeout=connect_timeout,
        keepalives=1,
        keepalives_idle=DEAD_PEER_SECONDS // 2,
        keepalives_interval=1,
        keepalives_count=DEAD_PEER_SECONDS // 2,
        tcp_user_timeout=DEAD_PEER_SECONDS * 1000,
        options=f"-c lock_timeout={int(lock_timeout * 1000)} -c statement_timeout={int(statement_timeout * 1000)}",
    )


def one_line(error):
    """A psycopg2 error as one line for the log or the client."""
    return " ".join(str(error).split())
