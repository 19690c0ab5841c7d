"""NGNPro with zeep as the SOAP client: a real PostgreSQL found through thor-database, real nodes."""

import contextlib
import json
import re
import resource
import socket
import threading
import time

import psycopg2
import pytest
import requests
import zeep
import zeep.exceptions
import zeep.transports
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from thor.accounts.protocol import ACCOUNTS_WANTED, accounts_topic
from thor.events.topics import ForbiddenError, authorize_publish, authorize_subscribe
from thor.identity import Identity
from thor.lookup.table import LookupTable
from thor.loopback.network import Overlay, Recorder, event_client, wait_status
from thor.loopback.ngnpro import (
    DOMAIN,
    NGNPRO_ADDRESS,
    NODE_ADDRESSES,
    PASSWORD,
    CacheReader,
    Network,
    Soap,
    account,
    cached,
    ha1,
    node_at,
    owner,
    soap_client,
)
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import free_port, wait_for
from thor.membership.member import OverlayMember
from thor.ngnpro.throttle import LoginThrottle


@pytest.fixture
def postgresql():
    database = PostgreSQL()
    yield database
    database.remove()


@pytest.fixture
def network(tmp_path, pki, postgresql):
    built = Network(str(tmp_path), pki, postgresql)
    yield built
    built.close()


def fault_code(call, *args):
    with pytest.raises(zeep.exceptions.Fault) as fault:
        call(*args)
    return fault.value.code.split(":")[-1] if fault.value.code else None


def test_the_wsdl_has_both_ports_and_calls_need_the_login(network):
    soap = network.client()
    services = {service.name: service for service in soap.client.wsdl.services.values()}
    assert set(services) == {"SipPort", "NetworkPort"}
    operations = set(services["SipPort"].ports["SipPort"].binding._operations)
    assert {"addAccount", "updateAccount", "deleteAccount", "getAccount", "getAccounts", "addDomain"} <= operations
    assert {"getStatus", "getStatistics"} == set(services["NetworkPort"].ports["NetworkPort"].binding._operations)
    # Plain text on the HTTPS port, and a path that is not the API: one log line, a 404, no harm.
    with socket.create_connection((NGNPRO_ADDRESS, network.port), timeout=5) as garbage:
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        with contextlib.suppress(OSError):  # closed or reset: either way refused
            garbage.recv(1024)
    session = requests.Session()
    session.verify, session.trust_env = network.pki.ca.ca_certificate_path, False
    assert session.get(f"https://{NGNPRO_ADDRESS}:{network.port}/other", timeout=5).status_code == 404
    network.ngnpro.wait_log("TLS handshake failed")
    assert "Traceback" not in network.ngnpro.log()
    intruder = Soap(soap.client, password="wrong-password")
    assert fault_code(intruder.getDomains) == "Client.Unauthorized"
    assert soap.getDomains() in (None, [])


def test_failed_logins_are_logged_and_a_guessing_address_is_refused_unchecked(network):
    soap = network.client()
    assert soap.getDomains() in (None, [])
    guesser = Soap(soap.client, username="root", password="guess-number-n")
    assert [fault_code(guesser.getDomains) for _ in range(5)] == ["Client.Unauthorized"] * 5
    network.ngnpro.wait_log("failed login from 127.0.0.1 (user 'root'): refusing 127.0.0.1 for 300 s")
    assert network.ngnpro.log().count("failed login from 127.0.0.1 (user 'root')") == 5
    # Refused from that address, the right password too: it is not even checked.
    assert fault_code(soap.getDomains) == "Client.Throttled"


