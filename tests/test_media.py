"""Media relays on loopback: rtpengine (userspace) on media_relay nodes, chosen per call by the
caller's edge (its site first), RTP counted at both phones (docs/sip.md).

3 sip_proxy nodes (node1 and node3 in site a, node2 in site b) with Kamailio, 2 media relays
(relay1 in site a at 127.0.6.1, relay2 in site b at 127.0.6.2), NGNPro, PostgreSQL.
"""

import base64
import contextlib
import signal

import gevent
import pytest
from gevent import socket

from thor import roles
from thor.loopback.media import MediaNetwork, relay_calls
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, account
from thor.loopback.phone import Phone, PhoneError
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import wait_for
from thor.sip.media import MediaProxy
from thor.transport import bencode

PASSWORD = "a-media-password"
SITES = {"node1": "a", "node2": "b", "node3": "a", "node4": "a"}
RELAYS = {"relay1": ("127.0.6.1", "a"), "relay2": ("127.0.6.2", "b"), "relay3": ("127.0.6.3", "a")}
PACKETS = 50


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    postgresql = PostgreSQL()
    built = MediaNetwork(directory, ScratchPKI(directory / "pki"), postgresql, RELAYS, SITES)
    phones = []
    try:
        built.start_relay("relay1")
        built.start_relay("relay2")
        built.start_nodes("node1", "node2", "node3")
        soap = built.client()
        soap.addDomain(DOMAIN)
        for index in range(14):
            soap.addAccount(account(f"m{index}", password=PASSWORD))
        built.status(lambda s: len(s.roles.get(roles.MEDIA_RELAY, ())) == 2, "both relays live")
        built.phones = phones
        built.directory = directory
        yield built
    finally:
        for phone in phones:
            phone.close()
        built.close()
        postgresql.remove()


def phone(network, user, node, address, advertised=None):
    device = Phone(user, DOMAIN, PASSWORD, address, (NODE_ADDRESSES[node], 5060), advertised)
    network.phones.append(device)
    wait_for(lambda: device.register()[0] == 200, 20, interval=0.5, message=f"{user} registered")
    return device


def talk(caller, callee, call):
    """Both send PACKETS RTP packets; what each received, and from where."""
    answered = callee.wait_incoming(len(callee.incoming) or 1)

    gevent.joinall([gevent.spawn(call.send_rtp, PACKETS, 0.005), gevent.spawn(answered.send_rtp, PACKETS, 0.005)])
    wait_for(lambda: call.received >= PACKETS and answered.received >= PACKETS, 5, message="the media through")
    return call, answered


def test_media_of_a_call_flows_through_a_relay_of_the_callers_site_and_ends_with_the_bye(network):
    alice = phone(network, "m0", "node1", "127.0.5.41")  # node1: site a
    bob = phone(network, "m1", "node2", "127.0.5.42")  # node2: site b, behind another node
    call = alice.call("m1")
    assert call.media[0] == RELAYS["relay1"][0]  # the answer's SDP names the relay of alice's site
    _, answered = talk(alice, bob, call)
    assert answered.media[0] == RELAYS["relay1"][0]  # and so does the offer bob received
    assert call.sources == {(RELAYS["relay1"][0], call.media[1])}
    assert {source[0] for source in answered.sources} == {RELAYS["relay1"][0]}
    assert (call.received, answered.received) == (PACKETS, PACKETS)
    assert relay_calls(network.rtpengines["relay1"]) == 1
    assert call.reinvite() == 200  # the same relay for the whole call
    assert call.media[0] == RELAYS["relay1"][0]
    assert call.hangup() == 200
    wait_for(lambda: relay_calls(network.rtpengines["relay1"]) == 0, 5, message="the relay's session deleted")


def test_both_parties_behind_nat_talk_through_the_relay(network):
    """Each phone writes an address it cannot be reached at into its SIP and SDP (its side of a
    NAT; a loopback address nobody listens on, so that nothing leaves the machine) and is reached
    where its packets come from: the relay answers both on its own address and sends each
    side's media where it really comes from."""
    alice = phone(network, "m7", "node1", "127.0.5.48", advertised="127.0.99.20")
    bob = phone(network, "m8", "node2", "127.0.5.49", advertised="127.0.99.21")
    call = alice.call("m8")
    answered = bob.wait_incoming()
    assert call.media[0] == answered.media[0] == RELAYS["relay1"][0]
    # As phones behind NAT do, each sends first: the relay learns where each really is.
    gevent.joinall([gevent.spawn(call.send_rtp, 3, 0.005), gevent.spawn(answered.send_rtp, 3, 0.005)])
    wait_for(lambda: call.received and answered.received, 5, message="the relay learning both ends")
    call.received = answered.received = 0
    call.sources.clear()
    answered.sources.clear()
    talk(alice, bob, call)
    assert {source[0] for source in call.sources} == {source[0] for source in answered.sources} == {RELAYS["relay1"][0]}
    assert call.hangup() == 200


