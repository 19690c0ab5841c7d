"""thor-eventserver as real processes on loopback, members as in-process EventClients or processes."""

import contextlib
import json
import os
import struct
import time

import gevent
import pytest
from gevent import socket

from thor.accounts.protocol import PROVISIONING, accounts_topic
from thor.events import protocol, topics
from thor.events.topics import CONNECTIONS, MEMBERS, PRESENCE
from thor.identity import Identity
from thor.loopback.network import Recorder, event_client, start_eventservers
from thor.loopback.process import Program, free_port, tls_values, wait_for
from thor.transport.tls import TLSContexts, TLSError, connect

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APP = "App.Test"


def settle(*clients):
    """Each client's frames handled by every server it is connected to (ping/pong), in order."""
    for member in clients:
        assert member.sync(timeout=5)


@pytest.fixture
def cluster(tmp_path, pki):
    started = []

    def start(count=3, **settings):
        servers = start_eventservers(str(tmp_path), pki, count, **settings)
        started.extend(servers)
        return servers

    clients = []
    yield start, clients
    for member in clients:
        member.stop(flush_timeout=0)
    for server in started:
        server.close()


def test_publish_subscribe_across_three_servers(pki, cluster):
    start, clients = cluster
    servers = start(3)
    publisher = event_client(pki, "node1", "sip_proxy", servers)
    subscriber = event_client(pki, "node2", "sip_proxy", servers)
    only_second = event_client(pki, "node3", "sip_proxy", servers[1:2])
    clients.extend([publisher, subscriber, only_second])
    everywhere, one_server = Recorder(), Recorder()
    subscriber.subscribe(APP, everywhere)
    only_second.subscribe(APP, one_server)
    settle(subscriber, only_second)

    for index in range(200):
        assert publisher.publish(APP, {"n": index}) == 3
    expected = [{"n": index} for index in range(200)]
    wait_for(lambda: len(everywhere.messages) >= 200 and len(one_server.messages) >= 200, message="200 messages")
    settle(publisher, subscriber, only_second)  # every copy through the other servers has arrived by now
    assert everywhere.bodies() == expected  # once each, in publishing order
    assert one_server.bodies() == expected
    assert {m.publisher for m in everywhere.messages} == {"node1"}
    assert {m.server for m in everywhere.messages} <= {"es1", "es2", "es3"}


def test_kill_one_server_members_stay_connected_nothing_twice(pki, cluster):
    start, clients = cluster
    servers = start(3)
    publisher = event_client(pki, "node1", "sip_proxy", servers)
    subscriber = event_client(pki, "node2", "sip_proxy", servers)
    clients.extend([publisher, subscriber])
    received = Recorder()
    subscriber.subscribe(APP, received)
    settle(subscriber)
    for index in range(50):
        publisher.publish(APP, index)
    wait_for(lambda: len(received.messages) >= 50, message="first 50")

    servers[0].kill()
    wait_for(lambda: publisher.connected_servers == ["es2", "es3"], timeout=5, message="publisher on es2, es3")
    assert subscriber.connected_servers == ["es2", "es3"]
    for index in range(50, 100):
        assert publisher.publish(APP, index) == 2
    wait_for(lambda: len(received.messages) >= 100, message="100 messages")
    settle(publisher, subscriber)
    assert received.bodies() == list(range(100))


def test_departure_announced_within_a_second_of_kill_9(tmp_path, pki, cluster):
    start, clients = cluster
    servers = start(3)
    observer = event_client(pki, "monitor1", "thor_monitor", servers)
    clients.append(observer)
    events = Recorder()
    observer.subscribe(CONNECTIONS, events)
    member = Program(
        str(tmp_path),
        "member",
        [os.path.join(ROOT, "tests", "programs", "member.py"), "--roles", "sip_proxy"],
        {
            "ThorNetwork": {
                "domain": "sipthor.test",
                "event_servers": ", ".join(f"127.0.0.1:{server.port}" for server in servers),
            },
            "TLS": tls_values(pki.issue("member1", "sip_proxy")),
        },
    )
    try:

        def member_events(kind):
            return {
                m.body["server"]
                for m in events.messages
                if m.body["event"] == kind and m.body["member"]["name"] == "member1"
            }

        wait_for(lambda: member_events("connected") == {"es1", "es2", "es3"}, timeout=10, message="member connected")
        killed = time.monotonic()
        member.kill()
        wait_for(lambda: member_events("disconnected") == {"es1", "es2", "es3"}, timeout=3, message="departures")
        elapsed = time.monotonic() - killed
        assert elapsed < 1.0, f"departure announced after {elapsed:.3f}s"
    finally:
        member.close()