def test_a_strangers_idle_connections_keep_no_provisioning_system_out(network):
    """1,100 idle connections (no TLS hello) from one address used to take all 1,000 of NGNPro's
    slots for its 10 s handshake timeout while a provisioning system waited in the backlog. Now
    one address holds 64 at most; the rest are closed at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    flood = []
    try:
        for _ in range(1100):
            stranger = socket.socket()
            stranger.bind(("127.0.0.99", 0))
            stranger.connect((NGNPRO_ADDRESS, network.port))
            flood.append(stranger)
        session = requests.Session()
        session.verify, session.trust_env = network.pki.ca.ca_certificate_path, False
        # Answered before the strangers' handshakes time out (10 s).
        wsdl = session.get(f"https://{NGNPRO_ADDRESS}:{network.port}/ngnpro/wsdl", timeout=5)
        assert wsdl.status_code == 200 and b"SipPort" in wsdl.content
        network.ngnpro.wait_log("refused a connection from 127.0.0.99: it has 64 connections under way already")
    finally:
        for stranger in flood:
            stranger.close()


def test_a_login_throttle_counts_per_address_within_its_window_and_forgets_the_oldest():
    now = [0.0]
    throttle = LoginThrottle(failures=3, window=10.0, penalty=60.0, max_sources=2, clock=lambda: now[0])
    assert [throttle.failed("192.0.2.1") for _ in range(2)] == [False, False]
    now[0] = 11.0  # those two are out of the window
    assert [throttle.failed("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert throttle.blocked_for("192.0.2.1") == 60.0 and throttle.blocked_for("192.0.2.2") == 0.0
    now[0] = 41.0
    assert throttle.blocked_for("192.0.2.1") == 30.0
    throttle.failed("192.0.2.2")
    throttle.failed("192.0.2.3")  # three addresses, room for two: the least recently seen goes
    assert throttle.blocked_for("192.0.2.1") == 0.0
    now[0] = 71.0
    assert throttle.blocked_for("192.0.2.1") == 0.0


@pytest.mark.parametrize("first", ["thor-database", "ngnpro"])
def test_ngnpro_reaches_the_database_that_its_own_host_publishes(tmp_path, pki, postgresql, first):
    """thor-database and ngnpro on one host share its certificate and name, each with its own port
    attribute; whichever starts first, ngnpro reads the database's port, not its own."""
    postgresql.create_database("thor")
    overlay = Overlay(str(tmp_path), pki)
    try:
        overlay.start_eventservers(1)
        overlay.manager("manager1")
        observer = overlay.observer()
        pki.ca.issue("db1", "thor_database,provisioning_server", address=NGNPRO_ADDRESS)
        port = free_port(NGNPRO_ADDRESS)
        starts = {
            "thor-database": lambda: overlay.start(
                "db1-database",
                "thor.database.main",
                None,
                NGNPRO_ADDRESS,
                certificate="db1",
                Database={"host": "127.0.0.1", "port": postgresql.port, "database": "thor"},
            ),
            "ngnpro": lambda: overlay.start(
                "db1-ngnpro",
                "thor.ngnpro.main",
                None,
                NGNPRO_ADDRESS,
                certificate="db1",
                NGNPro={
                    "listen": f"{NGNPRO_ADDRESS}:{port}",
                    "password": PASSWORD,
                    "database_user": "postgres",
                    "database_sslrootcert": postgresql.ca,
                },
            ),
        }
        second = "ngnpro" if first == "thor-database" else "thor-database"
        role = {"thor-database": "thor_database", "ngnpro": "provisioning_server"}
        starts[first]()
        wait_status(observer, lambda s: "db1" in s.roles.get(role[first], ()), message=f"{first} announced")
        starts[second]()
        wait_status(
            observer,
            lambda s: "db1" in s.roles.get("thor_database", ()) and "db1" in s.roles.get("provisioning_server", ()),
            message="both programs of db1 announced",
        )
        soap = soap_client(pki, NGNPRO_ADDRESS, port)  # waits until ngnpro reaches the database
        soap.addDomain(DOMAIN)
        assert soap.getDomains() == [DOMAIN]
    finally:
        overlay.close()


def test_ngnpro_takes_calls_only_once_it_has_a_network_status(tmp_path, pki, postgresql):
    """Just (re)started, ngnpro knows no database until the first network status: a call would
    get DatabaseUnavailable. It accepts connections only once it has a status (a client waits,
    or tries the other provisioning server), then takes changes at once."""
    postgresql.create_database("thor")
    overlay = Overlay(str(tmp_path), pki)
    try:
        overlay.start_eventservers(1)
        overlay.start(
            "database1",
            "thor.database.main",
            "thor_database",
            "127.0.4.2",
            Database={"host": "127.0.0.1", "port": postgresql.port, "database": "thor"},
        )
        port = free_port(NGNPRO_ADDRESS)
        settings = {"listen": f"{NGNPRO_ADDRESS}:{port}", "password": PASSWORD, "database_user": "postgres"}
        ngnpro = overlay.start(
            "ngnpro1",
            "thor.ngnpro.main",
            "provisioning_server",
            NGNPRO_ADDRESS,
            NGNPro=dict(settings, database_sslrootcert=postgresql.ca),
        )
        ngnpro.wait_log("SOAP/XML interface on")
        session = requests.Session()
        session.verify = pki.ca.ca_certificate_path
        session.trust_env = False
        with pytest.raises(requests.exceptions.Timeout):
            session.get(f"https://{NGNPRO_ADDRESS}:{port}/ngnpro/wsdl", timeout=2)
        overlay.manager("manager1")  # the first status comes from here
        soap = soap_client(pki, NGNPRO_ADDRESS, port)
        soap.addDomain(DOMAIN)  # no DatabaseUnavailable: the database was announced by then
        assert soap.getDomains() == [DOMAIN]
    finally:
        overlay.close()


