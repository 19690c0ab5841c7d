"""NGNPro benchmark: provisioning operations per second over SOAP/HTTPS, and how soon a change is cached.

A network on loopback: PostgreSQL 15 (fsync off: the figures are NGNPro's,
not the disk's), 1 event server, 1 manager, thor-database, ngnpro and 3
sip_proxy nodes. zeep clients in threads (the way provisioning clients call)
run addAccount, getAccount and changePassword; each figure is the median of
3 runs. Then 200 single changes: the time from the call's return until the
owner node's cache answers the new ha1; the rate at which one keep-alive
client (as Kamailio's http_client) reads HA1s from a node's cache; and how long
a joining node takes to load its share of a large database (the accounts put
in by SQL, not SOAP, to make it large quickly).

Run: python bench/ngnpro_bench.py [--operations N] [--load-accounts N]  (needs PostgreSQL, as make test installs)
"""

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time

import gevent
import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine, median, percentile, temporary_directory

from thor.lookup.table import LookupTable
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, CacheReader, Network, account, cached, ha1, node_at, owner
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import wait_for


def run_threads(clients, operation, count):
    """count calls of operation(client, index) spread over the clients' threads; calls per second."""
    errors = []

    def work(worker):
        for index in range(worker, count, len(clients)):
            try:
                operation(clients[worker], index)
            except Exception as error:
                errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(len(clients))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls, e.g. {errors[0]}")
    return count / elapsed


def get_checked(client, username):
    """getAccount, its answer checked: a call counted is a right answer."""
    answer = client.getAccount({"username": username, "domain": DOMAIN})
    if answer.ha1 != ha1(username, "a-good-password"):
        raise RuntimeError(f"getAccount({username}) answered HA1 {answer.ha1!r}")


def cache_reads(network, count):
    """What a SIP proxy's authentication costs the node: GET /accounts/KEY/ha1 of accounts the node
    holds, one keep-alive client (as Kamailio's http_client keeps its connection); median of 3 runs."""
    address = owner(network, f"visible0@{DOMAIN}")
    node = node_at(network, address)
    keys = [key for key in (f"visible{index}@{DOMAIN}" for index in range(200)) if owner(network, key) == address]
    reader = CacheReader(node)
    try:
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            for index in range(count):
                status, _ = reader.get(f"/accounts/{keys[index % len(keys)]}/ha1")
                if status != 200:
                    raise RuntimeError(f"cache read answered {status}")
            rates.append(count / (time.perf_counter() - start))
        return median(rates)
    finally:
        reader.close()


def join_load(network, count):
    """count more accounts in the database, then node4 joins: seconds from its arrival in the
    status until its cache holds exactly its share of every account, and that share."""

    def fill():
        with psycopg2.connect(network.postgresql.dsn("thor")) as connection, connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO ngnpro_accounts (username, domain, ha1, ha1b, seq) "
                "SELECT 'bulk' || n, %s, md5(n::text), md5('b' || n), nextval('ngnpro_changes') "
                "FROM generate_series(1, %s) AS n",
                (DOMAIN, count),
            )
            cursor.execute("SELECT username || '@' || domain FROM ngnpro_accounts WHERE username NOT LIKE 'bulk%%'")
            return [row[0] for row in cursor.fetchall()]  # (the bulk ones are known: fetching 1M rows holds the GIL)

    # In a thread, so the in-process observer can keep its links (while PostgreSQL inserts a million
    # rows it may still miss a keepalive of the tests' tight settings and reconnect: set-up, not measured).
    keys = gevent.get_hub().threadpool.apply(fill) + [f"bulk{n}@{DOMAIN}" for n in range(1, count + 1)]
    network.start_node("node4")
    address = NODE_ADDRESSES["node4"]
    status = network.status(lambda s: address in s.addresses("sip_proxy"), "node4 in the status")
    joined = time.perf_counter()
    table = LookupTable.from_status(status)
    share = gevent.get_hub().threadpool.apply(lambda: sum(table.lookup("sip_proxy", key) == address for key in keys))
    reader = CacheReader(network.nodes["node4"])
    try:
        wait_for(
            lambda: json.loads(reader.get("/accounts")[1])["accounts"] == share,
            timeout=300,
            interval=0.05,
            message=f"node4 holding its {share} accounts",
        )
        loaded = time.perf_counter() - joined
        check_share(reader, table, address, random.Random(1).sample(range(1, count + 1), min(count, 2000)))
    finally:
        reader.close()
    return loaded, share, len(keys)


