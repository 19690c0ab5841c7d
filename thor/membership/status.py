"""The network status the active manager publishes on Thor.Members, and each member's copy of it.

A status is a version, the manager and its chain, and the live members:

    {"version": 1764048000123, "manager": "mgr1", "chain": "3f2a9c0e41b7", "published": 1764048000.2,
     "members": {"node1": {member}, ...},
     "roles": {"sip_proxy": ["node1", "node2"], ...}}

(that is to_json(), what thor-monitor --json prints). A member is one name (one
host certificate) with the live programs of that name merged; each role keeps
what the program announcing it said (its start, version and attributes), so
programs sharing a host never mix their attributes (docs/membership.md):

    {"name": "thor1", "address": "192.0.2.11", "roles": ["provisioning_server", "thor_eventserver"],
     "version": "0.1.0", "status": "ok", "since": 1764048000.0,
     "services": {"thor_eventserver": {"since": 1764048000.0, "version": "0.1.0", "attributes": {"port": 8000}},
                  "provisioning_server": {"since": 1764048100.0, "version": "0.1.0", "attributes": {"port": 9200}}},
     "withdrawn": {}}

On the bus (docs/protocol.md, "The network status") a status travels as a
snapshot in parts, then as the changes from one version to the next, so that
what a change costs each member grows with what changed, not with the network:

    {"kind": "snapshot", "chain": C, "version": V, "manager": M, "published": T,
     "part": 0, "parts": 3, "entries": {name: member, ... at most PART_MEMBERS}}
    {"kind": "changes", "chain": C, "version": V, "previous": P, "manager": M, "published": T,
     "entries": {name: member, ...}, "left": [name, ...]}
    {"kind": "current", "chain": C, "version": V, "manager": M}

A chain is one manager's run of versions from one snapshot on; version only
grows, across manager failovers and restarts: a manager publishes
max(highest version it has seen + 1, milliseconds since the epoch). A member
applies changes whose previous version is the one it holds on the same chain;
changes it cannot apply (a gap, another chain) and a "current" naming another
version make it ask again for the retained snapshot and changes (StatusCache
calls on_gap), which it takes whatever their version if they are of the chain
it asked for. The body of the first design (a whole status, no kind) is still
understood, as a snapshot of one part.
"""

import bisect
import json
import logging
import time

import gevent
from gevent.event import Event

from thor.membership.entity import MAX_TEXT, EntityError, validate_attributes, validate_identity, validate_withdrawn

__all__ = [
    "PART_MEMBERS",
    "NetworkStatus",
    "StatusCache",
    "StatusError",
    "changes_body",
    "current_body",
    "merge_presence",
    "next_version",
    "snapshot_bodies",
    "validate_member",
]

log = logging.getLogger("thor.membership")

# A snapshot part holds at most this many members and bytes (about 60 KB with usual members):
# far below any frame limit, however large the members' attributes.
PART_MEMBERS = 200
PART_BYTES = 256 << 10
# What a member holds while it gathers snapshots: parts of one (1,000 parts are at least
# 200,000 members), members in a part (the bound a publisher of another version keeps too),
# snapshots at once.
MAX_PARTS = 1000
MAX_PART_MEMBERS = 1000
MAX_ASSEMBLIES = 2
# A member asks again for the retained status at most this often (seconds).
GAP_RETRY = 1.0


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
    # The member's own fields are a presence entity's, its roles being its services' roles.
    member = validate_identity(body, list(services))
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
    member["services"] = checked
    member["withdrawn"] = validate_withdrawn(name, body.get("withdrawn", {}))
    return member


