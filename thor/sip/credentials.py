"""The HA1 of this node's home subscribers, kept in the SIP proxy beside it (docs/sip.md).

Kamailio checks a REGISTER's digest on the subscriber's home node. Rather than
asking thor-node for the HA1 at every REGISTER (an HTTP question: a third of a
REGISTER's CPU in the overlay, bench/sip_bench.py), its script reads the
htable thor_ha1 first, which this mirror keeps equal to the enabled accounts
of the account cache, over Kamailio's JSON-RPC on loopback:

- every change of the cache (a new account or password, a disabled or deleted
  account, a key the node no longer owns) is pushed within milliseconds
  (htable.sets / htable.delete), so a key is in the htable only while it is an
  enabled account with that HA1 here;
- a key that is not in the htable is asked of thor-node as before, which also
  tells an unknown subscriber from a disabled one: the htable is only a faster
  way to the same answer, never a different one;
- after a whole copy the mirror sets $shv(thor_ha1) to a token of its own and
  checks it at each pass: a Kamailio that restarted (empty htable, "0") or an
  RPC that failed halfway gets a whole copy again (htable.flush, then every
  key), so nothing pushed can be left stale.
"""

import logging
import secrets
import time

from gevent.event import Event

from thor.sip.location import RPCError

__all__ = ["HA1_TABLE", "CredentialMirror"]

log = logging.getLogger("thor.sip")

# The htable's and the shared variable's name (etc/kamailio/thor.cfg).
HA1_TABLE = "thor_ha1"
# A pass runs at each change and at least this often (the token check: a Kamailio restarted).
CHECK_EVERY = 1.0


class CredentialMirror:
    def __init__(self, accounts, kamailio):
        """accounts: the AccountCache; kamailio: a KamailioRPC of the SIP proxy beside this node."""
        self.accounts = accounts
        self.kamailio = kamailio
        self.pushed = {}  # key -> HA1, as the htable holds it while self.token is Kamailio's
        self.token = None  # what $shv(thor_ha1) says after our last whole copy; None: copy again
        self._changed = set()
        self._wake = Event()
        accounts.on_change(self._on_change)

    def _on_change(self, key):
        self._changed.add(key)
        self._wake.set()

    def run(self):
        """Pass after pass, for ever (a greenlet of thor-node)."""
        failing = False
        while True:
            self._wake.wait(CHECK_EVERY)
            self._wake.clear()
            try:
                self.sync()
            except RPCError as problem:
                self.token = None  # whatever was pushed halfway: a whole copy next time
                if not failing:  # once, until it works again (Kamailio stopped or restarting)
                    log.info("could not update the SIP proxy's HA1 table: %s", problem)
                failing = True
            else:
                failing = False

    def sync(self):
        """One pass: a whole copy when Kamailio does not hold our last one, else the changed keys."""
        told = (self.kamailio.call("pv.shvGet", HA1_TABLE) or {}).get("value")
        if self.token is None or told != self.token:
            self._copy_all()
            return
        keys, self._changed = self._changed, set()
        for key in keys:
            self._push(key)

    def _copy_all(self):
        self._changed = set()  # what changes from here on is pushed by the next pass
        self.token = None
        started = time.monotonic()
        self.kamailio.call("htable.flush", HA1_TABLE)
        self.pushed = {}
        for key, ha1 in self.accounts.ha1s():
            self.kamailio.call("htable.sets", HA1_TABLE, key, ha1)
            self.pushed[key] = ha1
        token = secrets.token_hex(8)
        self.kamailio.call("pv.shvSet", HA1_TABLE, "str", token)
        self.token = token
        seconds = time.monotonic() - started
        log.info("the SIP proxy holds the HA1 of %d accounts (copied in %.1f s)", len(self.pushed), seconds)

    def _push(self, key):
        ha1 = self.accounts.ha1(key)
        if ha1 == self.pushed.get(key):
            return
        if ha1 is None:
            self.kamailio.call("htable.delete", HA1_TABLE, key)
            del self.pushed[key]
        else:
            self.kamailio.call("htable.sets", HA1_TABLE, key, ha1)
            self.pushed[key] = ha1