def test_snapshot_and_retained_presence_for_late_subscribers(pki, cluster):
    start, clients = cluster
    servers = start(1)
    member = event_client(pki, "node1", "sip_proxy,media_relay", servers, address="127.0.0.21")
    clients.append(member)
    first = {"name": "node1", "address": "127.0.0.21", "roles": ["sip_proxy"], "version": 1}
    member.publish(PRESENCE, first, retain=True)
    member.publish(PRESENCE, dict(first, roles=["sip_proxy", "media_relay"], version=2), retain=True)
    settle(member)

    late = event_client(pki, "manager1", "thor_manager", servers)
    clients.append(late)
    presence, connections = Recorder(), Recorder()
    late.subscribe(PRESENCE, presence)
    late.subscribe(CONNECTIONS, connections)
    settle(late)  # retained presence and the snapshot come before the answer to our ping
    members_presence = [m.body for m in presence.messages if m.publisher != "es1"]
    assert members_presence == [dict(first, roles=["sip_proxy", "media_relay"], version=2)]
    (own,) = [m.body for m in presence.messages if m.publisher == "es1"]  # the server's own entity
    assert own["roles"] == ["thor_eventserver"]
    assert (own["address"], own["attributes"]) == ("127.0.0.1", {"port": servers[0].port})
    snapshot = connections.bodies()[0]
    assert snapshot["event"] == "snapshot"
    assert sorted(m["name"] for m in snapshot["members"]) == ["manager1", "node1"]

    # Retained messages live as long as their publisher's connection.
    member.stop(flush_timeout=0)
    wait_for(
        lambda: any(b["event"] == "disconnected" and b["member"]["name"] == "node1" for b in connections.bodies()),
        message="node1 gone",
    )
    third = event_client(pki, "monitor1", "thor_monitor", servers)
    clients.append(third)
    late_presence = Recorder()
    third.subscribe(PRESENCE, late_presence)
    third.subscribe(CONNECTIONS, Recorder())
    settle(third)  # retained messages come before the answer to our ping
    assert [m.publisher for m in late_presence.messages] == ["es1"]


def test_forbidden_publish_is_refused_and_other_traffic_continues(pki, cluster):
    start, clients = cluster
    servers = start(3)
    member = event_client(pki, "node1", "sip_proxy", servers, address="127.0.0.21")
    watcher = event_client(pki, "monitor1", "thor_monitor", servers)
    clients.extend([member, watcher])
    errors = []
    member.on_error(lambda link, frame: errors.append((link.server_name, frame)))
    seen = Recorder()
    for topic in (MEMBERS, PRESENCE, APP):
        watcher.subscribe(topic, seen)
    settle(watcher)

    member.publish(MEMBERS, {"version": 99})  # only thor_manager may
    own = {"name": "node1", "address": "127.0.0.21", "roles": ["sip_proxy"]}
    member.publish(PRESENCE, dict(own, roles=["thor_manager"]))  # role not granted
    member.publish(PRESENCE, dict(own, name="node2"))  # someone else's name
    member.publish(PRESENCE, dict(own, address="192.0.2.66"))  # an address its certificate does not name
    member.publish(CONNECTIONS, {"event": "connected"})  # only event servers
    member.publish("Thor.Invented", {})  # reserved, no rule
    wait_for(lambda: len(errors) == 18, message="18 forbidden errors (6 per server)")
    assert {frame["code"] for _, frame in errors} == {"forbidden"}
    assert {server for server, _ in errors} == {"es1", "es2", "es3"}
    assert any("does not grant thor_manager" in frame["message"] for _, frame in errors)
    assert any(
        "presence address 192.0.2.66 is not the one certificate of node1 names (127.0.0.21)" in frame["message"]
        for _, frame in errors
    )

    # Still connected everywhere; its allowed traffic flows.
    assert member.connected_servers == ["es1", "es2", "es3"]
    member.publish(PRESENCE, own)
    member.publish(APP, "hello")
    wait_for(lambda: len([m for m in seen.messages if m.publisher == "node1"]) == 2, message="allowed messages")
    settle(member, watcher)
    assert [(m.topic, m.body) for m in seen.messages if m.publisher == "node1"] == [
        (PRESENCE, own),
        (APP, "hello"),
    ]


