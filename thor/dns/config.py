"""Configuration of thor-dns: the [DNS] section."""

import ipaddress

from thor.config import Section, Setting
from thor.datatypes import Choice, Datatype, DomainName, Endpoint, Float, Integer, Path, String
from thor.pgsql import SSL_MODES


class NameserverList(Datatype):
    """name=address pairs, comma separated; the address may be left out for a name outside the zone."""

    expected = "name=address pairs, comma separated (ns1.example.com=192.0.2.53)"

    def parse(self, text):
        result = []
        for item in text.split(","):
            if not item.strip():
                continue
            name, _, address = (part.strip() for part in item.partition("="))
            try:
                name = DomainName().parse(name)
                if address:
                    address = str(ipaddress.ip_address(address))
            except ValueError:
                raise ValueError(f"{self.expected}; {item.strip()!r} is not one") from None
            result.append((name, address))
        return tuple(result)


class DNSConfig(Section):
    name = "DNS"
    backend = Setting(
        Choice("embedded", "powerdns"),
        "embedded",
        "embedded: thor-dns answers DNS itself (one machine, make demo). "
        "powerdns: thor-dns writes the zone into PowerDNS's gpgsql database.",
    )
    listen = Setting(Endpoint(53), "0.0.0.0:53", "embedded: address and port to answer DNS on, UDP and TCP.")
    nameservers = Setting(
        NameserverList(),
        "",
        "The zone's name servers as name=address, comma separated (their NS and glue records). "
        "Empty: this host, under its node name and announced address.",
    )
    ttl = Setting(Integer(1, 86400), "30", "TTL of every record, and the SOA minimum, in seconds.")
    answer_limit = Setting(
        Integer(1, 100),
        "3",
        "How many records a sliced answer carries at most (a random sample of the live nodes).",
    )
    hostmaster = Setting(DomainName(allow_empty=True), "", "The SOA contact, as a name. Empty: hostmaster.<domain>.")
    database_host = Setting(String(allow_empty=False), "127.0.0.1", "powerdns: PostgreSQL host.")
    database_port = Setting(Integer(1, 65535), "5432", "powerdns: PostgreSQL port.")
    database_name = Setting(String(allow_empty=False), "pdns", "powerdns: the database PowerDNS reads (gpgsql).")
    database_user = Setting(String(allow_empty=False), "pdns", "powerdns: PostgreSQL user.")
    database_password = Setting(String(), "", "powerdns: PostgreSQL password (keep this file mode 0640, group thor).")
    database_sslmode = Setting(
        Choice(*SSL_MODES),
        "verify-full",
        "powerdns: how the connection is protected: verify-full (TLS; the server's certificate issued by the CA "
        "of database_sslrootcert for database_host), verify-ca, require (TLS, unchecked) or disable (in the clear).",
    )
    database_sslrootcert = Setting(
        String(),
        "",
        "powerdns: the CA file the server's certificate is checked against (empty: [TLS] ca, the provider CA).",
    )
    powerdns_schema = Setting(
        Path(),
        "/usr/share/pdns-backend-pgsql/schema/schema.pgsql.sql",
        "powerdns: the gpgsql schema, applied when the database has no PowerDNS tables yet.",
    )
    retry_interval = Setting(
        Float(0.1, 600), "1", "Seconds between attempts to apply a status the backend refused (database away)."
    )
