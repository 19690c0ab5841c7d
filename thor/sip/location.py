"""A subscriber's bindings, as the home node's Kamailio holds them, and the routes to them.

The home node's thor-node asks its own Kamailio (the jsonrpcs module on a
loopback UDP socket: `ul.lookup location AOR`) and turns the contacts into
an rtjson routing document that the edge's Kamailio applies as it is
(rtjson_init_routes, rtjson_push_routes): each route goes to the device's
contact through the Path its REGISTER came with, i.e. through the node that
holds the device's NAT binding or connection (docs/sip.md).
"""

import itertools
import json
import logging
import urllib.parse

from gevent import socket

__all__ = ["KamailioRPC", "RPCError", "bindings", "first_hop", "localize", "routing_document"]

log = logging.getLogger("thor.sip")

MAX_REPLY = 65535
# A subscriber with more devices than this gets calls on the first ones only.
MAX_ROUTES = 16


class RPCError(Exception):
    """Kamailio's RPC did not answer, or answered an error; str() says which."""


class KamailioRPC:
    """JSON-RPC 2.0 over UDP datagrams to a Kamailio on this host (jsonrpcs, transport 4)."""

    def __init__(self, address, timeout=0.5):
        self.address = address
        self.timeout = timeout
        self._ids = itertools.count(1)

    def call(self, method, *params):
        request_id = next(self._ids)
        request = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": request_id})
        with socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
                sock.send(request.encode())
                while True:
                    reply = json.loads(sock.recv(MAX_REPLY))
                    if isinstance(reply, dict) and reply.get("id") == request_id:
                        break
            except TimeoutError:
                raise RPCError(
                    f"Kamailio's RPC at {self.address[0]}:{self.address[1]} did not answer in time"
                ) from None
            except (OSError, ValueError) as problem:
                raise RPCError(f"Kamailio's RPC at {self.address[0]}:{self.address[1]}: {problem}") from None
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise RPCError(f"{method}: {error.get('message', 'error')} ({error.get('code')})")
        return reply.get("result")


def bindings(rpc, aor):
    """The live contacts of aor: [{"uri", "path", "received", "expires"}], [] when it has none."""
    try:
        result = rpc.call("ul.lookup", "location", aor)
    except RPCError as problem:
        if "not found" in str(problem).lower():
            return []
        raise
    contacts = []
    for item in (result or {}).get("Contacts", []) if isinstance(result, dict) else []:
        contact = item.get("Contact") if isinstance(item, dict) else None
        if not isinstance(contact, dict) or not isinstance(contact.get("Address"), str):
            continue
        expires = contact.get("Expires")
        if isinstance(expires, int) and expires <= 0:
            continue
        contacts.append(
            {
                "uri": contact["Address"],
                "path": _text(contact.get("Path")),
                "received": _text(contact.get("Received")),
                "expires": expires if isinstance(expires, int) else None,
            }
        )
    return contacts[:MAX_ROUTES]


def _text(value):
    # Kamailio writes "[not set]" for an empty field.
    return value if isinstance(value, str) and value and not value.startswith("[") else ""


def routing_document(contacts):
    """The rtjson document that sends a request to every contact (forked in parallel)."""
    routes = []
    for contact in contacts:
        route = {"uri": contact["uri"]}
        if contact["path"]:
            route["path"] = contact["path"]
            route["dst_uri"] = first_hop(contact["path"])
        elif contact["received"]:
            route["dst_uri"] = contact["received"]
        routes.append(route)
    return {"version": "1.0", "routing": "parallel", "routes": routes}


def first_hop(path):
    """The URI of the first entry of a Path header value: "<sip:a;lr;...>,<sip:b>" -> "sip:a;lr;..."."""
    first = path.split(",", 1)[0].strip()
    return first[1:-1] if first.startswith("<") and first.endswith(">") else first


def _host(uri):
    """The host of a SIP URI ("sip:192.0.2.1:5060;lr" -> "192.0.2.1"; IPv6 in brackets)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split(";", 1)[0].split("@")[-1]
    if rest.startswith("["):
        return rest[1 : rest.find("]")]
    return rest.split(":", 1)[0]


def _received(uri):
    """The device's address a Path entry remembers (add_path_received): its received parameter."""
    for parameter in uri.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name == "received" and value:
            return urllib.parse.unquote(value)
    return ""


def localize(routing, own_address):
    """The routing document as the edge node at own_address sends it: a route whose first Path hop
    is this very node goes straight to the device's address (no request to itself)."""
    routes = []
    for route in routing.get("routes", []):
        dst = route.get("dst_uri", "")
        if route.get("path") and dst and _host(dst) == own_address and _received(dst):
            rest = [entry.strip() for entry in route["path"].split(",")[1:] if entry.strip()]
            direct = {"uri": route["uri"], "dst_uri": _received(dst)}
            if rest:  # a device behind more than one node: keep the rest of its path
                direct["path"] = ",".join(rest)
            routes.append(direct)
        else:
            routes.append(route)
    return dict(routing, routes=routes)