def test_digest_hashes_are_delivered_only_to_the_members_that_serve_them(pki, cluster):
    """Thor.Provisioning only to sip_proxy certificates, Thor.Accounts.NAME only to NAME."""
    start, clients = cluster
    servers = start(2)
    ngnpro = event_client(pki, "ngnpro1", "provisioning_server", servers)
    node = event_client(pki, "node1", "sip_proxy", servers)
    relay = event_client(pki, "relay1", "media_relay", servers)
    other_node = event_client(pki, "node2", "sip_proxy", servers)
    clients.extend([ngnpro, node, relay, other_node])
    errors = []
    relay.on_error(lambda link, frame: errors.append(frame))
    other_node.on_error(lambda link, frame: errors.append(frame))
    node_got, relay_got, other_got = Recorder(), Recorder(), Recorder()
    node.subscribe(PROVISIONING, node_got)
    node.subscribe(accounts_topic("node1"), node_got)
    relay.subscribe(PROVISIONING, relay_got)
    other_node.subscribe(accounts_topic("node1"), other_got)
    wait_for(lambda: len(errors) == 4, message="4 refused subscriptions (2 per server)")
    assert {(frame["code"], frame["topic"]) for frame in errors} == {
        ("forbidden", PROVISIONING),
        ("forbidden", accounts_topic("node1")),
    }
    settle(node, relay, other_node)
    ngnpro.publish(PROVISIONING, {"changes": []})
    ngnpro.publish(accounts_topic("node1"), {"request": "r1"})
    wait_for(lambda: len(node_got.messages) == 2, message="node1 receives both")
    settle(ngnpro, node, relay, other_node)
    assert relay_got.messages == [] and other_got.messages == []
    assert relay.connected_servers == ["es1", "es2"]  # refused, not disconnected


def test_revoked_and_foreign_certificates_are_refused(pki, other_pki, cluster):
    start, _ = cluster
    (server,) = start(1, **{})
    good = pki.contexts("node1", "sip_proxy")
    revoked = pki.contexts("node2", "sip_proxy")
    pki.ca.revoke("node2")
    # The server watches its CRL file (the default 5 s interval) and refuses node2 after it changed.
    assert says_hello(server, good)
    # Each attempt is one more connection: a try that failed for another reason (a slow moment
    # before the reload) is simply followed by the next, until the server says why it refuses.
    wait_for(
        lambda: not says_hello(server, revoked) and "certificate revoked" in server.log(),
        timeout=15,
        message="node2 refused as revoked",
    )
    # Refused at the handshake once the new CRL is loaded, or just after it by the revocation check
    # (a handshake that raced the reload): either way one line saying why.
    assert "refused 127.0.0.1:" in server.log() or "refused node2 (127.0.0.1:" in server.log()
    foreign = other_pki.contexts("intruder", "thor_manager")
    with pytest.raises(TLSError):
        connect(server.endpoint, foreign)
    tls_socket, identity = connect(server.endpoint, good, expected_role="thor_eventserver")
    assert identity.name == "es1"
    tls_socket.close()


def says_hello(server, contexts):
    """True when the server completes the handshake and answers our hello."""
    try:
        tls_socket, _ = connect(server.endpoint, contexts, timeout=2)
    except TLSError:
        return False
    try:
        tls_socket.settimeout(2)
        tls_socket.sendall(HELLO)
        frames = read_frames(tls_socket)
        return bool(frames) and frames[0]["type"] == "hello"
    except OSError:
        return False
    finally:
        tls_socket.close()


def raw_member(pki, server, name="node1"):
    tls_socket, _ = connect(server.endpoint, pki.contexts(name, "sip_proxy"))
    tls_socket.settimeout(5)
    return tls_socket


