"""The network status on the bus: a snapshot once, then only what changed (docs/protocol.md).

Real event servers, event clients and managers on the in-memory bus
(thor.eventserver.memory); the same code runs over TLS in test_membership.py.
"""

import json
import logging
import random

import gevent
import pytest

from thor import roles
from thor.events import protocol
from thor.events.topics import MEMBERS
from thor.eventserver.memory import MemoryBus
from thor.loopback.process import wait_for
from thor.manager.manager import Manager
from thor.manager.view import NetworkView
from thor.membership.entity import make_entity
from thor.membership.member import OverlayMember
from thor.membership.status import NetworkStatus, StatusCache, changes_body, snapshot_bodies


@pytest.fixture
def bus():
    memory_bus = MemoryBus(servers=2)
    yield memory_bus
    memory_bus.close()


def member(bus, name, member_roles=(roles.SIP_PROXY,), **options):
    address = options.pop("address", f"127.0.2.{abs(hash(name)) % 250 + 1}")
    client = bus.client(name, set(member_roles), address, servers=options.pop("servers", None))
    overlay = OverlayMember(client, name, address, member_roles, **options)
    overlay.start()
    return overlay


def start_manager(bus, name):
    manager_member = member(bus, name, [roles.MANAGER], follow_status=False)
    manager = Manager(manager_member.client, name, status_interval=0.5, coalesce=0.01)
    manager.start()
    return manager_member, manager


class Recorder:
    """A follower that also keeps every Thor.Members body it receives (every copy)."""

    def __init__(self, bus, name="follower", **options):
        self.member = member(bus, name, [], announce=False, **options)
        self.bodies = []
        self.member.client.subscribe(MEMBERS, lambda message: self.bodies.append(message.body), deduplicate=False)

    @property
    def status(self):
        return self.member.status.status

    def wait(self, predicate, message, timeout=5):
        return wait_for(lambda: predicate(self.status) and self.status, timeout, message=message)

    def kinds(self, start=0):
        return [body.get("kind") for body in self.bodies[start:]]


def names(status, role=roles.SIP_PROXY):
    return set(status.roles.get(role, ()))


def test_a_newcomer_gets_the_whole_status_once_then_each_change_names_only_what_changed(bus):
    start_manager(bus, "manager1")
    nodes = [member(bus, f"node{index}") for index in range(20)]
    follower = Recorder(bus)
    before = follower.wait(lambda s: len(names(s)) == 20, "20 nodes")
    assert set(follower.kinds()) <= {"snapshot", "changes", "current"}
    start = len(follower.bodies)
    member(bus, "node20")
    after = follower.wait(lambda s: "node20" in names(s), "node20 joined")
    changes = [body for body in follower.bodies[start:] if body.get("kind") == "changes"]
    assert changes and all(set(body["entries"]) == {"node20"} and body["left"] == [] for body in changes)
    assert "snapshot" not in follower.kinds(start)
    assert after.chain == before.chain and after.version > before.version
    start = len(follower.bodies)
    nodes[3].leave()
    gone = follower.wait(lambda s: "node3" not in names(s), "node3 left")
    changes = [body for body in follower.bodies[start:] if body.get("kind") == "changes"]
    assert changes and all(body["entries"] == {} and body["left"] == ["node3"] for body in changes)
    # What one member's change costs a follower, per event server it hears it through.
    assert max(len(protocol.encode(body)) for body in changes) < 1024
    assert gone.members == follower.status.members


def test_a_follower_that_misses_a_change_asks_again_and_catches_up(bus, caplog):
    _, manager = start_manager(bus, "manager1")
    member(bus, "node1")
    follower = Recorder(bus)
    cache = follower.member.status
    follower.wait(lambda s: "node1" in names(s), "node1")
    # The next change is lost on its way, through both servers, as on links that broke.
    update, dropped = cache.update, []

    def losing_one(body):
        if body.get("kind") == "changes" and (not dropped or body["version"] == dropped[0]) and len(dropped) < 2:
            dropped.append(body["version"])
            return False
        return update(body)

    cache.update = losing_one
    member(bus, "node2")
    wait_for(lambda: dropped, message="a change dropped")
    assert "node2" not in names(follower.status)
    with caplog.at_level(logging.INFO, logger="thor.membership"):
        member(bus, "node3")  # its change does not follow on the held version: a gap
        caught_up = follower.wait(lambda s: {"node2", "node3"} <= names(s), "caught up")
    assert "asking for the network status again" in caplog.text
    assert caught_up.version == manager.published.version
    assert caught_up.members == manager.published.members


