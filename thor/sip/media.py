"""Media relays (rtpengine on media_relay nodes), chosen per call by the caller's edge (docs/sip.md).

On a sip_proxy node, Kamailio's rtpengine module speaks rtpengine's control
protocol (ng: "COOKIE BENCODED-DICT" over UDP) to thor-node on loopback
(MediaProxy). thor-node picks a relay for each call from the live media_relay
members of the network status (a relay in this node's site first, any live
one otherwise), keeps that relay for the call's whole life (offer, answer,
re-INVITEs, delete), and forwards each command over the node-to-node API
(mutual TLS, sip_proxy certificates only) to the relay's thor-node, which
hands it to its rtpengine on loopback (RelayControl). The relay set follows
the network status as it changes: no restart, no reload.
"""

import base64
import hashlib
import logging
import os
import time

import gevent
from gevent import socket
from gevent.server import DatagramServer

from thor import roles
from thor.accounts.protocol import usage_report
from thor.sip.peers import PeerError
from thor.transport import bencode

__all__ = ["RELAY_FIELDS", "MediaProxy", "RelayChooser", "RelayControl", "relay_report"]

log = logging.getLogger("thor.sip.media")

MAX_DATAGRAM = 65535
# A call's relay is forgotten this long after its last command (a call without a BYE).
FORGET_AFTER = 3 * 3600.0
MAX_CALLS = 200000
# "No media relay is live" is logged at most this often (seconds).
WARN_EVERY = 60.0


# What a media relay publishes on Thor.Statistics (besides its name and address), and the types.
RELAY_FIELDS = {
    "sessions": (int,),
    "packets_per_s": (int,),
    "bytes_per_s": (int,),
    "relayed_packets": (int,),
}


def relay_report(body):
    """The fields of a media relay's Thor.Statistics body, or None when it is not one."""
    return usage_report(body, RELAY_FIELDS)


class RelayChooser:
    """Which live media relay serves a call: in this node's site if one is live, else any."""

    def __init__(self, status_cache, site=""):
        self.status_cache = status_cache
        self.site = site

    def candidates(self):
        """(name, address, peer port) of the live relays to choose from, this site's first."""
        status = self.status_cache.status
        relays = []
        for member in status.role_members(roles.MEDIA_RELAY):
            attributes = status.attributes(member["name"], roles.MEDIA_RELAY)
            relays.append((member["name"], member["address"], attributes.get("peer_port"), attributes.get("site", "")))
        local = [relay for relay in relays if self.site and relay[3] == self.site]
        return [relay[:3] for relay in (local or relays) if relay[2]]

    def choose(self, call_id):
        """The relay for a new call: the candidates weighed by the call (rendezvous hashing), so
        calls spread evenly and a relay that joins takes only its share."""
        candidates = self.candidates()
        if not candidates:
            return None
        return max(candidates, key=lambda relay: hashlib.md5(f"{relay[0]}/{call_id}".encode()).digest())


