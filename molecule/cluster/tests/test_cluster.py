"""The SIP Thor network deployed by playbooks/site.yml on the molecule containers.

Runs on the controller; reaches the containers with testinfra's docker
backend and the docker CLI (they are the project's own test hosts).
"""

import contextlib
import email.utils
import json
import os
import random
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

import dns.resolver
import gevent
import pytest
import requests
import testinfra
import zeep
import zeep.exceptions
import zeep.transports
from cryptography import x509

from thor.lookup.client import LookupClient, LookupClientError
from thor.loopback.kamailio import register
from thor.loopback.phone import Phone
from thor.loopback.process import free_port, wait_for
from thor.loopback.sipp import Sipp, thor_vias_of_invites

DOMAIN = "molecule.sipthor.test"
NETWORK = "thor-molecule"
ADDRESSES = {"node1": "172.30.0.21", "node2": "172.30.0.22", "node3": "172.30.0.23"}
NODES = set(ADDRESSES)
THOR2 = "172.30.0.12"  # an event server with NGNPro
PROGRAMS = {
    "thor1": {"thor-eventserver", "thor-manager", "prometheus"},
    "thor2": {"thor-eventserver", "thor-manager", "ngnpro"},
    "thor3": {"thor-eventserver", "thor-manager"},
    "ns1": {"pdns", "thor-dns", "thor-database", "ngnpro"},
    "ns2": {"pdns", "thor-dns"},
    "node1": {"thor-node", "kamailio", "rtpengine"},
    "node2": {"thor-node", "kamailio", "rtpengine"},
    "node3": {"thor-node", "kamailio"},
}


def host(name):
    return testinfra.get_host(f"docker://{name}")


def status(on="thor1"):
    result = host(on).run(
        "python3 -m thor.monitor.main --config /etc/thor/config.ini --once --json --wait 5 2>/dev/null"
    )
    return json.loads(result.stdout) if result.rc == 0 else None


def status_where(predicate, timeout, message, on="thor1"):
    def matching():
        current = status(on)
        return current if current and predicate(current) else None

    return wait_for(matching, timeout, interval=0.5, message=message)


def dns_answer(name, rdtype, server="ns1"):
    """What PowerDNS on a name server answers, as text records ([] for none)."""
    script = (
        "import dns.message, dns.query; "
        f"r = dns.query.udp(dns.message.make_query({name!r}, {rdtype!r}), '127.0.0.1', timeout=2); "
        "[print(x.to_text()) for rrset in r.answer for x in rrset]"
    )
    result = host(server).run(f"python3 -c {shlex.quote(script)}")
    assert result.rc == 0, result.stderr
    return result.stdout.split("\n")[:-1] if result.stdout.strip() else []


def srv_targets():
    return {line.split()[3].split(".")[0] for line in dns_answer(f"_sip._udp.{DOMAIN}.", "SRV")}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_supervisor_programs_running(name):
    result = host(name).run("supervisorctl status")
    running = {line.split()[0] for line in result.stdout.splitlines() if " RUNNING " in line}
    assert running >= PROGRAMS[name], result.stdout


def test_network_status_lists_every_host_with_its_roles():
    current = status_where(lambda s: len(s["members"]) == 8, 60, "8 members")
    roles = current["roles"]
    assert roles["thor_eventserver"] == ["thor1", "thor2", "thor3"]
    assert roles["thor_manager"] == ["thor1", "thor2", "thor3"]
    assert roles["sip_proxy"] == ["node1", "node2", "node3"]  # Kamailio answers their SIP checks
    assert roles["media_relay"] == ["node1", "node2"]  # rtpengine answers their ng pings
    assert roles["thor_dnsmanager"] == ["ns1", "ns2"]
    assert roles["thor_database"] == ["ns1"]
    assert roles["provisioning_server"] == ["ns1", "thor2"]
    assert current["members"]["node1"]["address"] == ADDRESSES["node1"]
    # Programs sharing a host keep their own attributes.
    ns1, thor2 = current["members"]["ns1"]["services"], current["members"]["thor2"]["services"]
    assert ns1["thor_database"]["attributes"]["port"] == 5432
    assert ns1["provisioning_server"]["attributes"]["port"] == 9200
    assert thor2["thor_eventserver"]["attributes"]["port"] == 8000
    assert thor2["provisioning_server"]["attributes"]["port"] == 9200


def test_thor_monitor_is_installed_for_the_operators():
    result = host("thor1").run("thor-monitor --once --wait 10")
    assert result.rc == 0, result.stderr
    assert any(line.startswith("sip_proxy") and "node1" in line for line in result.stdout.splitlines())


# What Prometheus on thor1 (group thor_prometheus) scrapes: each program's job and hosts.
SCRAPED = {
    "thor-eventserver": {"thor1", "thor2", "thor3"},
    "thor-manager": {"thor1", "thor2", "thor3"},
    "thor-node": NODES,
    "thor-database": {"ns1"},
    "thor-dns": {"ns1", "ns2"},
    "ngnpro": {"thor2", "ns1"},
}


def prometheus(path):
    """The data of an answer of Prometheus' API on thor1, asked from inside the container."""
    script = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9090{path}', timeout=5).read().decode())"
    )
    result = host("thor1").run(f"python3 -c {shlex.quote(script)}")
    assert result.rc == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == "success", answer
    return answer["data"]


def test_prometheus_scrapes_every_thor_program_and_the_metrics_are_open_to_it_only():
    expected = {(job, name) for job, hosts in SCRAPED.items() for name in hosts}

    def all_up():
        targets = prometheus("/api/v1/targets?state=active")["activeTargets"]
        health = {(t["labels"]["job"], t["labels"]["host"]): t["health"] for t in targets if "host" in t["labels"]}
        return health if set(health) == expected and set(health.values()) == {"up"} else None

    health = wait_for(all_up, 60, interval=2, message="every Thor program scraped and up")
    print(f"Prometheus scrapes {len(health)} Thor programs, every one up")
    # What it holds is the network's: one active manager, every node's sip_proxy up.
    active = prometheus("/api/v1/query?query=sum(thor_manager_active)")["result"]
    assert [float(sample["value"][1]) for sample in active] == [1.0]
    roles_up = prometheus('/api/v1/query?query=thor_role_up{role="sip_proxy"}')["result"]
    assert {sample["metric"]["host"]: float(sample["value"][1]) for sample in roles_up} == dict.fromkeys(NODES, 1.0)
    # The metrics ports answer the Prometheus host only (and loopback): another host gets 403.
    script = (
        "import urllib.error, urllib.request\n"
        "try:\n    urllib.request.urlopen('http://172.30.0.11:9811/metrics', timeout=5)\n"
        "except urllib.error.HTTPError as error:\n    print(error.code)\n"
    )
    assert host("node1").run(f"python3 -c {shlex.quote(script)}").stdout.strip() == "403"


