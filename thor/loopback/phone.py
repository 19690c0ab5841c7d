"""A small SIP phone over UDP with RTP, for tests of the media path (docs/sip.md).

It registers (digest), places and answers calls with an SDP offer/answer,
sends RTP packets (20 ms apart, or faster) to whatever the other side's SDP
names (the media relay, when there is one) and counts what it receives and
from where. ACK, re-INVITE and BYE follow the dialog's route set. Enough SIP
for loopback tests and the media benchmark; sipp does the load of signaling.
"""

import os
import re
import struct
import time

import gevent
import gevent.event
from gevent import socket
from gevent.event import Event

from thor.sip import digest

__all__ = ["Call", "Phone", "PhoneError"]

MAX_PACKET = 65535


class PhoneError(Exception):
    pass


def parse(data):
    """(first line, {lower-case header: [values]}, body) of a SIP message."""
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers, body


def sdp_media(body):
    """(address, port) where an SDP body wants its audio."""
    address = re.search(r"^c=IN IP4 (\S+)", body, re.M)
    port = re.search(r"^m=audio (\d+)", body, re.M)
    if not (address and port):
        raise PhoneError(f"no audio in SDP: {body!r}")
    return address.group(1), int(port.group(1))


class Call:
    def __init__(self, phone, call_id, local_tag, remote_uri, outgoing):
        self.phone = phone
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = ""
        self.remote_uri = remote_uri  # the other party's address of record
        self.remote_target = remote_uri  # its Contact, once known
        self.route_set = []
        self.outgoing = outgoing
        self.cseq = 1
        self.media = None  # where our RTP goes
        self.received = 0
        self.sources = set()
        self.answered = Event()
        self.ended = Event()
        self.vias_received = 0  # the Vias of the INVITE that reached us (incoming calls)
        self.last_status = None  # the status line of the last final answer (for test messages)

    def send_rtp(self, count, interval=0.02):
        """Send count RTP packets to the other side's media address."""
        sequence, stamp, ssrc = 0, 0, int.from_bytes(os.urandom(4), "big")
        for _ in range(count):
            header = struct.pack("!BBHII", 0x80, 8, sequence & 0xFFFF, stamp & 0xFFFFFFFF, ssrc)
            self.phone.rtp.sendto(header + b"\xd5" * 160, self.media)
            sequence, stamp = sequence + 1, stamp + 160
            gevent.sleep(interval)

    def reinvite(self, timeout=5.0):
        """A re-INVITE with the same media (a session refresh); the final status code."""
        self.cseq += 1
        return self.phone.request(self, "INVITE", self.phone.sdp(), timeout)[0]

    def hangup(self, timeout=5.0):
        self.cseq += 1
        code = self.phone.request(self, "BYE", "", timeout)[0]
        self.ended.set()
        return code


