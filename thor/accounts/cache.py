"""The accounts a sip_proxy node is responsible for, cached from NGNPro (docs/provisioning.md).

- Every committed change arrives on Thor.Provisioning; the node keeps those
  whose key it owns on its sip_proxy ring, and every served domain (per key, the highest seq wins; a
  deletion stays as a tombstone for TOMBSTONE_SECONDS, so that an older
  change still on its way cannot bring the key back).
- When the ring changes, the node drops the keys it no longer owns and, when
  it may own more (a member left, or it joined), asks for its accounts
  (Thor.AccountsWanted). The active NGNPro answers on the node's own topic
  Thor.Accounts.<name> with every account and alias it owns, in parts, read
  in one database snapshot taken after the request. What the node cached
  before it asked is replaced by the snapshot, whatever its seq (after a
  database restore, seqs can go back), and what the snapshot does not list
  was deleted meanwhile and goes.
- It also asks when it reconnects to the event servers and every
  reload_interval seconds, so a change it missed (no event server reachable
  when it was published) is never missing for long.

Local consumers (the SIP proxy) read the cache over HTTP (accounts_application),
served on [Node] accounts_listen (loopback by default: it holds digest hashes).
"""

import hmac
import itertools
import json
import logging
import time

import gevent
from gevent.event import Event

from thor import roles
from thor.accounts.protocol import ACCOUNTS_WANTED, EVERYONE_KEEPS, KINDS, PROVISIONING, accounts_topic
from thor.lookup.ring import InvalidKeyError, normalize_key
from thor.metrics import Histogram
from thor.transport.http import reply

__all__ = ["AccountCache", "accounts_application"]

log = logging.getLogger("thor.accounts")

ROLE = roles.SIP_PROXY
PROVIDER = roles.PROVISIONING_SERVER
# How long a deletion is remembered: longer than any change can be on its way from NGNPro.
TOMBSTONE_SECONDS = 120.0
# Account loads take from milliseconds (a few hundred entries) to minutes (millions).
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Entry:
    __slots__ = ("data", "kind", "received", "seq", "stamp")

    def __init__(self, kind, seq, data, stamp):
        self.kind, self.seq, self.data, self.stamp = kind, seq, data, stamp
        self.received = time.monotonic()


