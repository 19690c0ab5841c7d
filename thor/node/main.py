"""thor-node: the daemon."""

from gevent import monkey

monkey.patch_all()

import logging
import os
import sys
import time

import gevent

from thor import roles
from thor.accounts.cache import AccountCache, accounts_application
from thor.accounts.protocol import USAGE
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, raise_file_limit, run
from thor.health import DEFAULT_CHECKS, Check, RoleHealth, parse_check, watch, withdrawn_roles
from thor.lookup.config import LookupConfig
from thor.lookup.server import LookupServer
from thor.lookup.table import RingFollower
from thor.membership.program import MemberDaemon
from thor.node.config import NodeConfig
from thor.roles import INFRASTRUCTURE_ROLES
from thor.transport.http import HTTPServer
from thor.transport.tls import format_address

# The SIP proxy's processes on this host keep one connection each to the account cache.
ACCOUNTS_MAX_CONNECTIONS = 100


class NodeDaemon(MemberDaemon):
    program = "thor-node"
    description = "Joins this host's roles to the SIP Thor overlay and health-checks their local services."
    sections = (ThorNetworkConfig, TLSConfig, NodeConfig, LookupConfig)

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

    def withdrawn(self):
        return withdrawn_roles(self.health.values())

    def setup(self):
        lookup = self.config[LookupConfig]
        self.rings = RingFollower(self.member.status, self.config[ThorNetworkConfig].ring_points)
        self.lookup_server = LookupServer(
            lookup.listen,
            lambda: self.rings.table,
            max_connections=lookup.max_connections,
            max_connections_per_address=lookup.max_connections_per_address,
            idle_timeout=lookup.idle_timeout,
            max_line_length=lookup.max_line_length,
        )
        # Lookup clients, the SIP proxy's HTTP connections, event servers, health checks and files:
        # running out of descriptors would fail the health checks and withdraw the node's roles.
        raise_file_limit(self.lookup_server.file_descriptors + ACCOUNTS_MAX_CONNECTIONS + 256)
        try:
            self.lookup_server.start()
        except OSError as problem:
            where = format_address(lookup.listen)
            raise StartupError(f"[Lookup] listen = {where}: {problem.strerror or problem}") from None
        self.rings.start()
        settings = self.config[NodeConfig]
        self.accounts = AccountCache(self.member, self.rings, reload_interval=settings.account_reload_interval)
        try:
            self.accounts_server = HTTPServer(
                settings.accounts_listen,
                accounts_application(self.accounts),
                logging.getLogger("thor.node.accounts"),
                max_connections=ACCOUNTS_MAX_CONNECTIONS,
                idle_timeout=lookup.idle_timeout,
            )
            self.accounts_server.start()
        except OSError as problem:
            where = format_address(settings.accounts_listen)
            raise StartupError(f"[Node] accounts_listen = {where}: {problem.strerror or problem}") from None
        self.log.info("account cache for the SIP proxy on http://%s/accounts", format_address(settings.accounts_listen))
        if not settings.accounts_on_loopback:
            self.log.warning(
                "[Node] accounts_listen = %s is not a loopback address: anyone who reaches it reads digest hashes",
                format_address(settings.accounts_listen),
            )
        if roles.SIP_PROXY in self.identity.roles:
            self.accounts.start()
        else:  # the event servers would refuse its subscriptions: the accounts are sip_proxy nodes'
            self.log.info("the certificate grants no %s: the account cache stays empty", roles.SIP_PROXY)
        self._checkers = [
            gevent.spawn(watch, health, settings.check_interval, settings.check_timeout, self._health_changed)
            for health in self.health.values()
        ]
        self._checkers.append(gevent.spawn(self._report_usage, settings.usage_interval))

    def teardown(self):
        gevent.killall(self._checkers, block=False)
        self.lookup_server.stop()
        self.accounts_server.stop()
        self.accounts.stop()
        self.rings.stop()

    def _report_usage(self, interval):
        """What this node does, for NGNPro's getStatistics (retained: a newcomer sees it at once)."""
        started = time.time()
        while True:
            accounts, aliases = self.accounts.counts()
            self.client.publish(
                USAGE,
                {
                    "name": self.identity.name,
                    "address": self.member.address,
                    "uptime": round(time.time() - started, 1),
                    "accounts": accounts,
                    "aliases": aliases,
                    "lookups": self.lookup_server.answered,
                    "lookup_connections": self.lookup_server.connections,
                    "load_average": os.getloadavg()[0],
                },
                retain=True,
            )
            gevent.sleep(interval)

    def _health_changed(self, health):
        if health.up:
            self.log.info("role %s: %s answers again; announcing the role", health.role, health.check)
        else:
            self.log.warning("role %s: %s does not answer; withdrawing the role", health.role, health.check)
        self.member.set_roles(self._up_roles(), self.withdrawn())


def _default_check(role):
    text = DEFAULT_CHECKS.get(role)
    return parse_check(text) if text else Check("none")


def main(argv=None):
    return run(NodeDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
