"""Event server benchmarks (issue: thor-eventserver).

1. fan-out: one publisher, 100 subscribers, one event server process, TLS on
   loopback; messages delivered per second (deliveries = messages x subscribers).
2. members: 1,000 members connect over TLS to one event server (hello,
   subscribe, retained presence); connect time and the server's RSS.

Every loop is bounded in count and time. Run: make bench-eventserver
(or python bench/eventserver_bench.py [--trials N]).
"""

from gevent import monkey

monkey.patch_all()

import argparse
import json
import os
import resource
import sys
import time

import gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

from common import machine, median, percentile, rss_kib, temporary_directory

from thor.events import protocol
from thor.loopback.network import EventServerProcess
from thor.loopback.pki import ScratchPKI
from thor.transport.framing import FrameDecoder
from thor.transport.tls import TLSContexts, connect

HELLO = protocol.encode({"type": "hello", "version": 1})
TOPIC = "Bench.Fanout"
TIME_LIMIT = 120  # seconds any one phase may take


def member(endpoint, contexts, topics=(), presence=None):
    """A raw member: TLS, hello, subscriptions, optional retained presence; returns the socket."""
    tls_socket, _ = connect(endpoint, contexts, timeout=30)
    frames = [HELLO]
    if topics:
        frames.append(protocol.encode({"type": "subscribe", "topics": list(topics)}))
    if presence is not None:
        frames.append(
            protocol.encode(
                {
                    "type": "publish",
                    "topic": "Thor.Presence",
                    "session": "b",
                    "seq": 1,
                    "retain": True,
                    "body": presence,
                }
            )
        )
    frames.append(protocol.encode({"type": "ping"}))
    tls_socket.sendall(b"".join(frames))
    decoder = FrameDecoder(protocol.MAX_SERVER_FRAME_SIZE)
    # Wait for the pong: the server has handled everything above.
    while True:
        data = tls_socket.recv(65536)
        if not data:
            raise ConnectionError("closed during set-up")
        if any(b'"pong"' in payload for payload in decoder.feed(data)):
            return tls_socket


def keepalive(sockets, interval=0.5):
    ping = protocol.encode({"type": "ping"})
    while True:
        gevent.sleep(interval)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.sendall(ping)


