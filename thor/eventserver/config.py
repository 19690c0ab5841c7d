"""Configuration of thor-eventserver: the [EventServer] section."""

from thor.config import Section, Setting
from thor.datatypes import Boolean, Endpoint, Float, Integer, String


class EventServerConfig(Section):
    name = "EventServer"
    listen = Setting(Endpoint(8000), "0.0.0.0:8000", "Address and port to accept members on (TLS).")
    address = Setting(
        String(),
        "",
        "The address this event server announces (for the _eventserver._tcp SRV records thor-dns "
        "keeps). Empty: the listen address, unless it is a wildcard; then the IP address in the "
        "certificate, else the address the node name resolves to.",
    )
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
    max_handshakes_per_source = Setting(
        Integer(1, 1000000),
        "16",
        "TLS handshakes under way at once from one IP address; connections beyond are closed at once (so that "
        "one stranger's idle sockets cannot take every slot).",
    )
    max_connections_per_name = Setting(
        Integer(1, 1000000),
        "16",
        "Connections one certificate name may hold at once (the programs of one host share its certificate); "
        "beyond, the hello is refused (so that one stolen certificate cannot take every slot).",
    )
    max_subscriptions = Setting(Integer(1, 100000), "256", "Topics one connection may subscribe to.")
    max_retained = Setting(Integer(0, 10000), "16", "Retained topics one connection may hold on the server.")
    max_retained_bytes = Setting(
        Integer(1024, 1 << 30), "262144", "Bytes of retained messages one connection may hold on the server."
    )
    max_log_bytes = Setting(
        Integer(1 << 20, 1 << 32),
        "67108864",
        "Bytes of a retained log (the active manager's network status: a snapshot and the changes after it).",
    )

    presence_from_peer = Setting(
        Boolean(),
        "no",
        "Also require the address a member announces to be the one its connection comes from (for networks "
        "whose members reach the event servers without NAT: a stolen certificate then works from its own host only).",
    )

    def validate(self):
        if self.idle_timeout < 2 * self.keepalive:
            raise ValueError("idle_timeout: expected at least twice keepalive")
