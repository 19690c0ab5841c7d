"""Configuration of thor-database: the [Database] section."""

from thor.config import Section, Setting
from thor.datatypes import Boolean, Float, Integer, Port, String


class DatabaseConfig(Section):
    name = "Database"
    host = Setting(
        String(),
        "",
        "Host name or address consumers connect to. Empty: this member's announced address.",
    )
    port = Setting(Port(), "5432", "PostgreSQL port.")
    database = Setting(String(allow_empty=False), "thor", "Database name.")
    priority = Setting(Integer(0, 65535), "10", "Lower wins when several databases are announced.")
    check = Setting(
        Boolean(),
        "yes",
        "Announce the database only while it accepts TCP connections on host:port. no: announce it unconditionally.",
    )
    check_interval = Setting(Float(0.1, 3600), "2", "Seconds between connection checks of the database.")
    check_timeout = Setting(Float(0.05, 60), "1", "Seconds the database has to accept a connection.")