def test_a_call_that_fails_leaves_no_relay_session(network):
    carol = phone(network, "m2", "node1", "127.0.5.43")
    before = relay_calls(network.rtpengines["relay1"])
    with pytest.raises(PhoneError, match="480"):
        carol.call("m11")  # provisioned, never registered: offline
    wait_for(lambda: relay_calls(network.rtpengines["relay1"]) == before, 5, message="the relay's session deleted")


def test_calls_spread_over_the_relays_of_the_callers_site(network):
    """node3 (site a) with two relays in site a: 20 calls spread over both; relay2 (site b) gets none."""
    network.start_relay("relay3")
    network.status(lambda s: "relay3" in s.roles.get(roles.MEDIA_RELAY, ()), "relay3 live")
    callee = phone(network, "m3", "node2", "127.0.5.44")
    caller = phone(network, "m4", "node3", "127.0.5.45")
    used = []
    for _ in range(20):
        call = caller.call("m3")
        used.append(call.media[0])
        assert call.hangup() == 200
    counts = {address: used.count(address) for address in set(used)}
    assert set(counts) == {RELAYS["relay1"][0], RELAYS["relay3"][0]}, counts
    assert min(counts.values()) >= 4, counts  # a spread, not all on one
    assert callee.incoming


def test_a_dead_relay_gets_no_new_calls_and_a_joining_one_takes_new_calls(network):
    callee = phone(network, "m5", "node2", "127.0.5.46")
    caller = phone(network, "m6", "node1", "127.0.5.47")
    # relay3 (site a) dies: node1's calls go to relay1, still in site a.
    network.kill_relay("relay3")
    network.status(lambda s: "relay3" not in s.members, "relay3 gone")
    for _ in range(5):
        call = caller.call("m5")
        assert call.media[0] == RELAYS["relay1"][0]
        call.hangup()
    # relay1 dies too: no relay in site a, any live relay serves (relay2, site b).
    in_progress = caller.call("m5")
    network.kill_relay("relay1")
    network.status(lambda s: "relay1" not in s.members, "relay1 gone")
    call = caller.call("m5")
    assert call.media[0] == RELAYS["relay2"][0]
    _, answered = talk(caller, callee, call)
    assert answered.received == PACKETS
    call.hangup()
    # The call that was on relay1 keeps it, and its media is gone with it (docs/sip.md).
    assert in_progress.media[0] == RELAYS["relay1"][0]
    # relay1 comes back in site a: new calls from node1 use it once node1 has the status that
    # lists it (how soon: make bench-media, docs/benchmarks.md).
    network.start_relay("relay1")
    network.status(lambda s: "relay1" in s.roles.get(roles.MEDIA_RELAY, ()), "relay1 back")

    def a_call_on_relay1():
        call = caller.call("m5")
        call.hangup()
        return call.media[0] == RELAYS["relay1"][0]

    wait_for(a_call_on_relay1, 5, interval=0.01, message="a call through the relay that joined")


def test_a_kamailio_started_before_its_thor_node_gives_every_call_its_relay(network):
    """Supervisor may start Kamailio first: each of its workers' first ping then finds no one
    listening. Every call after thor-node is up still has both SDPs on the relay (each worker
    meets the first offers and answers)."""
    network.start_node("node4", kamailio_first=True)
    network.status(lambda s: "node4" in s.roles.get(roles.SIP_PROXY, ()), "node4 a sip_proxy")
    callee = phone(network, "m9", "node2", "127.0.5.50")
    caller = phone(network, "m10", "node4", "127.0.5.51")

    def a_call():
        try:
            return caller.call("m9")
        except PhoneError:
            # node4 joining moved homes: a binding stored while the nodes' rings differed is
            # where the callee's next REGISTER puts it right (docs/sip.md).
            callee.register()
            return None

    calls = [wait_for(a_call, 10, interval=0.2, message="a call once the ring settled")]
    calls += [caller.call("m9") for _ in range(5)]
    relays = {address for address, _ in RELAYS.values()}
    for call in calls:
        answered = next(incoming for incoming in callee.incoming if incoming.call_id == call.call_id)
        assert call.media[0] == answered.media[0] and call.media[0] in relays, (call.media, answered.media)
        assert call.hangup() == 200, (call.last_status, call.route_set)


def test_relays_publish_their_load_and_ngnpro_shows_it(network):
    relay_names = {"relay1", "relay2"}

    def relays_reported():
        return {entry.name for entry in network.client().getStatistics() if entry.sessions is not None}

    wait_for(lambda: relay_names <= relays_reported(), 10, interval=0.5, message="relay statistics in getStatistics")


