"""SIP through the overlay against the same Kamailio alone (issue: SIP over the overlay).

Side by side in one run, on this machine:
  overlay  3 sip_proxy nodes (thor-node + Kamailio with etc/kamailio/thor.cfg), NGNPro and
           PostgreSQL; devices spread over the 3 nodes, each REGISTER going to the
           subscriber's home node, each call consulting the caller's and callee's homes
  single   one Kamailio with a local user table (bench/kamailio-single.cfg: auth_db over
           db_text), no overlay; as many Kamailio worker processes as the 3 nodes together

For each, sipp offers REGISTERs then calls (INVITE with digest, ACK, BYE at once) at rising
rates; a step counts when every transaction succeeded and sipp kept up with the offered
rate. Reported: the highest such rate of each, their ratio (target >= 0.7), the CPU each
side's SIP service spent per transaction at the same rates (sipp not counted: "at equal
CPU"), and the call setup time (INVITE with credentials to 200 OK) p50/p99 at a moderate
rate. Every run is bounded in count and time. Run: python bench/sip_bench.py [--children N] [--json]
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, cpu_seconds, machine, median, percentile

from thor.loopback.kamailio import Kamailio
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, SipNetwork, account
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import free_port, wait_for
from thor.loopback.sipp import Sipp

NODES = ("node1", "node2", "node3")
PASSWORD = "bench-password"
SINGLE = "127.0.6.1"
REGISTER_RATES = (400, 800, 1200, 1600, 2000, 2400, 2800, 3200, 3600, 4000, 4800, 5600, 6400, 8000, 9600, 11200, 12800)
CALL_RATES = (50, 100, 150, 200, 250, 300, 350, 400, 500, 600, 800)
# Subscribers provisioned; a step that needs more transactions goes round them again
# (a second REGISTER refreshes a binding, a second call is another call).
USERS = 2000
# Calls per rate step: long enough to be a rate, short enough to bound the run.
SECONDS_PER_STEP = 5


def ha1(user):
    return hashlib.md5(f"{user}:{DOMAIN}:{PASSWORD}".encode()).hexdigest()


class Single:
    """Kamailio alone with the bench users in a db_text subscriber table."""

    def __init__(self, directory, users, children):
        self.directory = os.path.join(directory, "single")
        database = os.path.join(self.directory, "db")
        os.makedirs(database)
        with open(os.path.join(database, "version"), "w") as stream:
            stream.write("id(int,auto) table_name(string) table_version(int)\n0:subscriber:7\n")
        with open(os.path.join(database, "subscriber"), "w") as stream:
            stream.write("id(int,auto) username(string) domain(string) password(string) ha1(string) ha1b(string)\n")
            for index, user in enumerate(users):
                stream.write(f"{index + 1}:{user}:{DOMAIN}:unused:{ha1(user)}:unused\n")
        config = os.path.join(self.directory, "single.cfg")
        with open(config, "w") as stream:
            stream.write(
                "#!KAMAILIO\n"
                f'#!define BENCH_ADDRESS "{SINGLE}"\n'
                f'#!define BENCH_DB "text://{database}"\n'
                f"#!define BENCH_CHILDREN {children}\n"
                f'include_file "{os.path.join(REPO, "bench", "kamailio-single.cfg")}"\n'
            )
        self.kamailio = Kamailio(self.directory, SINGLE, ("127.0.0.1", 1), children=children)
        self.kamailio.config = config
        self.kamailio.start()

    def close(self):
        self.kamailio.stop()


def register_step(directory, tag, targets, users, rate, ports):
    """rate x SECONDS_PER_STEP REGISTERs over users, spread evenly over targets, from the same
    address and port at every step (a user's REGISTER refreshes its one binding: no stale
    contact for a call to fork to); (ok, failed, seconds)."""
    runs = []
    for index, target in enumerate(targets):
        share = users[index :: len(targets)]
        address = f"127.0.7.{index + 1}"
        rows = [[user, DOMAIN, PASSWORD] for user in share]
        port = ports.setdefault(index, free_port(address))
        sipp = Sipp(directory, f"{tag}-reg-{rate}-{index}", "register", (address, port), rows, target)
        runs.append((sipp, rate * SECONDS_PER_STEP // len(targets)))
    started = time.monotonic()
    for sipp, count in runs:
        sipp.start(["-m", str(count), "-r", str(max(1, rate // len(targets))), "-timeout", "60s", "-timeout_error"])
    results = [sipp.result(sipp.process.wait(90)) for sipp, _ in runs]
    elapsed = time.monotonic() - started
    return sum(r.successful for r in results), sum(r.failed for r in results), elapsed, results


def call_step(directory, tag, targets, callers, callees, rate, count):
    """count calls callers[i] -> callees[i] through targets (spread), at rate in all."""
    runs = []
    for index, target in enumerate(targets):
        rows = [[a, DOMAIN, PASSWORD, b] for a, b in list(zip(callers, callees, strict=True))[index :: len(targets)]]
        address = f"127.0.8.{index + 1}"
        sipp = Sipp(
            directory, f"{tag}-call-{rate}-{index}", "call", (address, free_port(address)), rows, target, hold_ms=0
        )
        runs.append((sipp, count // len(targets)))
    started = time.monotonic()
    for sipp, share in runs:
        sipp.start(["-m", str(share), "-r", str(max(1, rate // len(targets))), "-timeout", "60s", "-timeout_error"])
    results = [sipp.result(sipp.process.wait(90)) for sipp, _ in runs]
    elapsed = time.monotonic() - started
    setup = [value for result in results for value in result.setup_ms]
    return sum(r.successful for r in results), sum(r.failed for r in results), elapsed, setup


def answering_devices(directory, tag, targets, users):
    """Devices of users registered through targets (spread), then answering every call."""
    devices = []
    for index, target in enumerate(targets):
        share = users[index :: len(targets)]
        address = f"127.0.9.{index + 1}"
        local = (address, free_port(address))
        result = Sipp(
            directory, f"{tag}-callees-{index}", "register", local, [[u, DOMAIN, PASSWORD] for u in share], target
        ).run(len(share), rate=200, timeout=60)
        if result.failed or result.successful != len(share):
            raise RuntimeError(f"{tag}: callee registration failed: {result.errors[-2000:]}")
        devices.append(Sipp(directory, f"{tag}-answer-{index}", "answer", local).start())
    return devices


def sweep(step, rates, cpu):
    """The step at each rate until one fails or falls behind; the highest rate that held. cpu():
    the CPU seconds each part of the side's SIP service used so far ({part: seconds}); the whole
    per transaction and each part's share are reported."""
    rows, best = [], 0
    for rate in rates:
        before = cpu()
        ok, failed, elapsed, _ = step(rate)
        parts = {part: seconds - before[part] for part, seconds in cpu().items()}
        used = sum(parts.values())
        achieved = ok / elapsed if elapsed else 0.0
        held = failed == 0 and ok > 0 and achieved >= 0.9 * rate
        rows.append(
            {
                "rate": rate,
                "ok": ok,
                "failed": failed,
                "seconds": round(elapsed, 2),
                "achieved_per_s": round(achieved, 1),
                "cpu_ms_per_transaction": round(1000 * used / ok, 3) if ok else None,
                "cpu_share": {part: round(seconds / used, 2) for part, seconds in parts.items()} if used else None,
                "held": held,
            }
        )
        verdict = "" if held else "  <- not held"
        print(
            f"  offered {rate}/s: {ok} ok, {failed} failed in {elapsed:.1f}s ({achieved:.0f}/s), "
            f"CPU {rows[-1]['cpu_ms_per_transaction']} ms each {rows[-1]['cpu_share']}{verdict}",
            flush=True,
        )
        if not held:
            break
        best = rate
    return best, rows


