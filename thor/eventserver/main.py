"""thor-eventserver: the daemon."""

from gevent import monkey

monkey.patch_all()

import sys

from thor.config import Section, Setting, TLSConfig
from thor.daemon import Daemon, StartupError, raise_file_limit, run
from thor.datatypes import Endpoint, Float, Integer
from thor.eventserver.server import EventServer, Limits
from thor.transport.tls import TLSError, load_certificate_identity

ROLE = "thor_eventserver"


class EventServerConfig(Section):
    name = "EventServer"
    listen = Setting(Endpoint(8000), "0.0.0.0:8000", "Address and port to accept members on (TLS).")
    keepalive = Setting(
        Float(0.1, 60), "1", "Seconds between the keepalives members must send; told to them in the hello."
    )
    idle_timeout = Setting(
        Float(0.3, 600),
        "3",
        "Seconds without a frame after which a member counts as gone (a cut link sends no TCP reset).",
    )
    max_frame_size = Setting(Integer(1024, 64 << 20), "1048576", "Largest frame a member may send, in bytes.")
    send_queue_limit = Setting(
        Integer(65536, 1 << 30),
        "4194304",
        "Bytes queued for one member before it counts as too slow and is disconnected.",
    )
    max_connections = Setting(Integer(1, 1000000), "10000", "Members connected (or handshaking) at once.")
    max_subscriptions = Setting(Integer(1, 100000), "256", "Topics one connection may subscribe to.")
    max_retained = Setting(Integer(0, 10000), "16", "Retained topics one connection may hold on the server.")

    def validate(self):
        if self.idle_timeout < 2 * self.keepalive:
            raise ValueError("idle_timeout: expected at least twice keepalive")


class EventServerDaemon(Daemon):
    program = "thor-eventserver"
    description = "The SIP Thor event server: the TLS publish/subscribe bus of the overlay."
    sections = (TLSConfig, EventServerConfig)

    def start(self):
        tls_config, config = self.config[TLSConfig], self.config[EventServerConfig]
        try:
            identity = load_certificate_identity(tls_config.certificate)
        except TLSError as error:
            raise StartupError(str(error)) from None
        if ROLE not in identity.roles:
            raise StartupError(f"certificate {tls_config.certificate} of {identity.name} does not grant {ROLE}")
        raise_file_limit(config.max_connections + 64)
        limits = Limits(
            keepalive=config.keepalive,
            idle_timeout=config.idle_timeout,
            handshake_timeout=tls_config.handshake_timeout,
            max_frame_size=config.max_frame_size,
            send_queue_limit=config.send_queue_limit,
            max_connections=config.max_connections,
            max_subscriptions=config.max_subscriptions,
            max_retained=config.max_retained,
        )
        self.server = EventServer(identity.name, self.tls, config.listen, limits)
        try:
            self.server.start()
        except OSError as error:
            raise StartupError(f"cannot listen on {config.listen[0]}:{config.listen[1]}: {error.strerror}") from None

    def stop(self):
        self.server.stop(timeout=2)
        super().stop()


def main(argv=None):
    return run(EventServerDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
