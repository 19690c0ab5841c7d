"""Configuration of thor-node: the [Node] section."""

import ipaddress

from thor.config import Section, Setting
from thor.datatypes import Endpoint, Float, Integer, NameList
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
        "sip:HOST:PORT (SIP OPTIONS over UDP) or none. Roles not listed use the built-in "
        "default (sip_proxy=sip:127.0.0.1:5060, xcap_server=tcp:127.0.0.1:443, "
        "media_relay=tcp:127.0.0.1:25060, ...) or none for third-party roles.",
    )
    check_interval = Setting(Float(0.1, 3600), "1", "Seconds between health checks of each role.")
    check_timeout = Setting(Float(0.05, 60), "1", "Seconds a service has to answer a health check.")
    failures = Setting(Integer(1, 100), "2", "Consecutive failed checks that withdraw a role.")
    successes = Setting(Integer(1, 100), "2", "Consecutive good checks that bring a withdrawn role back.")
    accounts_listen = Setting(
        Endpoint(9501),
        "127.0.0.1:9501",
        "Where local consumers (the SIP proxy) read the accounts this node is responsible for, "
        "over HTTP (docs/provisioning.md). It serves digest hashes: keep it on loopback.",
    )
    account_reload_interval = Setting(
        Float(1, 86400),
        "300",
        "Seconds between full reloads of the accounts this node owns (a change missed while no event "
        "server was reachable is never missing for longer).",
    )
    usage_interval = Setting(Float(0.1, 3600), "10", "Seconds between the usage reports NGNPro collects.")

    @property
    def accounts_on_loopback(self):
        """Whether accounts_listen is reachable from this host only (thor-node warns when not)."""
        host = self.accounts_listen[0]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name: localhost is the only one known to be loopback
            return host == "localhost"