def read_frames(tls_socket, count=1):
    decoder_buffer, frames = b"", []
    while len(frames) < count:
        chunk = tls_socket.recv(65536)
        if not chunk:
            break
        decoder_buffer += chunk
        while len(decoder_buffer) >= 4:
            (length,) = struct.unpack("!I", decoder_buffer[:4])
            if len(decoder_buffer) < 4 + length:
                break
            frames.append(json.loads(decoder_buffer[4 : 4 + length]))
            decoder_buffer = decoder_buffer[4 + length :]
    return frames


def closed(sock, limit=65536):
    """Whether the server ends the connection (after a TLS alert, maybe) instead of serving it."""
    received = 0
    try:
        while received <= limit:
            data = sock.recv(4096)
            if not data:
                return True
            received += len(data)
    except TimeoutError:
        return False  # still open after the socket's timeout
    except OSError:
        return True  # reset
    return False


HELLO = protocol.encode({"type": "hello", "version": 1})


def framed(payload):
    return struct.pack("!I", len(payload)) + payload


@pytest.mark.parametrize(
    ("before_hello", "data", "code"),
    [
        (True, struct.pack("!I", 1 << 30), "oversized"),
        (False, struct.pack("!I", 1 << 30), "oversized"),
        (False, struct.pack("!I", 5) + b"{oops", "malformed"),
        (False, struct.pack("!I", 2) + b"[]", "malformed"),
        (False, protocol.encode({"type": "teleport"}), "invalid"),
        (False, protocol.encode({"type": "publish", "topic": "A", "session": "s", "seq": True, "body": 1}), "invalid"),
        (True, protocol.encode({"type": "hello", "version": 2}), "unsupported-version"),
        # A lone surrogate parses as JSON but cannot be sent on as UTF-8.
        (False, framed(b'{"type":"publish","topic":"A","session":"s","seq":1,"body":"\\ud800"}'), "malformed"),
        (False, framed(b'{"type":"publish","topic":"A","session":"\\ud800","seq":1,"body":1}'), "invalid"),
        (True, protocol.encode({"type": "subscribe", "topics": ["A"]}), "unexpected"),
        (
            False,
            protocol.encode({"type": "message", "topic": "A", "publisher": "x", "session": "s", "seq": 1, "body": 1}),
            "unexpected",
        ),
    ],
)
def test_bad_frames_get_an_error_and_only_that_peer_is_disconnected(pki, cluster, before_hello, data, code):
    start, clients = cluster
    (server,) = start(1)
    bystander = event_client(pki, "node2", "sip_proxy", [server])
    clients.append(bystander)
    received = Recorder()
    bystander.subscribe(APP, received)

    tls_socket = raw_member(pki, server)
    if not before_hello:
        tls_socket.sendall(HELLO)
        assert read_frames(tls_socket)[0]["type"] == "hello"
    tls_socket.sendall(data)
    (error,) = [frame for frame in read_frames(tls_socket, 1) if frame["type"] == "error"]
    assert error["code"] == code
    assert closed(tls_socket)
    tls_socket.close()

    bystander.publish(APP, "still here")
    wait_for(lambda: received.bodies() == ["still here"], message="bystander served")
    assert bystander.connected_servers == ["es1"]


def test_garbage_before_the_tls_handshake(pki, cluster):
    start, clients = cluster
    (server,) = start(1)
    for garbage in (b"\x00" * 10, b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096)):
        sock = socket.create_connection(server.endpoint, timeout=5)
        sock.sendall(garbage)
        assert closed(sock)
        sock.close()
    member = event_client(pki, "node1", "sip_proxy", [server])
    clients.append(member)
    assert member.connected_servers == ["es1"]


