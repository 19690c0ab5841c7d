"""Kamailio, the SIP proxy SIP Thor is tested with, as a real process on loopback,
with the configuration we ship (etc/kamailio-thor.cfg, or thor-node's installed example);
and a SIP client that registers with digest authentication."""

import hashlib
import os
import re
import signal
import socket
import subprocess

from thor.health import Check
from thor.loopback.process import PACKAGE_ROOT, exited, wait_for

__all__ = ["CONFIG", "Kamailio", "register"]

_NAME = "kamailio-thor.cfg"
# The configuration we ship: a checkout's, or the one thor-node installs.
CONFIG = next(
    (
        path
        for path in (os.path.join(PACKAGE_ROOT, "etc", _NAME), f"/usr/share/doc/thor-node/examples/{_NAME}")
        if os.path.exists(path)
    ),
    None,
)


class Kamailio:
    def __init__(self, directory, port, accounts=("127.0.0.1", 9501)):
        """accounts: where thor-node serves its account cache."""
        self.directory = directory
        self.port = port
        self.accounts = accounts
        self.process = None

    def start(self):
        log = open(os.path.join(self.directory, "kamailio.log"), "ab")  # noqa: SIM115 (as long as the process)
        self.process = subprocess.Popen(
            [
                "kamailio",
                "-DD",
                "-E",
                "-f",
                CONFIG,
                "-l",
                f"udp:127.0.0.1:{self.port}",
                "-A",
                'THOR_ACCOUNTS="http://{}:{}/accounts/"'.format(*self.accounts),
                "-n",
                "1",  # one worker process is plenty for tests
                "-P",
                os.path.join(self.directory, "kamailio.pid"),
                "-Y",
                self.directory,
            ],
            stdout=log,
            stderr=log,
        )
        check = Check("sip", "127.0.0.1", self.port)
        wait_for(lambda: check.probe(0.2), timeout=10, message="Kamailio answering OPTIONS")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            exited(self.process, 10)

    def log(self):
        with open(os.path.join(self.directory, "kamailio.log"), errors="replace") as stream:
            return stream.read()


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
        challenge = dict(re.findall(r'(\w+)="?([^",]*)"?', headers["www-authenticate"].split(" ", 1)[1]))
        realm, nonce = challenge["realm"], challenge["nonce"]
        ha1 = hashlib.md5(f"{username}:{realm}:{password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
        authorization = f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
        if "qop" in challenge:
            cnonce, count = os.urandom(8).hex(), "00000001"
            response = hashlib.md5(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}".encode()).hexdigest()
            authorization += f', qop=auth, nc={count}, cnonce="{cnonce}", response="{response}"'
        else:
            authorization += f', response="{hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()}"'
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
