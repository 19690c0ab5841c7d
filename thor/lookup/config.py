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
        Integer(1, 100000), "1000", "Clients connected at once; more are answered 'error busy' and closed."
    )
    idle_timeout = Setting(
        Float(0.1, 3600),
        "30",
        "Seconds a client may stay silent, or leave our answers unread, before it is disconnected.",
    )
    max_line_length = Setting(
        Integer(64, 65536), "1024", "Longest query line in bytes; a longer one is answered with an error and closed."
    )
