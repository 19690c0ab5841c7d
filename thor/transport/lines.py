"""A line-based TCP server with bounds, for interfaces anyone may reach.

One query per line (CRLF or LF), one answer line per query, in order;
pipelining works. Each connection has its own greenlet: it reads what the
client sent, answers every complete line, and reads more only once the
client took the answers (at most FLUSH_SIZE bytes wait), so a client that
sends without reading blocks only itself and is dropped after idle_timeout.
Line length, connections and idle time are bounded. Blank lines are not
queries; "quit" closes. Errors the server itself gives are
"error CODE TEXT" lines.
"""

import contextlib
import logging
import socket

import gevent
from gevent.server import StreamServer

__all__ = ["LineServer", "error"]

log = logging.getLogger("thor.transport")

READ_SIZE = 65536
# Answers are flushed once this many bytes wait, so a burst of big answers cannot grow memory.
FLUSH_SIZE = 65536


def error(code, text):
    return f"error {code} {text}"


class LineServer:
    """Serves respond(line) -> answer line; `name` says what it is in the log."""

    def __init__(self, listen, respond, name, max_connections=1000, idle_timeout=30.0, max_line_length=1024):
        self.listen = listen
        self.respond = respond
        self.name = name
        self.answered = 0
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_line_length = max_line_length
        self.connections = 0
        self._server = None

    @property
    def address(self):
        return self._server.address

    def start(self):
        self._server = StreamServer(self.listen, self._serve, backlog=1024)
        self._server.start()
        log.info("%s listening on %s:%s", self.name, *self._server.address[:2])

    def stop(self):
        if self._server is not None:
            self._server.stop(timeout=1)

    def _serve(self, connection, peer):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One timeout bounds both a silent client and one that stops reading our answers.
        connection.settimeout(self.idle_timeout)
        if self.connections >= self.max_connections:
            self._refuse(connection, error("busy", f"more than {self.max_connections} connections; try again later"))
            return
        self.connections += 1
        try:
            self._converse(connection)
        except (OSError, gevent.Timeout):
            pass  # the client went away, or was idle (or not reading) for idle_timeout
        finally:
            self.connections -= 1
            connection.close()

    def _refuse(self, connection, line):
        with contextlib.suppress(OSError, gevent.Timeout):
            _send(connection, [line])
            _drain(connection)
        connection.close()

    def _converse(self, connection):
        pending = b""
        while True:
            data = connection.recv(READ_SIZE)
            if not data:
                return
            complete, newline, pending = (pending + data).rpartition(b"\n")
            if newline and not self._answer_lines(connection, complete.split(b"\n")):
                return
            if len(pending) > self.max_line_length:
                _send(connection, [self._too_long()])
                _drain(connection)
                return

    def _answer_lines(self, connection, lines):
        """Answer complete lines in order; False when the connection is to close."""
        out = []
        size = 0
        for raw in lines:
            if len(raw) > self.max_line_length + 1:  # + 1: the CR of a CRLF
                out.append(self._too_long())
                _send(connection, out)
                _drain(connection)
                return False
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                reply = error("encoding", "a line is not UTF-8")
            else:
                if not line.strip():
                    continue  # blank lines are not queries
                if line.split(None, 1)[0].lower() == "quit":
                    _send(connection, out)
                    return False
                reply = self.respond(line)
                self.answered += 1
            out.append(reply)
            size += len(reply) + 2
            if size >= FLUSH_SIZE:
                _send(connection, out)
                out, size = [], 0
        _send(connection, out)
        return True

    def _too_long(self):
        return error("line-too-long", f"a line has more than {self.max_line_length} bytes; closing")


def _send(connection, replies):
    if replies:
        connection.sendall(("\r\n".join(replies) + "\r\n").encode())


def _drain(connection, limit=1 << 20, seconds=1.0):
    """Before closing on a client that may still be sending: closing with unread input
    resets the connection, and the client could lose our last answer. Bounded."""
    connection.shutdown(socket.SHUT_WR)
    with gevent.Timeout(seconds, False):
        while limit > 0:
            data = connection.recv(READ_SIZE)
            if not data:
                break
            limit -= len(data)