def test_domains_accounts_and_aliases_with_clear_faults(network):
    network.start_node("node1")
    soap = network.client()
    before = network.ngnpro.scrape()
    assert fault_code(soap.addAccount, account("alice")) == "Client.NotFound"  # no domain yet
    soap.addDomain(DOMAIN)
    # Each call counted under its operation and outcome, and timed.
    after = network.ngnpro.scrape()
    calls = "thor_ngnpro_calls_total"
    for operation, outcome in (("addAccount", "Client.NotFound"), ("addDomain", "ok")):
        count_before = before.value(calls, operation=operation, outcome=outcome) or 0
        assert after.value(calls, operation=operation, outcome=outcome) == count_before + 1, (operation, outcome)
    seconds = after.value("thor_ngnpro_call_seconds_count", operation="addDomain")
    assert seconds == (before.value("thor_ngnpro_call_seconds_count", operation="addDomain") or 0) + 1
    assert after.value("thor_ngnpro_pushes_total") == before.value("thor_ngnpro_pushes_total") + 1
    assert after.value("thor_ngnpro_active") == 1
    assert fault_code(soap.addDomain, DOMAIN) == "Client.Conflict"
    assert fault_code(soap.addDomain, "not a domain") == "Client.InvalidInput"
    soap.addAccount(account("alice", firstName="Alice", email="alice@example.org"))
    # Committed before acknowledged: the row is there the moment the call returns.
    with psycopg2.connect(network.postgresql.dsn("thor")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT ha1 FROM ngnpro_accounts WHERE username = 'alice'")
        assert cursor.fetchone() == (ha1("alice", "a-good-password"),)
    assert fault_code(soap.addAccount, account("alice")) == "Client.Conflict"
    assert fault_code(soap.addAccount, account("bob", password="short")) == "Client.InvalidInput"
    assert fault_code(soap.addAccount, account("Bad Name")) == "Client.InvalidInput"
    assert fault_code(soap.addDomain, "exa\n.com") == "Client.InvalidInput"  # no line break slips through
    long_domain = ".".join(["d" * 63] * 3) + ".com"  # 195 characters: a domain, but with
    soap.addDomain(long_domain)  # a 64-character user, longer than a subscriber address may be
    assert fault_code(soap.addAccount, {**account("u" * 64), "id": {"username": "u" * 64, "domain": long_domain}}) == (
        "Client.InvalidInput"
    )
    soap.deleteDomain(long_domain)
    assert fault_code(soap.getAccounts, DOMAIN, 10, 2**40) == "Client.InvalidInput"
    got = soap.getAccount({"username": "alice", "domain": DOMAIN})
    assert (got.firstName, got.email, got.enabled, got.password) == ("Alice", "alice@example.org", True, None)
    assert got.ha1 == ha1("alice", "a-good-password")
    soap.updateAccount({"id": {"username": "alice", "domain": DOMAIN}, "lastName": "Liddell", "enabled": False})
    got = soap.getAccount({"username": "alice", "domain": DOMAIN})
    assert (got.firstName, got.lastName, got.enabled) == ("Alice", "Liddell", False)
    soap.changePassword({"username": "alice", "domain": DOMAIN}, "another-password")
    assert soap.getAccount({"username": "alice", "domain": DOMAIN}).ha1 == ha1("alice", "another-password")
    soap.addAccount(account("bob"))
    assert [a.id.username for a in soap.getAccounts(DOMAIN, 10, 0)] == ["alice", "bob"]
    soap.addAlias({"id": {"username": "ally", "domain": DOMAIN}, "target": {"username": "alice", "domain": DOMAIN}})
    assert fault_code(soap.addAccount, account("ally")) == "Client.Conflict"  # the name is an alias
    assert [alias.username for alias in soap.getAliases({"username": "alice", "domain": DOMAIN})] == ["ally"]
    assert fault_code(soap.deleteDomain, DOMAIN) == "Client.Conflict"
    soap.deleteAccount({"username": "alice", "domain": DOMAIN})  # takes its alias along
    assert fault_code(soap.getAccount, {"username": "alice", "domain": DOMAIN}) == "Client.NotFound"
    assert soap.getAliases({"username": "alice", "domain": DOMAIN}) in (None, [])
    soap.deleteAccount({"username": "bob", "domain": DOMAIN})
    soap.deleteDomain(DOMAIN)
    assert soap.getDomains() in (None, [])


def test_each_change_reaches_the_responsible_node_only(network):
    network.start_nodes("node1", "node2", "node3")
    soap = network.client()
    soap.addDomain(DOMAIN)
    keys = [f"user{index}@{DOMAIN}" for index in range(30)]
    for key in keys:
        soap.addAccount(account(key.split("@")[0]))
    for key in keys:
        home = node_at(network, owner(network, key))
        wait_for(lambda k=key, n=home: cached(n, k), timeout=10, message=f"{key} cached on its owner")
        others = [node for node in network.nodes.values() if node is not home]
        assert all(cached(node, key) is None for node in others)
    key = keys[0]
    home = node_at(network, owner(network, key))
    soap.changePassword({"username": "user0", "domain": DOMAIN}, "changed-password")
    wait_for(lambda: cached(home, key)["ha1"] == ha1("user0", "changed-password"), message="new ha1 cached")
    soap.deleteAccount({"username": "user0", "domain": DOMAIN})
    wait_for(lambda: cached(home, key) is None, message="deletion reaches the owner")


def test_the_account_cache_interface_for_the_sip_proxy(network):
    network.start_nodes("node1")
    node = network.nodes["node1"]
    soap = network.client()
    soap.addDomain(DOMAIN)
    soap.addAccount(account("alice", "alices-password"))
    soap.addAccount(account("dave", enabled=False))
    soap.addAlias({"id": {"username": "ally", "domain": DOMAIN}, "target": {"username": "alice", "domain": DOMAIN}})
    reader = CacheReader(node)
    try:
        wait_for(lambda: reader.get("/accounts") == (200, '{"accounts":2,"aliases":1}'), message="all three cached")
        assert reader.get(f"/accounts/alice@{DOMAIN}/ha1") == (200, ha1("alice", "alices-password"))
        assert reader.get(f"/accounts/sip:Alice@{DOMAIN.upper()}/ha1")[0] == 200  # keys are normalized
        record = json.loads(reader.get(f"/accounts/alice@{DOMAIN}")[1])
        assert (record["kind"], record["username"], record["enabled"]) == ("account", "alice", True)
        assert "password" not in record  # only digests are kept anywhere
        assert json.loads(reader.get(f"/accounts/ally@{DOMAIN}")[1])["kind"] == "alias"
        assert reader.get(f"/accounts/ally@{DOMAIN}/ha1")[0] == 404  # an alias has no credentials
        assert reader.get(f"/accounts/dave@{DOMAIN}/ha1")[0] == 403  # disabled
        assert reader.get(f"/accounts/nobody@{DOMAIN}")[0] == 404
        for path, code in [
            ("/accounts/not-a-key", 400),
            (f"/accounts/alice@{DOMAIN}/password", 404),
            ("/other", 404),
        ]:
            answer = reader.get(path)
            assert answer[0] == code and json.loads(answer[1])["error"], answer
        assert reader.get("/accounts", method="POST")[0] == 405
    finally:
        reader.close()
    assert "Traceback" not in node.log()


def test_database_down_is_a_fault_and_nothing_is_acknowledged(network):
    soap = network.client()
    soap.addDomain(DOMAIN)
    errors = network.ngnpro.scrape().value("thor_ngnpro_database_errors_total")
    network.postgresql.stop()
    try:
        assert fault_code(soap.addAccount, account("carol")) == "Server.DatabaseUnavailable"
        assert network.ngnpro.scrape().value("thor_ngnpro_database_errors_total") > errors
    finally:
        network.postgresql.start()
    wait_for(lambda: _added(soap, "carol"), timeout=20, message="provisioning again once PostgreSQL is back")
    assert network.ngnpro.process.poll() is None


def test_thor_database_restarted_keeps_no_change_out_for_its_grace(network):
    """thor-database only announces the database: restarted (a rolling upgrade), the database
    stays where it was, and NGNPro keeps taking changes. Once the announcement has been missing
    for [NGNPro] database_grace seconds, changes are refused as before."""
    soap = network.client()
    soap.addDomain(DOMAIN)
    brief_port = free_port(NGNPRO_ADDRESS)
    network.start_ngnpro("ngnpro2", NGNPRO_ADDRESS, brief_port, database_grace=1)
    brief = network.client(port=brief_port)
    network.database.kill()
    network.status(lambda s: "thor_database" not in s.roles, "thor-database gone from the status")
    soap.addAccount(account("dave"))  # within ngnpro1's 30 s
    attempts = iter(range(1000))
    wait_for(
        lambda: _refused(brief, f"erin{next(attempts)}"),
        timeout=10,
        message="ngnpro2 refusing changes once its 1 s of grace are over",
    )
    network.database = network.start_database()
    network.status(lambda s: "thor_database" in s.roles, "thor-database back")
    wait_for(lambda: _added(brief, "erin"), timeout=20, message="ngnpro2 taking changes again")
    assert {entry.id.username for entry in soap.getAccounts(DOMAIN)} >= {"dave", "erin"}


def test_a_frozen_database_is_a_fault_in_bounded_time_not_a_hang(network):
    """PostgreSQL frozen (SIGSTOP: its kernel still accepts and acknowledges): pooled and new
    connections alike give up within [NGNPro] statement_timeout and the dead peer time, and the
    call is a fault, not a hang."""
    soap = network.client()
    soap.addDomain(DOMAIN)
    soap.addAccount(account("frank"))  # a pooled connection to the database that will freeze
    network.postgresql.freeze()
    try:
        started = time.monotonic()
        assert fault_code(soap.addAccount, account("grace")) == "Server.DatabaseUnavailable"
        assert time.monotonic() - started < 30
    finally:
        network.postgresql.freeze(False)
    wait_for(lambda: _added(soap, "grace"), timeout=30, message="provisioning again once PostgreSQL thaws")


def test_a_lock_timeout_is_a_fault_and_the_connections_stay(network):
    soap = network.client()
    soap.addDomain(DOMAIN)
    soap.addAccount(account("erin"))
    with psycopg2.connect(network.postgresql.dsn("thor")) as locker, locker.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = 'thor' AND pid <> pg_backend_pid()")
        before = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT 1 FROM ngnpro_accounts WHERE username = 'erin' FOR UPDATE")  # held until the end
        with pytest.raises(zeep.exceptions.Fault) as fault:
            soap.changePassword({"username": "erin", "domain": DOMAIN}, "waits-for-the-lock")
        assert fault.value.code.endswith("Server.DatabaseUnavailable")
        assert "refused" in fault.value.message and "lock" in fault.value.message
        locker.rollback()
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = 'thor' AND pid <> pg_backend_pid()")
        assert before <= {row[0] for row in cursor.fetchall()}  # ngnpro kept its connections
    soap.changePassword({"username": "erin", "domain": DOMAIN}, "after-the-lock")
    assert soap.getAccount({"username": "erin", "domain": DOMAIN}).ha1 == ha1("erin", "after-the-lock")


def _refused(soap, username):
    """Whether adding username is refused with Server.DatabaseUnavailable (any other fault fails)."""
    try:
        soap.addAccount(account(username))
    except zeep.exceptions.Fault as fault:
        assert fault.code.endswith("Server.DatabaseUnavailable"), fault.code
        return True
    return False


def _added(soap, username):
    try:
        soap.addAccount(account(username))
    except zeep.exceptions.Fault as fault:
        if fault.code and fault.code.endswith("DatabaseUnavailable"):
            return False
        raise
    return True


def test_two_ngnpro_share_the_database_and_either_serves_the_nodes(network):
    """Several NGNPro may run: each takes changes; the eldest live one answers the nodes'
    requests for their accounts, and when it crashes the other does."""
    network.start_nodes("node1")
    second_port = free_port("127.0.4.3")
    second = network.start_ngnpro("ngnpro2", "127.0.4.3", second_port)
    network.status(lambda s: "ngnpro2" in s.members, "ngnpro2 announced")
    soap = network.client("127.0.4.3", second_port)
    soap.addDomain(DOMAIN)
    keys = [f"shared{index}@{DOMAIN}" for index in range(40)]
    for key in keys:
        soap.addAccount(account(key.split("@")[0]))
    wait_for(lambda: all(cached(network.nodes["node1"], key) for key in keys), message="node1 has every account")
    first = network.client()
    assert first.getAccount({"username": "shared0", "domain": DOMAIN}).id.username == "shared0"
    # Both change one account at once: its owner ends up with what the database holds.
    changers = [
        threading.Thread(target=change_password_repeatedly, args=(client, "shared0", tag, 30))
        for client, tag in ((first, "one"), (soap, "two"))
    ]
    for thread in changers:
        thread.start()
    wait_for(lambda: not any(thread.is_alive() for thread in changers), timeout=60, message="both done")
    final = first.getAccount({"username": "shared0", "domain": DOMAIN}).ha1
    assert final in {ha1("shared0", f"{tag}-password-29") for tag in ("one", "two")}
    wait_for(lambda: cached(network.nodes["node1"], keys[0])["ha1"] == final, message="the last change cached")
    network.ngnpro.kill()  # the eldest, so far the one that answers the nodes' requests
    network.status(lambda s: "ngnpro1" not in s.members, "ngnpro1 gone")
    network.start_nodes("node2")  # its accounts were published before it joined: only a load brings them

    def on_their_owners():
        return all(cached(node_at(network, owner(network, key)), key) for key in keys)

    assert any(owner(network, key) == NODE_ADDRESSES["node2"] for key in keys)
    wait_for(on_their_owners, timeout=30, interval=0.5, message="node2 loaded its accounts from ngnpro2")
    assert all(
        cached(network.nodes["node1"], key) is None for key in keys if owner(network, key) != NODE_ADDRESSES["node1"]
    )
    second.wait_log("entries to node2")
    assert "Traceback" not in second.log()


def test_a_member_asking_for_another_nodes_accounts_gets_nothing(network):
    network.start_nodes("node1")
    soap = network.client()
    soap.addDomain(DOMAIN)
    soap.addAccount(account("alice"))
    wait_for(lambda: cached(network.nodes["node1"], f"alice@{DOMAIN}"), message="alice cached on node1")
    # A live sip_proxy member (its certificate grants the role) that asks for node1's address.
    rogue_client = event_client(network.pki, "rogue", "sip_proxy", network.overlay.eventservers, address="127.0.4.99")
    rogue = OverlayMember(rogue_client, "rogue", "127.0.4.99", roles=["sip_proxy"])
    rogue.start()
    try:
        network.status(lambda s: "127.0.4.99" in s.addresses("sip_proxy"), "rogue a live sip_proxy")
        answers = Recorder()
        rogue_client.subscribe(accounts_topic("rogue"), answers)
        assert rogue_client.sync(timeout=5)
        version = network.observer.status.status.version
        body = {"name": "rogue", "address": NODE_ADDRESSES["node1"], "request": "r1", "ring": version}
        rogue_client.publish(ACCOUNTS_WANTED, body)
        network.ngnpro.wait_log("rogue is not a live sip_proxy at 127.0.4.11; not answering")
        assert rogue_client.sync(timeout=5) and answers.messages == []
    finally:
        rogue_client.stop(flush_timeout=0)


def test_members_asking_with_a_ring_that_never_comes_keep_no_node_from_its_accounts(network):
    """Two members (sip_proxy certificates) ask for their accounts with a status version that never
    comes. They used to hold both load slots for the 10 s of the ring wait while every other node
    waited; now the wait takes no slot, and node1 is answered before theirs run out."""
    soap = network.client()
    soap.addDomain(DOMAIN)
    soap.addAccount(account("alice"))
    rogues = []
    try:
        for name in ("rogue1", "rogue2"):
            client = event_client(network.pki, name, "sip_proxy", network.overlay.eventservers)
            rogues.append(client)
            client.publish(ACCOUNTS_WANTED, {"name": name, "address": "127.0.4.99", "request": "r", "ring": 10**15})
            assert client.sync(timeout=5)
        network.start_nodes("node1")
        network.ngnpro.wait_log("entries to node1", timeout=20)
        assert "no ring of status 1000000000000000 yet" not in network.ngnpro.log()
        wait_for(lambda: cached(network.nodes["node1"], f"alice@{DOMAIN}"), message="alice cached on node1")
        network.ngnpro.wait_log("no ring of status 1000000000000000 yet", timeout=20)  # and theirs were not answered
    finally:
        for client in rogues:
            client.stop(flush_timeout=0)


def change_password_repeatedly(client, username, tag, count):
    for index in range(count):
        client.changePassword({"username": username, "domain": DOMAIN}, f"{tag}-password-{index}")


def test_oversized_and_hostile_xml_is_refused_and_ngnpro_goes_on(network):
    soap = network.client()
    session = requests.Session()
    session.verify, session.trust_env = network.pki.ca.ca_certificate_path, False
    url = f"https://{NGNPRO_ADDRESS}:{network.port}/ngnpro"
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"getDomains"'}
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10 if n > 1 else "&lol;" * 10}">' for n in range(1, 10))
        + ']><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
        '<getDomains xmlns="urn:AGProjects:NGNPro:SipPort">&lol9;</getDomains></soap:Body></soap:Envelope>'
    )
    for body, code in [
        (b"<x>" + b"a" * (2 << 20) + b"</x>", "Client.RequestTooLong"),  # over 1 MiB
        (laughs.encode(), "Client.XMLSyntaxError"),  # entities would make it 3 GB
        (b"<not-closed", "Client.XMLSyntaxError"),
    ]:
        started = time.monotonic()
        answer = session.post(url, data=body, headers=headers, timeout=30)
        assert time.monotonic() - started < 10
        assert answer.status_code == 500 and f"<faultcode>soap11env:{code}</faultcode>" in answer.text, answer.text
        assert "lollollol" not in answer.text  # entities are not expanded
    assert soap.getDomains() in (None, [])  # and the next call is served
    assert network.ngnpro.process.poll() is None


