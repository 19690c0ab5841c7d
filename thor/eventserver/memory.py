"""An in-memory event bus for tests: real event servers and clients, no sockets to the outside, no TLS.

Tests of what runs on the bus (the manager's election, the account cache and
NGNPro's loads) use it to run several members in one process, quickly and
deterministically; the code under test is the code that runs over TLS
(thor.transport.memory replaces only the transport).

    bus = MemoryBus(servers=2)
    client = bus.client("manager1", {"thor_manager"})
    ...
    bus.close()
"""

import itertools
import time

from thor import __version__, roles
from thor.events.client import EventClient
from thor.eventserver.server import EventServer, Limits
from thor.identity import Identity
from thor.membership.entity import make_entity
from thor.transport.memory import MemoryNetwork

__all__ = ["MemoryBus"]

PORT = 8000
# Quick keepalives: a member that stops answering is gone in well under a second.
LIMITS = {"keepalive": 0.1, "idle_timeout": 0.5, "handshake_timeout": 1.0}


class MemoryBus:
    def __init__(self, servers=2, **limits):
        self.network = MemoryNetwork()
        self.servers = {}
        self.clients = []
        self._serials = itertools.count(1)
        self._limits = dict(LIMITS, **limits)
        for index in range(servers):
            self.add_server(f"es{index + 1}")

    @property
    def endpoints(self):
        return [(name, PORT) for name in sorted(self.servers)]

    def add_server(self, name):
        address = f"127.0.8.{len(self.servers) + 1}"
        presence = make_entity(name, address, [roles.EVENT_SERVER], __version__, time.time(), attributes={"port": PORT})
        server = EventServer(name, Limits(**self._limits), presence=presence)
        identity = Identity(name, {roles.EVENT_SERVER}, next(self._serials), addresses=[address])
        self.network.listen((name, PORT), identity, server.serve)
        self.servers[name] = server
        return server

    def kill_server(self, name):
        """The event server crashes: its members' connections end at once."""
        self.network.close((name, PORT))
        self.servers.pop(name).stop()

    def client(self, name, member_roles, address=None, servers=None, **settings):
        """An EventClient of the member name whose certificate grants member_roles (not started),
        connecting to servers ((name, PORT) endpoints; None: every server of the bus)."""
        identity = Identity(name, member_roles, next(self._serials), addresses=[address] if address else ())
        settings.setdefault("backoff", (0.02, 0.2))
        settings.setdefault("connect_timeout", 1.0)
        endpoints = self.endpoints if servers is None else servers
        client = EventClient(None, servers=endpoints, connector=self.network.connector(identity), **settings)
        self.clients.append(client)
        return client

    def close(self):
        for client in self.clients:
            client.stop(flush_timeout=0)
        for name in list(self.servers):
            self.kill_server(name)
