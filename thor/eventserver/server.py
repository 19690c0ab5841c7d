"""The event bus: members subscribe to topics and publish messages over mutual TLS.

Each published message is encoded once and queued to every current
subscriber of its topic; one reader greenlet per connection handles that
connection's frames in order, so messages of one publisher reach each
subscriber in the order they were published. Every connection has a bounded
send queue: a subscriber that cannot keep up is disconnected, the server never
buffers without bound.

The server hands its own entity (role thor_eventserver, its address and
port) to every subscriber of Thor.Presence, so that managers list the event
servers they reach in the network status. It announces on Thor.Connections
every member that connects or goes
away (crash, cut link, clean close), and answers a subscription to that topic
with a snapshot of who is connected now. Retained publications (a member's
presence, the manager's network status) are kept while their publisher is
connected and handed to each new subscriber of the topic.

Over TLS the server also keeps the network's newest CRL moving: a member
offers its CRL on Thor.CRL; the server takes it when it supersedes its own
(the CA's signature makes it good, whoever sends it), drops the connections
it revokes, and hands it to every subscriber, as it does to each new one.
"""

import collections
import ipaddress
import itertools
import logging
import os
import time

import gevent

# The applications' topics and their rules (the core declares only its own).
import thor.accounts.protocol  # noqa: F401
from thor.events import protocol, topics
from thor.events.protocol import PROTOCOL_VERSION, ProtocolError
from thor.transport.framing import FrameDecoder, FrameError
from thor.transport.tls import TLSServer, format_address
from thor.transport.writer import QueuedWriter

__all__ = ["EventServer", "Limits"]

log = logging.getLogger("thor.eventserver")

# Seconds during which the server ignores a connection's CRL offers after refusing one (each
# costs a signature check).
CRL_OFFER_INTERVAL = 1.0


class Limits:
    """Bounds on what one member may make the server hold or wait for."""

    def __init__(
        self,
        keepalive=1.0,
        idle_timeout=3.0,
        handshake_timeout=5.0,
        max_frame_size=1 << 20,
        send_queue_limit=4 << 20,
        max_connections=10000,
        max_handshakes_per_source=16,
        max_connections_per_name=16,
        max_subscriptions=256,
        max_retained=16,
        max_sessions=8,
        max_retained_bytes=256 << 10,
        max_log_bytes=64 << 20,
        presence_from_peer=False,
    ):
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_frame_size = max_frame_size
        self.send_queue_limit = send_queue_limit
        self.max_connections = max_connections
        self.max_handshakes_per_source = max_handshakes_per_source
        self.max_connections_per_name = max_connections_per_name
        self.max_subscriptions = max_subscriptions
        self.max_retained = max_retained
        self.max_sessions = max_sessions
        self.max_retained_bytes = max_retained_bytes
        self.max_log_bytes = max_log_bytes
        self.presence_from_peer = presence_from_peer


class Connection:
    """One member's TLS connection: its subscriptions, retained messages and send queue."""

    def __init__(self, server, connection_id, tls_socket, identity):
        self.id = connection_id
        self.server = server
        self.socket = tls_socket
        self.identity = identity
        self.subscriptions = set()
        self.sessions = set()
        self.retained = {}  # topic -> [frame]: one, or a log's in order (retain "append")
        self.catch_ups = {}  # topic -> the writer's batch count when its last catch-up was queued
        self.registered = False
        self.crl_refused = -CRL_OFFER_INTERVAL  # when the server last refused its CRL offer
        self.writer = QueuedWriter(tls_socket, server.limits.send_queue_limit, on_overflow=self._overflow)

    def __str__(self):
        return str(self.identity)

    @property
    def closed(self):
        return self.writer.closed

    def describe(self):
        host, port = self.identity.address[:2]
        return {
            "connection": self.id,
            "name": self.identity.name,
            "roles": sorted(self.identity.roles),
            "address": host,
            "port": port,
            "sessions": sorted(self.sessions),
            "certificate_expires": self.identity.not_after,
            "certificate_issuer": self.identity.issuer,
        }

    def send(self, frame):
        self.server.traffic.sent(frame)
        self.writer.send(frame)

    def catch_up(self, topic, frames):
        """Queue what a subscription of topic is owed at once. It may go beyond the send queue's
        bound: it is what the server holds already, and a network's retained presence outgrows any
        bound chosen for live traffic. Not when the previous catch-up of topic is still queued:
        a member that asks again and again without reading is cut as any slow consumer."""
        previous = self.catch_ups.get(topic)
        beyond_bound = previous is None or previous < self.writer.batches
        self.catch_ups[topic] = self.writer.batches
        for frame in frames:
            self.server.traffic.sent(frame)
            self.writer.send(frame, catch_up=beyond_bound)

    def refuse(self, code, message, **details):
        """An error frame for a request that is refused; the connection stays open."""
        self.send(ProtocolError(code, message, **details).frame())

    def _overflow(self):
        self.server.refused[protocol.SLOW_CONSUMER] += 1
        log.warning("disconnecting %s: send queue over %d bytes, it does not keep up", self, self.writer.limit)


