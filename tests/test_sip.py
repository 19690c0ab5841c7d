"""SIP over the overlay on loopback: real Kamailio with the shipped configuration beside each
thor-node, NGNPro provisioning the subscribers, sipp and a small SIP client as the devices.

One network serves the module's tests: 3 sip_proxy nodes (127.0.4.11-13), PostgreSQL,
NGNPro, 2 event servers, a manager. Devices sit on 127.0.5.x. node1's and node2's Kamailio
compute each key's home from the ring they hold; node3's asks its thor-node, as every
Kamailio does when the ring is too big to build in each process (THOR_LOCAL_RING_NODES).
"""

import pytest

from thor.loopback.kamailio import invite, register
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, SipNetwork, account, ha1, owner, password, subscribers
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import free_port, wait_for
from thor.loopback.sipp import Sipp, thor_vias_of_invites
from thor.sip.credentials import HA1_TABLE
from thor.sip.location import KamailioRPC, RPCError
from thor.sip.service import SipService, UnavailableError

NODES = ("node1", "node2", "node3")
ADDRESSES = [NODE_ADDRESSES[name] for name in NODES]
USERS = [f"user{index}" for index in range(12)]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sip")
    postgresql = PostgreSQL()
    built = SipNetwork(directory, ScratchPKI(directory / "pki"), postgresql)
    try:
        built.start_node("node3", kamailio_environment={"THOR_LOCAL_RING_NODES": "0"})
        built.start_nodes(*NODES[:2])
        soap = built.client()
        soap.addDomain(DOMAIN)
        for user in [*USERS, "carol", "dave"]:
            soap.addAccount(account(user, password=password(user)))
        soap.addAlias(
            {"id": {"username": "sales", "domain": DOMAIN}, "target": {"username": "user0", "domain": DOMAIN}}
        )
        built.soap = soap
        built.directory = directory
        # Every node holds its share, and every node knows the domain.
        wait_for(
            lambda: all(register(5060, "carol", DOMAIN, password("carol"), host=a)[0] == 200 for a in ADDRESSES), 20
        )
        yield built
    finally:
        built.close()
        postgresql.remove()


def test_register_through_any_node_reaches_the_home_node_and_wrong_credentials_are_refused(network):
    for address in ADDRESSES:
        assert register(5060, "dave", DOMAIN, password("dave"), host=address) == (200, "OK")
        assert register(5060, "dave", DOMAIN, "a-wrong-password", host=address)[0] == 401
        assert register(5060, "nobody", DOMAIN, "whatever", host=address) == (403, "Unknown Subscriber")
        assert register(5060, "dave", "not-ours.example", "x", host=address) == (403, "Domain Not Served")
        # A subscriber's credentials do not register someone else's address.
        assert register(5060, "dave", DOMAIN, password("dave"), host=address, to=f"carol@{DOMAIN}") == (
            403,
            "To Must Be The Authenticated Subscriber",
        )


def test_calls_between_devices_on_different_nodes_cross_at_most_two_thor_nodes(network):
    # Callees behind NAT: their Contact names a private address, not where they are.
    callees = network.devices("callees", subscribers(USERS[6:12]), via="node2", contact_host="192.168.1.50")
    try:
        rows = [[USERS[i], DOMAIN, password(USERS[i]), USERS[6 + i]] for i in range(6)]
        for edge in ("node1", "node3", "node2"):
            caller = Sipp(
                network.directory,
                f"calls-via-{edge}",
                "call",
                ("127.0.5.20", free_port("127.0.5.20")),
                rows,
                (NODE_ADDRESSES[edge], 5060),
            )
            result = caller.run(len(rows), rate=20, timeout=30)
            assert (result.successful, result.failed) == (len(rows), 0), result.errors
        hops = thor_vias_of_invites(callees.messages())
        assert len(hops) == 18
        assert max(hops) == 2 and min(hops) == 1  # via node1 or node3: 2 nodes; via node2 itself: 1
    finally:
        callees.stop()


def test_a_call_over_tcp(network):
    callee = network.devices("tcp-callee", subscribers(["user11"]), via="node3", transport="t1")
    try:
        caller = Sipp(
            network.directory,
            "tcp-caller",
            "call",
            ("127.0.5.21", free_port("127.0.5.21")),
            [["user10", DOMAIN, password("user10"), "user11"]],
            (NODE_ADDRESSES["node1"], 5060),
            "t1",
        )
        result = caller.run(1, timeout=20)
        assert (result.successful, result.failed) == (1, 0), result.errors
        assert thor_vias_of_invites(callee.messages()) == [2]
    finally:
        callee.stop()


def test_failed_calls_get_clear_answers(network):
    node = NODE_ADDRESSES["node1"]
    # carol is provisioned and registered (the fixture), dave too; bob does not exist.
    assert invite(5060, "carol", DOMAIN, password("carol"), "bob", host=node)[:2] == (404, "User Not Found")
    assert invite(5060, "carol", DOMAIN, "a-wrong-password", "dave", host=node)[:2] == (403, "Wrong Password")
    assert invite(5060, "nobody", DOMAIN, "x", "dave", host=node)[:2] == (403, "Unknown Subscriber")
    assert invite(5060, "carol", "elsewhere.example", "x", "dave", host=node)[:2] == (403, "Domain Not Served")
    network.soap.addAccount(account("erin", password=password("erin")))
    wait_for(lambda: invite(5060, "carol", DOMAIN, password("carol"), "erin", host=node)[0] == 480, 10)
    assert invite(5060, "carol", DOMAIN, password("carol"), "erin", host=node)[:2] == (480, "Temporarily Unavailable")


