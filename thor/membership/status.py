"""The network status the active manager publishes on Thor.Members, and each member's copy of it.

    {"version": 1764048000123, "manager": "mgr1", "published": 1764048000.2,
     "members": {"node1": {entity}, ...},
     "roles": {"sip_proxy": ["node1", "node2"], ...}}

A full snapshot every time (consumers diff old and new per role). version only
grows, across manager failovers and restarts: a manager publishes
max(highest version it has seen + 1, milliseconds since the epoch).
"""

import logging
import time

import gevent
from gevent.event import Event

from thor.membership.entity import EntityError, validate_entity

__all__ = ["NetworkStatus", "StatusCache", "StatusError", "next_version"]

log = logging.getLogger("thor.membership")


class StatusError(ValueError):
    pass


def next_version(highest_seen):
    return max(highest_seen + 1, int(time.time() * 1000))


class NetworkStatus:
    """An immutable network status."""

    __slots__ = ("_roles", "manager", "members", "published", "version")

    def __init__(self, version, manager, members, published=None):
        self.version = version
        self.manager = manager
        self.members = members  # name -> entity dict
        self.published = published if published is not None else time.time()
        roles = {}
        for name in sorted(members):
            for role in members[name]["roles"]:
                roles.setdefault(role, []).append(name)
        self._roles = {role: tuple(names) for role, names in roles.items()}

    @classmethod
    def empty(cls):
        return cls(0, None, {}, 0.0)

    @property
    def roles(self):
        """role -> tuple of member names (sorted)."""
        return self._roles

    def role_members(self, role):
        """The live entities of role, sorted by name."""
        return [self.members[name] for name in self._roles.get(role, ())]

    def addresses(self, role):
        return [self.members[name]["address"] for name in self._roles.get(role, ())]

    def to_json(self):
        return {
            "version": self.version,
            "manager": self.manager,
            "published": self.published,
            "members": self.members,
            "roles": {role: list(names) for role, names in self._roles.items()},
        }

    @classmethod
    def from_json(cls, body):
        if not isinstance(body, dict):
            raise StatusError("status is not an object")
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StatusError("status version is not a positive integer")
        manager = body.get("manager")
        if not isinstance(manager, str):
            raise StatusError("status manager is not a name")
        members = body.get("members")
        if not isinstance(members, dict):
            raise StatusError("status members is not an object")
        try:
            entities = {name: validate_entity(entity) for name, entity in members.items()}
        except EntityError as error:
            raise StatusError(str(error)) from None
        for name, entity in entities.items():
            if entity["name"] != name:
                raise StatusError(f"status member {name} carries the name {entity['name']}")
        published = body.get("published", 0.0)
        if not isinstance(published, (int, float)):
            raise StatusError("status published is not a time")
        return cls(version, manager, entities, float(published))

    def __repr__(self):
        roles = ", ".join(f"{role}={len(names)}" for role, names in sorted(self._roles.items()))
        return f"NetworkStatus(v{self.version} by {self.manager}: {roles})"


class StatusCache:
    """A member's latest network status; newer versions replace it, older ones are ignored.

    Readers take `status` (an immutable NetworkStatus swapped whole on
    update), or register callbacks on_change(old, new).
    """

    def __init__(self):
        self.status = NetworkStatus.empty()
        self.received = 0.0
        self._callbacks = []
        self._changed = Event()

    def on_change(self, callback):
        self._callbacks.append(callback)

    def update(self, body):
        """Take a Thor.Members body; returns True when it became the current status."""
        try:
            status = NetworkStatus.from_json(body)
        except StatusError as error:
            log.warning("ignoring a network status: %s", error)
            return False
        self.received = time.time()
        if status.version <= self.status.version:
            return False
        old, self.status = self.status, status
        self._changed.set()
        self._changed = Event()
        for callback in tuple(self._callbacks):
            try:
                callback(old, status)
            except Exception:
                log.exception("network status callback failed")
        return True

    def wait(self, predicate, timeout=None):
        """Wait until predicate(status) holds; returns the status, or None on timeout."""
        with gevent.Timeout(timeout, False):
            while not predicate(self.status):
                self._changed.wait()
            return self.status
        return None