def test_an_alert_fires_when_no_node_serves_sip_proxy_and_ends_when_one_does():
    """Kamailio stopped on every sip_proxy node: each withdraws sip_proxy, and after the rule's
    minute ThorRoleWithoutLiveMember fires for it; it ends once Kamailio is back."""

    def firing():
        alerts = prometheus("/api/v1/alerts")["alerts"]
        return [
            alert
            for alert in alerts
            if alert["labels"]["alertname"] == "ThorRoleWithoutLiveMember" and alert["state"] == "firing"
        ]

    assert firing() == []
    stopped = time.monotonic()
    try:
        for name in sorted(NODES):
            assert host(name).run("supervisorctl stop kamailio").rc == 0
        alerts = wait_for(firing, 180, interval=2, message="ThorRoleWithoutLiveMember firing")
        print(f"ThorRoleWithoutLiveMember fired {time.monotonic() - stopped:.0f} s after Kamailio stopped")
        assert [alert["labels"]["role"] for alert in alerts] == ["sip_proxy"]
    finally:
        for name in sorted(NODES):
            assert host(name).run("supervisorctl start kamailio").rc == 0
    status_where(lambda s: set(s["roles"].get("sip_proxy", [])) == NODES, 60, "every node a sip_proxy again")
    wait_for(lambda: firing() == [], 60, interval=2, message="the alert ended")
    wait_for(lambda: srv_targets() == NODES, 30, message="every node back in DNS")


def test_powerdns_answers_srv_and_a_for_live_sip_proxies():
    wait_for(lambda: srv_targets() == NODES, 30, message="SRV of every node")
    assert dns_answer(f"node1.{DOMAIN}.", "A") == [ADDRESSES["node1"]]
    naptr = dns_answer(f"{DOMAIN}.", "NAPTR")
    assert any('"SIP+D2U"' in line for line in naptr)
    assert sorted(dns_answer(f"{DOMAIN}.", "NS")) == [f"ns1.{DOMAIN}.", f"ns2.{DOMAIN}."]
    # Operators on a name server ask with dig (docs/ansible.md).
    dig = host("ns2").run(f"dig +short @127.0.0.1 node2.{DOMAIN} A")
    assert dig.rc == 0 and dig.stdout.split() == [ADDRESSES["node2"]], dig.stderr


@pytest.mark.parametrize("server", ["ns1", "ns2"])
def test_each_name_server_publishes_every_services_own_port(server):
    """thor2 runs an event server and NGNPro, ns1 the database publisher and NGNPro: each SRV names its port."""

    def ports(service):
        return {line.split()[3].split(".")[0]: int(line.split()[2]) for line in dns_answer(service, "SRV", server)}

    wait_for(lambda: len(ports(f"_ngnpro._tcp.{DOMAIN}.")) == 2, 30, message=f"_ngnpro._tcp on {server}")
    # Answers are random slices of at most 3 (thor-dns answer_limit): ask until every target was seen.
    seen = {}
    for _ in range(20):
        seen.update(ports(f"_eventserver._tcp.{DOMAIN}."))
    assert seen == {"thor1": 8000, "thor2": 8000, "thor3": 8000}
    assert ports(f"_ngnpro._tcp.{DOMAIN}.") == {"ns1": 9200, "thor2": 9200}


def run_playbook(name, *extra):
    return Rollout(name, *extra).finish(600)


def test_the_rollout_verification_names_a_withdrawn_role_and_its_check():
    node3 = host("node3")
    assert node3.run("supervisorctl stop kamailio").rc == 0
    try:
        status_where(lambda s: "node3" not in s["roles"].get("sip_proxy", []), 30, "node3 withdrew sip_proxy")
        wait_for(lambda: "node3" not in srv_targets(), 30, message="node3 out of the SRV answers")
        result = run_playbook("verify.yml", "-e", "thor_verify_timeout=2")
        assert result.returncode != 0
        # Ansible prints a failed task's message on stderr.
        report = result.stdout + result.stderr
        assert "node3: sip_proxy withdrawn: health check sip:127.0.0.1:5060 does not answer" in report
    finally:
        assert node3.run("supervisorctl start kamailio").rc == 0
    status_where(lambda s: "node3" in s["roles"].get("sip_proxy", []), 30, "node3 a sip_proxy again")
    result = run_playbook("verify.yml")
    assert result.returncode == 0, result.stdout[-3000:]


def test_stopped_node_leaves_dns_and_comes_back():
    node2 = host("node2")
    assert node2.run("supervisorctl stop thor-node").rc == 0
    try:
        wait_for(lambda: srv_targets() == NODES - {"node2"}, 30, message="node2 out of the SRV answers")
        assert dns_answer(f"node2.{DOMAIN}.", "A") == []
    finally:
        assert node2.run("supervisorctl start thor-node").rc == 0
    wait_for(lambda: srv_targets() == NODES, 30, message="node2 back in DNS")


def test_node_cut_off_is_removed_and_returns_without_operator_action():
    subprocess.run(["docker", "network", "disconnect", NETWORK, "node1"], check=True)
    try:
        status_where(lambda s: "node1" not in s["members"], 20, "node1 removed while cut off")
    finally:
        subprocess.run(["docker", "network", "connect", "--ip", ADDRESSES["node1"], NETWORK, "node1"], check=True)
    status_where(lambda s: "node1" in s["members"], 90, "node1 back after reconnect")
    wait_for(lambda: "node1" in srv_targets(), 30, message="node1 back in DNS")


def test_active_manager_killed_another_takes_over():
    before = status_where(lambda s: s["manager"], 30, "an active manager")
    active = before["manager"]
    assert host(active).run("supervisorctl signal KILL thor-manager").rc == 0
    after = status_where(
        lambda s: s["manager"] not in (None, active),
        30,
        "another active manager",
        on="thor3" if active != "thor3" else "thor1",
    )
    assert after["version"] > before["version"]
    # supervisor restarts the killed manager; as the youngest it stands by.
    status_where(lambda s: s["roles"].get("thor_manager") == ["thor1", "thor2", "thor3"], 30, "all managers back")
    assert status()["manager"] == after["manager"]


def owners_from(node, keys):
    """Ask a node's lookup interface, from the controller, who owns each key (pipelined)."""
    with LookupClient(ADDRESSES[node], 9500, timeout=10) as client:
        return client.query(*(f"lookup sip_proxy for {key}" for key in keys))


def lookup_version(node):
    with LookupClient(ADDRESSES[node], 9500, timeout=10) as client:
        return int(client.query("version")[0])