def test_silent_member_is_dropped_after_idle_timeout_and_announced(pki, cluster):
    """A member whose link is cut sends nothing, not even a reset: the keepalive timeout finds it."""
    start, clients = cluster
    (server,) = start(1, keepalive=0.3, idle_timeout=1)
    observer = event_client(pki, "monitor1", "thor_monitor", [server])
    clients.append(observer)
    events = Recorder()
    observer.subscribe(CONNECTIONS, events)
    tls_socket = raw_member(pki, server)
    started = time.monotonic()  # before the hello: the last thing the member ever sends
    tls_socket.sendall(HELLO)
    hello = read_frames(tls_socket)[0]
    assert hello["keepalive"] == 0.3
    wait_for(
        lambda: any(b["event"] == "disconnected" and b["member"]["name"] == "node1" for b in events.bodies()),
        timeout=4,
        message="silent member dropped",
    )
    assert 1.0 <= time.monotonic() - started < 3  # at the idle timeout, not before it and not much after
    error = [frame for frame in read_frames(tls_socket, 2) if frame["type"] == "error"]
    assert error and error[0]["code"] == "idle"
    tls_socket.close()
    # A member that keeps its keepalives is not dropped: the observer is still there.
    assert observer.connected_servers == ["es1"]


def test_slow_subscriber_is_disconnected_and_the_server_stays_bounded(pki, cluster):
    start, clients = cluster
    (server,) = start(1, send_queue_limit=262144)
    publisher = event_client(pki, "node1", "sip_proxy", [server])
    fast = event_client(pki, "node3", "sip_proxy", [server])
    clients.extend([publisher, fast])
    fast_received = Recorder()
    fast.subscribe(APP, fast_received)
    # The slow member subscribes and then never reads.
    slow = raw_member(pki, server, "node2")
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(HELLO + protocol.encode({"type": "subscribe", "topics": [APP]}) + protocol.encode({"type": "ping"}))
    assert [frame["type"] for frame in read_frames(slow, 2)] == ["hello", "pong"]
    settle(fast)
    blob = "x" * 16000
    for index in range(400):  # 6.4 MB, far beyond the slow member's socket buffers and the 256 KiB queue
        publisher.publish(APP, {"n": index, "blob": blob})
        if index % 10 == 0:  # paced on the member that reads, so only the one that never reads falls behind
            wait_for(lambda index=index: len(fast_received.messages) >= index - 5, timeout=10, message="node3 reading")
    server.wait_log("disconnecting node2 (127.0.0.1:", timeout=10)
    assert "does not keep up" in server.log()
    wait_for(lambda: len(fast_received.messages) == 400, timeout=20, message="fast subscriber got everything")
    assert publisher.connected_servers == ["es1"]
    assert "disconnecting node3" not in server.log()  # the member that reads was never cut off
    slow.close()


def test_subscription_and_retained_limits(pki, cluster):
    start, clients = cluster
    (server,) = start(1, max_subscriptions=3, max_retained=1)
    member = event_client(pki, "node1", "sip_proxy", [server])
    clients.append(member)
    errors = []
    member.on_error(lambda link, frame: errors.append(frame))
    for index in range(5):
        member.subscribe(f"App.T{index}", Recorder())
    member.publish("App.R1", 1, retain=True)
    member.publish("App.R2", 2, retain=True)
    wait_for(lambda: len(errors) == 3, message="3 limit errors")
    assert [frame["code"] for frame in errors] == ["limit"] * 3
    assert member.connected_servers == ["es1"]


def test_event_server_needs_its_role(tmp_path, pki):
    files = pki.issue("node1", "sip_proxy")
    program = Program(
        str(tmp_path),
        "wrong",
        ["-m", "thor.eventserver.main"],
        {"TLS": tls_values(files), "EventServer": {"listen": f"127.0.0.1:{free_port()}"}},
    )
    assert program.exited(20) == 78
    assert "does not grant thor_eventserver" in program.log()


def test_clean_stop(pki, cluster):
    start, clients = cluster
    (server,) = start(1)
    member = event_client(pki, "node1", "sip_proxy", [server])
    clients.append(member)
    assert server.stop() == 0
    wait_for(lambda: member.connected_servers == [], message="member sees the server go")
    assert server.log().rstrip().endswith("thor-eventserver stopped")


def test_contexts_for_test_use_are_fresh(pki):
    assert isinstance(pki.contexts("x", "sip_proxy"), TLSContexts)


