"""The manager's view of the network, without sockets."""

import json

import pytest

from thor.manager.view import NetworkView
from thor.membership.entity import EntityError, make_entity
from thor.membership.status import NetworkStatus, validate_member
from thor.monitor.report import parse_expectation, unmet_expectations


def entity(name, roles, since, **fields):
    return make_entity(name, "127.0.0.1", roles, "0.1.0", since, **fields)


def member(name, connection, sessions=()):
    return {"name": name, "connection": connection, "sessions": list(sessions)}


def test_sessions_of_one_name_merge_and_die_separately():
    view = NetworkView()
    view.server_snapshot("es1", "es1-session", [member("thor1", 1, ["manager-session"])])
    view.update_presence("es1", "es1-session", entity("es1", ["thor_eventserver"], 1))
    view.update_presence("thor1", "manager-session", entity("thor1", ["thor_manager"], 2))
    view.update_presence("thor1", "node-session", entity("thor1", ["sip_proxy"], 3))
    view.session("es1", member("thor1", 2), "node-session")
    assert view.live_members()["thor1"]["roles"] == ["sip_proxy", "thor_manager"]
    assert view.active_manager() == "thor1"
    view.disconnected("es1", member("thor1", 1))
    assert view.live_members()["thor1"]["roles"] == ["sip_proxy"]
    assert view.active_manager() is None


def test_a_member_cannot_keep_another_members_session_alive():
    view = NetworkView()
    view.server_snapshot("es1", "s0", [member("manager1", 1, ["m1"]), member("manager2", 2, ["m2"])])
    view.update_presence("manager1", "m1", entity("manager1", ["thor_manager"], 1))
    view.update_presence("manager2", "m2", entity("manager2", ["thor_manager"], 2))
    # A hostile node publishes under manager1's session string.
    view.session("es1", member("evil", 3), "m1")
    view.disconnected("es1", member("manager1", 1))
    assert view.active_manager() == "manager2"
    assert "manager1" not in view.live_members()


def test_leave_of_unknown_sessions_is_not_remembered():
    view = NetworkView()
    for index in range(1000):
        view.leave("node1", f"session{index}")
    assert view.left == set()


def test_programs_sharing_a_name_keep_their_own_attributes_whatever_started_last():
    """thor-database, ngnpro and an event server on one host: one member, each role with its program's attributes."""
    for order in ((1, 2, 3), (3, 2, 1)):
        view = NetworkView()
        # host1's event server is alive while the manager's link to it is up; its other programs connect to it.
        view.server_snapshot("host1", "es-session", [member("host1", 1, ["db", "ngnpro"])])
        programs = [
            ("host1", "es-session", entity("host1", ["thor_eventserver"], order[0], attributes={"port": 8000})),
            ("host1", "db", entity("host1", ["thor_database"], order[1], attributes={"port": 5432, "host": "h"})),
            ("host1", "ngnpro", entity("host1", ["provisioning_server"], order[2], attributes={"port": 9200})),
        ]
        for publisher, session, presence in programs:
            view.update_presence(publisher, session, presence)
        status = view.status(1, "manager1")
        assert status.members["host1"]["roles"] == ["provisioning_server", "thor_database", "thor_eventserver"]
        assert status.attributes("host1", "thor_database") == {"port": 5432, "host": "h"}
        assert status.attributes("host1", "provisioning_server") == {"port": 9200}
        assert status.attributes("host1", "thor_eventserver") == {"port": 8000}
        assert status.service("host1", "provisioning_server")["since"] == order[2]
        assert status.attributes("host1", "sip_proxy") == {}
        # What goes over the bus reads back the same.
        again = NetworkStatus.from_json(json.loads(json.dumps(status.to_json())))
        assert again.members == status.members


def test_a_withdrawn_role_says_why_until_a_program_announces_it():
    view = NetworkView()
    view.server_snapshot("es1", "s0", [member("node1", 1, ["a", "b"])])
    view.update_presence("node1", "a", entity("node1", ["sip_proxy"], 1, withdrawn={"media_relay": "check fails"}))
    members = view.live_members()
    assert members["node1"]["roles"] == ["sip_proxy"]
    assert members["node1"]["withdrawn"] == {"media_relay": "check fails"}
    view.update_presence("node1", "b", entity("node1", ["media_relay"], 2))
    assert view.live_members()["node1"]["withdrawn"] == {}


@pytest.mark.parametrize(
    "change",
    [
        {"services": []},
        {"services": {"sip_proxy": {"since": "yesterday", "attributes": {}}}},
        {"services": {"sip_proxy": {"since": 1, "attributes": {"port": [1]}}}},
        {"services": {"Not A Role": {"since": 1, "attributes": {}}}},
        {"withdrawn": {"sip_proxy": 5}},
        {"address": "192.0.2.300"},
        {"address": "node1.example"},
        {"address": 3221225985},
        {"name": ""},
        {"since": True},
    ],
)
def test_a_malformed_status_member_is_refused(change):
    good = NetworkView()
    good.server_snapshot("es1", "s0", [member("node1", 1, ["a"])])
    good.update_presence("node1", "a", entity("node1", ["sip_proxy"], 1))
    body = good.live_members()["node1"]
    assert validate_member(body) == body
    with pytest.raises(EntityError):
        validate_member({**body, **change})


def test_a_status_members_address_is_kept_in_its_canonical_form():
    body = {"name": "node1", "address": "2001:DB8:0::21", "services": {}, "since": 1}
    assert validate_member(body)["address"] == "2001:db8::21"
    assert validate_member(dict(body, address="192.0.2.21"))["address"] == "192.0.2.21"
    assert validate_member(body)["address"] == "2001:db8::21"  # the same answer a second time


def test_expectations_name_the_missing_member_role_and_health_check():
    view = NetworkView()
    view.server_snapshot("es1", "s0", [member("node1", 1, ["a"])])
    view.update_presence(
        "node1", "a", entity("node1", ["sip_proxy"], 1, withdrawn={"media_relay": "health check tcp:x:1 fails"})
    )
    status = view.status(1, "manager1")
    expected = [parse_expectation("node1=sip_proxy,media_relay"), parse_expectation("node2=sip_proxy")]
    assert unmet_expectations(status, expected) == [
        "node1: media_relay withdrawn: health check tcp:x:1 fails",
        "node2: not in the network status (none of its programs is connected)",
    ]
    assert unmet_expectations(status, [parse_expectation("node1=sip_proxy")]) == []


def test_a_rolling_restart_waits_for_the_restarted_program_not_the_one_before_it():
    view = NetworkView()
    view.server_snapshot("es1", "s0", [member("thor1", 1, ["manager-before"])])
    view.update_presence("thor1", "manager-before", entity("thor1", ["thor_manager"], 100.0))
    expected = [parse_expectation("thor1=thor_manager")]
    before = view.status(1, "manager1")
    assert unmet_expectations(before, expected) == []
    [problem] = unmet_expectations(before, expected, started_after=150.0)
    assert problem.startswith("thor1: thor_manager announced by a program started 50.0s before ")
    view.server_snapshot("es1", "s1", [member("thor1", 2, ["manager-after"])])
    view.update_presence("thor1", "manager-after", entity("thor1", ["thor_manager"], 160.0))
    assert unmet_expectations(view.status(2, "manager1"), expected, started_after=150.0) == []
