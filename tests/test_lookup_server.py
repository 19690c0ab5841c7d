"""The lookup interface in-process: its query syntax, pipelining, and clients that misbehave."""

import contextlib
import itertools
import os
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest
from gevent import socket
from hypothesis import given, settings
from hypothesis import strategies as st

from thor.lookup.client import LookupClient, LookupClientError
from thor.lookup.ring import HashRing
from thor.lookup.server import LookupServer, answer
from thor.lookup.table import LookupTable, RingFollower
from thor.loopback.process import wait_for
from thor.loopback.statuses import sip_proxy_status_body
from thor.membership.status import StatusCache

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAMS = os.path.join(ROOT, "tests", "programs")

NODES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
TABLE = LookupTable(42, "manager1", {"sip_proxy": NODES, "xcap_server": ["10.0.0.9"]})


class Interface:
    def __init__(self, table=TABLE, table_source=None, **limits):
        self.table = table
        self.server = LookupServer(("127.0.0.1", 0), table_source or (lambda: self.table), **limits)
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
        ("members Not-A-Role", "bad-role"),
        ("is_online 10.0.0.1 as Not-A-Role", "bad-role"),
        ("version please", "syntax"),
        ("delete sip_proxy", "unknown-command"),
    ],
)
def test_errors_are_one_line_with_a_code(interface, query, code):
    with interface.client() as client:
        (answer,) = client.query(query)
        assert answer.startswith(f"error {code} "), answer
        assert client.query("version") == ["42"]  # the connection stays usable


ERROR_CODES = {"syntax", "no-status", "bad-key", "bad-role", "no-members", "bad-address", "unknown-command"}
WORDS = ["lookup", "LOOKUP", "is_online", "members", "roles", "version", "for", "as", "sip_proxy", "xcap_server"]
lines = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.one_of(
            st.sampled_from([*WORDS, "10.0.0.1", "alice@example.com", "sip:bob@example.com"]), st.text(max_size=40)
        ),
        max_size=6,
    ).map(" ".join),
)


@settings(max_examples=1000, deadline=None)
@given(lines)
def test_any_line_gets_one_answer_line_a_right_value_or_a_coded_error(line):
    """Fuzz: whatever a client sends, one line back, never an exception: an error with its code,
    or the value the table holds."""
    reply = answer(TABLE, line)
    assert isinstance(reply, str) and not set(reply) & {"\r", "\n"} and len(reply) < 512
    words = line.split()
    if reply.startswith("error "):
        assert reply.split()[1] in ERROR_CODES, reply
    elif words[0].lower() == "lookup":
        assert reply == TABLE.lookup(words[1], words[3])
    elif words[0].lower() == "is_online":
        assert reply == ("Yes" if TABLE.is_online(words[1], words[3]) else "No")
    elif words[0].lower() == "members":
        assert reply.split() == list(TABLE.members(words[1]))
    else:
        assert (words[0].lower(), reply) in {("version", "42"), ("roles", " ".join(TABLE.roles))}, (line, reply)


def test_no_status_yet_is_an_error_not_a_guess():
    served = Interface(LookupTable.empty())
    try:
        with served.client() as client:
            for query in (
                "lookup sip_proxy for alice@example.com",
                "is_online 10.0.0.1 as sip_proxy",
                "members sip_proxy",
                "roles",
            ):
                assert client.query(query)[0].startswith("error no-status "), query
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


def connect_from(served, source):
    return socket.create_connection(served.endpoint, timeout=5, source_address=(source, 0))


def test_one_address_cannot_take_every_connection():
    served = Interface(max_connections=50, max_connections_per_address=5, evict_after=60)
    try:
        held = [connect_from(served, "127.0.0.2") for _ in range(5)]
        wait_for(lambda: served.server.connections == 5, message="5 connections from 127.0.0.2")
        refused = read_until_closed(connect_from(served, "127.0.0.2"))
        assert refused.startswith(b"error busy more than 5 connections from 127.0.0.2"), refused
        other = connect_from(served, "127.0.0.3")
        other.sendall(b"version\r\n")
        assert other.recv(100) == b"42\r\n"
        for connection in [*held, other]:
            connection.close()
    finally:
        served.server.stop()


