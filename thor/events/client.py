"""The member's side of the event bus.

EventClient keeps one link to every event server (a static list, or the
_eventserver._tcp SRV records of the network's domain, looked up again every
discovery_interval), reconnects each with exponential backoff and jitter,
re-subscribes and re-sends its retained publications after every reconnect,
publishes to every connected server, and hands each message to the
application once although it arrives through several servers.

Handlers run in the greenlet of the link that delivered the message, one
message at a time per link; a handler that raises is logged and the link goes
on.
"""

import collections
import functools
import itertools
import logging
import os
import random
import time

import dns.rdatatype
import dns.resolver
import gevent
from gevent.event import Event

from thor import roles
from thor.events import protocol
from thor.events.protocol import PROTOCOL_VERSION, ProtocolError
from thor.transport.framing import FrameDecoder, FrameError
from thor.transport.tls import TLSError, connect, format_address
from thor.transport.writer import QueuedWriter

__all__ = ["Deduplicator", "EventClient", "Message", "discover_event_servers"]

log = logging.getLogger("thor.events")

EVENTSERVER_SRV = "_eventserver._tcp"
PING = protocol.encode({"type": "ping"})


class Message:
    __slots__ = ("body", "publisher", "seq", "server", "session", "topic")

    def __init__(self, topic, publisher, session, seq, body, server):
        self.topic = topic
        self.publisher = publisher
        self.session = session
        self.seq = seq
        self.body = body
        self.server = server

    def __repr__(self):
        return f"Message({self.topic!r} from {self.publisher!r} #{self.seq} via {self.server!r})"


class Deduplicator:
    """Remembers which (publisher, session, topic, seq) were delivered, in bounded memory.

    Per stream (publisher, session, topic) it keeps a watermark below which
    every sequence number counts as delivered, and the delivered numbers above
    it. A stream's first message sets the watermark just below itself. Gaps
    (a number no server delivered) are given up once more than max_pending
    numbers wait above them.
    """

    def __init__(self, max_streams=65536, max_pending=1024):
        self.max_streams = max_streams
        self.max_pending = max_pending
        self._streams = collections.OrderedDict()

    def forget(self, publisher, session):
        """Drop every stream of (publisher, session): its messages count as new again."""
        for key in [key for key in self._streams if key[:2] == (publisher, session)]:
            del self._streams[key]

    def first_time(self, publisher, session, topic, seq):
        key = (publisher, session, topic)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = [seq - 1, set()]
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(key)
        watermark, above = stream
        if seq <= watermark or seq in above:
            return False
        if seq == watermark + 1:
            watermark = seq
            while watermark + 1 in above:
                watermark += 1
                above.discard(watermark)
        else:
            above.add(seq)
            while len(above) > self.max_pending:
                watermark = min(above)
                above.discard(watermark)
                while watermark + 1 in above:
                    watermark += 1
                    above.discard(watermark)
        stream[0] = watermark
        return True