FAULT_CODE = re.compile(r"<faultcode>soap11env:([\w.]+)</faultcode>")
# What a body's elements may be turned into: text of any kind, numbers, nothing, or markup.
ODD_VALUES = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=80),  # what XML can carry
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "true", "NaN", "-0", "1e999", "a" * 300, "<x>", "&amp;"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_well_formed_but_wrong_typed_soap_bodies_get_a_client_fault_and_ngnpro_goes_on(network, data):
    """Fuzz: a valid call's body with its values replaced by text, numbers or markup, elements
    dropped or added. NGNPro answers it or refuses it with a Client fault (never a Server one:
    no exception escapes), and keeps serving."""
    soap = network.client()
    operation, args = data.draw(
        st.sampled_from(
            [
                ("addDomain", (DOMAIN,)),
                ("addAccount", (account("fuzz"),)),
                ("getAccount", ({"username": "fuzz", "domain": DOMAIN},)),
                ("changePassword", ({"username": "fuzz", "domain": DOMAIN}, "another-password")),
                ("deleteAccount", ({"username": "fuzz", "domain": DOMAIN},)),
            ]
        ),
        label="operation",
    )
    envelope = soap.client.create_message(soap.sip, operation, *args, _soapheaders=[soap.header])
    body = envelope.find("{http://schemas.xmlsoap.org/soap/envelope/}Body")
    elements = list(body.iter())[1:]  # the operation's element and everything in it
    for element in data.draw(st.lists(st.sampled_from(elements), min_size=1, max_size=4, unique=True), label="at"):
        change = data.draw(st.sampled_from(["text", "drop", "child"]), label="change")
        if change == "drop" and element.getparent() is not None and element is not elements[0]:
            element.getparent().remove(element)
        elif change == "child":
            etree.SubElement(element, element.tag).text = data.draw(ODD_VALUES, label="child text")
        else:
            element.text = data.draw(ODD_VALUES, label="text")
    payload = etree.tostring(envelope, xml_declaration=True, encoding="utf-8")
    answer = requests.post(
        f"https://{NGNPRO_ADDRESS}:{network.port}/ngnpro",
        data=payload,
        headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{operation}"'},
        verify=network.pki.ca.ca_certificate_path,
        timeout=30,
    )
    if answer.status_code != 200:
        fault = FAULT_CODE.search(answer.text)
        assert answer.status_code == 500 and fault, answer.text[:500]
        assert fault.group(1).startswith("Client"), answer.text[:500]
    assert network.ngnpro.process.poll() is None


