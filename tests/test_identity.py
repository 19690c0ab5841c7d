"""What a certificate says of its holder, read from the file and from a TLS handshake alike."""

import pytest

from thor.identity import Identity, IdentityError, announced_address
from thor.transport.tls import TLSServer, connect


def test_a_peer_seen_in_the_handshake_is_who_its_certificate_file_says(pki):
    pki.issue("es1", "thor_eventserver", address="127.0.0.1")
    pki.issue("node1", "sip_proxy,media_relay", address="2001:db8::1")
    seen = []
    server = TLSServer(("127.0.0.1", 0), pki.contexts("es1"), lambda sock, identity: seen.append(identity))
    server.start()
    try:
        tls_socket, server_identity = connect(server.address, pki.contexts("node1"), expected_role="thor_eventserver")
        tls_socket.close()
    finally:
        server.stop(timeout=1)
    from_file = Identity.load(pki.files("node1")["certificate"])
    assert (seen[0].name, seen[0].roles, seen[0].addresses) == ("node1", {"media_relay", "sip_proxy"}, ("2001:db8::1",))
    assert (from_file.name, from_file.roles, from_file.addresses, from_file.serial) == (
        seen[0].name,
        seen[0].roles,
        seen[0].addresses,
        seen[0].serial,
    )
    assert server_identity.addresses == ("127.0.0.1",)


def test_require_role_says_what_the_certificate_grants():
    identity = Identity("node1", {"sip_proxy"}, 1)
    identity.require_role("sip_proxy")
    with pytest.raises(
        IdentityError, match=r"certificate of node1 does not grant thor_manager \(it grants sip_proxy\)"
    ):
        identity.require_role("thor_manager")


def test_announced_address_comes_from_the_setting_then_the_certificate():
    identity = Identity("node1.invalid", {"sip_proxy"}, 1, addresses=["192.0.2.7"])
    assert announced_address("192.0.2.9", identity) == "192.0.2.9"
    assert announced_address("", identity) == "192.0.2.7"
    with pytest.raises(IdentityError, match=r"\[EventServer\] address = 'nowhere': expected an IP address"):
        announced_address("nowhere", identity, "[EventServer] address")
    with pytest.raises(IdentityError, match="no address for node1.invalid: set"):
        announced_address("", Identity("node1.invalid", {"sip_proxy"}, 1))