def test_nodes_agree_on_owners_and_only_a_stopped_nodes_keys_move():
    keys = [f"subscriber{index}@{DOMAIN}" for index in range(500)]
    current = status_where(lambda s: s["roles"].get("sip_proxy") == sorted(NODES), 60, "3 sip_proxy nodes")
    for node in NODES:
        wait_for(lambda n=node: lookup_version(n) >= current["version"], 30, message=f"{node} on the status")
    before = {node: owners_from(node, keys) for node in sorted(NODES)}
    assert before["node1"] == before["node2"] == before["node3"]
    assert set(before["node1"]) == set(ADDRESSES.values())
    # The command-line client on a node gives the same answer.
    result = host("node2").run(f"thor --json lookup sip_proxy sip:{keys[0]}")
    assert result.rc == 0 and json.loads(result.stdout)["node"] == before["node1"][0], result.stderr

    node3 = host("node3")
    assert node3.run("supervisorctl stop thor-node").rc == 0
    try:
        stopped = status_where(lambda s: "node3" not in s["members"], 30, "node3 gone")
        for node in ("node1", "node2"):
            wait_for(lambda n=node: lookup_version(n) >= stopped["version"], 30, message=f"{node} follows")
        after = owners_from("node1", keys)
        assert after == owners_from("node2", keys)
        moved = [old != new for old, new in zip(before["node1"], after, strict=True)]
        owned_by_node3 = [old == ADDRESSES["node3"] for old in before["node1"]]
        assert moved == owned_by_node3  # node3's keys moved, and only those
        assert any(moved)
    finally:
        assert node3.run("supervisorctl start thor-node").rc == 0
    status_where(lambda s: s["roles"].get("sip_proxy") == sorted(NODES), 30, "node3 back")


def cached_on(node, key):
    """What a node's account cache (HTTP on loopback only) answers for key."""
    script = (
        "import sys, urllib.error, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "try:\n"
        f"    print(opener.open('http://127.0.0.1:9501/accounts/{key}', timeout=5).read().decode())\n"
        "except urllib.error.HTTPError as error:\n"
        "    sys.exit(0 if error.code == 404 else error.code)\n"
    )
    result = host(node).run(f"python3 -c {shlex.quote(script)}")
    assert result.rc == 0, (result.rc, result.stderr)
    return json.loads(result.stdout) if result.stdout.strip() else None


def ngnpro():
    """(the zeep client of thor2's NGNPro, its SipPort, the admin login), once it serves and has
    its domain."""
    session = requests.Session()
    session.verify = os.path.join(os.environ["THOR_MOLECULE_PKI"], "ca.crt")
    session.trust_env = False
    url = "https://172.30.0.12:9200/ngnpro/wsdl"
    wait_for(lambda: _serves(session, url), 60, interval=0.5, message="ngnpro serving its WSDL")
    client = zeep.Client(url, transport=zeep.transports.Transport(session=session))
    login = client.get_element("{urn:AGProjects:NGNPro}Login")(username="admin", password="molecule-only-password")
    sip = client.bind("SipPort", "SipPort")
    wait_for(lambda: _provisioned(sip, login), 60, interval=1, message="the domain added (database reachable)")
    return client, sip, login


def test_ngnpro_provisions_over_soap_and_the_owner_node_caches_it():
    client, sip, login = ngnpro()
    keys = [f"user{index}@{DOMAIN}" for index in range(20)]
    for key in keys:
        account = {"id": {"username": key.split("@")[0], "domain": DOMAIN}, "password": "molecule-password"}
        with _existing_is_fine():  # verify may run again on the same cluster
            sip.addAccount(account, _soapheaders=[login])
    with LookupClient(ADDRESSES["node1"], 9500, timeout=10) as lookup:
        owners = lookup.query(*(f"lookup sip_proxy for {key}" for key in keys))
    by_address = {address: node for node, address in ADDRESSES.items()}
    for key, address in zip(keys, owners, strict=True):
        owner = by_address[address]
        wait_for(lambda k=key, o=owner: cached_on(o, k), 20, interval=0.5, message=f"{key} cached on {owner}")
        assert all(cached_on(node, key) is None for node in ADDRESSES if node != owner)
    statistics = client.bind("NetworkPort", "NetworkPort").getStatistics(_soapheaders=[login])
    assert {node.name for node in statistics} == set(ADDRESSES)
    # Any node's SIP proxy takes the subscriber's REGISTER to its home node, which checks it with its cache.
    for key, address in list(zip(keys, owners, strict=True))[:3]:
        username = key.split("@")[0]
        assert register(5060, username, DOMAIN, "molecule-password", host=address) == (200, "OK")
        assert register(5060, username, DOMAIN, "wrong-password", host=address)[0] == 401
        # Valid credentials do not let a subscriber save a binding for someone else's address.
        assert register(5060, username, DOMAIN, "molecule-password", host=address, to=f"victim@{DOMAIN}") == (
            403,
            "To Must Be The Authenticated Subscriber",
        )
        other = next(a for a in ADDRESSES.values() if a != address)
        assert register(5060, username, DOMAIN, "molecule-password", host=other) == (200, "OK")


def _serves(session, url):
    try:
        return session.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def _existing_is_fine():
    try:
        yield
    except zeep.exceptions.Fault as fault:
        if not (fault.code or "").endswith("Client.Conflict"):
            raise


def _provisioned(sip, login):
    try:
        with _existing_is_fine():
            sip.addDomain(DOMAIN, _soapheaders=[login])
    except zeep.exceptions.Fault as fault:
        if "DatabaseUnavailable" in (fault.code or ""):
            return False
        raise
    return True


# -- Faults: the database host down, the provisioning server that answers loads killed -----


def add_account(sip, login, username, password="molecule-password"):
    account = {"id": {"username": username, "domain": DOMAIN}, "password": password}
    sip.addAccount(account, _soapheaders=[login])


def owner_of(key):
    by_address = {address: node for node, address in ADDRESSES.items()}
    with LookupClient(ADDRESSES["node1"], 9500, timeout=10) as lookup:
        return by_address[lookup.query(f"lookup sip_proxy for {key}")[0]]


def soap_fault(call, *args, **kwargs):
    """The fault code call answers ('' when it succeeds)."""
    try:
        call(*args, **kwargs)
    except zeep.exceptions.Fault as fault:
        return fault.code or ""
    return ""


