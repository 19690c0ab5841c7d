"""thor-dns benchmark: how soon DNS answers follow the network status, on both backends.

A network (1 event server, 1 manager, 4 sip_proxy nodes) with two thor-dns:
one embedded, one writing PowerDNS 4.7 (gpgsql, PostgreSQL 15). Per trial a
fifth node joins and is killed; the time runs from the moment the observer
takes the status without it (its change callback, not a poll) to the DNS
server answering NXDOMAIN for its name (target <= 1 s); the whole path from
the kill is reported beside it. Also: queries answered per second by one sequential client,
and how evenly 1,000 sliced SRV answers spread over the nodes.

Run: python bench/dns_bench.py [--trials N]  (needs PowerDNS and PostgreSQL, as make test installs)
"""

from gevent import monkey

monkey.patch_all()

import argparse
import collections
import os
import sys
import time

import dns.message
import dns.query
import dns.rcode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine, median, percentile, temporary_directory

from thor.loopback.network import Overlay, wait_status
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import SCHEMA, PostgreSQL, PowerDNS
from thor.loopback.process import free_port

DOMAIN = "sipthor.test"


def ask(server, name, rdtype):
    return dns.query.udp(dns.message.make_query(name, rdtype), server[0], port=server[1], timeout=2)


def wait_until(condition, timeout=10, interval=0.002):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("condition not reached")
        time.sleep(interval)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    options = parser.parse_args()
    with temporary_directory() as directory:
        pki = ScratchPKI(os.path.join(directory, "pki"))
        overlay = Overlay(directory, pki)
        postgresql = PostgreSQL()
        powerdns = None
        try:
            postgresql.create_database("pdns")
            overlay.start_eventservers(1)
            overlay.manager("manager1")
            for index in range(4):
                overlay.node(f"node{index + 1}", "sip_proxy", f"127.0.0.{11 + index}")
            observer = overlay.observer()
            embedded = ("127.0.0.1", free_port())
            common = {"answer_limit": 3, "nameservers": "ns1=127.0.0.53"}
            overlay.start(
                "dns1",
                "thor.dns.main",
                "thor_dnsmanager",
                "127.0.0.53",
                DNS=dict(common, backend="embedded", listen=f"{embedded[0]}:{embedded[1]}"),
            )
            overlay.start(
                "dns2",
                "thor.dns.main",
                "thor_dnsmanager",
                "127.0.0.54",
                DNS=dict(
                    common,
                    backend="powerdns",
                    database_host="127.0.0.1",
                    database_port=postgresql.port,
                    database_name="pdns",
                    database_user="postgres",
                    database_sslrootcert=postgresql.ca,
                    powerdns_schema=SCHEMA,
                ),
            )
            overlay.programs["dns2"].wait_log("zone sipthor.test serial", timeout=20)
            powerdns = PowerDNS(directory, postgresql, "pdns")
            servers = {"embedded": embedded, "powerdns": powerdns.address}
            delays = {name: [] for name in servers}
            from_kill = {name: [] for name in servers}
            gone_at = {}  # name -> when the observer took the first status without it

            def note_departures(old, new):
                for departed in set(old.members) - set(new.members):
                    gone_at.setdefault(departed, time.monotonic())

            observer.status.on_change(note_departures)
            for trial in range(options.trials):
                name = f"extra{trial}"
                node = overlay.node(name, "sip_proxy", "127.0.0.30")
                for server in servers.values():
                    wait_until(lambda s=server, n=name: ask(s, f"{n}.{DOMAIN}.", "A").answer, timeout=20)
                killed = time.monotonic()
                node.kill()
                wait_status(observer, lambda s, n=name: n not in s.members, timeout=10)
                changed = gone_at[name]
                pending = dict(servers)
                while pending:
                    for backend, server in list(pending.items()):
                        if ask(server, f"{name}.{DOMAIN}.", "A").rcode() == dns.rcode.NXDOMAIN:
                            answered = time.monotonic()
                            delays[backend].append(answered - changed)
                            from_kill[backend].append(answered - killed)
                            del pending[backend]
                    if time.monotonic() - changed > 10:
                        raise RuntimeError(f"{list(pending)} still answer for {name}")
                    time.sleep(0.002)
            for backend, values in delays.items():
                print(
                    f"{backend}: DNS follows the status in p50 {median(values) * 1000:.0f} ms, "
                    f"p99 {percentile(values, 0.99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
                    f"(n={len(values)}); from the kill: p50 {median(from_kill[backend]) * 1000:.0f} ms, "
                    f"p99 {percentile(from_kill[backend], 0.99) * 1000:.0f} ms"
                )
            for backend, server in servers.items():
                started, count = time.perf_counter(), 0
                while time.perf_counter() - started < 3 and count < 100000:
                    reply = ask(server, f"_sip._udp.{DOMAIN}.", "SRV")
                    if reply.rcode() != dns.rcode.NOERROR or len(reply.answer[0]) != 3:
                        raise RuntimeError(f"{backend}: a counted SRV answer is wrong: {reply}")
                    count += 1
                rate = count / (time.perf_counter() - started)
                seen = collections.Counter()
                for _ in range(1000):
                    answer = ask(server, f"_sip._udp.{DOMAIN}.", "SRV").answer[0]
                    seen.update(record.target.to_text().split(".")[0] for record in answer)
                spread = max(seen.values()) / min(seen.values())
                print(
                    f"{backend}: {rate:,.0f} SRV queries/s (one sequential client); 1,000 answers of 3 of 4 "
                    f"nodes: {dict(sorted(seen.items()))}, max/min {spread:.2f}"
                )
            observer.client.stop(flush_timeout=0)
        finally:
            if powerdns is not None:
                powerdns.stop()
            overlay.close()
            postgresql.remove()
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
