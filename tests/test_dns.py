"""thor-dns on both backends: the embedded server and real PowerDNS 4.7 with PostgreSQL (gpgsql)."""

import collections
import os
import socket
import struct
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import gevent.socket
import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thor.dns.embedded import EmbeddedZone
from thor.dns.records import ZoneSettings, zone_records
from thor.loopback.network import EventServerProcess, wait_status
from thor.loopback.postgresql import SCHEMA, PostgreSQL, PowerDNS
from thor.loopback.process import free_port, wait_for
from thor.membership.entity import make_entity
from thor.membership.status import NetworkStatus, merge_presence

DOMAIN = "sipthor.test"
NODES = {"node1": "127.0.0.11", "node2": "127.0.0.12", "node3": "127.0.0.13", "node4": "127.0.0.14"}
LIMIT = 2


def status_of(nodes):
    members = {
        name: merge_presence([make_entity(name, address, ["sip_proxy"], "0.1.0", 0)]) for name, address in nodes.items()
    }
    return NetworkStatus(1, "manager1", members)


def test_hostmaster_is_made_absolute():
    assert ZoneSettings(DOMAIN, [], hostmaster="noc.example.com").hostmaster == "noc.example.com.sipthor.test."
    assert ZoneSettings(DOMAIN, [], hostmaster="noc.sipthor.test").hostmaster == "noc.sipthor.test."
    assert ZoneSettings(DOMAIN, []).hostmaster == "hostmaster.sipthor.test."


def test_record_set_of_a_status():
    settings = ZoneSettings(DOMAIN, [("ns1", "127.0.0.53")], ttl=30, answer_limit=LIMIT)
    records = zone_records(status_of({"node1": "127.0.0.11", "node2": "127.0.0.12"}), settings)
    shown = {key: list(rrset.rdatas) for key, rrset in records.items()}
    assert shown[("sipthor.test.", "NS")] == ["ns1.sipthor.test."]
    assert shown[("ns1.sipthor.test.", "A")] == ["127.0.0.53"]
    assert shown[("node1.sipthor.test.", "A")] == ["127.0.0.11"]
    assert shown[("_sip._udp.sipthor.test.", "SRV")] == [
        "10 10 5060 node1.sipthor.test.",
        "10 10 5060 node2.sipthor.test.",
    ]
    assert shown[("_sips._tcp.sipthor.test.", "SRV")][0] == "10 10 5061 node1.sipthor.test."
    assert shown[("sip.sipthor.test.", "A")] == ["127.0.0.11", "127.0.0.12"]
    assert [r.split()[3] for r in shown[("sipthor.test.", "NAPTR")]] == ['"SIPS+D2T"', '"SIP+D2T"', '"SIP+D2U"']
    assert records[("_sip._udp.sipthor.test.", "SRV")].sliced
    assert not records[("node1.sipthor.test.", "A")].sliced
    # No sip_proxy, no NAPTR and no SIP SRV.
    empty = zone_records(NetworkStatus(2, "manager1", {}), settings)
    assert set(empty) == {("sipthor.test.", "NS"), ("ns1.sipthor.test.", "A")}


# -- a network with thor-dns ----------------------------------------------------


def start_network(overlay):
    overlay.start_eventservers(1)
    overlay.manager("manager1")
    for name, address in NODES.items():
        overlay.node(name, "sip_proxy", address)
    observer = overlay.observer()
    wait_status(observer, lambda s: set(s.roles.get("sip_proxy", ())) == set(NODES), message="all nodes")
    return observer


def start_thor_dns(overlay, name="dns1", **settings):
    values = {"answer_limit": LIMIT, "nameservers": "ns1=127.0.0.53", "retry_interval": 0.2}
    values.update(settings)
    return overlay.start(name, "thor.dns.main", "thor_dnsmanager", "127.0.0.53", DNS=values)


def query(server, name, rdtype, tcp=False):
    message = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, server[0], port=server[1], timeout=2)