class EventServer:
    """The bus. serve(socket, identity) handles one authenticated connection: a TLS server
    (listen_tls) or an in-memory transport (thor.transport.memory) hands them over."""

    def __init__(self, name, limits=None, presence=None):
        """presence: this server's own entity, handed to every subscriber of Thor.Presence."""
        self.name = name
        self.limits = limits or Limits()
        self.topics = collections.defaultdict(set)
        self.connections = {}
        self.names = collections.Counter()  # connections per certificate name
        self.session = os.urandom(8).hex()
        self._sequence = itertools.count(1)
        self._connection_ids = itertools.count(1)
        self.traffic = Traffic()
        # Connections cut off by the server, by reason (the protocol's error codes, slow-consumer);
        # the TLS listener counts those refused before the hello (self.tls_refused).
        self.refused = collections.Counter()
        self._presence_frame = None
        if presence is not None:
            self._presence_frame = protocol.encode(
                {
                    "type": "message",
                    "topic": topics.PRESENCE,
                    "publisher": name,
                    "session": self.session,
                    "seq": 1,
                    "body": presence,
                }
            )
        self._tls_server = None
        self._contexts = None  # the TLS contexts, whose CRL the server hands out
        self._crl_frame = None

    @property
    def address(self):
        return self._tls_server.address if self._tls_server is not None else None

    def listen_tls(self, listen, contexts):
        """Serve members on listen over mutual TLS; OSError when the address cannot be bound."""
        self._tls_server = TLSServer(
            listen,
            contexts,
            self.serve,
            handshake_timeout=self.limits.handshake_timeout,
            max_connections=self.limits.max_connections,
            name="eventserver",
            max_handshakes_per_source=self.limits.max_handshakes_per_source,
        )
        self._tls_server.start()
        self._contexts = contexts
        contexts.add_reload_callback(self._hand_out_crl)
        self._hand_out_crl(contexts)
        log.info("event server %s listening on %s", self.name, format_address(self.address))

    @property
    def tls_refused(self):
        """Connections the TLS listener refused or cut off, by reason (TLSServer.refused)."""
        return self._tls_server.refused if self._tls_server is not None else collections.Counter()

    def members_by_role(self):
        """{role: connected members holding it}."""
        counts = collections.Counter()
        for connection in self.connections.values():
            counts.update(connection.identity.roles)
        return counts

    def retained_bytes(self):
        return sum(
            len(frame)
            for connection in self.connections.values()
            for frames in connection.retained.values()
            for frame in frames
        )

    def largest_send_queue(self):
        """The bytes queued for the slowest member now."""
        return max((connection.writer.queued_bytes for connection in self.connections.values()), default=0)

    def stop(self, timeout=5):
        """Close the listener and every member's connection."""
        if self._contexts is not None:
            self._contexts.remove_reload_callback(self._hand_out_crl)
        if self._tls_server is not None:
            self._tls_server.stop(timeout=timeout)
        for connection in list(self.connections.values()):
            connection.writer.close()

    # -- one connection -------------------------------------------------------

    def serve(self, tls_socket, identity):
        """Handle one member's connection until it ends; the caller closes the socket."""
        connection = Connection(self, next(self._connection_ids), tls_socket, identity)
        decoder = FrameDecoder(self.limits.max_frame_size)
        try:
            tls_socket.settimeout(self.limits.handshake_timeout)
            self._read_loop(connection, decoder)
        except ProtocolError as error:
            self.refused[error.code] += 1
            log.warning("disconnecting %s: %s (%s)", connection, error.message, error.code)
            connection.send(error.frame())
        except OSError as error:  # ssl.SSLError included
            log.debug("connection of %s ended: %s", connection, error)
        finally:
            try:
                self._unregister(connection)
            finally:
                # Whatever is queued (the error frame) gets a moment to go out.
                connection.writer.close(flush_timeout=1.0)

    def _read_loop(self, connection, decoder):
        tls_socket = connection.socket
        # The hello must come within handshake_timeout in all, not per read.
        hello_deadline = time.monotonic() + self.limits.handshake_timeout
        while not connection.closed:
            if not connection.registered:
                remaining = hello_deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError(protocol.UNEXPECTED, "no hello in time")
                tls_socket.settimeout(remaining)
            try:
                data = tls_socket.recv(65536)
            except TimeoutError:
                if not connection.registered:
                    raise ProtocolError(protocol.UNEXPECTED, "no hello in time") from None
                raise ProtocolError(
                    protocol.IDLE, f"nothing received for {self.limits.idle_timeout:g}s (keepalive missed)"
                ) from None
            if not data:
                return
            try:
                payloads = decoder.feed(data)
            except FrameError as error:
                raise ProtocolError(protocol.OVERSIZED, str(error)) from None
            self.traffic.received(len(data), len(payloads))
            for payload in payloads:
                self._dispatch(connection, protocol.decode(payload))
            # recv() on a busy socket returns without yielding: let the writers
            # and the other members run, so that no publisher starves them.
            gevent.sleep(0)

    def _dispatch(self, connection, message):
        kind = message["type"]
        if not connection.registered:
            if kind != "hello":
                raise ProtocolError(protocol.UNEXPECTED, f"expected hello, got {kind}")
            if message["version"] != PROTOCOL_VERSION:
                raise ProtocolError(
                    protocol.UNSUPPORTED_VERSION,
                    f"protocol version {message['version']} is not supported (this server speaks {PROTOCOL_VERSION})",
                    supported=[PROTOCOL_VERSION],
                )
            name = connection.identity.name
            if self.names[name] >= self.limits.max_connections_per_name:
                # One certificate (a stolen one, say) cannot take every slot or retain without end.
                raise ProtocolError(
                    protocol.LIMIT,
                    f"{name} has {self.names[name]} connections to this server already "
                    f"(at most {self.limits.max_connections_per_name} per name)",
                )
            connection.send(
                protocol.encode(
                    {
                        "type": "hello",
                        "version": PROTOCOL_VERSION,
                        "server": self.name,
                        "keepalive": self.limits.keepalive,
                        "max_frame_size": self.limits.max_frame_size,
                    }
                )
            )
            connection.socket.settimeout(self.limits.idle_timeout)
            self._register(connection)
        elif kind == "publish":
            self._publish(connection, message)
        elif kind == "subscribe":
            self._subscribe(connection, message["topics"])
        elif kind == "unsubscribe":
            for topic in message["topics"]:
                self._drop_subscription(connection, topic)
        elif kind == "ping":
            connection.send(protocol.encode({"type": "pong"}))
        elif kind == "pong":
            pass
        else:
            raise ProtocolError(protocol.UNEXPECTED, f"a member does not send {kind} frames")

    def _publish(self, connection, message):
        topic, seq = message["topic"], message["seq"]
        try:
            topics.authorize_publish(connection.identity, topic, message["body"])
        except topics.ForbiddenError as reason:
            log.warning("refused publish of %s on %s: %s", connection, topic, reason)
            connection.refuse(protocol.FORBIDDEN, str(reason), topic=topic, seq=seq)
            return
        if topic == topics.PRESENCE and self.limits.presence_from_peer:
            elsewhere = _announced_from_elsewhere(connection.identity, message["body"]["address"])
            if elsewhere:
                log.warning("refused publish of %s on %s: %s", connection, topic, elsewhere)
                connection.refuse(protocol.FORBIDDEN, elsewhere, topic=topic, seq=seq)
                return
        if topic == topics.CRL:
            self._offered_crl(connection, message["body"]["crl"])
            return
        try:
            frame = protocol.encode(
                {
                    "type": "message",
                    "topic": topic,
                    "publisher": connection.identity.name,
                    "session": message["session"],
                    "seq": seq,
                    "body": message["body"],
                },
                self.limits.max_frame_size + 1024,
            )
        except UnicodeEncodeError:
            raise ProtocolError(protocol.MALFORMED, "publish body holds text that is not valid Unicode") from None
        except FrameError:
            raise ProtocolError(protocol.OVERSIZED, "publish body grows beyond the maximum frame size") from None
        if not self._track_session(connection, message["session"], topic):
            return
        retain = message.get("retain", False)
        if retain:
            self._retain(connection, topic, seq, frame, retain)  # refused: the publisher is told
        if message.get("deliver", True):
            self._deliver(topic, frame)

    def _offered_crl(self, connection, pem):
        """A member's CRL: taken when it supersedes ours (then handed out by _hand_out_crl). After
        an offer it refused, the server looks at none of that connection's for a while."""
        if self._contexts is None or self._contexts.revocation_list.is_text(pem):
            return
        now = time.monotonic()
        if now - connection.crl_refused < CRL_OFFER_INTERVAL:
            return
        if self._contexts.offer_crl(pem):
            log.info("took %s offered by %s", self._contexts.revocation_list, connection)
        else:
            connection.crl_refused = now

    def _hand_out_crl(self, contexts):
        """After a reload: the CRL in use to every subscriber of Thor.CRL, when it is new."""
        pem = contexts.revocation_list.pem
        if self._crl_frame is not None and self._crl_frame[0] == pem:
            return
        frame = protocol.encode(
            {
                "type": "message",
                "topic": topics.CRL,
                "publisher": self.name,
                "session": self.session,
                "seq": next(self._sequence),
                "body": {"crl": pem.decode("ascii", "replace")},
            },
            protocol.MAX_SERVER_FRAME_SIZE,
        )
        self._crl_frame = (pem, frame)
        self._deliver(topics.CRL, frame)

    def _track_session(self, connection, session, topic):
        """Announce a connection's new session; False when it may hold no more.

        Several programs of one host share its certificate and name; the
        session tells them apart, so consumers learn which connection carries
        which session (a manager times out each program on its own).
        """
        if session in connection.sessions:
            return True
        if len(connection.sessions) >= self.limits.max_sessions:
            connection.refuse(
                protocol.LIMIT, f"at most {self.limits.max_sessions} sessions per connection", topic=topic
            )
            return False
        connection.sessions.add(session)
        event = {"event": "session", "server": self.name, "member": connection.describe(), "session": session}
        self._deliver(topics.CONNECTIONS, self._event_frame(event))
        return True

    def _retain(self, connection, topic, seq, frame, retain):
        """Keep frame for later subscribers (retain True: instead of what was kept on topic;
        "append": after it, on a log topic); False, with the publisher told, when refused."""
        retained = connection.retained
        log_topic = topics.is_log(topic)
        kept = [*retained.get(topic, ()), frame] if retain == protocol.APPEND else [frame]
        if retain == protocol.APPEND and not log_topic:
            refusal = f"{topic} keeps no retained log"
        elif topic not in retained and len(retained) >= self.limits.max_retained:
            refusal = f"at most {self.limits.max_retained} retained topics per connection"
        elif log_topic and sum(map(len, kept)) > self.limits.max_log_bytes:
            refusal = f"at most {self.limits.max_log_bytes} bytes in a retained log"
        elif not log_topic and _retained_bytes(retained, but=topic) + len(frame) > self.limits.max_retained_bytes:
            refusal = f"at most {self.limits.max_retained_bytes} bytes retained per connection"
        else:
            retained[topic] = kept
            return True
        connection.refuse(protocol.LIMIT, refusal, topic=topic, seq=seq)
        return False

    def _deliver(self, topic, frame):
        subscribers = self.topics.get(topic)
        if subscribers:
            for subscriber in tuple(subscribers):
                subscriber.send(frame)

    def _subscribe(self, connection, names):
        for topic in names:
            if topic in connection.subscriptions:
                # Subscribing again asks for what is retained again (a member that lost track).
                self._catch_up(connection, topic)
                continue
            try:
                topics.authorize_subscribe(connection.identity, topic)
            except topics.ForbiddenError as reason:
                log.warning("refused subscription of %s to %s: %s", connection, topic, reason)
                connection.refuse(protocol.FORBIDDEN, str(reason), topic=topic)
                continue
            if len(connection.subscriptions) >= self.limits.max_subscriptions:
                connection.refuse(protocol.LIMIT, f"at most {self.limits.max_subscriptions} subscriptions", topic=topic)
                return
            connection.subscriptions.add(topic)
            self.topics[topic].add(connection)
            self._catch_up(connection, topic, first=True)

    def _catch_up(self, connection, topic, first=False):
        """What a subscriber of topic is owed: every connection's retained frames, and on its first
        subscription the server's own (its presence, the CRL, the snapshot of its connections)."""
        frames = []
        if first and topic == topics.PRESENCE and self._presence_frame is not None:
            frames.append(self._presence_frame)
        if first and topic == topics.CRL and self._crl_frame is not None:
            frames.append(self._crl_frame[1])
        if first and topic == topics.CONNECTIONS:
            members = [other.describe() for other in self.connections.values()]
            snapshot = {"event": "snapshot", "server": self.name, "session": self.session, "members": members}
            frames.append(self._event_frame(snapshot))
        for other in self.connections.values():
            frames.extend(other.retained.get(topic, ()))
        connection.catch_up(topic, frames)

    def _drop_subscription(self, connection, topic):
        connection.subscriptions.discard(topic)
        subscribers = self.topics.get(topic)
        if subscribers is not None:
            subscribers.discard(connection)
            if not subscribers:
                del self.topics[topic]

    def _register(self, connection):
        connection.registered = True
        self.connections[connection.id] = connection
        self.names[connection.identity.name] += 1
        log.info("%s connected with roles %s", connection, ",".join(sorted(connection.identity.roles)))
        self._deliver(
            topics.CONNECTIONS,
            self._event_frame({"event": "connected", "server": self.name, "member": connection.describe()}),
        )

    def _unregister(self, connection):
        for topic in tuple(connection.subscriptions):
            self._drop_subscription(connection, topic)
        if self.connections.pop(connection.id, None) is None:
            return
        self.names[connection.identity.name] -= 1
        if not self.names[connection.identity.name]:
            del self.names[connection.identity.name]
        connection.retained.clear()
        log.info("%s disconnected", connection)
        self._deliver(
            topics.CONNECTIONS,
            self._event_frame({"event": "disconnected", "server": self.name, "member": connection.describe()}),
        )

    def _event_frame(self, body):
        # A snapshot of thousands of members may exceed what members may send;
        # members accept larger frames from the servers they authenticated.
        return protocol.encode(
            {
                "type": "message",
                "topic": topics.CONNECTIONS,
                "publisher": self.name,
                "session": self.session,
                "seq": next(self._sequence),
                "body": dict(body, time=time.time()),
            },
            protocol.MAX_SERVER_FRAME_SIZE,
        )


class Traffic:
    """Frames and bytes in and out, as plain counters (read at a scrape)."""

    __slots__ = ("bytes_in", "bytes_out", "frames_in", "frames_out")

    def __init__(self):
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0

    def received(self, size, frames):
        self.bytes_in += size
        self.frames_in += frames

    def sent(self, frame):
        self.bytes_out += len(frame)
        self.frames_out += 1


def _retained_bytes(retained, but):
    """The bytes a connection retains on topics other than but, its logs apart (bounded on their own)."""
    return sum(
        len(frame)
        for topic, frames in retained.items()
        if topic != but and not topics.is_log(topic)
        for frame in frames
    )


def _announced_from_elsewhere(identity, announced):
    """Why a presence's address (already one its certificate names) is not the address its connection
    comes from; None when it is. For networks whose members reach the event servers without NAT: a
    stolen certificate then works only from its own host."""
    peer = ipaddress.ip_address(identity.address[0])
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    if ipaddress.ip_address(announced) == peer:
        return None
    return f"presence address {announced} is not the address this connection comes from ({peer})"
