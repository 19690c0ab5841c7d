"""The network status the active manager publishes on Thor.Members, and each member's copy of it.

    {"version": 1764048000123, "manager": "mgr1", "published": 1764048000.2,
     "members": {"node1": {member}, ...},
     "roles": {"sip_proxy": ["node1", "node2"], ...}}

A member is one name (one host certificate) with the live programs of that
name merged; each role keeps what the program announcing it said (its start,
version and attributes), so programs sharing a host never mix their
attributes (docs/membership.md):

    {"name": "thor1", "address": "192.0.2.11", "roles": ["provisioning_server", "thor_eventserver"],
     "version": "0.1.0", "status": "ok", "since": 1764048000.0,
     "services": {"thor_eventserver": {"since": 1764048000.0, "version": "0.1.0", "attributes": {"port": 8000}},
                  "provisioning_server": {"since": 1764048100.0, "version": "0.1.0", "attributes": {"port": 9200}}},
     "withdrawn": {}}

A full snapshot every time (consumers diff old and new per role). version only
grows, across manager failovers and restarts: a manager publishes
max(highest version it has seen + 1, milliseconds since the epoch).
"""

import logging
import time

import gevent
from gevent.event import Event

from thor.membership.entity import MAX_TEXT, EntityError, validate_attributes, validate_entity, validate_withdrawn

__all__ = ["NetworkStatus", "StatusCache", "StatusError", "merge_presence", "next_version", "validate_member"]

log = logging.getLogger("thor.membership")


class StatusError(ValueError):
    pass


def next_version(highest_seen):
    return max(highest_seen + 1, int(time.time() * 1000))


def merge_presence(entities):
    """The status member of one name from the presence entities of its live programs.

    The eldest program gives the member's address, version and since; each
    role's service is what the youngest program announcing it said (a
    restarted program replaces its predecessor); a role is withdrawn only
    while no live program announces it.
    """
    ordered = sorted(entities, key=lambda entity: entity["since"])
    eldest = ordered[0]
    services, withdrawn = {}, {}
    for entity in ordered:
        service = {"since": entity["since"], "version": entity["version"], "attributes": dict(entity["attributes"])}
        for role in entity["roles"]:
            services[role] = service
        withdrawn.update(entity.get("withdrawn", {}))
    return {
        "name": eldest["name"],
        "address": eldest["address"],
        "roles": sorted(services),
        "version": eldest["version"],
        "status": eldest["status"],
        "since": eldest["since"],
        "services": services,
        "withdrawn": {role: reason for role, reason in withdrawn.items() if role not in services},
    }


def validate_member(body):
    """A normalized copy of a status member, or raise EntityError saying what is wrong."""
    if not isinstance(body, dict):
        raise EntityError("member is not an object")
    services = body.get("services")
    if not isinstance(services, dict):
        raise EntityError(f"member {str(body.get('name'))[:MAX_TEXT]}: services is not an object")
    # The member's own fields have the shape of a presence entity with its roles being its services' roles.
    member = validate_entity({**body, "roles": list(services), "attributes": {}})
    name = member["name"]
    checked = {}
    for role, service in services.items():
        if role not in member["roles"] or not isinstance(service, dict):
            raise EntityError(f"member {name}: service {str(role)[:MAX_TEXT]!r} is not a role's object")
        since, version = service.get("since"), service.get("version", "")
        if not isinstance(since, (int, float)) or isinstance(since, bool):
            raise EntityError(f"member {name}: service {role}: since is not a number")
        if not isinstance(version, str) or len(version) > MAX_TEXT:
            raise EntityError(f"member {name}: service {role}: version is not a short text")
        attributes = validate_attributes(name, service.get("attributes", {}))
        checked[role] = {"since": float(since), "version": version, "attributes": attributes}
    del member["attributes"]
    member["services"] = checked
    member["withdrawn"] = validate_withdrawn(name, body.get("withdrawn", {}))
    return member


class NetworkStatus:
    """An immutable network status."""

    __slots__ = ("_roles", "manager", "members", "published", "version")

    def __init__(self, version, manager, members, published=None):
        self.version = version
        self.manager = manager
        self.members = members  # name -> member dict (merge_presence)
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
        """The live members of role, sorted by name."""
        return [self.members[name] for name in self._roles.get(role, ())]

    def service(self, name, role):
        """What the program of member name that announces role said: {since, version, attributes}, or None."""
        member = self.members.get(name)
        return None if member is None else member["services"].get(role)

    def attributes(self, name, role):
        """The attributes member name announces with role ({} when it does not announce it)."""
        service = self.service(name, role)
        return {} if service is None else service["attributes"]

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
            entities = {name: validate_member(member) for name, member in members.items()}
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
