"""thor-node: the daemon."""

from gevent import monkey

monkey.patch_all()

import sys

import gevent

from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, run
from thor.membership.program import MemberDaemon
from thor.node.config import NodeConfig
from thor.node.health import DEFAULT_CHECKS, Check, RoleHealth, parse_check, watch
from thor.roles import INFRASTRUCTURE_ROLES


class NodeDaemon(MemberDaemon):
    program = "thor-node"
    description = "Joins this host's roles to the SIP Thor overlay and health-checks their local services."
    sections = (ThorNetworkConfig, TLSConfig, NodeConfig)

    def roles(self):
        settings = self.config[NodeConfig]
        granted = self.identity.roles
        wanted = settings.roles or sorted(granted - INFRASTRUCTURE_ROLES)
        infrastructure = sorted(set(wanted) & INFRASTRUCTURE_ROLES)
        if infrastructure:
            raise StartupError(
                f"[Node] roles: {', '.join(infrastructure)} are announced by their own programs, not by thor-node"
            )
        missing = sorted(set(wanted) - granted)
        if missing:
            raise StartupError(
                f"[Node] roles: the certificate of {self.identity.name} does not grant {', '.join(missing)} "
                f"(it grants {', '.join(sorted(granted)) or 'nothing'})"
            )
        if not wanted:
            raise StartupError(f"the certificate of {self.identity.name} grants no role thor-node could announce")
        self.health = {}
        for role in wanted:
            check = settings.checks.get(role) or _default_check(role)
            self.health[role] = RoleHealth(role, check, settings.failures, settings.successes)
        # A first round before joining: announce only what answers now.
        for health in self.health.values():
            health.up = health.check.probe(settings.check_timeout)
            self.log.info("role %s: check %s is %s", health.role, health.check, "up" if health.up else "DOWN")
        return self._up_roles()

    def _up_roles(self):
        return [role for role, health in self.health.items() if health.up]

    def setup(self):
        settings = self.config[NodeConfig]
        self._checkers = [
            gevent.spawn(watch, health, settings.check_interval, settings.check_timeout, self._health_changed)
            for health in self.health.values()
        ]

    def teardown(self):
        gevent.killall(self._checkers, block=False)

    def _health_changed(self, health):
        if health.up:
            self.log.info("role %s: %s answers again; announcing the role", health.role, health.check)
        else:
            self.log.warning("role %s: %s does not answer; withdrawing the role", health.role, health.check)
        self.member.set_roles(self._up_roles())


def _default_check(role):
    text = DEFAULT_CHECKS.get(role)
    return parse_check(text) if text else Check("none")


def main(argv=None):
    return run(NodeDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
