"""Media through one relay on this machine, and how fast the relay set follows the network
(issue: media relays).

Part 1, side by side in one run, at rising numbers N of concurrent calls:
  relay   N calls set up through a sip_proxy node (Kamailio + thor-node) whose only media relay
          is one rtpengine (userspace forwarding); both parties send RTP every 20 ms for
          STEP_SECONDS, through the relay
  direct  the same N pairs of streams sent phone to phone, no relay: what the generator itself
          (this process, on the same cores) achieves
Per step: packets lost (sent - received, over all streams) and the RFC 3550 interarrival jitter
of each stream (p99 over streams). A step holds while loss <= 0.1% and jitter p99 <= 10 ms;
the sweep ends at the first step the relay does not hold. Each stream's packets are counted at
the receiving phone, and a call counts only if both SDPs named the relay.

Part 2: SPREAD_CALLS calls from a node of site a with two relays in site a and one in site b:
how many each relay got (the far one none, the two near ones about half each).

Part 3: a relay joins (site a, the calling node's site; the other relay is in site b) or dies
(kill -9), TRIALS times each, while a phone calls through the node without pause: the time from
the status change (as an in-process member of the network receives it) to the first call set up
after it that uses the joining relay / avoids the dead one.

Every loop is bounded in count and time. Run: python bench/media_bench.py [--json]
"""

import argparse
import contextlib
import json
import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gevent
from common import machine, median, percentile

from thor import roles
from thor.loopback.media import MediaNetwork
from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, account
from thor.loopback.phone import Phone
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import wait_for

RELAYS = {"far": ("127.0.6.1", "b"), "near": ("127.0.6.2", "a"), "near2": ("127.0.6.3", "a")}
RELAYS_BY_ADDRESS = {address: name for name, (address, _) in RELAYS.items()}
SITES = {"node1": "a"}
PASSWORD = "a-bench-password"
STEPS = (50, 100, 200, 400, 600, 800)
STEP_SECONDS = 5
INTERVAL = 0.020
MAX_LOSS = 0.001
MAX_JITTER_MS = 10.0
TRIALS = 5
SPREAD_CALLS = 200
PHONE_ADDRESS = "127.0.5.60"
# The RTP payload: the send time (this process's monotonic clock) and 152 bytes of PCMA silence.
PAYLOAD = struct.Struct("!d")


class Stream:
    """What one phone receives: packets, and the RFC 3550 jitter estimate (seconds)."""

    __slots__ = ("jitter", "last_transit", "received")

    def __init__(self):
        self.received, self.jitter, self.last_transit = 0, 0.0, None

    def take(self, packet, source):
        transit = time.monotonic() - PAYLOAD.unpack_from(packet, 12)[0]
        if self.last_transit is not None:
            self.jitter += (abs(transit - self.last_transit) - self.jitter) / 16
        self.last_transit = transit
        self.received += 1


def send_rtp(flows, seconds):
    """flows: [(socket, destination)]; one packet per flow every 20 ms for seconds. Returns the
    packets sent and how far the sender fell behind its schedule at worst (seconds)."""
    header = struct.Struct("!BBHII")
    silence = b"\xd5" * 152
    sent, worst_lag, tick = 0, 0.0, 0
    start = time.monotonic()
    while tick * INTERVAL < seconds:
        for sequence, (sock, destination) in enumerate(flows):
            packet = header.pack(0x80, 8, tick & 0xFFFF, (tick * 160) & 0xFFFFFFFF, sequence)
            sock.sendto(packet + PAYLOAD.pack(time.monotonic()) + silence, destination)
            sent += 1
        tick += 1
        delay = start + tick * INTERVAL - time.monotonic()
        worst_lag = max(worst_lag, -delay)
        gevent.sleep(max(0.0, delay))
    return sent, worst_lag