def test_the_database_host_down_refuses_provisioning_and_nodes_and_dns_keep_serving_until_it_is_back():
    """Fault: ns1 (PostgreSQL, thor-database, an NGNPro, a name server) frozen (docker pause: no
    answer, no reset). thor2's NGNPro refuses changes with Server.DatabaseUnavailable, the nodes
    keep the accounts they hold, ns2 keeps answering what it had; once ns1 is back everything
    recovers, and a change refused during the outage is not there half-applied."""
    _, sip, login = ngnpro()
    with _existing_is_fine():
        add_account(sip, login, "outage-before")
    before = f"outage-before@{DOMAIN}"
    holder = owner_of(before)
    wait_for(lambda: cached_on(holder, before), 30, interval=0.5, message=f"{before} cached on {holder}")
    subprocess.run(["docker", "pause", "ns1"], check=True, stdout=subprocess.DEVNULL)
    try:
        status_where(lambda s: "ns1" not in s["members"], 30, "ns1 gone from the status")
        refusal = wait_for(
            lambda: soap_fault(add_account, sip, login, "outage-during"),
            60,
            interval=1,
            message="NGNPro refusing changes",
        )
        assert refusal.endswith("Server.DatabaseUnavailable"), refusal
        assert cached_on(holder, before)["ha1"]  # the node still holds what it loaded
        assert srv_targets_on("ns2") == NODES  # the other name server still answers
        assert dns_answer(f"{holder}.{DOMAIN}.", "A", server="ns2") == [ADDRESSES[holder]]
    finally:
        subprocess.run(["docker", "unpause", "ns1"], check=True, stdout=subprocess.DEVNULL)
    status_where(lambda s: "thor_database" in s["roles"], 60, "the database announced again")
    wait_for(lambda: _provisioned(sip, login), 60, interval=1, message="NGNPro taking changes again")
    # Refused means not there: no account half-made by the refused call.
    assert soap_fault(sip.getAccount, {"username": "outage-during", "domain": DOMAIN}, _soapheaders=[login]).endswith(
        "Client.NotFound"
    )
    with _existing_is_fine():
        add_account(sip, login, "outage-after")
    after = f"outage-after@{DOMAIN}"
    wait_for(lambda: cached_on(owner_of(after), after), 30, interval=0.5, message=f"{after} cached once ns1 is back")
    wait_for(lambda: srv_targets_on("ns1") == NODES, 60, message="ns1's PowerDNS answering again")


def srv_targets_on(server):
    return {line.split()[3].split(".")[0] for line in dns_answer(f"_sip._udp.{DOMAIN}.", "SRV", server=server)}


def test_the_provisioning_server_that_answers_loads_killed_a_node_that_joins_afterwards_loads_its_accounts():
    """Fault: kill -9 the NGNPro that answers the nodes' account loads (the eldest live one).
    node3, restarted afterwards (its cache empty), loads its share from the other."""
    _, sip, login = ngnpro()
    keys = [f"failover{index}@{DOMAIN}" for index in range(30)]
    for key in keys:
        with _existing_is_fine():
            add_account(sip, login, key.split("@")[0])
    owned = [key for key in keys if owner_of(key) == "node3"]
    assert owned
    wait_for(lambda: all(cached_on("node3", key) for key in owned), 30, message="node3 holds its share")
    current = status()
    answering = min(
        current["roles"]["provisioning_server"],
        key=lambda name: (current["members"][name]["services"]["provisioning_server"]["since"], name),
    )
    killed = host(answering)
    assert killed.run("kill -9 $(supervisorctl pid ngnpro) && supervisorctl stop ngnpro").rc == 0
    try:
        status_where(
            lambda s: answering not in s["roles"].get("provisioning_server", []), 30, f"{answering}'s NGNPro gone"
        )
        assert host("node3").run("supervisorctl restart thor-node").rc == 0
        wait_for(lambda: all(cached_on("node3", key) for key in owned), 60, message="node3 loaded its share again")
    finally:
        assert killed.run("supervisorctl start ngnpro").rc == 0
    status_where(lambda s: answering in s["roles"].get("provisioning_server", []), 60, f"{answering}'s NGNPro back")


# -- SIP over the overlay: the controller's sipp devices on the cluster's network -----------

SIP_USERS = [f"sip{index}" for index in range(100)]
SIP_PASSWORD = "molecule-sip-password"
# The controller on the cluster's Docker network (its gateway): where the devices run.
CONTROLLER = "172.30.0.1"


def sip_network():
    """thor2's NGNPro, once it serves; the subscribers provisioned."""
    _, sip, login = ngnpro()
    for user in SIP_USERS:
        with _existing_is_fine():
            account = {"id": {"username": user, "domain": DOMAIN}, "password": SIP_PASSWORD}
            sip.addAccount(account, _soapheaders=[login])


