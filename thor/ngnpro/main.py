"""ngnpro: the NGNPro provisioning server (role provisioning_server).

Serves the SOAP/XML API over HTTPS, stores every change in the provisioning
database that thor-database announces, publishes each committed change to
the nodes, answers the nodes' requests for the accounts they own (when it
is the active NGNPro: the longest-running live one), and keeps the usage
statistics nodes report. Several may run.
"""

from gevent import monkey

monkey.patch_all()

import logging
import ssl
import sys
import time

import gevent

from thor import roles
from thor.accounts.loads import AccountLoads
from thor.accounts.protocol import USAGE, usage_report
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, run
from thor.events.topics import STATISTICS
from thor.lookup.table import RingFollower
from thor.membership.program import MemberDaemon
from thor.metrics import counter, gauge, histogram
from thor.ngnpro.config import NGNPRO_PORT, NGNProConfig
from thor.ngnpro.provisioning import Provisioning
from thor.ngnpro.soap import CallStatistics, wsgi_application
from thor.ngnpro.store import Store, StoreUnavailableError
from thor.ngnpro.throttle import LoginThrottle
from thor.pgsql import make_dsn
from thor.sip.media import relay_report
from thor.transport.http import HTTPServer
from thor.transport.tls import format_address

MAX_CLIENTS = 1000
# Connections from one IP address at once: a provisioning system needs a few; a stranger holding
# idle sockets (a TLS handshake waits 10 s, a request 60 s) takes no more than this of the 1000.
MAX_CLIENTS_PER_SOURCE = 64
# Nodes' loads read at once (each holds a database connection and a snapshot); more wait. Never
# all of [NGNPro] pool_size: SOAP calls keep at least one connection.
MAX_LOADS = 2
# Usage reports kept (one per node name).
MAX_NODES = 100000
http_log = logging.getLogger("ngnpro.http")
IDLE_TIMEOUT = 60


