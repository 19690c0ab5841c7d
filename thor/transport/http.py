"""HTTP interfaces of the daemons: gevent's pywsgi with bounds.

Connections are bounded (beyond max_connections, new ones wait in the
listen backlog; beyond max_connections_per_source from one IP address, new
ones are closed at once, so that one client cannot take every slot), a
client silent for idle_timeout is dropped, and with a TLS
context the handshake runs in the connection's own greenlet (bounded by
handshake_timeout): a client that fails it costs one log line and delays
nobody. Request lines and headers are bounded by pywsgi itself.
"""

import socket
import ssl

from gevent.pywsgi import WSGIServer

from thor.transport.limits import SourceLimit
from thor.transport.tls import format_address

__all__ = ["HTTPServer", "reply"]


class HTTPServer(WSGIServer):
    def __init__(
        self,
        listen,
        application,
        log,
        max_connections=1000,
        idle_timeout=60.0,
        tls_context=None,
        handshake_timeout=10.0,
        max_connections_per_source=None,
    ):
        """Binds listen at once: an OSError here is the operator's to read (address in use...)."""
        listener = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Without TCP_NODELAY, keep-alive clients wait for delayed ACKs (about 23 calls/s).
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            listener.bind(listen)
            listener.listen(1024)
        except OSError:
            listener.close()
            raise
        super().__init__(listener, application, spawn=max_connections, log=None, error_log=log)
        self.refusal_log = log  # (pywsgi's own .log is the access log, off)
        self.idle_timeout = idle_timeout
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.per_source = SourceLimit(max_connections_per_source) if max_connections_per_source else None

    def handle(self, sock, address):
        source = address[0] if address else "?"
        if self.per_source is not None and not self.per_source.admit(source, self.refusal_log, "connections"):
            sock.close()
            return
        try:
            self._serve_connection(sock, address)
        finally:
            if self.per_source is not None:
                self.per_source.release(source)

    def _serve_connection(self, sock, address):
        # (not _handle: gevent's servers keep their handler under that name)
        if self.tls_context is not None:
            sock.settimeout(self.handshake_timeout)
            try:
                sock = self.tls_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as problem:
                self.refusal_log.info("refused %s: TLS handshake failed: %s", format_address(address), problem)
                sock.close()
                return
        sock.settimeout(self.idle_timeout)
        super().handle(sock, address)


def reply(start_response, status, body, content_type="text/plain; charset=utf-8"):
    """One whole answer (WSGI): status like "404 Not Found", body a str."""
    data = body.encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]
