"""The manager's work: elect the active manager and, while active, publish the network status.

Every manager follows Thor.Connections, Thor.Presence and Thor.Leave from all
event servers into its NetworkView, and evaluates (coalesced over `coalesce`
seconds after a change, and every `status_interval` seconds) who is active.
The active manager publishes the live members on Thor.Members, retained, at
once when they change and again every status_interval; its versions only grow
(docs/membership.md). The daemon (thor.manager.main) runs one Manager with
the member's event client; tests run several on an in-memory bus.
"""

import logging

import gevent

from thor.events.topics import CONNECTIONS, LEAVE, MEMBERS, PRESENCE
from thor.manager.view import NetworkView
from thor.membership.status import NetworkStatus, next_version

__all__ = ["Manager"]

log = logging.getLogger("thor-manager")


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
        self.published_members = None
        self.published_version = 0
        self._pending = None
        self._ticker = None

    def start(self):
        """Follow the bus (before the client connects) and evaluate the election from now on."""
        self.client.subscribe(CONNECTIONS, self._on_connections)
        self.client.subscribe(PRESENCE, self._on_presence)
        self.client.subscribe(LEAVE, self._on_leave)
        self.client.subscribe(MEMBERS, self._on_status)
        self.client.on_disconnect(self._on_server_lost)
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
        if link.server_name:
            self.view.server_lost(link.server_name)
            self._changed()

    def _on_status(self, message):
        version = message.body.get("version") if isinstance(message.body, dict) else None
        if not isinstance(version, int):
            return
        self.highest_version = max(self.highest_version, version)
        if self.active and message.publisher != self.name and version >= self.published_version:
            # Another manager believed itself active for a moment: outbid its
            # retained status so that ours is the newest everywhere.
            log.info("status v%d from %s seen while active; republishing", version, message.publisher)
            self.published_members = None
            self._changed()

    # -- election and publication ---------------------------------------------

    def _changed(self):
        if self._pending is None:
            self._pending = gevent.spawn_later(self.coalesce, self._evaluate)

    def _tick(self):
        while True:
            gevent.sleep(self.status_interval)
            self._evaluate(periodic=True)

    def _evaluate(self, periodic=False):
        self._pending = None
        try:
            self._elect_and_publish(periodic)
        except Exception:
            log.exception("network status evaluation failed")

    def _elect_and_publish(self, periodic):
        active_name = self.view.active_manager()
        if active_name != self.active_name:
            self.active_name = active_name
            self.active = active_name == self.name
            if self.active:
                log.info("this manager is now the active manager")
                self.published_members = None
            else:
                log.info("standing by; the active manager is %s", active_name or "(none yet)")
        if not self.active:
            return
        members = self.view.live_members()
        if members != self.published_members:
            self.published_version = next_version(max(self.highest_version, self.published_version))
            self.published_members = members
            log.info("publishing %r", self._publish(members))
        elif periodic:
            self._publish(members)

    def _publish(self, members):
        status = NetworkStatus(self.published_version, self.name, members)
        self.client.publish(MEMBERS, status.to_json(), retain=True)
        return status
