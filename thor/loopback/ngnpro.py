"""NGNPro on loopback, with the network it needs: PostgreSQL found through thor-database, event
servers, a manager, sip_proxy nodes; zeep as its SOAP client and readers of the nodes' caches.

For the tests and the NGNPro benchmark: it needs zeep and requests (the test extras).
"""

import hashlib
import http.client
import json

import requests
import zeep
import zeep.exceptions
import zeep.transports

from thor import __version__
from thor.lookup.table import LookupTable
from thor.loopback.kamailio import Kamailio
from thor.loopback.network import Overlay, wait_status
from thor.loopback.process import free_port, wait_for
from thor.loopback.sipp import Sipp

__all__ = [
    "DOMAIN",
    "NGNPRO_ADDRESS",
    "NODE_ADDRESSES",
    "PASSWORD",
    "CacheReader",
    "Network",
    "SipNetwork",
    "Soap",
    "account",
    "cached",
    "ha1",
    "node_at",
    "owner",
    "soap_client",
]

DOMAIN = "example.com"
PASSWORD = "provisioning-secret"
NGNPRO_ADDRESS = "127.0.4.1"
NODE_ADDRESSES = {f"node{index}": f"127.0.4.{10 + index}" for index in range(1, 6)}
NODES = tuple(NODE_ADDRESSES)


class Network:
    """PostgreSQL, 2 event servers, a manager, thor-database, ngnpro and sip_proxy nodes."""

    def __init__(self, directory, pki, postgresql, **eventserver_settings):
        self.overlay = Overlay(directory, pki)
        self.postgresql = postgresql
        self.pki = pki
        postgresql.create_database("thor")
        self.overlay.start_eventservers(2, **eventserver_settings)
        self.overlay.manager("manager1")
        self.database = self.start_database()
        self.port = free_port(NGNPRO_ADDRESS)
        self.ngnpro = self.start_ngnpro("ngnpro1", NGNPRO_ADDRESS, self.port)
        self.observer = self.overlay.observer()
        self.nodes = {}
        self.status(lambda s: {"database1", "ngnpro1"} <= set(s.members), "the database and ngnpro announced")

    def start_database(self):
        """thor-database, announcing the PostgreSQL database "thor"."""
        return self.overlay.start(
            "database1",
            "thor.database.main",
            "thor_database",
            "127.0.4.2",
            Database={"host": "127.0.0.1", "port": self.postgresql.port, "database": "thor"},
        )

    def start_ngnpro(self, name, address, port, **settings):
        return self.overlay.start(
            name,
            "thor.ngnpro.main",
            "provisioning_server",
            address,
            NGNPro={
                "listen": f"{address}:{port}",
                "password": PASSWORD,
                "database_user": "postgres",
                "database_sslrootcert": self.postgresql.ca,
                **settings,
            },
        )

    def start_node(self, name):
        self.nodes[name] = self.overlay.node(name, "sip_proxy", NODE_ADDRESSES[name], usage_interval=0.5)
        return self.nodes[name]

    def start_nodes(self, *names):
        """Start nodes and wait until the status lists them as sip_proxy members."""
        for name in names:
            self.start_node(name)
        wanted = {NODE_ADDRESSES[name] for name in names}
        self.status(lambda s: wanted <= set(s.addresses("sip_proxy")), f"{', '.join(names)} in the status")

    def stop_node(self, name):
        self.nodes.pop(name).stop()

    def client(self, address=NGNPRO_ADDRESS, port=None):
        return soap_client(self.pki, address, port or self.port)

    def status(self, predicate, message):
        return wait_status(self.observer, predicate, timeout=20, message=message)

    def close(self):
        self.overlay.close()


def soap_client(pki, address, port):
    """A zeep client of the NGNPro at address:port, once it serves its WSDL and reaches its database."""
    session = requests.Session()
    session.verify = pki.ca.ca_certificate_path
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides verify
    transport = zeep.transports.Transport(session=session, timeout=30, operation_timeout=30)
    url = f"https://{address}:{port}/ngnpro/wsdl"
    wait_for(lambda: _answers(session, url), timeout=20, message="ngnpro serving its WSDL")
    soap = Soap(zeep.Client(url, transport=transport))
    wait_for(lambda: _database_ready(soap), timeout=20, message="ngnpro reaching the database")
    return soap


def _answers(session, url):
    try:
        return session.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _database_ready(soap):
    try:
        soap.getDomains()
    except zeep.exceptions.Fault as fault:
        if fault.code and fault.code.endswith("DatabaseUnavailable"):
            return False
        raise
    return True


class Soap:
    """Both ports of one zeep client, each call with the Login header."""

    def __init__(self, client, username="admin", password=PASSWORD):
        self.client = client
        self.sip = client.bind("SipPort", "SipPort")
        self.network = client.bind("NetworkPort", "NetworkPort")
        login = client.get_element("{urn:AGProjects:NGNPro}Login")
        self.header = login(username=username, password=password)

    def __getattr__(self, operation):
        port = self.network if operation in ("getStatus", "getStatistics") else self.sip

        def call(*args, **kwargs):
            return getattr(port, operation)(*args, **kwargs, _soapheaders=[self.header])

        return call