def test_a_call_in_progress_keeps_its_relay_after_thor_node_missed_one_command(network):
    """A command thor-node does not answer (it hangs for a moment, restarts, or was not yet
    listening when a Kamailio worker pinged it at start) makes Kamailio's rtpengine module
    disable its one endpoint; the calls in progress must still reach their relay afterwards:
    the BYE deletes the relay's session. (Kamailio otherwise skips a disabled endpoint for the
    answers and deletes of calls it knows, until some new call's offer pings it again.)"""
    phone(network, "m12", "node2", "127.0.5.52")  # the callee
    caller = phone(network, "m13", "node3", "127.0.5.53")  # node3: site a, relay1
    relay = network.rtpengines["relay1"]
    before = relay_calls(relay)
    call = caller.call("m12")
    assert call.media[0] == RELAYS["relay1"][0]
    assert relay_calls(relay) == before + 1
    node3, kamailio = network.nodes["node3"], network.kamailios["node3"]
    node3.signal(signal.SIGSTOP)
    try:
        # The re-INVITE's offer waits for thor-node in vain (Kamailio's 2 s timeout): endpoint disabled.
        reinvite = gevent.spawn(call.reinvite, 10)
        wait_for(lambda: 'timeout waiting reply for command "offer"' in kamailio.log(), 5, message="offer timed out")
    finally:
        node3.signal(signal.SIGCONT)
    assert reinvite.get(timeout=15) == 200
    assert call.hangup() == 200
    wait_for(lambda: relay_calls(relay) == before, 5, message="the relay's session deleted")
    network.status(lambda s: "node3" in s.roles.get(roles.SIP_PROXY, ()), "node3 a sip_proxy again")


class NoRelays:
    def candidates(self):
        return []

    def choose(self, call_id):
        return None


@contextlib.contextmanager
def media_proxy(chooser, peers=None):
    """A MediaProxy of chooser's relays on loopback, and ask(cookie, message) -> its answer."""
    proxy = MediaProxy(("127.0.0.1", 0), chooser, peers=peers, name="node1")
    proxy.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.connect(proxy.address)

            def ask(cookie, message):
                sock.send(cookie + b" " + bencode.encode(message))
                head, _, body = sock.recv(65535).partition(b" ")
                assert head == cookie
                return bencode.decode(body)

            yield proxy, ask
    finally:
        proxy.stop()


def test_with_no_live_relay_thor_node_answers_kamailio_with_the_sdp_unchanged():
    """Kamailio's rtpengine module gets a pong and its SDP back: the call goes on with direct media,
    and Kamailio logs no error for each call of a network without relays."""
    with media_proxy(NoRelays()) as (proxy, ask):
        assert ask(b"1", {"command": "ping"}) == {"result": "pong"}
        sdp = b"v=0\r\nc=IN IP4 127.0.5.1\r\nm=audio 4000 RTP/AVP 8\r\n"
        offer = {"command": "offer", "call-id": "c1", "from-tag": "a", "sdp": sdp}
        assert ask(b"2", offer) == {"result": "ok", "sdp": sdp.decode()}
        assert ask(b"3", {**offer, "command": "answer", "to-tag": "b"}) == {"result": "ok", "sdp": sdp.decode()}
        assert ask(b"4", {"command": "delete", "call-id": "c1", "from-tag": "a"}) == {"result": "ok"}
        assert "c1" not in proxy.calls


class OneRelay(NoRelays):
    def choose(self, call_id):
        return ("relay1", "127.0.6.1", 7000)


class RecordingPeers:
    """Answers every ng datagram as a relay's rtpengine would, and remembers where each went."""

    def __init__(self):
        self.sent = []

    def request(self, endpoint, message, role):
        datagram = base64.b64decode(message["datagram"])
        self.sent.append((endpoint, bencode.decode(datagram.partition(b" ")[2])["command"]))
        reply = datagram.partition(b" ")[0] + b" " + bencode.encode({"result": "ok"})
        return {"result": "ok", "datagram": base64.b64encode(reply).decode()}


def test_a_delete_for_a_call_thor_node_does_not_know_goes_to_the_relay_its_offer_got():
    """thor-node restarted during a call: the BYE's delete still reaches the call's relay (the
    choice depends on the call and the live relays only), so its session does not linger."""
    peers = RecordingPeers()
    with media_proxy(OneRelay(), peers) as (proxy, ask):
        assert ask(b"7", {"command": "delete", "call-id": "c9", "from-tag": "a"}) == {"result": "ok"}
        assert peers.sent == [(("127.0.6.1", 7000), "delete")]
        assert "c9" not in proxy.calls
