"""The DNS records of the network's domain, computed from the network status.

One pure function, zone_records(), serves both backends (embedded and
PowerDNS): they differ only in how they store and answer. docs/dns.md lists
the record set. Names are absolute, lowercase, with the trailing dot.
"""

import ipaddress

from thor import roles

__all__ = ["SERVICES", "RRSet", "ZoneSettings", "host_name", "zone_records"]

SRV_PRIORITY = 10
SRV_WEIGHT = 10


class ZoneSettings:
    """What the operator decides about the zone; the rest follows from the network status."""

    def __init__(self, domain, nameservers, ttl=30, answer_limit=3, hostmaster=None):
        self.domain = domain.rstrip(".").lower()
        self.origin = self.domain + "."
        self.nameservers = tuple(nameservers)  # ((host name, address or ""), ...)
        self.ttl = ttl
        self.answer_limit = answer_limit
        self.hostmaster = self.absolute(hostmaster) if hostmaster else f"hostmaster.{self.origin}"

    def absolute(self, name):
        name = name.rstrip(".").lower()
        if name == self.domain or name.endswith("." + self.domain):
            return name + "."
        return f"{name}.{self.origin}"


# Per role: a name for its members' addresses, and SRV services (service, port). A role
# whose program announces a "port" attribute with it (event servers, NGNPro) gets that
# port in its SRV records instead of the default given here.
SERVICES = {
    roles.SIP_PROXY: ("sip", (("_sip._udp", 5060), ("_sip._tcp", 5060), ("_sips._tcp", 5061))),
    roles.XCAP_SERVER: ("xcap", (("_xcap._tcp", 443),)),
    roles.PROVISIONING_SERVER: ("ngnpro", (("_ngnpro._tcp", 9200),)),
    roles.MSRP_RELAY: ("msrprelay", (("_msrps._tcp", 2855),)),
    roles.EVENT_SERVER: ("eventserver", (("_eventserver._tcp", 8000),)),
    roles.VOICEMAIL_SERVER: ("voicemail", ()),
    roles.MEDIA_RELAY: ("relay", ()),
}
# The roles whose programs announce the port they serve on.
PORT_ANNOUNCED = frozenset({roles.EVENT_SERVER, roles.PROVISIONING_SERVER})

NAPTR = (
    (10, "SIPS+D2T", "_sips._tcp"),
    (20, "SIP+D2T", "_sip._tcp"),
    (30, "SIP+D2U", "_sip._udp"),
)


class RRSet:
    """One name and type: its records as presentation text; sliced sets answer a random subset."""

    __slots__ = ("name", "rdatas", "rdtype", "sliced", "ttl")

    def __init__(self, name, rdtype, ttl, rdatas, sliced=False):
        self.name = name
        self.rdtype = rdtype
        self.ttl = ttl
        self.rdatas = tuple(sorted(rdatas))
        self.sliced = sliced

    def __eq__(self, other):
        return isinstance(other, RRSet) and (self.name, self.rdtype, self.ttl, self.rdatas, self.sliced) == (
            other.name,
            other.rdtype,
            other.ttl,
            other.rdatas,
            other.sliced,
        )

    def __hash__(self):
        return hash((self.name, self.rdtype, self.rdatas))

    def __repr__(self):
        return f"RRSet({self.name} {self.rdtype} {list(self.rdatas)}{' sliced' if self.sliced else ''})"


def host_name(settings, member_name):
    return settings.absolute(member_name)


def _address_type(address):
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def _port(status, name, role, default):
    if role not in PORT_ANNOUNCED:
        return default
    port = status.attributes(name, role).get("port")
    return port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else default


def zone_records(status, settings):
    """{(name, type): RRSet} for everything but the SOA (its serial is the backend's)."""
    ttl = settings.ttl
    origin = settings.origin
    records = {}

    def add(name, rdtype, rdatas, sliced=False):
        if rdatas:
            records[(name, rdtype)] = RRSet(name, rdtype, ttl, rdatas, sliced)

    add(origin, "NS", [settings.absolute(host) for host, _ in settings.nameservers])
    glue = {}
    for host, address in settings.nameservers:
        if address:
            glue.setdefault((settings.absolute(host), _address_type(address)), []).append(address)
    for (name, rdtype), addresses in glue.items():
        add(name, rdtype, addresses)

    # Every live member by its own name.
    for name, entity in status.members.items():
        key = (host_name(settings, name), _address_type(entity["address"]))
        records.setdefault(key, RRSet(key[0], key[1], ttl, []))
        records[key] = RRSet(key[0], key[1], ttl, [*records[key].rdatas, entity["address"]])

    for role, (label, services) in SERVICES.items():
        members = status.role_members(role)
        if not members:
            continue
        by_type = {}
        for entity in members:
            by_type.setdefault(_address_type(entity["address"]), []).append(entity["address"])
        for rdtype, addresses in by_type.items():
            add(f"{label}.{origin}", rdtype, addresses, sliced=True)
        for service, default_port in services:
            targets = [
                f"{SRV_PRIORITY} {SRV_WEIGHT} {_port(status, entity['name'], role, default_port)} "
                f"{host_name(settings, entity['name'])}"
                for entity in members
            ]
            add(f"{service}.{origin}", "SRV", targets, sliced=True)

    if status.role_members(roles.SIP_PROXY):
        add(origin, "NAPTR", [f'{order} 10 "s" "{service}" "" {srv}.{origin}' for order, service, srv in NAPTR])
    return records
