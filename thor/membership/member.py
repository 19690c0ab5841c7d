"""The membership every Thor program has: its presence, a clean leave, and the network status."""

import logging
import time

from thor import __version__
from thor.events.topics import LEAVE, MEMBERS, PRESENCE
from thor.membership.entity import make_entity
from thor.membership.status import StatusCache

__all__ = ["OverlayMember"]

log = logging.getLogger("thor.membership")


class OverlayMember:
    """Publishes this member's entity (retained, so every server and newcomer has it) and follows Thor.Members."""

    def __init__(
        self, client, name, address, roles=(), attributes=None, follow_status=True, announce=True, withdrawn=None
    ):
        self.client = client
        self.announce = announce
        self.name = name
        self.address = address
        self.roles = tuple(sorted(roles))
        self.attributes = dict(attributes or {})
        self.withdrawn = dict(withdrawn or {})
        self.since = time.time()
        self.status = StatusCache()
        if follow_status:
            # Through one event server (another when its link drops: the retained log catches up),
            # every copy: the status tells copies apart by version, and a member that missed a
            # change asks the server for the retained status again (copies it has seen).
            client.subscribe(
                MEMBERS, lambda message: self.status.update(message.body), deduplicate=False, one_server=True
            )
            self.status.on_gap = lambda: client.refresh(MEMBERS)

    @property
    def entity(self):
        return make_entity(
            self.name,
            self.address,
            self.roles,
            __version__,
            self.since,
            attributes=self.attributes,
            withdrawn=self.withdrawn,
        )

    def start(self):
        self._announce()
        self.client.start()

    def set_roles(self, roles, withdrawn=None):
        """Announce roles; withdrawn: {role: why} for the roles held back (shown to operators)."""
        roles, withdrawn = tuple(sorted(roles)), dict(withdrawn or {})
        if roles != self.roles or withdrawn != self.withdrawn:
            if roles != self.roles:
                log.info("announcing roles %s", ",".join(roles) or "(none)")
            self.roles, self.withdrawn = roles, withdrawn
            self._announce()

    def set_attributes(self, attributes):
        if attributes != self.attributes:
            self.attributes = dict(attributes)
            self._announce()

    def _announce(self):
        if self.announce:
            self.client.publish(PRESENCE, self.entity, retain=True)

    def leave(self, flush_timeout=1.0):
        """Say goodbye on every server, then close: the manager drops us at once."""
        if self.announce:
            self.client.publish(LEAVE, {"name": self.name})
        self.client.stop(flush_timeout=flush_timeout)
