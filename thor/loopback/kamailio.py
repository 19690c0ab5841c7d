"""Kamailio, the SIP proxy of sip_proxy nodes, as a real process on loopback with the
configuration SIP Thor ships (etc/kamailio/thor.cfg, or the one thor-sip-proxy installs);
and a SIP client that registers with digest authentication (for quick checks; sipp for
load, thor.loopback.sipp)."""

import os
import socket
import subprocess

from thor.health import Check
from thor.loopback.process import PACKAGE_ROOT, ProcessGroup, die_with_parent, free_port, wait_for
from thor.sip import digest

__all__ = ["CONFIG", "SCRIPT", "Kamailio", "invite", "register"]


def _shipped(name, installed):
    """A file we ship: a checkout's etc/kamailio/NAME, or where the packages install it."""
    return next(
        (path for path in (os.path.join(PACKAGE_ROOT, "etc", "kamailio", name), installed) if os.path.exists(path)),
        None,
    )


CONFIG = _shipped("thor.cfg", "/usr/share/thor/kamailio/thor.cfg")
SCRIPT = _shipped("thor_kamailio.py", "/usr/share/thor/kamailio/thor_kamailio.py")
# Kamailio's shared memory, as the rollout gives it (thor_sip_proxy_shared_memory_mb): Debian's
# 64 MB runs out under load (bench/sip_bench.py: "new_t failed", 500s, from about 250 calls/s).
SHARED_MEMORY_MB = 256
# What every node of one network shares (tests only: the rollout makes one per network).
TEST_SECRET = "loopback-test-secret-0123456789abcdef"


