"""The daemon shape of every overlay member (manager, node, database, monitor)."""

from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import Daemon, StartupError
from thor.events.client import EventClient
from thor.events.crl import CRLExchange
from thor.identity import Identity, IdentityError, announced_address
from thor.membership.member import OverlayMember
from thor.metrics import gauge

__all__ = ["MemberDaemon"]


class MemberDaemon(Daemon):
    """A Daemon that joins the overlay with its certificate.

    Subclasses set required_role (the certificate must grant it), may
    override roles() (what to announce), attributes() (announced with those
    roles), withdrawn() (roles held back and why), setup() (subscribe,
    start servers) and teardown(); self.client is the EventClient and
    self.member the OverlayMember with the network status.
    """

    sections = (ThorNetworkConfig, TLSConfig)
    required_role = None
    follow_status = True
    announce = True

    def start(self):
        network, tls_config = self.config[ThorNetworkConfig], self.config[TLSConfig]
        address = None
        try:
            self.identity = Identity.load(tls_config.certificate)
            if self.required_role:
                self.identity.require_role(self.required_role, f"certificate {tls_config.certificate}")
            if self.announce:
                address = announced_address(network.address, self.identity)
        except IdentityError as error:
            raise StartupError(str(error)) from None
        self.client = EventClient.from_config(network, self.tls)
        # The network's newest CRL reaches this host through the event servers, and goes on from it.
        self.crl_exchange = CRLExchange(self.client, self.tls) if self.tls is not None else None
        self.member = OverlayMember(
            self.client,
            self.identity.name,
            address,
            self.roles(),
            self.attributes(),
            follow_status=self.follow_status,
            announce=self.announce,
            withdrawn=self.withdrawn(),
        )
        self.setup()
        self.member.start()
        if self.announce:
            self.log.info("%s joining %s as %s", self.identity.name, network.domain, address)

    def roles(self):
        return [self.required_role] if self.required_role else []

    def attributes(self):
        return {}

    def withdrawn(self):
        """{role: why} for roles this program holds back (a failing health check); runs after roles()."""
        return {}

    def setup(self):
        """Subscribe to topics, start local services; runs before the member connects."""

    def teardown(self):
        """Stop local services; runs before the member leaves."""

    def metric_families(self):
        yield from super().metric_families()
        links = list(self.client.links.values())
        yield gauge("thor_eventserver_links", "Event servers this member knows (configured or discovered).", len(links))
        yield gauge(
            "thor_eventserver_links_up",
            "Event servers this member is connected to.",
            sum(link.connected for link in links),
        )
        if self.follow_status:
            yield gauge(
                "thor_status_version",
                "The version of the network status this member holds.",
                self.member.status.status.version,
            )

    def stop(self):
        self.teardown()
        self.member.leave()
        super().stop()