def fanout(endpoint, pki, subscribers=100, messages=20000, window=200):
    sub_contexts = TLSContexts(**pki.files("subscriber", "sip_proxy"))
    pub_contexts = TLSContexts(**pki.files("publisher", "sip_proxy"))
    counts = [0] * subscribers
    body = {"call": "x" * 64}
    expected = [
        protocol.encode(
            {"type": "message", "topic": TOPIC, "publisher": "publisher", "session": "p", "seq": seq, "body": body},
        )[4:]
        for seq in range(1, messages + 1)
    ]
    sockets = [member(endpoint, sub_contexts, [TOPIC]) for _ in range(subscribers)]
    publisher = member(endpoint, pub_contexts)
    pinger = gevent.spawn(keepalive, [*sockets, publisher])

    def drain(index, sock):
        decoder = FrameDecoder(protocol.MAX_SERVER_FRAME_SIZE)
        while counts[index] < messages:
            data = sock.recv(262144)
            if not data:
                return
            for payload in decoder.feed(data):
                if payload.startswith(b'{"type":"pong"'):
                    continue
                # Each publication once, in order, whole: compared byte for byte with the frame the
                # server makes of it (cheap enough not to make the subscribers the bottleneck).
                if counts[index] >= messages or payload != expected[counts[index]]:
                    raise RuntimeError(
                        f"subscriber {index}: frame {counts[index] + 1} is not the one due: {payload[:80]}"
                    )
                counts[index] += 1

    readers = [gevent.spawn(drain, index, sock) for index, sock in enumerate(sockets)]
    started = time.perf_counter()
    deadline = time.monotonic() + TIME_LIMIT
    sent = 0
    while sent < messages and time.monotonic() < deadline:
        # A window keeps the server's per-subscriber queues bounded.
        while sent - min(counts) >= window:
            gevent.sleep(0.001)
            if time.monotonic() > deadline:
                break
        batch = min(window // 4, messages - sent)
        publisher.sendall(
            b"".join(
                protocol.encode({"type": "publish", "topic": TOPIC, "session": "p", "seq": sent + i + 1, "body": body})
                for i in range(batch)
            )
        )
        sent += batch
    gevent.joinall(readers, timeout=max(1, deadline - time.monotonic()))
    for reader in readers:
        if reader.exception is not None:
            raise reader.exception
    elapsed = time.perf_counter() - started
    pinger.kill()
    for sock in [*sockets, publisher]:
        sock.close()
    delivered = sum(counts)
    if delivered != messages * subscribers:
        raise RuntimeError(f"only {delivered} of {messages * subscribers} deliveries within {TIME_LIMIT}s")
    return delivered / elapsed, messages / elapsed


def many_members(endpoint, pki, server_pid, count=1000, concurrency=50):
    contexts = TLSContexts(**pki.files("member", "sip_proxy"))
    rss_before = rss_kib(server_pid)
    sockets, durations = [], []
    pool = gevent.pool.Pool(concurrency)

    def one(index):
        start = time.perf_counter()
        sock = member(endpoint, contexts, ["Thor.Members"], {"name": "member", "roles": ["sip_proxy"], "n": index})
        durations.append(time.perf_counter() - start)
        sockets.append(sock)

    started = time.perf_counter()
    with gevent.Timeout(TIME_LIMIT):
        for index in range(count):
            pool.spawn(one, index)
        pool.join(raise_error=True)
    total = time.perf_counter() - started
    pinger = gevent.spawn(keepalive, sockets)
    gevent.sleep(2)  # the server holds them through a few keepalive rounds
    rss_after = rss_kib(server_pid)
    alive = len(sockets)
    pinger.kill()
    for sock in sockets:
        sock.close()
    return {
        "members": alive,
        "connect_all_s": total,
        "connect_p50_ms": percentile(durations, 0.5) * 1000,
        "connect_p99_ms": percentile(durations, 0.99) * 1000,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "rss_per_member_kib": (rss_after - rss_before) / alive,
    }


def start_eventserver(directory, pki, name):
    """An event server with the default timers, room for the members' connections (all from one
    address and of one certificate here: no per-address handshake limit, no per-name limit)."""
    server = EventServerProcess(
        directory,
        pki,
        name,
        keepalive=1,
        idle_timeout=3,
        max_connections=5000,
        max_handshakes_per_source=5000,
        max_connections_per_name=5000,
    )
    server.wait_ready(20)
    return server


def main():
    import gevent.pool  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    results = {"machine": machine(), "fanout": [], "members": []}
    with temporary_directory() as directory:
        pki = ScratchPKI(os.path.join(directory, "pki"))
        for trial in range(options.trials):
            server = start_eventserver(directory, pki, f"es{trial}")
            try:
                deliveries, messages = fanout(server.endpoint, pki, messages=options.messages)
                results["fanout"].append({"deliveries_per_s": deliveries, "messages_per_s": messages})
                print(f"fan-out trial {trial + 1}: {deliveries:,.0f} deliveries/s ({messages:,.0f} messages/s)")
            finally:
                server.stop()
        for trial in range(max(1, options.trials // 2)):
            server = start_eventserver(directory, pki, f"em{trial}")
            try:
                outcome = many_members(server.endpoint, pki, server.pid, count=options.members)
                results["members"].append(outcome)
                print(
                    f"members trial {trial + 1}: {outcome['members']} connected in {outcome['connect_all_s']:.2f}s, "
                    f"p50 {outcome['connect_p50_ms']:.1f} ms, server RSS {outcome['rss_before_mib']:.1f} -> "
                    f"{outcome['rss_after_mib']:.1f} MiB"
                )
            finally:
                server.stop()
    deliveries = [r["deliveries_per_s"] for r in results["fanout"]]
    members = results["members"]
    summary = {
        "fanout_deliveries_per_s_median": median(deliveries),
        "fanout_messages_per_s_median": median([r["messages_per_s"] for r in results["fanout"]]),
        "members_connect_all_s_median": median([m["connect_all_s"] for m in members]),
        "members_connect_p50_ms_median": median([m["connect_p50_ms"] for m in members]),
        "members_connect_p99_ms_median": median([m["connect_p99_ms"] for m in members]),
        "members_rss_after_mib_median": median([m["rss_after_mib"] for m in members]),
        "members_rss_per_member_kib_median": median([m["rss_per_member_kib"] for m in members]),
    }
    results["summary"] = summary
    print(f"machine: {results['machine']}")
    for key, value in summary.items():
        print(f"{key}: {value:,.2f}")
    if options.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
