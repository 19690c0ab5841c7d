"""Configuration of ngnpro: the [NGNPro] section."""

from thor.config import Section, Setting
from thor.datatypes import Choice, Endpoint, Float, Integer, Path, String
from thor.pgsql import SSL_MODES

NGNPRO_PORT = 9200


class NGNProConfig(Section):
    name = "NGNPro"
    listen = Setting(
        Endpoint(NGNPRO_PORT),
        "0.0.0.0:9200",
        "Address and port of the SOAP/XML interface (HTTPS; WSDL at /ngnpro/wsdl).",
    )
    certificate = Setting(
        Path(allow_empty=True),
        "",
        "The HTTPS server certificate (PEM). Empty: this node's certificate from [TLS] (issued by the provider CA).",
    )
    private_key = Setting(Path(allow_empty=True), "", "Its private key (PEM). Empty: the [TLS] private key.")
    username = Setting(String(allow_empty=False), "admin", "The username of the SOAP Login header.")
    password = Setting(
        String(),
        "",
        "The password of the SOAP Login header; at least 12 characters. Required: ngnpro does not start without it.",
    )
    login_failures = Setting(
        Integer(1, 1000),
        "5",
        "Failed logins from one address within login_window seconds before its calls are refused unchecked.",
    )
    login_window = Setting(Float(1, 86400), "60", "Seconds over which failed logins from one address count.")
    login_penalty = Setting(
        Float(1, 86400), "300", "Seconds an address that failed too often is refused (fault Client.Throttled)."
    )
    database_user = Setting(
        String(allow_empty=False),
        "thor",
        "PostgreSQL user of the provisioning database (its location comes from thor-database).",
    )
    database_password = Setting(String(), "", "Its password (empty: none, e.g. with trust or peer authentication).")
    database_grace = Setting(
        Float(0, 3600),
        "30",
        "Seconds the database last announced by thor-database is still used while no thor-database "
        "announces one (its restart, a rolling upgrade): the database itself has not moved.",
    )
    database_sslmode = Setting(
        Choice(*SSL_MODES),
        "verify-full",
        "How the database connection is protected: verify-full (TLS; the server's certificate issued by the "
        "CA of database_sslrootcert for the address announced), verify-ca, require (TLS, unchecked) or "
        "disable (in the clear: account passwords and HA1s cross the network readable).",
    )
    database_sslrootcert = Setting(
        String(),
        "",
        "The CA file the database server's certificate is checked against (empty: [TLS] ca, the provider CA).",
    )
    statement_timeout = Setting(Float(0.5, 600), "15", "Seconds a database statement may take before it fails.")
    pool_size = Setting(
        Integer(2, 100), "8", "Database connections at most (nodes' loads take at most 2, and never all of them)."
    )
    batch_size = Setting(
        Integer(10, 2000),
        "500",
        "Accounts per message when a node loads the accounts it is responsible for (fewer when they "
        "would pass about 256 KiB).",
    )

    def validate(self):
        if len(self.password) < 12:
            raise ValueError("password: set at least 12 characters (the SOAP Login header's password)")
