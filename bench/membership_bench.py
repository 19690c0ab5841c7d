"""Membership timing benchmarks (issue: membership), with the default timers.

A network of 3 event servers and 3 managers runs on loopback; an observer
(in this process) follows the network status. Per trial a node joins, then:

  kill9     kill -9 of the node           -> gone from the status   (target <= 3 s)
  sigstop   SIGSTOP (no TCP reset)        -> gone from the status   (target <= 5 s)
  leave     SIGTERM (clean stop)          -> gone from the status   (target <= 0.5 s)
  failover  kill -9 of the active manager -> a new active publishes (target <= 3 s)

Times run from the signal to the observer holding the new status. Every loop
is bounded in count and time. Run: python bench/membership_bench.py [--trials N]
"""

from gevent import monkey

monkey.patch_all()

import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    REPO,
    BenchPKI,
    machine,
    median,
    percentile,
    read_text,
    start_eventserver,
    temporary_directory,
    write_config,
)

from thor.events.client import EventClient
from thor.membership.member import OverlayMember
from thor.transport.tls import TLSContexts

TIMEOUT = 30


class Network:
    def __init__(self, directory):
        self.directory = directory
        self.pki = BenchPKI(directory)
        self.processes = {}
        self.servers = []

    def start_servers(self):
        for index in range(3):
            process, port, _ = start_eventserver(self.directory, self.pki, f"es{index + 1}")
            self.servers.append((process, port))

    def start(self, name, module, roles, address, **sections):
        if not os.path.exists(self.pki.ca.certificate_path(name)):
            self.pki.ca.issue(name, roles, address=address)
        config = os.path.join(self.directory, f"{name}.ini")
        network = {"domain": "bench.test", "event_servers": ", ".join(f"127.0.0.1:{p}" for _, p in self.servers)}
        write_config(config, {"ThorNetwork": network, "TLS": self.pki.files(name, roles), **sections})
        log = open(os.path.join(self.directory, f"{name}.log"), "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--config", config],
            stderr=log,
            stdout=log,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.processes[name] = process
        return process

    def node(self, name):
        return self.start(name, "thor.node.main", "sip_proxy", "127.0.0.50", Node={"checks": "sip_proxy=none"})

    def manager(self, name, address):
        return self.start(name, "thor.manager.main", "thor_manager", address)

    def observer(self):
        contexts = TLSContexts(**self.pki.files("observer", "thor_monitor"))
        client = EventClient(contexts, servers=[("127.0.0.1", p) for _, p in self.servers], backoff=(0.1, 1))
        member = OverlayMember(client, "observer", None, announce=False)
        member.start()
        return member

    def close(self):
        for process in [*self.processes.values(), *(p for p, _ in self.servers)]:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def wait_status(observer, predicate, timeout=TIMEOUT):
    status = observer.status.wait(predicate, timeout)
    if status is None:
        raise RuntimeError(f"status condition not reached in {timeout}s; now {observer.status.status!r}")
    return status


def node_trial(network, observer, kind, index):
    name = f"{kind}{index}"
    process = network.node(name)
    wait_status(observer, lambda s: name in s.members)
    start = time.perf_counter()
    if kind == "kill9":
        process.send_signal(signal.SIGKILL)
    elif kind == "sigstop":
        process.send_signal(signal.SIGSTOP)
    else:
        process.send_signal(signal.SIGTERM)
    wait_status(observer, lambda s: name not in s.members)
    elapsed = time.perf_counter() - start
    if kind == "sigstop":
        process.send_signal(signal.SIGCONT)
    process.kill()
    process.wait(10)
    return elapsed


def failover_trial(network, observer):
    status = wait_status(observer, lambda s: s.manager is not None and len(s.roles.get("thor_manager", ())) == 3)
    active = status.manager
    start = time.perf_counter()
    network.processes[active].send_signal(signal.SIGKILL)
    network.processes[active].wait(10)
    wait_status(observer, lambda s: s.manager not in (None, active))
    elapsed = time.perf_counter() - start
    # The killed manager comes back, as the youngest: it must not take over.
    network.manager(active, "127.0.1.9")
    wait_status(observer, lambda s: active in s.members)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    options = parser.parse_args()
    results = {}
    with temporary_directory() as directory:
        network = Network(directory)
        try:
            network.start_servers()
            for index in range(3):
                network.manager(f"manager{index + 1}", f"127.0.1.{index + 1}")
            observer = network.observer()
            wait_status(observer, lambda s: len(s.roles.get("thor_manager", ())) == 3)
            for kind in ("kill9", "sigstop", "leave"):
                results[kind] = [node_trial(network, observer, kind, index) for index in range(options.trials)]
                print(f"{kind}: {summary(results[kind])}", flush=True)
            results["failover"] = [failover_trial(network, observer) for _ in range(options.trials)]
            print(f"failover: {summary(results['failover'])}", flush=True)
            managers_log = "".join(read_text(os.path.join(directory, f"manager{i}.log")) for i in (1, 2, 3))
            print(
                f"'now the active manager' lines in the managers' logs: {managers_log.count('now the active manager')}"
            )
            observer.client.stop(flush_timeout=0)
        finally:
            network.close()
    print(f"machine: {machine()}")


def summary(values):
    return (
        f"n={len(values)} p50 {median(values) * 1000:.0f} ms, p99 {percentile(values, 0.99) * 1000:.0f} ms, "
        f"max {max(values) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
