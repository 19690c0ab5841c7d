"""The provider's certificate authority.

State lives in one directory, owned by the operator (mode 0700):

    ca.crt  ca.key          the provider CA (key mode 0600); ca.crt is what every node
                            trusts: the CA that signs first, and during a CA rollover
                            the other one after it
    ca-next.crt/.key        a rollover begun: the new CA, trusted but not signing yet
    ca-previous.crt/.key    a rollover switched: the old CA, trusted until it is retired
    retired/                the certificates of retired CAs (their keys are deleted)
    crl.pem                 the current certificate revocation list: one CRL of each
                            CA in ca.crt, issued together with the same number
    index.json              every certificate ever issued, and the CRL number
    nodes/NAME.crt          the current certificate of each node
    nodes/NAME.key          its key, only when 'thor-pki issue' made it (mode 0600);
                            rollouts make keys on their hosts and send a CSR ('sign')

Node certificate profile (see docs/pki.md): subject CN = node name;
subjectAltName carries DNS:<name>, IP:<address> when given, and one URI
urn:sipthor:role:<role> for every role the node may take; ECDSA P-256 keys,
SHA-256 signatures, extended key usage serverAuth + clientAuth, because every
node is client of some peers and server of others.

Every operation holds an exclusive lock on the directory, so that parallel
callers (Ansible forks issuing certificates for many hosts) never interleave.
"""

import contextlib
import fcntl
import ipaddress
import json
import os
import re
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from thor.config import Section, Setting
from thor.datatypes import Integer, NameList, Path
from thor.files import write_atomic
from thor.identity import role_uri
from thor.roles import RoleError, parse_roles
from thor.x509compat import (
    common_name,
    crl_last_update,
    crl_next_update,
    load_pem_certificates,
    not_valid_after,
    pem_blocks,
)

__all__ = [
    "REVOCATION_REASONS",
    "CertificateAuthority",
    "CertificateRecord",
    "PKIConfig",
    "PKIError",
    "check_node_name",
]

# Allowance for clocks of peers that run a little behind the CA's.
CLOCK_SKEW = timedelta(minutes=5)

REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
}

# The files of a CA rollover (see the module documentation).
NEXT_CA, PREVIOUS_CA = "ca-next", "ca-previous"
# A rolled-over CA is named after the first, with its creation date: "SIP Thor provider CA 2026-12-03".
_BASE_NAME = re.compile(r" \d{4}-\d{2}-\d{2}\Z")

_NODE_NAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\Z")


class PKIError(Exception):
    """An operator error; str() is one line."""


class PKIConfig(Section):
    name = "PKI"
    directory = Setting(
        Path(),
        "/var/lib/thor/pki",
        "Where thor-pki keeps the CA, the CRL, the index and issued certificates (--dir overrides).",
    )
    ca_days = Setting(Integer(1, 36500), "3650", "Validity of a new provider CA, in days.")
    certificate_days = Setting(Integer(1, 36500), "730", "Validity of a node certificate, in days.")
    crl_days = Setting(
        Integer(1, 3650),
        "30",
        "Validity of the CRL, in days; re-issue it with 'thor-pki crl' before it expires.",
    )
    renew_days = Setting(
        Integer(1, 36500),
        "30",
        "'thor-pki renew' re-issues the certificates that expire within this many days.",
    )
    extra_roles = Setting(
        NameList(),
        "",
        "Third-party roles certificates may carry besides the built-in ones, comma separated.",
    )


def check_node_name(name):
    """A node name is a lowercase DNS name; it is the certificate's common name."""
    if len(name) > 253 or not _NODE_NAME.match(name):
        raise PKIError(
            f"invalid node name {name!r}: expected a lowercase DNS name (letters, digits, '-', dots between labels)"
        )
    return name