def test_status_and_usage_statistics_from_the_nodes(network):
    network.start_nodes("node1", "node2")
    soap = network.client()
    status = soap.getStatus()
    assert status.version >= 1 and status.manager == "manager1"
    names = {member.name for member in status.members.Member}
    assert {"manager1", "database1", "ngnpro1", "node1", "node2"} <= names
    soap.addDomain(DOMAIN)
    soap.addAccount(account("dave"))
    home = owner(network, f"dave@{DOMAIN}")

    def reported():
        statistics = {node.name: node for node in soap.getStatistics() or []}
        if set(statistics) != {"node1", "node2"}:
            return None
        return statistics if sum(node.accounts for node in statistics.values()) == 1 else None

    statistics = wait_for(reported, timeout=30, interval=0.5, message="usage of both nodes")
    assert {node.address: node.accounts for node in statistics.values()}[home] == 1


def test_10000_accounts_while_nodes_join_and_leave(network):
    """Every account readable from its current owner, none lost, none stale, the deleted ones nowhere."""
    network.start_nodes("node1", "node2", "node3")
    soap = network.client()
    soap.addDomain(DOMAIN)
    total = 10000
    passwords = {}
    deleted = set()
    errors = []
    progress = [0]

    clients = [network.client() for _ in range(8)]

    def provision(worker, workers):
        client = clients[worker]
        for index in range(worker, total, workers):
            username = f"sub{index}"
            try:
                client.addAccount(account(username, password=f"password-{index}"))
                passwords[username] = f"password-{index}"
                if index % 10 == 0:  # some accounts change again while the ring moves
                    client.changePassword({"username": username, "domain": DOMAIN}, f"changed-{index}")
                    passwords[username] = f"changed-{index}"
                if index % 50 == 25:  # and some go again
                    client.deleteAccount({"username": username, "domain": DOMAIN})
                    del passwords[username]
                    deleted.add(username)
            except Exception as error:
                errors.append(f"{username}: {error}")
            progress[0] += 1

    workers = [threading.Thread(target=provision, args=(worker, 8)) for worker in range(8)]
    for thread in workers:
        thread.start()
    churn = [(2500, "start", "node4"), (5000, "stop", "node2"), (7500, "start", "node5")]
    for threshold, action, name in churn:
        wait_for(lambda t=threshold: progress[0] >= t, timeout=600, interval=0.1, message=f"{threshold} provisioned")
        if action == "start":
            network.start_node(name)
        else:
            network.stop_node(name)
    # Wait without blocking the event loop: the in-process observer keeps its links alive meanwhile.
    wait_for(lambda: not any(thread.is_alive() for thread in workers), timeout=600, interval=0.1, message="all done")
    assert not errors, errors[:5]
    assert len(passwords) == total - len(deleted) == total - total // 50
    expected_members = {NODE_ADDRESSES[name] for name in ("node1", "node3", "node4", "node5")}
    status = network.status(lambda s: set(s.addresses("sip_proxy")) == expected_members, "final ring")
    table = LookupTable.from_status(status)
    keys = [f"{username}@{DOMAIN}" for username in passwords]
    owners = {key: table.lookup("sip_proxy", key) for key in keys}

    def converged():
        readers = {name: CacheReader(node, timeout=30) for name, node in network.nodes.items()}
        try:
            mine = {name: [key for key in keys if owners[key] == NODE_ADDRESSES[name]] for name in readers}
            # Each holds exactly as many as it owns, so no deleted one (cheap; asked first) ...
            for name, reader in readers.items():
                if json.loads(reader.get("/accounts")[1]) != {"accounts": len(mine[name]), "aliases": 0}:
                    return False
            # ... and those are the ones it owns, with their current password.
            for name, reader in readers.items():
                for key in mine[name]:
                    username = key.split("@")[0]
                    if reader.get(f"/accounts/{key}/ha1") != (200, ha1(username, passwords[username])):
                        return False
            return True
        finally:
            for reader in readers.values():
                reader.close()

    started = time.monotonic()
    wait_for(converged, timeout=60, interval=1, message="every account on its current owner, current, once")
    print(f"converged {time.monotonic() - started:.1f}s after the last change")


