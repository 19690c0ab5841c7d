"""The manager's election and the accounts protocol on an in-memory bus, in one process.

Real event servers, event clients, managers, account caches and NGNPro's loads
run on thor.eventserver.memory (socket pairs instead of TLS). The same paths over
TLS, as processes, are in test_membership.py and test_ngnpro.py.
"""

import gevent
import pytest

from thor import roles
from thor.accounts.cache import AccountCache
from thor.accounts.loads import AccountLoads
from thor.accounts.protocol import PROVISIONING
from thor.eventserver.memory import MemoryBus
from thor.lookup.table import RingFollower
from thor.loopback.process import wait_for
from thor.manager.manager import Manager
from thor.membership.member import OverlayMember

POINTS = 400  # small rings: quick to build, balanced enough for these tests


@pytest.fixture
def bus():
    memory_bus = MemoryBus(servers=2)
    yield memory_bus
    memory_bus.close()


def member(bus, name, member_roles, address, **options):
    client = bus.client(name, set(member_roles), address)
    return OverlayMember(client, name, address, member_roles, **options)


def start_manager(bus, name, address):
    manager_member = member(bus, name, [roles.MANAGER], address, follow_status=False)
    manager = Manager(manager_member.client, name, status_interval=1.0, coalesce=0.01)
    manager.start()
    manager_member.start()
    return manager_member, manager


def observer(bus):
    watcher = member(bus, "observer", [], None, announce=False)
    watcher.start()
    return watcher


def status_where(watcher, predicate, timeout=5, message="network status"):
    return wait_for(lambda: predicate(watcher.status.status) and watcher.status.status, timeout, message=message)


# -- election -----------------------------------------------------------------------------


def test_the_eldest_manager_is_active_and_the_others_stand_by(bus):
    managers = [start_manager(bus, f"manager{index}", f"127.0.1.{index}") for index in (1, 2, 3)]
    watcher = observer(bus)
    status = status_where(watcher, lambda s: len(s.roles.get(roles.MANAGER, ())) == 3, message="3 managers")
    assert status.manager == "manager1"
    assert status.roles[roles.EVENT_SERVER] == ("es1", "es2")
    # Each manager comes to the same conclusion on its own (the last to join, a moment later).
    wait_for(lambda: [manager.active_name for _, manager in managers] == ["manager1"] * 3, message="agreement")
    assert [manager.active for _, manager in managers] == [True, False, False]


def test_the_next_eldest_takes_over_when_the_active_manager_crashes_and_a_returning_one_stands_by(bus):
    managers = [start_manager(bus, f"manager{index}", f"127.0.1.{index}") for index in (1, 2, 3)]
    watcher = observer(bus)
    before = status_where(watcher, lambda s: len(s.roles.get(roles.MANAGER, ())) == 3, message="3 managers")
    crashed, manager = managers[0]
    manager.stop()
    crashed.client.stop(flush_timeout=0)  # no Thor.Leave: its connections just end
    after = status_where(watcher, lambda s: s.manager == "manager2", message="manager2 active")
    assert after.version > before.version
    assert after.roles[roles.MANAGER] == ("manager2", "manager3")
    returned, _ = start_manager(bus, "manager1", "127.0.1.1")
    status = status_where(watcher, lambda s: "manager1" in s.roles.get(roles.MANAGER, ()), message="manager1 back")
    assert status.manager == "manager2"
    assert returned.client.connected_servers == ["es1", "es2"]


def test_losing_an_event_server_loses_no_member(bus):
    start_manager(bus, "manager1", "127.0.1.1")
    member(bus, "node1", [roles.SIP_PROXY], "127.0.0.11").start()
    watcher = observer(bus)
    status_where(watcher, lambda s: "node1" in s.members, message="node1 in the status")
    bus.kill_server("es1")
    status = status_where(watcher, lambda s: s.roles.get(roles.EVENT_SERVER) == ("es2",), message="es1 gone")
    assert set(status.members) == {"manager1", "node1", "es2"}


def test_a_member_that_leaves_is_gone_at_once(bus):
    start_manager(bus, "manager1", "127.0.1.1")
    node = member(bus, "node1", [roles.SIP_PROXY], "127.0.0.11")
    node.start()
    watcher = observer(bus)
    status_where(watcher, lambda s: "node1" in s.members, message="node1 in the status")
    node.leave(flush_timeout=1)
    status_where(watcher, lambda s: "node1" not in s.members, timeout=1, message="node1 gone")


# -- accounts: NGNPro's loads and the nodes' caches --------------------------------------


class Database:
    """What AccountLoads reads: the records of one snapshot, in pages."""

    def __init__(self, count):
        self.records = [
            {"kind": "account", "key": f"user{index}@example.com", "seq": index + 1, "data": {"ha1": f"{index:032x}"}}
            for index in range(count)
        ]

    def snapshot(self):
        return (self.records[start : start + 100] for start in range(0, len(self.records), 100))


def start_ngnpro(bus, database):
    ngnpro = member(bus, "ngnpro1", [roles.PROVISIONING_SERVER], "127.0.4.1")
    rings = RingFollower(ngnpro.status, POINTS)
    loads = AccountLoads(ngnpro.client, ngnpro.status, rings, database.snapshot, lambda: True, 50, max_loads=2)
    loads.start()
    rings.start()
    ngnpro.start()
    return ngnpro


