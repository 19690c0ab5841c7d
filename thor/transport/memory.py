"""An in-memory transport: servers and members in one process, for tests of the core.

The event server and the event client run unchanged; only TLS is replaced.
A server registers its connection handler at an endpoint (listen); a member
connects with the identity its certificate would carry (connector), and
each connection is a socket pair: the bytes, the framing, the backpressure
and the end of a connection are those of a real one. Closing a member's
side, or calling cut(), is a crash as the server sees it.

    network = MemoryNetwork()
    server = EventServer("es1")
    network.listen(("es1", 8000), Identity("es1", {"thor_eventserver"}, 1), server.serve)
    client = EventClient(None, servers=[("es1", 8000)],
                         connector=network.connector(Identity("node1", {"sip_proxy"}, 2)))
"""

import contextlib
import itertools

import gevent
from gevent import socket

from thor.identity import Identity
from thor.transport.tls import TLSError, format_address

__all__ = ["MemoryNetwork"]


class MemoryNetwork:
    def __init__(self):
        self._servers = {}  # endpoint -> (server identity, handler)
        self._connections = {}  # endpoint -> {server-side socket: client-side socket}
        self._ports = itertools.count(40000)

    def listen(self, endpoint, identity, handler):
        """handler(socket, peer Identity) serves each connection; the socket is closed when it returns."""
        self._servers[endpoint] = (identity, handler)
        self._connections.setdefault(endpoint, {})

    def close(self, endpoint):
        """The server at endpoint goes away: new connections are refused, live ones end."""
        self._servers.pop(endpoint, None)
        for server_side, client_side in self._connections.pop(endpoint, {}).items():
            for sock in (server_side, client_side):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def connector(self, identity):
        """A connect(endpoint, timeout, expected_role) for the member holding identity."""

        def connect(endpoint, timeout=None, expected_role=None):
            entry = self._servers.get(endpoint)
            if entry is None:
                raise TLSError(f"cannot connect to {format_address(endpoint)}: connection refused")
            server_identity, handler = entry
            if expected_role is not None and expected_role not in server_identity.roles:
                raise TLSError(f"{server_identity} does not hold role {expected_role}")
            client_side, server_side = socket.socketpair()
            peer = Identity(
                identity.name,
                identity.roles,
                identity.serial,
                address=("127.0.0.1", next(self._ports)),
                addresses=identity.addresses,
            )
            self._connections[endpoint][server_side] = client_side
            gevent.spawn(self._serve, endpoint, handler, server_side, peer)
            return client_side, server_identity

        return connect

    def _serve(self, endpoint, handler, server_side, peer):
        try:
            handler(server_side, peer)
        except OSError:
            pass  # the connection ended: what a TLS server logs and forgets
        finally:
            self._connections.get(endpoint, {}).pop(server_side, None)
            with contextlib.suppress(OSError):
                server_side.close()
