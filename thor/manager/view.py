"""What a manager knows of the network, and who the active manager is.

Several programs of one host (an event server and a manager, say) share the
host's certificate and so its name; each publishes its own presence under its
own session. The view therefore keeps presence per (name, session) and merges
the live sessions of a name into one member: roles united, each role's
attributes those of the program that announces it (merge_presence).

Liveness: a session is alive while at least one event server reports a
connection that carries it (Thor.Connections: each server announces the
sessions a connection publishes with). An event server's own session is alive
while this manager's link to that server is up. A crash closes the
connections at once; a cut link is found by the event servers' keepalive
timeout; a clean stop sends Thor.Leave first.

Election (docs/membership.md): the active manager is the live thor_manager
session that has been up longest (smallest `since`, then smallest name).
Every manager computes it from the same shared view, so they agree without
talking to each other; a returning manager is the youngest and takes nothing
over; the active stays active while it lives.
"""

import logging
import time

from thor import roles
from thor.membership.entity import EntityError, validate_entity
from thor.membership.status import NetworkStatus, merge_presence

__all__ = ["NetworkView"]

log = logging.getLogger("thor.manager")

# Presence of a session no server has reported for this long is forgotten.
FORGET_AFTER = 600.0


class NetworkView:
    def __init__(self):
        self.connections = {}  # server -> {connection id -> set of (name, session)}
        self.server_sessions = {}  # server -> (server name, the server's own session)
        self.presence = {}  # (name, session) -> entity
        self.left = set()  # (name, session) that said Thor.Leave
        self.dead_since = {}  # (name, session) -> when it was last seen alive
        # Called with (name, session) when a long dead session is forgotten, so
        # that the client's de-duplication forgets it too and a return is seen.
        self.on_forget = None

    # -- Thor.Connections -------------------------------------------------------

    # A session counts only for the name of the connection that carries it: a
    # member that reuses another's session string keeps nobody else alive.
    def server_snapshot(self, server, session, members):
        self.server_sessions[server] = (server, session)
        self.connections[server] = {member["connection"]: _sessions(member) for member in members}

    def connected(self, server, member):
        self.connections.setdefault(server, {})[member["connection"]] = _sessions(member)

    def session(self, server, member, session):
        self.connections.setdefault(server, {}).setdefault(member["connection"], set()).add((member["name"], session))

    def disconnected(self, server, member):
        self.connections.get(server, {}).pop(member["connection"], None)

    def server_lost(self, server):
        """Our link to server broke: what it told us no longer counts."""
        self.connections.pop(server, None)
        self.server_sessions.pop(server, None)

    # -- Thor.Presence / Thor.Leave ---------------------------------------------

    # Presence stays known after a session's connections drop: when its link
    # comes back, its client re-sends the same retained presence, which the
    # de-duplication of our client does not hand us a second time.
    def update_presence(self, publisher, session, body):
        try:
            entity = validate_entity(body)
        except EntityError as error:
            log.warning("ignoring presence of %s: %s", publisher, error)
            return
        if entity["name"] != publisher:  # the event server enforces this; defence in depth
            return
        self.presence[(publisher, session)] = entity
        self.left.discard((publisher, session))

    def leave(self, publisher, session):
        # Only a known session can leave: unknown ones would only grow the set.
        if self.presence.pop((publisher, session), None) is not None:
            self.left.add((publisher, session))

    # -- results ----------------------------------------------------------------

    def _alive_sessions(self):
        alive = set(self.server_sessions.values())
        for table in self.connections.values():
            for sessions in table.values():
                alive |= sessions
        return alive

    def live_sessions(self):
        """{(name, session): entity} of every live, not departed session."""
        alive = self._alive_sessions()
        now = time.monotonic()
        live = {}
        for key, entity in list(self.presence.items()):
            if key in alive and key not in self.left:
                live[key] = entity
                self.dead_since.pop(key, None)
            elif now - self.dead_since.setdefault(key, now) > FORGET_AFTER:
                del self.presence[key]
                del self.dead_since[key]
                self.left.discard(key)
                if self.on_forget is not None:
                    self.on_forget(*key)
        return live

    def live_members(self):
        """{name: status member}, the live sessions of each name merged (merge_presence)."""
        sessions = {}
        for (name, _), entity in self.live_sessions().items():
            sessions.setdefault(name, []).append(entity)
        return {name: merge_presence(entities) for name, entities in sessions.items()}

    def active_manager(self):
        managers = [entity for entity in self.live_sessions().values() if roles.MANAGER in entity["roles"]]
        if not managers:
            return None
        return min(managers, key=lambda entity: (entity["since"], entity["name"]))["name"]

    def status(self, version, manager):
        return NetworkStatus(version, manager, self.live_members())


def _sessions(member):
    return {(member["name"], session) for session in member.get("sessions", ())}