def start_node(bus, name, address):
    node = member(bus, name, [roles.SIP_PROXY], address)
    rings = RingFollower(node.status, POINTS)
    cache = AccountCache(node, rings, reload_interval=3600, request_timeout=2)
    rings.start()
    cache.start()
    node.start()
    return node, rings, cache


def held(cache):
    return {key for key, entry in cache.entries.items() if entry.data is not None}


def owned(rings, address, database):
    ring = rings.table.ring(roles.SIP_PROXY)
    return {record["key"] for record in database.records if ring.owner(record["key"]) == address}


def test_each_node_loads_exactly_the_accounts_it_owns_and_takes_a_leaving_nodes_share(bus):
    database = Database(300)
    start_manager(bus, "manager1", "127.0.1.1")
    start_ngnpro(bus, database)
    _, rings1, cache1 = start_node(bus, "node1", "127.0.0.11")
    node2, rings2, cache2 = start_node(bus, "node2", "127.0.0.12")

    def shared_between_both():
        # One condition, not three waits in a row: on a slow machine a keepalive miss can drop
        # node2 from the rings for a moment, and then "each holds what it owns" holds trivially.
        if any(len(rings.table.members(roles.SIP_PROXY)) != 2 for rings in (rings1, rings2)):
            return False
        share1, share2 = owned(rings1, "127.0.0.11", database), owned(rings2, "127.0.0.12", database)
        return share1 and share2 and held(cache1) == share1 and held(cache2) == share2

    wait_for(shared_between_both, message="each node loaded its share of a two-node ring")
    assert not held(cache1) & held(cache2)
    node2.leave(flush_timeout=1)
    wait_for(lambda: len(held(cache1)) == 300, message="node1 holds every account once node2 left")


def test_a_change_reaches_only_the_node_that_owns_its_key(bus):
    database = Database(0)
    start_manager(bus, "manager1", "127.0.1.1")
    ngnpro = start_ngnpro(bus, database)
    _, rings1, cache1 = start_node(bus, "node1", "127.0.0.11")
    _, rings2, cache2 = start_node(bus, "node2", "127.0.0.12")
    wait_for(
        lambda: len(rings1.table.members(roles.SIP_PROXY)) == 2 and len(rings2.table.members(roles.SIP_PROXY)) == 2
    )
    assert wait_for(lambda: ngnpro.client.connected_servers == ["es1", "es2"])
    changes = [
        {"kind": "account", "key": f"new{index}@example.com", "seq": index + 1, "data": {}} for index in range(40)
    ]
    ngnpro.client.publish(PROVISIONING, {"changes": changes})
    keys = {change["key"] for change in changes}
    wait_for(lambda: held(cache1) | held(cache2) == keys, message="every change held by a node")
    ring = rings1.table.ring(roles.SIP_PROXY)
    assert held(cache1) == {key for key in keys if ring.owner(key) == "127.0.0.11"}
    assert not held(cache1) & held(cache2)


def connected_after_six_failures(bus, **settings):
    """node1's client, connected again after its server was away for six reconnect attempts (its
    backoff built up to 3.2 s); and the list its connection attempts are counted in."""
    client = bus.client(
        "node1", {roles.SIP_PROXY}, "127.0.0.11", servers=[("es1", 8000)], backoff=(0.05, 30), **settings
    )
    attempts = []
    connect = client.connect
    client.connect = lambda *args, **kwargs: attempts.append(1) or connect(*args, **kwargs)
    client.start()
    assert client.wait_connected(1, timeout=5)
    bus.kill_server("es1")
    wait_for(lambda: len(attempts) >= 7, 10, message="six failed reconnects")
    bus.add_server("es1")
    assert client.wait_connected(1, timeout=10)
    return client, attempts


def test_a_link_reconnected_on_purpose_is_back_at_once_however_often_it_failed_before(bus):
    """A renewed certificate moves each link to a new connection (ServerLink.reconnect()): that
    link does not wait out the backoff its earlier failures built up."""
    client, attempts = connected_after_six_failures(bus)
    before = len(attempts)
    client.links[("es1", 8000)].reconnect()
    # Without the reset: the next attempt after 3.2 s (x0.5-1.5); now after 0.05 s.
    wait_for(lambda: len(attempts) > before and client.connected_servers, 1.0, message="connected again at once")


def test_a_link_whose_connection_held_is_back_at_once_when_its_server_restarts(bus):
    """Failures long ago leave no backoff behind once a connection held (stable_session); one cut
    soon after it came up (a slow consumer, an overloaded server) goes on backing off."""
    client, attempts = connected_after_six_failures(bus, stable_session=0.5)
    link = client.links[("es1", 8000)]
    # Cut soon after it came up: the next attempt waits out the backoff built up (6.4 s x 0.5-1.5).
    before = len(attempts)
    bus.kill_server("es1")
    bus.add_server("es1")
    wait_for(lambda: not link.connected, 1.0, message="the link down")
    gevent.sleep(1.0)
    assert len(attempts) == before, "reconnected at once after a connection that did not hold"
    assert client.wait_connected(1, timeout=15)
    # Up longer than stable_session: a restart of its server finds it back within the shortest backoff.
    gevent.sleep(0.6)
    before = len(attempts)
    bus.kill_server("es1")
    bus.add_server("es1")
    wait_for(lambda: len(attempts) > before and client.connected_servers, 1.0, message="connected again at once")
