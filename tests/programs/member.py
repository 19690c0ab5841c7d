"""A minimal overlay member for event server tests: it connects to the event
servers of its configuration and publishes its presence (retained) with the
roles given on the command line.
"""

from gevent import monkey

monkey.patch_all()

import sys

from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import Daemon, run
from thor.events.client import EventClient
from thor.events.topics import LEAVE, PRESENCE
from thor.identity import Identity


class Member(Daemon):
    program = "thor-test-member"
    sections = (ThorNetworkConfig, TLSConfig)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--roles", default="")

    def start(self):
        identity = Identity.load(self.config[TLSConfig].certificate)
        self.name = identity.name
        self.client = EventClient.from_config(self.config[ThorNetworkConfig], self.tls)
        self.client.on_connect(lambda link: self.log.info("connected to %s", link.server_name))
        roles = [role for role in self.options.roles.split(",") if role]
        self.client.publish(PRESENCE, {"name": self.name, "roles": roles}, retain=True)
        self.client.start()

    def stop(self):
        self.client.publish(LEAVE, {"name": self.name})
        self.client.stop()
        super().stop()


if __name__ == "__main__":
    sys.exit(run(Member))