def test_a_follower_that_missed_the_last_change_learns_it_from_the_periodic_current_version(bus):
    _, manager = start_manager(bus, "manager1")
    follower = Recorder(bus)
    cache = follower.member.status
    follower.wait(lambda s: s.version, "a status")
    update = cache.update
    cache.update = lambda body: False if body.get("kind") == "changes" else update(body)
    member(bus, "node1")
    wait_for(lambda: manager.published and "node1" in manager.published.members, message="node1 published")
    cache.update = update
    # Nothing changes after it; the manager's "current" (every status_interval) shows the gap.
    follower.wait(lambda s: "node1" in names(s), "node1 through the retained log", timeout=5)


def test_versions_only_grow_and_followers_take_the_new_chain_when_the_active_manager_dies_mid_stream(bus):
    active_member, active = start_manager(bus, "manager1")
    start_manager(bus, "manager2")
    follower = Recorder(bus)
    seen = []
    follower.member.status.on_change(lambda old, new: seen.append((new.version, new.chain, new.manager)))
    follower.wait(lambda s: names(s, roles.MANAGER) == {"manager1", "manager2"}, "both managers")
    joining = gevent.spawn(lambda: [member(bus, f"node{index}") or gevent.sleep(0.02) for index in range(30)])
    gevent.sleep(0.2)
    active.stop()
    active_member.client.stop(flush_timeout=0)  # a crash, in the middle of the joins
    joining.get(timeout=10)
    final = follower.wait(
        lambda s: s.manager == "manager2" and len(names(s)) == 30, "manager2's status with all 30 nodes", timeout=10
    )
    versions = [version for version, _, _ in seen]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert {chain for _, chain, manager in seen if manager == "manager2"} == {final.chain}
    assert final.chain != next(chain for _, chain, manager in seen if manager == "manager1")


def test_a_follower_hears_the_status_through_one_server_and_through_another_when_that_one_dies(bus):
    start_manager(bus, "manager1")
    follower = Recorder(bus)
    follower.wait(lambda s: s.version, "a status")
    following = follower.member.client._one_server[MEMBERS]
    start = len(follower.bodies)
    member(bus, "node1")
    follower.wait(lambda s: "node1" in names(s), "node1")
    versions = [body["version"] for body in follower.bodies[start:] if body.get("kind") == "changes"]
    assert versions and len(versions) == len(set(versions))  # one copy of each: one server
    bus.kill_server(following.server_name)
    member(bus, "node2")
    follower.wait(lambda s: "node2" in names(s), "node2, through the other server")
    assert follower.member.client._one_server[MEMBERS].server_name != following.server_name


def test_a_follower_that_reconnects_to_another_event_server_gets_what_it_missed_there(bus):
    start_manager(bus, "manager1")
    follower = Recorder(bus, servers=[("es1", 8000)])
    follower.wait(lambda s: s.version, "a status")
    bus.kill_server("es1")
    for index in range(5):
        member(bus, f"node{index}", servers=[("es2", 8000)])
    # Its event servers change (SRV records, in the daemons): es2 has the retained log.
    follower.member.client._set_endpoints([("es2", 8000)])
    follower.wait(lambda s: len(names(s)) == 5, "the 5 nodes that joined while it was away")


def entity(index):
    name = f"node{index:05d}"
    address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
    return make_entity(name, address, [roles.SIP_PROXY, roles.MEDIA_RELAY], "0.1.0", 1764048000.0 + index)


