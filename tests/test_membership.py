"""The self-organizing overlay as processes on loopback: 3 event servers, managers, nodes.

Timing targets (issue: membership) are asserted with the defaults of the
event servers (keepalive 1 s, idle timeout 3 s); bench/membership_bench.py
measures them over many trials.
"""

import json
import signal
import socket
import time

import pytest

from thor.loopback.kamailio import Kamailio
from thor.loopback.network import EventServerProcess, members, wait_status
from thor.loopback.process import free_port, wait_for
from thor.loopback.proxy import CuttableRelay

EVERYONE = {"manager1", "manager2", "node1", "node2"}


def start_network(overlay, managers=2):
    overlay.start_eventservers(3, keepalive=1, idle_timeout=3)
    for index in range(managers):
        overlay.manager(f"manager{index + 1}", f"127.0.1.{index + 1}")
        overlay.programs[f"manager{index + 1}"].wait_log("thor-manager 0.1.0 started")
    overlay.node("node1", "sip_proxy,media_relay", "127.0.0.11")
    overlay.node("node2", "sip_proxy,xcap_server", "127.0.0.12")
    observer = overlay.observer()
    status = wait_status(observer, lambda s: members(s) >= EVERYONE, message="everyone in the status")
    return observer, status


def test_status_lists_roles_members_and_the_active_manager(overlay):
    _, status = start_network(overlay)
    assert status.manager == "manager1"  # the eldest
    assert status.roles["sip_proxy"] == ("node1", "node2")
    assert status.roles["media_relay"] == ("node1",)
    assert status.roles["thor_manager"] == ("manager1", "manager2")
    node1 = status.members["node1"]
    assert node1["address"] == "127.0.0.11"
    assert node1["version"] == "0.1.0"
    assert status.addresses("sip_proxy") == ["127.0.0.11", "127.0.0.12"]
    # The event servers the managers reach are listed too, with their ports (for DNS SRV records).
    assert status.roles["thor_eventserver"] == ("es1", "es2", "es3")
    assert [status.attributes(name, "thor_eventserver")["port"] for name in status.roles["thor_eventserver"]] == [
        server.port for server in overlay.eventservers
    ]
    assert "standing by; the active manager is manager1" in overlay.programs["manager2"].log()


def test_kill_9_of_a_node_is_gone_within_3_seconds(overlay):
    observer, _ = start_network(overlay)
    killed = time.monotonic()
    overlay.programs["node2"].kill()
    status = wait_status(observer, lambda s: "node2" not in s.members, timeout=3, message="node2 gone")
    assert time.monotonic() - killed <= 3
    assert status.roles["sip_proxy"] == ("node1",)


def test_clean_stop_is_gone_within_half_a_second(overlay):
    observer, before = start_network(overlay)
    node = overlay.programs["node2"]
    stopped = time.monotonic()
    node.signal(signal.SIGTERM)
    status = wait_status(observer, lambda s: "node2" not in s.members, timeout=2, message="node2 gone")
    elapsed = time.monotonic() - stopped
    assert elapsed <= 0.5, f"clean leave took {elapsed:.3f}s"
    assert node.exited(5) == 0
    assert status.version > before.version


def test_frozen_node_is_gone_within_5_seconds_and_back_after_sigcont(overlay):
    observer, _ = start_network(overlay)
    node = overlay.programs["node2"]
    frozen = time.monotonic()
    node.signal(signal.SIGSTOP)
    try:
        wait_status(observer, lambda s: "node2" not in s.members, timeout=5, message="frozen node2 gone")
        assert time.monotonic() - frozen <= 5
    finally:
        node.signal(signal.SIGCONT)
    status = wait_status(observer, lambda s: "node2" in s.members, timeout=10, message="node2 back")
    assert status.roles["xcap_server"] == ("node2",)


def test_active_manager_killed_another_takes_over_within_3_seconds(overlay):
    observer, status = start_network(overlay, managers=3)
    assert status.manager == "manager1"
    killed = time.monotonic()
    overlay.programs["manager1"].kill()
    status = wait_status(observer, lambda s: s.manager == "manager2", timeout=3, message="manager2 active")
    assert time.monotonic() - killed <= 3
    assert "manager1" not in status.members
    assert members(status) >= {"manager2", "manager3", "node1", "node2"}
    # Exactly one active: manager3 stands by.
    assert "now the active manager" not in overlay.programs["manager3"].log()


