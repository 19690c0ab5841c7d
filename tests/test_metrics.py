"""Every program's /metrics, scraped as Prometheus does, moving with what the network does."""

import os
import re
import socket
import ssl

import gevent.socket
import pytest

import thor
from thor import roles
from thor.config import ConfigError
from thor.lookup.client import LookupClient
from thor.loopback.network import members, wait_status
from thor.loopback.process import wait_for
from thor.metrics import MetricsConfig, MetricsServer, gauge
from thor.transport.tls import TLSError, connect

NODE = ("node1", "127.0.0.11")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFINED = re.compile(r'\b(?:gauge|counter|histogram)\(\s*"(thor_[a-z0-9_]+)"')


def start_network(overlay):
    overlay.start_eventservers(2, keepalive=1, idle_timeout=3)
    overlay.manager("manager1", "127.0.1.1")
    overlay.node(NODE[0], "sip_proxy", NODE[1])
    overlay.start("database1", "thor.database.main", roles.DATABASE, "127.0.2.1", Database={"check": "no"})
    observer = overlay.observer()
    wait_status(observer, lambda s: members(s) >= {"manager1", "node1", "database1"}, message="everyone in")
    return observer


def value(program, name, **labels):
    return program.scrape().value(name, **labels)


def test_every_program_exports_its_version_expiry_dates_and_process_metrics(overlay, pki):
    start_network(overlay)
    programs = [*overlay.eventservers, *overlay.programs.values()]
    for program in programs:
        samples = program.scrape()
        assert samples.value("thor_build_info", version="0.1.0") == 1, program.name
        # ScratchPKI issues for 730 days and its CRL for 30: both ahead, both counted in seconds.
        certificate = samples.value("thor_tls_expiry_seconds", file="certificate")
        assert 729 * 86400 < certificate <= 730 * 86400, (program.name, certificate)
        assert 0 < samples.value("thor_tls_expiry_seconds", file="crl") < certificate
        assert samples.value("thor_tls_expiry_seconds", file="ca") > 0
        assert samples.value("process_resident_memory_bytes") > 0
    for name in ("manager1", "node1", "database1"):
        samples = overlay.programs[name].scrape()
        assert samples.value("thor_eventserver_links_up") == samples.value("thor_eventserver_links") == 2, name


def test_the_member_gauges_follow_a_killed_member_and_lookups_are_counted(overlay):
    start_network(overlay)
    es1, manager, node = overlay.eventservers[0], overlay.programs["manager1"], overlay.programs["node1"]
    assert value(manager, "thor_manager_active") == 1
    assert value(manager, "thor_manager_members", role=roles.SIP_PROXY) == 1
    assert value(manager, "thor_manager_status_version") > 0
    assert value(manager, "thor_manager_publications_total") >= 1
    assert value(node, "thor_role_up", role=roles.SIP_PROXY) == 1
    wait_for(lambda: value(es1, "thor_eventserver_members", role=roles.SIP_PROXY) == 1, message="node1 on es1")

    # The node's rings follow the manager's latest status (all members in).
    wait_for(
        lambda: value(node, "thor_node_status_ring_version") == value(manager, "thor_manager_status_version"),
        message="node1's rings on the manager's status",
    )
    before = value(node, "thor_node_lookups_total", command="lookup") or 0
    with LookupClient(*node.lookup) as client:
        answers = client.query(*(f"lookup sip_proxy for user{index}@example.com" for index in range(25)))
    assert answers == [NODE[1]] * 25
    assert value(node, "thor_node_lookups_total", command="lookup") == before + 25

    frames_before = value(es1, "thor_eventserver_sent_frames_total")
    node.kill()
    wait_for(
        lambda: value(es1, "thor_eventserver_members", role=roles.SIP_PROXY) is None, message="node1 gone from es1"
    )
    wait_for(
        lambda: value(manager, "thor_manager_members", role=roles.SIP_PROXY) is None,
        message="node1 gone from the manager's count",
    )
    # The status without node1 went out to the members through es1.
    assert value(es1, "thor_eventserver_sent_frames_total") > frames_before


