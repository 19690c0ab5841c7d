"""Mutual TLS for every connection between SIP Thor nodes.

Both ends present a certificate issued by the provider CA (thor.pki); both
check the other's against the CA and the CRL. The application gets the peer's
thor.identity.Identity: its node name (the certificate's common name), the
roles its certificate grants and its addresses. The CA file may hold several CAs
(a CA rollover, docs/pki.md): the first is the one that signs today; the CRL
file then holds a CRL of each. The CA, certificate, key and CRL are re-read on reload()
(the daemons call it on SIGHUP) and when the files change (watch()); a reload
that fails keeps the previous contexts and logs why. Connections of peers
whose certificate the new CRL revokes are closed at once.

A refused handshake is logged in one line, the peer's address and the reason;
the server goes on serving everyone else. Handshakes are bounded in time.
"""

import collections
import contextlib
import logging
import os
import time
from datetime import UTC, datetime, timedelta

import gevent
from cryptography import x509
from gevent import socket, ssl
from gevent.pool import Pool
from gevent.server import StreamServer

from thor.files import write_atomic
from thor.identity import Identity
from thor.transport.crl import CRLError, RevocationList
from thor.transport.limits import SourceLimit
from thor.x509compat import common_name, load_pem_certificates, not_valid_after

__all__ = ["TLSContexts", "TLSError", "TLSServer", "connect", "format_address"]

log = logging.getLogger("thor.tls")

# Warn operators this long before the CA, this program's certificate or the CRL expires (an
# expired CRL makes every peer's handshake fail), at every reload and once a day.
EXPIRY_WARNING = timedelta(days=7)
EXPIRY_CHECK_INTERVAL = 24 * 3600.0


class TLSError(Exception):
    """A TLS setup or connection problem; str() is one line."""