def rfc3263_node():
    """The node a device would use: NAPTR, SRV and A records as PowerDNS on ns1 answers them."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["172.30.0.53"]
    resolver.lifetime = 5
    naptr = {record.service.decode(): record for record in resolver.resolve(DOMAIN, "NAPTR")}
    srv = random.choice(list(resolver.resolve(naptr["SIP+D2U"].replacement, "SRV")))
    return resolver.resolve(srv.target, "A")[0].to_text()


def location_on(node, aor):
    """What a node's thor-node answers for aor's devices (it asks aor's home node): the HTTP status."""
    script = (
        "import urllib.error, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "try:\n"
        f"    print(opener.open('http://127.0.0.1:9501/sip/location/{aor}', timeout=5).status)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code)\n"
    )
    return int(host(node).run(f"python3 -c {shlex.quote(script)}").stdout.strip())


def register_devices(directory, users_by_node, tag):
    """sipp devices on the controller, one port per edge node: registered, then answering."""
    answering = {}
    for address, users in users_by_node.items():
        local = (CONTROLLER, free_port(CONTROLLER))
        rows = [[user, DOMAIN, SIP_PASSWORD] for user in users]
        result = Sipp(directory, f"{tag}-register-{address}", "register", local, rows, (address, 5060)).run(
            len(rows), rate=50, timeout=60
        )
        assert (result.successful, result.failed) == (len(rows), 0), result.errors
        answering[address] = Sipp(directory, f"{tag}-answer-{address}", "answer", local).start()
    return answering


def place_calls(directory, pairs, edge_of, tag):
    """Calls (caller, callee), each through the caller's edge node; every one must succeed."""
    by_edge = {}
    for caller, callee in pairs:
        by_edge.setdefault(edge_of[caller], []).append([caller, DOMAIN, SIP_PASSWORD, callee])
    for edge, rows in by_edge.items():
        local = (CONTROLLER, free_port(CONTROLLER))
        result = Sipp(directory, f"{tag}-calls-{edge}", "call", local, rows, (edge, 5060)).run(
            len(rows), rate=20, timeout=60
        )
        assert (result.successful, result.failed) == (len(rows), 0), result.errors


def test_100_subscribers_register_through_dns_chosen_nodes_and_50_calls_cross_at_most_two_nodes(tmp_path):
    sip_network()
    edge_of = {user: rfc3263_node() for user in SIP_USERS}
    assert set(edge_of.values()) == set(ADDRESSES.values())  # the DNS slices spread them
    users_by_node = {}
    for user, address in edge_of.items():
        users_by_node.setdefault(address, []).append(user)
    answering = register_devices(tmp_path, users_by_node, "dns")
    try:
        # Each binding is on its home node: any node's thor-node finds it there.
        assert all(location_on("node1", f"{user}@{DOMAIN}") == 200 for user in SIP_USERS[:20])
        pairs = []
        for index, caller in enumerate(SIP_USERS):
            callee = next(u for u in SIP_USERS[index + 1 :] + SIP_USERS[:index] if edge_of[u] != edge_of[caller])
            pairs.append((caller, callee))
            if len(pairs) == 50:
                break
        place_calls(tmp_path, pairs, edge_of, "dns")
        hops = [h for sipp in answering.values() for h in thor_vias_of_invites(sipp.messages())]
        assert len(hops) == 50 and max(hops) == 2, hops
    finally:
        for sipp in answering.values():
            sipp.stop()


def test_a_stopped_sip_proxy_nodes_subscribers_register_with_their_new_home_and_calls_work_again(tmp_path):
    sip_network()
    users = SIP_USERS[:30]
    users_by_node = {}
    for index, user in enumerate(users):
        users_by_node.setdefault(sorted(ADDRESSES.values())[index % 3], []).append(user)
    for sipp in register_devices(tmp_path, users_by_node, "before").values():
        sipp.stop()  # registered: what matters here is where their bindings are
    node3 = host("node3")
    assert all(location_on("node1", f"{user}@{DOMAIN}") == 200 for user in users)
    assert node3.run("supervisorctl stop thor-node kamailio").rc == 0
    answering = {}
    try:
        status_where(lambda s: "node3" not in s["members"], 30, "node3 gone")
        # Its subscribers have a new home that never saw them: they register again, through a live node.
        orphans = [user for user in users if location_on("node1", f"{user}@{DOMAIN}") == 480]
        assert orphans
        answering = register_devices(tmp_path, {ADDRESSES["node1"]: orphans}, "after")
        assert all(location_on("node2", f"{user}@{DOMAIN}") == 200 for user in users)
        place_calls(tmp_path, [(SIP_USERS[50], user) for user in orphans], {SIP_USERS[50]: ADDRESSES["node2"]}, "after")
    finally:
        for sipp in answering.values():
            sipp.stop()
        assert node3.run("supervisorctl start kamailio thor-node").rc == 0
    status_where(lambda s: "node3" in s["roles"].get("sip_proxy", []), 30, "node3 a sip_proxy again")


# -- Media relays: rtpengine on node1 (site a) and node2 (site b); node3 is in site a -------

RELAY_OF_SITE = {"a": ADDRESSES["node1"], "b": ADDRESSES["node2"]}
SITE = {"node1": "a", "node2": "b", "node3": "a"}
PACKETS = 10


def phones(users_by_node):
    """Phones on the controller, each registered through its node: {user: (phone, node)}."""
    registered = {}
    for node, users in users_by_node.items():
        for user in users:
            phone = Phone(user, DOMAIN, SIP_PASSWORD, CONTROLLER, (ADDRESSES[node], 5060))
            registered[user] = (phone, node)
            wait_for(lambda p=phone: p.register()[0] == 200, 20, interval=0.5, message=f"{user} registered")
    return registered


def call_with_media(caller, callee):
    """caller calls callee, both send PACKETS RTP packets 20 ms apart, caller hangs up;
    (the relay address in the SDP, packets the caller got, packets the callee got)."""
    before = len(callee.incoming)
    call = caller.call(callee.user)
    answered = callee.wait_incoming(before + 1)
    gevent.joinall([gevent.spawn(call.send_rtp, PACKETS), gevent.spawn(answered.send_rtp, PACKETS)])
    wait_for(
        lambda: call.received >= PACKETS and answered.received >= PACKETS, 5, interval=0.05, message="media through"
    )
    assert call.hangup() == 200
    assert answered.media[0] == call.media[0]  # both sides' SDP name the relay
    return call.media[0], call.received, answered.received


def test_50_calls_with_media_between_nodes_go_through_the_relay_of_the_callers_site():
    sip_network()
    status_where(lambda s: s["roles"].get("media_relay") == ["node1", "node2"], 60, "both media relays live")
    registered = phones({node: SIP_USERS[60 + 4 * i : 64 + 4 * i] for i, node in enumerate(sorted(ADDRESSES))})
    try:
        users = sorted(registered)
        used = []
        for index in range(50):
            caller, caller_node = registered[users[index % len(users)]]
            callee = next(p for p, n in (registered[u] for u in users[index % 4 :] + users) if n != caller_node)
            relay, sent_back, sent_forth = call_with_media(caller, callee)
            assert relay == RELAY_OF_SITE[SITE[caller_node]], (caller_node, relay)
            assert (sent_back, sent_forth) == (PACKETS, PACKETS)
            used.append(relay)
        assert set(used) == set(RELAY_OF_SITE.values())  # both relays, in both sites
    finally:
        for phone, _ in registered.values():
            phone.close()


def test_a_stopped_relay_gets_no_new_calls_and_takes_calls_again_once_back():
    sip_network()
    node2 = host("node2")
    registered = phones({"node2": ["sip70"], "node1": ["sip71"]})
    caller, callee = registered["sip70"][0], registered["sip71"][0]
    try:
        status_where(lambda s: s["roles"].get("media_relay") == ["node1", "node2"], 60, "both media relays live")
        assert call_with_media(caller, callee)[0] == RELAY_OF_SITE["b"]
        in_progress = caller.call("sip71")
        answered = callee.wait_incoming(len(callee.incoming))
        assert in_progress.media[0] == RELAY_OF_SITE["b"]
        assert node2.run("supervisorctl stop rtpengine").rc == 0
        status_where(lambda s: s["roles"].get("media_relay") == ["node1"], 30, "node2 withdrew media_relay")
        # The call that was on node2's relay keeps it (docs/sip.md): its media is gone. Nothing
        # can arrive, so the check is that nothing did by the time it would have (0.5 s).
        in_progress.send_rtp(PACKETS)
        gevent.sleep(0.5)
        assert answered.received == 0
        assert in_progress.hangup() == 200
        # No relay left in site b: node2's callers get site a's, with media both ways.
        relay, back, forth = call_with_media(caller, callee)
        assert (relay, back, forth) == (RELAY_OF_SITE["a"], PACKETS, PACKETS)
    finally:
        assert node2.run("supervisorctl start rtpengine").rc == 0
    status_where(lambda s: s["roles"].get("media_relay") == ["node1", "node2"], 30, "node2 a media relay again")
    wait_for(lambda: call_with_media(caller, callee)[0] == RELAY_OF_SITE["b"], 5, message="node2's relay used again")
    for phone, _ in registered.values():
        phone.close()


# -- The rollout: secrets, restarts that follow changes, one host at a time, upgrades -------


def test_databases_are_reached_over_checked_tls_only_and_thor_dns_runs_as_thor():
    """NGNPro (thor2, ns1) and thor-dns reach PostgreSQL over TLS (sslmode=verify-full by default:
    the server's certificate is the host's own, of the provider CA); the same password without TLS
    is refused; thor-dns runs as the thor user."""
    _, sip, login = ngnpro()
    with _existing_is_fine():
        add_account(sip, login, "tls-checked")
    query = (
        "SELECT DISTINCT usename, host(client_addr), ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
        "WHERE usename IN ('thor', 'pdns') AND client_addr <> '127.0.0.1'"
    )
    rows = {
        tuple(line.split("|"))
        for line in host("ns1").run(f"runuser -u postgres -- psql -At -c {shlex.quote(query)}").stdout.split()
    }
    assert {("thor", THOR2), ("pdns", "172.30.0.53")} <= {row[:2] for row in rows}, rows
    assert all(row[2] == "t" for row in rows), rows
    plain = host("thor2").run(
        "python3 -c \"import psycopg2; psycopg2.connect('host=172.30.0.53 dbname=thor user=thor "
        "password=molecule-only sslmode=disable connect_timeout=5')\""
    )
    assert plain.rc != 0 and "no encryption" in plain.stderr, plain.stderr
    for name in ("thor2", "ns1"):
        assert "database_sslmode" not in host(name).run("cat /etc/thor/config.ini").stdout  # verify-full
    for name in ("ns1", "ns2"):
        pid = host(name).run("supervisorctl pid thor-dns").stdout.strip()
        assert host(name).run(f"ps -o user= -p {pid}").stdout.strip() == "thor"


def soap_login(address, password):
    """A SipPort of the NGNPro at address and a Login header with password (no call made)."""
    session = requests.Session()
    session.verify = os.path.join(os.environ["THOR_MOLECULE_PKI"], "ca.crt")
    session.trust_env = False
    url = f"https://{address}:9200/ngnpro/wsdl"
    wait_for(lambda: _serves(session, url), 60, interval=0.5, message=f"ngnpro on {address} serving its WSDL")
    client = zeep.Client(url, transport=zeep.transports.Transport(session=session, timeout=10, operation_timeout=10))
    login = client.get_element("{urn:AGProjects:NGNPro}Login")(username="admin", password=password)
    return client.bind("SipPort", "SipPort"), login


def test_ngnpro_password_rotated_through_the_inventory_takes_effect_on_every_provisioning_server():
    """A changed thor_ngnpro_password restarts ngnpro (one host at a time): the new password is
    accepted and the old refused, on both provisioning servers."""
    old, new = "molecule-only-password", "molecule-rotated-password"
    account = {"username": "tls-checked", "domain": DOMAIN}
    try:
        result = run_playbook("provisioning.yml", "-e", json.dumps({"thor_ngnpro_password": new}))
        assert result.returncode == 0, result.stdout[-3000:]
        for address in (THOR2, "172.30.0.53"):
            sip, login = soap_login(address, new)
            assert soap_fault(sip.getAccount, account, _soapheaders=[login]) == ""
            sip, login = soap_login(address, old)
            assert soap_fault(sip.getAccount, account, _soapheaders=[login]).endswith("Client.Unauthorized")
    finally:
        result = run_playbook("provisioning.yml")
        assert result.returncode == 0, result.stdout[-3000:]
    for address in (THOR2, "172.30.0.53"):
        sip, login = soap_login(address, old)
        assert soap_fault(sip.getAccount, account, _soapheaders=[login]) == ""


def upgrade_repository(directory):
    """This checkout's packages again as version <current>+upgrade1, in a flat repository signed
    with the key of make deb's (the one the cluster trusts)."""
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    source = os.path.join(directory, "src")
    shutil.copytree(os.path.join(project, "build", "deb", "src"), source)
    with open(os.path.join(source, "debian", "changelog")) as stream:
        changelog = stream.read()
    version = changelog.split("(", 1)[1].split(")", 1)[0] + "+upgrade1"
    entry = (
        f"sipthor ({version}) bookworm; urgency=medium\n\n  * The molecule cluster's upgrade test.\n\n"
        f" -- SIP Thor developers <dev@sipthor.invalid>  {email.utils.formatdate()}\n\n"
    )
    with open(os.path.join(source, "debian", "changelog"), "w") as stream:
        stream.write(entry + changelog)
    init = os.path.join(source, "thor", "__init__.py")
    with open(init) as stream:
        text = stream.read()
    with open(init, "w") as stream:
        stream.write(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))
    environment = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    build = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        check=False,
        cwd=source,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    repository = os.path.join(directory, "repo")
    os.mkdir(repository)
    for name in os.listdir(directory):
        if name.endswith(".deb"):
            shutil.copy(os.path.join(directory, name), repository)
    commands = "apt-ftparchive packages . > Packages && gzip -9kf Packages && apt-ftparchive release . > Release"
    subprocess.run(commands, shell=True, cwd=repository, check=True, capture_output=True)
    signing = dict(os.environ, REPO_GNUPGHOME=os.path.join(project, "build", "deb", "repo-gnupg"))
    subprocess.run(
        [os.path.join(project, "debian", "sign-repo"), repository], env=signing, check=True, capture_output=True
    )
    return version, repository