class CertificateRecord:
    """One line of the index: a certificate the CA issued."""

    __slots__ = ("address", "issuer", "name", "not_after", "not_before", "reason", "revoked", "roles", "serial")

    def __init__(self, name, serial, roles, address, not_before, not_after, revoked=None, reason=None, issuer=None):
        """issuer: the key identifier (hex) of the CA that signed it; None in indexes older than
        CA rollovers, which had one CA."""
        self.name = name
        self.serial = serial
        self.roles = tuple(roles)
        self.address = address
        self.not_before = not_before
        self.not_after = not_after
        self.revoked = revoked
        self.reason = reason
        self.issuer = issuer

    def status(self, now=None):
        now = now or datetime.now(UTC)
        if self.revoked:
            return "revoked"
        if self.not_after < now:
            return "expired"
        if self.not_before > now:
            return "not yet valid"
        return "valid"

    def to_json(self):
        return {
            "name": self.name,
            "serial": f"{self.serial:x}",
            "roles": list(self.roles),
            "address": self.address,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "revoked": self.revoked.isoformat() if self.revoked else None,
            "reason": self.reason,
            "issuer": self.issuer,
        }

    @classmethod
    def from_json(cls, data):
        return cls(
            name=data["name"],
            serial=int(data["serial"], 16),
            roles=data["roles"],
            address=data["address"],
            not_before=datetime.fromisoformat(data["not_before"]),
            not_after=datetime.fromisoformat(data["not_after"]),
            revoked=datetime.fromisoformat(data["revoked"]) if data["revoked"] else None,
            reason=data.get("reason"),
            issuer=data.get("issuer"),
        )