def test_a_refused_handshake_is_counted_by_reason(overlay, other_pki):
    start_network(overlay)
    es1 = overlay.eventservers[0]
    before = value(es1, "thor_eventserver_refused_total", reason="tls") or 0
    with pytest.raises((TLSError, ssl.SSLError, OSError)):
        connect(es1.endpoint, other_pki.contexts("stranger", roles.SIP_PROXY), timeout=5)
    wait_for(
        lambda: value(es1, "thor_eventserver_refused_total", reason="tls") == before + 1, message="the refusal counted"
    )


def test_only_loopback_and_the_allowed_scrapers_get_metrics():
    config = MetricsConfig({"allow": "192.0.2.7, 2001:db8::/32"})
    server = MetricsServer(("127.0.0.1", 0), lambda: [gauge("thor_test", "A test.", 1)], config.allow)
    allowed = ["127.0.0.1", "::1", "::ffff:127.0.0.1", "192.0.2.7", "::ffff:192.0.2.7", "2001:db8::5"]
    refused = ["192.0.2.8", "10.0.0.1", "2001:db9::1", "not an address", ""]
    assert [address for address in allowed if not server._allowed(address)] == []
    assert [address for address in refused if server._allowed(address)] == []


def test_a_metrics_setting_that_is_not_an_address_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"\[Metrics\] node = '127.0.0.1:http': expected host\[:port\]"):
        MetricsConfig({"node": "127.0.0.1:http"}, source="config.ini")
    with pytest.raises(ConfigError, match=r"\[Metrics\] allow = 'the monitoring host'"):
        MetricsConfig({"allow": "the monitoring host"}, source="config.ini")
    assert MetricsConfig({"node": ""}).listen_of("thor-node") is None
    assert MetricsConfig().listen_of("ngnpro") == ("127.0.0.1", 9816)
    assert MetricsConfig().listen_of("thor-monitor") is None  # no key: serves no metrics


def test_docs_list_every_metric_the_code_defines():
    """docs/metrics.md names each thor_ metric the programs define (gauge(), counter(), histogram())."""
    source = os.path.dirname(thor.__file__)
    defined = set()
    for directory, _, files in os.walk(source):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as stream:
                    defined.update(DEFINED.findall(stream.read()))
    assert len(defined) >= 30, defined
    with open(os.path.join(ROOT, "docs", "metrics.md")) as stream:
        documented = set(re.findall(r"`(thor_[a-z0-9_]+)`", stream.read()))
    assert sorted(defined - documented) == []
    assert sorted(documented - defined) == []


def test_a_metrics_port_in_use_is_a_clear_start_up_error(overlay):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        program = overlay.start(
            "database1", "thor.database.main", roles.DATABASE, "127.0.2.1", Metrics={"database": f"127.0.0.1:{port}"}
        )
        assert program.exited(10) == 78  # EX_CONFIG: supervisor's log says what to fix
    assert f"cannot serve metrics on 127.0.0.1:{port} ([Metrics] database): Address already in use" in program.log()


def own_address():
    """A non-loopback IPv4 address of this machine (the route's source; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this machine")
        return probe.getsockname()[0]


def http_get(address, port, source, request=b"GET /metrics HTTP/1.0\r\n\r\n"):
    """The whole answer to request (None: send nothing), from source; gevent's socket, so that the
    server in this process runs meanwhile."""
    with gevent.socket.create_connection((address, port), timeout=5, source_address=(source, 0)) as sock:
        if request is not None:
            sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_stranger_gets_403_before_sending_anything_and_loopback_and_the_allowed_get_metrics():
    address = own_address()
    families = lambda: [gauge("thor_test", "A test.", 1)]  # noqa: E731
    closed = MetricsServer(("0.0.0.0", 0), families)
    allowing = MetricsServer(("0.0.0.0", 0), families, allow=MetricsConfig({"allow": address}).allow)
    for server in (closed, allowing):
        server.bind()
        server.start()
    try:
        port = closed.address[1]
        # Answered and closed without a request: a stranger's idle connection holds nothing.
        assert http_get(address, port, address, request=None).startswith(b"HTTP/1.0 403 Forbidden")
        for answer in (http_get("127.0.0.1", port, "127.0.0.1"), http_get(address, allowing.address[1], address)):
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"\nthor_test 1.0\n" in answer, answer[:200]
    finally:
        closed.stop()
        allowing.stop()
