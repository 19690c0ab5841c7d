"""The embedded backend: thor-dns answers the zone itself, over UDP and TCP.

For one machine and for make demo. The zone is an immutable dict swapped
whole on every change, so a query never sees half a change. Sliced record
sets answer a fresh random sample of at most answer_limit records per query.
Malformed packets are dropped (or answered FORMERR when their header can be
read); TCP clients are bounded in number, idle time and message size.
"""

import logging
import random
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from gevent.pool import Pool
from gevent.server import DatagramServer, StreamServer

from thor.transport.limits import SourceLimit

__all__ = ["EmbeddedZone"]

log = logging.getLogger("thor.dns")

UDP_PAYLOAD = 512
MAX_TCP_MESSAGE = 65535


class Zone:
    """An immutable snapshot: SOA and RRSets as dnspython objects."""

    def __init__(self, settings, records, serial):
        self.origin = dns.name.from_text(settings.origin)
        self.answer_limit = settings.answer_limit
        self.soa = dns.rrset.from_text(
            settings.origin,
            settings.ttl,
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"{settings.absolute(settings.nameservers[0][0]) if settings.nameservers else settings.origin} "
            f"{settings.hostmaster} {serial} 3600 600 604800 {settings.ttl}",
        )
        self.rrsets = {}
        self.names = {self.origin}
        for (name, rdtype), rrset in records.items():
            key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
            full = dns.rrset.from_text_list(key[0], rrset.ttl, dns.rdataclass.IN, key[1], list(rrset.rdatas))
            self.rrsets[key] = (full, rrset.sliced)
            # The name and every name between it and the origin exist (RFC 8020: an
            # empty non-terminal such as _udp.D answers NODATA, not NXDOMAIN).
            node = key[0]
            while node != self.origin and node.is_subdomain(self.origin):
                self.names.add(node)
                node = node.parent()
        self.serial = serial

    def lookup(self, name, rdtype):
        if rdtype == dns.rdatatype.SOA and name == self.origin:
            return self.soa
        found = self.rrsets.get((name, rdtype))
        if found is None:
            return None
        rrset, sliced = found
        if sliced and len(rrset) > self.answer_limit:
            chosen = random.sample(list(rrset), self.answer_limit)
            rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, chosen)
        return rrset


class EmbeddedZone:
    def __init__(self, listen, max_tcp_clients=256, tcp_idle_timeout=5.0, max_tcp_per_source=16):
        """At most max_tcp_clients TCP clients at once, max_tcp_per_source of them from one IP address
        (more from it are closed at once: one stranger's idle sockets keep no resolver out)."""
        self.listen = listen
        self.zone = None
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_per_source = SourceLimit(max_tcp_per_source)
        self._udp = DatagramServer(listen, self._on_datagram)
        self._tcp = StreamServer(listen, self._on_stream, spawn=Pool(max_tcp_clients))

    @property
    def address(self):
        return self._udp.address

    def start(self):
        self._udp.start()
        # The TCP server takes the port UDP got (it may have been 0 in tests).
        self._tcp = StreamServer(self._udp.address, self._tcp.handle, spawn=self._tcp.pool)
        self._tcp.start()

    def stop(self):
        self._udp.stop()
        self._tcp.stop(timeout=1)

    def update(self, settings, records, serial):
        self.zone = Zone(settings, records, serial)

    # -- answering --------------------------------------------------------------

    def answer(self, wire, max_size):
        """The response to one query message, as wire bytes; None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return self._formerr(wire)
        except Exception:  # dnspython raises assorted errors on crafted input
            return self._formerr(wire)
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: never answer it
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        zone = self.zone
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        if zone is None or question.rdclass != dns.rdataclass.IN or not name.is_subdomain(zone.origin):
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        rrset = zone.lookup(name, rdtype)
        if rrset is not None:
            response.answer.append(rrset)
            if rdtype == dns.rdatatype.SRV:
                for rdata in rrset:
                    for address_type in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        extra = zone.lookup(rdata.target, address_type)
                        if extra is not None:
                            response.additional.append(extra)
        else:
            if name not in zone.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(zone.soa)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    @staticmethod
    def _formerr(wire):
        if len(wire) < 12:
            return None
        query_id, flags = struct.unpack("!HH", wire[:4])
        if flags & 0x8000:  # QR: not a query
            return None
        # Header only: id, QR+opcode copied, FORMERR, no sections.
        return struct.pack("!HHHHHH", query_id, 0x8000 | (flags & 0x7800) | dns.rcode.FORMERR, 0, 0, 0, 0)

    def _on_datagram(self, data, address):
        try:
            reply = self.answer(data, UDP_PAYLOAD)
        except Exception:
            log.exception("failed to answer a DNS query from %s", address[0])
            return
        if reply is not None:
            self._udp.sendto(reply, address)

    def _on_stream(self, sock, address):
        source = address[0] if address else "?"
        if not self.tcp_per_source.admit(source, log, "DNS TCP connections"):
            sock.close()
            return
        try:
            self._serve_stream(sock)
        finally:
            self.tcp_per_source.release(source)

    def _serve_stream(self, sock):
        sock.settimeout(self.tcp_idle_timeout)
        stream = sock.makefile("rwb")
        try:
            while True:
                header = stream.read(2)
                if len(header) < 2:
                    return
                (length,) = struct.unpack("!H", header)
                wire = stream.read(length)
                if len(wire) < length:
                    return
                reply = self.answer(wire, MAX_TCP_MESSAGE)
                if reply is None:
                    return
                stream.write(struct.pack("!H", len(reply)) + reply)
                stream.flush()
        except OSError:
            return
        finally:
            stream.close()
