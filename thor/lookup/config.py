"""Configuration of the lookup interface thor-node serves: the [Lookup] section."""

from thor.config import Section, Setting
from thor.datatypes import Endpoint, Float, Integer

LOOKUP_PORT = 9500


class LookupConfig(Section):
    name = "Lookup"
    listen = Setting(
        Endpoint(LOOKUP_PORT),
        "0.0.0.0:9500",
        "Address and port of the public lookup interface (plain TCP, read-only; docs/lookup-protocol.md).",
    )
    max_connections = Setting(
        Integer(1, 100000),
        "1000",
        "Clients connected at once; when all are taken, a newcomer takes the slot of a client that asked "
        "nothing for a second or more, or is answered 'error busy' and closed.",
    )
    max_connections_per_address = Setting(
        Integer(1, 100000),
        "100",
        "Clients connected at once from one IP address; more from it are answered 'error busy' and closed.",
    )
    idle_timeout = Setting(
        Float(0.1, 3600),
        "30",
        "Seconds a client may go without a query (blank lines and unfinished lines do not count), "
        "or leave our answers unread, before it is disconnected.",
    )
    max_line_length = Setting(
        Integer(64, 65536), "1024", "Longest query line in bytes; a longer one is answered with an error and closed."
    )
