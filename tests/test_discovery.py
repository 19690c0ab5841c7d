"""Event server discovery through the _eventserver._tcp SRV records of the network's domain."""

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from gevent.server import DatagramServer

from thor.events.client import EventClient, discover_event_servers
from thor.loopback.network import start_eventservers
from thor.loopback.process import wait_for


class FakeZone(DatagramServer):
    """A tiny authoritative answerer for the test zone, on loopback UDP."""

    def __init__(self, records):
        super().__init__(("127.0.0.1", 0))
        self.records = records  # {(name, type): [rdata text, ...]}

    def handle(self, data, address):
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdatas = self.records.get((name, dns.rdatatype.to_text(question.rdtype)))
        if rdatas:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 5, dns.rdataclass.IN, question.rdtype, rdatas)
            )
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.socket.sendto(response.to_wire(), address)


@pytest.fixture
def zone():
    servers = []

    def start(records):
        server = FakeZone(records)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_srv_discovery_connects_to_every_listed_server(tmp_path, pki, zone):
    servers = start_eventservers(str(tmp_path), pki, 3)
    try:
        records = {
            ("_eventserver._tcp.sipthor.test.", "SRV"): [
                f"10 10 {server.port} es{index + 1}.sipthor.test." for index, server in enumerate(servers)
            ]
        }
        for index in range(3):
            records[(f"es{index + 1}.sipthor.test.", "A")] = ["127.0.0.1"]
        dns_server = zone(records)
        nameservers = [dns_server.address]
        assert sorted(discover_event_servers("sipthor.test", nameservers)) == sorted(
            server.endpoint for server in servers
        )
        member = EventClient(
            pki.contexts("node1", "sip_proxy"),
            domain="sipthor.test",
            nameservers=nameservers,
            discovery_interval=0.5,
            backoff=(0.1, 1),
        )
        member.start()
        try:
            wait_for(lambda: member.connected_servers == ["es1", "es2", "es3"], message="discovered and connected")
            # A server taken out of DNS is dropped at the next lookup.
            records[("_eventserver._tcp.sipthor.test.", "SRV")].pop()
            wait_for(lambda: member.connected_servers == ["es1", "es2"], message="es3 dropped after re-discovery")
        finally:
            member.stop(flush_timeout=0)
    finally:
        for server in servers:
            server.close()


def test_missing_srv_records_mean_no_servers(zone):
    dns_server = zone({("other.sipthor.test.", "A"): ["127.0.0.1"]})
    assert discover_event_servers("sipthor.test", [dns_server.address]) == []


def test_client_needs_servers_or_a_domain(pki):
    with pytest.raises(ValueError, match="static list or a domain"):
        EventClient(pki.contexts("node1", "sip_proxy"))
