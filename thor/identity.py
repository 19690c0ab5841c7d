"""Who a certificate says a member is: its name, the roles it may take, its addresses.

A node certificate (docs/pki.md) carries the node name as its common name,
one subjectAltName URI urn:sipthor:role:<role> per role the node may take,
and IP addresses when issued with --address. The transport reads the peer's
identity from the handshake, the daemons their own from their certificate
file; both get an Identity from here, and check roles with require_role().
"""

import ipaddress
import socket
import ssl

from cryptography import x509

from thor.roles import RoleError, check_role_name
from thor.x509compat import not_valid_after

__all__ = ["ROLE_URI_PREFIX", "Identity", "IdentityError", "announced_address", "role_uri", "roles_from_uris"]

ROLE_URI_PREFIX = "urn:sipthor:role:"


class IdentityError(Exception):
    """A certificate that cannot be read, or does not grant what is asked of it; str() is one line."""


def role_uri(role):
    return ROLE_URI_PREFIX + role


def roles_from_uris(uris):
    """Roles carried by a certificate, from its subjectAltName URIs (others are ignored)."""
    roles = set()
    for uri in uris:
        if uri.startswith(ROLE_URI_PREFIX):
            try:
                roles.add(check_role_name(uri[len(ROLE_URI_PREFIX) :]))
            except RoleError:
                continue
    return frozenset(roles)


class Identity:
    """A certificate's holder. address: the peer's (host, port) on a connection, None for one's own."""

    __slots__ = ("address", "addresses", "issuer", "name", "not_after", "roles", "serial")

    def __init__(self, name, roles, serial, address=None, addresses=(), not_after=None, issuer=None):
        self.name = name
        self.roles = frozenset(roles)
        self.serial = serial
        self.address = address
        self.addresses = tuple(addresses)  # the certificate's IP addresses, as text
        self.not_after = not_after  # when the certificate expires (seconds since the epoch), when known
        self.issuer = issuer  # the common name of the CA that signed it, when known

    @classmethod
    def from_peer_certificate(cls, certificate, address):
        """From ssl.SSLSocket.getpeercert(): the verified peer at address."""
        name = _common_name(certificate.get("subject", ()))
        alt_names = certificate.get("subjectAltName", ())
        uris = [value for kind, value in alt_names if kind == "URI"]
        addresses = [_address_text(value) for kind, value in alt_names if kind == "IP Address"]
        serial = int(certificate["serialNumber"], 16)
        not_after = ssl.cert_time_to_seconds(certificate["notAfter"]) if "notAfter" in certificate else None
        issuer = _common_name(certificate.get("issuer", ()))
        return cls(name, roles_from_uris(uris), serial, address, addresses, not_after, issuer)

    @classmethod
    def from_certificate(cls, certificate):
        """From a cryptography x509.Certificate."""
        names = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        try:
            alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = alt_names.get_values_for_type(x509.UniformResourceIdentifier)
            addresses = [str(address) for address in alt_names.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            uris, addresses = [], []
        name = names[0].value if names else None
        not_after = not_valid_after(certificate).timestamp()
        issuers = certificate.issuer.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        issuer = issuers[0].value if issuers else None
        return cls(name, roles_from_uris(uris), certificate.serial_number, None, addresses, not_after, issuer)

    @classmethod
    def load(cls, path):
        """The identity of a PEM certificate file (a daemon's own)."""
        try:
            with open(path, "rb") as stream:
                certificate = x509.load_pem_x509_certificate(stream.read())
        except OSError as error:
            raise IdentityError(f"cannot read certificate {path}: {error.strerror}") from None
        except ValueError:
            raise IdentityError(f"{path} is not a PEM certificate") from None
        return cls.from_certificate(certificate)

    def require_role(self, role, what="certificate"):
        """Raise IdentityError unless the certificate grants role."""
        if role not in self.roles:
            granted = ", ".join(sorted(self.roles)) or "nothing"
            raise IdentityError(f"{what} of {self.name} does not grant {role} (it grants {granted})")

    def __repr__(self):
        return f"Identity({self.name!r}, roles={sorted(self.roles)}, address={self.address!r})"

    def __str__(self):
        if not self.address:
            return str(self.name)
        host, port = self.address[0], self.address[1]
        return f"{self.name} ([{host}]:{port})" if ":" in host else f"{self.name} ({host}:{port})"


def _common_name(rdns):
    """The commonName of a name as ssl.getpeercert() gives it (a tuple of RDNs), or None."""
    name = None
    for rdn in rdns:
        for key, value in rdn:
            if key == "commonName":
                name = value
    return name


def _address_text(value):
    # getpeercert() writes IPv6 addresses in full, uppercase; ipaddress gives the usual form.
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def announced_address(configured, identity, setting="[ThorNetwork] address"):
    """The address a program announces: configured (the setting named so), else the
    certificate's first IP address, else what its name resolves to."""
    if configured:
        try:
            return str(ipaddress.ip_address(configured))
        except ValueError:
            raise IdentityError(f"{setting} = {configured!r}: expected an IP address") from None
    if identity.addresses:
        return identity.addresses[0]
    try:
        return socket.gethostbyname(identity.name or "")
    except OSError:
        raise IdentityError(
            f"no address for {identity.name}: set {setting}, or issue the certificate with --address"
        ) from None