def cpu_ratio(single_steps, overlay_steps):
    """At the highest rate both sides held: each side's CPU per transaction and their ratio
    (single / overlay: the share of the single node's rate the overlay keeps at equal CPU)."""
    held = {row["rate"]: row for row in single_steps if row["held"]}
    common = [row for row in overlay_steps if row["held"] and row["rate"] in held]
    if not common:
        return None
    overlay = common[-1]
    single_ms, overlay_ms = held[overlay["rate"]]["cpu_ms_per_transaction"], overlay["cpu_ms_per_transaction"]
    return {
        "rate": overlay["rate"],
        "single_ms": single_ms,
        "overlay_ms": overlay_ms,
        "ratio": round(single_ms / overlay_ms, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=2, help="Kamailio workers per overlay node (single: 3x)")
    parser.add_argument("--only", choices=("register", "calls"), help="one of the two sweeps (quicker)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    users = [f"b{index}" for index in range(USERS)]
    callers, callees = users[: len(users) // 2], users[len(users) // 2 :]
    directory = tempfile.mkdtemp(prefix="thor-bench-sip-")
    postgresql = PostgreSQL()
    network = single = None
    devices = []
    report = {"machine": machine(), "users": len(users)}
    kinds = [kind for kind in ("register", "calls") if options.only in (None, kind)]
    try:
        network = SipNetwork(
            directory, ScratchPKI(os.path.join(directory, "pki")), postgresql, children=options.children
        )
        network.start_nodes(*NODES)
        soap = network.client()
        soap.addDomain(DOMAIN)
        for user in users:
            soap.addAccount(account(user, password=PASSWORD))
        overlay = [(NODE_ADDRESSES[name], 5060) for name in NODES]
        wait_for(lambda: all(network.nodes[n].log().count("entries owned") >= 1 for n in NODES), 60)
        single = Single(directory, users, options.children * len(NODES))
        # As many sipp processes (callers and answering devices) on each side: sipp is one thread.
        alone = [(SINGLE, 5060)] * len(NODES)
        nodes = [program.process.pid for name, program in network.overlay.programs.items() if name in NODES]
        daemons = [*network.overlay.programs.values(), *network.overlay.eventservers]
        others = [program.process.pid for program in daemons]
        cpu_of = {
            "single": lambda: {"kamailio": cpu_seconds(groups=[single.kamailio.process.pid])},
            "overlay": lambda: {
                "kamailio": cpu_seconds(groups=[kamailio.process.pid for kamailio in network.kamailios.values()]),
                "thor-node": cpu_seconds(nodes),
                "other daemons": cpu_seconds(set(others) - set(nodes)),
            },
        }
        # The callers register in the sweep; the callees' only binding is their answering device's.
        for tag, targets in (("single", alone), ("overlay", overlay)) if "register" in kinds else ():
            print(f"{tag}: REGISTER", flush=True)
            ports = {}
            best, rows = sweep(
                lambda rate, t=targets, tag=tag, ports=ports: register_step(directory, tag, t, callers, rate, ports),
                REGISTER_RATES,
                cpu_of[tag],
            )
            report[f"{tag}_register"] = {"held_per_s": best, "steps": rows}
        for _, targets in (("single", alone), ("overlay", overlay)) if "register" not in kinds else ():
            register_step(directory, "warm", targets, callers, 400, {})  # the callers, as the sweep leaves them
        for tag, targets in (("single", alone), ("overlay", overlay)) if "calls" in kinds else ():
            devices = answering_devices(directory, tag, targets, callees)
            print(f"{tag}: calls", flush=True)
            # Setup times at a moderate rate first, before a step overloads anything.
            _, failed, _, setup = call_step(directory, f"{tag}-timed", targets, callers, callees, 50, 500)
            best, rows = sweep(
                lambda rate, t=targets, tag=tag: call_step(
                    directory, tag, t, callers, callees, rate, rate * SECONDS_PER_STEP
                ),
                CALL_RATES,
                cpu_of[tag],
            )
            report[f"{tag}_calls"] = {
                "held_per_s": best,
                "steps": rows,
                "setup_ms_p50_at_50_per_s": round(median(setup), 1) if setup else None,
                "setup_ms_p99_at_50_per_s": round(percentile(setup, 0.99), 1) if setup else None,
                "timed_failed": failed,
            }
            for device in devices:
                device.stop()
            devices = []
        for kind in kinds:
            single_rate = report[f"single_{kind}"]["held_per_s"]
            report[f"{kind}_ratio"] = (
                round(report[f"overlay_{kind}"]["held_per_s"] / single_rate, 2) if single_rate else None
            )
            steps = report[f"single_{kind}"]["steps"], report[f"overlay_{kind}"]["steps"]
            report[f"{kind}_cpu_ratio"] = cpu_ratio(*steps)
    finally:
        for device in devices:
            device.stop()
        if single is not None:
            single.close()
        if network is not None:
            network.close()
        postgresql.remove()
    print(f"machine: {report['machine']}")
    for kind in kinds:
        print(
            f"{kind}: single {report[f'single_{kind}']['held_per_s']}/s, overlay "
            f"{report[f'overlay_{kind}']['held_per_s']}/s, ratio {report[f'{kind}_ratio']}"
        )
        cpu = report[f"{kind}_cpu_ratio"]
        if cpu:
            print(
                f"{kind} CPU per transaction at {cpu['rate']}/s (both held): single {cpu['single_ms']} ms, "
                f"overlay {cpu['overlay_ms']} ms, ratio {cpu['ratio']}"
            )
    for tag in ("single", "overlay") if "calls" in kinds else ():
        calls = report[f"{tag}_calls"]
        print(
            f"{tag} call setup at 50/s: p50 {calls['setup_ms_p50_at_50_per_s']} ms, "
            f"p99 {calls['setup_ms_p99_at_50_per_s']} ms, failed {calls['timed_failed']}"
        )
    if options.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