class Watch:
    """Lookups against the nodes, NGNPro calls and network status polls, in threads, until stopped:
    what a rolling restart must not disturb. Bounded in time and count."""

    def __init__(self, account):
        self.account = account
        self.stopped = threading.Event()
        self.lookups, self.lookup_errors = 0, []
        self.calls, self.call_failures = 0, []
        self.polls = []  # (when, member names or None)
        self.threads = [threading.Thread(target=target, daemon=True) for target in (self._lookups, self._calls)]
        for thread in self.threads:
            thread.start()

    def _lookups(self):
        for index in range(100000):
            if self.stopped.wait(0.05):
                return
            line = f"lookup sip_proxy for {SIP_USERS[index % len(SIP_USERS)]}@{DOMAIN}"
            for node in random.sample(sorted(ADDRESSES), len(ADDRESSES)):  # the next node if one is away
                try:
                    with LookupClient(ADDRESSES[node], 9500, timeout=5) as lookup:
                        answer = lookup.query(line)[0]
                except (OSError, LookupClientError):
                    continue
                self.lookups += 1
                if answer not in ADDRESSES.values():
                    self.lookup_errors.append((node, answer))
                break
            else:
                self.lookup_errors.append(("no node", line))

    def _calls(self):
        servers = [soap_login(address, "molecule-only-password") for address in (THOR2, "172.30.0.53")]
        for index in range(100000):
            if self.stopped.wait(0.1):
                return
            for sip, login in random.sample(servers, len(servers)):  # the other one if one is away
                try:
                    if index % 5:
                        sip.getAccount(self.account, _soapheaders=[login])
                    else:
                        add_account(sip, login, f"rolling{index}-{random.randrange(10**9)}")
                except zeep.exceptions.Fault as fault:
                    self.call_failures.append(fault.code)
                except (requests.RequestException, zeep.exceptions.TransportError):
                    continue
                self.calls += 1
                break
            else:
                self.call_failures.append("no provisioning server answered")

    def poll(self):
        current = status()
        self.polls.append((time.monotonic(), set(current["members"]) if current else None))
        return current

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(30)

    def absences(self):
        """{member: the longest time it was missing from the polls, in seconds}."""
        everyone = set().union(*(members for _, members in self.polls if members))
        longest, since = dict.fromkeys(everyone, 0.0), {}
        for when, members in self.polls:
            for name in everyone:
                if members is not None and name not in members:
                    since.setdefault(name, when)
                elif name in since:
                    longest[name] = max(longest[name], when - since.pop(name))
        return longest


