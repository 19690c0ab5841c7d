"""A client of the lookup interface: pipelined queries over one TCP connection."""

import socket

from thor.lookup.config import LOOKUP_PORT
from thor.transport.tls import format_address

__all__ = ["LookupClient", "LookupClientError"]


class LookupClientError(Exception):
    """The server could not be reached, or closed the connection; str() says which."""


class LookupClient:
    def __init__(self, host="127.0.0.1", port=LOOKUP_PORT, timeout=5.0, create_connection=socket.create_connection):
        """create_connection: gevent.socket's in a process gevent runs without monkey-patching."""
        self.endpoint = (host, port)
        self.timeout = timeout
        self._create_connection = create_connection
        self._socket = None
        self._buffer = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def connect(self):
        if self._socket is None:
            try:
                self._socket = self._create_connection(self.endpoint, timeout=self.timeout)
            except OSError as problem:
                where = format_address(self.endpoint)
                raise LookupClientError(f"cannot reach the lookup interface at {where}: {problem}") from None
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._socket

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self._buffer = b""

    def query(self, *lines):
        """Send every line at once (pipelined) and return their answers, in order."""
        connection = self.connect()
        try:
            connection.sendall("".join(f"{line}\r\n" for line in lines).encode())
            return [self._read_line(connection) for _ in lines]
        except OSError as problem:
            self.close()
            raise LookupClientError(f"lookup interface at {format_address(self.endpoint)}: {problem}") from None

    def _read_line(self, connection):
        while b"\n" not in self._buffer:
            data = connection.recv(65536)
            if not data:
                self.close()
                where = format_address(self.endpoint)
                raise LookupClientError(f"the lookup interface at {where} closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.rstrip(b"\r").decode()

    def lookup(self, role, key):
        return self.query(f"lookup {role} for {key}")[0]