class AccountCache:
    def __init__(self, member, rings, reload_interval=300.0, request_timeout=15.0):
        self.member = member
        self.rings = rings
        self.reload_interval = reload_interval
        self.request_timeout = request_timeout
        self.entries = {}
        self.loads = 0
        self.load_seconds = Histogram(LOAD_BUCKETS)  # from the request to the last part
        self._stamps = itertools.count(1)
        self._requests = itertools.count(1)
        self._load_started = 0.0
        self._pending = None  # the load in progress: (request id, stamp when asked, next part, keys seen)
        self._wanted = Event()
        self._loaded = Event()
        self._workers = []
        self._callbacks = []

    def start(self):
        client = self.member.client
        client.subscribe(PROVISIONING, self._on_changes)
        client.subscribe(accounts_topic(self.member.name), self._on_load)
        client.on_connect(lambda link: self._want())
        self.rings.on_change(self._ring_changed)
        self._workers = [gevent.spawn(self._loader), gevent.spawn(self._periodic)]

    def stop(self):
        gevent.killall(self._workers, block=False)

    def on_change(self, callback):
        """callback(key) after the entry of key is stored, replaced or removed."""
        self._callbacks.append(callback)

    def _changed(self, key):
        for callback in self._callbacks:
            callback(key)

    # Ownership

    def _owns(self, key, table=None):
        ring = (table or self.rings.table).ring(ROLE)
        return ring is not None and ring.owner(key) == self.member.address

    def _ring_changed(self, old, new):
        lost = [
            key for key, entry in self.entries.items() if entry.kind not in EVERYONE_KEEPS and not self._owns(key, new)
        ]
        for key in lost:
            del self.entries[key]
            self._changed(key)
        old_members, new_members = set(old.members(ROLE)), set(new.members(ROLE))
        if self.member.address in new_members and (
            old_members - new_members
            or self.member.address not in old_members
            or (new.members(PROVIDER) and not old.members(PROVIDER))  # NGNPro (re)appeared
        ):
            self._want()
        if lost:
            log.info("ring of status %s: dropped %d entries this node no longer owns", new.version, len(lost))

    # Changes

    def _apply(self, record, replaces_before=0):
        """Keep record if this node owns its key and it is newer than what is cached (or what is
        cached has a stamp below replaces_before); the key, or None for a record not of this node."""
        if not isinstance(record, dict):
            return None
        kind, key, seq, data = record.get("kind"), record.get("key"), record.get("seq"), record.get("data")
        if kind not in KINDS or not isinstance(key, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return None
        if data is not None and not isinstance(data, dict):
            return None
        if kind in EVERYONE_KEEPS:
            key = key.lower()
        elif not self._owns(key):
            return None
        current = self.entries.get(key)
        if current is None or current.seq < seq or current.stamp < replaces_before:
            self.entries[key] = Entry(kind, seq, data, next(self._stamps))
            self._changed(key)
        return key

    def _on_changes(self, message):
        changes = message.body.get("changes") if isinstance(message.body, dict) else None
        if not isinstance(changes, list):
            log.warning("ignoring a malformed Thor.Provisioning message from %s", message.publisher)
            return
        for record in changes:
            self._apply(record)

    # Loads

    def _want(self):
        self._wanted.set()

    def _periodic(self):
        while True:
            gevent.sleep(self.reload_interval)
            self._want()

    def _loader(self):
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while self.rings.table.ring(ROLE) is not None and self._owns_something():
                request = f"{self.member.name}-{next(self._requests)}"
                self._pending = (request, next(self._stamps), 0, set())
                self._load_started = time.monotonic()
                self._loaded.clear()
                self.member.client.publish(
                    ACCOUNTS_WANTED,
                    {
                        "name": self.member.name,
                        "address": self.member.address,
                        "request": request,
                        "ring": self.rings.table.version,
                    },
                )
                if self._wait_for_load(request):
                    break
                log.warning("account request %s: no answer for %ss; asking again", request, self.request_timeout)
                self._pending = None

    def _wait_for_load(self, request):
        """Whether the load of request completes; the timeout runs from the last part received."""
        parts = 0
        while not self._loaded.wait(self.request_timeout):
            pending = self._pending
            if pending is None or pending[0] != request or pending[2] == parts:
                return False
            parts = pending[2]
        return True

    def _owns_something(self):
        # Nothing to ask for without a live NGNPro; its arrival triggers a request (_ring_changed).
        table = self.rings.table
        return self.member.address in table.members(ROLE) and bool(table.members(PROVIDER))

    def _on_load(self, message):
        body = message.body
        if self._pending is None or not isinstance(body, dict) or body.get("request") != self._pending[0]:
            return  # an answer to an older request
        request, asked, expected_part, seen = self._pending
        records = body.get("records")
        if body.get("part") != expected_part or not isinstance(records, list):
            log.warning("account request %s: part %r out of order; asking again", request, body.get("part"))
            self._pending = None
            self._want()
            return
        for record in records:
            key = self._apply(record, replaces_before=asked)
            if key is not None:
                seen.add(key)
        self._pending = (request, asked, expected_part + 1, seen)
        if body.get("last") is True:
            # Whatever was cached before we asked and is not in the answer was deleted meanwhile;
            # a tombstone goes once it is old enough that nothing older can still arrive.
            forget_before = time.monotonic() - TOMBSTONE_SECONDS
            stale = [
                key
                for key, entry in self.entries.items()
                if key not in seen
                and entry.stamp < asked
                and (entry.data is not None or entry.received < forget_before)
            ]
            for key in stale:
                del self.entries[key]
                self._changed(key)
            self._pending = None
            self.loads += 1
            self.load_seconds.observe(time.monotonic() - self._load_started)
            self._loaded.set()
            log.info("account request %s: %d entries owned, %d dropped", request, len(seen), len(stale))

    # What local consumers ask

    def counts(self):
        accounts = sum(1 for entry in self.entries.values() if entry.kind == "account" and entry.data is not None)
        aliases = sum(1 for entry in self.entries.values() if entry.kind == "alias" and entry.data is not None)
        return accounts, aliases

    def serves(self, domain):
        """Whether the domain is provisioned (every node knows every domain)."""
        entry = self.entries.get(domain.lower())
        return entry is not None and entry.kind == "domain" and entry.data is not None

    def get(self, key):
        entry = self.entries.get(key)
        return None if entry is None or entry.data is None or entry.kind in EVERYONE_KEEPS else entry

    def ha1(self, key):
        """The digest HA1 of key when it is an enabled account this node holds, else None."""
        entry = self.get(key)
        if entry is None or entry.kind != "account" or not entry.data.get("enabled", True):
            return None
        return entry.data.get("ha1")

    def ha1s(self):
        """(key, HA1) of every enabled account this node holds."""
        return [(key, ha1) for key in list(self.entries) if (ha1 := self.ha1(key)) is not None]


def accounts_application(cache, credential=""):
    """The WSGI application local consumers read the cache with (docs/provisioning.md):

    GET /accounts              -> {"accounts": N, "aliases": M}
    GET /accounts/KEY          -> the account or alias this node holds, JSON with its kind
                                  (an alias names its target, which may live on another node)
    GET /accounts/KEY/ha1      -> the digest HA1 of an enabled account, as text: what a SIP
                                  proxy authenticates with (403 when disabled)
    404 when this node does not hold KEY, 400 for a key that is not user@domain. With a
    credential, 401 for a request without the header 'Authorization: Bearer <credential>'.
    """
    expected = f"Bearer {credential}".encode()

    def application(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if credential and not hmac.compare_digest(given, expected):
            return _json(start_response, "401 Unauthorized", {"error": "the Authorization header is missing or wrong"})
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "only GET is served"})
        # PEP 3333: the path arrives percent-decoded, its bytes as latin-1.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        collection, _, rest = path.lstrip("/").partition("/")
        if collection != "accounts":
            return _json(start_response, "404 Not Found", {"error": "not found: see /accounts"})
        if not rest:
            accounts, aliases = cache.counts()
            return _json(start_response, "200 OK", {"accounts": accounts, "aliases": aliases})
        key, _, field = rest.partition("/")
        if field not in ("", "ha1"):
            return _json(start_response, "404 Not Found", {"error": f"no such field: {field}"})
        try:
            key = normalize_key(key)
        except InvalidKeyError as problem:
            return _json(start_response, "400 Bad Request", {"error": str(problem)})
        entry = cache.get(key)
        if entry is None:
            return _json(start_response, "404 Not Found", {"error": f"{key} is not held by this node"})
        if not field:
            return _json(start_response, "200 OK", {**entry.data, "kind": entry.kind})
        if entry.kind != "account":
            return _json(start_response, "404 Not Found", {"error": f"{key} is an alias, not an account"})
        if not entry.data.get("enabled", True):
            return _json(start_response, "403 Forbidden", {"error": f"{key} is disabled"})
        return reply(start_response, "200 OK", entry.data["ha1"])

    return application


def _json(start_response, status, body):
    return reply(start_response, status, json.dumps(body, sort_keys=True, separators=(",", ":")), "application/json")
