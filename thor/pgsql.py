"""PostgreSQL through psycopg2 under gevent: a slow database blocks only the greenlet that asked."""

import gevent.socket
import psycopg2
import psycopg2.extensions

__all__ = ["cooperative", "one_line"]


def _gevent_wait(connection, timeout=None):
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            gevent.socket.wait_read(connection.fileno(), timeout=timeout)
        elif state == psycopg2.extensions.POLL_WRITE:
            gevent.socket.wait_write(connection.fileno(), timeout=timeout)
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def cooperative():
    """Make every psycopg2 connection of this process wait through gevent (call before connecting)."""
    psycopg2.extensions.set_wait_callback(_gevent_wait)


def one_line(error):
    """A psycopg2 error as one line for the log or the client."""
    return " ".join(str(error).split())
