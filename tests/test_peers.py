"""The node-to-node API's client (thor.sip.peers): kept connections, and a peer that restarts."""

import pytest

from thor.loopback.pki import ScratchPKI
from thor.loopback.process import free_port
from thor.sip.peers import PeerClient, PeerError, PeerServer

ADDRESS = "127.0.3.40"


def answering(generation):
    return lambda identity, request: {"result": "ok", "generation": generation, "from": identity.name}


@pytest.fixture
def pki(tmp_path):
    return ScratchPKI(tmp_path / "pki")


def test_a_peer_that_restarted_is_asked_again_on_a_new_connection(pki):
    """The first request after a home node restarts must not fail on the connection the client
    kept to its previous run (a device would get a 503 for it)."""
    port = free_port(ADDRESS)
    client = PeerClient(pki.contexts("node1"), timeout=2)
    server = PeerServer((ADDRESS, port), pki.contexts("node2"), answering(1))
    server.start()
    try:
        assert client.request((ADDRESS, port), {"op": "x"})["generation"] == 1
        assert client.request((ADDRESS, port), {"op": "x"})["generation"] == 1  # the kept connection
        server.stop()
        server = PeerServer((ADDRESS, port), pki.contexts("node2"), answering(2))
        server.start()
        assert client.request((ADDRESS, port), {"op": "x"}) == {"result": "ok", "generation": 2, "from": "node1"}
    finally:
        server.stop()
        client.close()


def test_a_peer_without_the_role_asked_for_is_refused(pki):
    port = free_port(ADDRESS)
    client = PeerClient(pki.contexts("node1"), timeout=2)
    server = PeerServer((ADDRESS, port), pki.contexts("relay1", "media_relay"), answering(1))
    server.start()
    try:
        with pytest.raises(PeerError, match="sip_proxy"):
            client.request((ADDRESS, port), {"op": "x"})
    finally:
        server.stop()
        client.close()
