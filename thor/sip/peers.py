"""The node-to-node API: an edge node consults a subscriber's home node over mutual TLS.

One JSON object per line each way, one answer per request, in order:

    {"op": "verify", "key": "alice@example.com", "credentials": {...}}  -> {"result": "ok" | "wrong" | ...}
    {"op": "location", "aor": "bob@example.com"}                        -> {"result": "ok", "routing": {...}}

Only members whose certificate grants sip_proxy are served (an HA1 check or
a subscriber's bindings are no one else's business). Bounded: line length,
connections, idle time; the client waits `timeout` seconds at most and keeps
a few connections per peer open for the next request.
"""

import collections
import contextlib
import json
import logging
import ssl

from thor import roles
from thor.transport.tls import TLSError, TLSServer, connect, format_address

__all__ = ["PeerClient", "PeerError", "PeerServer"]

log = logging.getLogger("thor.sip")

MAX_LINE = 16384
READ_SIZE = 16384


class PeerError(Exception):
    """A peer could not be asked or did not answer in time; str() says why."""


def _read_line(sock, buffer):
    """One line from sock (bytes before the newline); buffer holds what came after it."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} bytes")
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("closed")
        buffer.extend(data)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def _encode(message):
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class PeerServer:
    """Serves respond(identity, request dict) -> answer dict to sip_proxy members."""

    def __init__(self, listen, contexts, respond, max_connections=1000, idle_timeout=60.0, handshake_timeout=5.0):
        self.respond = respond
        self.idle_timeout = idle_timeout
        self._server = TLSServer(
            listen,
            contexts,
            self._serve,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            name="sip.peers",
        )

    @property
    def address(self):
        return self._server.address

    def start(self):
        self._server.start()

    def stop(self):
        self._server.stop(timeout=1)

    def _serve(self, sock, identity):
        if roles.SIP_PROXY not in identity.roles:
            log.warning("refused %s: only sip_proxy members consult a home node", identity)
            sock.sendall(_encode({"result": "error", "reason": "forbidden: not a sip_proxy member"}))
            return
        sock.settimeout(self.idle_timeout)
        buffer = bytearray()
        while True:
            try:
                line = _read_line(sock, buffer)
            except (ConnectionError, TimeoutError):
                return
            except ValueError as problem:
                sock.sendall(_encode({"result": "error", "reason": str(problem)}))
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                sock.sendall(_encode({"result": "error", "reason": "a request is one JSON object per line"}))
                continue
            try:
                answer = self.respond(identity, request)
            except Exception:
                log.exception("peer request of %s failed: %r", identity, request.get("op"))
                answer = {"result": "error", "reason": "internal error"}
            sock.sendall(_encode(answer))


class PeerClient:
    """Requests to other nodes' PeerServer, on connections kept open between requests."""

    def __init__(self, contexts, timeout=1.0, max_idle_per_peer=4):
        self.contexts = contexts
        self.timeout = timeout
        self.max_idle_per_peer = max_idle_per_peer
        self._idle = collections.defaultdict(list)  # (endpoint, role) -> [(socket, buffer)]

    def request(self, endpoint, message, role=roles.SIP_PROXY):
        """The peer's answer (a dict) to message; PeerError when it cannot be had within timeout.
        role: what the peer's certificate must grant (a home node: sip_proxy; a relay: media_relay)."""
        idle = self._idle[endpoint, role]
        while idle:
            connection = idle.pop()
            try:
                answer = self._exchange(connection, message)
            except (ConnectionError, ssl.SSLError):
                # The peer closed this kept connection meanwhile (it restarted, or it ends idle
                # ones): the request goes again, on the next kept connection or a new one.
                _close(connection)
                continue
            except (OSError, ValueError) as problem:
                _close(connection)
                raise _error(endpoint, problem) from None
            return self._keep(idle, connection, answer, endpoint)
        try:
            sock, _ = connect(endpoint, self.contexts, timeout=self.timeout, expected_role=role)
        except TLSError as problem:
            raise PeerError(str(problem)) from None
        except OSError as problem:
            raise _error(endpoint, problem) from None
        connection = (sock, bytearray())
        try:
            answer = self._exchange(connection, message)
        except (OSError, ValueError) as problem:
            _close(connection)
            raise _error(endpoint, problem) from None
        return self._keep(idle, connection, answer, endpoint)

    def _exchange(self, connection, message):
        sock, buffer = connection
        sock.settimeout(self.timeout)
        sock.sendall(_encode(message))
        return json.loads(_read_line(sock, buffer))

    def _keep(self, idle, connection, answer, endpoint):
        if len(idle) < self.max_idle_per_peer:
            idle.append(connection)
        else:
            _close(connection)
        if not isinstance(answer, dict):
            raise PeerError(f"{format_address(endpoint)}: the answer is not an object")
        return answer

    def close(self):
        for connections in self._idle.values():
            for sock, _ in connections:
                with contextlib.suppress(OSError):
                    sock.close()
        self._idle.clear()


def _close(connection):
    with contextlib.suppress(OSError):
        connection[0].close()


def _error(endpoint, problem):
    reason = "no answer in time" if isinstance(problem, TimeoutError) else str(problem) or "closed"
    return PeerError(f"{format_address(endpoint)}: {reason}")
