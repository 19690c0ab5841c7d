"""A line-based TCP server with bounds, for interfaces anyone may reach.

One query per line (CRLF or LF), one answer line per query, in order;
pipelining works. Each connection has its own greenlet: it reads what the
client sent, answers every complete line, and reads more only once the
client took the answers (at most FLUSH_SIZE bytes wait), so a client that
sends without reading blocks only itself and is dropped after idle_timeout.
After each batch it yields to the event loop, so a client that floods
queries and reads the answers as fast as they come gets its turn like
everyone else and never freezes the process.

Bounds: line length; connections in all and from one address; idle time,
counted from the last query (blank lines and bytes of an unfinished line
do not count, so trickling cannot keep a connection). When every slot is
taken, a newcomer takes the slot of the connection idle the longest, if
that one has been idle for evict_after seconds (default 1); otherwise it is told busy.
Blank lines are not queries; "quit" closes. Errors the server itself gives
are "error CODE TEXT" lines.
"""

import collections
import contextlib
import logging
import socket
import time

import gevent
from gevent.server import StreamServer

__all__ = ["LineServer", "error"]

log = logging.getLogger("thor.transport")

READ_SIZE = 65536
# Answers are flushed once this many bytes wait, so a burst of big answers cannot grow memory.
FLUSH_SIZE = 65536
# A connection that asked nothing for this long gives its slot to a newcomer when all are taken.
EVICT_AFTER = 1.0
# Seconds a connection gives others after each batch, at most (when the loop is never idle).
YIELD_AT_MOST = 0.005
# Refusals being written at once; beyond that a refused client is closed without a word, so a
# connection flood cannot hold file descriptors in refusals.
MAX_REFUSING = 64


def error(code, text):
    return f"error {code} {text}"


class _Connection:
    __slots__ = ("host", "last_query", "socket")

    def __init__(self, sock, host):
        self.socket = sock
        self.host = host
        self.last_query = time.monotonic()


class LineServer:
    """Serves respond(line) -> answer line; `name` says what it is in the log."""

    def __init__(
        self,
        listen,
        respond,
        name,
        max_connections=1000,
        max_connections_per_address=100,
        idle_timeout=30.0,
        max_line_length=1024,
        evict_after=EVICT_AFTER,
    ):
        self.listen = listen
        self.respond = respond
        self.name = name
        self.answered = 0
        self.evicted = 0
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.idle_timeout = idle_timeout
        self.max_line_length = max_line_length
        self.evict_after = evict_after
        self._connections = {}  # socket -> _Connection
        self._per_host = collections.Counter()
        self._refusing = 0
        self._server = None

    @property
    def address(self):
        return self._server.address

    @property
    def connections(self):
        return len(self._connections)

    @property
    def file_descriptors(self):
        """The most descriptors this server holds at once: for the process's open files limit
        (its connections, the refusals, what one accept burst takes and the listener)."""
        return self.max_connections + MAX_REFUSING + StreamServer.max_accept + 1

    def bind(self):
        """Listen without answering yet: clients that connect wait in the backlog until start()
        (a port that cannot be had fails here, with OSError)."""
        if self._server is None:
            self._server = StreamServer(self.listen, self._serve, backlog=1024)
            self._server.init_socket()
            log.info("%s listening on %s:%s", self.name, *self._server.address[:2])

    def start(self):
        self.bind()
        self._server.start()

    def stop(self):
        if self._server is not None:
            self._server.stop(timeout=1)

    def _serve(self, sock, peer):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.idle_timeout)
        host = peer[0]
        if self._per_host[host] >= self.max_connections_per_address:
            self._refuse(sock, f"more than {self.max_connections_per_address} connections from {host}")
            return
        if len(self._connections) >= self.max_connections and not self._evict_idlest():
            self._refuse(sock, f"more than {self.max_connections} connections")
            return
        connection = _Connection(sock, host)
        self._connections[sock] = connection
        self._per_host[host] += 1
        try:
            self._converse(connection)
        except (OSError, gevent.Timeout):
            pass  # the client went away, was idle for idle_timeout, or did not read our answers
        finally:
            self._forget(sock)
            sock.close()

    def _forget(self, sock):
        connection = self._connections.pop(sock, None)
        if connection is not None:
            self._per_host[connection.host] -= 1
            if not self._per_host[connection.host]:
                del self._per_host[connection.host]

    def _evict_idlest(self):
        """Free the slot of the connection idle the longest, if it is idle enough; whether one was freed."""
        idlest = min(self._connections.values(), key=lambda connection: connection.last_query)
        if time.monotonic() - idlest.last_query < self.evict_after:
            return False
        self._forget(idlest.socket)
        self.evicted += 1
        # Its greenlet sees the end of input and closes the socket.
        with contextlib.suppress(OSError):
            idlest.socket.shutdown(socket.SHUT_RDWR)
        return True

    def _refuse(self, sock, why):
        if self._refusing >= MAX_REFUSING:
            sock.close()
            return
        self._refusing += 1
        try:
            with contextlib.suppress(OSError, gevent.Timeout):
                _send(sock, [error("busy", f"{why}; try again later")])
                _drain(sock)
        finally:
            self._refusing -= 1
            sock.close()

    def _converse(self, connection):
        sock = connection.socket
        pending = b""
        while True:
            # Idle time runs from the last query, whatever else the client sends.
            sock.settimeout(max(0.001, connection.last_query + self.idle_timeout - time.monotonic()))
            data = sock.recv(READ_SIZE)
            if not data:
                return
            complete, newline, pending = (pending + data).rpartition(b"\n")
            if newline:
                if complete.strip():
                    connection.last_query = time.monotonic()
                    sock.settimeout(self.idle_timeout)  # for writing the answers
                if not self._answer_lines(sock, complete.split(b"\n")):
                    return
            if len(pending) > self.max_line_length:
                _send(sock, [self._too_long()])
                _drain(sock)
                return
            # recv and sendall return without switching while the client keeps up: let others run.
            # Not sleep(0): the loop runs up to 50 such callbacks (50 batches) between its polls
            # for I/O. idle() resumes once the loop has polled and served what was ready; it
            # might never be idle under a steady load, hence the bound.
            with gevent.Timeout(YIELD_AT_MOST, False):
                gevent.idle()

    def _answer_lines(self, sock, lines):
        """Answer complete lines in order; False when the connection is to close."""
        out = []
        size = 0
        for raw in lines:
            if len(raw) > self.max_line_length + 1:  # + 1: the CR of a CRLF
                out.append(self._too_long())
                _send(sock, out)
                _drain(sock)
                return False
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                reply = error("encoding", "a line is not UTF-8")
            else:
                if not line.strip():
                    continue  # blank lines are not queries
                if line.split(None, 1)[0].lower() == "quit":
                    _send(sock, out)
                    return False
                reply = self.respond(line)
                self.answered += 1
            out.append(reply)
            size += len(reply) + 2
            if size >= FLUSH_SIZE:
                _send(sock, out)
                out, size = [], 0
        _send(sock, out)
        return True

    def _too_long(self):
        return error("line-too-long", f"a line has more than {self.max_line_length} bytes; closing")


def _send(sock, replies):
    if replies:
        sock.sendall(("\r\n".join(replies) + "\r\n").encode())


def _drain(sock, limit=1 << 20, seconds=1.0):
    """Before closing on a client that may still be sending: closing with unread input
    resets the connection, and the client could lose our last answer. Bounded."""
    sock.shutdown(socket.SHUT_WR)
    with gevent.Timeout(seconds, False):
        while limit > 0:
            data = sock.recv(READ_SIZE)
            if not data:
                break
            limit -= len(data)