def add_members(view, count):
    """count members in view, as if an event server (one no test stops) had announced them."""
    for index in range(count):
        presence = entity(index)
        view.update_presence(presence["name"], "s1", presence)
        view.connected("es-test", {"connection": index, "name": presence["name"], "sessions": ["s1"]})


@pytest.fixture
def roomy_bus():
    """A bus whose keepalives outlast the seconds one process takes to build and parse statuses of
    thousands of members (with the bus's 0.1 s, every link timed out meanwhile now and then)."""
    memory_bus = MemoryBus(servers=2, keepalive=1.0, idle_timeout=5.0)
    yield memory_bus
    memory_bus.close()


def test_a_status_too_large_for_one_frame_reaches_every_follower_in_parts(roomy_bus):
    """5,000 members: the whole status is about 1.4 MB, over the 1 MiB frame limit (the first
    design could not publish it and froze). Here it goes out as a snapshot in parts."""
    bus = roomy_bus
    manager_member, manager = start_manager(bus, "manager1")
    follower = Recorder(bus)
    follower.wait(lambda s: s.manager == "manager1", "manager1 active")
    add_members(manager.view, 5000)
    whole = NetworkStatus(1, "manager1", manager.view.live_members())
    assert len(protocol.encode(whole.to_json(), protocol.MAX_SERVER_FRAME_SIZE)) > protocol.DEFAULT_MAX_FRAME_SIZE
    manager._changed()
    status = follower.wait(lambda s: len(names(s)) == 5000, "5,000 nodes", timeout=20)
    # So many changes at once go out as a snapshot (no larger than the changes), in parts.
    snapshots = [body for body in follower.bodies if body.get("kind") == "snapshot" and body["parts"] > 1]
    parts = {}
    for body in snapshots:
        parts.setdefault(body["version"], set()).add(body["part"])
    assert any(got == set(range(26)) for got in parts.values()), parts  # 5,003 members, 200 a part
    assert max(len(protocol.encode(body)) for body in snapshots) < protocol.DEFAULT_MAX_FRAME_SIZE
    assert status.members["node04999"]["address"] == "10.0.19.135"
    # A newcomer gets it from the servers' retained log.
    newcomer = Recorder(bus, "newcomer")
    newcomer.wait(lambda s: len(names(s)) == 5000, "the newcomer's 5,000", timeout=20)
    manager_member.leave()


def test_a_publication_that_fails_is_reported_and_tried_again_never_counted_as_published(bus, caplog):
    manager_member, manager = start_manager(bus, "manager1")
    follower = Recorder(bus)
    follower.wait(lambda s: s.manager == "manager1", "manager1 active")
    publish, failures = manager_member.client.publish, []

    def failing(topic, body, **options):
        if topic == MEMBERS and len(failures) < 3:
            failures.append(body.get("kind"))
            raise ValueError("the event client cannot send this")
        return publish(topic, body, **options)

    manager_member.client.publish = failing
    with caplog.at_level(logging.ERROR, logger="thor-manager"):
        member(bus, "node1")
        status = follower.wait(lambda s: "node1" in names(s), "node1 once publishing works again", timeout=10)
    assert len(failures) == 3
    assert caplog.text.count("could not publish the network status") == 3
    assert status.version == manager.published.version and "node1" in manager.published.members


def test_a_status_the_servers_refuse_to_keep_is_an_error_the_manager_reports_and_retries(caplog):
    small = MemoryBus(servers=1, max_log_bytes=1 << 20, keepalive=1.0, idle_timeout=5.0)  # roomy_bus: why
    try:
        manager_member, manager = start_manager(small, "manager1")
        follower = Recorder(small)
        follower.wait(lambda s: s.manager == "manager1", "manager1 active")
        errors = []
        manager_member.client.on_error(lambda link, error: errors.append(error))
        # A status bigger than a log may be (about 1.4 MB): refused, reported, tried again.
        add_members(manager.view, 5000)
        manager._changed()
        wait_for(lambda: len(errors) >= 2, 10, message="the refusal reported again and again")
        assert errors[0]["code"] == protocol.LIMIT and errors[0]["topic"] == MEMBERS
        snapshots = manager.publications["snapshot"]
        with caplog.at_level(logging.ERROR, logger="thor-manager"):
            gevent.sleep(3)
        # Tried again and reported once a second, not at each 0.5 s tick here, nor once per part
        # refused, however late the refusals come: a new attempt at most at 0, 1, 2 and 3 s.
        assert 1 <= manager.publications["snapshot"] - snapshots <= 4
        assert 1 <= caplog.text.count("refused a network status publication") <= 4
    finally:
        small.close()


