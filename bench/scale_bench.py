"""A network of thousands of members on this machine (issue: thousands of members).

3 event servers and 3 managers (processes, the default timers), and N members, each with its
own certificate issued by the project's CA at bench time and its own TLS connection to every
event server, run as lightweight members (thor.membership.member.OverlayMember on the real
EventClient, nothing stubbed) in a few worker processes. For each N it measures:

  converge  from the last member's start until every member holds a status listing all N
  kill      a member's connections end (as when its process dies): p50/p99, over every other
            member, of the time until its status lacks it
  bytes     Thor.Members bytes each member receives per one-member change (every copy, from
            every event server: frames as the servers encode them)
  cost      event server and manager RSS and CPU at rest (10 s) and under 1 change/s (60 s)

Every loop is bounded in count and time. Run: make bench-scale
(or python bench/scale_bench.py [--members 1000,2000,5000] [--workers 4]).
"""

from gevent import monkey

monkey.patch_all()

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import gevent
from gevent.fileobject import FileObjectThread

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, median, percentile, rss_kib, temporary_directory

from thor import roles
from thor.events import protocol
from thor.events.client import EventClient
from thor.events.topics import MEMBERS
from thor.loopback.network import Overlay
from thor.loopback.pki import ScratchPKI
from thor.membership.member import OverlayMember
from thor.pki import CertificateAuthority
from thor.transport.tls import TLSContexts

CONVERGE_LIMIT = 120  # seconds a network may take to converge before the bench calls it stopped
PHASE_LIMIT = 60  # seconds any other phase may take
KILLS = 5  # members killed per size (each one, p50/p99 over every other member)
CHANGES = 10  # one-member changes counted for the bytes per change
CHURN_SECONDS = 60
REST_SECONDS = 10
# The event servers' keepalive (s; idle timeout 3x). The default 1 s: a thousand members in four
# processes on two cores stall now and then for longer than 3 s (each process does the work of
# 250 hosts), and cut links would measure this load generator, not the network.
KEEPALIVE = 5
MAX_HANDSHAKES_ONE_ADDRESS = 1000000


def member_name(index):
    return f"m{index:05d}"


# -- a worker process: its share of the members --------------------------------------------------


