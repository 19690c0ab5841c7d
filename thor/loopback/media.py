"""A SIP network with media relays on loopback: sip_proxy nodes with Kamailio (SipNetwork), and
media_relay nodes each beside an rtpengine (userspace). For the tests, the media benchmark and
anyone trying the media path (docs/sip.md)."""

import os

from gevent import socket

from thor import roles
from thor.loopback.ngnpro import SipNetwork
from thor.loopback.rtpengine import RTPEngine
from thor.transport import bencode

__all__ = ["MediaNetwork", "relay_calls"]


class MediaNetwork(SipNetwork):
    """relays: {name: (address, site)} of the media_relay nodes start_relay can start;
    sites: {sip_proxy node name: site}; relay_ports: each rtpengine's media port range (four
    ports a call)."""

    def __init__(self, directory, pki, postgresql, relays, sites, relay_ports=(30000, 30999), **settings):
        super().__init__(directory, pki, postgresql, **settings)
        self.relays = relays
        self.sites = sites
        self.relay_ports = relay_ports
        self.rtpengines = {}

    def start_relay(self, name):
        address, site = self.relays[name]
        rtpengine = RTPEngine(self.directory, address, self.relay_ports)
        rtpengine.start()
        self.rtpengines[name] = rtpengine
        self.nodes[name] = self.overlay.node(
            name,
            roles.MEDIA_RELAY,
            address,
            checks=f"media_relay=ng:{rtpengine.ng[0]}:{rtpengine.ng[1]}",
            check_interval=0.2,
            rtpengine="{}:{}".format(*rtpengine.ng),
            site=site,
            statistics_interval=0.5,
        )
        return self.nodes[name]

    def kill_relay(self, name):
        """kill -9 of a relay's rtpengine and thor-node."""
        self.rtpengines[name].kill()
        self.nodes[name].kill()

    def node_settings(self, name):
        return {"site": self.sites[name]} if name in self.sites else {}

    def close(self):
        for rtpengine in self.rtpengines.values():
            rtpengine.stop()
        super().close()


def relay_calls(rtpengine):
    """The calls an rtpengine holds now (ng "list": its statistics are updated on a timer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(rtpengine.ng)
        # A cookie of its own: rtpengine answers a repeated one from its cache.
        sock.send(os.urandom(6).hex().encode() + b" " + bencode.encode({"command": "list", "limit": 100000}))
        reply = bencode.decode(sock.recv(65535).partition(b" ")[2])
    return len(reply["calls"])
