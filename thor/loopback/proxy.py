"""A TCP relay on loopback that a test can cut and heal: a network split between two programs.

Programs connect to the relay's port instead of the target's. cut() stops relaying without
closing anything (what a lost route looks like: no reset, only silence, until the programs'
own keepalives notice) and holds new connections unanswered; heal() closes what the cut left
hanging and relays again.
"""

import contextlib

import gevent
from gevent import socket
from gevent.server import StreamServer

__all__ = ["CuttableRelay"]


class CuttableRelay:
    def __init__(self, target, host="127.0.0.1"):
        self.target = target
        self.cut_off = False
        self._pairs = set()
        self._server = StreamServer((host, 0), self._relay)
        self._server.start()

    @property
    def endpoint(self):
        return self._server.address[:2]

    def cut(self):
        self.cut_off = True

    def heal(self):
        self.cut_off = False
        for pair in list(self._pairs):
            self._close(pair)

    def close(self):
        self._server.stop(timeout=1)
        for pair in list(self._pairs):
            self._close(pair)

    def _relay(self, client, _address):
        if self.cut_off:
            # Unanswered, as a lost route: the connecting side's own timeout ends it.
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        self._pairs.add(pair)
        back = gevent.spawn(self._pump, upstream, client)
        try:
            self._pump(client, upstream)
        finally:
            back.join(1)
            self._close(pair)

    def _pump(self, source, destination):
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    return
                if self.cut_off:
                    continue  # dropped on the floor, both ways
                destination.sendall(data)

    def _close(self, pair):
        self._pairs.discard(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