class Worker:
    def __init__(self, pki_directory, endpoints, names, total):
        self.pki_directory = pki_directory
        self.endpoints = endpoints
        self.total = total
        self.members = {}
        self.received = {}  # name -> Thor.Members bytes received
        self.names = names
        self.ca = CertificateAuthority(pki_directory)
        self.sizes = {}  # (publisher, session, seq) -> frame bytes

    def files(self, name):
        return {
            "ca": self.ca.ca_certificate_path,
            "certificate": self.ca.certificate_path(name),
            "private_key": self.ca.key_path(name),
            "crl": self.ca.crl_path,
        }

    def start_member(self, name):
        client = EventClient(TLSContexts(**self.files(name)), servers=self.endpoints, connect_timeout=30)
        member = OverlayMember(client, name, "127.0.0.1", [roles.SIP_PROXY])
        self.received.setdefault(name, 0)

        def count(message, name=name):
            self.received[name] += self.frame_size(message)

        client.subscribe(MEMBERS, count, deduplicate=False)
        member.start()
        self.members[name] = member

    def frame_size(self, message):
        """The bytes of message's frame as the servers encode it (once for this process's members)."""
        key = (message.publisher, message.session, message.seq)
        size = self.sizes.get(key)
        if size is None:
            if len(self.sizes) > 100000:
                self.sizes.clear()
            frame = {
                "type": "message",
                "topic": message.topic,
                "publisher": message.publisher,
                "session": message.session,
                "seq": message.seq,
                "body": message.body,
            }
            size = self.sizes[key] = len(protocol.encode(frame, protocol.MAX_SERVER_FRAME_SIZE))
        return size

    def crash(self, name):
        """Its connections end without a goodbye, as when its process dies."""
        self.members.pop(name).client.stop(flush_timeout=0)

    def holding(self, predicate):
        return all(predicate(member.status.status) for member in self.members.values())

    def wait_each(self, predicate, limit):
        """Seconds until each member's status satisfies predicate (None for those that did not)."""
        start, pending, times = time.monotonic(), dict(self.members), {}
        while pending and time.monotonic() - start < limit:
            for name, member in list(pending.items()):
                if predicate(member.status.status):
                    times[name] = time.monotonic() - start
                    del pending[name]
            gevent.sleep(0.005)
        return [times.get(name) for name in self.members]

    def progress(self, every=10.0):
        """A line on stderr (the bench's workers log) every so often: how far this worker got."""
        begin = time.monotonic()
        while True:
            gevent.sleep(every)
            held = [len(m.status.status.members) for m in self.members.values()] or [0]
            links = sum(len(m.client.connected_servers) for m in self.members.values())
            sys.stderr.write(
                f"worker {os.getpid()} at {time.monotonic() - begin:.0f} s: {len(self.members)} of"
                f" {len(self.names)} members started, {links} links up, statuses of {min(held)} to"
                f" {max(held)} members\n"
            )
            sys.stderr.flush()

    def run(self, start_rate):
        gevent.spawn(freeze_survivors)
        gevent.spawn(self.progress)
        # Members join at start_rate a second (operators add them over time; all at once on two
        # cores, each process would spend its time on the others' joins and miss keepalives).
        begin = time.monotonic()
        for index, name in enumerate(self.names):
            gevent.sleep(max(0.0, begin + index / start_rate - time.monotonic()))
            self.start_member(name)
        report({"event": "started", "time": time.time()})
        commands = FileObjectThread(sys.stdin)
        for line in commands:
            command = json.loads(line)
            kind = command["command"]
            if kind == "converge":
                full = lambda status: len(status.roles.get(roles.SIP_PROXY, ())) == self.total  # noqa: E731
                deadline = time.monotonic() + CONVERGE_LIMIT
                while not self.holding(full) and time.monotonic() < deadline:
                    gevent.sleep(0.01)
                counts = [len(m.status.status.roles.get(roles.SIP_PROXY, ())) for m in self.members.values()]
                connected = [len(m.client.connected_servers) for m in self.members.values()]
                report(
                    {
                        "event": "converged",
                        "ok": self.holding(full),
                        "time": time.time(),
                        "held": [min(counts), max(counts)],
                        "links": [min(connected), max(connected)],
                    }
                )
            elif kind == "kill":
                victim = command["name"]
                if victim in self.members:
                    self.crash(victim)
                report({"event": "killed", "time": time.time()})
            elif kind == "gone":
                victim, since = command["name"], command["since"]
                offset = time.time() - since
                times = self.wait_each(lambda status, v=victim: v not in status.members, PHASE_LIMIT)
                report({"event": "gone", "times": [None if t is None else t + offset for t in times]})
            elif kind == "back":
                victim = command["name"]
                if victim in self.names and victim not in self.members:
                    self.start_member(victim)
                report({"event": "back"})
            elif kind == "bytes":
                counted = [name for name in self.received if name not in command["exclude"]]
                report({"event": "bytes", "received": {name: self.received[name] for name in counted}})
            elif kind == "wait":
                total = command["total"]
                full = lambda status, t=total: len(status.roles.get(roles.SIP_PROXY, ())) == t  # noqa: E731
                times = self.wait_each(full, PHASE_LIMIT)
                report({"event": "waited", "ok": all(t is not None for t in times)})
            elif kind == "stop":
                break


def freeze_survivors():
    """Keep the collector's full passes off what has survived a second.

    A worker holds hundreds of members' statuses (about 2 million objects at 2,000 members
    and 250 members a worker, where one host holds a few thousand), and each full pass of the
    cyclic collector walks all of them: measured, 21 of the 36 s a worker spent taking 250
    snapshots of 2,000 members went there, in pauses of up to 3 s that cut links. Statuses
    hold no reference cycles (refcounting frees them), so freezing survivors loses nothing.
    """
    while True:
        gc.freeze()
        gevent.sleep(1.0)


