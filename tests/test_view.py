"""The manager's view of the network, without sockets."""

from thor.manager.view import NetworkView
from thor.membership.entity import make_entity


def entity(name, roles, since):
    return make_entity(name, "127.0.0.1", roles, "0.1.0", since)


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