def resolve_rfc3263(server):
    """NAPTR -> SRV -> A, as a SIP client does (RFC 3263), for UDP."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    resolver.lifetime = 3
    naptr = {r.service.decode(): r for r in resolver.resolve(DOMAIN, "NAPTR")}
    assert set(naptr) == {"SIPS+D2T", "SIP+D2T", "SIP+D2U"}
    srv = resolver.resolve(naptr["SIP+D2U"].replacement, "SRV")
    targets = {}
    for record in srv:
        assert record.port == 5060
        targets[record.target.to_text()] = [a.to_text() for a in resolver.resolve(record.target, "A")]
    return targets


def answered_nodes(server, rdtype="SRV", name=f"_sip._udp.{DOMAIN}."):
    answer = query(server, name, rdtype).answer
    if not answer:
        return set()
    if rdtype == "SRV":
        return {record.target.to_text().split(".")[0] for record in answer[0]}
    return {record.to_text() for record in answer[0]}


def check_network_in_dns(overlay, observer, server):
    # RFC 3263 resolution gives live nodes and their addresses.
    targets = resolve_rfc3263(server)
    assert 1 <= len(targets) <= LIMIT
    for target, addresses in targets.items():
        assert addresses == [NODES[target.split(".")[0]]]
    # 1,000 queries: never more than the limit, every live node appears.
    seen = collections.Counter()
    for _ in range(1000):
        nodes = answered_nodes(server)
        assert 1 <= len(nodes) <= LIMIT
        seen.update(nodes)
    assert set(seen) == set(NODES)
    # A killed node leaves the answers within 1 s of the status change.
    overlay.programs["node4"].kill()
    status = wait_status(observer, lambda s: "node4" not in s.members, timeout=5, message="node4 out of the status")
    changed = time.monotonic()

    def node4_gone():
        return (
            all("node4" not in answered_nodes(server) for _ in range(20))
            and not query(server, f"node4.{DOMAIN}.", "A").answer
        )

    wait_for(node4_gone, timeout=3, interval=0.01, message="node4 out of DNS")
    elapsed = time.monotonic() - changed
    assert elapsed <= 1.0, f"DNS followed the status after {elapsed:.3f}s"
    assert status.version > 0
    soa = query(server, f"{DOMAIN}.", "SOA").answer[0][0]
    return soa.serial


def test_one_strangers_idle_tcp_connections_keep_no_resolver_out():
    """8 idle TCP connections from one address used to take all 8 of the embedded server's TCP
    slots for its 5 s idle timeout; now one address holds 2 and the rest are closed at once."""
    settings = ZoneSettings(DOMAIN, [("ns1", "127.0.0.53")], ttl=30, answer_limit=LIMIT)
    zone = EmbeddedZone(("127.0.5.53", 0), max_tcp_clients=8, max_tcp_per_source=2)
    zone.update(settings, zone_records(status_of({"node1": "127.0.0.11"}), settings), 1)
    zone.start()
    flood = []
    try:
        for _ in range(8):
            stranger = gevent.socket.socket()
            stranger.bind(("127.0.0.99", 0))
            stranger.connect(zone.address)
            flood.append(stranger)
        # In-process (the server's greenlets must run while we wait): the TCP query by hand.
        with gevent.socket.create_connection(zone.address, timeout=2) as client:
            wire = dns.message.make_query(f"node1.{DOMAIN}", "A").to_wire()
            client.sendall(struct.pack("!H", len(wire)) + wire)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = client.recv(65535)  # within its 2 s
                assert chunk, "the server closed the connection"
                data += chunk
        answer = dns.message.from_wire(data[2:])
        assert [rrset.to_text().split()[-1] for rrset in answer.answer] == ["127.0.0.11"]
    finally:
        for stranger in flood:
            stranger.close()
        zone.stop()


def fuzz_zone():
    zone_settings = ZoneSettings(DOMAIN, [("ns1", "127.0.0.53")], ttl=30, answer_limit=LIMIT)
    zone = EmbeddedZone(("127.0.0.1", 0))  # never started: answer() is what the sockets call
    zone.update(zone_settings, zone_records(status_of(NODES), zone_settings), 1)
    return zone


FUZZ_ZONE = fuzz_zone()
QUERIES = [
    dns.message.make_query(name, rdtype).to_wire()
    for name, rdtype in [(f"_sip._udp.{DOMAIN}", "SRV"), (f"node1.{DOMAIN}", "A"), (DOMAIN, "NAPTR"), ("x.org", "A")]
]


def mutate(query, overwrites, length, tail):
    """query with some bytes overwritten, then cut to length and extended with tail."""
    data = bytearray(query)
    for index, value in overwrites:
        if index < len(data):
            data[index] = value
    return bytes(data[:length]) + tail


# Queries of the zone's with some bytes overwritten, cut short or extended.
mutated_queries = st.builds(
    mutate,
    st.sampled_from(QUERIES),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=6),
    st.integers(0, 90),
    st.binary(max_size=20),
)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=600), mutated_queries))
def test_any_packet_gets_a_well_formed_answer_of_the_same_id_or_silence(wire):
    """Fuzz: whatever arrives on the DNS port, the embedded server answers with a message
    that parses, carries the query's id and fits the size asked for, or stays silent."""
    reply = FUZZ_ZONE.answer(wire, 512)
    if reply is None:
        return
    assert len(reply) <= 512
    reply_id, flags = struct.unpack("!HH", reply[:4])
    assert reply_id == struct.unpack("!H", wire[:2])[0] and flags & dns.flags.QR
    if len(reply) > 12:  # more than a header (a FORMERR copies an opcode older dnspython cannot read)
        dns.message.from_wire(reply)  # raises when malformed
    else:
        assert len(reply) == 12 and flags & 0xF == dns.rcode.FORMERR


