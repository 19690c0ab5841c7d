"""ngnpro: the NGNPro provisioning server (role provisioning_server).

Serves the SOAP/XML API over HTTPS, stores every change in the provisioning
database that thor-database announces, publishes each committed change to
the nodes, answers the nodes' requests for the accounts they own (when it
is the active NGNPro: the longest-running live one), and keeps the usage
statistics nodes report. Several may run.
"""

from gevent import monkey

monkey.patch_all()

import contextlib
import logging
import ssl
import sys
import time

import gevent
import gevent.lock
import psycopg2.extensions

from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, run
from thor.events.topics import ACCOUNTS_WANTED, USAGE, accounts_topic
from thor.lookup.table import RingFollower
from thor.membership.program import MemberDaemon
from thor.ngnpro.config import NGNPRO_PORT, NGNProConfig
from thor.ngnpro.provisioning import Provisioning, record_batches, usage_report
from thor.ngnpro.soap import wsgi_application
from thor.ngnpro.store import Store, StoreUnavailableError
from thor.transport.http import HTTPServer
from thor.transport.tls import format_address

ROLE = "provisioning_server"
NODE_ROLE = "sip_proxy"
DATABASE_ROLE = "thor_database"
MAX_CLIENTS = 1000
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
    required_role = ROLE

    def attributes(self):
        return {"port": self.config[NGNProConfig].listen[1] or NGNPRO_PORT}

    def setup(self):
        settings = self.config[NGNProConfig]
        tls = self.config[TLSConfig]
        self.usage = {}
        self._loads = {}  # node name -> its _Load, waiting or being answered
        self._load_slots = gevent.lock.BoundedSemaphore(min(MAX_LOADS, settings.pool_size - 1))
        self.rings = RingFollower(self.member.status, self.config[ThorNetworkConfig].ring_points)
        self.store = Store(
            self._database_dsn, pool_size=settings.pool_size, statement_timeout=settings.statement_timeout
        )
        self.provisioning = Provisioning(
            self.store, self.client, lambda: self.member.status.status, settings.username, settings.password, self.usage
        )
        self.client.subscribe(ACCOUNTS_WANTED, self._accounts_wanted)
        self.client.subscribe(USAGE, self._usage)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(settings.certificate or tls.certificate, settings.private_key or tls.private_key)
        except (OSError, ssl.SSLError) as problem:
            raise StartupError(f"[NGNPro] the HTTPS certificate or key cannot be loaded: {problem}") from None
        try:
            self.server = HTTPServer(
                settings.listen,
                wsgi_application(self.provisioning),
                http_log,
                max_connections=MAX_CLIENTS,
                idle_timeout=IDLE_TIMEOUT,
                tls_context=context,
            )
        except OSError as problem:
            where = format_address(settings.listen)
            raise StartupError(f"[NGNPro] listen = {where}: {problem.strerror or problem}") from None
        self.server.start()
        self.rings.start()
        self.log.info("SOAP/XML interface on https://%s/ngnpro/wsdl", format_address(settings.listen))

    def teardown(self):
        # Before the store closes: a killed load hands its connection back on the way out.
        gevent.killall([load.greenlet for load in self._loads.values()], timeout=2)
        self.server.stop(timeout=2)
        self.rings.stop()
        self.store.close()

    def _database_dsn(self):
        """The provisioning database announced by thor-database (the lowest priority wins), or None."""
        status = self.member.status.status
        databases = [
            (status.attributes(member["name"], DATABASE_ROLE), member) for member in status.role_members(DATABASE_ROLE)
        ]
        if not databases:
            return None
        attributes, chosen = min(databases, key=lambda pair: (pair[0].get("priority", 0), pair[1]["name"]))
        settings = self.config[NGNProConfig]
        return psycopg2.extensions.make_dsn(
            host=attributes.get("host") or chosen["address"],
            port=attributes.get("port", 5432),
            dbname=attributes.get("database", "thor"),
            user=settings.database_user,
            password=settings.database_password or None,
        )

    def active(self):
        """The longest-running live NGNPro answers the nodes' requests (the others stand by)."""
        status = self.member.status.status
        servers = [(status.service(name, ROLE)["since"], name) for name in status.roles.get(ROLE, ())]
        return bool(servers) and min(servers)[1] == self.identity.name

    def _usage(self, message):
        report = usage_report(message.body)
        if report is not None and (report["name"] in self.usage or len(self.usage) < MAX_NODES):
            self.usage[report["name"]] = (time.time(), report)

    def _accounts_wanted(self, message):
        body = message.body
        if not self.active() or not isinstance(body, dict):
            return
        name, address, request, ring = (body.get(key) for key in ("name", "address", "request", "ring"))
        if not (isinstance(name, str) and isinstance(address, str) and isinstance(request, str)):
            return
        if not isinstance(ring, int) or isinstance(ring, bool):
            return
        load = self._loads.get(name)
        if load is not None and not load.started:
            # Asked again while waiting for a slot: answer the newer request, keeping the place.
            load.address, load.request, load.ring = address, request[:128], ring
            return
        if load is not None:  # asked again while being answered: the node gave up on that answer
            load.greenlet.kill(block=False)
        load = self._loads[name] = _Load(address, request[:128], ring)
        load.greenlet = gevent.spawn(self._send_accounts, name, load)

    def _send_accounts(self, name, load):
        """Every account and alias the node owns, on its topic, in parts, from one snapshot."""
        try:
            with self._load_slots:  # a snapshot holds a database connection for the whole load
                load.started = True
                address, request = load.address, load.request
                if not self.rings.wait(load.ring, timeout=10):
                    self.log.warning("account request %s: no ring of status %s yet; not answering", request, load.ring)
                    return
                entity = self.member.status.status.members.get(name)
                if entity is None or entity.get("address") != address or NODE_ROLE not in entity.get("roles", ()):
                    self.log.warning(
                        "account request %s: %s is not a live %s at %s; not answering",
                        request,
                        name,
                        NODE_ROLE,
                        address,
                    )
                    return
                self._send_snapshot(name, address, request)
        finally:
            if self._loads.get(name) is load:
                del self._loads[name]

    def _send_snapshot(self, name, address, request):
        ring = self.rings.table.ring(NODE_ROLE)
        topic = accounts_topic(name)
        held, part, total = [], 0, 0  # each part is sent once the next exists, so the last is marked last
        try:
            with contextlib.closing(self.store.snapshot()) as snapshot:
                owned = (
                    change
                    for changes in snapshot
                    for change in changes
                    if ring is not None and ring.owner(change["key"]) == address
                )
                for batch in record_batches(owned, self.config[NGNProConfig].batch_size):
                    if held:
                        self.client.publish(topic, {"request": request, "part": part, "records": held, "last": False})
                        part, total = part + 1, total + len(held)
                        gevent.sleep(0)
                    held = batch
        except StoreUnavailableError as problem:
            self.log.warning("account request %s of %s not answered: %s", request, name, problem)
            return
        self.client.publish(topic, {"request": request, "part": part, "records": held, "last": True})
        self.log.info("account request %s: sent %d entries to %s", request, total + len(held), name)


class _Load:
    """A node's request for its accounts, from when it arrives until it is answered."""

    __slots__ = ("address", "greenlet", "request", "ring", "started")

    def __init__(self, address, request, ring):
        self.address, self.request, self.ring = address, request, ring
        self.started = False  # holds a load slot: asking again now starts over
        self.greenlet = None


def main(argv=None):
    return run(NGNProDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