def test_an_upgrade_with_a_config_change_rolls_over_the_cluster_one_host_at_a_time_and_nothing_is_lost(tmp_path):
    """site.yml with packages of a newer version and a changed shared setting: every Thor program
    is restarted (event servers and managers one at a time, each back in the status before the
    next; nodes in batches), runs the new version afterwards, and meanwhile no lookup is
    answered with an error, no SOAP call fails and no member is missing from the status for
    more than its own restart."""
    sip_network()
    version, repository = upgrade_repository(str(tmp_path))
    members = set(status_where(lambda s: len(s["members"]) == len(PROGRAMS), 60, "every member")["members"])
    kamailio_before = {name: host(name).run("supervisorctl pid kamailio").stdout.strip() for name in NODES}
    watch = Watch({"username": SIP_USERS[0], "domain": DOMAIN})
    extra = {"thor_common_local_repo": repository, "thor_common_tls_settings": {"crl_check_interval": 4}}
    rollout = Rollout("site.yml", "-e", json.dumps(extra))
    try:
        deadline = time.monotonic() + 1200
        while rollout.running() and time.monotonic() < deadline:
            watch.poll()
    finally:
        watch.stop()
    result = rollout.finish(60)
    assert result.returncode == 0, result.stdout[-3000:]
    absences = watch.absences()
    print(
        f"rolled out {version}: {len(watch.polls)} status polls, {watch.lookups} lookups, {watch.calls} SOAP calls; "
        f"longest absence per member (s): { {name: round(seconds, 1) for name, seconds in sorted(absences.items())} }"
    )
    assert watch.lookups > 100 and watch.lookup_errors == [], watch.lookup_errors[:10]
    assert watch.calls > 50 and watch.call_failures == [], watch.call_failures[:10]
    assert all(members_seen is not None for _, members_seen in watch.polls)
    assert all(len(members - seen) <= 1 for _, seen in watch.polls), "two hosts away at once"
    assert max(absences.values()) <= 30, absences
    current = status_where(lambda s: set(s["members"]) == members, 60, "every member back")
    for name, member in current["members"].items():
        for role, service in member["services"].items():
            assert service["version"] == version, (name, role, service["version"])
    for name in PROGRAMS:
        installed = host(name).run("dpkg-query -W -f '${Version}' python3-sipthor").stdout
        assert installed == version, (name, installed)
        assert "crl_check_interval = 4" in host(name).run("cat /etc/thor/config.ini").stdout
    for name in NODES:
        assert host(name).run("supervisorctl pid kamailio").stdout.strip() != kamailio_before[name]
    # Nothing is left to restart (the programs started after their packages were installed).
    for playbook in ("eventservers.yml", "sipproxies.yml"):
        again = run_playbook(playbook, "-e", json.dumps(extra))
        recap = again.stdout.rsplit("PLAY RECAP", 1)[-1]
        assert again.returncode == 0 and set(re.findall(r"changed=(\d+)", recap)) == {"0"}, again.stdout[-3000:]


SERIAL_OF_NODE_CERTIFICATE = (
    'python3 -c "from cryptography import x509; '
    "print(x509.load_pem_x509_certificate(open('/etc/thor/tls/node.crt', 'rb').read()).serial_number)\""
)


def host_certificates():
    """{host: (the serial of its node.crt, the SHA-256 of its node.key, its supervisor programs' pids)}."""
    found = {}
    for name in sorted(PROGRAMS):
        target = host(name)
        found[name] = (
            target.run(SERIAL_OF_NODE_CERTIFICATE).stdout.strip(),
            target.run("sha256sum /etc/thor/tls/node.key").stdout.split()[0],
            target.run("supervisorctl pid all").stdout.split(),
        )
    return found


def served_serial(address, port):
    pem = ssl.get_server_certificate((address, port), timeout=5)
    return str(x509.load_pem_x509_certificate(pem.encode()).serial_number)


def test_keys_are_made_on_their_hosts_and_certificates_renew_in_place():
    """No node key at the CA; renewal certifies the hosts' keys anew and every program takes the new
    certificate up without a restart, while the network status keeps every member."""
    pki = os.environ["THOR_MOLECULE_PKI"]
    assert [name for name in os.listdir(os.path.join(pki, "nodes")) if name.endswith(".key")] == []
    for name in PROGRAMS:
        assert host(name).run("stat -c '%a %U %G' /etc/thor/tls/node.key").stdout.split() == ["640", "root", "thor"]
    before = host_certificates()
    members = set(status_where(lambda s: len(s["members"]) == 8, 60, "8 members")["members"])
    assert served_serial(THOR2, 9200) == before["thor2"][0]

    renewed = subprocess.run(
        [sys.executable, "-m", "thor.cli.pki", "--dir", pki, "renew", "--within", "3650"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.count("renewed ") == len(PROGRAMS), renewed.stdout
    polls = roll_out_watching_the_status("renew.yml")
    assert polls and all(seen == members for seen in polls), [sorted(members - seen) for seen in polls]

    after = host_certificates()
    for name in PROGRAMS:
        serial, key, pids = after[name]
        assert serial != before[name][0], f"{name} kept its certificate"
        assert (key, pids) == before[name][1:], f"{name}: a new key or restarted programs"
    # NGNPro's HTTPS and every event server present the new certificate, unrestarted.
    wait_for(lambda: served_serial(THOR2, 9200) == after["thor2"][0], 30, message="NGNPro renewed")
    for name in ("thor1", "thor2", "thor3"):
        wait_for(
            lambda name=name: (
                "TLS files reloaded"
                in host(name).run("grep 'TLS files reloaded' /var/log/supervisor/thor-eventserver.log").stdout
            ),
            30,
            message=f"{name}'s event server reloading its certificate",
        )
    assert set(status_where(lambda s: len(s["members"]) == 8, 30, "8 members")["members"]) == members


def roll_out_watching_the_status(playbook, *extra):
    """Run a playbook and poll the network status meanwhile: the member names of each poll."""
    rollout = Rollout(playbook, *extra)
    polls = []
    deadline = time.monotonic() + 900
    while rollout.running() and time.monotonic() < deadline:
        current = status()
        polls.append(set(current["members"]) if current else set())
    result = rollout.finish(60)
    assert result.returncode == 0, result.stdout[-3000:]
    return polls


class Rollout:
    """ansible-playbook in the background on the cluster. Its output goes to a file: a pipe read
    only at the end fills up (64 KiB; a site.yml run prints about 55 KiB) and then stops the
    playbook at its next line until the test gives up waiting."""

    def __init__(self, playbook, *extra):
        inventory = os.path.dirname(os.environ["MOLECULE_INVENTORY_FILE"])
        project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
        self._output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by finish)
        self._process = subprocess.Popen(
            ["ansible-playbook", "-i", inventory, os.path.join(project, "playbooks", playbook), *extra],
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(project, "roles")),
        )

    def running(self):
        return self._process.poll() is None

    def finish(self, timeout):
        """Its end, killed after timeout more seconds: a CompletedProcess with its output."""
        note = ""
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            note = f"\n[killed: still running {timeout} s after the test stopped waiting]"
        self._output.seek(0)
        output = self._output.read() + note
        self._output.close()
        return subprocess.CompletedProcess(self._process.args, self._process.returncode, output, "")


