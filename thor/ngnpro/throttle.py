"""Failed SOAP logins, counted per source address: a guesser gets a few tries, then waits.

After `failures` failed logins from one address within `window` seconds, every
call from there is refused for `penalty` seconds without its password being
checked, so guessing goes no faster than failures per penalty. A good login
does not clear the count (a guesser behind the same NAT as a real client
must not be able to reset it). At most `max_sources` addresses are tracked;
beyond that the one seen least recently is forgotten, so a flood of
addresses costs bounded memory.
"""

import collections
import time

__all__ = ["LoginThrottle"]


class LoginThrottle:
    def __init__(self, failures=5, window=60.0, penalty=300.0, max_sources=10000, clock=time.monotonic):
        self.failures = failures
        self.window = window
        self.penalty = penalty
        self.max_sources = max_sources
        self.clock = clock
        self._sources = collections.OrderedDict()  # address -> [failure times in the window, blocked until]

    def blocked_for(self, source):
        """Seconds a login from source stays refused unchecked (0: check it)."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        return max(0.0, entry[1] - self.clock())

    def failed(self, source):
        """Count a failed login from source; True when it blocks source from now on."""
        now = self.clock()
        entry = self._sources.pop(source, None) or [collections.deque(), 0.0]
        self._sources[source] = entry  # the most recently seen last
        times = entry[0]
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        if len(times) >= self.failures:
            times.clear()
            entry[1] = now + self.penalty
            return True
        return False
