"""thor-manager: the daemon."""

from gevent import monkey

monkey.patch_all()

import sys

from thor import roles
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import run
from thor.manager.config import ManagerConfig
from thor.manager.manager import Manager
from thor.membership.program import MemberDaemon


class ManagerDaemon(MemberDaemon):
    program = "thor-manager"
    description = "The SIP Thor manager: elects one active manager, which publishes the network status."
    sections = (ThorNetworkConfig, TLSConfig, ManagerConfig)
    required_role = roles.MANAGER
    follow_status = False

    def setup(self):
        settings = self.config[ManagerConfig]
        self.manager = Manager(self.client, self.identity.name, settings.status_interval, settings.coalesce)
        self.manager.start()

    def teardown(self):
        self.manager.stop()


def main(argv=None):
    return run(ManagerDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
