"""What Kamailio asks thor-node on a SIP Thor sip_proxy node (app_python3, docs/sip.md).

Loaded by etc/kamailio/thor.cfg (modparam app_python3 load) and called with
python_exec(METHOD, ARGUMENT). Each method asks thor-node's loopback API
(THOR_API in the environment, default 127.0.0.1:9501, paths under /sip/),
writes its answer into $var(...) and returns 1 for yes / found, a negative
number otherwise (never 0: that would end the script). Kamailio embeds
Debian's Python, not a virtual environment: the standard library and SIP
Thor's own ring (thor.lookup.ring, of python3-sipthor, which imports nothing
else) only.

The two questions of nearly every request, "which node is this subscriber's
home" and "is this source a Thor node", are answered here, without asking:
each process keeps the live sip_proxy nodes and, up to LOCAL_RING_NODES of
them, their ring, built by the same code from the same members and points as
thor-node's (one answer network-wide). thor-node tells Kamailio when the
members change ($shv(thor_ring)) and each process then asks for them again
(docs/sip.md measures why).

Each Kamailio process keeps one HTTP connection to thor-node, opened on first
use (never before Kamailio forks its processes), with a short timeout: a
worker never waits long on thor-node, and thor-node itself bounds how long a
home node may take.
"""

import http.client
import ipaddress
import json
import os
import time
import urllib.parse

import KSR

from thor.lookup.ring import HashRing, InvalidKeyError, normalize_key

API = os.environ.get("THOR_API", "127.0.0.1:9501")
# thor-node answers at once or after asking a home node ([Node] peer_timeout, 1 s by default).
TIMEOUT = float(os.environ.get("THOR_API_TIMEOUT", "2.5"))
# thor-node sets $shv(thor_ring) to the ring's generation at each change of the sip_proxy members:
# a process asks for the ring again at its next request after a change. Until thor-node has told
# (or while it cannot answer) a process asks at most once a RING_SECONDS; and a ring it was told
# about is asked for again after RING_MAX_AGE anyway, so a dead thor-node is noticed.
RING_SECONDS = 1.0
RING_MAX_AGE = 10.0
# A process builds the ring itself for up to this many sip_proxy nodes (tens of milliseconds per
# change of the members); a bigger ring would hold each process for most of a second at every
# change (300 nodes x 4000 points: about 1 s), so each process then asks thor-node for a key's home.
LOCAL_RING_NODES = int(os.environ.get("THOR_LOCAL_RING_NODES", "64"))
# Whether a domain is served is asked at most once a second per domain (nearly every request asks).
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 4096
UNAVAILABLE = -9


