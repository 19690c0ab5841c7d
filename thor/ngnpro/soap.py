"""The SOAP/XML interface of NGNPro (spyne): ports SipPort and NetworkPort, one WSDL.

Every call carries a Login header (username, password) in the namespace
urn:AGProjects:NGNPro. Faults have codes a client can act on:

    Client.Unauthorized      no or wrong Login header (each logged with its source address)
    Client.Throttled         too many failed logins from this address lately: wait (thor.ngnpro.throttle)
    Client.InvalidInput      a field breaks its rule (the message names it)
    Client.NotFound          the domain, account or alias does not exist
    Client.Conflict          it exists already (or a domain still holds accounts)
    Server.DatabaseUnavailable  the provisioning database cannot be reached; nothing changed
    Server.OutcomeUnknown    the database connection failed during COMMIT: read the change back
    Server.Internal          anything else (logged)

docs/provisioning.md is the reference.
"""

import collections
import logging
import time
import warnings

with warnings.catch_warnings():  # spyne 2.14 imports the cgi module, deprecated in Python 3.11
    warnings.simplefilter("ignore", DeprecationWarning)
    from spyne import Application, Array, Boolean, ComplexModel, Double, Fault, Integer, Long, ServiceBase, Unicode, rpc
    from spyne.protocol.soap import Soap11
    from spyne.server.wsgi import WsgiApplication

from thor.metrics import Histogram
from thor.ngnpro.model import InvalidInputError
from thor.ngnpro.store import ConflictError, NotFoundError, OutcomeUnknownError, StoreUnavailableError
from thor.ngnpro.throttle import LoginThrottle
from thor.transport.http import reply

__all__ = ["NAMESPACE", "CallStatistics", "wsgi_application"]

log = logging.getLogger("thor.ngnpro")
# spyne logs every fault with a traceback; client faults are answers, not errors, and
# server faults are logged once by _call.
logging.getLogger("spyne.application.client").setLevel(logging.CRITICAL)
logging.getLogger("spyne.application").setLevel(logging.CRITICAL)

# SOAP calls take milliseconds; a slow database makes seconds of them.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
NAMESPACE = "urn:AGProjects:NGNPro"
SIP_NAMESPACE = f"{NAMESPACE}:SipPort"
NETWORK_NAMESPACE = f"{NAMESPACE}:NetworkPort"


class Login(ComplexModel):
    __namespace__ = NAMESPACE
    username = Unicode(min_occurs=1)
    password = Unicode(min_occurs=1)


class SipId(ComplexModel):
    __namespace__ = SIP_NAMESPACE
    username = Unicode(min_occurs=1)
    domain = Unicode(min_occurs=1)


class SipAccount(ComplexModel):
    """password is written, never read back: the account keeps only the digest hashes ha1 and ha1b."""

    __namespace__ = SIP_NAMESPACE
    id = SipId.customize(min_occurs=1)
    password = Unicode
    firstName = Unicode
    lastName = Unicode
    email = Unicode
    enabled = Boolean
    ha1 = Unicode
    ha1b = Unicode


class SipAlias(ComplexModel):
    __namespace__ = SIP_NAMESPACE
    id = SipId.customize(min_occurs=1)
    target = SipId.customize(min_occurs=1)


class Member(ComplexModel):
    __namespace__ = NETWORK_NAMESPACE
    name = Unicode
    address = Unicode
    roles = Array(Unicode)
    version = Unicode
    since = Double


class NetworkStatus(ComplexModel):
    __namespace__ = NETWORK_NAMESPACE
    version = Long
    manager = Unicode
    members = Array(Member)


class NodeStatistics(ComplexModel):
    __namespace__ = NETWORK_NAMESPACE
    name = Unicode
    address = Unicode
    updated = Double
    uptime = Double
    accounts = Integer
    aliases = Integer
    lookups = Long
    lookupConnections = Integer
    loadAverage = Double
    # Media relays (Thor.Statistics): calls relayed now, packets and bytes per second, packets in all.
    sessions = Integer
    packetsPerSecond = Long
    bytesPerSecond = Long
    relayedPackets = Long