class NGNProDaemon(MemberDaemon):
    program = "ngnpro"
    description = "The NGNPro provisioning server of SIP Thor: SOAP/XML, PostgreSQL, push to the responsible nodes."
    sections = (ThorNetworkConfig, TLSConfig, NGNProConfig)
    required_role = roles.PROVISIONING_SERVER

    def attributes(self):
        return {"port": self.config[NGNProConfig].listen[1] or NGNPRO_PORT}

    def setup(self):
        settings = self.config[NGNProConfig]
        tls = self.config[TLSConfig]
        self.usage = {}
        self.relays = {}  # media relays' Thor.Statistics, per name
        self.calls = CallStatistics()  # every SOAP call, for the metrics
        self._announced_database = None  # (dsn, when last announced: monotonic)
        self.rings = RingFollower(self.member.status, self.config[ThorNetworkConfig].ring_points)
        self.store = Store(
            self._database_dsn, pool_size=settings.pool_size, statement_timeout=settings.statement_timeout
        )
        self.provisioning = Provisioning(
            self.store,
            self.client,
            lambda: self.member.status.status,
            settings.username,
            settings.password,
            self.usage,
            self.relays,
        )
        self.loads = AccountLoads(
            self.client,
            self.member.status,
            self.rings,
            self.store.snapshot,
            self.active,
            settings.batch_size,
            max_loads=min(MAX_LOADS, settings.pool_size - 1),
            unavailable=(StoreUnavailableError,),
        )
        self.loads.start()
        self.client.subscribe(USAGE, self._usage)
        self.client.subscribe(STATISTICS, self._relay_statistics)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        https_files = (settings.certificate or tls.certificate, settings.private_key or tls.private_key)
        try:
            context.load_cert_chain(*https_files)
        except (OSError, ssl.SSLError) as problem:
            raise StartupError(f"[NGNPro] the HTTPS certificate or key cannot be loaded: {problem}") from None
        # A renewed certificate is taken up by new HTTPS connections without a restart, with the
        # node's TLS files (the default; a separate HTTPS certificate changes with them or at restart).
        self.tls.add_reload_callback(lambda _contexts: self._reload_https(context, https_files))
        try:
            self.soap = wsgi_application(
                self.provisioning,
                LoginThrottle(settings.login_failures, settings.login_window, settings.login_penalty),
                self.calls,
            )
            self.server = HTTPServer(
                settings.listen,
                self.soap,
                http_log,
                max_connections=MAX_CLIENTS,
                max_connections_per_source=MAX_CLIENTS_PER_SOURCE,
                idle_timeout=IDLE_TIMEOUT,
                tls_context=context,
            )
        except OSError as problem:
            where = format_address(settings.listen)
            raise StartupError(f"[NGNPro] listen = {where}: {problem.strerror or problem}") from None
        self.rings.start()
        self.log.info("SOAP/XML interface on https://%s/ngnpro/wsdl", format_address(settings.listen))
        # Calls are taken once the network status says where the database is: until then a
        # client waits (a just restarted ngnpro has a status within a second) instead of getting
        # DatabaseUnavailable.
        self._calls_taken = gevent.spawn(self._take_calls_with_a_status)

    def _take_calls_with_a_status(self):
        status = self.member.status.wait(lambda status: status.version > 0)
        self.server.start()
        self.log.info("taking calls (network status v%d)", status.version)

    def _reload_https(self, context, files):
        try:
            context.load_cert_chain(*files)
        except (OSError, ssl.SSLError) as problem:
            self.log.error("keeping the HTTPS certificate in use: %s or %s cannot be loaded: %s", *files, problem)

    def metric_families(self):
        yield from super().metric_families()
        calls = self.calls
        yield counter(
            "thor_ngnpro_calls",
            "SOAP calls, by operation and outcome (ok, or the fault code).",
            labels=["operation", "outcome"],
            samples=[([operation, outcome], count) for (operation, outcome), count in sorted(calls.outcomes.items())],
        )
        yield histogram(
            "thor_ngnpro_call_seconds",
            "How long SOAP calls took, by operation.",
            labels=["operation"],
            samples=[((operation,), seconds) for operation, seconds in sorted(calls.seconds.items())],
        )
        yield counter(
            "thor_ngnpro_database_errors", "Transactions the provisioning database failed.", self.store.errors
        )
        yield counter(
            "thor_ngnpro_pushes", "Batches of committed changes pushed to the nodes.", self.provisioning.pushed
        )
        yield counter(
            "thor_ngnpro_unpushed_changes",
            "Committed changes no event server took (nodes reload them).",
            self.provisioning.unpublished,
        )
        yield gauge("thor_ngnpro_active", "1 when this NGNPro answers the nodes' account requests.", int(self.active()))

    def teardown(self):
        self._calls_taken.kill(block=False)
        self.loads.stop()  # before the store closes: a killed load hands its connection back
        self.server.stop(timeout=2)
        self.rings.stop()
        self.store.close()

    def _database_dsn(self):
        """The provisioning database announced by thor-database (the lowest priority wins); while
        none is, the last one for [NGNPro] database_grace seconds; then None."""
        status = self.member.status.status
        databases = [(status.attributes(name, roles.DATABASE), name) for name in status.roles.get(roles.DATABASE, ())]
        settings = self.config[NGNProConfig]
        if not databases:
            last = self._announced_database
            if last is not None and time.monotonic() - last[1] <= settings.database_grace:
                return last[0]
            return None
        attributes, chosen = min(databases, key=lambda pair: (pair[0].get("priority", 0), pair[1]))
        dsn = make_dsn(
            host=attributes.get("host") or status.members[chosen]["address"],
            port=attributes.get("port", 5432),
            dbname=attributes.get("database", "thor"),
            user=settings.database_user,
            password=settings.database_password,
            sslmode=settings.database_sslmode,
            sslrootcert=settings.database_sslrootcert or self.config[TLSConfig].ca,
        )
        self._announced_database = (dsn, time.monotonic())
        return dsn

    def active(self):
        """The longest-running live NGNPro answers the nodes' requests (the others stand by)."""
        status = self.member.status.status
        server = roles.PROVISIONING_SERVER
        servers = [(status.service(name, server)["since"], name) for name in status.roles.get(server, ())]
        return bool(servers) and min(servers)[1] == self.identity.name

    def _usage(self, message):
        self._keep(self.usage, usage_report(message.body))

    def _relay_statistics(self, message):
        self._keep(self.relays, relay_report(message.body))

    @staticmethod
    def _keep(reports, report):
        if report is not None and (report["name"] in reports or len(reports) < MAX_NODES):
            reports[report["name"]] = (time.time(), report)


def main(argv=None):
    return run(NGNProDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