class Kamailio(ProcessGroup):
    """Kamailio for the node at address: SIP on address:port, thor-node's API at api."""

    def __init__(
        self, directory, address, api, port=5060, secret=TEST_SECRET, children=2, media=None, environment=None
    ):
        """media: thor-node's media relay endpoint ([Node] media_listen) for the rtpengine module;
        environment: more of thor_kamailio.py's settings (THOR_LOCAL_RING_NODES...)."""
        self.environment = dict(environment or {})
        self.directory = os.path.join(str(directory), f"kamailio-{address}")
        os.makedirs(self.directory, exist_ok=True)
        self.address = address
        self.port = port
        self.api = api
        self.rpc = (address, free_port(address))
        self.config = os.path.join(self.directory, "node.cfg")
        with open(self.config, "w") as stream:
            stream.write(
                "#!KAMAILIO\n"
                f'#!define THOR_ADDRESS "{address}"\n'
                f"#!define THOR_SIP_PORT {port}\n"
                f'#!define THOR_AUTH_SECRET "{secret}"\n'
                f'#!define THOR_RPC "udp:{self.rpc[0]}:{self.rpc[1]}"\n'
                f'#!define THOR_SCRIPT "{SCRIPT}"\n'
                f"#!define THOR_CHILDREN {children}\n"
                "#!define THOR_TCP_CHILDREN 2\n"
                "#!define THOR_NO_LOOPBACK\n"  # several nodes on this one host
                + (f'#!define THOR_MEDIA "udp:{media[0]}:{media[1]}"\n' if media else "")
                + f'include_file "{CONFIG}"\n'
            )
        self.log_path = os.path.join(self.directory, "kamailio.log")
        self.process = None

    def start(self, timeout=10):
        log = open(self.log_path, "ab")  # noqa: SIM115 (as long as the process)
        pid_file = os.path.join(self.directory, "kamailio.pid")
        self.process = subprocess.Popen(
            ["kamailio", "-DD", "-E", "-m", str(SHARED_MEMORY_MB), "-f", self.config, "-P", pid_file],
            stdout=log,
            stderr=log,
            # thor_kamailio.py imports thor.lookup.ring: this checkout's, or the installed one.
            env=dict(os.environ, THOR_API="{}:{}".format(*self.api), PYTHONPATH=PACKAGE_ROOT, **self.environment),
            # Its own process group: Kamailio's workers are the main process's children, and a
            # kill must reach them all (they would outlive a killed main process).
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl call, safe between fork and exec)
        )
        check = Check("sip", self.address, self.port)

        def answering():
            if self.process.poll() is not None:
                raise AssertionError(f"kamailio exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            return check.probe(0.2)

        wait_for(answering, timeout=timeout, message=f"Kamailio on {self.address} answering OPTIONS")


def invite(port, caller, domain, password, callee, host="127.0.0.1", timeout=10.0, callee_domain=None):
    """INVITE callee from caller through the proxy at host:port over UDP, answering one proxy
    challenge; the final status (code, reason, headers). Every final answer is acknowledged
    (a 2xx is then hung up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        local_host, local_port = sock.getsockname()[:2]
        tag, call_id = os.urandom(6).hex(), os.urandom(8).hex()
        uri = f"sip:{callee}@{callee_domain or domain}"

        def send(method, cseq, branch, extra=(), to_tag=""):
            lines = [
                f"{method} {uri} SIP/2.0",
                f"Via: SIP/2.0/UDP {local_host}:{local_port};branch={branch};rport",
                "Max-Forwards: 70",
                f"From: <sip:{caller}@{domain}>;tag={tag}",
                f"To: <{uri}>{to_tag}",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} {method}",
                f"Contact: <sip:{caller}@{local_host}:{local_port}>",
                *extra,
            ]
            sock.send(("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode())

        def ack(cseq, branch, headers):
            to_tag = headers.get("to", "").partition(">")[2]
            send("ACK", cseq, branch, to_tag=to_tag)

        branch = f"z9hG4bK{os.urandom(6).hex()}"
        send("INVITE", 1, branch)
        code, reason, headers = _final_response(sock)
        if code == 407:
            ack(1, branch, headers)
            branch = f"z9hG4bK{os.urandom(6).hex()}"
            authorization = digest.authorization(caller, password, "INVITE", uri, headers["proxy-authenticate"])
            send("INVITE", 2, branch, [f"Proxy-Authorization: {authorization}"])
            code, reason, headers = _final_response(sock)
        if code < 300:  # not what the callers of this expect: hang up at once
            ack(2, f"z9hG4bK{os.urandom(6).hex()}", headers)
        else:
            ack(2 if code != 407 else 1, branch, headers)
        return code, reason, headers


def register(port, username, domain, password, host="127.0.0.1", timeout=5.0, to=None):
    """REGISTER username@domain at the proxy on host:port over UDP, answering one digest
    challenge with password; the final status (code, reason). to: another address for the
    To header (the address the binding would be saved under)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        local_host, local_port = sock.getsockname()[:2]
        tag, call_id = os.urandom(6).hex(), os.urandom(8).hex()
        uri = f"sip:{domain}"

        def send(cseq, authorization=None):
            lines = [
                f"REGISTER {uri} SIP/2.0",
                f"Via: SIP/2.0/UDP {local_host}:{local_port};branch=z9hG4bK{os.urandom(6).hex()};rport",
                "Max-Forwards: 70",
                f"From: <sip:{username}@{domain}>;tag={tag}",
                f"To: <sip:{to or f'{username}@{domain}'}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                f"Contact: <sip:{username}@{local_host}:{local_port}>",
                "Expires: 60",
            ]
            if authorization:
                lines.append(f"Authorization: {authorization}")
            sock.send(("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode())
            return _final_response(sock)

        code, reason, headers = send(1)
        if code != 401:
            return code, reason
        authorization = digest.authorization(username, password, "REGISTER", uri, headers["www-authenticate"])
        code, reason, _ = send(2, authorization)
        return code, reason


def _final_response(sock):
    while True:
        head = sock.recv(65536).decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
        _, code, reason = head[0].split(" ", 2)
        if int(code) >= 200:
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            return int(code), reason, headers