@pytest.mark.parametrize(
    ("roles", "topic", "body", "allowed"),
    [
        ({"provisioning_server"}, "Thor.Provisioning", {"changes": []}, True),
        ({"sip_proxy"}, "Thor.Provisioning", {"changes": []}, False),
        ({"provisioning_server"}, "Thor.Accounts.node1", {"request": "x"}, True),
        ({"sip_proxy"}, "Thor.Accounts.node2", {"request": "x"}, False),
        ({"sip_proxy"}, "Thor.AccountsWanted", {"name": "node1"}, True),
        ({"sip_proxy"}, "Thor.AccountsWanted", {"name": "node2"}, False),
        ({"sip_proxy"}, "Thor.Usage", {"name": "node1"}, True),
        ({"sip_proxy"}, "Thor.Usage", {"name": "node2"}, False),
    ],
)
def test_only_provisioning_servers_push_accounts_and_members_speak_for_themselves(roles, topic, body, allowed):
    identity = Identity("node1", roles, 1, ("127.0.0.1", 1))
    if allowed:
        authorize_publish(identity, topic, body)
    else:
        with pytest.raises(ForbiddenError):
            authorize_publish(identity, topic, body)


@pytest.mark.parametrize(
    ("name", "roles", "topic", "allowed"),
    [
        ("node1", {"sip_proxy"}, "Thor.Provisioning", True),
        ("relay1", {"media_relay"}, "Thor.Provisioning", False),
        ("ngnpro1", {"provisioning_server"}, "Thor.Provisioning", False),
        ("node1", {"sip_proxy"}, "Thor.Accounts.node1", True),
        ("node1", {"sip_proxy"}, "Thor.Accounts.node2", False),
        ("ngnpro1", {"provisioning_server"}, "Thor.Accounts.node1", False),
        ("relay1", {"media_relay"}, "Thor.Members", True),
        ("relay1", {"media_relay"}, "Thor.Usage", True),
    ],
)
def test_digest_hashes_are_read_only_by_the_nodes_that_serve_them(name, roles, topic, allowed):
    identity = Identity(name, roles, 1, ("127.0.0.1", 1))
    if allowed:
        authorize_subscribe(identity, topic)
    else:
        with pytest.raises(ForbiddenError):
            authorize_subscribe(identity, topic)
