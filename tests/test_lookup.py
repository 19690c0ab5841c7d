"""The lookup interface of real thor-node processes in an overlay, and the thor command-line client."""

import json
import socket
import subprocess

import pytest

from thor.lookup.client import LookupClient
from thor.lookup.table import LookupTable
from thor.loopback.network import Overlay, wait_status
from thor.loopback.process import python_command, wait_for

NODES = {"node1": "127.0.3.1", "node2": "127.0.3.2", "node3": "127.0.3.3"}
KEYS = [f"subscriber{index}@example.com" for index in range(600)]


@pytest.fixture
def network(tmp_path, pki):
    overlay = Overlay(str(tmp_path), pki)
    overlay.start_eventservers(2)
    overlay.manager("manager1")
    for name, address in NODES.items():
        overlay.node(name, "sip_proxy", address)
    observer = overlay.observer()
    yield overlay, observer
    overlay.close()


def owners(endpoint, keys=KEYS):
    with LookupClient(*endpoint) as client:
        return client.query(*(f"lookup sip_proxy for {key}" for key in keys))


def version_of(endpoint):
    with LookupClient(*endpoint) as client:
        return int(client.query("version")[0])


def wait_all_on(overlay, version):
    for name in NODES:
        if overlay.programs[name].process.poll() is None:
            endpoint = overlay.programs[name].lookup
            wait_for(lambda e=endpoint: version_of(e) >= version, timeout=10, message=f"{name} on status {version}")


def thor(*args):
    return subprocess.run(python_command("thor.cli.lookup", *args), capture_output=True, text=True, timeout=30)


def test_nodes_agree_on_owners_and_only_a_stopped_nodes_keys_move(network):
    overlay, observer = network
    status = wait_status(observer, lambda s: len(s.addresses("sip_proxy")) == 3, message="3 sip_proxy nodes")
    wait_all_on(overlay, status.version)
    answers = {name: owners(overlay.programs[name].lookup) for name in NODES}
    assert answers["node1"] == answers["node2"] == answers["node3"]
    table = LookupTable.from_status(status)
    assert answers["node1"] == [table.lookup("sip_proxy", key) for key in KEYS]
    assert set(answers["node1"]) == set(NODES.values())

    overlay.programs["node3"].stop()
    status = wait_status(observer, lambda s: len(s.addresses("sip_proxy")) == 2, message="node3 gone")
    wait_all_on(overlay, status.version)
    after = {name: owners(overlay.programs[name].lookup) for name in ("node1", "node2")}
    assert after["node1"] == after["node2"]
    for before, now in zip(answers["node1"], after["node1"], strict=True):
        if before == NODES["node3"]:
            assert now != NODES["node3"]
        else:
            assert now == before  # only node3's keys moved


def test_the_command_line_client(network):
    overlay, observer = network
    status = wait_status(observer, lambda s: len(s.addresses("sip_proxy")) == 3, message="3 sip_proxy nodes")
    wait_all_on(overlay, status.version)
    host, port = overlay.programs["node2"].lookup
    server = f"--server={host}:{port}"
    expected = LookupTable.from_status(status).lookup("sip_proxy", "alice@example.com")

    result = thor(server, "lookup", "sip_proxy", "sip:Alice@example.com")
    assert (result.returncode, result.stdout) == (0, f"{expected}\n")
    result = thor(server, "--json", "lookup", "sip_proxy", "alice@example.com")
    assert json.loads(result.stdout) == {"role": "sip_proxy", "key": "alice@example.com", "node": expected}
    result = thor(server, "is-online", NODES["node1"], "sip_proxy")
    assert (result.returncode, result.stdout) == (0, "Yes\n")
    result = thor(server, "is-online", "192.0.2.1", "sip_proxy")
    assert (result.returncode, result.stdout) == (1, "No\n")
    result = thor(server, "--json", "status")
    body = json.loads(result.stdout)
    assert body["version"] >= status.version
    assert body["roles"]["sip_proxy"] == sorted(NODES.values())
    result = thor(server, "lookup", "media_relay", "alice@example.com")
    assert result.returncode == 1
    assert "no-members no live member has the role media_relay" in result.stderr
    result = thor(server, "lookup", "sip_proxy", "alice")
    assert result.returncode == 1 and "bad-key" in result.stderr
    result = thor("--server=127.0.0.1:1", "status")
    assert result.returncode == 69
    assert "cannot reach the lookup interface at 127.0.0.1:1" in result.stderr


def test_a_taken_lookup_port_is_a_one_line_startup_error(tmp_path, pki):
    overlay = Overlay(str(tmp_path), pki)
    try:
        overlay.start_eventservers(1)
        first = overlay.node("node1", "sip_proxy", "127.0.3.1")
        first.wait_log("lookup interface listening")
        second = overlay.node("node2", "sip_proxy", "127.0.3.2", lookup={"listen": "{}:{}".format(*first.lookup)})
        assert second.exited(20) == 78
        assert f"[Lookup] listen = {first.lookup[0]}:{first.lookup[1]}: Address already in use" in second.log()
    finally:
        overlay.close()


def test_a_node_answers_lookups_only_once_it_has_a_network_status(tmp_path, pki):
    """A node just (re)started has no status yet: a lookup waits for it (accepted once it has
    one) rather than getting "error no-status", which a rolling restart would hand to clients."""
    overlay = Overlay(str(tmp_path), pki)
    try:
        overlay.start_eventservers(1)
        node = overlay.node("node1", "sip_proxy", NODES["node1"])
        node.wait_log("lookup interface listening")
        with socket.create_connection(node.lookup, timeout=30) as connection:
            connection.sendall(b"lookup sip_proxy for alice@example.com\r\n")
            overlay.manager("manager1")  # the first status comes from here
            reply = connection.makefile("rb").readline()
        assert reply == f"{NODES['node1']}\r\n".encode()
    finally:
        overlay.close()