class Thor:
    def __init__(self):
        self.connection = None
        self.pid = None
        self.peers = None  # the live sip_proxy nodes' addresses, None when thor-node could not say
        self.ring = None  # their HashRing, when there are at most LOCAL_RING_NODES
        self.ring_points = None
        self.ring_asked = None  # when the members were last asked for (monotonic)
        self.ring_told = None  # the generation $shv(thor_ring) said then
        self.domains = {}  # domain -> (answer, when)

    def child_init(self, rank):
        return 0

    # -- thor-node's API -----------------------------------------------------------------

    def _request(self, method, path, body=None):
        """(status, text) of one request to thor-node, or (None, reason) when it cannot be had."""
        for attempt in (1, 2):  # a kept connection thor-node closed meanwhile: once more on a new one
            if self.connection is None or self.pid != os.getpid():
                host, _, port = API.rpartition(":")
                self.connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
                self.pid = os.getpid()
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                return response.status, response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as problem:
                self.connection.close()
                self.connection = None
                if attempt == 2 or isinstance(problem, TimeoutError):
                    KSR.err(f"thor-node API at {API}: {method} {path}: {problem}\n")
                    return None, str(problem)
        return None, "unreachable"

    @staticmethod
    def _path(*parts):
        return "/sip/" + "/".join(urllib.parse.quote(part, safe="@") for part in parts)

    def _current_peers(self):
        """The live sip_proxy nodes' addresses as thor-node last gave them (with the ring, self.ring,
        when small enough to build here), or None when it could not: not reachable, or no network
        status yet (then a "not a peer" would have a peer's forwarded REGISTER taken for a device's
        and stored through the wrong node)."""
        now = time.monotonic()
        told = KSR.pv.get("$shv(thor_ring)") or "0"
        if self.ring_asked is not None:
            age = now - self.ring_asked
            if self.peers is None or told == "0":
                if age < RING_SECONDS:
                    return self.peers
            elif told == self.ring_told and age < RING_MAX_AGE:
                return self.peers
        self.ring_asked, self.ring_told = now, told
        status, text = self._request("GET", "/sip/ring")
        try:
            answer = json.loads(text) if status == 200 else None
            nodes, points = tuple(sorted(answer["sip_proxy"])), int(answer["points"])
        except (ValueError, TypeError, KeyError):
            if status is not None:
                KSR.err(f"thor-node API at {API}: GET /sip/ring: {status} {text[:200]}\n")
            self.peers = self.ring = None
            return None
        if self.peers != frozenset(nodes) or self.ring_points != points:
            self.peers, self.ring_points = frozenset(nodes), points
            self.ring = HashRing(nodes, points) if len(nodes) <= LOCAL_RING_NODES else None
        return self.peers

    # -- python_exec methods ------------------------------------------------------------------

    def is_peer(self, msg, address):
        """1 when address is a live sip_proxy node: its requests were checked there."""
        peers = self._current_peers()
        if peers is None:
            return UNAVAILABLE
        try:
            address = str(ipaddress.ip_address(address.strip("[]")))
        except ValueError:
            return -1
        return 1 if address in peers else -1

    def serves(self, msg, domain):
        """1 when domain is provisioned (thor-node answers 200 / 404), remembered for CACHE_SECONDS;
        UNAVAILABLE (not remembered) when it cannot answer."""
        cached = self.domains.get(domain)
        now = time.monotonic()
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            return cached[0]
        status, _ = self._request("GET", self._path("domain", domain))
        if status not in (200, 404):
            return UNAVAILABLE
        if len(self.domains) >= CACHE_ENTRIES:
            self.domains.clear()
        answer = 1 if status == 200 else -1
        self.domains[domain] = (answer, now)
        return answer

    def home(self, msg, key):
        """$var(thor_home) := the home node's address of key ($var(thor_home_host): for a URI);
        -1 when key is not a subscriber address."""
        if self._current_peers() is None:
            return UNAVAILABLE
        if self.ring is None:  # a ring too big to build in each process: thor-node answers
            status, text = self._request("GET", self._path("home", key))
            if status != 200:
                return -1 if status == 400 else UNAVAILABLE
        else:
            try:
                text = self.ring.owner(normalize_key(key))
            except InvalidKeyError:
                return -1
            if text is None:  # no sip_proxy node is live
                return UNAVAILABLE
        KSR.pv.sets("$var(thor_home)", text)
        host = f"[{text}]" if ipaddress.ip_address(text).version == 6 else text
        KSR.pv.sets("$var(thor_home_host)", host)
        return 1

    def ha1(self, msg, key):
        """$var(thor_ha1) := the HA1 of key, which this node is home for (-1 unknown, -2 disabled)."""
        status, text = self._request("GET", "/accounts/" + urllib.parse.quote(key, safe="@") + "/ha1")
        if status == 200:
            KSR.pv.sets("$var(thor_ha1)", text.strip())
            return 1
        return {404: -1, 403: -2}.get(status, UNAVAILABLE)

    def verify(self, msg, key):
        """Asks key's home node whether the request's digest response is right: 1 yes, -1 wrong
        password, -2 disabled, -3 unknown subscriber."""
        credentials = _credentials(KSR.hdr.get("Proxy-Authorization") or KSR.hdr.get("Authorization") or "")
        credentials["method"] = KSR.pv.get("$rm")
        body = json.dumps({"key": key, "credentials": credentials})
        status, _ = self._request("POST", "/sip/verify", body)
        return {200: 1, 401: -1, 403: -2, 404: -3}.get(status, UNAVAILABLE)

    def location(self, msg, aor):
        """$var(thor_routes) := the routes to aor's devices (rtjson); -1 unknown, -2 offline."""
        status, text = self._request("GET", self._path("location", aor))
        if status == 200:
            KSR.pv.sets("$var(thor_routes)", text)
            return 1
        return {404: -1, 480: -2}.get(status, UNAVAILABLE)


def _credentials(header):
    """The fields of a Digest Authorization header value."""
    _, _, rest = header.partition(" ")
    fields = {}
    for item in _split(rest):
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name in ("username", "realm", "uri", "nonce", "response", "qop", "nc", "cnonce"):
            fields[name] = value
    return fields


def _split(text):
    """Comma separated items, commas inside quotes kept."""
    items, current, quoted = [], [], False
    for character in text:
        if character == '"':
            quoted = not quoted
        if character == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(character)
    items.append("".join(current))
    return [item for item in items if item.strip()]


def mod_init():
    return Thor()