def test_a_strangers_idle_sockets_keep_no_member_out(pki, cluster):
    """24 idle TCP connections (no TLS hello) from one address used to take every one of the
    server's 12 slots for its handshake timeout, twice over, while a member waited behind them in
    the backlog beyond its own connect timeout. Now one address holds 4 handshakes at most."""
    start, clients = cluster
    (server,) = start(1, max_connections=12, max_handshakes_per_source=4)
    flood = []
    try:
        for _ in range(24):
            stranger = socket.socket()
            stranger.bind(("127.0.0.99", 0))
            stranger.connect(server.endpoint)
            flood.append(stranger)
        member = event_client(pki, "node1", "sip_proxy", [server], connect=False, connect_timeout=5.0)
        clients.append(member)
        # Before the strangers' handshakes time out (5 s): nobody took its place in the queue.
        wait_for(lambda: member.connected_servers == ["es1"], 3.0, message="node1 connected during the flood")
        server.wait_log("refused a connection from 127.0.0.99: it has 4 TLS handshakes under way already")
    finally:
        for stranger in flood:
            stranger.close()


def publisher_connection(pki, server, name, roles, address):
    """A raw member connection of name (certificate naming address) that said hello; None if refused."""
    tls_socket, _ = connect(server.endpoint, pki.contexts(name, roles, address=address))
    tls_socket.settimeout(5)
    tls_socket.sendall(HELLO)
    frames = read_frames(tls_socket)
    if not frames or frames[0]["type"] != "hello":
        tls_socket.close()
        return None
    return tls_socket


def test_where_configured_a_presence_must_come_from_the_address_it_announces(pki, cluster):
    """[EventServer] presence_from_peer: a certificate naming 127.0.0.21, used from 127.0.0.1 (a
    stolen one, run elsewhere), is refused; one used from the address it announces is taken."""
    start, clients = cluster
    (server,) = start(1, presence_from_peer="yes")
    at_home = event_client(pki, "node1", "sip_proxy", [server], address="127.0.0.1")
    elsewhere = event_client(pki, "node2", "sip_proxy", [server], address="127.0.0.21")
    watcher = event_client(pki, "monitor1", "thor_monitor", [server])
    clients.extend([at_home, elsewhere, watcher])
    errors, seen = [], Recorder()
    elsewhere.on_error(lambda link, frame: errors.append(frame))
    watcher.subscribe(PRESENCE, seen)
    settle(watcher)
    at_home.publish(PRESENCE, {"name": "node1", "address": "127.0.0.1", "roles": ["sip_proxy"]})
    elsewhere.publish(PRESENCE, {"name": "node2", "address": "127.0.0.21", "roles": ["sip_proxy"]})
    wait_for(lambda: errors, message="node2's presence refused")
    assert errors[0]["code"] == "forbidden"
    assert (
        errors[0]["message"] == "presence address 127.0.0.21 is not the address this connection comes from (127.0.0.1)"
    )
    settle(at_home, elsewhere, watcher)
    assert {m.publisher for m in seen.messages} == {"es1", "node1"}


def test_one_certificates_padded_presence_flood_cannot_cut_a_subscribing_manager(pki, cluster):
    """17 connections of one media_relay certificate, each retaining a 250 KB Presence, used to
    push a manager subscribing to Thor.Presence over its 4 MiB send queue: it was cut as a slow
    consumer on every reconnect and the network status froze. Now a Presence carries an entity
    and nothing else, within 32 KiB, and one name holds at most 16 connections to a server."""
    start, clients = cluster
    (server,) = start(1)
    padded = {"name": "relay1", "address": "127.0.0.31", "roles": ["media_relay"], "padding": "x" * 250_000}
    flood, answers, refused = [], [], []

    def keep_alive(connection):
        # What a member does: ping within the keepalive, read what comes.
        try:
            while True:
                connection.sendall(protocol.encode({"type": "ping"}))
                with contextlib.suppress(TimeoutError):
                    connection.recv(65536)
                gevent.sleep(0.3)
        except OSError:
            return

    try:
        for index in range(17):
            connection = publisher_connection(pki, server, "relay1", "media_relay", "127.0.0.31")
            if connection is None:
                refused.append(index)
                continue
            publish = {"type": "publish", "topic": PRESENCE, "session": f"s{index}", "seq": 1, "retain": True}
            connection.sendall(protocol.encode(dict(publish, body=padded)) + protocol.encode({"type": "ping"}))
            frames = read_frames(connection)
            while frames[-1]["type"] != "pong":
                frames += read_frames(connection)
            answers.append(frames)
            connection.settimeout(0.1)
            flood.append((connection, gevent.spawn(keep_alive, connection)))
        manager = event_client(pki, "manager1", "thor_manager", [server])
        clients.append(manager)
        presence = Recorder()
        manager.subscribe(PRESENCE, presence)
        settle(manager)
        assert manager.connected_servers == ["es1"]
        assert "disconnecting manager1" not in server.log()
        assert "relay1" not in {message.body.get("name") for message in presence.messages}
        for frames in answers:
            assert [frame["type"] for frame in frames] == ["error", "pong"], frames
            assert frames[0]["code"] == "forbidden" and "presence" in frames[0]["message"]
        assert len(flood) == 16 and refused == [16]
        assert "relay1 has 16 connections to this server already (at most 16 per name)" in server.log()
    finally:
        for connection, pinger in flood:
            pinger.kill()
            connection.close()


