"""What a manager knows of the network, and who the active manager is.

Liveness: a member is alive while at least one event server reports a
connection of it (Thor.Connections) and its presence (Thor.Presence) is known.
An event server is alive while this manager's link to it is up.
A crash closes its connections at once; a cut link is found by the event
servers' keepalive timeout; a clean stop sends Thor.Leave first.

Election (docs/membership.md): the active manager is the live member with the
thor_manager role that has been up longest (smallest `since`, then smallest
name). Every manager computes it from the same shared view, so they agree
without talking to each other; a returning manager is the youngest and takes
nothing over; the active stays active while it lives.
"""

import logging

from thor.membership.entity import EntityError, validate_entity
from thor.membership.status import NetworkStatus

__all__ = ["MANAGER_ROLE", "NetworkView"]

log = logging.getLogger("thor.manager")

MANAGER_ROLE = "thor_manager"


class NetworkView:
    def __init__(self):
        self.connections = {}  # server -> {member name -> {connection ids}}
        self.presence = {}  # member name -> entity
        self.left = set()  # said Thor.Leave; stays out until a new presence

    # -- Thor.Connections -------------------------------------------------------

    def server_snapshot(self, server, members):
        table = {}
        for member in members:
            table.setdefault(member["name"], set()).add(member["connection"])
        self.connections[server] = table

    def connected(self, server, member):
        self.connections.setdefault(server, {}).setdefault(member["name"], set()).add(member["connection"])

    def disconnected(self, server, member):
        table = self.connections.get(server, {})
        ids = table.get(member["name"])
        if ids is not None:
            ids.discard(member["connection"])
            if not ids:
                del table[member["name"]]

    def server_lost(self, server):
        """Our link to server broke: what it told us no longer counts."""
        self.connections.pop(server, None)

    # -- Thor.Presence / Thor.Leave ---------------------------------------------

    # Presence stays known after a member's connections drop: when its link
    # comes back, its client re-sends the same retained presence, which the
    # de-duplication of our client does not hand us a second time.
    def update_presence(self, publisher, body):
        try:
            entity = validate_entity(body)
        except EntityError as error:
            log.warning("ignoring presence of %s: %s", publisher, error)
            return
        if entity["name"] != publisher:  # the event server enforces this; defence in depth
            return
        self.presence[publisher] = entity
        self.left.discard(publisher)

    def leave(self, publisher):
        self.left.add(publisher)
        self.presence.pop(publisher, None)

    # -- results ----------------------------------------------------------------

    def is_connected(self, name):
        # An event server is alive for us while our link to it is: it reports
        # itself through the snapshot that opens its table.
        return name in self.connections or any(name in table for table in self.connections.values())

    def live_members(self):
        return {
            name: entity for name, entity in self.presence.items() if name not in self.left and self.is_connected(name)
        }

    def active_manager(self):
        managers = [entity for entity in self.live_members().values() if MANAGER_ROLE in entity["roles"]]
        if not managers:
            return None
        return min(managers, key=lambda entity: (entity["since"], entity["name"]))["name"]

    def status(self, version, manager):
        return NetworkStatus(version, manager, self.live_members())