class ServerLink:
    """One event server: connect, hello, subscribe, read; reconnect until stopped.

    It serves its EventClient, which it tells of what happens through the client's link
    interface: subscriptions(link), retained_frames(), link_up(link), deliver(message, server),
    server_error(link, error frame), link_down(link); and whose settings it reads.
    """

    def __init__(self, client, endpoint):
        self.client = client
        self.endpoint = endpoint
        self.server_name = None
        self.connected = False
        self.keepalive = None
        self.server_serial = None
        self.server_identity = None  # its certificate's Identity, as of the last handshake
        self.server_certificate_expires = None  # seconds since the epoch
        self.reconnecting = False  # reconnect() dropped the connection; cleared once back
        self.certificate_serial = None  # of our certificate the connection was made with
        self.connected_since = None  # time.monotonic() of the current connection's hello
        self.last_uptime = 0.0  # seconds the last connection was up
        self.pings_sent = 0
        self.pongs_received = 0
        self._pong = Event()
        self._writer = None
        self._stopped = False
        self._greenlet = gevent.spawn(self._run)

    def __str__(self):
        name = self.server_name or "event server"
        return f"{name} ({format_address(self.endpoint)})"

    @property
    def stopped(self):
        return self._stopped

    def stop(self, flush_timeout=0):
        """Stop; what is queued (a leave, say) gets flush_timeout seconds to go out."""
        self._stopped = True
        if self._writer is not None:
            self._writer.close(flush_timeout)
        self._greenlet.kill(block=False)

    def send(self, frame):
        return self.connected and self._writer is not None and self._writer.send(frame)

    def disconnect(self):
        """Drop the connection now (it reconnects after its backoff, unless stopped)."""
        if self._writer is not None:
            self._writer.close()

    def reconnect(self):
        """Drop the connection on purpose and connect anew (a renewed certificate): while
        reconnecting is true, followers may keep what this server told them."""
        self.reconnecting = True
        self.disconnect()

    def ping(self):
        """Send a ping; returns its number, or None when the link is down."""
        if not self.send(PING):
            return None
        self.pings_sent += 1
        return self.pings_sent

    def wait_pong(self, number, timeout):
        """Wait until the server answered ping number: it has handled every frame sent before it."""
        with gevent.Timeout(timeout, False):
            while self.pongs_received < number and self.connected:
                self._pong.clear()
                self._pong.wait()
        # A link that went down meanwhile has nothing left to wait for.
        return self.pongs_received >= number or not self.connected

    def _run(self):
        delay = self.client.backoff_min
        while not self._stopped:
            try:
                self._session()
                delay = self.client.backoff_min  # it ended cleanly: start the backoff anew
            except (OSError, TLSError, ProtocolError, FrameError) as error:
                if self._stopped:
                    return
                # A link that was up says why it broke; failed attempts after the first, quietly.
                quiet = self.reconnecting or (delay > self.client.backoff_min and not self.connected)
                log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %s", self, error)
            except Exception:
                log.exception("%s: unexpected error; reconnecting", self)
            finally:
                self._disconnected()
            if self._stopped:
                return
            # Dropped on purpose (reconnect()), or after a connection that held: back at once, so
            # that a long-lived member is not left out for the backoff its failures built up
            # months ago. A connection cut soon after it came up (a slow consumer cut again and
            # again, an overloaded server) keeps backing off, so that it cannot loop tightly.
            if self.reconnecting or self.last_uptime >= self.client.stable_session:
                delay = self.client.backoff_min
            # Jitter spreads the reconnects of hundreds of members after an event server restarts.
            gevent.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.client.backoff_max)

    def _session(self):
        # Read before the handshake: a certificate renewed meanwhile counts as not yet used.
        serial = getattr(self.client.contexts, "certificate_serial", None)
        tls_socket, identity = self.client.connect(
            self.endpoint, timeout=self.client.connect_timeout, expected_role=roles.EVENT_SERVER
        )
        self.server_name = identity.name
        self.server_serial = identity.serial
        self.server_identity = identity
        self.certificate_serial = serial
        self.server_certificate_expires = identity.not_after
        self._writer = QueuedWriter(tls_socket, self.client.send_queue_limit)
        decoder = FrameDecoder(protocol.MAX_SERVER_FRAME_SIZE)
        self._writer.send(protocol.encode({"type": "hello", "version": PROTOCOL_VERSION}))
        tls_socket.settimeout(self.client.connect_timeout)
        hello = self._read_hello(tls_socket, decoder)
        self.keepalive = float(hello.get("keepalive", 1.0))
        tls_socket.settimeout(self.keepalive * 3)
        self.connected = True
        self.connected_since = time.monotonic()
        topics = self.client.subscriptions(self)
        for start in range(0, len(topics), protocol.MAX_TOPICS_PER_FRAME):
            chunk = topics[start : start + protocol.MAX_TOPICS_PER_FRAME]
            self._writer.send(protocol.encode({"type": "subscribe", "topics": chunk}))
        for frame in self.client.retained_frames():
            self._writer.send(frame)
        log.info("connected to %s", self)
        self.client.link_up(self)
        pinger = gevent.spawn(self._ping_loop)
        try:
            self._read_loop(tls_socket, decoder)
        finally:
            pinger.kill(block=False)

    def _read_hello(self, tls_socket, decoder):
        while True:
            data = tls_socket.recv(65536)
            if not data:
                raise ConnectionError("closed before hello")
            for payload in decoder.feed(data):
                message = protocol.decode(payload)
                if message["type"] == "hello":
                    return message
                if message["type"] == "error":
                    raise ProtocolError(message["code"], f"refused: {message['message']}")
                raise ProtocolError(protocol.UNEXPECTED, f"expected hello, got {message['type']}")

    def _ping_loop(self):
        while self.connected:
            gevent.sleep(self.keepalive)
            self.ping()

    def _read_loop(self, tls_socket, decoder):
        while not self._stopped:
            try:
                data = tls_socket.recv(65536)
            except TimeoutError:
                raise ConnectionError(f"nothing received for {self.keepalive * 3:g}s") from None
            if not data:
                raise ConnectionError("connection closed by the server")
            for payload in decoder.feed(data):
                message = protocol.decode(payload)
                kind = message["type"]
                if kind == "message":
                    self.client.deliver(message, self.server_name)
                elif kind == "pong":
                    self.pongs_received += 1
                    self._pong.set()
                elif kind == "error":
                    self.client.server_error(self, message)
                    if message["code"] in protocol.FATAL_ERRORS:
                        raise ProtocolError(message["code"], f"disconnected: {message['message']}")

    def _disconnected(self):
        was_connected = self.connected
        self.last_uptime = time.monotonic() - self.connected_since if was_connected else 0.0
        self.connected = False
        self._pong.set()
        self.pings_sent = self.pongs_received = 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if was_connected:
            log.info("disconnected from %s", self)
            self.client.link_down(self)


