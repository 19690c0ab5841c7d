"""The manager's work: elect the active manager and, while active, publish the network status.

Every manager follows Thor.Connections, Thor.Presence and Thor.Leave from all
event servers into its NetworkView, and evaluates (coalesced over `coalesce`
seconds after a change, and every `status_interval` seconds) who is active.
The active manager publishes the live members on Thor.Members
(thor.membership.status, docs/protocol.md): a snapshot in parts when it
becomes active, then the changes from each version to the next, all kept on
the event servers as a retained log that every newcomer receives; once the
changes outweigh the snapshot, a new snapshot replaces the log on the servers
without being sent to the members that follow already. Every status_interval
it says which version is current, so that a member that missed a change asks
again. Its versions only grow (docs/membership.md). A publication that fails
is logged as an error and tried again; nothing counts as published before
it went out. The daemon (thor.manager.main) runs one Manager with the
member's event client; tests run several on an in-memory bus.
"""

import collections
import logging
import os
import time

import gevent

from thor.events import protocol
from thor.events.topics import CONNECTIONS, LEAVE, MEMBERS, PRESENCE
from thor.manager.view import NetworkView
from thor.membership.status import (
    PART_BYTES,
    PART_MEMBERS,
    NetworkStatus,
    changes_body,
    current_body,
    next_version,
    snapshot_bodies,
)

__all__ = ["Manager"]

log = logging.getLogger("thor-manager")

# Seconds before a publication that failed is tried again.
RETRY_AFTER = 1.0
# Under a stream of changes (STORM publications within a second: a network starting, many
# members flapping) changes go out at most every MIN_INTERVAL, each carrying all gathered
# since the last: every member applies a few a second whatever the churn. Other changes go
# out after `coalesce`.
MIN_INTERVAL = 0.25
# How long what an event server told us stands while our link to it reconnects on purpose
# (a renewed certificate, EventClient): its snapshot on the new connection replaces it.
RECONNECT_GRACE = 10.0
# How often removals held during such a reconnect are looked at again.
RECONNECT_CHECK = 0.2
STORM = 5


