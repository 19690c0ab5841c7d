"""thor-node's loopback API for the SIP proxy beside it (thor.sip.api), called as Kamailio calls it."""

import io

from thor.lookup.table import RingFollower
from thor.loopback.statuses import sip_proxy_status_body
from thor.membership.status import StatusCache
from thor.sip.api import RETRY_AFTER, sip_application
from thor.sip.service import SipService

NODE = "10.0.0.1"
PEER = "10.0.0.2"


def ask(application, path):
    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    answer["body"] = b"".join(application(environ, start_response)).decode()
    return answer


def test_whether_a_source_is_a_peer_is_unavailable_until_the_node_has_a_network_status():
    """A node just started does not know its peers yet: a 'no' would make its Kamailio take a
    peer's forwarded REGISTER for a device's and store the binding through the wrong node (seen
    in test_media under load: 404 No Device Here). It must say 'ask again' instead."""
    cache = StatusCache()
    rings = RingFollower(cache)
    rings.start()
    application = sip_application(SipService(NODE, rings, cache, None, None, None))
    try:
        before = ask(application, f"/sip/peer/{PEER}")
        assert before["status"].startswith("503 "), before
        assert before["headers"]["Retry-After"] == str(RETRY_AFTER)

        cache.update(sip_proxy_status_body(1, [NODE, PEER]))
        assert rings.wait(1, timeout=10)
        assert ask(application, f"/sip/peer/{PEER}")["status"] == "200 OK"
        assert ask(application, "/sip/peer/10.0.0.3")["status"] == "404 Not Found"
    finally:
        rings.stop()