def test_certificate_revoked_through_the_playbook_is_refused_within_60_s():
    rollout = Rollout("revoke.yml", "-e", json.dumps({"thor_pki_revoke": ["node2"]}))
    try:
        status_where(lambda s: "node2" not in s["members"], 90, "node2 refused")
        refused = datetime.now(UTC)
    finally:
        result = rollout.finish(600)
    assert result.returncode == 0, result.stdout[-3000:]
    with open(os.path.join(os.environ["THOR_MOLECULE_PKI"], "index.json")) as stream:
        # Every certificate node2 held (a renewed one and its predecessor) revoked at once.
        revoked = {c["revoked"] for c in json.load(stream)["certificates"] if c["name"] == "node2" and c["revoked"]}
    assert len(revoked) == 1, revoked
    delay = (refused - datetime.fromisoformat(revoked.pop())).total_seconds()
    print(f"node2 revoked to out of the network status: {delay:.1f} s")
    assert 0 < delay <= 60
    wait_for(
        lambda: "certificate revoked" in host("thor1").run("cat /var/log/supervisor/thor-eventserver.log").stdout,
        30,
        message="the event server refusing node2",
    )
    assert srv_targets() == NODES - {"node2"}


def test_a_crl_renewed_where_the_ca_is_reaches_every_host_over_the_bus():
    """The daily renewal on the controller: thor-pki crl, then publish-crl to the event servers only;
    every host's programs get it over the bus (node2, revoked above, excepted)."""
    pki = os.environ["THOR_MOLECULE_PKI"]
    thor_pki = [sys.executable, "-m", "thor.cli.pki", "--dir", pki]
    renewed = subprocess.run([*thor_pki, "crl"], check=False, capture_output=True, text=True, timeout=60)
    assert renewed.returncode == 0, renewed.stderr
    servers = ",".join(f"172.30.0.{last}:8000" for last in (11, 12, 13))
    published = subprocess.run(
        [*thor_pki, "publish-crl", "--servers", servers, "--timeout", "30"],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert published.returncode == 0, published.stdout + published.stderr
    with open(os.path.join(pki, "crl.pem")) as stream:
        crl = stream.read()
    for name in sorted(set(PROGRAMS) - {"node2"}):
        wait_for(
            lambda name=name: host(name).run("cat /var/lib/thor/crl.pem").stdout == crl,
            30,
            interval=0.5,
            message=f"{name} holding the renewed CRL",
        )
    # What expires when, as the operators' cron would check it: nothing within a week.
    check = host("thor1").run("python3 -m thor.monitor.main --config /etc/thor/config.ini --once --check-pki --wait 5")
    assert check.rc == 0, check.stdout + check.stderr
    assert "the certificate of node1" in check.stdout and "the CRL" in check.stdout


def test_a_ca_rollover_through_the_playbook_moves_every_host_to_the_new_ca_and_keeps_every_member():
    """playbooks/ca-rollover.yml: a new CA trusted, then signing, then alone; every host keeps its
    key and its programs, and the network status keeps every member throughout."""
    pki = os.environ["THOR_MOLECULE_PKI"]
    with open(os.path.join(pki, "ca.crt"), "rb") as stream:
        old_ca = x509.load_pem_x509_certificate(stream.read())
    hosts = sorted(set(PROGRAMS) - {"node2"})  # revoked above: kept out (thor_pki_revoke)
    before = host_certificates()
    members = set(status_where(lambda s: len(s["members"]) == len(hosts), 60, "every member")["members"])
    extra = {"thor_pki_revoke": ["node2"], "thor_pki_rollover_settle": 10}
    polls = roll_out_watching_the_status("ca-rollover.yml", "-e", json.dumps(extra))
    print(f"the rollover took {len(polls)} status polls; members seen each time: {len(members)}")
    assert polls and all(seen == members for seen in polls), [sorted(members - seen) for seen in polls]

    with open(os.path.join(pki, "ca.crt"), "rb") as stream:
        trusted = stream.read()
    new_ca = x509.load_pem_x509_certificate(trusted)
    assert trusted.count(b"BEGIN CERTIFICATE") == 1 and new_ca.subject != old_ca.subject
    assert not os.path.exists(os.path.join(pki, "ca-previous.key"))
    after = host_certificates()
    issuer_of_node_certificate = SERIAL_OF_NODE_CERTIFICATE.replace(".serial_number", ".issuer.rfc4514_string()")
    for name in hosts:
        serial, key, pids = after[name]
        assert serial != before[name][0], f"{name} kept its certificate"
        assert (key, pids) == before[name][1:], f"{name}: a new key or restarted programs"
        assert host(name).run(issuer_of_node_certificate).stdout.strip() == new_ca.subject.rfc4514_string()
        assert host(name).run("cat /etc/thor/tls/ca.crt").stdout.encode() == trusted
    pem = ssl.get_server_certificate((THOR2, 9200), timeout=5)
    assert x509.load_pem_x509_certificate(pem.encode()).issuer == new_ca.subject  # NGNPro, unrestarted
    common_name = new_ca.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    check = host("thor1").run(
        f"python3 -m thor.monitor.main --config /etc/thor/config.ini --once --wait 10 --issuer '{common_name}'"
    )
    assert check.rc == 0, check.stdout + check.stderr