def check_share(reader, table, address, numbers):
    """The count is right; are the accounts? Of a sample of the bulk accounts, node4 holds exactly
    those it owns, each with its HA1 (md5 of its number, as fill() made it)."""
    for number in numbers:
        key = f"bulk{number}@{DOMAIN}"
        status, text = reader.get(f"/accounts/{key}/ha1")
        if table.lookup("sip_proxy", key) != address:
            if status != 404:
                raise RuntimeError(f"node4 holds {key}, which it does not own ({status})")
        elif (status, text) != (200, hashlib.md5(str(number).encode()).hexdigest()):
            raise RuntimeError(f"node4 answers {status} {text[:40]!r} for its own {key}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--load-accounts", type=int, default=1000000)
    options = parser.parse_args()
    print(f"machine: {machine()}")
    with temporary_directory() as directory:
        postgresql = PostgreSQL()
        network = None
        try:
            network = Network(directory, ScratchPKI(os.path.join(directory, "pki")), postgresql)
            network.start_nodes("node1", "node2", "node3")
            network.client().addDomain(DOMAIN)
            count = options.operations
            for threads in (1, 4, 8):
                clients = [network.client() for _ in range(threads)]
                rates = {"addAccount": [], "getAccount": [], "changePassword": []}
                for run in range(3):
                    prefix = f"t{threads}r{run}u"
                    rates["addAccount"].append(
                        run_threads(clients, lambda c, i, p=prefix: c.addAccount(account(f"{p}{i}")), count)
                    )
                    rates["getAccount"].append(
                        run_threads(clients, lambda c, i, p=prefix: get_checked(c, f"{p}{i}"), count)
                    )
                    rates["changePassword"].append(
                        run_threads(
                            clients,
                            lambda c, i, p=prefix: c.changePassword(
                                {"username": f"{p}{i}", "domain": DOMAIN}, f"new-password-{i}"
                            ),
                            count,
                        )
                    )
                print(
                    f"{threads} client thread(s), {count} calls per run: "
                    + ", ".join(f"{name} {median(values):,.0f}/s" for name, values in rates.items())
                )
            soap = network.client()
            delays = []
            for index in range(200):
                username = f"visible{index}"
                key = f"{username}@{DOMAIN}"
                home = node_at(network, owner(network, key))
                soap.addAccount(account(username))
                returned = time.perf_counter()
                reader = CacheReader(home)
                try:
                    while reader.get(f"/accounts/{key}")[0] == 404:
                        if time.perf_counter() - returned > 5:
                            raise RuntimeError(f"{key} not cached within 5 s")
                finally:
                    reader.close()
                delays.append((time.perf_counter() - returned) * 1000)
            assert cached(home, key)["ha1"] == ha1(username, "a-good-password")
            print(
                f"call returned -> owner's cache has it, 200 accounts: p50 {median(delays):.1f} ms, "
                f"p99 {percentile(delays, 0.99):.1f} ms"
            )
            print(f"the SIP proxy's read: {cache_reads(network, count):,.0f} GET /accounts/KEY/ha1 per second")
            seconds, share, total = join_load(network, options.load_accounts)
            print(f"a joining node loads its share: {share:,} of {total:,} accounts in {seconds:.2f} s")
        finally:
            if network is not None:
                network.close()
            postgresql.remove()


if __name__ == "__main__":
    main()
