"""What Kamailio asks thor-node on a SIP Thor sip_proxy node (app_python3, docs/sip.md).

Loaded by etc/kamailio/thor.cfg (modparam app_python3 load) and called with
python_exec(METHOD, ARGUMENT). Each method asks thor-node's loopback API
(THOR_API in the environment, default 127.0.0.1:9501, paths under /sip/),
writes its answer into $var(...) and returns 1 for yes / found, a negative
number otherwise (never 0: that would end the script). Standard library
only: Kamailio embeds Debian's Python, not a virtual environment.

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

API = os.environ.get("THOR_API", "127.0.0.1:9501")
# thor-node answers at once or after asking a home node ([Node] peer_timeout, 1 s by default).
TIMEOUT = float(os.environ.get("THOR_API_TIMEOUT", "2.5"))
# Whether a source address is a Thor node, and whether a domain is served, is asked at most
# once a second per address / domain: both are asked for nearly every request.
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 4096
UNAVAILABLE = -9


class Thor:
    def __init__(self):
        self.connection = None
        self.pid = None
        self.peers = {}  # address -> (answer, when)
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

    # -- python_exec methods ------------------------------------------------------------------

    def _yes_or_no(self, cache, kind, name):
        """1 / -1 as thor-node answers GET /sip/<kind>/<name> (200 / 404), remembered for
        CACHE_SECONDS; UNAVAILABLE (not remembered) when it cannot answer."""
        cached = cache.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            return cached[0]
        status, _ = self._request("GET", self._path(kind, name))
        if status not in (200, 404):
            return UNAVAILABLE
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        answer = 1 if status == 200 else -1
        cache[name] = (answer, now)
        return answer

    def is_peer(self, msg, address):
        """1 when address is a live sip_proxy node: its requests were checked there."""
        return self._yes_or_no(self.peers, "peer", address)

    def serves(self, msg, domain):
        """1 when domain is provisioned."""
        return self._yes_or_no(self.domains, "domain", domain)

    def home(self, msg, key):
        """$var(thor_home) := the home node's address of key ($var(thor_home_host): for a URI)."""
        status, text = self._request("GET", self._path("home", key))
        if status != 200:
            return -1 if status == 400 else UNAVAILABLE
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