# -- the status bodies on their own ---------------------------------------------------------


def status_of(count, version=5, chain="c1"):
    members = {}
    for index in range(count):
        presence = entity(index)
        view = NetworkView()
        view.update_presence(presence["name"], "s", presence)
        view.connected("es1", {"connection": 1, "name": presence["name"], "sessions": ["s"]})
        members.update(view.live_members())
    return NetworkStatus(version, "manager1", members, chain=chain)


def test_a_cache_takes_a_snapshot_whatever_order_its_parts_come_in_and_ignores_copies():
    whole = status_of(450)
    cache = StatusCache()
    parts = snapshot_bodies(whole, part_members=100)
    assert len(parts) == 5
    assert [cache.update(body) for body in reversed(parts)] == [False] * 4 + [True]
    assert cache.status.members == whole.members and cache.status.version == 5
    assert not any(cache.update(body) for body in parts)  # copies through other servers


def test_a_cache_applies_changes_in_order_and_refuses_what_does_not_follow():
    old = status_of(10)
    new_members = dict(status_of(11).members)
    del new_members["node00003"]
    new = NetworkStatus(6, "manager1", new_members, chain="c1")
    cache, gaps = StatusCache(), []
    cache.on_gap = lambda: gaps.append(True)
    for body in snapshot_bodies(old):
        cache.update(body)
    body = changes_body(old, new)
    assert set(body["entries"]) == {"node00010"} and body["left"] == ["node00003"]
    assert cache.update(dict(body, previous=4)) is False and gaps  # does not follow v5: a gap
    assert cache.update(body) is True
    assert cache.status.members == new.members and cache.status.version == 6
    assert cache.status.roles == new.roles  # kept up to date, not rebuilt
    assert cache.update(body) is False  # a copy
    assert cache.update({"kind": "changes", "version": "7"}) is False  # malformed: ignored, logged


def test_after_a_split_the_chain_asked_for_is_built_on_unseen_until_it_is_newer_than_the_held_one():
    """Healed split: a member holds the standing-down manager's status (chain B, v200); the manager
    that stays active has chain A, whose snapshot is older (v100). The member asks for A after the
    gap, and used to show A's v100 at once: a step back in versions, to a status it had left. Now it
    builds on A unseen and shows it once A is newer; versions only grow."""
    cache, shown, gaps = StatusCache(), [], []
    cache.on_change(lambda old, new: shown.append(new.version))
    cache.on_gap = lambda: gaps.append(True)
    for body in snapshot_bodies(status_of(3, version=200, chain="B")):
        cache.update(body)
    older = status_of(4, version=100, chain="A")
    step = NetworkStatus(150, "manager1", status_of(5).members, chain="A")
    newer = NetworkStatus(250, "manager1", status_of(6).members, chain="A")
    log = [*snapshot_bodies(older), changes_body(older, step), changes_body(step, newer)]
    # A's log arrives: older than what is held until its last change, which does not follow B.
    assert [cache.update(body) for body in log] == [False, False, False]
    assert gaps and cache.status.chain == "B"
    # Asked again, the server hands A's whole log: built on unseen, shown once newer.
    assert [cache.update(body) for body in log] == [False, False, True]
    assert cache.status.version == 250 and cache.status.members == newer.members
    assert shown == [200, 250]


def test_the_first_designs_whole_status_is_still_understood():
    whole = status_of(3)
    cache = StatusCache()
    assert cache.update(json.loads(json.dumps({k: v for k, v in whole.to_json().items() if k != "chain"})))
    assert cache.status.members == whole.members and cache.status.chain == "manager1"


# -- the event servers' retained logs ---------------------------------------------------------