class NetworkStatus:
    """An immutable network status."""

    __slots__ = ("_roles", "chain", "manager", "members", "published", "version")

    def __init__(self, version, manager, members, published=None, chain="", roles=None):
        """roles: role -> sorted tuple of names, when the caller has it (changed())."""
        self.version = version
        self.manager = manager
        self.chain = chain
        self.members = members  # name -> member dict (merge_presence)
        self.published = published if published is not None else time.time()
        if roles is None:
            roles = {}
            for name in sorted(members):
                for role in members[name]["roles"]:
                    roles.setdefault(role, []).append(name)
        self._roles = {role: tuple(names) for role, names in roles.items() if names}

    def changed(self, version, manager, published, entries, left):
        """This status with the members of entries (name -> member) replaced or added and
        those of left gone: what a change costs a member grows with what changed."""
        members = dict(self.members)
        for name in left:
            members.pop(name, None)
        members.update(entries)
        # Only the roles of the members that changed are touched (a role of thousands keeps its
        # tuple when none of its members changed).
        touched = {}  # role -> its names, copied once

        def names_of(role):
            names = touched.get(role)
            if names is None:
                names = touched[role] = list(self._roles.get(role, ()))
            return names

        for name in [*left, *entries]:
            for role in self.members[name]["roles"] if name in self.members else ():
                names = names_of(role)
                del names[bisect.bisect_left(names, name)]
        for name, member in entries.items():
            for role in member["roles"]:
                bisect.insort(names_of(role), name)
        return NetworkStatus(version, manager, members, published, self.chain, {**self._roles, **touched})

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
            "chain": self.chain,
            "published": self.published,
            "members": self.members,
            "roles": {role: list(names) for role, names in self._roles.items()},
        }

    @classmethod
    def from_json(cls, body):
        """A whole status (to_json(), or the first design's Thor.Members body)."""
        header = _header(body)
        members = _entries(body.get("members"), "members")
        return cls(header["version"], header["manager"], members, header["published"], header["chain"])

    def __repr__(self):
        roles = ", ".join(f"{role}={len(names)}" for role, names in sorted(self._roles.items()))
        return f"NetworkStatus(v{self.version} by {self.manager}: {roles})"


def _header(body):
    """version, manager, chain and published of a Thor.Members body, checked."""
    if not isinstance(body, dict):
        raise StatusError("status is not an object")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StatusError("status version is not a positive integer")
    manager = body.get("manager")
    if not isinstance(manager, str):
        raise StatusError("status manager is not a name")
    chain = body.get("chain", manager)
    if not isinstance(chain, str) or len(chain) > MAX_TEXT:
        raise StatusError("status chain is not a short text")
    published = body.get("published", 0.0)
    if not isinstance(published, (int, float)) or isinstance(published, bool):
        raise StatusError("status published is not a time")
    return {"version": version, "manager": manager, "chain": chain, "published": float(published)}


def _entries(members, what):
    """{name: validated member} of a body's members or entries."""
    if not isinstance(members, dict):
        raise StatusError(f"status {what} is not an object")
    try:
        entities = {name: validate_member(member) for name, member in members.items()}
    except EntityError as error:
        raise StatusError(str(error)) from None
    for name, entity in entities.items():
        if entity["name"] != name:
            raise StatusError(f"status member {name} carries the name {entity['name']}")
    return entities


def _count(body, key, low, high):
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StatusError(f"status {key} is not a number from {low} to {high}")
    return value


# -- what the active manager publishes ----------------------------------------------