def test_a_catch_up_larger_than_the_send_queue_reaches_the_subscriber_whole_and_in_order(pki, cluster):
    """What a new subscriber is owed (every connection's retained frames) is queued at once; past
    the send queue's bound it used to cut the subscriber as a slow consumer, so a network whose
    retained presence outgrew 4 MiB could never get a manager in. A catch-up now goes out whole,
    and only what is queued beyond it counts against the bound."""
    start, clients = cluster
    (server,) = start(1, send_queue_limit=65536)
    publishers = [event_client(pki, f"node{index}", "sip_proxy", [server]) for index in range(6)]
    clients.extend(publishers)
    for index, publisher in enumerate(publishers):
        for part in range(4):  # 4 retained topics of 20 KB each: 480 KB in all, 7 times the bound
            publisher.publish(f"App.R{part}", {"from": index, "blob": "x" * 20000}, retain=True)
    settle(*publishers)
    subscriber = event_client(pki, "manager1", "thor_manager", [server])
    clients.append(subscriber)
    received = Recorder()
    for part in range(4):
        subscriber.subscribe(f"App.R{part}", received)
    wait_for(lambda: len(received.messages) == 24, timeout=10, message="24 retained frames")
    settle(subscriber)
    assert subscriber.connected_servers == ["es1"]
    assert "disconnecting manager1" not in server.log()
    assert sorted((m.topic, m.body["from"]) for m in received.messages) == sorted(
        (f"App.R{part}", index) for part in range(4) for index in range(6)
    )
    # Asking for the same catch-up again while the first is still queued counts against the
    # bound: a member that subscribes over and over without reading is cut, and nobody else.
    greedy = raw_member(pki, server, "node9")
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    subscribe = protocol.encode({"type": "subscribe", "topics": ["App.R0"]})
    greedy.sendall(HELLO + subscribe + protocol.encode({"type": "subscribe", "topics": ["App.R0", "App.R0"]}))
    server.wait_log("disconnecting node9 (127.0.0.1:", timeout=10)
    assert "does not keep up" in server.log().split("disconnecting node9", 1)[1].splitlines()[0]
    greedy.close()
    settle(subscriber, *publishers)
    assert subscriber.connected_servers == ["es1"]


def entity(**changes):
    fields = {"name": "node1", "address": "127.0.0.21", "roles": ["sip_proxy"], "version": "1", "since": 1.0}
    return {**fields, "status": "ok", "attributes": {"port": 5060}, "withdrawn": {}, **changes}


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (entity(), None),
        # The largest entity the manager accepts (thor.membership.entity) still passes.
        (entity(attributes={f"{n:0256d}": "v" * 256 for n in range(32)}), None),
        (entity(padding="x"), "presence carries fields an entity has not: padding"),
        (entity(attributes={"blob": "x" * 40000}), "presence is larger than 32768 bytes"),
        (entity(address="192.0.2.66"), "presence address 192.0.2.66 is not the one certificate of node1 names"),
    ],
)
def test_a_presence_carries_an_entity_of_bounded_size(body, refusal):
    identity = Identity("node1", {"sip_proxy"}, 1, ("127.0.0.1", 1), addresses=("127.0.0.21",))
    if refusal is None:
        topics.authorize_publish(identity, PRESENCE, body)
    else:
        with pytest.raises(topics.ForbiddenError, match=refusal):
            topics.authorize_publish(identity, PRESENCE, body)