class CallStatistics:
    """SOAP calls by operation and outcome (ok, or the fault code), and how long they took."""

    def __init__(self):
        self.outcomes = collections.Counter()  # (operation, outcome) -> calls
        self.seconds = collections.defaultdict(lambda: Histogram(CALL_BUCKETS))  # operation -> Histogram

    def record(self, operation, outcome, seconds):
        self.outcomes[(operation, outcome)] += 1
        self.seconds[operation].observe(seconds)


def _call(ctx, operation, *args):
    """_answer, counted and timed in ctx.app.calls under the SOAP operation's name."""
    name = getattr(getattr(ctx, "descriptor", None), "name", None) or operation
    started = time.monotonic()
    outcome = "Server.Internal"
    try:
        result = _answer(ctx, operation, *args)
        outcome = "ok"
        return result
    except Fault as fault:
        outcome = fault.faultcode
        raise
    finally:
        ctx.app.calls.record(name, outcome, time.monotonic() - started)


def _answer(ctx, operation, *args):
    """Authenticate, run the provisioning operation, turn errors into coded faults."""
    provisioning = ctx.app.provisioning
    throttle = ctx.app.login_throttle
    source = _source(ctx)
    wait = throttle.blocked_for(source)
    if wait > 0:
        raise Fault("Client.Throttled", f"too many failed logins from {source}: try again in {wait:.0f} s")
    login = ctx.in_header
    if login is None or not provisioning.authenticate(login.username, login.password):
        user = "no Login header" if login is None else f"user {login.username!r}"
        if throttle.failed(source):
            log.warning("failed login from %s (%s): refusing %s for %g s", source, user, source, throttle.penalty)
        else:
            log.warning("failed login from %s (%s)", source, user)
        raise Fault("Client.Unauthorized", "a valid Login header (username, password) is required")
    try:
        return getattr(provisioning, operation)(*args)
    except InvalidInputError as problem:
        raise Fault("Client.InvalidInput", str(problem)) from None
    except NotFoundError as problem:
        raise Fault("Client.NotFound", str(problem)) from None
    except ConflictError as problem:
        raise Fault("Client.Conflict", str(problem)) from None
    except OutcomeUnknownError as problem:
        raise Fault("Server.OutcomeUnknown", f"{problem}; read it back before trying again") from None
    except StoreUnavailableError as problem:
        raise Fault("Server.DatabaseUnavailable", f"{problem}; nothing was changed") from None
    except Fault:
        raise
    except Exception:
        log.exception("%s failed", operation)
        raise Fault("Server.Internal", f"{operation} failed; see the ngnpro log") from None


def _source(ctx):
    """The address the call came from (pywsgi's REMOTE_ADDR)."""
    environ = getattr(ctx.transport, "req_env", None) or {}
    return environ.get("REMOTE_ADDR") or "?"


def _account_fields(account):
    return {
        "username": account.id.username if account.id else None,
        "domain": account.id.domain if account.id else None,
        "password": account.password,
        "first_name": account.firstName,
        "last_name": account.lastName,
        "email": account.email,
        "enabled": account.enabled,
    }


def _sip_account(record):
    return SipAccount(
        id=SipId(username=record["username"], domain=record["domain"]),
        firstName=record["first_name"],
        lastName=record["last_name"],
        email=record["email"],
        enabled=record["enabled"],
        ha1=record["ha1"],
        ha1b=record["ha1b"],
    )


def _id(sip_id):
    if sip_id is None:
        raise Fault("Client.InvalidInput", "id: a SipId (username, domain) is required")
    return sip_id.username, sip_id.domain


