"""The lookup interface in-process: its query syntax, pipelining, and clients that misbehave."""

import contextlib
import time

import gevent
import pytest
from conftest import wait_for
from gevent import socket

from thor.lookup.client import LookupClient, LookupClientError
from thor.lookup.server import LookupServer
from thor.lookup.table import LookupTable

NODES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
TABLE = LookupTable(42, "manager1", {"sip_proxy": NODES, "xcap_server": ["10.0.0.9"]})


class Interface:
    def __init__(self, table=TABLE, **limits):
        self.table = table
        self.server = LookupServer(("127.0.0.1", 0), lambda: self.table, **limits)
        self.server.start()
        self.endpoint = self.server.address[:2]

    def client(self, timeout=5):
        return LookupClient(*self.endpoint, timeout=timeout, create_connection=socket.create_connection)

    def raw(self):
        return socket.create_connection(self.endpoint, timeout=5)


@pytest.fixture
def interface():
    served = Interface()
    yield served
    served.server.stop()


def test_the_queries_of_the_original_and_what_operators_need(interface):
    with interface.client() as client:
        owner = client.lookup("sip_proxy", "alice@example.com")
        assert owner == TABLE.lookup("sip_proxy", "alice@example.com") and owner in NODES
        assert client.query(
            "is_online 10.0.0.2 as sip_proxy",
            "is_online 10.0.0.9 as sip_proxy",
            "members sip_proxy",
            "roles",
            "version",
        ) == ["Yes", "No", "10.0.0.1 10.0.0.2 10.0.0.3", "sip_proxy xcap_server", "42"]
        assert client.query("LOOKUP sip_proxy FOR sip:Alice@Example.com") == [owner]
        assert client.query("members media_relay") == [""]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("lookup sip_proxy alice@example.com", "syntax"),
        ("lookup sip_proxy for alice", "bad-key"),
        ("lookup media_relay for alice@example.com", "no-members"),
        ("lookup Not-A-Role for alice@example.com", "bad-role"),
        ("is_online example.com as sip_proxy", "bad-address"),
        ("members", "syntax"),
        ("version please", "syntax"),
        ("delete sip_proxy", "unknown-command"),
    ],
)
def test_errors_are_one_line_with_a_code(interface, query, code):
    with interface.client() as client:
        (answer,) = client.query(query)
        assert answer.startswith(f"error {code} "), answer
        assert client.query("version") == ["42"]  # the connection stays usable


def test_no_status_yet_is_an_error_not_a_guess():
    served = Interface(LookupTable.empty())
    try:
        with served.client() as client:
            assert client.query("lookup sip_proxy for alice@example.com", "version")[0].startswith("error no-status ")
            assert client.query("version") == ["0"]
    finally:
        served.server.stop()


def test_pipelined_queries_are_answered_in_order(interface):
    keys = [f"user{index}@example.com" for index in range(10000)]
    with interface.client() as client:
        answers = client.query(*(f"lookup sip_proxy for {key}" for key in keys))
    assert answers == [TABLE.lookup("sip_proxy", key) for key in keys]


def test_blank_lines_lf_endings_and_quit(interface):
    connection = interface.raw()
    connection.sendall(b"\r\n\nversion\nroles\r\nquit\r\nversion\r\n")
    received = read_until_closed(connection)
    assert received == b"42\r\nsip_proxy xcap_server\r\n"


def read_until_closed(connection, limit=1 << 20):
    received = b""
    with gevent.Timeout(5):
        while len(received) < limit:
            data = connection.recv(65536)
            if not data:
                break
            received += data
    connection.close()
    return received


def test_garbage_gets_errors_and_others_are_served(interface):
    garbage = interface.raw()
    garbage.sendall(bytes(range(256)) * 4 + b"\n\xff\xfe\n\x00\x01\x02\r\n")
    with interface.client() as client:
        assert client.query("version") == ["42"]
    garbage.sendall(b"version\r\n")
    received = b""
    with gevent.Timeout(5):
        while not received.endswith(b"42\r\n"):
            received += garbage.recv(65536)
    lines = received.split(b"\r\n")[:-1]
    assert lines[-1] == b"42"
    assert all(line.startswith(b"error ") for line in lines[:-1])
    garbage.close()


def test_a_very_long_line_is_refused_and_closed(interface):
    connection = interface.raw()
    connection.sendall(b"version\r\nlookup sip_proxy for " + b"a" * 100000)
    received = read_until_closed(connection)
    assert received.startswith(b"42\r\nerror line-too-long ")
    connection = interface.raw()
    connection.sendall(b"x" * 2000 + b"\r\nversion\r\n")  # also when the line is complete
    assert read_until_closed(connection).startswith(b"error line-too-long ")
    with interface.client() as client:
        assert client.query("version") == ["42"]


def test_connections_beyond_the_limit_are_told_busy_and_idle_ones_are_dropped():
    served = Interface(max_connections=20, idle_timeout=0.5)
    try:
        idle = [served.raw() for _ in range(20)]
        wait_for(lambda: served.server.connections == 20, message="20 idle connections held")
        extra = served.raw()
        assert read_until_closed(extra).startswith(b"error busy ")
        # The idle ones go after idle_timeout, and the interface serves again.
        wait_for(lambda: served.server.connections == 0, timeout=5, message="idle connections dropped")
        for connection in idle:
            assert read_until_closed(connection) == b""
        with served.client() as client:
            assert client.query("version") == ["42"]
    finally:
        served.server.stop()


def test_a_client_that_never_reads_delays_no_one_and_is_dropped():
    served = Interface(idle_timeout=1.0)
    try:
        hog = served.raw()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood = b"members sip_proxy\r\n" * 200000  # 3.8 MB of queries, 5.4 MB of answers, never read

        def send_forever():
            with contextlib.suppress(OSError):  # the server drops us
                hog.sendall(flood)

        sender = gevent.spawn(send_forever)
        wait_for(lambda: served.server.connections == 1, message="the hog connected")
        gevent.sleep(0.2)
        with served.client() as client:
            started = time.monotonic()
            answers = client.query(*(f"lookup sip_proxy for user{i}@example.com" for i in range(1000)))
            assert time.monotonic() - started < 0.5
        assert all(answer in NODES for answer in answers)
        wait_for(lambda: served.server.connections == 0, timeout=5, message="the hog dropped after idle_timeout")
        sender.join(timeout=5)
        hog.close()
    finally:
        served.server.stop()


def test_the_client_says_when_no_one_listens():
    served = Interface()
    served.server.stop()
    client = LookupClient(*served.endpoint, timeout=1, create_connection=socket.create_connection)
    with pytest.raises(LookupClientError, match="cannot reach the lookup interface at 127.0.0.1:"):
        client.query("version")
