"""A lookup client that sends pipelined queries as fast as it can and reads the answers
as fast as they come (plain threads, no gevent), for the fairness test.

    lookup_flood.py HOST PORT COUNT     sends COUNT lookups, prints "answered N" when all came back
"""

import socket
import sys
import threading

BATCH = b"".join(f"lookup sip_proxy for user{index}@example.com\r\n".encode() for index in range(10000))


def main(host, port, count):
    connection = socket.create_connection((host, int(port)), timeout=60)
    batches = int(count) // 10000
    wanted = batches * 10000
    answered = 0

    def read():
        nonlocal answered
        while answered < wanted:
            data = connection.recv(1 << 20)
            if not data:
                return
            answered += data.count(b"\n")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(batches):
        connection.sendall(BATCH)
    reader.join(timeout=120)
    print(f"answered {answered}", flush=True)
    return 0 if answered == wanted else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
