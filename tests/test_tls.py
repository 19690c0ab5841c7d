"""The TLS layer over real gevent sockets on loopback, in one process."""

import logging
import shutil
import time

import gevent
import pytest
from gevent import socket, ssl

from thor.loopback.process import wait_for
from thor.transport.tls import TLSContexts, TLSError, TLSServer, connect


def echo_identity(tls_socket, identity):
    """Answer each line with the peer's name and roles, as the server sees them."""
    stream = tls_socket.makefile("rwb")
    for line in stream:
        stream.write(f"{identity.name} {','.join(sorted(identity.roles))} {line.decode().strip()}\n".encode())
        stream.flush()


def echo_server(pki, handshake_timeout=5.0):
    contexts = pki.contexts("es1", "thor_eventserver")
    tls_server = TLSServer(("127.0.0.1", 0), contexts, echo_identity, handshake_timeout=handshake_timeout, name="test")
    tls_server.start()
    return tls_server


@pytest.fixture
def server(pki):
    tls_server = echo_server(pki)
    yield tls_server
    tls_server.stop(timeout=1)


def ask(tls_socket, text="ping"):
    tls_socket.sendall(text.encode() + b"\n")
    tls_socket.settimeout(5)
    data = b""
    while not data.endswith(b"\n"):
        chunk = tls_socket.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


def refused(address, contexts):
    """True when the server ends the session: at the handshake or at the first read (TLS 1.3)."""
    try:
        tls_socket, _ = connect(address, contexts, timeout=2)
    except TLSError:
        return True
    try:
        ask(tls_socket)
    except TimeoutError:
        # Neither served nor refused: a hung server is not a refusal.
        raise AssertionError(f"{address} neither answered nor ended the session within 2 s") from None
    except (ssl.SSLError, ConnectionError):  # an alert, a reset or the end of the stream
        return True
    finally:
        tls_socket.close()
    return False


def test_valid_node_is_accepted_with_name_and_roles(pki, server):
    client = pki.contexts("node1.example.com", "sip_proxy,media_relay")
    tls_socket, server_identity = connect(server.address, client, expected_role="thor_eventserver")
    assert server_identity.name == "es1"
    assert server_identity.roles == {"thor_eventserver"}
    assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
    assert ask(tls_socket) == "node1.example.com media_relay,sip_proxy ping"
    tls_socket.close()


def test_client_refuses_server_without_expected_role(pki, server):
    client = pki.contexts("node1", "sip_proxy")
    with pytest.raises(TLSError, match="es1 .* does not hold role thor_manager"):
        connect(server.address, client, expected_role="thor_manager")


def test_client_without_certificate_is_refused(pki, server, caplog):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(pki.ca.ca_certificate_path)
    caplog.set_level(logging.WARNING, logger="thor.test")
    sock = socket.create_connection(server.address, timeout=2)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # a timeout would be no refusal
        tls_socket = context.wrap_socket(sock)
        ask(tls_socket)
    wait_for(lambda: any("refused 127.0.0.1:" in r.getMessage() for r in caplog.records), message="refusal log")
    line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert "certificate" in line and "\n" not in line


def test_certificate_of_another_ca_is_refused(pki, other_pki, server, caplog):
    caplog.set_level(logging.WARNING, logger="thor.test")
    # The stranger trusts our CA (so its side of the handshake completes) but
    # presents a certificate from its own.
    stranger = other_pki.files(other_pki.issue("intruder", "thor_manager") and "intruder")
    shutil.copy(pki.ca.ca_certificate_path, stranger["ca"])
    shutil.copy(pki.ca.crl_path, stranger["crl"])
    assert refused(server.address, TLSContexts(**stranger))
    wait_for(lambda: any("unable to get local issuer" in r.getMessage() for r in caplog.records), message="log")


def test_server_of_another_ca_is_refused_by_client(pki, other_pki, server):
    other_client = other_pki.contexts("node9", "sip_proxy")
    with pytest.raises(TLSError, match="TLS handshake failed"):
        connect(server.address, other_client)


def test_revoked_certificate_is_refused(pki, server, caplog):
    caplog.set_level(logging.WARNING, logger="thor.test")
    client = pki.contexts("node1", "sip_proxy")
    pki.ca.revoke("node1")
    server.contexts.reload()
    assert refused(server.address, client)
    wait_for(lambda: any("certificate revoked" in r.getMessage() for r in caplog.records), message="log")


@pytest.mark.parametrize("kind", ["expired", "not_yet_valid"])
def test_expired_and_not_yet_valid_certificates_are_refused(pki, server, caplog, kind):
    caplog.set_level(logging.WARNING, logger="thor.test")
    files = getattr(pki, kind)("node1")
    assert refused(server.address, TLSContexts(**files))
    word = {"expired": "certificate has expired", "not_yet_valid": "certificate is not yet valid"}[kind]
    wait_for(lambda: any(word in r.getMessage() for r in caplog.records), message=word)


