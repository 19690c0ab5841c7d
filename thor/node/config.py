"""Configuration of thor-node: the [Node] section."""

import ipaddress

from thor.config import Section, Setting
from thor.datatypes import Endpoint, Float, Integer, NameList, String
from thor.health import CheckList


class NodeConfig(Section):
    name = "Node"
    roles = Setting(
        NameList(),
        "",
        "Roles this node announces, comma separated; each must be granted by its certificate. "
        "Empty: every role the certificate grants, except the thor_* infrastructure roles.",
    )
    checks = Setting(
        CheckList(),
        "",
        "Health check per role, role=check, comma separated; a check is tcp:HOST:PORT, "
        "sip:HOST:PORT (SIP OPTIONS over UDP), ng:HOST:PORT (an rtpengine ping) or none. Roles not "
        "listed use the built-in default (sip_proxy=sip:127.0.0.1:5060, media_relay=ng:127.0.0.1:2223, "
        "xcap_server=tcp:127.0.0.1:443, ...) or none for third-party roles.",
    )
    check_interval = Setting(Float(0.1, 3600), "1", "Seconds between health checks of each role.")
    check_timeout = Setting(Float(0.05, 60), "1", "Seconds a service has to answer a health check.")
    failures = Setting(Integer(1, 100), "2", "Consecutive failed checks that withdraw a role.")
    successes = Setting(Integer(1, 100), "2", "Consecutive good checks that bring a withdrawn role back.")
    accounts_listen = Setting(
        Endpoint(9501),
        "127.0.0.1:9501",
        "Where local consumers (the SIP proxy) read the accounts this node is responsible for, "
        "over HTTP (docs/provisioning.md). It serves digest hashes: keep it on loopback (elsewhere "
        "accounts_credential is required).",
    )
    accounts_credential = Setting(
        String(),
        "",
        "A secret every request to accounts_listen must carry (header 'Authorization: Bearer <secret>'), "
        "at least 16 characters; required when accounts_listen is not a loopback address, optional on loopback.",
    )
    account_reload_interval = Setting(
        Float(1, 86400),
        "300",
        "Seconds between full reloads of the accounts this node owns (a change missed while no event "
        "server was reachable is never missing for longer).",
    )
    usage_interval = Setting(Float(0.1, 3600), "10", "Seconds between the usage reports NGNPro collects.")
    peer_listen = Setting(
        Endpoint(9502),
        "0.0.0.0:9502",
        "sip_proxy nodes: where other sip_proxy nodes consult this one about the subscribers it is home "
        "for (mutual TLS, sip_proxy certificates only; docs/sip.md). Its port is announced to them.",
    )
    peer_timeout = Setting(
        Float(0.05, 10),
        "1",
        "Seconds a home node has to answer; beyond, the SIP proxy tells the device to retry (503, Retry-After).",
    )
    site = Setting(
        String(),
        "",
        "The site (facility, region) of this node, announced with its roles: calls whose caller talks "
        "to this node prefer media relays of the same site (docs/sip.md). Empty: no preference.",
    )
    media_listen = Setting(
        Endpoint(2230),
        "127.0.0.1:2230",
        "sip_proxy nodes: where the SIP proxy's rtpengine module sends media relay commands (ng, UDP); "
        "thor-node picks the relay of each call among the live media_relay members. Keep it on loopback.",
    )
    rtpengine = Setting(
        Endpoint(2223),
        "127.0.0.1:2223",
        "media_relay nodes: rtpengine's control port (ng, UDP) on this host; commands from sip_proxy nodes "
        "reach it through the peer API (mutual TLS), never from the network directly.",
    )
    statistics_interval = Setting(
        Float(0.1, 3600),
        "10",
        "media_relay nodes: seconds between the relay statistics published on Thor.Statistics.",
    )
    kamailio_rpc = Setting(
        Endpoint(5064),
        "127.0.0.1:5064",
        "Where the SIP proxy beside this node answers JSON-RPC (Kamailio's jsonrpcs, UDP), for the bindings "
        "of the subscribers this node is home for.",
    )

    def validate(self):
        if self.accounts_credential and len(self.accounts_credential) < 16:
            raise ValueError("accounts_credential: at least 16 characters")
        if not self.accounts_on_loopback and not self.accounts_credential:
            raise ValueError(
                f"accounts_listen = {self.accounts_listen[0]}: not a loopback address, where anyone who reaches it "
                "would read digest hashes; keep it on loopback or set accounts_credential"
            )

    @property
    def accounts_on_loopback(self):
        """Whether accounts_listen is reachable from this host only (thor-node warns when not)."""
        host = self.accounts_listen[0]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name: localhost is the only one known to be loopback
            return host == "localhost"