def test_an_alias_reaches_its_target(network):
    target = network.devices("alias-target", subscribers(["user0"]), via="node3")
    try:
        caller = Sipp(
            network.directory,
            "alias-caller",
            "call",
            ("127.0.5.22", free_port("127.0.5.22")),
            [["user1", DOMAIN, password("user1"), "sales"]],
            (NODE_ADDRESSES["node2"], 5060),
        )
        result = caller.run(1, timeout=20)
        assert (result.successful, result.failed) == (1, 0), result.errors
        assert len(thor_vias_of_invites(target.messages())) == 1
    finally:
        target.stop()


def test_password_changes_disabling_and_deleting_reach_every_proxy(network):
    """The whole path: SOAP -> PostgreSQL -> the home node's cache -> any node's REGISTER."""
    soap = network.soap
    soap.addAccount(account("frank", password="franks-password"))
    for address in ADDRESSES:
        wait_for(lambda a=address: register(5060, "frank", DOMAIN, "franks-password", host=a) == (200, "OK"), 10)
        # A user part that would be a path in thor-node's API reads no one's HA1.
        assert register(5060, "x/../frank", DOMAIN, "franks-password", host=address) == (403, "Unknown Subscriber")
    soap.changePassword({"username": "frank", "domain": DOMAIN}, "a-new-password")
    wait_for(lambda: register(5060, "frank", DOMAIN, "a-new-password", host=ADDRESSES[0])[0] == 200, 10)
    assert all(register(5060, "frank", DOMAIN, "franks-password", host=a)[0] == 401 for a in ADDRESSES)
    soap.updateAccount({"id": {"username": "frank", "domain": DOMAIN}, "enabled": False})
    disabled = (403, "Account Disabled")
    wait_for(lambda: register(5060, "frank", DOMAIN, "a-new-password", host=ADDRESSES[1]) == disabled, 10)
    soap.deleteAccount({"username": "frank", "domain": DOMAIN})
    unknown = (403, "Unknown Subscriber")
    wait_for(lambda: register(5060, "frank", DOMAIN, "a-new-password", host=ADDRESSES[2]) == unknown, 10)


def test_a_node_that_has_not_loaded_its_accounts_says_it_cannot_answer_rather_than_no():
    """Kamailio remembers a domain's "no" for a second: before its first load, thor-node (which has
    heard of no domain yet) answers 503, which Kamailio does not remember."""

    class Accounts:
        loads = 0

        def serves(self, domain):
            return domain == "example.com" and self.loads > 0

    accounts = Accounts()
    service = SipService("127.0.0.11", None, None, accounts, None, None)
    with pytest.raises(UnavailableError, match="not loaded yet"):
        service.serves("example.com")
    accounts.loads = 1
    assert service.serves("example.com") is True
    assert service.serves("other.example") is False


def test_the_home_nodes_proxy_holds_the_ha1_of_its_enabled_accounts_and_again_after_a_restart(network):
    """thor-node keeps the HA1 of the accounts it is home for in its Kamailio's htable (a REGISTER
    is checked without asking it): an enabled account is there with its current HA1, a disabled
    one is not, and a restarted Kamailio gets them all again (asked of thor-node meanwhile)."""
    key = f"grace@{DOMAIN}"
    network.soap.addAccount(account("grace", password="graces-password"))
    home = next(name for name in NODES if NODE_ADDRESSES[name] == owner(network, key))
    rpc = KamailioRPC(network.kamailios[home].rpc)

    def held():
        try:
            return rpc.call("htable.get", HA1_TABLE, key)["item"]["value"]
        except RPCError as problem:
            assert "doesn't exist" in str(problem), problem
            return None

    wait_for(lambda: held() == ha1("grace", "graces-password"), 10)
    network.soap.changePassword({"username": "grace", "domain": DOMAIN}, "a-new-password")
    wait_for(lambda: held() == ha1("grace", "a-new-password"), 10)
    network.soap.updateAccount({"id": {"username": "grace", "domain": DOMAIN}, "enabled": False})
    wait_for(lambda: held() is None, 10)
    assert register(5060, "grace", DOMAIN, "a-new-password", host=ADDRESSES[0]) == (403, "Account Disabled")
    network.soap.updateAccount({"id": {"username": "grace", "domain": DOMAIN}, "enabled": True})
    wait_for(lambda: held() == ha1("grace", "a-new-password"), 10)
    # What the htable holds is what a REGISTER is checked with (thor-node is not asked).
    rpc.call("htable.sets", HA1_TABLE, key, ha1("grace", "planted"))
    assert register(5060, "grace", DOMAIN, "planted", host=NODE_ADDRESSES[home]) == (200, "OK")

    # A restarted Kamailio gets the whole copy again (the planted HA1 is gone with the old one).
    network.kamailios[home].stop()
    network.kamailios[home].start()
    assert register(5060, "grace", DOMAIN, "a-new-password", host=NODE_ADDRESSES[home]) == (200, "OK")
    wait_for(lambda: held() == ha1("grace", "a-new-password"), 10)
    assert register(5060, "grace", DOMAIN, "a-new-password", host=NODE_ADDRESSES[home]) == (200, "OK")