class MediaProxy:
    """thor-node's ng endpoint for Kamailio's rtpengine module, on a sip_proxy node."""

    def __init__(self, listen, chooser, peers, name):
        self.listen = listen
        self.chooser = chooser
        self.peers = peers
        self.name = name
        self.calls = {}  # call-id -> [(name, address, peer port) or None (direct), last command time]
        self._warned = -WARN_EVERY
        self._server = DatagramServer(listen, self._datagram)
        self._sweeper = None

    @property
    def address(self):
        return self._server.address

    def start(self):
        self._server.start()
        self._sweeper = gevent.spawn(self._sweep)

    def stop(self):
        self._server.stop()
        if self._sweeper is not None:
            self._sweeper.kill(block=False)

    def _datagram(self, data, address):
        cookie, _, body = data.partition(b" ")
        try:
            message = bencode.decode(body)
            if not isinstance(message, dict) or not isinstance(message.get("command"), str):
                raise bencode.BencodeError("not a command")
        except bencode.BencodeError as problem:
            self._reply(cookie, {"result": "error", "error-reason": f"malformed: {problem}"}, address)
            return
        if message["command"] == "ping":
            # thor-node answers for the relays: with none live, calls go on with direct media.
            self._reply(cookie, {"result": "pong"}, address)
            return
        call_id = message.get("call-id")
        if not isinstance(call_id, str):
            self._reply(cookie, {"result": "error", "error-reason": "no call-id"}, address)
            return
        relay = self._relay_of(call_id, message["command"])
        if relay is None:
            self._direct(cookie, message, address)
            return
        # The relay's rtpengine tells commands apart by cookie: make ours unique in the network.
        datagram = f"{self.name}-{cookie.decode(errors='replace')}".encode() + b" " + body
        try:
            answer = self.peers.request(
                (relay[1], relay[2]),
                {"op": "ng", "datagram": base64.b64encode(datagram).decode()},
                role=roles.MEDIA_RELAY,
            )
            reply = base64.b64decode(answer["datagram"])
        except (PeerError, KeyError, ValueError) as problem:
            log.warning("media relay %s for call %s: %s", relay[0], call_id, problem)
            self._reply(cookie, {"result": "error", "error-reason": f"relay {relay[0]} unreachable"}, address)
            return
        if message["command"] == "delete":
            self.calls.pop(call_id, None)
        self._server.sendto(cookie + b" " + reply.partition(b" ")[2], address)

    def _relay_of(self, call_id, command):
        """The call's relay; None: its media goes direct (no relay was live at its offer)."""
        known = self.calls.get(call_id)
        if known is not None:
            known[1] = time.monotonic()
            return known[0]  # one relay (or none) for a call's whole life
        if command not in ("offer", "answer", "delete"):
            return None
        # A call this node does not know (it restarted meanwhile) gets the relay its offer got
        # while the relays are the same: the choice depends on the call and the live relays only.
        relay = self.chooser.choose(call_id)
        if len(self.calls) < MAX_CALLS:
            self.calls[call_id] = [relay, time.monotonic()]
        return relay

    def _direct(self, cookie, message, address):
        """A call without a relay: its SDP back unchanged, so Kamailio goes on without an error."""
        if message["command"] == "delete":
            self.calls.pop(message["call-id"], None)
        elif message["command"] == "offer" and time.monotonic() - self._warned > WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("no media relay is live: calls go with the devices' own media addresses")
        answer = {"result": "ok"}
        if isinstance(message.get("sdp"), (bytes, str)):
            answer["sdp"] = message["sdp"]
        self._reply(cookie, answer, address)

    def _reply(self, cookie, message, address):
        self._server.sendto(cookie + b" " + bencode.encode(message), address)

    def _sweep(self):
        while True:
            gevent.sleep(60)
            old = time.monotonic() - FORGET_AFTER
            for call_id in [call_id for call_id, (_, used) in self.calls.items() if used < old]:
                del self.calls[call_id]


class RelayControl:
    """On a media_relay node: commands from sip_proxy nodes handed to the local rtpengine."""

    def __init__(self, rtpengine, timeout=1.0):
        self.rtpengine = rtpengine
        self.timeout = timeout

    def forward(self, datagram):
        """rtpengine's reply to datagram (COOKIE BENCODED), or None when it does not answer."""
        cookie = datagram.partition(b" ")[0]
        family = socket.AF_INET6 if ":" in self.rtpengine[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.rtpengine)
            sock.send(datagram)
            deadline = time.monotonic() + self.timeout
            try:
                while time.monotonic() < deadline:
                    reply = sock.recv(MAX_DATAGRAM)
                    if reply.partition(b" ")[0] == cookie:
                        return reply
            except (TimeoutError, OSError):
                return None
        return None

    def statistics(self):
        """rtpengine's load: {"sessions", "packets_per_s", "bytes_per_s", "relayed_packets"}, or None."""
        # rtpengine answers a cookie it saw lately from its cache: each request has its own.
        cookie = b"thor-statistics-" + os.urandom(6).hex().encode()
        reply = self.forward(cookie + b" " + bencode.encode({"command": "statistics"}))
        try:
            message = bencode.decode(reply.partition(b" ")[2]) if reply else None
            current, total = message["statistics"]["currentstatistics"], message["statistics"]["totalstatistics"]
            return {
                "sessions": int(current["sessionsown"]),
                "packets_per_s": int(current["packetrate"]),
                "bytes_per_s": int(current["byterate"]),
                "relayed_packets": int(total["relayedpackets"]),
            }
        except (bencode.BencodeError, KeyError, TypeError, ValueError):
            return None

    def respond(self, request):
        """The peer API's "ng" operation."""
        try:
            datagram = base64.b64decode(request.get("datagram", ""), validate=True)
        except ValueError:
            return {"result": "error", "reason": "datagram: expected base64"}
        if not datagram or len(datagram) > MAX_DATAGRAM:
            return {"result": "error", "reason": "datagram: 1 to 65535 bytes"}
        reply = self.forward(datagram)
        if reply is None:
            return {"result": "unavailable", "reason": "rtpengine does not answer"}
        return {"result": "ok", "datagram": base64.b64encode(reply).decode()}