class CertificateAuthority:
    """Operations on a CA directory. Use init() to create one, the constructor to open one."""

    def __init__(self, directory, extra_roles=()):
        self.directory = os.path.abspath(directory)
        self.extra_roles = tuple(extra_roles)
        if not os.path.exists(self.path("ca.crt")):
            raise PKIError(f"{self.directory}: no CA here; create one with 'thor-pki init'")

    def path(self, *parts):
        return os.path.join(self.directory, *parts)

    @property
    def ca_certificate_path(self):
        return self.path("ca.crt")

    @property
    def crl_path(self):
        return self.path("crl.pem")

    def certificate_path(self, name):
        return self.path("nodes", check_node_name(name) + ".crt")

    def key_path(self, name):
        return self.path("nodes", check_node_name(name) + ".key")

    # -- creation -----------------------------------------------------------

    @classmethod
    def init(cls, directory, common_name="SIP Thor provider CA", days=3650, crl_days=30, now=None):
        """Create a new CA with an empty CRL in directory (which must hold no CA)."""
        now = now or datetime.now(UTC)
        directory = os.path.abspath(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with _locked(directory):
            if os.path.exists(os.path.join(directory, "ca.crt")):
                raise PKIError(f"{directory}: a CA exists already; refusing to overwrite it")
            os.makedirs(os.path.join(directory, "nodes"), mode=0o700, exist_ok=True)
            certificate, key = _make_ca(common_name, days, now)
            _write_private(os.path.join(directory, "ca.key"), _key_pem(key))
            _write_public(os.path.join(directory, "ca.crt"), _certificates_pem([certificate]))
            _write_public(os.path.join(directory, "index.json"), _index_bytes({"crl_number": 0, "certificates": []}))
        ca = cls(directory)
        ca.renew_crl(days=crl_days, now=now)
        return ca

    # -- reading ------------------------------------------------------------

    def trusted(self):
        """The CA certificates every node trusts (ca.crt): the signing CA first."""
        with open(self.ca_certificate_path, "rb") as stream:
            return load_pem_certificates(stream.read())

    def _load_ca(self, now):
        """(certificate, key) of the CA that signs."""
        certificate = self.trusted()[0]
        key = _load_key(self.path("ca.key"), certificate)
        expiry = not_valid_after(certificate)
        if expiry <= now:
            raise PKIError(
                f"the CA certificate expired on {expiry:%Y-%m-%d %H:%M} UTC; "
                "create a new CA (thor-pki init in a new directory) and re-issue every node certificate"
            )
        return certificate, key

    def _authorities(self, now):
        """[(certificate, key)] of every trusted CA, the signing one first: each signs its CRL."""
        signing = self._load_ca(now)
        others = []
        for certificate in self.trusted()[1:]:
            for state in (NEXT_CA, PREVIOUS_CA):
                if _read_certificate(self.path(f"{state}.crt")) == certificate:
                    others.append((certificate, _load_key(self.path(f"{state}.key"), certificate)))
                    break
            else:
                raise PKIError(f"{self.ca_certificate_path} trusts {_common_name(certificate)}, whose key is not here")
        return [signing, *others]

    def rollover_state(self):
        """Where a CA rollover stands: none, begun (a new CA is trusted, not signing yet) or
        switched (the old one is trusted, no longer signing); see rollover_begin()."""
        if os.path.exists(self.path(f"{NEXT_CA}.crt")):
            return "begun"
        if os.path.exists(self.path(f"{PREVIOUS_CA}.crt")):
            return "switched"
        return "none"

    def _read_index(self):
        with open(self.path("index.json"), encoding="utf-8") as stream:
            data = json.load(stream)
        return data["crl_number"], [CertificateRecord.from_json(item) for item in data["certificates"]]

    def _write_index(self, crl_number, records):
        data = {"crl_number": crl_number, "certificates": [record.to_json() for record in records]}
        _write_public(self.path("index.json"), _index_bytes(data))

    def records(self):
        with _locked(self.directory):
            return self._read_index()[1]

    def crls(self):
        """The CRLs in crl.pem: one of each trusted CA."""
        with open(self.crl_path, "rb") as stream:
            return [x509.load_pem_x509_crl(block) for block in pem_blocks(stream.read(), "X509 CRL")]

    def crl_expiry(self):
        return min(crl_next_update(crl) for crl in self.crls())

    # -- node certificates --------------------------------------------------

    def issue(self, name, roles, address=None, days=730, replace=False, not_before=None, now=None):
        """Issue a certificate and a new key for node name (the key kept in nodes/NAME.key);
        returns its CertificateRecord. Rollouts use sign() instead: keys made on their hosts.

        roles: an iterable of role names or a comma separated string. A name
        may hold one valid certificate; replace=True revokes the current one
        (reason superseded). not_before is for tests of not-yet-valid
        certificates; days may be negative for tests of expired ones.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        record = self._certify(name, key.public_key(), roles, address, days, replace, not_before, now)
        _write_private(self.key_path(name), _key_pem(key))
        return record

    def sign(self, name, request_pem, roles, address=None, days=730, now=None):
        """Certify the key of a certificate signing request made on the node's host, with the
        roles and address given here (what the CSR asks for besides its key is ignored: the
        inventory decides). Returns (record, True) when a certificate was issued, (record,
        False) when name's current certificate certifies that key with those roles and address
        already. A different key or roles supersede the current certificate (revoked)."""
        now = now or datetime.now(UTC)
        public_key = _request_key(name, request_pem)
        current = self._current_certificate(name, self.records(), now)
        if current is not None:
            record, certificate = current
            if (
                _key_identifier(certificate, x509.AuthorityKeyIdentifier) == self._signing_key_id()
                and _key_id(certificate.public_key()) == _key_id(public_key)
                and set(record.roles) == set(self._parse_roles(roles))
                and record.address == self._parse_address(address)
            ):
                return record, False
        record = self._certify(name, public_key, roles, address, days, True, None, now)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.key_path(name))  # a key issue() made once: the host's key replaces it
        return record, True

    def renew(self, within, days=730, now=None):
        """Re-issue every current certificate that expires within `within` (a timedelta), or
        that a CA other than the signing one issued (a CA rollover switched), for the same key,
        roles and address; returns the new records. The old certificate is not revoked: it
        stays valid until it expires, so the programs holding it go on while they take up
        the new one."""
        now = now or datetime.now(UTC)
        ca_expiry = not_valid_after(self.trusted()[0])
        signing = self._signing_key_id()
        renewed = []
        records = self.records()  # read once: a network's every certificate
        for name in sorted({record.name for record in records}):
            current = self._current_certificate(name, records, now)
            if current is None:
                continue
            record, certificate = current
            if _key_identifier(certificate, x509.AuthorityKeyIdentifier) == signing:
                if record.not_after - now > within:
                    continue
                if min(now + timedelta(days=days), ca_expiry) <= record.not_after:
                    continue  # bounded by the CA's own expiry: only a CA rollover helps
            renewed.append(
                self._certify(name, certificate.public_key(), record.roles, record.address, days, "renew", None, now)
            )
        return renewed

    def _current_certificate(self, name, records, now):
        """(record, certificate) of name's current valid certificate among records, or None."""
        records = [r for r in records if r.name == name and r.status(now) == "valid"]
        try:
            with open(self.certificate_path(name), "rb") as stream:
                certificate = x509.load_pem_x509_certificate(stream.read())
        except (FileNotFoundError, ValueError):
            return None
        for record in records:
            if record.serial == certificate.serial_number:
                return record, certificate
        return None

    def _signing_key_id(self):
        return _key_identifier(self.trusted()[0], x509.SubjectKeyIdentifier)

    def _parse_roles(self, roles):
        if not isinstance(roles, str):
            roles = ",".join(roles)
        try:
            return parse_roles(roles, self.extra_roles)
        except RoleError as error:
            raise PKIError(str(error)) from None

    @staticmethod
    def _parse_address(address):
        if not address:
            return None
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            raise PKIError(f"invalid address {address!r}: expected an IPv4 or IPv6 address") from None

    def _certify(self, name, public_key, roles, address, days, replace, not_before, now):
        """Sign a certificate for name and public_key. replace: False refuses when name holds
        a valid certificate, True revokes it (superseded), "renew" keeps it valid."""
        now = now or datetime.now(UTC)
        check_node_name(name)
        roles = self._parse_roles(roles)
        address = self._parse_address(address)
        with _locked(self.directory):
            ca_certificate, ca_key = self._load_ca(now)
            crl_number, records = self._read_index()
            current = [r for r in records if r.name == name and r.status(now) in ("valid", "not yet valid")]
            if current and not replace:
                record = current[-1]
                raise PKIError(
                    f"a certificate for {name} exists already (serial {record.serial:x}, valid until "
                    f"{record.not_after:%Y-%m-%d}); revoke it first or issue with --replace"
                )
            start = not_before or (now - CLOCK_SKEW)
            end = min(now + timedelta(days=days), not_valid_after(ca_certificate))
            alt_names = [x509.DNSName(name)]
            if address is not None:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(address)))
            alt_names.extend(x509.UniformResourceIdentifier(role_uri(role)) for role in roles)
            certificate = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_certificate.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(certificate_authority=False), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(_authority_key_identifier(ca_certificate), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            issuer = _key_identifier(ca_certificate, x509.SubjectKeyIdentifier)
            record = CertificateRecord(name, certificate.serial_number, roles, address, start, end, issuer=issuer)
            _write_public(self.certificate_path(name), certificate.public_bytes(serialization.Encoding.PEM))
            records.append(record)
            if current and replace is True:
                for old in current:
                    old.revoked, old.reason = now, "superseded"
                crl_number += 1
                self._write_crl(self._authorities(now), records, crl_number, self._crl_days(), now)
            self._write_index(crl_number, records)
        return record

    def revoke(self, name, reason="unspecified", now=None):
        """Revoke every unexpired certificate of name and re-issue the CRL; returns the revoked records."""
        now = now or datetime.now(UTC)
        if reason not in REVOCATION_REASONS:
            raise PKIError(f"unknown revocation reason {reason!r}; expected one of {', '.join(REVOCATION_REASONS)}")
        with _locked(self.directory):
            authorities = self._authorities(now)
            crl_number, records = self._read_index()
            targets = [r for r in records if r.name == name and not r.revoked and r.not_after > now]
            if not targets:
                known = any(r.name == name for r in records)
                raise PKIError(
                    f"{name} has no certificate to revoke" + ("" if known else " (no certificate was ever issued)")
                )
            for record in targets:
                record.revoked, record.reason = now, reason
            self._write_crl(authorities, records, crl_number + 1, self._crl_days(), now)
            self._write_index(crl_number + 1, records)
        return targets

    def renew_crl(self, days=30, now=None):
        """Re-issue the CRL, valid for days; returns its next-update time."""
        now = now or datetime.now(UTC)
        with _locked(self.directory):
            authorities = self._authorities(now)
            crl_number, records = self._read_index()
            self._write_crl(authorities, records, crl_number + 1, days, now)
            self._write_index(crl_number + 1, records)
        return now + timedelta(days=days)

    # -- CA rollover --------------------------------------------------------
    # Three steps, each followed by a rollout (docs/pki.md): begin (every node trusts the new CA
    # too), switch (the new CA signs; renew() re-issues every certificate), finish (every node
    # trusts the new CA only). Nodes never see a certificate from a CA they do not trust yet.

    def rollover_begin(self, common_name=None, days=3650, now=None):
        """Make a new CA, trusted beside the current one (ca.crt holds both, crl.pem a CRL of
        each) but not signing yet; returns its certificate."""
        now = now or datetime.now(UTC)
        with _locked(self.directory):
            self._check_rollover("none", "begin")
            signing, _ = self._load_ca(now)
            common_name = common_name or f"{_BASE_NAME.sub('', _common_name(signing))} {now:%Y-%m-%d}"
            if any(_common_name(ca) == common_name for ca in self.trusted()):
                raise PKIError(f"a trusted CA is named {common_name!r} already; choose another name (--name)")
            certificate, key = _make_ca(common_name, days, now)
            _write_private(self.path(f"{NEXT_CA}.key"), _key_pem(key))
            _write_public(self.path(f"{NEXT_CA}.crt"), _certificates_pem([certificate]))
            crl_number, records = self._read_index()
            for record in records:  # from now on each CRL lists its own CA's certificates only
                record.issuer = record.issuer or _key_identifier(signing, x509.SubjectKeyIdentifier)
            # The CRLs first: a program that reloads between the two files finds a CRL of each CA it trusts.
            authorities = [*self._authorities(now), (certificate, key)]
            self._write_crl(authorities, records, crl_number + 1, self._crl_days(), now)
            self._write_index(crl_number + 1, records)
            _write_public(self.ca_certificate_path, _certificates_pem([ca for ca, _ in authorities]))
        return certificate

    def rollover_switch(self, now=None):
        """The new CA signs from now on; the old one stays trusted. Run renew() next: it
        re-issues every certificate, for the same keys."""
        now = now or datetime.now(UTC)
        with _locked(self.directory):
            self._check_rollover("begun", "switch")
            old, old_key = self._load_ca(now)
            new = _read_certificate(self.path(f"{NEXT_CA}.crt"))
            new_key = _load_key(self.path(f"{NEXT_CA}.key"), new)
            _write_private(self.path(f"{PREVIOUS_CA}.key"), _key_pem(old_key))
            _write_public(self.path(f"{PREVIOUS_CA}.crt"), _certificates_pem([old]))
            # ca.key and ca.crt change together; the lock keeps every other thor-pki out meanwhile.
            _write_private(self.path("ca.key"), _key_pem(new_key))
            _write_public(self.ca_certificate_path, _certificates_pem([new, old]))
            os.unlink(self.path(f"{NEXT_CA}.key"))
            os.unlink(self.path(f"{NEXT_CA}.crt"))
        return new

    def rollover_finish(self, now=None):
        """Retire the old CA: ca.crt and crl.pem hold the new one only, the old key is deleted
        (its certificate kept in retired/). Refused while a current certificate is the old CA's."""
        now = now or datetime.now(UTC)
        with _locked(self.directory):
            self._check_rollover("switched", "finish")
            crl_number, records = self._read_index()
            signing_id = self._signing_key_id()
            behind = [
                name
                for name in sorted({record.name for record in records})
                if (current := self._current_certificate(name, records, now)) is not None
                and _key_identifier(current[1], x509.AuthorityKeyIdentifier) != signing_id
            ]
            if behind:
                raise PKIError(
                    f"the old CA issued the current certificates of {', '.join(behind)}: "
                    "run 'thor-pki renew' and install them first"
                )
            signing = self._load_ca(now)
            old = _read_certificate(self.path(f"{PREVIOUS_CA}.crt"))
            # The CA file first: a program that reloads between the two files trusts no CA it lacks a CRL of.
            _write_public(self.ca_certificate_path, _certificates_pem([signing[0]]))
            self._write_crl([signing], records, crl_number + 1, self._crl_days(), now)
            self._write_index(crl_number + 1, records)
            os.makedirs(self.path("retired"), mode=0o700, exist_ok=True)
            _write_public(self.path("retired", f"{old.serial_number:x}.crt"), _certificates_pem([old]))
            os.unlink(self.path(f"{PREVIOUS_CA}.key"))
            os.unlink(self.path(f"{PREVIOUS_CA}.crt"))
        return old

    def _check_rollover(self, expected, step):
        state = self.rollover_state()
        if state != expected:
            after = {"none": "no rollover is under way", "begun": "a rollover has begun", "switched": "it has switched"}
            raise PKIError(f"cannot {step}: {after[state]} (thor-pki rollover status)")

    def _crl_days(self):
        """Keep the validity period the CRL was last issued with."""
        try:
            crl = self.crls()[0]
        except (FileNotFoundError, IndexError):
            return 30
        days = (crl_next_update(crl) - crl_last_update(crl)).days
        return max(days, 1)

    def _write_crl(self, authorities, records, number, days, now):
        """crl.pem: a CRL of each of authorities ([(certificate, key)]), with the same number."""
        pem = b""
        for ca_certificate, ca_key in authorities:
            issuer = _key_identifier(ca_certificate, x509.SubjectKeyIdentifier)
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca_certificate.subject)
                .last_update(now)
                .next_update(now + timedelta(days=days))
                .add_extension(x509.CRLNumber(number), critical=False)
                .add_extension(_authority_key_identifier(ca_certificate), critical=False)
            )
            for record in records:
                # issuer None: an index from before rollovers, of one CA; listing those everywhere is harmless.
                mine = record.issuer in (None, issuer)
                if mine and record.revoked and record.not_after > now - timedelta(days=1):
                    revoked = (
                        x509.RevokedCertificateBuilder()
                        .serial_number(record.serial)
                        .revocation_date(record.revoked)
                        .add_extension(x509.CRLReason(REVOCATION_REASONS[record.reason]), critical=False)
                        .build()
                    )
                    builder = builder.add_revoked_certificate(revoked)
            pem += builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        _write_public(self.crl_path, pem)