def test_event_servers_keep_a_log_on_log_topics_hand_it_to_newcomers_and_again_on_request(bus):
    publisher = bus.client("manager9", {roles.MANAGER})
    live, errors = [], []
    listener = bus.client("listener", set())
    listener.subscribe(MEMBERS, lambda message: live.append(message.body["n"]), deduplicate=False)
    for client in (publisher, listener):
        client.start()
        assert client.wait_connected(2, timeout=5)
    assert listener.sync()
    publisher.on_error(lambda link, error: errors.append(error))
    publisher.publish(MEMBERS, {"n": 1}, retain=True)
    publisher.publish(MEMBERS, {"n": 2}, retain=protocol.APPEND, deliver=False)  # kept, not sent
    publisher.publish(MEMBERS, {"n": 3}, retain=protocol.APPEND)
    publisher.publish("Test.Topic", {"n": 4}, retain=protocol.APPEND)  # not a log topic: refused
    assert publisher.sync()
    wait_for(lambda: sorted(live) == [1, 1, 3, 3], message="what was delivered, through both servers")
    wait_for(lambda: len(errors) == 2, message="both servers refusing the log on Test.Topic")
    assert {error["code"] for error in errors} == {protocol.LIMIT} and "no retained log" in errors[0]["message"]
    newcomer = []
    late = bus.client("late", set())
    late.subscribe(MEMBERS, lambda message: newcomer.append(message.body["n"]), deduplicate=False)
    late.start()
    wait_for(lambda: newcomer == [1, 2, 3, 1, 2, 3], message="the log, in order, from each server")
    assert late.refresh(MEMBERS)
    wait_for(lambda: newcomer[6:] == [1, 2, 3], message="the log again, from one server")
    publisher.publish(MEMBERS, {"n": 5}, retain=True)  # starts the log anew
    wait_for(lambda: newcomer[9:] == [5, 5], message="5, delivered through both servers")
    late.refresh(MEMBERS)
    wait_for(lambda: newcomer[9:] == [5, 5, 5], message="the new log: 5 alone")


def test_snapshot_parts_stay_small_however_large_the_members_are_and_a_cache_bounds_what_it_gathers():
    big = {f"attribute{index}": "x" * 200 for index in range(32)}
    members = {}
    for index in range(300):
        view = NetworkView()
        presence = make_entity(f"n{index:03d}", "10.0.0.1", [roles.SIP_PROXY], "0.1.0", 1.0, attributes=big)
        view.update_presence(presence["name"], "s", presence)
        view.connected("es1", {"connection": 1, "name": presence["name"], "sessions": ["s"]})
        members.update(view.live_members())
    whole = NetworkStatus(9, "manager1", members, chain="c2")
    parts = snapshot_bodies(whole)
    assert len(protocol.encode(whole.to_json(), protocol.MAX_SERVER_FRAME_SIZE)) > 2 * protocol.DEFAULT_MAX_FRAME_SIZE
    assert all(len(protocol.encode(body)) < 300 << 10 for body in parts) and len(parts) > 8
    cache = StatusCache()
    assert [cache.update(body) for body in parts][-1] is True and cache.status.members == whole.members
    too_many = dict(parts[0], version=10, entries={f"x{i}": {} for i in range(1001)})
    assert StatusCache().update(too_many) is False  # refused whole, not gathered


def test_changes_keep_the_roles_what_a_whole_status_of_the_same_members_has():
    pool = status_of(40).members
    rng = random.Random(7)
    status = NetworkStatus(1, "manager1", {}, chain="c3")
    for step in range(300):
        names = rng.sample(sorted(pool), 4)
        entries = {name: pool[name] for name in names[:2] if rng.random() < 0.7}
        if rng.random() < 0.3 and entries:  # a member that changed its roles
            name = next(iter(entries))
            entries[name] = dict(entries[name], roles=[roles.MEDIA_RELAY], services={})
        left = [name for name in names[2:] if name in status.members]
        status = status.changed(step + 2, "manager1", 0.0, entries, left)
        assert status.roles == NetworkStatus(step + 2, "manager1", status.members).roles
