"""The lookup table: one hash ring per role, built from a network status, and its follower.

A LookupTable is immutable. RingFollower builds a new one whenever the
network status changes and swaps it in with one assignment, so a lookup in
progress keeps the table it started with and never sees a half-built ring.
"""

import logging

import gevent
from gevent.event import Event

from thor.lookup.ring import DEFAULT_POINTS, HashRing, normalize_key

__all__ = ["LookupTable", "NoMembersError", "RingFollower"]

log = logging.getLogger("thor.lookup")

# Seconds before building a failed table again, doubling up to RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class NoMembersError(LookupError):
    """No live member has the role."""


class LookupTable:
    __slots__ = ("_members", "_owner_of", "_rings", "manager", "points", "version")

    def __init__(self, version, manager, role_addresses, points=DEFAULT_POINTS, previous=None):
        """role_addresses: role -> addresses of its live members. A previous table's rings are
        reused for roles whose members did not change."""
        self.version = version
        self.manager = manager
        self.points = points
        self._members = {role: frozenset(addresses) for role, addresses in role_addresses.items() if addresses}
        reusable = previous._rings if previous is not None and previous.points == points else {}
        self._rings = {}
        for role, members in self._members.items():
            ring = reusable.get(role)
            if ring is None or frozenset(ring.nodes) != members:
                ring = HashRing(members, points)
            self._rings[role] = ring
        self._owner_of = {role: ring.owner for role, ring in self._rings.items()}

    @classmethod
    def empty(cls, points=DEFAULT_POINTS):
        return cls(0, None, {}, points)

    @classmethod
    def from_status(cls, status, points=DEFAULT_POINTS, previous=None):
        roles = {role: status.addresses(role) for role in status.roles}
        return cls(status.version, status.manager, roles, points, previous)

    def lookup(self, role, key):
        """The address of the node responsible for key (any form normalize_key takes) in role.

        Raises InvalidKeyError for a text that is not a subscriber address, NoMembersError when no
        live member has the role.
        """
        owner = self._owner_of.get(role)
        if owner is None:
            normalize_key(key)  # a bad key is reported as such whatever the role
            raise NoMembersError(role)
        return owner(normalize_key(key))

    def is_online(self, address, role):
        members = self._members.get(role)
        return members is not None and address in members

    def members(self, role):
        """The addresses of the live members of role, sorted."""
        return tuple(sorted(self._members.get(role, ())))

    @property
    def roles(self):
        return tuple(sorted(self._members))

    def ring(self, role):
        return self._rings.get(role)


class RingFollower:
    """Keeps `table` equal to the latest network status of a StatusCache.

    Builds run one at a time in a greenlet, always from the newest status
    (statuses arriving during a build are coalesced), in the hub's thread pool
    so that a big ring (100 nodes x 4000 points takes a fraction of a second)
    does not stop the event loop.
    """

    def __init__(self, status_cache, points=DEFAULT_POINTS):
        self.points = points
        self.table = LookupTable.empty(points)
        self._cache = status_cache
        self._wanted = Event()
        self._built = Event()
        self._worker = None
        self._callbacks = []
        status_cache.on_change(lambda old, new: self._wanted.set())

    def on_change(self, callback):
        """callback(old table, new table) after each swap."""
        self._callbacks.append(callback)

    def start(self):
        self._worker = gevent.spawn(self._run)
        if self._cache.status.version:
            self._wanted.set()

    def stop(self):
        if self._worker is not None:
            self._worker.kill(block=False)

    def wait(self, version, timeout=None):
        """Wait until the table is built from a status of at least version; returns whether it is."""
        with gevent.Timeout(timeout, False):
            while self.table.version < version:
                self._built.wait()
        return self.table.version >= version

    def _run(self):
        threadpool = gevent.get_hub().threadpool
        retry = RETRY_FIRST
        while True:
            self._wanted.wait()
            self._wanted.clear()
            status = self._cache.status
            if status.version <= self.table.version:
                continue
            try:
                table = threadpool.apply(LookupTable.from_status, (status, self.points, self.table))
            except Exception:
                # (Out of memory, say.) The status will not come again by itself: try again.
                log.exception(
                    "building the rings of status %s failed; keeping %s, trying again in %s s",
                    status.version,
                    self.table.version,
                    retry,
                )
                gevent.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                self._wanted.set()
                continue
            retry = RETRY_FIRST
            old, self.table = self.table, table
            for callback in tuple(self._callbacks):
                try:
                    callback(old, table)
                except Exception:
                    log.exception("lookup table callback failed")
            log.debug("lookup rings follow status %s (%s)", table.version, ", ".join(table.roles) or "no roles")
            self._built.set()
            self._built = Event()