def test_returning_manager_does_not_take_leadership_back(overlay):
    observer, _ = start_network(overlay)
    overlay.programs["manager1"].kill()
    wait_status(observer, lambda s: s.manager == "manager2", timeout=5, message="manager2 active")
    managers = []  # the active manager of every status from here on
    observer.status.on_change(lambda old, new: managers.append(new.manager))
    overlay.manager("manager1", "127.0.1.1")
    status = wait_status(observer, lambda s: "manager1" in s.members, timeout=10, message="manager1 back")
    assert status.manager == "manager2"
    # Give the returning manager every chance to misbehave, then check nothing flapped.
    overlay.programs["manager1"].wait_log("standing by; the active manager is manager2")
    assert observer.client.sync(timeout=5)  # every status the servers had sent is in
    assert managers and set(managers) == {"manager2"}
    assert "now the active manager" not in overlay.programs["manager1"].log()


def test_kill_9_of_one_event_server_no_member_leaves(overlay):
    observer, _ = start_network(overlay)
    changes = []
    observer.status.on_change(lambda old, new: changes.append(set(new.members)))
    # The status is whole as soon as each member reaches one server; the test needs every link to es1 up.
    for program in overlay.programs.values():
        program.wait_log("connected to es1")
    overlay.eventservers[0].kill()
    # Every member and manager loses one of its three links; the status must not lose anyone.
    for program in overlay.programs.values():
        program.wait_log("disconnected from es1")
    wait_for(lambda: observer.client.connected_servers == ["es2", "es3"], message="observer on es2, es3")
    assert observer.client.sync()  # whatever the managers published meanwhile has reached us
    assert all(seen >= EVERYONE for seen in changes), changes
    assert members(observer.status.status) >= EVERYONE


def test_event_servers_restarted_one_then_all_three_the_status_recovers_whole(overlay):
    """Fault: one event server of three killed and started again, then all three. While two stay
    up nobody leaves the status; once all three are back, members reconnect, publish their presence
    again and the status is whole again within the membership target (10 s)."""
    observer, _ = start_network(overlay)
    programs = list(overlay.programs.values())

    def links_to(server, count):
        return all(program.log().count(f"connected to {server}") >= count for program in programs)

    wait_for(lambda: links_to("es1", 1), message="every link to es1")
    changes = []
    observer.status.on_change(lambda old, new: changes.append(new))
    overlay.eventservers[0].kill()
    overlay.restart_eventserver(0, keepalive=1, idle_timeout=3).wait_ready()
    wait_for(lambda: links_to("es1", 2), timeout=10, message="every member back on the restarted es1")
    assert observer.client.sync()
    assert all(members(status) >= EVERYONE for status in changes), [sorted(members(s)) for s in changes]

    before = observer.status.status.version
    for server in overlay.eventservers:
        server.kill()
    wait_for(lambda: observer.client.connected_servers == [], message="observer sees every server go")
    restarted = time.monotonic()
    for index in range(3):
        overlay.restart_eventserver(index, keepalive=1, idle_timeout=3)
    for server in overlay.eventservers:
        server.wait_ready()
    status = wait_status(
        observer,
        lambda s: s.version > before and members(s) >= EVERYONE,
        timeout=20,
        message="a new, whole status after every event server restarted",
    )
    elapsed = time.monotonic() - restarted
    print(f"whole again {elapsed:.1f}s after the restart of all three event servers")
    assert elapsed <= 10
    assert status.manager == "manager1"
    versions = [status.version for status in changes]
    assert versions == sorted(versions)


