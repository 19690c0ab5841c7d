"""thor-node's loopback API for the SIP proxy beside it (thor.sip.api), called as Kamailio calls it."""

import io
import json

from thor.lookup.ring import HashRing
from thor.lookup.table import RingFollower
from thor.loopback.statuses import sip_proxy_status_body
from thor.membership.status import StatusCache
from thor.sip.api import RETRY_AFTER, sip_application
from thor.sip.service import SipService

NODE = "10.0.0.1"
PEER = "10.0.0.2"
KEYS = [f"user{index}@example.com" for index in range(200)]


def ask(application, path):
    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    answer["body"] = b"".join(application(environ, start_response)).decode()
    return answer


def test_the_ring_is_unavailable_until_the_node_has_a_network_status_then_names_the_live_nodes():
    """A node just started does not know its peers yet: an empty ring would make its Kamailio take
    a peer's forwarded REGISTER for a device's and store the binding through the wrong node (seen
    in test_media under load: 404 No Device Here). It must say 'ask again' instead. Then it gives
    what Kamailio builds the same ring from: the live sip_proxy nodes and the points per node."""
    cache = StatusCache()
    rings = RingFollower(cache, points=123)
    rings.start()
    application = sip_application(SipService(NODE, rings, cache, None, None, None))
    try:
        before = ask(application, "/sip/ring")
        assert before["status"].startswith("503 "), before
        assert before["headers"]["Retry-After"] == str(RETRY_AFTER)

        cache.update(sip_proxy_status_body(1, [PEER, NODE]))
        assert rings.wait(1, timeout=10)
        after = ask(application, "/sip/ring")
        assert after["status"] == "200 OK", after
        assert json.loads(after["body"]) == {"version": 1, "points": 123, "sip_proxy": [NODE, PEER]}
        ring = HashRing(json.loads(after["body"])["sip_proxy"], 123)
        assert all(ring.owner(key) == rings.table.lookup("sip_proxy", key) for key in KEYS)
        # What a Kamailio asks instead when the ring is too big to build in each of its processes.
        assert {ask(application, f"/sip/home/{key}")["body"] for key in KEYS} == {NODE, PEER}
        assert all(ask(application, f"/sip/home/{key}")["body"] == ring.owner(key) for key in KEYS[:20])
        assert ask(application, "/sip/home/not-a-key")["status"].startswith("400 ")
    finally:
        rings.stop()