def account(username, password="a-good-password", **fields):
    return {"id": {"username": username, "domain": DOMAIN}, "password": password, **fields}


def password(user):
    """The password the harness gives a SIP subscriber."""
    return f"password-of-{user}"


def subscribers(users):
    """sipp -inf rows of users: (user, domain, password)."""
    return [[user, DOMAIN, password(user)] for user in users]


def ha1(username, password, domain=DOMAIN):
    return hashlib.md5(f"{username}:{domain}:{password}".encode()).hexdigest()


class CacheReader:
    """Reads a node's account cache over HTTP, on one keep-alive connection."""

    def __init__(self, node, timeout=10):
        self.connection = http.client.HTTPConnection(*node.accounts, timeout=timeout)

    def get(self, path, method="GET"):
        self.connection.request(method, path)
        response = self.connection.getresponse()
        return response.status, response.read().decode()

    def close(self):
        self.connection.close()


def cached(node, key):
    """What a node's account cache answers for key (None: it does not hold it)."""
    reader = CacheReader(node)
    try:
        code, body = reader.get(f"/accounts/{key}")
    finally:
        reader.close()
    assert code in (200, 404), (code, body)
    return json.loads(body) if code == 200 else None


def owner(network, key):
    return LookupTable.from_status(network.observer.status.status).lookup("sip_proxy", key)


def node_at(network, address):
    return next(node for name, node in network.nodes.items() if NODE_ADDRESSES[name] == address)


class SipNetwork(Network):
    """The NGNPro network whose sip_proxy nodes run Kamailio with SIP Thor's configuration."""

    def __init__(self, directory, pki, postgresql, children=2, health_checks=True, **eventserver_settings):
        """health_checks False: the nodes announce sip_proxy whatever their Kamailio does."""
        super().__init__(directory, pki, postgresql, **eventserver_settings)
        self.directory = str(directory)
        self.children = children
        self.health_checks = health_checks
        self.kamailios = {}

    def start_node(self, name, kamailio_first=False, kamailio_environment=None):
        """kamailio_first: Kamailio starts before thor-node listens (as supervisor may start them);
        kamailio_environment: more settings of its thor_kamailio.py."""
        address = NODE_ADDRESSES[name]
        api, media = (address, free_port(address)), (address, free_port(address))
        kamailio = Kamailio(
            self.directory, address, api, children=self.children, media=media, environment=kamailio_environment
        )
        self.kamailios[name] = kamailio
        if kamailio_first:
            kamailio.start()
        self.nodes[name] = self.overlay.node(
            name,
            "sip_proxy",
            address,
            usage_interval=0.5,
            checks=f"sip_proxy=sip:{address}:5060" if self.health_checks else "sip_proxy=none",
            check_interval=0.2,
            accounts_listen=f"{address}:{api[1]}",
            kamailio_rpc="{}:{}".format(*kamailio.rpc),
            media_listen="{}:{}".format(*media),
            **self.node_settings(name),
        )
        if not kamailio_first:
            self.nodes[name].wait_log(f" {__version__} started", 20)
            kamailio.start()
        return self.nodes[name]

    def devices(self, name, rows, via, port=None, contact_host=None, transport="u1"):
        """sipp devices of rows (user, domain, password) at 127.0.5.x talking to node via:
        registered (every one, or an AssertionError), then answering calls; the answering Sipp."""
        address = f"127.0.5.{NODES.index(via) + 1 if via in NODES else 9}"
        port = port or free_port(address)
        keys = {"contact_host": contact_host} if contact_host else None
        registration = Sipp(
            self.directory,
            f"{name}-register",
            "register",
            (address, port),
            rows,
            (NODE_ADDRESSES[via], 5060),
            transport,
            keys,
        )
        result = registration.run(len(rows), rate=50, timeout=30)
        assert (result.successful, result.failed) == (len(rows), 0), result.errors
        return self.answering(name, (address, port), transport)

    def answering(self, name, local, transport="u1"):
        """A sipp answering every call at local (address, port)."""
        return Sipp(self.directory, name, "answer", local, transport=transport).start()

    def calls(self, name, rows, edge, address):
        """Place the calls of rows (caller, domain, password, callee) through edge; the sipp result."""
        caller = Sipp(self.directory, name, "call", (address, free_port(address)), rows, (NODE_ADDRESSES[edge], 5060))
        return caller.run(len(rows), timeout=30)

    def node_settings(self, name):
        """More [Node] settings of node name (a subclass's)."""
        return {}

    def stop_node(self, name):
        super().stop_node(name)
        self.kamailios.pop(name).stop()

    def close(self):
        for kamailio in self.kamailios.values():
            kamailio.stop()
        super().close()
