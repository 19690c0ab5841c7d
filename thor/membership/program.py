"""The daemon shape of every overlay member (manager, node, database, monitor)."""

from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import Daemon, StartupError
from thor.events.client import EventClient
from thor.membership.member import OverlayMember, own_address
from thor.transport.tls import TLSError, load_certificate_identity

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
        try:
            self.identity = load_certificate_identity(tls_config.certificate)
        except TLSError as error:
            raise StartupError(str(error)) from None
        if self.required_role and self.required_role not in self.identity.roles:
            raise StartupError(
                f"certificate {tls_config.certificate} of {self.identity.name} does not grant {self.required_role}"
            )
        address = None
        if self.announce:
            try:
                address = own_address(network.address, tls_config.certificate)
            except ValueError as error:
                raise StartupError(str(error)) from None
        self.client = EventClient.from_config(network, self.tls)
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

    def stop(self):
        self.teardown()
        self.member.leave()
        super().stop()