def measure(pairs, destinations):
    """RTP both ways between each pair of phones (caller, callee) to destinations[i] =
    (where the caller sends, where the callee sends); the step's figures."""
    streams = []
    flows = []
    for (caller, callee), (caller_to, callee_to) in zip(pairs, destinations, strict=True):
        for phone, destination in ((caller, caller_to), (callee, callee_to)):
            stream = Stream()
            phone.on_rtp = stream.take
            streams.append(stream)
            flows.append((phone.rtp, destination))
    sent, lag = send_rtp(flows, STEP_SECONDS)
    expected = sent
    # The last packets in flight: wait until all are in, or a second at most.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: sum(s.received for s in streams) >= expected, 1.0, interval=0.02, message="the last packets")
    received = sum(s.received for s in streams)
    jitters = [s.jitter * 1000 for s in streams]
    return {
        "sent": sent,
        "received": received,
        "loss": round(1 - received / sent, 5) if sent else None,
        "jitter_ms_p50": round(median(jitters), 2),
        "jitter_ms_p99": round(percentile(jitters, 0.99), 2),
        "sender_lag_ms_max": round(lag * 1000, 1),
    }


def held(figures):
    return figures["loss"] <= MAX_LOSS and figures["jitter_ms_p99"] <= MAX_JITTER_MS


def load_sweep(network, callers, callees):
    rows, best = [], 0
    relay = RELAYS["far"][0]
    for count in STEPS:
        pairs = list(zip(callers[:count], callees[:count], strict=True))
        calls = []
        for caller, callee in pairs:
            before = len(callee.incoming)
            call = caller.call(callee.user)
            answered = callee.wait_incoming(before + 1)
            if not (call.media[0] == answered.media[0] == relay):
                raise RuntimeError(f"a call not through the relay: {call.media} / {answered.media}")
            calls.append((call, answered))
        through = measure(pairs, [(call.media, answered.media) for call, answered in calls])
        for call, _ in calls:
            call.hangup()
        direct = measure(pairs, [((e.address, e.rtp_port), (r.address, r.rtp_port)) for r, e in pairs])
        verdict = held(through)
        rows.append({"calls": count, "relay": through, "direct": direct, "held": verdict})
        print(
            f"  {count} calls: relay loss {through['loss']:.4%}, jitter p50/p99 {through['jitter_ms_p50']}/"
            f"{through['jitter_ms_p99']} ms (sender lag {through['sender_lag_ms_max']} ms); direct loss "
            f"{direct['loss']:.4%}, jitter p50/p99 {direct['jitter_ms_p50']}/{direct['jitter_ms_p99']} ms"
            f"{'' if verdict else '  <- not held'}",
            flush=True,
        )
        if not verdict:
            break
        best = count
    return best, rows


def spread(network, caller, callee):
    """{relay address: calls} of SPREAD_CALLS calls from node1 (site a) with two relays in site a
    (near, near2) and one in site b (far)."""
    network.start_relay("near")
    network.start_relay("near2")
    network.status(lambda s: len(s.roles.get(roles.MEDIA_RELAY, ())) == 3, "three relays live")
    counts = {}
    for _ in range(SPREAD_CALLS):
        before = len(callee.incoming)
        call = caller.call(callee.user)
        callee.wait_incoming(before + 1)
        counts[call.media[0]] = counts.get(call.media[0], 0) + 1
        call.hangup()
    network.kill_relay("near")
    network.kill_relay("near2")
    network.status(lambda s: len(s.roles.get(roles.MEDIA_RELAY, ())) == 1, "the near relays gone")
    return counts