class Manager:
    """One manager's election and publication over its event client (see the module documentation)."""

    def __init__(self, client, name, status_interval=5.0, coalesce=0.05):
        self.client = client
        self.name = name
        self.status_interval = status_interval
        self.coalesce = coalesce
        self.view = NetworkView()
        self.view.on_forget = self.client.forget_session
        self.active = False
        self.active_name = None
        self.highest_version = 0
        self.published = None  # the NetworkStatus last published, None: a new chain is due
        self.snapshot_bytes = 0  # what the chain's latest snapshot weighs, and the changes since
        self.changes_bytes = 0
        self._compact = False  # the servers' logs need a new snapshot (one refused a publication)
        self._retry_at = 0.0  # monotonic: no new snapshot for the servers' logs before then
        self._refusal_logged_at = {}  # server name: when its last refusal was reported (monotonic)
        self._recent = collections.deque(maxlen=STORM)  # when the latest changes went out (monotonic)
        self._pending = None
        self._ticker = None
        self.publications = collections.Counter()  # by kind: snapshot, changes, periodic
        self.elections = 0  # how often the active manager changed, as this manager saw it

    def start(self):
        """Follow the bus (before the client connects) and evaluate the election from now on."""
        self.client.subscribe(CONNECTIONS, self._on_connections)
        self.client.subscribe(PRESENCE, self._on_presence)
        self.client.subscribe(LEAVE, self._on_leave)
        self.client.subscribe(MEMBERS, self._on_status)
        self.client.on_disconnect(self._on_server_lost)
        self.client.on_error(self._on_server_error)
        self._ticker = gevent.spawn(self._tick)

    def stop(self):
        self._ticker.kill(block=False)
        if self._pending is not None:
            self._pending.kill(block=False)

    # -- inputs -----------------------------------------------------------------

    def _on_connections(self, message):
        body = message.body
        event, server = body.get("event"), body.get("server")
        if event == "snapshot":
            self.view.server_snapshot(server, body.get("session"), body.get("members", []))
        elif event == "connected":
            self.view.connected(server, body["member"])
        elif event == "session":
            self.view.session(server, body["member"], body["session"])
        elif event == "disconnected":
            self.view.disconnected(server, body["member"])
        self._changed()

    def _on_presence(self, message):
        self.view.update_presence(message.publisher, message.session, message.body)
        self._changed()

    def _on_leave(self, message):
        self.view.leave(message.publisher, message.session)
        self._changed()

    def _on_server_lost(self, link):
        if not link.server_name:
            return
        if link.reconnecting:
            # Our own reconnect with a renewed certificate: what the server told us stands until
            # its snapshot on the new connection replaces it, or RECONNECT_GRACE passes without.
            gevent.spawn_later(RECONNECT_GRACE, self._lost_unless_back, link, link.server_name)
            return
        self.view.server_lost(link.server_name)
        self._changed()

    def _lost_unless_back(self, link, server):
        if not link.connected:
            self.view.server_lost(server)
            self._changed()

    def _on_status(self, message):
        version = message.body.get("version") if isinstance(message.body, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            return
        self.highest_version = max(self.highest_version, version)
        published = self.published
        if self.active and message.publisher != self.name and published and version >= published.version:
            # Another manager believed itself active for a moment: outbid its
            # status with a new chain, so that ours is the newest everywhere.
            log.info("status v%d from %s seen while active; publishing anew", version, message.publisher)
            self.published = None
            self._changed()

    def _on_server_error(self, link, error):
        if error.get("topic") == MEMBERS:
            # Its log on that server misses a publication: a new snapshot makes it whole, tried
            # again no sooner than RETRY_AFTER (neither by the tick), and reported as often: a
            # server that keeps refusing is no log flood, also when refusals of one attempt's
            # parts arrive late, after the next attempt has begun.
            now = time.monotonic()
            if now - self._refusal_logged_at.get(link.server_name, -RETRY_AFTER) >= RETRY_AFTER:
                log.error("%s refused a network status publication: %s", link, error.get("message"))
                self._refusal_logged_at[link.server_name] = now
            if not self._compact:
                self._retry_at = now + RETRY_AFTER
            self._compact = True
            self._changed(RETRY_AFTER)

    # -- election and publication ---------------------------------------------

    def _changed(self, delay=None):
        if self._pending is None:
            if delay is None:
                now = time.monotonic()
                storm = len(self._recent) == STORM and now - self._recent[0] < 1.0
                delay = max(self.coalesce, self._recent[-1] + MIN_INTERVAL - now) if storm else self.coalesce
            self._pending = gevent.spawn_later(delay, self._evaluate)

    def _tick(self):
        while True:
            gevent.sleep(self.status_interval)
            self._evaluate(periodic=True)

    def _evaluate(self, periodic=False):
        self._pending = None
        try:
            self._elect_and_publish(periodic)
        except Exception as error:
            # Nothing counted as published: the next try starts from what went out last.
            log.error("could not publish the network status (trying again in %gs): %s", RETRY_AFTER, error)
            log.debug("publication failure", exc_info=True)
            self._compact = True  # a snapshot cut short leaves the servers' logs to be made whole
            self._retry_at = time.monotonic() + RETRY_AFTER
            self._changed(RETRY_AFTER)

    def _elect_and_publish(self, periodic):
        active_name = self.view.active_manager()
        if active_name != self.active_name:
            self.elections += 1
            self.active_name = active_name
            self.active = active_name == self.name
            if self.active:
                log.info("this manager is now the active manager")
                self.published = None
            else:
                log.info("standing by; the active manager is %s", active_name or "(none yet)")
                self._stand_down()
        if not self.active:
            return
        members = self.view.live_members()
        published = self.published
        if published is not None and any(link.reconnecting for link in self.client.links.values()):
            # Our own reconnect with a renewed certificate hides what that server saw meanwhile
            # (a member may have moved its connection there): removals wait until it is back.
            held = {name: entity for name, entity in published.members.items() if name not in members}
            if held:
                members = {**members, **held}
                self._changed(RECONNECT_CHECK)
        if published is None:
            chain = os.urandom(6).hex()
            status = NetworkStatus(next_version(self.highest_version), self.name, members, chain=chain)
            self._publish_snapshot(status, deliver=True)
            log.info("publishing %r (chain %s)", status, chain)
        elif members != published.members:
            version = next_version(max(self.highest_version, published.version))
            status = NetworkStatus(version, self.name, members, chain=published.chain)
            self._publish_changes(published, status)
            log.info("publishing %r", status)
        elif self._compact:
            wait = self._retry_at - time.monotonic()
            if wait <= 0:
                self._publish_snapshot(published, deliver=False)
            else:  # a tick, or a timer that fired a hair early
                self._changed(wait)
        elif periodic:
            self.client.publish(MEMBERS, current_body(published))
            self.publications["periodic"] += 1

    def _stand_down(self):
        """No longer active: our log on the servers shrinks to the version it ended at, which
        newcomers ignore (the active manager's versions are higher)."""
        if self.published is not None:
            self.client.publish(MEMBERS, current_body(self.published), retain=True, deliver=False)
            self.published = None

    def _publish_snapshot(self, status, deliver):
        """status as a snapshot that starts the servers' logs anew; deliver=False: only for
        newcomers (the members that follow hold it already)."""
        size = 0
        for index, body in enumerate(snapshot_bodies(status)):
            retain = True if index == 0 else protocol.APPEND
            self.client.publish(MEMBERS, body, retain=retain, deliver=deliver)
            size += len(protocol.encode(body, protocol.MAX_SERVER_FRAME_SIZE))
        self.published, self.snapshot_bytes, self.changes_bytes, self._compact = status, size, 0, False
        self.publications["snapshot"] += 1
        if deliver:
            self._recent.append(time.monotonic())
        self.highest_version = max(self.highest_version, status.version)

    def _publish_changes(self, old, new):
        body = changes_body(old, new)
        size = len(protocol.encode(body, protocol.MAX_SERVER_FRAME_SIZE))
        if len(body["entries"]) + len(body["left"]) > PART_MEMBERS or size > PART_BYTES:
            # Most of a part changed at once (a network starting): the snapshot costs no more,
            # and its parts stay within a frame whatever the size.
            self._publish_snapshot(new, deliver=True)
            return
        self.client.publish(MEMBERS, body, retain=protocol.APPEND)
        self.publications["changes"] += 1
        self._recent.append(time.monotonic())
        self.published = new
        self.highest_version = max(self.highest_version, new.version)
        self.changes_bytes += size
        if self.changes_bytes > self.snapshot_bytes:
            # The log on the servers outweighs a snapshot: a new one replaces it.
            self._publish_snapshot(new, deliver=False)