def closed_by_server(connection):
    """Whether the server closed connection (its end of input is there to read), without waiting."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False


def test_when_all_slots_are_taken_an_idle_connection_makes_room():
    served = Interface(max_connections=20, evict_after=0.3)
    try:
        idle = [served.raw() for _ in range(20)]
        wait_for(lambda: served.server.connections == 20, message="20 idle connections held")
        gevent.sleep(0.4)  # the precondition, not a wait for a result: all 20 idle for evict_after (0.3 s)
        with served.client() as client:  # the newcomer takes the slot of one that asked nothing
            assert client.query("version") == ["42"]
            assert served.server.evicted == 1
            assert served.server.connections == 20
            wait_for(lambda: sum(map(closed_by_server, idle)) == 1, message="exactly one idle connection closed")
    finally:
        served.server.stop()


def test_the_idle_connection_makes_room_not_the_ones_that_ask_and_none_when_all_ask():
    served = Interface(max_connections=5, evict_after=1.0)
    try:
        idle = served.raw()
        wait_for(lambda: served.server.connections == 1, message="the idle connection held")
        gevent.sleep(1.2)  # the precondition: idle for longer than evict_after
        asking = [served.client() for _ in range(4)]
        for client in asking:
            assert client.query("version") == ["42"]
        with served.client() as newcomer:  # takes the idle one's slot, no asking one's
            assert newcomer.query("version") == ["42"]
            wait_for(lambda: closed_by_server(idle), message="the idle connection closed")
            for client in asking:
                assert client.query("version") == ["42"]
            # Now all 5 asked within evict_after: one more is told busy, and nobody loses a slot.
            assert newcomer.query("version") == ["42"]
            assert read_until_closed(served.raw()).startswith(b"error busy more than 5 connections")
            assert newcomer.query("version") == ["42"]
        for client in asking:
            assert client.query("version") == ["42"]
            client.close()
        assert served.server.evicted == 1
    finally:
        served.server.stop()


def test_idle_connections_are_dropped_even_when_they_trickle_blank_lines_or_bytes():
    served = Interface(idle_timeout=0.5)
    try:
        silent, blank, trickle = served.raw(), served.raw(), served.raw()
        asking = served.client()
        assert asking.query("version") == ["42"]
        wait_for(lambda: served.server.connections == 4, message="4 connections")
        started = time.monotonic()

        def keep_sending(connection, data):
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 5:
                    connection.sendall(data)
                    gevent.sleep(0.05)

        senders = [gevent.spawn(keep_sending, blank, b"\r\n"), gevent.spawn(keep_sending, trickle, b"v")]

        def only_the_asking_one_is_left():
            assert asking.query("version") == ["42"]  # a query every poll keeps this one
            return served.server.connections == 1

        wait_for(only_the_asking_one_is_left, timeout=4.5, message="the three idle connections dropped")
        assert time.monotonic() - started < 4  # the senders go on for 5 s: they did not keep their slots
        for connection in (silent, blank, trickle):
            assert read_until_closed(connection) == b""
        gevent.joinall(senders, timeout=6)
        asking.close()
    finally:
        served.server.stop()


def test_a_client_that_floods_and_reads_fast_delays_no_one():
    """A client that keeps the server's input full must not keep the event loop to itself."""
    served = Interface()
    count = 5_000_000  # several seconds of work for the server: bounded in count, and in time below
    flood = subprocess.Popen(
        [sys.executable, os.path.join(PROGRAMS, "lookup_flood.py"), *map(str, served.endpoint), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: served.server.answered > 100_000, timeout=10, message="the flood under way")
        round_trips, ticks = [], []

        def tick():  # a timer greenlet: how late the event loop wakes it tells how long others wait
            for _ in range(50):
                if served.server.answered >= count:
                    return
                ticks.append(time.monotonic())
                gevent.sleep(0.01)

        ticker = gevent.spawn(tick)
        with served.client() as client:
            for index in range(50):
                started = time.monotonic()
                key = f"other{index}@example.com"
                assert client.query(f"lookup sip_proxy for {key}") == [TABLE.lookup("sip_proxy", key)]
                if served.server.answered < count:  # measured while the flood went on
                    round_trips.append(time.monotonic() - started)
        ticker.join(timeout=10)
        assert len(round_trips) >= 20 and len(ticks) >= 20, (len(round_trips), len(ticks), "the flood ended first")
        round_trips.sort()
        gaps = sorted(later - earlier for earlier, later in itertools.pairwise(ticks))
        # Without yielding, the loop stays with the flood until it ends; with it, for one batch.
        # With a bare sleep(0) the median round trip was 170 ms; here a few ms. One late sample on a
        # loaded machine is not what is tested, so the tail is bounded at the 90th percentile and the
        # worst at 1 s, still far below the seconds the flood would otherwise hold the loop.
        assert round_trips[len(round_trips) // 2] < 0.05 and round_trips[len(round_trips) * 9 // 10] < 0.1, round_trips
        assert round_trips[-1] < 1.0, round_trips
        assert gaps[len(gaps) * 9 // 10] < 0.05 and gaps[-1] < 1.0, gaps[-5:]
        # (This process is not monkey-patched: wait cooperatively, the server runs in it.)
        wait_for(lambda: flood.poll() is not None, timeout=120, interval=0.1, message="the flood answered")
        assert flood.communicate()[0].strip() == f"answered {count}"
    finally:
        flood.kill()
        flood.wait()
        served.server.stop()


def test_connections_get_their_turns_when_the_process_is_never_idle():
    """The yield after each batch is bounded: a loop that always has work (1,000 timers firing
    every millisecond here) still lets every connection go on."""
    served = Interface()
    done = gevent.event.Event()

    def busy():
        while not done.is_set():
            gevent.sleep(0.001)

    others = [gevent.spawn(busy) for _ in range(1000)]
    try:
        with served.client(timeout=30) as client:
            started = time.monotonic()
            for _ in range(20):  # each batch of 5,000 queries is several reads, each followed by a yield
                keys = [f"user{index}@example.com" for index in range(5000)]
                assert client.query(*(f"lookup sip_proxy for {key}" for key in keys)) == [
                    TABLE.lookup("sip_proxy", key) for key in keys
                ]
            assert time.monotonic() - started < 20
    finally:
        done.set()
        gevent.joinall(others, timeout=10)
        served.server.stop()


def test_a_client_that_never_reads_delays_no_one_and_is_dropped():
    served = Interface(idle_timeout=1.0)
    try:
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting, so it holds
        hog.connect(served.endpoint)
        flood = b"members sip_proxy\r\n" * 500000  # 9.5 MB of queries, 14 MB of answers, never read

        def send_all():
            with contextlib.suppress(OSError):  # the server drops us
                hog.sendall(flood)

        sender = gevent.spawn(send_all)
        samples = []

        def the_server_is_stuck_on_the_hog():
            # Its answers fill the hog's buffers: the count stops growing long before the flood's end.
            samples.append(served.server.answered)
            return len(samples) > 5 and 0 < samples[-1] == samples[-6] < 500000

        wait_for(the_server_is_stuck_on_the_hog, timeout=5, message="the server blocked writing to the hog")
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


def test_lookups_stay_correct_and_answered_while_the_status_changes_under_load():
    cache = StatusCache()
    follower = RingFollower(cache)
    follower.start()
    served = Interface(table_source=lambda: follower.table)
    # Networks of 40 and 80 nodes in turn: each change rebuilds a ring of 160,000 to 320,000 points.
    sets = {
        version: [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(40 if version % 2 else 80)] for version in range(1, 9)
    }
    keys = [f"user{index}@example.com" for index in range(300)]
    batches, gaps = [], []
    done = gevent.event.Event()

    def ask():
        last = time.monotonic()
        with served.client(timeout=10) as client:
            while not done.is_set():
                # A version before and after: tables only get newer, so when they agree every
                # answer between them came from that one table.
                answers = client.query("version", *(f"lookup sip_proxy for {key}" for key in keys), "version")
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                batches.append((int(answers[0]), int(answers[-1]), answers[1:-1]))

    cache.update(sip_proxy_status_body(1, sets[1]))
    assert follower.wait(1, timeout=10)
    clients = [gevent.spawn(ask) for _ in range(4)]
    try:
        for version in range(2, 6):  # back to back: the follower coalesces what comes during a build
            cache.update(sip_proxy_status_body(version, sets[version]))
            gevent.sleep(0.15)
        for version in range(6, 9):  # then one at a time, each answered before the next comes
            cache.update(sip_proxy_status_body(version, sets[version]))
            assert follower.wait(version, timeout=20), f"the follower did not reach status {version}"
            wait_for(
                lambda version=version: any(first == last == version for first, last, _ in batches),
                timeout=10,
                message=f"answers of {version}",
            )
        # A slow machine answers fewer batches in the same time; wait for the load, not for a time.
        wait_for(lambda: len(batches) > 100, timeout=30, message="100 batches of answers")
    finally:
        done.set()
        gevent.joinall(clients, timeout=10)
        follower.stop()
        served.server.stop()
    assert all(client.successful() for client in clients), [client.exception for client in clients]
    reference = {version: HashRing(addresses) for version, addresses in sets.items()}
    for first, last, answers in batches:
        assert 1 <= first <= last <= 8
        for key, owner in zip(keys, answers, strict=True):
            assert any(owner == reference[version].owner(key) for version in range(first, last + 1)), (key, owner)
    settled = {first for first, last, _ in batches if first == last}
    assert {1, 6, 7, 8} <= settled, settled  # answers from several of the tables, not just the last
    assert max(gaps) < 2.0, max(gaps)  # answered throughout, builds included


def test_the_client_says_when_no_one_listens():
    served = Interface()
    served.server.stop()
    client = LookupClient(*served.endpoint, timeout=1, create_connection=socket.create_connection)
    with pytest.raises(LookupClientError, match="cannot reach the lookup interface at 127.0.0.1:"):
        client.query("version")
