"""SIP over the overlay when things go wrong: a sip_proxy node dies, a home node does not answer.

Each test builds its own network (3 sip_proxy nodes with Kamailio on 127.0.4.11-13, NGNPro,
PostgreSQL), since it breaks it; tests/test_sip.py's shared one is gone by then.
"""

import signal
import time

from thor.loopback.kamailio import invite, register
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, SipNetwork, account, owner, password, subscribers
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import wait_for

NODES = ("node1", "node2", "node3")
ADDRESSES = [NODE_ADDRESSES[name] for name in NODES]
USERS = [f"user{index}" for index in range(12)]


def provision(network, users):
    network.soap.addDomain(DOMAIN)
    for user in users:
        network.soap.addAccount(account(user, password=password(user)))


def homes(network, users):
    return {user: owner(network, f"{user}@{DOMAIN}") for user in users}


def test_a_dead_nodes_subscribers_register_again_with_their_new_home_and_nothing_else_changes(tmp_path):
    postgresql = PostgreSQL()
    network = SipNetwork(tmp_path, ScratchPKI(tmp_path / "pki"), postgresql)
    devices_of = {}
    try:
        network.start_nodes(*NODES)
        network.soap = network.client()
        users = USERS[:9]
        provision(network, users)
        wait_for(lambda: register(5060, users[0], DOMAIN, password(users[0]), host=ADDRESSES[0])[0] == 200, 20)
        before = homes(network, users)
        network.directory = tmp_path
        devices_of["all"] = network.devices("devices", subscribers(users), via="node1")
        devices_of["all"].stop()  # registered; answering comes later, on the same port
        network.kamailios["node3"].kill()
        network.nodes["node3"].kill()
        network.status(lambda s: "node3" not in s.members, "node3 gone")
        orphans = [user for user in users if before[user] == NODE_ADDRESSES["node3"]]
        kept = [user for user in users if user not in orphans]
        assert orphans and kept
        caller = "carol"
        network.soap.addAccount(account(caller, password=password(caller)))
        # Only the orphans lost their binding: their new home never had one.
        answering = devices_of["answering"] = network.answering("answering", devices_of["all"].local)
        rows = [[caller, DOMAIN, password(caller), user] for user in kept]
        wait_for(lambda: register(5060, caller, DOMAIN, password(caller), host=ADDRESSES[1])[0] == 200, 10)
        result = network.calls("kept", rows, "node2", "127.0.5.30")
        assert (result.successful, result.failed) == (len(rows), 0), result.errors
        for user in orphans:
            assert invite(5060, caller, DOMAIN, password(caller), user, host=ADDRESSES[1])[:2] == (
                480,
                "Temporarily Unavailable",
            )
        answering.stop()
        # Their next REGISTER, through a live node, reaches the new home; calls to them work again.
        devices_of["again"] = network.devices(
            "again", subscribers(orphans), via="node2", port=devices_of["all"].local[1]
        )
        rows = [[caller, DOMAIN, password(caller), user] for user in orphans]
        result = network.calls("orphans", rows, "node1", "127.0.5.31")
        assert (result.successful, result.failed) == (len(rows), 0), result.errors
    finally:
        for sipp in devices_of.values():
            sipp.stop()
        network.close()
        postgresql.remove()


def test_a_home_node_that_does_not_answer_in_time_gets_the_device_a_503_with_retry_after(tmp_path):
    """node2's Kamailio and thor-node frozen (SIGSTOP), still members (no health checks, long
    event server timeouts): the edge answers 503 with Retry-After, in bounded time."""
    postgresql = PostgreSQL()
    network = SipNetwork(
        tmp_path, ScratchPKI(tmp_path / "pki"), postgresql, health_checks=False, keepalive=1, idle_timeout=30
    )
    try:
        network.start_nodes(*NODES)
        network.soap = network.client()
        provision(network, USERS)
        wait_for(lambda: register(5060, USERS[0], DOMAIN, password(USERS[0]), host=ADDRESSES[0])[0] == 200, 20)
        at_node2 = [user for user, home in homes(network, USERS).items() if home == NODE_ADDRESSES["node2"]]
        assert at_node2
        user = at_node2[0]
        network.kamailios["node2"].process.send_signal(signal.SIGSTOP)
        network.nodes["node2"].signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert register(5060, user, DOMAIN, password(user), host=ADDRESSES[0], timeout=10) == (
                503,
                "Home Node Unreachable",
            )
            code, reason, headers = invite(5060, user, DOMAIN, password(user), USERS[0], host=ADDRESSES[0])
            assert (code, reason, headers.get("retry-after")) == (503, "Home Node Unavailable", "5")
            assert time.monotonic() - started < 10
        finally:
            network.nodes["node2"].signal(signal.SIGCONT)
            network.kamailios["node2"].process.send_signal(signal.SIGCONT)
        wait_for(lambda: register(5060, user, DOMAIN, password(user), host=ADDRESSES[0])[0] == 200, 10)
    finally:
        network.close()
        postgresql.remove()