def test_managers_split_between_event_servers_then_healed_converge_on_one_status(overlay):
    """Fault: two event servers, manager1 cut from es2 and manager2 from es1 (routes lost: silence,
    no reset), the nodes still on both. Each manager sees the other leave, and both are active for
    the split: a member follows the status through one server, so it sees the manager on that
    side, and its versions only grow. Healed, manager2 stands down and, with no operator action,
    every member's status from then on is manager1's and lists everyone (docs/membership.md, "A
    split between managers")."""
    overlay.start_eventservers(2, keepalive=1, idle_timeout=3)
    es1, es2 = overlay.eventservers
    to_es2, to_es1 = CuttableRelay(es2.endpoint), CuttableRelay(es1.endpoint)
    try:
        for name, address, endpoints in (
            ("manager1", "127.0.1.1", [es1.endpoint, to_es2.endpoint]),
            ("manager2", "127.0.1.2", [to_es1.endpoint, es2.endpoint]),
        ):
            servers = ", ".join(f"{host}:{port}" for host, port in endpoints)
            network = dict(overlay.network(), event_servers=servers)
            overlay.start(name, "thor.manager.main", "thor_manager", address, ThorNetwork=network)
            overlay.programs[name].wait_log("thor-manager 0.1.0 started")
        overlay.node("node1", "sip_proxy,media_relay", "127.0.0.11")
        overlay.node("node2", "sip_proxy,xcap_server", "127.0.0.12")
        observers = {
            "es1 side": overlay.observer("observer1", [es1]),
            "es2 side": overlay.observer("observer2", [es2]),
            "both": overlay.observer("observer3", [es1, es2]),
        }
        seen = {}
        for side, observer in observers.items():
            wait_status(observer, lambda s: members(s) >= EVERYONE and s.manager == "manager1", message=side)
            seen[side] = []
            observer.status.on_change(lambda old, new, side=side: seen[side].append(new))
        manager1, manager2 = overlay.programs["manager1"], overlay.programs["manager2"]

        to_es2.cut()
        to_es1.cut()
        manager2.wait_log("this manager is now the active manager", timeout=15)
        split = {"es1 side": "manager1", "es2 side": "manager2"}
        for side, manager in split.items():
            wait_status(
                observers[side],
                lambda s, manager=manager: (
                    s.manager == manager
                    and s.roles.get("thor_manager") == (manager,)
                    and {"node1", "node2"} <= members(s)
                ),
                timeout=10,
                message=f"{manager}'s status on the {side}, without the other manager",
            )

        to_es2.heal()
        to_es1.heal()
        healed = time.monotonic()
        manager2.wait_log("standing by; the active manager is manager1", timeout=15)
        for side, observer in observers.items():
            # Whole and manager1's: only after the heal (during the split, no side lists both managers).
            def whole(status):
                return status.manager == "manager1" and members(status) >= EVERYONE

            wait_status(observer, whole, timeout=15, message=f"manager1's whole status after the heal, {side}")
            assert observer.client.sync()  # what the servers hold has reached it: nothing else won
            settled = seen[side][next(index for index, status in enumerate(seen[side]) if whole(status)) :]
            assert all(whole(status) for status in settled), (
                side,
                [(s.version, s.manager, sorted(members(s))) for s in settled],
            )
            versions = [status.version for status in seen[side]]
            assert versions == sorted(versions) and len(set(versions)) == len(versions), side
        print(f"one status everywhere {time.monotonic() - healed:.1f}s after the heal")
        assert manager1.log().count("this manager is now the active manager") == 1  # it never stood down
    finally:
        to_es2.close()
        to_es1.close()


def test_status_version_only_grows(overlay):
    observer, first = start_network(overlay)
    versions = [first.version]
    observer.status.on_change(lambda old, new: versions.append(new.version))
    overlay.programs["node1"].signal(signal.SIGTERM)
    wait_status(observer, lambda s: "node1" not in s.members, message="node1 gone")
    overlay.programs["manager1"].kill()
    wait_status(observer, lambda s: s.manager == "manager2", message="failover")
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


