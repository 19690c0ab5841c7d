"""thor-node: the daemon."""

from gevent import monkey

monkey.patch_all()

import logging
import os
import sys
import time

import gevent
from gevent.event import Event

from thor import roles
from thor.accounts.cache import AccountCache, accounts_application
from thor.accounts.protocol import USAGE
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, raise_file_limit, run
from thor.events.topics import STATISTICS
from thor.health import DEFAULT_CHECKS, Check, RoleHealth, health_families, parse_check, watch, withdrawn_roles
from thor.lookup.config import LookupConfig
from thor.lookup.server import LookupServer
from thor.lookup.table import RingFollower
from thor.membership.program import MemberDaemon
from thor.metrics import counter, gauge, histogram
from thor.node.config import NodeConfig
from thor.roles import INFRASTRUCTURE_ROLES
from thor.sip.api import sip_application
from thor.sip.credentials import CredentialMirror
from thor.sip.location import KamailioRPC, RPCError
from thor.sip.media import MediaProxy, RelayChooser, RelayControl
from thor.sip.peers import PeerClient, PeerServer
from thor.sip.service import RING_REMINDER, SipService
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
            health.up = health.probe(settings.check_timeout)
            self.log.info("role %s: check %s is %s", health.role, health.check, "up" if health.up else "DOWN")
        return self._up_roles()

    def _answer_lookups_with_a_status(self):
        self.rings.wait(1)  # the rings built from a first status
        self.lookup_server.start()
        self.log.info("answering lookups (network status v%d)", self.rings.table.version)

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
            self.lookup_server.bind()
        except OSError as problem:
            where = format_address(lookup.listen)
            raise StartupError(f"[Lookup] listen = {where}: {problem.strerror or problem}") from None
        self.rings.start()
        # Lookups are answered once the node has a network status: until then a client waits (a
        # just restarted node has one within a second) instead of getting "error no-status".
        self._lookups_answered = gevent.spawn(self._answer_lookups_with_a_status)
        settings = self.config[NodeConfig]
        self.accounts = AccountCache(self.member, self.rings, reload_interval=settings.account_reload_interval)
        application = accounts_application(self.accounts, settings.accounts_credential)
        self.sip = self.credentials = self.media = self.relay = self.peers = self.peer_server = None
        if self.identity.roles & {roles.SIP_PROXY, roles.MEDIA_RELAY}:
            application = self._start_peers(settings, application)
        try:
            self.accounts_server = HTTPServer(
                settings.accounts_listen,
                application,
                logging.getLogger("thor.node.accounts"),
                max_connections=ACCOUNTS_MAX_CONNECTIONS,
                idle_timeout=lookup.idle_timeout,
            )
            self.accounts_server.start()
        except OSError as problem:
            where = format_address(settings.accounts_listen)
            raise StartupError(f"[Node] accounts_listen = {where}: {problem.strerror or problem}") from None
        self.log.info("account cache for the SIP proxy on http://%s/accounts", format_address(settings.accounts_listen))
        if not settings.accounts_on_loopback:  # the configuration requires a credential there
            self.log.warning(
                "[Node] accounts_listen = %s is not a loopback address: digest hashes are served to whoever "
                "holds accounts_credential, in clear text (HTTP)",
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
        if self.relay is not None:
            self._checkers.append(gevent.spawn(self._report_relay, settings.statistics_interval))
        if self.sip is not None:
            self._checkers.append(gevent.spawn(self._tell_ring_changes))
            self._checkers.append(gevent.spawn(self.credentials.run))

    def _start_peers(self, settings, accounts):
        """What other nodes ask this one (the peer API), and what the SIP proxy asks (/sip/ beside
        /accounts, the media relays of its calls)."""
        self.peers = PeerClient(self.tls, timeout=settings.peer_timeout)
        if roles.SIP_PROXY in self.identity.roles:
            kamailio = KamailioRPC(settings.kamailio_rpc, timeout=settings.peer_timeout / 2)
            self.sip = SipService(
                self.member.address, self.rings, self.member.status, self.accounts, self.peers, kamailio
            )
            self.credentials = CredentialMirror(self.accounts, kamailio)
            chooser = RelayChooser(self.member.status, settings.site)
            self.media = MediaProxy(settings.media_listen, chooser, self.peers, self.identity.name)
            self._listen(self.media, "media_listen", settings.media_listen)
        if roles.MEDIA_RELAY in self.identity.roles:
            self.relay = RelayControl(settings.rtpengine, timeout=settings.peer_timeout / 2)
        self.peer_server = PeerServer(settings.peer_listen, self.tls, self._peer_request)
        self._listen(self.peer_server, "peer_listen", settings.peer_listen)
        if self.sip is None:
            return accounts
        sip = sip_application(self.sip)

        def application(environ, start_response):
            path = environ.get("PATH_INFO", "")
            return (sip if path.startswith("/sip/") else accounts)(environ, start_response)

        return application

    @staticmethod
    def _listen(server, setting, where):
        try:
            server.start()
        except OSError as problem:
            raise StartupError(f"[Node] {setting} = {format_address(where)}: {problem.strerror or problem}") from None

    def _peer_request(self, identity, request):
        if request.get("op") == "ng":
            if self.relay is None:
                return {"result": "error", "reason": "this node is no media relay"}
            return self.relay.respond(request)
        if self.sip is None:
            return {"result": "error", "reason": "this node is no sip_proxy"}
        return self.sip.respond(identity, request)

    def _tell_ring_changes(self):
        """The SIP proxy's processes hold the sip_proxy ring themselves (etc/kamailio/thor_kamailio.py):
        tell it at once when the ring changes, and remind it every RING_REMINDER seconds."""
        changed = Event()

        def on_change(old, new):
            self.sip.ring_changed(old, new)
            changed.set()

        self.rings.on_change(on_change)
        told = None
        while True:
            changed.wait(RING_REMINDER)
            changed.clear()
            generation = self.sip.ring_generation()
            try:
                self.sip.tell_ring_generation()
            except RPCError as problem:
                if told is not False:  # once, until it works again (Kamailio stopped or restarting)
                    self.log.info("could not tell the SIP proxy the ring's generation %s: %s", generation, problem)
                told = False
            else:
                told = True

    def _report_relay(self, interval):
        """A media relay's load on Thor.Statistics (retained): sessions and rates, as the original's
        media relays published them."""
        while True:
            statistics = self.relay.statistics()
            if statistics is not None:
                self.client.publish(
                    STATISTICS, {"name": self.identity.name, "address": self.member.address, **statistics}, retain=True
                )
            gevent.sleep(interval)

    def attributes(self):
        settings = self.config[NodeConfig]
        attributes = {"site": settings.site} if settings.site else {}
        if self.identity.roles & {roles.SIP_PROXY, roles.MEDIA_RELAY}:  # where other nodes consult this one
            attributes["peer_port"] = settings.peer_listen[1]
        return attributes

    def metric_families(self):
        yield from super().metric_families()
        yield counter(
            "thor_node_lookups",
            "Lookup interface queries answered, by command.",
            labels=["command"],
            samples=[([command], count) for command, count in sorted(self.lookup_server.queries.items())],
        )
        yield gauge(
            "thor_node_lookup_connections", "Open lookup interface connections.", self.lookup_server.connections
        )
        yield from health_families(self.health.values())
        accounts, aliases = self.accounts.counts()
        yield gauge(
            "thor_node_accounts_cached",
            "Subscriber entries this node is home for, by kind.",
            labels=["kind"],
            samples=[(["account"], accounts), (["alias"], aliases)],
        )
        yield histogram(
            "thor_node_account_load_seconds",
            "Account loads from NGNPro: from the request to the last part.",
            samples=[((), self.accounts.load_seconds)],
        )
        yield gauge(
            "thor_node_status_ring_version",
            "The network status version the lookup rings are built from.",
            self.rings.table.version,
        )

    def teardown(self):
        gevent.killall(self._checkers, block=False)
        self._lookups_answered.kill(block=False)
        self.lookup_server.stop()
        for server in (self.media, self.peer_server):
            if server is not None:
                server.stop()
        if self.peers is not None:
            self.peers.close()
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