def _make_ca(common_name, days, now):
    """A new self-signed CA: (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificate_authority=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _load_key(path, certificate):
    """The private key in path, which must be certificate's."""
    with open(path, "rb") as stream:
        key = serialization.load_pem_private_key(stream.read(), password=None)
    if _key_id(key.public_key()) != _key_id(certificate.public_key()):
        raise PKIError(f"{path} is not the key of {_common_name(certificate)}")
    return key


def _read_certificate(path):
    """The (first) certificate in path; None when there is no such file."""
    try:
        with open(path, "rb") as stream:
            return load_pem_certificates(stream.read())[0]
    except FileNotFoundError:
        return None


def _common_name(certificate):
    return common_name(certificate) or certificate.subject.rfc4514_string()


def _key_identifier(certificate, extension):
    """The hex key identifier of a certificate's SubjectKeyIdentifier or AuthorityKeyIdentifier, or None."""
    try:
        return certificate.extensions.get_extension_for_class(extension).value.key_identifier.hex()
    except (x509.ExtensionNotFound, AttributeError):
        return None


def _certificates_pem(certificates):
    return b"".join(certificate.public_bytes(serialization.Encoding.PEM) for certificate in certificates)


def _key_usage(certificate_authority):
    """A CA signs certificates and CRLs; a node signs (ECDSA) and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=not certificate_authority,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not certificate_authority,
        key_cert_sign=certificate_authority,
        crl_sign=certificate_authority,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_certificate):
    ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# Keys a node may present: what the TLS contexts accept from peers (docs/pki.md).
_ACCEPTED_CURVES = ("secp256r1", "secp384r1")
_MINIMUM_RSA_BITS = 2048


def _request_key(name, request_pem):
    """The public key of a CSR for name, after checking its signature, its name and its key."""
    if isinstance(request_pem, str):
        request_pem = request_pem.encode("utf-8", "replace")
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError:
        raise PKIError("not a PEM certificate signing request") from None
    if not request.is_signature_valid:
        raise PKIError("the certificate signing request's signature does not verify")
    names = [attribute.value for attribute in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [name]:
        raise PKIError(
            f"the certificate signing request is for {', '.join(map(repr, names)) or 'no name'}, not {name!r}"
        )
    key = request.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _ACCEPTED_CURVES:
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MINIMUM_RSA_BITS:
        return key
    raise PKIError(
        f"the certificate signing request's key is not accepted: use EC {' or '.join(_ACCEPTED_CURVES)}"
        f" or RSA of {_MINIMUM_RSA_BITS} bits or more"
    )


def _key_id(public_key):
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _index_bytes(data):
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _write_private(path, data):
    write_atomic(path, data, 0o600)


def _write_public(path, data):
    write_atomic(path, data, 0o644)


@contextlib.contextmanager
def _locked(directory):
    fd = os.open(os.path.join(directory, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