def relay_set_changes(network, caller, callee):
    """[(joined seconds, died seconds)]: from the status change to the first call after it that
    uses the joining relay / avoids the dead one."""
    near = RELAYS["near"][0]
    observer = network.observer
    placed = []  # (started, relay address or None)

    def keep_calling(deadline):
        while time.monotonic() < deadline:
            started = time.monotonic()
            before = len(callee.incoming)
            call = caller.call(callee.user)
            callee.wait_incoming(before + 1)
            placed.append((started, call.media[0]))
            call.hangup()

    def changed(predicate):
        deadline = time.monotonic() + 20
        while not predicate(observer.status.status):
            if time.monotonic() > deadline:
                raise RuntimeError("the status did not change within 20 s")
            gevent.sleep(0.002)
        return time.monotonic()

    def first_after(moment, wanted):
        return next((started for started, relay in placed if started >= moment and wanted(relay)), None)

    results = []
    for _ in range(TRIALS):
        placed.clear()
        caller_loop = gevent.spawn(keep_calling, time.monotonic() + 30)
        network.start_relay("near")
        joined = changed(lambda s: "near" in s.roles.get(roles.MEDIA_RELAY, ()))
        wait_for(lambda j=joined: first_after(j, lambda r: r == near) is not None, 5, message="a call on the new relay")
        network.kill_relay("near")
        died = changed(lambda s: "near" not in s.members)
        wait_for(lambda d=died: first_after(d, lambda r: r != near) is not None, 5, message="a call avoiding it")
        caller_loop.kill()
        results.append(
            (first_after(joined, lambda r: r == near) - joined, first_after(died, lambda r: r != near) - died)
        )
        print(f"  joined: {results[-1][0] * 1000:.1f} ms, died: {results[-1][1] * 1000:.1f} ms", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="thor-bench-media-")
    postgresql = PostgreSQL()
    network = None
    phones = []
    report = {"machine": machine()}
    try:
        pki = ScratchPKI(os.path.join(directory, "pki"))
        network = MediaNetwork(directory, pki, postgresql, RELAYS, SITES, relay_ports=(40000, 44999))
        network.start_relay("far")
        network.start_nodes("node1")
        network.status(lambda s: len(s.roles.get(roles.MEDIA_RELAY, ())) == 1, "the relay live")
        soap = network.client()
        soap.addDomain(DOMAIN)
        users = [f"p{index}" for index in range(2 * max(STEPS) + 2)]
        for user in users:
            soap.addAccount(account(user, password=PASSWORD))
        proxy = (NODE_ADDRESSES["node1"], 5060)
        for user in users:
            phone = Phone(user, DOMAIN, PASSWORD, PHONE_ADDRESS, proxy)
            phones.append(phone)
            wait_for(lambda p=phone: p.register()[0] == 200, 20, interval=0.2, message=f"{user} registered")
        print("RTP through one relay against phone to phone:", flush=True)
        callers, callees = phones[: max(STEPS)], phones[max(STEPS) : 2 * max(STEPS)]
        best, rows = load_sweep(network, callers, callees)
        report["load"] = {"held_calls": best, "steps": rows}
        counts = spread(network, phones[-2], phones[-1])
        report["spread"] = {RELAYS_BY_ADDRESS[address]: calls for address, calls in counts.items()}
        print(f"spread of {SPREAD_CALLS} calls from site a: {report['spread']}", flush=True)
        print("relay set changes (an in-process member's status -> the first call after it):", flush=True)
        changes = relay_set_changes(network, phones[-2], phones[-1])
        joined, died = [j * 1000 for j, _ in changes], [d * 1000 for _, d in changes]
        report["relay_set"] = {
            "trials": TRIALS,
            "joined_ms_median": round(median(joined), 1),
            "joined_ms_max": round(max(joined), 1),
            "died_ms_median": round(median(died), 1),
            "died_ms_max": round(max(died), 1),
        }
    finally:
        for phone in phones:
            phone.close()
        if network is not None:
            network.close()
        postgresql.remove()
    print(f"machine: {report['machine']}")
    print(f"concurrent calls held through one relay (loss <= 0.1%, jitter p99 <= 10 ms): {best}")
    relay_set = report["relay_set"]
    print(
        f"first call on a joining relay: median {relay_set['joined_ms_median']} ms, "
        f"max {relay_set['joined_ms_max']} ms; first call avoiding a dead one: "
        f"median {relay_set['died_ms_median']} ms, max {relay_set['died_ms_max']} ms"
    )
    if options.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
