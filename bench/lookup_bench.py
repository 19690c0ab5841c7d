"""Lookup benchmark: the one-hop lookup's speed, balance and key movement.

1. Lookups per second through the public API (LookupTable.lookup), one core,
   distinct keys, rings of 3 and 100 nodes (target >= 1,000,000).
2. The lookup interface of a real thor-node (1 event server, 1 manager,
   3 sip_proxy nodes): pipelined queries against that one server process
   (target >= 250,000 per second) and the round trip of single queries, p50/p99.
3. Balance: max/mean of keys owned for 3, 10 and 100 nodes (targets <= 1.05
   at 3 and <= 1.15 at 100), for the default point count and the original's 1000.
4. Movement: keys that change owner when one of N nodes leaves or joins,
   against the ideal 1/N (target <= 1.2 x); keys of other nodes never move.

Run: python bench/lookup_bench.py [--keys N] [--runs N]
"""

from gevent import monkey

monkey.patch_all()

import argparse
import os
import random
import socket
import sys
import time

import gevent

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine, median, percentile, temporary_directory

from thor.lookup.client import LookupClient
from thor.lookup.ring import DEFAULT_POINTS, HashRing
from thor.lookup.table import LookupTable
from thor.loopback.network import Overlay, wait_status
from thor.loopback.pki import ScratchPKI

ROLE = "sip_proxy"


def addresses(count, rng=None):
    if rng is None:
        return [f"10.0.{index // 250}.{index % 250 + 1}" for index in range(count)]
    chosen = set()
    while len(chosen) < count:
        chosen.add(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    return sorted(chosen)


def subscriber_keys(count):
    return [f"user{index}@example{index % 97}.com" for index in range(count)]


def api_speed(keys, runs):
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    for nodes in (3, 100):
        table = LookupTable(1, "bench", {ROLE: addresses(nodes)})
        lookup = table.lookup
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            for key in keys:
                lookup(ROLE, key)
            rates.append(len(keys) / (time.perf_counter() - start))
        print(
            f"API, {nodes} nodes x {DEFAULT_POINTS} points, {len(keys):,} distinct keys, {runs} runs: "
            f"median {median(rates):,.0f} lookups/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count())))


def interface_speed(directory, keys, runs):
    pki = ScratchPKI(os.path.join(directory, "pki"))
    overlay = Overlay(directory, pki)
    try:
        overlay.start_eventservers(1)
        overlay.manager("mgr1")
        nodes = [overlay.node(f"node{index + 1}", ROLE, f"127.0.2.{index + 1}") for index in range(3)]
        endpoint = nodes[0].lookup
        observer = overlay.observer()
        status = wait_status(observer, lambda s: len(s.addresses(ROLE)) == 3, timeout=30)
        table = LookupTable.from_status(status)
        client = LookupClient(*endpoint)
        with gevent.Timeout(30):
            while client.query("version")[0] != str(status.version):
                gevent.sleep(0.05)
        sample = keys[:2000]
        answers = client.query(*(f"lookup {ROLE} for {key}" for key in sample))
        wrong = sum(answer != table.lookup(ROLE, key) for key, answer in zip(sample, answers, strict=True))
        print(f"interface answers checked against the local ring: {len(sample)} keys, {wrong} differ")
        if wrong:
            raise SystemExit(f"{wrong} of {len(sample)} interface answers differ from the ring: nothing measured")
        request = b"".join(f"lookup {ROLE} for {key}\r\n".encode() for key in keys)
        expected = [table.lookup(ROLE, key) for key in keys]
        rates = [pipelined(endpoint, request, expected) for _ in range(runs)]
        print(
            f"interface, pipelined, 1 connection, {len(keys):,} queries, {runs} runs: "
            f"median {median(rates):,.0f} queries/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
        round_trips = []
        for key in keys[:5000]:
            start = time.perf_counter()
            client.lookup(ROLE, key)
            round_trips.append((time.perf_counter() - start) * 1e6)
        print(
            f"interface, single queries, 5,000 round trips: p50 {median(round_trips):.0f} us, "
            f"p99 {percentile(round_trips, 0.99):.0f} us"
        )
        client.close()
    finally:
        overlay.close()


def pipelined(endpoint, request, expected):
    """Send every query at once from one greenlet, read the answers in another; queries/s. Every
    answer is checked against expected (the local ring's), after the clock stops."""
    count = len(expected)
    connection = socket.create_connection(endpoint, timeout=60)
    received = 0
    chunks = []

    def send():
        connection.sendall(request)

    start = time.perf_counter()
    sender = gevent.spawn(send)
    while received < count:
        data = connection.recv(1 << 20)
        if not data:
            raise RuntimeError("the lookup interface closed the connection")
        received += data.count(b"\n")
        chunks.append(data)
    elapsed = time.perf_counter() - start
    sender.join()
    connection.close()
    answers = b"".join(chunks).decode().splitlines()
    wrong = sum(answer != want for answer, want in zip(answers, expected, strict=True))
    if wrong:
        raise RuntimeError(f"{wrong} of {count} pipelined answers differ from the ring (errors included)")
    return count / elapsed


def balance(keys):
    rng = random.Random(7)
    for points in (DEFAULT_POINTS, 1000):
        for nodes in (3, 10, 100):
            ring = HashRing(addresses(nodes), points)
            owned = {}
            for key in keys:
                owner = ring.owner(key)
                owned[owner] = owned.get(owner, 0) + 1
            counted = max(owned.values()) / (len(keys) / nodes)
            spread = sorted(max(HashRing(addresses(nodes, rng), points).shares().values()) * nodes for _ in range(50))
            print(
                f"balance, {nodes:3} nodes x {points} points: max/mean of {len(keys):,} keys owned "
                f"{counted:.3f} (nodes 10.0.0.1...); over 50 random address sets, max/mean share "
                f"median {median(spread):.3f}, worst {spread[-1]:.3f}"
            )


def movement(keys):
    for nodes in (3, 10, 100):
        members = addresses(nodes)
        full = HashRing(members)
        smaller = HashRing(members[1:])  # members[0] leaves (or, read backwards, joins)
        before = [full.owner(key) for key in keys]
        after = [smaller.owner(key) for key in keys]
        moved = sum(old != new for old, new in zip(before, after, strict=True))
        strays = sum(old != new and old != members[0] for old, new in zip(before, after, strict=True))
        ratio = (moved / len(keys)) / (1 / nodes)
        print(
            f"movement, 1 of {nodes:3} nodes leaves/joins: {moved / len(keys):.4f} of keys move, "
            f"{ratio:.3f} x the ideal 1/N; keys of other nodes moved: {strays}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    print(f"machine: {machine()}")
    keys = subscriber_keys(options.keys)
    api_speed(keys, options.runs)
    with temporary_directory() as directory:
        interface_speed(directory, keys, options.runs)
    balance(keys)
    movement(keys[:200_000])


if __name__ == "__main__":
    main()
