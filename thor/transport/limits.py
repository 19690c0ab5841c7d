"""Bounds per source address, for what strangers reach before they authenticate."""

import time

__all__ = ["SourceLimit"]


class SourceLimit:
    """At most `limit` things at once per source address (its IP): what a connection that has not
    authenticated yet holds, so that one stranger cannot take every slot. Refusals are counted, and
    reported at most once a minute per source, so that a flood does not flood the log too."""

    REPORT_INTERVAL = 60.0

    def __init__(self, limit):
        self.limit = limit
        self._held = {}  # source -> how many it holds
        self._refused = {}  # source -> [refusals since the last report, when reported]

    def acquire(self, source):
        held = self._held.get(source, 0)
        if held >= self.limit:
            return False
        self._held[source] = held + 1
        return True

    def admit(self, source, log, what):
        """acquire(source), or else count the refusal and log it, at most once a minute per source;
        what: what source holds too many of ("TLS handshakes")."""
        if self.acquire(source):
            return True
        count = self.refused(source)
        if count:
            log.warning(
                "refused a connection from %s: it has %d %s under way already (%d refused so)",
                source,
                self.limit,
                what,
                count,
            )
        return False

    def release(self, source):
        held = self._held.pop(source, 1) - 1
        if held > 0:
            self._held[source] = held

    def refused(self, source):
        """Count a refusal; the number to report now (0: not yet, one was reported lately)."""
        now = time.monotonic()
        entry = self._refused.get(source)
        if entry is None or now - entry[1] >= self.REPORT_INTERVAL:
            count = (entry[0] if entry else 0) + 1
            self._refused[source] = [0, now]
            if len(self._refused) > 10000:  # bounded: forget the sources reported longest ago
                for stale in sorted(self._refused, key=lambda key: self._refused[key][1])[:1000]:
                    del self._refused[stale]
            return count
        entry[0] += 1
        return 0