class EventClient:
    """A member's connections to the event servers. See the module documentation."""

    def __init__(
        self,
        contexts,
        servers=(),
        domain=None,
        nameservers=(),
        discovery_interval=60.0,
        connect_timeout=5.0,
        backoff=(0.5, 30.0),
        send_queue_limit=4 << 20,
        connector=None,
        stable_session=10.0,
    ):
        """contexts: the TLS contexts the links connect with; connector(endpoint, timeout,
        expected_role) -> (socket, server Identity) replaces TLS (thor.transport.memory).
        stable_session: a link whose connection lasted this many seconds starts its backoff
        anew when it breaks (a shorter one goes on from where its failures left it)."""
        if not servers and not domain:
            raise ValueError("event servers need a static list or a domain to discover them in")
        self.contexts = contexts
        self.connect = connector or functools.partial(connect, contexts=contexts)
        self.static_servers = tuple(servers)
        self.domain = domain
        self.nameservers = tuple(nameservers)
        self.discovery_interval = discovery_interval
        self.connect_timeout = connect_timeout
        self.backoff_min, self.backoff_max = backoff
        self.stable_session = stable_session
        self.send_queue_limit = send_queue_limit
        self.handlers = collections.defaultdict(list)
        self.retained = {}  # topic -> [publish frame]: one, or a log's in order
        self._every_copy = set()  # topics whose handlers get every copy (subscribe(deduplicate=False))
        self._one_server = {}  # topic -> the link it is followed through (subscribe(one_server=True))
        self.links = {}
        self.session = os.urandom(8).hex()
        self._sequences = collections.defaultdict(lambda: itertools.count(1))
        self._dedup = Deduplicator()
        self._connect_callbacks = []
        self._disconnect_callbacks = []
        self._error_callbacks = []
        self._changed = Event()
        self._discovery = None
        self._renewing = None  # the greenlet moving the links to a renewed certificate
        if contexts is not None:
            self._certificate_serial = contexts.certificate_serial
            contexts.add_reload_callback(self._drop_revoked_servers)
            contexts.add_reload_callback(self._move_to_renewed_certificate)

    @classmethod
    def from_config(cls, network, contexts, connect_timeout=5.0):
        """A client for [ThorNetwork]: its static event servers, or SRV discovery under its domain."""
        return cls(
            contexts,
            servers=network.event_servers,
            domain=network.domain,
            nameservers=network.nameservers,
            discovery_interval=network.discovery_interval,
            connect_timeout=connect_timeout,
        )

    # -- application API ------------------------------------------------------

    def subscribe(self, topic, handler, deduplicate=True, one_server=False):
        """handler(Message) for every message on topic, once each (the settings hold for every
        handler of topic). deduplicate=False: every copy, through every server and as often as
        a server sends it again (see refresh). one_server=True: the topic is followed through
        one connected server only, another when its link drops (whose subscription hands over
        what it retains): a third of the bytes with three servers, for a topic whose receiver
        recovers what it misses (the network status)."""
        if not protocol.is_topic(topic):
            raise ValueError(f"invalid topic {topic!r}")
        if not deduplicate:
            self._every_copy.add(topic)
        new = topic not in self.handlers
        self.handlers[topic].append(handler)
        if new and one_server:
            self._one_server[topic] = None
            self._follow_elsewhere(topic)
        elif new:
            self._broadcast(protocol.encode({"type": "subscribe", "topics": [topic]}))

    def refresh(self, topic):
        """Ask one connected server for what is retained on topic again (its handlers get it
        as new messages only with deduplicate=False); returns whether a server was asked."""
        frame = protocol.encode({"type": "subscribe", "topics": [topic]})
        following = self._one_server.get(topic)
        if following is not None and following.send(frame):
            return True
        return any(link.send(frame) for link in self.links.values() if link.connected)

    def _follow_elsewhere(self, topic, lost=None):
        """A one_server topic through a connected link (a random one: members spread over the servers)."""
        connected = [link for link in self.links.values() if link.connected and link is not lost]
        link = random.choice(connected) if connected else None
        self._one_server[topic] = link
        if link is not None:
            link.send(protocol.encode({"type": "subscribe", "topics": [topic]}))

    def forget_session(self, publisher, session):
        """Messages of (publisher, session) will be delivered again, as if never seen."""
        self._dedup.forget(publisher, session)

    def unsubscribe(self, topic, handler):
        handlers = self.handlers.get(topic, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers and topic in self.handlers:
            del self.handlers[topic]
            self._broadcast(protocol.encode({"type": "unsubscribe", "topics": [topic]}))

    def publish(self, topic, body, retain=False, deliver=True):
        """Send body on topic to every connected server; returns how many it was queued for.

        retain=True: the servers hand it to later subscribers while this
        member is connected, and it is sent again to every server this client
        (re)connects to. retain="append" (log topics): the same, after what
        this client retained on topic before; True starts the log anew.
        deliver=False: retained only, not sent to the current subscribers.
        """
        if not protocol.is_topic(topic):
            raise ValueError(f"invalid topic {topic!r}")
        frame = protocol.encode(
            {
                "type": "publish",
                "topic": topic,
                "session": self.session,
                "seq": next(self._sequences[topic]),
                "retain": retain,
                **({} if deliver else {"deliver": False}),
                "body": body,
            }
        )
        if retain == protocol.APPEND:
            self.retained.setdefault(topic, []).append(frame)
        elif retain:
            self.retained[topic] = [frame]
        return self._broadcast(frame)

    def on_connect(self, callback):
        """callback(link) after a server link is up (hello done, subscriptions and retained sent)."""
        self._connect_callbacks.append(callback)

    def on_disconnect(self, callback):
        self._disconnect_callbacks.append(callback)

    def on_error(self, callback):
        """callback(link, error frame dict) for errors a server reports (a forbidden publish, say)."""
        self._error_callbacks.append(callback)

    @property
    def connected_servers(self):
        return sorted(link.server_name for link in self.links.values() if link.connected)

    def wait_connected(self, count=1, timeout=None):
        """Wait until at least count servers are connected; returns whether they are."""
        with gevent.Timeout(timeout, False):
            while len(self.connected_servers) < count:
                self._changed.clear()
                self._changed.wait()
        return len(self.connected_servers) >= count

    def sync(self, timeout=5.0):
        """Wait until every connected server has handled all this client sent so far.

        A server whose link drops meanwhile no longer counts.

        Useful after subscribe(): once sync() returns True, messages published
        from then on reach this client through every connected server.
        """
        pending = [(link, link.ping()) for link in self.links.values() if link.connected]
        deadline = time.monotonic() + timeout
        return all(
            number is not None and link.wait_pong(number, max(0.0, deadline - time.monotonic()))
            for link, number in pending
        )

    def start(self):
        if self.static_servers:
            self._set_endpoints(self.static_servers)
        else:
            self._discovery = gevent.spawn(self._discover_loop)

    def stop(self, flush_timeout=1.0):
        """Close every link, giving what is queued flush_timeout seconds to go out."""
        if self.contexts is not None:
            self.contexts.remove_reload_callback(self._drop_revoked_servers)
            self.contexts.remove_reload_callback(self._move_to_renewed_certificate)
        if self._renewing is not None:
            self._renewing.kill(block=False)
        if self._discovery is not None:
            self._discovery.kill(block=False)
        gevent.joinall([gevent.spawn(link.stop, flush_timeout) for link in self.links.values()])
        self.links.clear()

    # -- internals --------------------------------------------------------------

    def _drop_revoked_servers(self, contexts):
        """A new CRL revokes an event server we are connected to: drop the link (its reconnect is refused)."""
        for link in self.links.values():
            if link.connected and link.server_serial in contexts.revoked_serials:
                log.warning("disconnecting from %s: its certificate was revoked", link)
                link.disconnect()

    def _move_to_renewed_certificate(self, contexts):
        """This program's certificate was renewed, or the CA of a server's retired (a CA rollover
        finished): reconnect to the event servers one at a time, so that every server sees (and
        thor-monitor reports) the new certificate before the old one expires, every link is
        checked against the CAs trusted now, and the member stays in the network status through
        its other links."""
        if contexts.certificate_serial == self._certificate_serial and not any(
            map(self._untrusted, self.links.values())
        ):
            return
        self._certificate_serial = contexts.certificate_serial
        if self._renewing is None or self._renewing.dead:
            self._renewing = gevent.spawn(self._reconnect_links_in_turn)

    def _reconnect_links_in_turn(self):
        # Long enough for a reconnect after the shortest backoff; a server that does not take
        # the link back by then is left to the link's own retries.
        bound = self.connect_timeout + 2 * self.backoff_min + 5.0
        # Until every connected link holds the newest certificate (one renewed again meanwhile
        # included); each link at most a few times, whatever happens.
        for _ in range(2 * len(self.links) + 2):
            serial = self.contexts.certificate_serial
            stale = [
                link
                for _, link in sorted(self.links.items())
                if link.connected and (link.certificate_serial != serial or self._untrusted(link))
            ]
            if not stale:
                return
            link = stale[0]
            if self._untrusted(link):
                log.info("reconnecting to %s: %s", link, self._untrusted(link))
            else:
                log.info("reconnecting to %s with the renewed certificate (serial %x)", link, serial)
            link.reconnect()
            with gevent.Timeout(bound, False):
                while link.connected:
                    gevent.sleep(0.05)
                while not link.connected and not link.stopped:
                    gevent.sleep(0.05)
                # Back once the server has handled what the link re-sent (presence included):
                # then it reports this member's session on the new connection.
                number = link.ping()
                if number is not None:
                    link.wait_pong(number, bound)
            link.reconnecting = False

    def _untrusted(self, link):
        """Why the certificate link's server presented is no longer trusted (its CA retired), or None."""
        identity = link.server_identity
        if not link.connected or identity is None or identity.serial in self.contexts.revoked_serials:
            return None  # revoked: _drop_revoked_servers cuts it at once
        return self.contexts.refusal(identity)

    def _broadcast(self, frame):
        return sum(1 for link in self.links.values() if link.send(frame))

    def _set_endpoints(self, endpoints):
        wanted = set(endpoints)
        for endpoint in set(self.links) - wanted:
            log.info("event server %s is no longer listed", format_address(endpoint))
            self.links.pop(endpoint).stop()
        for endpoint in sorted(wanted - set(self.links)):
            self.links[endpoint] = ServerLink(self, endpoint)

    def _discover_loop(self):
        while True:
            try:
                endpoints = discover_event_servers(self.domain, self.nameservers, self.connect_timeout)
            except Exception as error:
                log.warning("event server discovery under %s failed: %s", self.domain, error)
                endpoints = None
            if endpoints:
                self._set_endpoints(endpoints)
            elif endpoints is not None:
                log.warning("no %s.%s SRV records: no event server to connect to", EVENTSERVER_SRV, self.domain)
            gevent.sleep(self.discovery_interval if endpoints else min(self.discovery_interval, 5.0))

    # -- what the links use (ServerLink) ------------------------------------------

    def subscriptions(self, link):
        """The topics link subscribes to when it connects: all but the one_server topics
        followed through another link."""
        return sorted(topic for topic in self.handlers if self._one_server.get(topic, link) is link)

    def retained_frames(self):
        return [frame for frames in self.retained.values() for frame in frames]

    def deliver(self, message, server):
        """A message frame a link received: handed to the topic's handlers once, whichever server brought it."""
        topic = message["topic"]
        if topic not in self._every_copy and not self._dedup.first_time(
            message["publisher"], message["session"], topic, message["seq"]
        ):
            return
        handlers = self.handlers.get(topic)
        if not handlers:
            return
        delivered = Message(topic, message["publisher"], message["session"], message["seq"], message["body"], server)
        for handler in tuple(handlers):
            try:
                handler(delivered)
            except Exception:
                log.exception("handler for %s failed on %r", topic, delivered)

    def server_error(self, link, message):
        log.warning("%s reports %s: %s", link, message["code"], message["message"])
        for callback in tuple(self._error_callbacks):
            _call(callback, link, message)

    def link_up(self, link):
        self._changed.set()
        for topic, following in self._one_server.items():
            if following is None or not following.connected:
                self._one_server[topic] = link
                link.send(protocol.encode({"type": "subscribe", "topics": [topic]}))
        for callback in tuple(self._connect_callbacks):
            _call(callback, link)

    def link_down(self, link):
        self._changed.set()
        for topic, following in list(self._one_server.items()):
            if following is link:
                self._follow_elsewhere(topic, lost=link)
        for callback in tuple(self._disconnect_callbacks):
            _call(callback, link)


def _call(callback, *args):
    try:
        callback(*args)
    except Exception:
        log.exception("event client callback %r failed", callback)


def discover_event_servers(domain, nameservers=(), timeout=5.0):
    """The (address, port) of every event server in the _eventserver._tcp SRV records of domain.

    dnspython blocks; the lookup runs in gevent's thread pool so that the
    other greenlets go on meanwhile, monkey-patched or not.
    """
    return gevent.get_hub().threadpool.apply(_lookup_event_servers, (domain, nameservers, timeout))


def _lookup_event_servers(domain, nameservers, timeout):
    resolver = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [host for host, _ in nameservers]
        resolver.port = nameservers[0][1]
    resolver.lifetime = timeout
    try:
        answer = resolver.resolve(f"{EVENTSERVER_SRV}.{domain}", "SRV")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    endpoints = []
    for record in sorted(answer, key=lambda r: (r.priority, -r.weight)):
        target = record.target.to_text()
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                addresses = resolver.resolve(target, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            endpoints.extend((address.to_text(), record.port) for address in addresses)
    return endpoints