class TcpService:
    """A real listening socket standing for the role's local service."""

    def __init__(self):
        self.port = None
        self.sock = None

    def start(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port or 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def stop(self):
        self.sock.close()


def test_health_check_withdraws_and_restores_a_role(overlay):
    overlay.start_eventservers(1)
    overlay.manager("manager1")
    service = TcpService()
    service.start()
    overlay.node(
        "node1",
        "sip_proxy,xcap_server",
        "127.0.0.11",
        checks=f"sip_proxy=none, xcap_server=tcp:127.0.0.1:{service.port}",
        check_interval=0.2,
        check_timeout=0.2,
    )
    observer = overlay.observer()
    wait_status(observer, lambda s: s.roles.get("xcap_server") == ("node1",), message="xcap announced")
    service.stop()
    status = wait_status(observer, lambda s: "xcap_server" not in s.roles, timeout=5, message="xcap withdrawn")
    assert status.roles["sip_proxy"] == ("node1",)  # the node stays, with its other role
    why = f"health check tcp:127.0.0.1:{service.port} does not answer"
    assert status.members["node1"]["withdrawn"] == {"xcap_server": why}
    # What a rollout's verification asks: the monitor names the member, the role and the check.
    monitor = overlay.monitor("--once", "--wait", "1", "--expect", "node1=sip_proxy,xcap_server")
    assert monitor.exited(30) == 4, monitor.log()
    assert f"  node1: xcap_server withdrawn: {why}" in monitor.stdout().splitlines()
    service.start()
    wait_status(observer, lambda s: s.roles.get("xcap_server") == ("node1",), timeout=5, message="xcap back")
    monitor = overlay.monitor("--once", "--wait", "10", "--expect", "node1=sip_proxy,xcap_server")
    assert monitor.exited(30) == 0, monitor.log()
    log = overlay.programs["node1"].log()
    assert "role xcap_server: tcp:127.0.0.1:" in log and "withdrawing the role" in log
    service.stop()


def test_third_party_role_by_configuration_only(overlay, pki):
    pki.ca.extra_roles = ("conference_server",)
    overlay.start_eventservers(1)
    overlay.manager("manager1")
    overlay.node("node1", "conference_server", "127.0.0.11")
    observer = overlay.observer()
    status = wait_status(observer, lambda s: "conference_server" in s.roles, message="third-party role")
    assert status.roles["conference_server"] == ("node1",)


def test_node_refuses_roles_its_certificate_does_not_grant(overlay, pki):
    overlay.start_eventservers(1)
    pki.ca.issue("node1", "sip_proxy", address="127.0.0.11")
    node = overlay.start("node1", "thor.node.main", "sip_proxy", "127.0.0.11", Node={"roles": "sip_proxy,xcap_server"})
    assert node.exited(20) == 78
    assert "does not grant xcap_server (it grants sip_proxy)" in node.log()


def test_node_says_which_of_its_ports_is_taken(overlay, pki):
    overlay.start_eventservers(1)
    pki.ca.issue("node1", "sip_proxy", address="127.0.0.11")
    with socket.socket() as taken:
        taken.bind(("127.0.0.11", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = overlay.start(
            "node1",
            "thor.node.main",
            "sip_proxy",
            "127.0.0.11",
            Node={"accounts_listen": f"127.0.0.11:{port}"},
            Lookup={"listen": f"127.0.0.11:{free_port('127.0.0.11')}"},
        )
        assert node.exited(20) == 78
    assert f"[Node] accounts_listen = 127.0.0.11:{port}: Address already in use" in node.log()
    assert "Traceback" not in node.log()


def test_database_location_is_published_without_password(overlay):
    overlay.start_eventservers(1)
    overlay.manager("manager1")
    database = TcpService()
    database.start()
    overlay.start(
        "db1",
        "thor.database.main",
        "thor_database",
        "127.0.0.20",
        Database={"host": "127.0.0.1", "port": database.port, "database": "thor", "priority": 5},
    )
    observer = overlay.observer()
    status = wait_status(observer, lambda s: "thor_database" in s.roles, message="database announced")
    assert status.attributes("db1", "thor_database") == {
        "host": "127.0.0.1",
        "port": database.port,
        "database": "thor",
        "priority": 5,
    }
    database.stop()
    status = wait_status(observer, lambda s: "thor_database" not in s.roles, timeout=10, message="database withdrawn")
    # The member stays, saying why its role is withdrawn.
    assert status.members["db1"]["withdrawn"] == {
        "thor_database": f"health check tcp:127.0.0.1:{database.port} does not answer"
    }


def test_monitor_once_prints_a_snapshot(overlay):
    start_network(overlay)
    monitor = overlay.monitor("--once")
    assert monitor.exited(30) == 0, monitor.log()
    lines = monitor.stdout().splitlines()
    assert lines[0].startswith("network status v") and "by manager1" in lines[0]
    assert any(line.split()[:3] == ["sip_proxy", "node1", "(127.0.0.11),"] for line in lines)
    assert any(line.startswith("node2") and "sip_proxy,xcap_server" in line for line in lines)


def test_monitor_says_when_certificates_and_the_crl_expire_and_check_pki_fails_within_the_warning(overlay):
    overlay.pki.ca.issue("node2", "sip_proxy,xcap_server", address="127.0.0.12", days=3)
    start_network(overlay)
    report = overlay.monitor("--once", "--json")
    assert report.exited(30) == 0, report.log()
    rows = json.loads(report.stdout())["pki"]
    named = {(row["what"], row["name"]): row["days_left"] for row in rows}
    assert named[("certificate", "node2")] == pytest.approx(3, abs=0.1)
    assert named[("certificate", "node1")] == pytest.approx(730, abs=0.1)
    assert {"es1", "es2", "es3", "manager1", "manager2"} <= {name for what, name in named if what == "certificate"}
    assert named[("crl", "the CRL")] == pytest.approx(30, abs=0.1)
    assert ("ca", "the CA certificate") in named
    assert rows[0]["name"] == "node2"  # soonest first
    check = overlay.monitor("--once", "--check-pki")
    assert check.exited(30) == 5
    assert "the certificate of node2 expires in 3.0 days: a new certificate for it" in check.log()
    assert any(line.split()[-3:] == ["certificate", "of", "node2"] for line in check.stdout().splitlines())
    assert overlay.monitor("--once", "--check-pki", "--days", "2").exited(30) == 0


def test_monitor_live_view_needs_a_terminal(overlay):
    overlay.start_eventservers(1)
    monitor = overlay.monitor()
    assert monitor.exited(30) == 78
    assert "thor-monitor: error: the live view needs a terminal; use --once" in monitor.log()


def test_sip_proxy_role_follows_kamailio(overlay, tmp_path):
    """The built-in SIP check against the real SIP proxy: OPTIONS answered -> announced; stopped -> withdrawn."""
    kamailio = Kamailio(str(tmp_path), "127.0.0.11", ("127.0.0.11", free_port("127.0.0.11")))
    kamailio.start()
    try:
        overlay.start_eventservers(1)
        overlay.manager("manager1")
        overlay.node(
            "node1",
            "sip_proxy",
            "127.0.0.11",
            checks=f"sip_proxy=sip:127.0.0.11:{kamailio.port}",
            check_interval=0.2,
            check_timeout=0.3,
        )
        observer = overlay.observer()
        wait_status(observer, lambda s: s.roles.get("sip_proxy") == ("node1",), message="sip_proxy announced")
        kamailio.stop()
        status = wait_status(observer, lambda s: "sip_proxy" not in s.roles, timeout=5, message="withdrawn")
        assert "node1" in status.members
        kamailio.start()
        wait_status(observer, lambda s: s.roles.get("sip_proxy") == ("node1",), timeout=5, message="back")
    finally:
        kamailio.stop()


def test_programs_sharing_a_host_certificate_are_told_apart(overlay, pki):
    """An event server and a manager on one host share its certificate and name; killing one keeps the other."""
    for index in (1, 2):
        pki.ca.issue(f"thor{index}", "thor_eventserver,thor_manager", address=f"127.0.2.{index}")
        server = EventServerProcess(overlay.directory, pki, f"thor{index}", keepalive=1, idle_timeout=3)
        overlay.eventservers.append(server)
    for server in overlay.eventservers:
        server.wait_ready()
    for index in (1, 2):
        overlay.start(f"thor{index}", "thor.manager.main", "thor_manager", f"127.0.2.{index}")
        overlay.programs[f"thor{index}"].wait_log("thor-manager 0.1.0 started")
    overlay.node("node1", "sip_proxy", "127.0.0.11")
    observer = overlay.observer()
    status = wait_status(
        observer,
        lambda s: s.roles.get("thor_manager") == ("thor1", "thor2") and "node1" in s.members,
        message="both hosts with both roles",
    )
    assert status.roles["thor_eventserver"] == ("thor1", "thor2")
    assert status.members["thor1"]["roles"] == ["thor_eventserver", "thor_manager"]
    assert status.manager == "thor1"
    overlay.programs["thor1"].kill()  # the manager of host thor1; its event server lives on
    status = wait_status(observer, lambda s: s.manager == "thor2", timeout=3, message="thor2 active")
    assert status.members["thor1"]["roles"] == ["thor_eventserver"]
    assert status.roles["thor_manager"] == ("thor2",)


def test_a_node_without_sip_proxy_keeps_no_account_cache_and_asks_for_nothing(overlay):
    overlay.start_eventservers(1)
    overlay.manager("manager1")
    relay = overlay.node("relay1", "media_relay", "127.0.0.21")
    observer = overlay.observer()
    wait_status(observer, lambda s: "relay1" in s.roles.get("media_relay", ()), message="relay1 a media_relay")
    relay.wait_log("the certificate grants no sip_proxy: the account cache stays empty")
    assert observer.client.sync(timeout=5)
    assert "forbidden" not in relay.log()  # it subscribed to nothing the event servers refuse