def test_crl_change_flips_live_server_without_restart(pki):
    """Revocation reaches a running server through the file watcher: new and live connections are cut."""
    contexts = pki.contexts("es1", "thor_eventserver")
    contexts.watch(0.05)
    tls_server = TLSServer(("127.0.0.1", 0), contexts, echo_identity, name="test")
    tls_server.start()
    try:
        client = pki.contexts("node1", "sip_proxy")
        live, _ = connect(tls_server.address, client)
        assert ask(live) == "node1 sip_proxy ping"
        assert not refused(tls_server.address, client)

        pki.ca.revoke("node1")  # rewrites crl.pem in place, as an operator's copy would
        wait_for(lambda: refused(tls_server.address, client), timeout=5, message="refusal after CRL change")
        with pytest.raises((ssl.SSLError, ConnectionError)):  # cut, not merely silent
            ask(live)
        # Everyone else is still served.
        assert not refused(tls_server.address, pki.contexts("node2", "sip_proxy"))
    finally:
        contexts.stop_watching()
        tls_server.stop(timeout=1)


def test_bad_crl_on_reload_keeps_previous_contexts(pki, server, caplog):
    client = pki.contexts("node1", "sip_proxy")
    with open(pki.ca.crl_path, "w") as stream:
        stream.write("not a CRL\n")
    assert server.contexts.reload() is False
    assert any("TLS reload failed, keeping the previous" in r.getMessage() for r in caplog.records)
    assert not refused(server.address, client)


def test_crl_from_another_ca_is_refused(pki, other_pki):
    files = pki.issue("node1", "sip_proxy")
    files["crl"] = other_pki.ca.crl_path
    with pytest.raises(TLSError, match="is not signed by the CA"):
        TLSContexts(**files)


def test_missing_crl_is_a_clear_error(pki):
    files = pki.issue("node1", "sip_proxy")
    files["crl"] = files["crl"] + ".missing"
    with pytest.raises(TLSError, match="cannot read CRL .*a CRL is required"):
        TLSContexts(**files)


def test_garbage_bytes_are_refused_and_others_served(pki, server, caplog):
    caplog.set_level(logging.WARNING, logger="thor.test")
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4, b"\x16\x03\x01\xff\xff" + b"A" * 100):
        sock = socket.create_connection(server.address, timeout=2)
        sock.sendall(garbage)
        # The server answers with an alert or closes; it never hangs on us.
        sock.settimeout(2)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()
    wait_for(lambda: len([r for r in caplog.records if "refused" in r.getMessage()]) >= 3, message="3 refusals")
    assert not refused(server.address, pki.contexts("node1", "sip_proxy"))


def test_silent_clients_do_not_hold_the_server(pki, caplog):
    """Clients that connect and never handshake are dropped after handshake_timeout; others are served meanwhile."""
    caplog.set_level(logging.WARNING, logger="thor.test")
    client = pki.contexts("node1", "sip_proxy")  # issued before the clock starts: not what is timed
    server = echo_server(pki, handshake_timeout=1.0)
    try:
        silent = [socket.create_connection(server.address, timeout=2) for _ in range(50)]
        start = time.monotonic()
        tls_socket, _ = connect(server.address, client)
        assert ask(tls_socket) == "node1 sip_proxy ping"

        def timeouts():
            return [r for r in caplog.records if "no TLS handshake within 1s" in r.getMessage()]

        assert not timeouts()  # served while the 50 silent handshakes were all still pending
        tls_socket.close()
        for sock in silent:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # the server hung up on it
            sock.close()
        assert time.monotonic() - start < 1.0 + 2.5  # dropped at their timeout, not held
        assert len(timeouts()) == 50
    finally:
        server.stop(timeout=1)


def test_connect_to_closed_port_is_a_clear_error(pki):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    sock.close()
    with pytest.raises(TLSError, match=r"cannot connect to 127.0.0.1:\d+: Connection refused"):
        connect(address, pki.contexts("node1", "sip_proxy"))


def test_handshake_timeout_on_client_side(pki):
    """A server that accepts but never answers does not hold a client beyond its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    client = pki.contexts("node1", "sip_proxy")
    start = time.monotonic()
    with pytest.raises(TLSError, match="no TLS handshake within 0.3s"):
        connect(listener.getsockname(), client, timeout=0.3)
    assert time.monotonic() - start < 2
    listener.close()


def test_many_concurrent_handshakes(pki, server):
    client = pki.contexts("node1", "sip_proxy")

    def one(index):
        tls_socket, _ = connect(server.address, client)
        try:
            return ask(tls_socket, str(index))
        finally:
            tls_socket.close()

    jobs = [gevent.spawn(one, index) for index in range(100)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert sorted(job.value for job in jobs) == sorted(f"node1 sip_proxy {index}" for index in range(100))