def report(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the parent: the network and the measurements -----------------------------------------------


class WorkerProcess:
    def __init__(self, pki_directory, endpoints, names, total, log, rate):
        arguments = json.dumps(
            {"pki": pki_directory, "endpoints": endpoints, "names": names, "total": total, "rate": rate}
        )
        self.names = set(names)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def send(self, **command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def read(self, event, limit):
        with gevent.Timeout(limit, TimeoutError(f"no {event!r} from a worker in {limit}s")):
            while True:
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"a worker ended before {event!r}")
                message = json.loads(line)
                if message["event"] == event:
                    return message

    def stop(self):
        if self.process.poll() is None:
            try:
                self.send(command="stop")
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def ask_all(workers, event, limit, **command):
    for worker in workers:
        worker.send(**command)
    return [worker.read(event, limit) for worker in workers]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def usage(programs, seconds, during=None):
    """{name: (RSS MiB at the end, CPU % over seconds)} of programs, while during() runs."""
    before = {name: cpu_seconds(program.pid) for name, program in programs.items()}
    start = time.monotonic()
    if during is not None:
        during(seconds)
    else:
        gevent.sleep(seconds)
    elapsed = time.monotonic() - start
    return {
        name: (rss_kib(program.pid) / 1024, 100 * (cpu_seconds(program.pid) - before[name]) / elapsed)
        for name, program in programs.items()
    }


def issue(pki, count):
    start = time.monotonic()
    for index in range(count):
        if not pki.has(member_name(index)):
            pki.issue(member_name(index), roles.SIP_PROXY, address="127.0.0.1")
    return time.monotonic() - start


def measure(directory, pki, total, worker_count, log, churn_seconds=CHURN_SECONDS, start_rate=25):
    os.makedirs(directory, exist_ok=True)
    overlay = Overlay(directory, pki, domain="bench.test")
    # Every member connects from 127.0.0.1 here: no per-address handshake limit.
    overlay.start_eventservers(
        3, keepalive=KEEPALIVE, idle_timeout=3 * KEEPALIVE, max_handshakes_per_source=MAX_HANDSHAKES_ONE_ADDRESS
    )
    for index in range(3):
        overlay.manager(f"manager{index + 1}", address=f"127.0.1.{index + 1}")
    overlay.wait_started()
    endpoints = [list(server.endpoint) for server in overlay.eventservers]
    programs = {server.name: server for server in overlay.eventservers}
    programs.update({name: overlay.programs[name] for name in ("manager1", "manager2", "manager3")})
    names = [member_name(index) for index in range(total)]
    shares = [names[index::worker_count] for index in range(worker_count)]
    rate = start_rate / worker_count
    workers = [WorkerProcess(pki.directory, endpoints, share, total, log, rate) for share in shares]
    result = {"members": total}
    try:
        # The workers fall behind their schedule when they saturate the machine (2,000 members
        # on two cores): how fast they join is not what is measured, so they get three times it.
        limit = 3 * total / start_rate + CONVERGE_LIMIT
        try:
            last_start = max(worker.read("started", limit)["time"] for worker in workers)
        except TimeoutError:
            result["stopped"] = (
                f"the worker processes did not start all {total} members within {limit:.0f} s: each does the"
                f" work of {total // worker_count} hosts; the overlay's programs meanwhile: "
                + ", ".join(f"{name} {rss:.0f} MiB {cpu:.0f}%" for name, (rss, cpu) in usage(programs, 5).items())
            )
            return result
        converged = ask_all(workers, "converged", CONVERGE_LIMIT + 10, command="converge")
        result["converge_s"] = max(message["time"] for message in converged) - last_start
        if not all(message["ok"] for message in converged):
            held = [message["held"] for message in converged]
            links = [message["links"] for message in converged]
            result["stopped"] = (
                f"not every member held all {total} within {CONVERGE_LIMIT} s"
                f" (sip_proxy members held, min/max per worker: {held}; links up: {links})"
            )
            return result
        result["rest"] = usage(programs, REST_SECONDS)
        # Kills: each time, every other member's time until its status lacks the victim.
        gone = []
        for kill in range(KILLS):
            victim = names[kill * 7 % total]
            since = time.time()
            ask_all(workers, "killed", PHASE_LIMIT, command="kill", name=victim)
            for message in ask_all(workers, "gone", PHASE_LIMIT + 10, command="gone", name=victim, since=since):
                gone.extend(message["times"])
            ask_all(workers, "back", PHASE_LIMIT, command="back", name=victim)
            ask_all(workers, "waited", PHASE_LIMIT + 10, command="wait", total=total)
        missing = sum(1 for value in gone if value is None)
        times = [value for value in gone if value is not None]
        result["kill_p50_s"], result["kill_p99_s"], result["kill_missed"] = (
            median(times),
            percentile(times, 0.99),
            missing,
        )
        # Bytes per one-member change: CHANGES changes (a leave, a return), counted at every member
        # but the ones that left and returned (each of those got the whole status on its return).
        victims = [names[(change * 13 + 3) % total] for change in range(CHANGES // 2)]
        before = {}
        for message in ask_all(workers, "bytes", PHASE_LIMIT, command="bytes", exclude=victims):
            before.update(message["received"])
        for victim in victims:
            ask_all(workers, "killed", PHASE_LIMIT, command="kill", name=victim)
            ask_all(workers, "gone", PHASE_LIMIT + 10, command="gone", name=victim, since=time.time())
            ask_all(workers, "back", PHASE_LIMIT, command="back", name=victim)
            ask_all(workers, "waited", PHASE_LIMIT + 10, command="wait", total=total)
        received = 0
        for message in ask_all(workers, "bytes", PHASE_LIMIT, command="bytes", exclude=victims):
            received += sum(count - before[name] for name, count in message["received"].items())
        result["bytes_per_change_per_member"] = received / (len(victims) * 2) / len(before)

        def churn(seconds):
            # One change a second: a member leaves (its connections end), next second it returns.
            victim, deadline = names[total // 2], time.monotonic() + seconds
            while time.monotonic() < deadline:
                ask_all(workers, "killed", PHASE_LIMIT, command="kill", name=victim)
                gevent.sleep(1.0)
                ask_all(workers, "back", PHASE_LIMIT, command="back", name=victim)
                gevent.sleep(1.0)

        result["churn"] = usage(programs, churn_seconds, churn)
        return result
    finally:
        for worker in workers:
            worker.stop()
        overlay.close()


def print_result(result):
    print(f"\n{result['members']} members")
    if "converge_s" in result:
        print(f"  converged {result['converge_s']:.1f} s after the last member started")
    if "stopped" in result:
        print(f"  STOPPED: {result['stopped']}")
        return
    print(
        f"  a killed member gone from every other member's status: p50 {result['kill_p50_s'] * 1000:.0f} ms,"
        f" p99 {result['kill_p99_s'] * 1000:.0f} ms ({result['kill_missed']} never)"
    )
    print(f"  Thor.Members bytes per one-member change, per member: {result['bytes_per_change_per_member']:.0f}")
    for phase in ("rest", "churn"):
        print(
            f"  {phase}: " + ", ".join(f"{n} {rss:.0f} MiB {cpu:.0f}% CPU" for n, (rss, cpu) in result[phase].items())
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="1000,2000", help="network sizes, comma separated")
    parser.add_argument("--workers", type=int, default=4, help="processes the members run in")
    parser.add_argument("--churn-seconds", type=int, default=CHURN_SECONDS, help="of 1 change/s")
    parser.add_argument("--start-rate", type=float, default=25, help="members joining per second")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        settings = json.loads(arguments.worker)
        endpoints = [tuple(endpoint) for endpoint in settings["endpoints"]]
        Worker(settings["pki"], endpoints, settings["names"], settings["total"]).run(settings["rate"])
        return
    print(machine())
    sizes = [int(size) for size in arguments.members.split(",")]
    with temporary_directory() as directory:
        print(f"working in {directory}", flush=True)
        pki = ScratchPKI(os.path.join(directory, "pki"))
        results = []
        for total in sizes:
            print(f"\nissuing certificates up to {total} members: {issue(pki, total):.0f} s", flush=True)
            with open(os.path.join(directory, f"workers-{total}.log"), "w") as log:
                result = measure(
                    os.path.join(directory, str(total)),
                    pki,
                    total,
                    arguments.workers,
                    log,
                    arguments.churn_seconds,
                    arguments.start_rate,
                )
            print_result(result)
            results.append(result)
            if "stopped" in result:
                break
        print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
