"""Health checks of the local services behind a program's roles (thor-node, thor-database).

A check is written kind:host:port (or none):

    tcp:127.0.0.1:443     a TCP connection is accepted
    sip:127.0.0.1:5060    a SIP OPTIONS over UDP gets any SIP response (Kamailio answers
                          even when its script refuses the request: it is alive)
    ng:127.0.0.1:2223     rtpengine answers a ping of its control protocol (ng, bencode over UDP)
    none                  always up (roles with no local service to watch)
"""

import os
import socket
import time

import gevent

from thor import roles
from thor.datatypes import Datatype, Endpoint
from thor.metrics import gauge
from thor.roles import RoleError, check_role_name
from thor.transport import bencode

__all__ = [
    "DEFAULT_CHECKS",
    "Check",
    "CheckList",
    "RoleHealth",
    "health_families",
    "parse_check",
    "watch",
    "withdrawn_roles",
]

# What the built-in roles' software listens on by default.
DEFAULT_CHECKS = {
    roles.SIP_PROXY: "sip:127.0.0.1:5060",
    roles.VOICEMAIL_SERVER: "sip:127.0.0.1:5060",
    roles.XCAP_SERVER: "tcp:127.0.0.1:443",
    roles.MEDIA_RELAY: "ng:127.0.0.1:2223",
    roles.MSRP_RELAY: "tcp:127.0.0.1:2855",
    roles.PROVISIONING_SERVER: "tcp:127.0.0.1:9200",
}

KINDS = ("tcp", "sip", "ng", "none")


class Check:
    def __init__(self, kind, host=None, port=None):
        self.kind, self.host, self.port = kind, host, port

    def __str__(self):
        return self.kind if self.kind == "none" else f"{self.kind}:{self.host}:{self.port}"

    def __eq__(self, other):
        return isinstance(other, Check) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def probe(self, timeout):
        """True when the service answers within timeout. Blocks only the calling greenlet."""
        if self.kind == "none":
            return True
        try:
            if self.kind == "tcp":
                with socket.create_connection((self.host, self.port), timeout=timeout):
                    return True
            if self.kind == "ng":
                return self._ng_ping(timeout)
            return self._sip_options(timeout)
        except OSError:
            return False

    def _ng_ping(self, timeout):
        cookie = os.urandom(4).hex().encode()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((self.host, self.port))
            sock.send(cookie + b" " + bencode.encode({"command": "ping"}))
            deadline = time.monotonic() + timeout
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                head, _, body = sock.recv(65535).partition(b" ")
                if head == cookie:
                    try:
                        return bencode.decode(body).get("result") == "pong"
                    except (bencode.BencodeError, AttributeError):
                        return False

    def _sip_options(self, timeout):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((self.host, self.port))
            local_host, local_port = sock.getsockname()[:2]
            if ":" in local_host:
                local_host = f"[{local_host}]"
            host = f"[{self.host}]" if ":" in self.host else self.host
            tag = os.urandom(6).hex()
            request = (
                f"OPTIONS sip:{host}:{self.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {local_host}:{local_port};branch=z9hG4bK{tag};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:thor-node@{local_host}>;tag={tag}\r\n"
                f"To: <sip:{host}:{self.port}>\r\n"
                f"Call-ID: {tag}@thor-node\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "User-Agent: thor-node health check\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            sock.send(request)
            deadline = time.monotonic() + timeout
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(65535)
                if data.startswith(b"SIP/2.0 ") and tag.encode() in data:
                    return True


def parse_check(text):
    text = text.strip()
    if text == "none":
        return Check("none")
    kind, _, rest = text.partition(":")
    if kind not in KINDS or not rest:
        raise ValueError(f"expected tcp:HOST:PORT, sip:HOST:PORT, ng:HOST:PORT or none, not {text!r}")
    host, port = Endpoint(0).parse(rest)
    if port == 0:
        raise ValueError(f"{text!r} lacks a port")
    return Check(kind, host, port)


class CheckList(Datatype):
    """role=check, comma separated."""

    expected = "role=check pairs, comma separated; a check is tcp:HOST:PORT, sip:HOST:PORT, ng:HOST:PORT or none"

    def parse(self, text):
        checks = {}
        for item in text.split(","):
            if not item.strip():
                continue
            role, equals, check = item.partition("=")
            try:
                if not equals:
                    raise ValueError(f"{item.strip()!r} is not role=check")
                checks[check_role_name(role.strip())] = parse_check(check)
            except (ValueError, RoleError) as error:
                raise ValueError(f"{self.expected}; {error}") from None
        return checks


class RoleHealth:
    """The state of one role's check, with hysteresis."""

    def __init__(self, role, check, failures, successes):
        self.role, self.check = role, check
        self.failures, self.successes = failures, successes
        self.up = False
        self.check_seconds = None  # how long the last check took
        self._streak = 0

    def probe(self, timeout):
        """Run the check once; whether it answered (its duration in check_seconds)."""
        started = time.monotonic()
        try:
            return self.check.probe(timeout)
        finally:
            self.check_seconds = time.monotonic() - started

    @property
    def reason(self):
        """Why the role is withdrawn, for the operator (published with the presence)."""
        return f"health check {self.check} does not answer"

    def record(self, ok):
        """Take one check result; returns True when the role changed state."""
        if ok == self.up:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= (self.successes if ok else self.failures):
            self.up, self._streak = ok, 0
            return True
        return False


def watch(health, interval, timeout, on_change):
    """Check health every interval seconds forever; on_change(health) when the role goes up or down."""
    while True:
        gevent.sleep(interval)
        if health.record(health.probe(timeout)):
            on_change(health)


def health_families(healths):
    """The metric families of the roles' health checks (docs/metrics.md)."""
    healths = sorted(healths, key=lambda health: health.role)
    yield gauge(
        "thor_role_up",
        "1 when the role's health check passes (the role is announced), 0 when it is withdrawn.",
        labels=["role"],
        samples=[([health.role], int(health.up)) for health in healths],
    )
    yield gauge(
        "thor_health_check_seconds",
        "How long the role's last health check took.",
        labels=["role"],
        samples=[([health.role], health.check_seconds) for health in healths if health.check_seconds is not None],
    )


def withdrawn_roles(healths):
    """{role: why} of the roles whose service fails its check."""
    return {health.role: health.reason for health in healths if not health.up}
