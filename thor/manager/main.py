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
from thor.metrics import counter, gauge


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

    def metric_families(self):
        yield from super().metric_families()
        manager = self.manager
        yield gauge("thor_manager_active", "1 when this manager is the active one.", int(manager.active))
        published = manager.published
        yield gauge(
            "thor_manager_status_version",
            "The version of the network status this manager last published (0: none while standing by).",
            published.version if published is not None else 0,
        )
        live = manager.view.status(0, self.identity.name)
        yield gauge(
            "thor_manager_members",
            "Live members holding each role, as this manager sees them.",
            labels=["role"],
            samples=[([role], len(names)) for role, names in sorted(live.roles.items())],
        )
        yield counter(
            "thor_manager_publications",
            "Network statuses published, by kind.",
            labels=["kind"],
            samples=[([kind], count) for kind, count in sorted(manager.publications.items())],
        )
        yield counter("thor_manager_elections", "Changes of the active manager this manager saw.", manager.elections)


def main(argv=None):
    return run(ManagerDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