class SipPort(ServiceBase):
    __service_name__ = "SipPort"
    __port_types__ = ["SipPort"]
    __in_header__ = Login

    @rpc(Unicode, _port_type="SipPort")
    def addDomain(ctx, domain):
        _call(ctx, "add_domain", domain)

    @rpc(Unicode, _port_type="SipPort")
    def deleteDomain(ctx, domain):
        _call(ctx, "delete_domain", domain)

    @rpc(_returns=Array(Unicode), _port_type="SipPort")
    def getDomains(ctx):
        return _call(ctx, "domains")

    @rpc(SipAccount, _port_type="SipPort")
    def addAccount(ctx, account):
        if account is None:
            raise Fault("Client.InvalidInput", "account: required")
        _call(ctx, "add_account", _account_fields(account))

    @rpc(SipAccount, _port_type="SipPort")
    def updateAccount(ctx, account):
        if account is None:
            raise Fault("Client.InvalidInput", "account: required")
        _call(ctx, "update_account", _account_fields(account))

    @rpc(SipId, _port_type="SipPort")
    def deleteAccount(ctx, id):
        _call(ctx, "delete_account", *_id(id))

    @rpc(SipId, _returns=SipAccount, _port_type="SipPort")
    def getAccount(ctx, id):
        return _sip_account(_call(ctx, "account", *_id(id)))

    @rpc(Unicode, Integer, Integer, _returns=Array(SipAccount), _port_type="SipPort")
    def getAccounts(ctx, domain, limit, offset):
        return [_sip_account(record) for record in _call(ctx, "accounts", domain, limit, offset)]

    @rpc(SipId, Unicode, _port_type="SipPort")
    def changePassword(ctx, id, password):
        _call(ctx, "change_password", *_id(id), password)

    @rpc(SipAlias, _port_type="SipPort")
    def addAlias(ctx, alias):
        if alias is None or alias.target is None:
            raise Fault("Client.InvalidInput", "alias: id and target are required")
        _call(ctx, "add_alias", *_id(alias.id), *_id(alias.target))

    @rpc(SipId, _port_type="SipPort")
    def deleteAlias(ctx, id):
        _call(ctx, "delete_alias", *_id(id))

    @rpc(SipId, _returns=Array(SipId), _port_type="SipPort")
    def getAliases(ctx, target):
        names = _call(ctx, "aliases", *_id(target))
        return [SipId(username=name.split("@")[0], domain=name.split("@")[1]) for name in names]


class NetworkPort(ServiceBase):
    __service_name__ = "NetworkPort"
    __port_types__ = ["NetworkPort"]
    __in_header__ = Login

    @rpc(_returns=NetworkStatus, _port_type="NetworkPort")
    def getStatus(ctx):
        status = _call(ctx, "network_status")
        members = [
            Member(
                name=entity["name"],
                address=entity["address"],
                roles=entity["roles"],
                version=entity["version"],
                since=entity["since"],
            )
            for entity in status["members"]
        ]
        return NetworkStatus(version=status["version"], manager=status["manager"], members=members)

    @rpc(_returns=Array(NodeStatistics), _port_type="NetworkPort")
    def getStatistics(ctx):
        return [
            NodeStatistics(
                name=usage["name"],
                address=usage["address"],
                updated=usage["updated"],
                uptime=usage.get("uptime"),
                accounts=usage.get("accounts"),
                aliases=usage.get("aliases"),
                lookups=usage.get("lookups"),
                lookupConnections=usage.get("lookup_connections"),
                loadAverage=usage.get("load_average"),
                sessions=usage.get("sessions"),
                packetsPerSecond=usage.get("packets_per_s"),
                bytesPerSecond=usage.get("bytes_per_s"),
                relayedPackets=usage.get("relayed_packets"),
            )
            for usage in _call(ctx, "statistics")
        ]


def wsgi_application(provisioning, login_throttle=None, calls=None):
    """The WSGI application serving both ports; provisioning is a thor.ngnpro.provisioning.Provisioning,
    login_throttle a thor.ngnpro.throttle.LoginThrottle (default: its defaults), calls the
    CallStatistics that count and time every SOAP call (default: kept by nobody)."""
    application = Application(
        [SipPort, NetworkPort],
        tns=NAMESPACE,
        name="NGNPro",
        in_protocol=Soap11(validator="lxml"),
        out_protocol=Soap11(),
    )
    application.provisioning = provisioning
    application.login_throttle = login_throttle or LoginThrottle()
    application.calls = calls if calls is not None else CallStatistics()
    soap = WsgiApplication(application, max_content_length=1 << 20)

    def route(environ, start_response):
        """GET /ngnpro/wsdl is the WSDL; SOAP calls are POSTed to the same URL; nothing else is served."""
        path = environ.get("PATH_INFO", "")
        if path not in ("/ngnpro/wsdl", "/ngnpro", "/ngnpro/"):
            return reply(start_response, "404 Not Found", "not found: the WSDL is at /ngnpro/wsdl\n")
        environ["wsgi.url_scheme"] = "https"  # TLS is done before pywsgi sees the request; the WSDL says so
        if environ.get("REQUEST_METHOD") == "GET":
            environ["QUERY_STRING"] = "wsdl"
        return soap(environ, start_response)

    return route
