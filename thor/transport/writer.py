"""A bounded, queued writer for a socket shared by several greenlets.

Writers never block the caller: frames are queued and a dedicated greenlet
sends everything queued in one write (fewer TLS records and system calls).
The queue is bounded in bytes; send() on a full queue returns False and calls
on_overflow once, so the owner can cut off a peer that does not keep up. A
catch-up (what a peer is owed at once, however large) may go beyond the bound:
send(frame, catch_up=True) raises the bound by its size until the sending
greenlet takes it, so that only what is queued after it counts.
"""

import collections
import contextlib
import socket

import gevent
from gevent.event import Event

__all__ = ["QueuedWriter"]


class QueuedWriter:
    def __init__(self, sock, limit, on_overflow=None, on_error=None):
        self.socket = sock
        self.limit = limit
        self.on_overflow = on_overflow
        self.on_error = on_error
        self.closed = False
        self._queue = collections.deque()
        self._queued_bytes = 0
        self._catch_up_bytes = 0  # queued beyond the bound, by send(catch_up=True)
        self.batches = 0  # how many times the sending greenlet took the queue
        self._ready = Event()
        self._greenlet = gevent.spawn(self._run)

    @property
    def queued_bytes(self):
        return self._queued_bytes

    def send(self, frame, catch_up=False):
        if self.closed:
            return False
        if catch_up:
            self._catch_up_bytes += len(frame)
        elif self._queued_bytes + len(frame) > self.limit + self._catch_up_bytes:
            self.closed = True
            if self.on_overflow is not None:
                self.on_overflow()
            self._shutdown()
            return False
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._ready.set()
        return True

    def _run(self):
        try:
            while True:
                self._ready.wait()
                self._ready.clear()
                if self._queue:
                    batch = b"".join(self._queue)
                    self._queue.clear()
                    self._queued_bytes = self._catch_up_bytes = 0
                    self.batches += 1
                    self.socket.sendall(batch)
                if self.closed and not self._queue:
                    return
        except OSError as error:
            self.closed = True
            if self.on_error is not None:
                self.on_error(error)
            self._shutdown()

    def close(self, flush_timeout=0):
        """Stop accepting frames; send what is queued within flush_timeout, then shut the socket down."""
        self.closed = True
        self._ready.set()
        if flush_timeout:
            self._greenlet.join(flush_timeout)
        self._greenlet.kill(block=False)
        self._shutdown()

    def _shutdown(self):
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
