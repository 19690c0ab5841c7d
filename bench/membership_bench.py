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
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, median, percentile, temporary_directory

from thor.loopback.network import Overlay
from thor.loopback.pki import ScratchPKI

TIMEOUT = 30


class Network(Overlay):
    """3 event servers with the default timers, managers, nodes that join one by one."""

    def __init__(self, directory):
        super().__init__(directory, ScratchPKI(os.path.join(directory, "pki")), domain="bench.test")
        self.retired_logs = []  # of killed managers, before their successor under the same name starts

    def start_servers(self):
        # The event servers' defaults (keepalive 1 s, idle timeout 3 s), not the harness's quick ones.
        self.start_eventservers(3, keepalive=1, idle_timeout=3)

    def node(self, name):
        return super().node(name, "sip_proxy", "127.0.0.50")

    def manager(self, name, address):
        return super().manager(name, address)


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
        process.signal(signal.SIGKILL)
    elif kind == "sigstop":
        process.signal(signal.SIGSTOP)
    else:
        process.signal(signal.SIGTERM)
    wait_status(observer, lambda s: name not in s.members)
    elapsed = time.perf_counter() - start
    if kind == "sigstop":
        process.signal(signal.SIGCONT)
    process.close()
    return elapsed


def failover_trial(network, observer):
    status = wait_status(observer, lambda s: s.manager is not None and len(s.roles.get("thor_manager", ())) == 3)
    active = status.manager
    start = time.perf_counter()
    network.programs[active].kill()
    network.retired_logs.append(network.programs[active].log())
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
            managers_log = "".join([*network.retired_logs, *(network.programs[f"manager{i}"].log() for i in (1, 2, 3))])
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