def format_address(address):
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TLSContexts:
    """Server and client SSL contexts built from the TLS files, swapped on reload."""

    def __init__(self, ca, certificate, private_key, crl, learned_crl=None):
        """learned_crl: where a newer CRL than crl, handed over by another member
        (offer_crl()), is kept; None: this program takes none."""
        self.files = (ca, certificate, private_key, crl)
        self.ca, self.certificate, self.private_key, self.crl = self.files
        self.learned_crl = learned_crl
        self._callbacks = []
        self.ca_certificates = ()  # every trusted CA; the first signs today
        self.revocation_list = None  # the RevocationList in use
        self.certificate_expiry = None
        self.certificate_serial = None  # of this program's own certificate
        self._stamp = self._file_stamp()
        self._use(self._build())
        self._watcher = None

    @classmethod
    def from_config(cls, tls_config):
        return cls(
            tls_config.ca,
            tls_config.certificate,
            tls_config.private_key,
            tls_config.crl,
            tls_config.learned_crl or None,
        )

    @property
    def ca_certificate(self):
        """The CA that signs today (the first in the CA file)."""
        return self.ca_certificates[0]

    @property
    def revoked_serials(self):
        return self.revocation_list.revoked_serials

    def refusal(self, identity):
        """Why a peer whose handshake passed must go now (the files changed since), or None."""
        if identity.serial in self.revoked_serials:
            return "its certificate was revoked"
        trusted = {common_name(ca) for ca in self.ca_certificates}
        if identity.issuer is not None and identity.issuer not in trusted:
            return f"its certificate was issued by {identity.issuer}, a CA no longer trusted"
        return None

    def offer_crl(self, pem):
        """Take a CRL another member handed over when it supersedes the one in use (kept in
        learned_crl, then everything reloaded); True when it is now in use. Anything else is
        refused: a replayed older CRL would un-revoke certificates."""
        if self.learned_crl is None:
            return False
        try:
            candidate = RevocationList(pem, self.ca_certificates)
        except CRLError as error:
            log.warning("refusing a CRL handed over: it %s", error)
            return False
        if not candidate.supersedes(self.revocation_list):
            return False
        try:
            write_atomic(self.learned_crl, candidate.pem, 0o644)
        except OSError as error:
            log.error("cannot keep the newer %s in %s: %s", candidate, self.learned_crl, error.strerror or error)
            return False
        return self.reload() and self.revocation_list.pem == candidate.pem

    def add_reload_callback(self, callback):
        """callback(contexts) runs after every successful reload."""
        self._callbacks.append(callback)

    def remove_reload_callback(self, callback):
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def reload(self):
        """Re-read every file; True when the new contexts are in use."""
        stamp = self._file_stamp()
        try:
            contexts = self._build()
        except TLSError as error:
            log.error("TLS reload failed, keeping the previous certificates and CRL: %s", error)
            self._stamp = stamp
            return False
        self._stamp = stamp
        self._use(contexts)
        log.info(
            "TLS files reloaded (%d trusted CA%s, %s, %d revoked certificates)",
            len(self.ca_certificates),
            "" if len(self.ca_certificates) == 1 else "s",
            self.revocation_list,
            len(self.revoked_serials),
        )
        for callback in list(self._callbacks):
            try:
                callback(self)
            except Exception:
                log.exception("TLS reload callback failed")
        return True

    def _use(self, built):
        self.server_context, self.client_context, self.ca_certificates, self.revocation_list = built[:4]
        self.certificate_serial, self.certificate_expiry = built[4]
        self.check_expiry()

    def expiries(self):
        """[(what, when it expires, what to run)] of each CA, this program's certificate and the CRL."""
        where = "where the CA is"
        return [
            *(
                (f"the CA {ca.subject.rfc4514_string()} in {self.ca}", not_valid_after(ca), f"a CA rollover {where}")
                for ca in self.ca_certificates
            ),
            (
                f"this node's certificate {self.certificate}",
                self.certificate_expiry,
                f"'thor-pki renew' and playbooks/renew.yml {where}",
            ),
            (
                f"the {self.revocation_list}",
                self.revocation_list.next_update,
                f"'thor-pki crl' and 'thor-pki publish-crl' {where}",
            ),
        ]

    def check_expiry(self, now=None):
        """Log what expires within EXPIRY_WARNING, and as an error what has expired."""
        now = now or datetime.now(UTC)
        for what, end, remedy in self.expiries():
            if end is None:
                continue
            if end <= now:
                log.error("%s expired at %s: TLS with peers fails; run %s", what, f"{end:%Y-%m-%d %H:%M} UTC", remedy)
            elif end - now < EXPIRY_WARNING:
                days = (end - now).total_seconds() / 86400
                log.warning("%s expires at %s, in %.1f days; run %s", what, f"{end:%Y-%m-%d %H:%M} UTC", days, remedy)

    def reload_if_changed(self):
        if self._file_stamp() != self._stamp:
            return self.reload()
        return False

    def watch(self, interval):
        """Reload in the background whenever a TLS file changes."""
        if self._watcher is None:
            self._watcher = gevent.spawn(self._watch, interval)
        return self._watcher

    def stop_watching(self):
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher = None

    def _watch(self, interval):
        next_check = time.monotonic() + EXPIRY_CHECK_INTERVAL
        while True:
            gevent.sleep(interval)
            self.reload_if_changed()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + EXPIRY_CHECK_INTERVAL
                self.check_expiry()

    def _file_stamp(self):
        stamp = []
        for path in (*self.files, self.learned_crl):
            if path is None:
                continue
            try:
                info = os.stat(path)
                stamp.append((info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def _build(self):
        ca_certificates = self._load_ca()
        revocation_list, crl_path = self._newest_crl(ca_certificates)
        server_context = self._context(ssl.PROTOCOL_TLS_SERVER, crl_path)
        client_context = self._context(ssl.PROTOCOL_TLS_CLIENT, crl_path)
        # Peers are identified by the roles in their certificate, not by host
        # names: event servers are reached by address and by SRV targets alike.
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_REQUIRED
        server_context.verify_mode = ssl.CERT_REQUIRED
        return server_context, client_context, ca_certificates, revocation_list, self._own_certificate()

    def _context(self, protocol, crl_path):
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certificate, self.private_key)
        except (OSError, ssl.SSLError) as error:
            raise TLSError(
                f"cannot load certificate {self.certificate} with key {self.private_key}: {_reason(error)}"
            ) from None
        try:
            context.load_verify_locations(cafile=self.ca)
            context.load_verify_locations(cafile=crl_path)
        except (OSError, ssl.SSLError) as error:
            raise TLSError(f"cannot load CA {self.ca} or CRL {crl_path}: {_reason(error)}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    def _own_certificate(self):
        """(serial, expiry) of this program's certificate."""
        try:
            with open(self.certificate, "rb") as stream:
                certificate = x509.load_pem_x509_certificate(stream.read())
        except (OSError, ValueError):
            return None, None  # load_cert_chain() said why already, or will
        return certificate.serial_number, not_valid_after(certificate)

    def _load_ca(self):
        try:
            with open(self.ca, "rb") as stream:
                return tuple(load_pem_certificates(stream.read()))
        except OSError as error:
            raise TLSError(f"cannot read CA {self.ca}: {error.strerror}") from None
        except ValueError:
            raise TLSError(f"{self.ca} is not a PEM certificate") from None

    def _newest_crl(self, ca_certificates):
        """The newest usable CRL of the configured and the learned file: (RevocationList, path).
        Never one older than the CRL in use under the same CA (a replayed CRL un-revokes)."""
        try:
            newest, path = RevocationList.load(self.crl, ca_certificates), self.crl
        except OSError as error:
            raise TLSError(
                f"cannot read CRL {self.crl}: {error.strerror} (a CRL is required, even an empty one)"
            ) from None
        except CRLError as error:
            raise TLSError(f"CRL {self.crl} {error} (CA {self.ca})") from None
        if self.learned_crl is not None and os.path.exists(self.learned_crl):
            try:
                learned = RevocationList.load(self.learned_crl, ca_certificates)
            except (OSError, CRLError) as error:
                log.warning("ignoring the CRL in %s: %s", self.learned_crl, getattr(error, "strerror", None) or error)
            else:
                if learned.supersedes(newest):
                    newest, path = learned, self.learned_crl
        held = self.revocation_list
        if held is not None and ca_certificates == self.ca_certificates and held.supersedes(newest):
            raise TLSError(f"{path} holds {newest}, older than the {held} in use: refused")
        return newest, path


def _reason(error):
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return error.verify_message
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _handshake(sock, context, server_side, timeout, address):
    """Wrap sock, complete the handshake within timeout and return (tls socket, the peer's Identity)."""
    tls_socket = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    tls_socket.settimeout(timeout)
    try:
        tls_socket.do_handshake()
        certificate = tls_socket.getpeercert()
        if not certificate:
            raise TLSError("no certificate presented")
        identity = Identity.from_peer_certificate(certificate, address)
        if not identity.name:
            raise TLSError("certificate has no common name")
    except BaseException:
        with contextlib.suppress(OSError):
            tls_socket.close()
        raise
    tls_socket.settimeout(None)
    return tls_socket, identity


class TLSServer:
    """A gevent TCP server that hands verified TLS connections to handler(socket, Identity).

    The handler owns the socket; it is closed when the handler returns. At
    most max_connections handlers (handshakes included) run at once; beyond
    that new connections wait in the listen backlog. With
    max_handshakes_per_source, at most that many handshakes from one IP address
    run at once; the connections beyond are closed at once, so that idle
    sockets from one stranger cannot keep the members out.
    """

    def __init__(
        self,
        listener,
        contexts,
        handler,
        handshake_timeout=5.0,
        max_connections=10000,
        name="tls",
        max_handshakes_per_source=None,
    ):
        self.contexts = contexts
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.log = logging.getLogger(f"thor.{name}")
        self.handshakes = SourceLimit(max_handshakes_per_source) if max_handshakes_per_source else None
        self.connections = {}
        # Connections refused or cut off, by reason: handshake_limit, handshake_timeout, tls, revoked.
        self.refused = collections.Counter()
        self._server = StreamServer(listener, self._handle, spawn=Pool(max_connections))
        self._server.reuse_addr = 1
        contexts.add_reload_callback(self._drop_refused)

    @property
    def address(self):
        return self._server.address

    def start(self):
        self._server.init_socket()
        # Small frames go out at once instead of waiting for Nagle's timer.
        self._server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.start()

    def stop(self, timeout=5):
        self.contexts.remove_reload_callback(self._drop_refused)
        self._server.close()
        for tls_socket in list(self.connections):
            with contextlib.suppress(OSError):
                tls_socket.close()
        self._server.stop(timeout=timeout)

    def _handle(self, sock, address):
        source = address[0] if address else "?"
        if self.handshakes is not None and not self.handshakes.admit(source, self.log, "TLS handshakes"):
            self.refused["handshake_limit"] += 1
            with contextlib.suppress(OSError):
                sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls_socket, identity = _handshake(sock, self.contexts.server_context, True, self.handshake_timeout, address)
        except TimeoutError:
            self.refused["handshake_timeout"] += 1
            self.log.warning("refused %s: no TLS handshake within %gs", format_address(address), self.handshake_timeout)
            return
        except (OSError, ssl.SSLError, TLSError) as error:
            self.refused["tls"] += 1
            self.log.warning("refused %s: %s", format_address(address), _reason(error))
            return
        finally:
            if self.handshakes is not None:
                self.handshakes.release(source)
            with contextlib.suppress(OSError):
                sock.close()
        refusal = self.contexts.refusal(identity)
        if refusal is not None:
            # Handshake began before a reload that revokes this certificate, or retires its CA.
            self.refused["revoked"] += 1
            self.log.warning("refused %s: %s", identity, refusal)
            with contextlib.suppress(OSError):
                tls_socket.close()
            return
        self.log.debug("accepted %s with roles %s", identity, ",".join(sorted(identity.roles)))
        self.connections[tls_socket] = identity
        try:
            self.handler(tls_socket, identity)
        except (OSError, ssl.SSLError) as error:
            # The peer went away, or we cut it off (revocation, stop): the end
            # of one connection, not a fault of the server.
            self.log.debug("connection of %s ended: %s", identity, _reason(error))
        finally:
            self.connections.pop(tls_socket, None)
            with contextlib.suppress(OSError):
                tls_socket.close()

    def _drop_refused(self, contexts):
        for tls_socket, identity in list(self.connections.items()):
            refusal = contexts.refusal(identity)
            if refusal is not None:
                self.refused["revoked"] += 1
                self.log.warning("closing %s: %s", identity, refusal)
                with contextlib.suppress(OSError):
                    tls_socket.shutdown(socket.SHUT_RDWR)


def connect(address, contexts, timeout=5.0, expected_role=None):
    """Connect to a Thor server at (host, port); return (tls socket, the server's Identity).

    expected_role: refuse a server whose certificate does not grant it (e.g.
    thor_eventserver), so that a stolen node certificate cannot impersonate an
    infrastructure server.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as error:
        raise TLSError(f"cannot connect to {format_address(address)}: {_reason(error)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls_socket, identity = _handshake(sock, contexts.client_context, False, timeout, address)
    except TimeoutError:
        raise TLSError(f"{format_address(address)}: no TLS handshake within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as error:
        raise TLSError(f"{format_address(address)}: TLS handshake failed: {_reason(error)}") from None
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    if expected_role is not None and expected_role not in identity.roles:
        with contextlib.suppress(OSError):
            tls_socket.close()
        raise TLSError(f"{identity} does not hold role {expected_role}")
    return tls_socket, identity
