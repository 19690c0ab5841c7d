"""thor-database: the daemon.

Runs beside the provisioning database (PostgreSQL) and announces the role
thor_database with the database's location as attributes, while the database
accepts connections:

    {"host": "192.0.2.30", "port": 5432, "database": "thor", "priority": 10}

Several may run; consumers take the live one with the lowest priority. A
password is never published: consumers have their own credentials.
"""

from gevent import monkey

monkey.patch_all()

import sys

import gevent

from thor import roles
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import run
from thor.database.config import DatabaseConfig
from thor.health import Check, RoleHealth, health_families, watch, withdrawn_roles
from thor.membership.program import MemberDaemon

ROLE = roles.DATABASE


class DatabaseDaemon(MemberDaemon):
    program = "thor-database"
    description = "Publishes the location of the SIP Thor provisioning database."
    sections = (ThorNetworkConfig, TLSConfig, DatabaseConfig)
    required_role = ROLE

    def roles(self):
        settings = self.config[DatabaseConfig]
        host = settings.host or "127.0.0.1"
        check = Check("tcp", host, settings.port) if settings.check else Check("none")
        self.health = RoleHealth(ROLE, check, failures=2, successes=2)
        self.health.up = self.health.probe(settings.check_timeout)
        self.log.info("database check %s is %s", check, "up" if self.health.up else "DOWN")
        return [ROLE] if self.health.up else []

    def withdrawn(self):
        return withdrawn_roles([self.health])

    def attributes(self):
        settings = self.config[DatabaseConfig]
        network = self.config[ThorNetworkConfig]
        return {
            "host": settings.host or network.address or "",
            "port": settings.port,
            "database": settings.database,
            "priority": settings.priority,
        }

    def setup(self):
        if not self.member.attributes["host"]:
            self.member.attributes["host"] = self.member.address
        settings = self.config[DatabaseConfig]
        self._checker = gevent.spawn(
            watch, self.health, settings.check_interval, settings.check_timeout, self._health_changed
        )

    def metric_families(self):
        yield from super().metric_families()
        yield from health_families([self.health])

    def teardown(self):
        self._checker.kill(block=False)

    def _health_changed(self, health):
        state = "accepts connections again" if health.up else "does not accept connections"
        self.log.warning("database %s %s", health.check, state)
        self.member.set_roles([ROLE] if health.up else [], self.withdrawn())


def main(argv=None):
    return run(DatabaseDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
