"""NGNPro's side of the account loads: a node asks for the accounts it owns, NGNPro answers.

A request (Thor.AccountsWanted, which the event servers let a member publish
under its own name only) is answered only by the active NGNPro, only for a
live sip_proxy member asking for its own address, and only once NGNPro's own
ring has reached the status the node asked with. The answer is every account
and alias the node owns on that ring, read in one database snapshot and sent
on the node's own topic (Thor.Accounts.<name>) in parts. At most max_loads
snapshots are read at once (each holds a database connection); a node has at
most one load in flight: asking again while it waits keeps its place, asking
again while it is answered starts it over. The wait for the ring and the
checks of the requester come before a load takes its slot: a member asking
with a ring version that never comes, or in a name it does not hold, keeps
no other node's load waiting.
"""

import contextlib
import logging
import time

import gevent
import gevent.lock

from thor import roles
from thor.accounts.protocol import ACCOUNTS_WANTED, EVERYONE_KEEPS, accounts_topic, record_batches

__all__ = ["AccountLoads"]

log = logging.getLogger("thor.accounts")

# How long a request may wait for this NGNPro's ring to reach the status it was asked with.
RING_WAIT = 10.0


class AccountLoads:
    def __init__(self, client, status_cache, rings, snapshot, is_active, batch_size, max_loads, unavailable=()):
        """snapshot(): a closable iterator of record lists (one database snapshot); is_active():
        whether this NGNPro answers the nodes; unavailable: the errors meaning the database is away."""
        self.client = client
        self.status_cache = status_cache
        self.rings = rings
        self.snapshot = snapshot
        self.is_active = is_active
        self.batch_size = batch_size
        self.unavailable = tuple(unavailable)
        self._loads = {}  # node name -> its _Load, waiting or being answered
        self._slots = gevent.lock.BoundedSemaphore(max_loads)

    def start(self):
        self.client.subscribe(ACCOUNTS_WANTED, self._wanted)

    def stop(self, timeout=2):
        # A killed load hands its database connection back on the way out.
        gevent.killall([load.greenlet for load in self._loads.values()], timeout=timeout)

    def _wanted(self, message):
        body = message.body
        if not self.is_active() or not isinstance(body, dict):
            return
        name, address, request, ring = (body.get(key) for key in ("name", "address", "request", "ring"))
        if not (isinstance(name, str) and isinstance(address, str) and isinstance(request, str)):
            return
        if not isinstance(ring, int) or isinstance(ring, bool):
            return
        load = self._loads.get(name)
        if load is not None and not load.started:
            # Asked again while waiting for a slot: answer the newer request, keeping the place.
            load.address, load.request, load.ring = address, request[:128], ring
            return
        if load is not None:  # asked again while being answered: the node gave up on that answer
            load.greenlet.kill(block=False)
        load = self._loads[name] = _Load(address, request[:128], ring)
        load.greenlet = gevent.spawn(self._answer, name, load)

    def _answer(self, name, load):
        deadline = time.monotonic() + RING_WAIT
        try:
            while True:
                # Outside the slots: one wait per node at most, whatever ring version it names.
                ring = load.ring
                if not self.rings.wait(ring, timeout=max(0.0, deadline - time.monotonic())):
                    log.warning("account request %s: no ring of status %s yet; not answering", load.request, ring)
                    return
                with self._slots:  # a snapshot holds a database connection for the whole load
                    if load.ring != ring:
                        continue  # asked again with a newer ring while waiting for its slot
                    load.started = True
                    self._check_and_send(name, load.address, load.request)
                    return
        finally:
            if self._loads.get(name) is load:
                del self._loads[name]

    def _check_and_send(self, name, address, request):
        entity = self.status_cache.status.members.get(name)
        if entity is None or entity.get("address") != address or roles.SIP_PROXY not in entity.get("roles", ()):
            log.warning(
                "account request %s: %s is not a live %s at %s; not answering", request, name, roles.SIP_PROXY, address
            )
            return
        self._send(name, address, request)

    def _send(self, name, address, request):
        """Every account and alias the node owns, on its topic, in parts, from one snapshot."""
        ring = self.rings.table.ring(roles.SIP_PROXY)
        topic = accounts_topic(name)
        held, part, total = [], 0, 0  # each part is sent once the next exists, so the last is marked last
        try:
            with contextlib.closing(self.snapshot()) as snapshot:
                owned = (
                    change
                    for changes in snapshot
                    for change in changes
                    if change["kind"] in EVERYONE_KEEPS or (ring is not None and ring.owner(change["key"]) == address)
                )
                for batch in record_batches(owned, self.batch_size):
                    if held:
                        self.client.publish(topic, {"request": request, "part": part, "records": held, "last": False})
                        part, total = part + 1, total + len(held)
                        gevent.sleep(0)
                    held = batch
        except self.unavailable as problem:
            log.warning("account request %s of %s not answered: %s", request, name, problem)
            return
        self.client.publish(topic, {"request": request, "part": part, "records": held, "last": True})
        log.info("account request %s: sent %d entries to %s", request, total + len(held), name)


class _Load:
    """A node's request for its accounts, from when it arrives until it is answered."""

    __slots__ = ("address", "greenlet", "request", "ring", "started")

    def __init__(self, address, request, ring):
        self.address, self.request, self.ring = address, request, ring
        self.started = False  # holds a load slot: asking again now starts over
        self.greenlet = None
