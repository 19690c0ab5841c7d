"""thor-eventserver: the daemon."""

from gevent import monkey

monkey.patch_all()

import sys
import time

from thor import __version__, roles
from thor.config import TLSConfig
from thor.daemon import Daemon, StartupError, raise_file_limit, run
from thor.eventserver.config import EventServerConfig
from thor.eventserver.server import EventServer, Limits
from thor.identity import Identity, IdentityError, announced_address
from thor.membership.entity import make_entity
from thor.metrics import counter, gauge

ROLE = roles.EVENT_SERVER


class EventServerDaemon(Daemon):
    program = "thor-eventserver"
    description = "The SIP Thor event server: the TLS publish/subscribe bus of the overlay."
    sections = (TLSConfig, EventServerConfig)

    def start(self):
        tls_config, config = self.config[TLSConfig], self.config[EventServerConfig]
        host, port = config.listen
        wildcard = host in ("0.0.0.0", "::")
        try:
            identity = Identity.load(tls_config.certificate)
            identity.require_role(ROLE, f"certificate {tls_config.certificate}")
            address = announced_address(config.address or ("" if wildcard else host), identity, "[EventServer] address")
        except IdentityError as error:
            raise StartupError(str(error)) from None
        raise_file_limit(config.max_connections + 64)
        limits = Limits(
            keepalive=config.keepalive,
            idle_timeout=config.idle_timeout,
            handshake_timeout=tls_config.handshake_timeout,
            max_frame_size=config.max_frame_size,
            send_queue_limit=config.send_queue_limit,
            max_connections=config.max_connections,
            max_handshakes_per_source=config.max_handshakes_per_source,
            max_connections_per_name=config.max_connections_per_name,
            max_subscriptions=config.max_subscriptions,
            max_retained=config.max_retained,
            max_retained_bytes=config.max_retained_bytes,
            max_log_bytes=config.max_log_bytes,
            presence_from_peer=config.presence_from_peer,
        )
        presence = make_entity(identity.name, address, [ROLE], __version__, time.time(), attributes={"port": port})
        self.server = EventServer(identity.name, limits, presence=presence)
        try:
            self.server.listen_tls(config.listen, self.tls)
        except OSError as error:
            raise StartupError(f"cannot listen on {config.listen[0]}:{config.listen[1]}: {error.strerror}") from None

    def metric_families(self):
        yield from super().metric_families()
        server = self.server
        yield gauge(
            "thor_eventserver_members",
            "Members connected, by role.",
            labels=["role"],
            samples=[([role], count) for role, count in sorted(server.members_by_role().items())],
        )
        yield gauge("thor_eventserver_connections", "Members connected (past the hello).", len(server.connections))
        refused = server.tls_refused + server.refused
        yield counter(
            "thor_eventserver_refused",
            "Connections refused or cut off, by reason.",
            labels=["reason"],
            samples=[([reason], count) for reason, count in sorted(refused.items())],
        )
        traffic = server.traffic
        yield counter("thor_eventserver_received_frames", "Frames received from members.", traffic.frames_in)
        yield counter("thor_eventserver_received_bytes", "Bytes received from members.", traffic.bytes_in)
        yield counter("thor_eventserver_sent_frames", "Frames queued to members.", traffic.frames_out)
        yield counter("thor_eventserver_sent_bytes", "Bytes queued to members.", traffic.bytes_out)
        yield gauge(
            "thor_eventserver_send_queue_max_bytes",
            "The longest send queue of a member now.",
            server.largest_send_queue(),
        )
        yield gauge("thor_eventserver_retained_bytes", "Bytes retained for later subscribers.", server.retained_bytes())

    def stop(self):
        self.server.stop(timeout=2)
        super().stop()


def main(argv=None):
    return run(EventServerDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