class Phone:
    """A phone of user@domain at address, talking to the proxy (host, port)."""

    def __init__(self, user, domain, password, address, proxy, advertised=None):
        """advertised: the address the phone writes into Via, Contact and SDP (a phone behind NAT
        knows only its private address); address by default."""
        self.user, self.domain, self.password = user, domain, password
        self.proxy = proxy
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((address, 0))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((address, 0))
        self.address = address
        self.advertised = advertised or address
        self.port = self.sip.getsockname()[1]
        self.rtp_port = self.rtp.getsockname()[1]
        self.calls = {}
        self.incoming = []
        # on_rtp(packet, source), when set, takes every RTP packet instead of the calls' counts.
        self.on_rtp = None
        self._waiting = {}  # (call-id, cseq, method) -> AsyncResult of the final response
        self._workers = [gevent.spawn(self._read_sip), gevent.spawn(self._read_rtp)]

    def close(self):
        gevent.killall(self._workers)
        self.sip.close()
        self.rtp.close()

    @property
    def uri(self):
        return f"sip:{self.user}@{self.domain}"

    def sdp(self):
        return (
            f"v=0\r\no={self.user} 1 1 IN IP4 {self.advertised}\r\ns=-\r\nc=IN IP4 {self.advertised}\r\nt=0 0\r\n"
            f"m=audio {self.rtp_port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"
        )

    # -- sending ------------------------------------------------------------------------

    def _send(self, lines, body="", destination=None):
        message = "\r\n".join([*lines, f"Content-Length: {len(body.encode())}", "", ""]) + body
        self.sip.sendto(message.encode(), destination or self.proxy)

    def _via(self):
        return f"Via: SIP/2.0/UDP {self.advertised}:{self.port};branch=z9hG4bK{os.urandom(6).hex()};rport"

    def _transaction(self, call_id, cseq, method, send, timeout):
        waiter = gevent.event.AsyncResult()
        self._waiting[(call_id, cseq, method)] = waiter
        try:
            send()
            return waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise PhoneError(f"no final answer to {method} in {timeout}s") from None
        finally:
            self._waiting.pop((call_id, cseq, method), None)

    def register(self, expires=300, timeout=5.0):
        """REGISTER, answering one challenge; the final (code, reason)."""
        call_id, tag, uri = os.urandom(8).hex(), os.urandom(4).hex(), f"sip:{self.domain}"
        authorization = None
        for cseq in (1, 2):
            lines = [
                f"REGISTER {uri} SIP/2.0",
                self._via(),
                "Max-Forwards: 70",
                f"From: <{self.uri}>;tag={tag}",
                f"To: <{self.uri}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                f"Contact: <sip:{self.user}@{self.advertised}:{self.port}>",
                f"Expires: {expires}",
                *([f"Authorization: {authorization}"] if authorization else []),
            ]
            status, headers, _ = self._transaction(
                call_id, cseq, "REGISTER", lambda lines=lines: self._send(lines), timeout
            )
            code = int(status.split()[1])
            if code != 401 or authorization:
                return code, status.split(" ", 2)[2]
            challenge = headers["www-authenticate"][0]
            authorization = digest.authorization(self.user, self.password, "REGISTER", uri, challenge)
        return code, status.split(" ", 2)[2]

    def call(self, callee, timeout=10.0):
        """INVITE callee@domain (answering a proxy challenge); the Call once answered (PhoneError else)."""
        call = Call(self, os.urandom(8).hex(), os.urandom(4).hex(), f"sip:{callee}@{self.domain}", True)
        self.calls[call.call_id] = call
        authorization = None
        for _ in range(2):
            code, status, headers, body = self.request(call, "INVITE", self.sdp(), timeout, authorization)
            if code == 407 and authorization is None:
                challenge = headers["proxy-authenticate"][0]
                authorization = digest.authorization(self.user, self.password, "INVITE", call.remote_uri, challenge)
                call.cseq += 1
                continue
            break
        if code != 200:
            raise PhoneError(f"call to {callee}: {status}")
        call.media = sdp_media(body)
        call.answered.set()
        return call

    def request(self, call, method, body, timeout, authorization=None):
        """An in- or out-of-dialog request of call; (code, status line, headers, body) of its answer."""
        first = not call.remote_tag
        target = call.remote_uri if first else call.remote_target
        lines = [
            f"{method} {target} SIP/2.0",
            self._via(),
            "Max-Forwards: 70",
            f"From: <{self.uri}>;tag={call.local_tag}",
            f"To: <{call.remote_uri}>{f';tag={call.remote_tag}' if call.remote_tag else ''}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {call.cseq} {method}",
            f"Contact: <sip:{self.user}@{self.advertised}:{self.port}>",
            *[f"Route: {route}" for route in call.route_set],
            *([f"Proxy-Authorization: {authorization}"] if authorization else []),
            *(["Content-Type: application/sdp"] if body else []),
        ]
        status, headers, answer = self._transaction(
            call.call_id, call.cseq, method, lambda: self._send(lines, body), timeout
        )
        code = int(status.split()[1])
        call.last_status = status
        if method == "INVITE":
            if first and code < 300:
                call.remote_tag = re.search(r"tag=([^;>\s]+)", headers["to"][0]).group(1)
                call.route_set = list(reversed(_split_routes(headers.get("record-route", []))))
                contact = re.search(r"<([^>]+)>", headers["contact"][0])
                call.remote_target = contact.group(1) if contact else call.remote_target
            self._ack(call, code, headers)
        return code, status, headers, answer

    def _ack(self, call, code, headers):
        to = headers["to"][0]
        if code >= 300:  # hop by hop: to the proxy, same branch not needed for our purposes
            target, routes = call.remote_uri, []
        else:
            target, routes = call.remote_target, call.route_set
        lines = [
            f"ACK {target} SIP/2.0",
            self._via(),
            "Max-Forwards: 70",
            f"From: <{self.uri}>;tag={call.local_tag}",
            f"To: {to}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {call.cseq} ACK",
            *[f"Route: {route}" for route in routes],
        ]
        self._send(lines)

    # -- receiving ----------------------------------------------------------------------

    def _read_sip(self):
        while True:
            data, source = self.sip.recvfrom(MAX_PACKET)
            first, headers, body = parse(data)
            if first.startswith("SIP/2.0 "):
                code = int(first.split()[1])
                cseq_number, _, method = headers.get("cseq", ["0 ?"])[0].partition(" ")
                waiter = self._waiting.get((headers.get("call-id", [""])[0], int(cseq_number), method.strip()))
                if waiter is not None and code >= 200 and not waiter.ready():
                    waiter.set((first, headers, body))
                continue
            self._answer_request(first, headers, body, source)

    def _answer_request(self, first, headers, body, source):
        method = first.split()[0]
        call_id = headers.get("call-id", [""])[0]
        call = self.calls.get(call_id)
        reply_headers = [*(f"Via: {v}" for v in headers.get("via", [])), f"From: {headers['from'][0]}"]
        to = headers["to"][0]
        if method == "INVITE" and call is None:
            call = Call(self, call_id, os.urandom(4).hex(), re.search(r"<([^>]+)>", headers["from"][0]).group(1), False)
            call.remote_tag = re.search(r"tag=([^;>\s]+)", headers["from"][0]).group(1)
            call.vias_received = sum(len(v.split(",")) for v in headers.get("via", []))
            call.media = sdp_media(body)
            self.calls[call_id] = call
            self.incoming.append(call)
        if method in ("INVITE", "BYE") and call is not None:
            if "tag=" not in to:
                to += f";tag={call.local_tag}"
            sdp = self.sdp() if method == "INVITE" else ""
            if method == "INVITE" and body:
                call.media = sdp_media(body)
            lines = [
                "SIP/2.0 200 OK",
                *reply_headers,
                f"To: {to}",
                f"Call-ID: {call_id}",
                f"CSeq: {headers['cseq'][0]}",
                *(f"Record-Route: {r}" for r in headers.get("record-route", [])),
                f"Contact: <sip:{self.user}@{self.advertised}:{self.port}>",
                *(["Content-Type: application/sdp"] if sdp else []),
            ]
            self._send(lines, sdp, source)
            if method == "BYE":
                call.ended.set()
            else:
                call.answered.set()
        elif method == "OPTIONS":
            self._send(
                ["SIP/2.0 200 OK", *reply_headers, f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {headers['cseq'][0]}"],
                "",
                source,
            )

    def _read_rtp(self):
        while True:
            data, source = self.rtp.recvfrom(MAX_PACKET)
            if len(data) < 12:
                continue
            if self.on_rtp is not None:
                self.on_rtp(data, source)
                continue
            # Every call of this phone shares its RTP port: count for the calls still up.
            for call in self.calls.values():
                if call.answered.is_set() and not call.ended.is_set():
                    call.received += 1
                    call.sources.add(source)

    def wait_incoming(self, count=1, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.incoming) < count:
            if time.monotonic() > deadline:
                raise PhoneError(f"{self.user}: {len(self.incoming)} incoming calls, {count} expected")
            gevent.sleep(0.01)
        return self.incoming[count - 1]


def _split_routes(values):
    routes = []
    for value in values:
        routes.extend(part.strip() for part in re.findall(r"<[^>]+>[^,]*", value))
    return routes