def snapshot_bodies(status, part_members=PART_MEMBERS, part_bytes=PART_BYTES):
    """The Thor.Members bodies of status as a snapshot: its members in parts (one at least)
    of at most part_members members and about part_bytes bytes."""
    chunks, chunk, size = [], [], 0
    for name in sorted(status.members):
        member_size = len(json.dumps(status.members[name], separators=(",", ":")))
        if chunk and (len(chunk) == part_members or size + member_size > part_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(name)
        size += member_size
    chunks.append(chunk)
    head = {
        "kind": "snapshot",
        "chain": status.chain,
        "version": status.version,
        "manager": status.manager,
        "published": status.published,
        "parts": len(chunks),
    }
    return [dict(head, part=index, entries={n: status.members[n] for n in chunk}) for index, chunk in enumerate(chunks)]


def changes_body(old, new):
    """The Thor.Members body that turns status old into new (same chain), or None when equal."""
    entries = {name: member for name, member in new.members.items() if old.members.get(name) != member}
    left = sorted(set(old.members) - set(new.members))
    if not entries and not left:
        return None
    return {
        "kind": "changes",
        "chain": new.chain,
        "version": new.version,
        "previous": old.version,
        "manager": new.manager,
        "published": new.published,
        "entries": entries,
        "left": left,
    }


def current_body(status):
    """The Thor.Members body saying which status is current (a member holding another asks again)."""
    return {"kind": "current", "chain": status.chain, "version": status.version, "manager": status.manager}


# -- what each member holds ---------------------------------------------------------


class StatusCache:
    """A member's latest network status, built from Thor.Members bodies (update()).

    Readers take `status` (an immutable NetworkStatus swapped whole on
    update), or register callbacks on_change(old, new). on_gap(), when set, is
    called (at most every GAP_RETRY seconds) when this member sees that it
    misses something: it should ask again for the retained status (the
    event client's refresh()).
    """

    def __init__(self):
        self.status = NetworkStatus.empty()
        self.received = 0.0
        self.on_gap = None
        self._callbacks = []
        self._changed = Event()
        self._assemblies = {}  # (chain, version) -> {"head": header, "parts": n, "entries": {part: entries}}
        self._wanted_chain = None  # after a gap: the chain whose snapshot we take whatever its version
        self._catching_up = None  # the wanted chain's status while older than the held one (not shown)
        self._asked = -GAP_RETRY

    def on_change(self, callback):
        self._callbacks.append(callback)

    def update(self, body):
        """Take a Thor.Members body; returns True when the status changed."""
        try:
            kind = body.get("kind", "status") if isinstance(body, dict) else None
            if kind == "changes":
                return self._changes(body)
            if kind == "snapshot":
                return self._snapshot_part(body)
            if kind == "current":
                return self._current(body)
            if kind == "status":
                return self._take(NetworkStatus.from_json(body))
            raise StatusError(f"unknown kind {str(kind)[:MAX_TEXT]!r}")
        except StatusError as error:
            log.warning("ignoring a network status: %s", error)
            return False

    def _changes(self, body):
        header = _header(body)
        previous = _count(body, "previous", 0, header["version"] - 1)
        self.received = time.time()
        held = self.status
        catching_up = self._catching_up
        if catching_up is not None and (header["chain"], previous) == (catching_up.chain, catching_up.version):
            held = catching_up  # the wanted chain's next step, still older than what is shown
        elif header["version"] <= held.version:
            return False  # held already (a copy through another event server, or replayed)
        if header["chain"] != held.chain or previous != held.version:
            self._gap(header["chain"], f"changes v{previous}->v{header['version']} while holding v{held.version}")
            return False
        entries = _entries(body.get("entries"), "entries")
        left = body.get("left", [])
        if not isinstance(left, list) or not all(isinstance(name, str) for name in left):
            raise StatusError("status left is not a list of names")
        return self._take(held.changed(header["version"], header["manager"], header["published"], entries, left))

    def _snapshot_part(self, body):
        header = _header(body)
        parts = _count(body, "parts", 1, MAX_PARTS)
        part = _count(body, "part", 0, parts - 1)
        key = (header["chain"], header["version"])
        if not self._wanted(header):
            return False
        assembly = self._assemblies.get(key)
        if assembly is None or assembly["parts"] != parts:
            while len(self._assemblies) >= MAX_ASSEMBLIES:
                del self._assemblies[next(iter(self._assemblies))]
            assembly = self._assemblies[key] = {"head": header, "parts": parts, "entries": {}}
        if part in assembly["entries"]:
            return False  # a copy through another event server
        entries = body.get("entries")
        if isinstance(entries, dict) and len(entries) > MAX_PART_MEMBERS:
            raise StatusError(f"status part of {len(entries)} members (at most {MAX_PART_MEMBERS})")
        assembly["entries"][part] = _entries(entries, "entries")
        if len(assembly["entries"]) < parts:
            return False
        del self._assemblies[key]
        members = {}
        for entries in assembly["entries"].values():
            members.update(entries)
        return self._take(
            NetworkStatus(header["version"], header["manager"], members, header["published"], header["chain"])
        )

    def _current(self, body):
        header = _header(body)
        self.received = time.time()
        held = self.status
        # A member that holds nothing yet waits for the retained log its subscription brings.
        current = (header["chain"], header["version"])
        if held.version and header["version"] >= held.version and current != (held.chain, held.version):
            self._gap(header["chain"], f"v{header['version']} is current while holding v{held.version}")
        return False

    def _wanted(self, header):
        return self._newer(header["chain"], header["version"])

    def _newer(self, chain, version):
        """Whether a whole status of chain and version would replace the one held: a newer
        version, or the chain asked for after a gap when it is not the held one (a failover)."""
        held = self.status
        return version > held.version or (chain == self._wanted_chain and chain != held.chain)

    def _gap(self, chain, why):
        self._wanted_chain = chain
        now = time.monotonic()
        if self.on_gap is not None and now - self._asked >= GAP_RETRY:
            self._asked = now
            log.info("asking for the network status again: %s", why)
            self.on_gap()

    def _take(self, status):
        self.received = time.time()
        if not self._newer(status.chain, status.version):
            return False
        if status.version <= self.status.version:
            # The chain we asked for, older than what we show: after a split, the manager that
            # stays active may have published lower versions than the one that stood down. Built
            # on until it is newer (its manager outbids the other's), so that versions shown here
            # only grow and no member steps back to a status it had left.
            self._catching_up = status
            return False
        if status.chain == self._wanted_chain:
            self._wanted_chain = self._catching_up = None
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