def test_embedded_backend(overlay):
    observer = start_network(overlay)
    port = free_port()
    dns_program = start_thor_dns(overlay, backend="embedded", listen=f"127.0.0.1:{port}")
    server = ("127.0.0.1", port)
    dns_program.wait_log("zone sipthor.test serial")
    wait_for(lambda: len(set(resolve_rfc3263(server))) >= 1, message="zone served")
    serial_before = query(server, f"{DOMAIN}.", "SOA").answer[0][0].serial
    before = dns_program.scrape()
    assert before.value("thor_dns_records", type="A") >= len(NODES)
    serial_after = check_network_in_dns(overlay, observer, server)
    assert serial_after > serial_before
    # The metrics follow: node4's A record gone, one more update, timed from the status change.
    after = dns_program.scrape()
    assert after.value("thor_dns_records", type="A") == before.value("thor_dns_records", type="A") - 1
    assert after.value("thor_dns_updates_total") > before.value("thor_dns_updates_total")
    assert after.value("thor_dns_update_seconds_count") > before.value("thor_dns_update_seconds_count")
    assert after.value("thor_dns_update_seconds_bucket", le="1.0") == after.value("thor_dns_update_seconds_count")
    assert after.value("thor_dns_backend_errors_total") == 0
    # Answers over TCP too.
    assert query(server, f"node1.{DOMAIN}.", "A", tcp=True).answer[0][0].to_text() == "127.0.0.11"
    # Outside the zone: refused; unknown names: NXDOMAIN with the SOA.
    assert query(server, "example.com.", "A").rcode() == dns.rcode.REFUSED
    missing = query(server, f"nothing.{DOMAIN}.", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority[0].rdtype == dns.rdatatype.SOA
    # An empty non-terminal exists (RFC 8020): NODATA, not NXDOMAIN.
    between = query(server, f"_udp.{DOMAIN}.", "A")
    assert between.rcode() == dns.rcode.NOERROR and not between.answer


def test_srv_records_name_each_programs_own_port_on_a_shared_host(overlay, pki):
    """An event server, a manager and ngnpro on one host share its certificate and name; each
    service's SRV record carries the port of the program behind it, whatever started last."""
    address = "127.0.2.1"
    pki.ca.issue("thor1", "thor_eventserver,thor_manager,provisioning_server", address=address)
    server = EventServerProcess(overlay.directory, pki, "thor1")
    overlay.eventservers.append(server)
    server.wait_ready()
    overlay.start("thor1-manager", "thor.manager.main", None, address, certificate="thor1")
    ngnpro_port = free_port(address)
    ngnpro = {"listen": f"{address}:{ngnpro_port}", "password": "a-long-enough-password"}
    overlay.start("thor1-ngnpro", "thor.ngnpro.main", None, address, certificate="thor1", NGNPro=ngnpro)
    observer = overlay.observer()
    wait_status(observer, lambda s: "thor1" in s.roles.get("provisioning_server", ()), message="ngnpro announced")
    dns_port = free_port()
    start_thor_dns(overlay, backend="embedded", listen=f"127.0.0.1:{dns_port}").wait_log("zone sipthor.test serial")
    dns_server = ("127.0.0.1", dns_port)

    def srv_port(name):
        answer = query(dns_server, f"{name}.{DOMAIN}.", "SRV").answer
        return {record.target.to_text(): record.port for record in answer[0]} if answer else None

    wait_for(lambda: srv_port("_ngnpro._tcp"), message="the _ngnpro._tcp SRV record")
    assert srv_port("_eventserver._tcp") == {f"thor1.{DOMAIN}.": server.port}
    assert srv_port("_ngnpro._tcp") == {f"thor1.{DOMAIN}.": ngnpro_port}


def test_embedded_server_survives_malformed_and_truncated_packets(overlay):
    start_network(overlay)
    port = free_port()
    dns_program = start_thor_dns(overlay, backend="embedded", listen=f"127.0.0.1:{port}")
    server = ("127.0.0.1", port)
    dns_program.wait_log("zone sipthor.test serial")
    good = dns.message.make_query(f"node1.{DOMAIN}.", "A").to_wire()
    packets = [
        b"",
        b"\x00",
        good[:5],
        good[:12],
        good[:-3],
        good + b"\xff" * 10,
        os.urandom(64),
        struct.pack("!HHHHHH", 1, 0, 50, 0, 0, 0),  # claims 50 questions, has none
        good[:2] + b"\x80\x00" + good[4:],  # a response, not a query
        good[:12] + b"\xc0\x0c" * 8,  # a compression pointer loop
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in packets:
            sock.sendto(packet, server)
    # Over TCP: a length that lies, then a client that says nothing.
    with socket.create_connection(server, timeout=2) as sock:
        sock.sendall(struct.pack("!H", 500) + good)
    idle = socket.create_connection(server, timeout=2)
    assert query(server, f"node1.{DOMAIN}.", "A").answer[0][0].to_text() == "127.0.0.11"
    assert query(server, f"node2.{DOMAIN}.", "A", tcp=True).answer[0][0].to_text() == "127.0.0.12"
    idle.close()
    assert dns_program.process.poll() is None


# -- PowerDNS -----------------------------------------------------------------


@pytest.fixture
def postgresql():
    database = PostgreSQL()
    yield database
    database.remove()


def powerdns_settings(postgresql, database):
    return {
        "backend": "powerdns",
        "database_host": "127.0.0.1",
        "database_port": postgresql.port,
        "database_name": database,
        "database_user": "postgres",
        "database_sslrootcert": postgresql.ca,
        "powerdns_schema": SCHEMA,
    }


def test_powerdns_backend(overlay, postgresql, tmp_path):
    postgresql.create_database("pdns")
    observer = start_network(overlay)
    # thor-dns creates the schema and the zone in the empty database.
    dns_program = start_thor_dns(overlay, **powerdns_settings(postgresql, "pdns"))
    dns_program.wait_log("zone sipthor.test serial")
    assert "created the PowerDNS schema" in dns_program.log()
    powerdns = PowerDNS(str(tmp_path), postgresql, "pdns")
    try:
        server = powerdns.address
        wait_for(lambda: resolve_rfc3263(server), message="PowerDNS answers")
        serial_before = query(server, f"{DOMAIN}.", "SOA").answer[0][0].serial
        serial_after = check_network_in_dns(overlay, observer, server)
        assert serial_after > serial_before
        # Only the rows that changed were touched: node4's A record and the four sliced (LUA) sets it was in.
        last = [line for line in dns_program.log().splitlines() if "rows deleted" in line][-1]
        assert last.endswith("(5 rows deleted, 4 inserted)"), last
    finally:
        powerdns.stop()


def test_powerdns_database_away_then_back(overlay, postgresql, tmp_path):
    postgresql.create_database("pdns")
    observer = start_network(overlay)
    dns_program = start_thor_dns(overlay, **powerdns_settings(postgresql, "pdns"))
    dns_program.wait_log("zone sipthor.test serial")
    postgresql.stop()
    overlay.programs["node3"].kill()
    wait_status(observer, lambda s: "node3" not in s.members, message="node3 gone")
    dns_program.wait_log("cannot apply network status", timeout=10)
    assert dns_program.scrape().value("thor_dns_backend_errors_total") >= 1
    postgresql.start()
    # Retried until the database is back; then the zone equals the current status.
    wait_for(lambda: dns_program.log().count("zone sipthor.test serial") >= 2, timeout=15, message="applied again")
    powerdns = PowerDNS(str(tmp_path), postgresql, "pdns")
    try:
        assert not query(powerdns.address, f"node3.{DOMAIN}.", "A").answer
        assert query(powerdns.address, f"node2.{DOMAIN}.", "A").answer[0][0].to_text() == "127.0.0.12"
    finally:
        powerdns.stop()


def test_two_thor_dns_on_one_database_do_not_fight(overlay, postgresql):
    postgresql.create_database("pdns")
    observer = start_network(overlay)
    first = start_thor_dns(overlay, "dns1", **powerdns_settings(postgresql, "pdns"))
    second = start_thor_dns(overlay, "dns2", **powerdns_settings(postgresql, "pdns"))
    first.wait_log("zone sipthor.test serial")
    second.wait_log("zone sipthor.test serial")
    overlay.programs["node2"].kill()
    status = wait_status(observer, lambda s: "node2" not in s.members, message="node2 gone")
    applied = f"from status v{status.version} "
    wait_for(lambda: applied in first.log() and applied in second.log(), message="both applied the status")
    with psycopg2.connect(postgresql.dsn("pdns")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name, type, content, count(*) FROM records GROUP BY 1, 2, 3 HAVING count(*) > 1")
        assert cursor.fetchall() == []  # no row written twice
        cursor.execute("SELECT count(*) FROM records WHERE name = 'node2.sipthor.test'")
        assert cursor.fetchone()[0] == 0
    # Whoever came second found nothing left to do.
    logs = first.log() + second.log()
    assert "(0 rows deleted, 0 inserted)" in logs
