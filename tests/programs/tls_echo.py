"""A minimal daemon on the Thor daemon base, for tests of the base and of TLS in a real process.

It answers each line a peer sends with the peer's node name and roles.
"""

from gevent import monkey

monkey.patch_all()

import sys

from thor.daemon import Daemon, run
from thor.datatypes import Endpoint
from thor.transport.tls import TLSServer


def echo_identity(tls_socket, identity):
    stream = tls_socket.makefile("rwb")
    for line in stream:
        stream.write(f"{identity.name} {','.join(sorted(identity.roles))} {line.decode().strip()}\n".encode())
        stream.flush()


class EchoDaemon(Daemon):
    program = "thor-test-echo"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--listen", required=True, type=Endpoint(0).parse)

    def start(self):
        tls = self.config[next(iter(self.config))]
        self.server = TLSServer(
            self.options.listen, self.tls, echo_identity, handshake_timeout=tls.handshake_timeout, name="echo"
        )
        self.server.start()
        self.log.debug("listening on %s:%d", *self.server.address)

    def stop(self):
        self.server.stop(timeout=2)
        super().stop()


if __name__ == "__main__":
    sys.exit(run(EchoDaemon))
