"""What thor-node answers about subscribers, for its own SIP proxy and for other nodes' (docs/sip.md).

For a key (user@domain) the home node is the owner on the sip_proxy ring,
the same answer on every node. A question about a subscriber is answered
here when this node is its home, and otherwise asked of the home node over
the node-to-node API (thor.sip.peers), bounded in time:

    verify    does this digest response match the subscriber's HA1?   (the HA1 stays home)
    location  where are the subscriber's devices?  (its bindings on the home's Kamailio, as
              routes through the node each device talks to)

A home node answers other nodes only about the keys it is home for: during a
ring change two nodes may disagree for a moment, and the asking node is told
so rather than given an answer from the wrong place.
"""

import logging

from thor import roles
from thor.lookup.ring import InvalidKeyError, normalize_key
from thor.lookup.table import NoMembersError
from thor.sip import digest
from thor.sip.location import RPCError, bindings, routing_document
from thor.sip.peers import PeerError

__all__ = ["PEER_PORT", "RING_REMINDER", "SipService", "UnavailableError"]

log = logging.getLogger("thor.sip")

# The node-to-node API's port, announced with sip_proxy (attribute peer_port).
PEER_PORT = 9502
# How often the SIP proxy is reminded of the ring's generation when nothing changed: a Kamailio
# restarted meanwhile has forgotten it (its processes then ask for the ring once a second).
RING_REMINDER = 1.0
# An alias is resolved once: its target is an account, never another alias (NGNPro's rule).
MAX_ALIAS_HOPS = 1


class UnavailableError(Exception):
    """The home node (or the local SIP proxy) cannot answer now; str() says why."""


class SipService:
    def __init__(self, address, rings, status_cache, accounts, peers, kamailio):
        """address: this node's; rings: its RingFollower; accounts: its AccountCache; peers: a
        PeerClient; kamailio: a KamailioRPC of the SIP proxy beside it."""
        self.address = address
        self.rings = rings
        self.status_cache = status_cache
        self.accounts = accounts
        self.peers = peers
        self.kamailio = kamailio
        self._ring_generation = 0

    # -- the ring ----------------------------------------------------------------------

    def home(self, key):
        """The home node's address for key (InvalidKeyError, NoMembersError)."""
        return self.rings.table.lookup(roles.SIP_PROXY, key)

    def ring(self):
        """The sip_proxy ring's description for the SIP proxy beside this node: {"version", "points",
        "sip_proxy": the live members' addresses}. UnavailableError before the first network status:
        a ring without members then would have Kamailio take a peer's forwarded request for a
        device's (and store a binding through the wrong node)."""
        table = self.rings.table
        if not table.version:
            raise UnavailableError("no network status yet")
        return {"version": table.version, "points": table.points, "sip_proxy": list(table.members(roles.SIP_PROXY))}

    def ring_generation(self):
        """The table version at which the sip_proxy members last changed (0 before a network status)."""
        return self._ring_generation

    def ring_changed(self, old, new):
        """RingFollower callback: a new generation when the sip_proxy members (or the points) differ."""
        members = roles.SIP_PROXY
        if not old.version or old.points != new.points or old.members(members) != new.members(members):
            self._ring_generation = new.version

    def tell_ring_generation(self):
        """Sets $shv(thor_ring) in the SIP proxy beside this node to ring_generation(): its processes
        compare it with the generation of the ring they hold at each request and ask for the ring
        when it differs, so a ring change reaches them in milliseconds. RPCError when it cannot."""
        self.kamailio.call("pv.shvSet", "thor_ring", "str", str(self._ring_generation))

    def serves(self, domain):
        """Whether domain is provisioned. UnavailableError until the accounts were loaded once: the
        SIP proxy remembers a 'no' for a while, and a node just started has not heard of any domain."""
        if self.accounts.serves(domain):
            return True
        if self.accounts.loads == 0:
            raise UnavailableError("the accounts are not loaded yet")
        return False

    # -- questions, answered here or by the home node -----------------------------------

    def verify(self, key, credentials):
        """ "ok", "wrong", "unknown" (no such account) or "disabled"; UnavailableError."""
        key = normalize_key(key)
        home = self._home(key)
        if home == self.address:
            return self.verify_here(key, credentials)
        return self._ask(home, {"op": "verify", "key": key, "credentials": credentials})["result"]

    def location(self, aor):
        """{"result": "ok", "routing": rtjson} | {"result": "offline"} | {"result": "unknown"}; UnavailableError."""
        aor = normalize_key(aor)
        for _ in range(MAX_ALIAS_HOPS + 1):
            home = self._home(aor)
            answer = (
                self.location_here(aor) if home == self.address else self._ask(home, {"op": "location", "aor": aor})
            )
            if answer.get("result") != "alias":
                return answer
            aor = normalize_key(answer.get("target", ""))
        return {"result": "unknown"}

    # -- answers of a home node -----------------------------------------------------------

    def verify_here(self, key, credentials):
        try:
            fields = digest.check_fields(credentials)
        except digest.DigestError as problem:
            log.info("verify %s: %s", key, problem)
            return "wrong"
        entry = self.accounts.get(key)
        if entry is None or entry.kind != "account":
            return "unknown"
        if not entry.data.get("enabled", True):
            return "disabled"
        if fields["username"] != key.split("@", 1)[0] or fields["realm"] != key.split("@", 1)[1]:
            return "wrong"
        return "ok" if digest.matches(entry.data["ha1"], fields) else "wrong"

    def location_here(self, aor):
        entry = self.accounts.get(aor)
        if entry is None:
            return {"result": "unknown"}
        if entry.kind == "alias":
            target = entry.data.get("target", "")
            return {"result": "alias", "target": target}
        try:
            contacts = bindings(self.kamailio, aor)
        except RPCError as problem:
            raise UnavailableError(f"the SIP proxy beside this node: {problem}") from None
        if not contacts:
            return {"result": "offline"}
        return {"result": "ok", "routing": routing_document(contacts)}

    def respond(self, identity, request):
        """The node-to-node API: answer a peer about keys this node is home for."""
        op = request.get("op")
        key = request.get("key") if op == "verify" else request.get("aor")
        if op not in ("verify", "location") or not isinstance(key, str):
            return {"result": "error", "reason": "expected op verify (key, credentials) or location (aor)"}
        try:
            key = normalize_key(key)
            if self.home(key) != self.address:
                return {"result": "not-home"}
            if op == "verify":
                return {"result": self.verify_here(key, request.get("credentials"))}
            return self.location_here(key)
        except (InvalidKeyError, NoMembersError) as problem:
            return {"result": "error", "reason": str(problem)}
        except UnavailableError as problem:
            return {"result": "unavailable", "reason": str(problem)}

    # -- internals ----------------------------------------------------------------------------

    def _home(self, key):
        try:
            return self.home(key)
        except NoMembersError:
            raise UnavailableError("no sip_proxy node is live") from None

    def _ask(self, home, request):
        status = self.status_cache.status
        name = next(
            (member["name"] for member in status.role_members(roles.SIP_PROXY) if member["address"] == home), None
        )
        port = status.attributes(name, roles.SIP_PROXY).get("peer_port", PEER_PORT) if name else PEER_PORT
        try:
            answer = self.peers.request((home, port), request)
        except PeerError as problem:
            raise UnavailableError(f"home node {home}: {problem}") from None
        result = answer.get("result")
        if result in ("not-home", "unavailable", "error", None):
            raise UnavailableError(f"home node {home} answered {result}: {answer.get('reason', '')}".rstrip(": "))
        return answer
