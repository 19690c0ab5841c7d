"""The provider CRL as a value: parsed, checked against the CA, and ordered.

A CRL is self-authenticating (the CA signs it), so any member may hand one to
any other (thor.events.crl spreads the newest over the bus). What a member must
never do is go back: a replayed older CRL would un-revoke a certificate. So a
CRL replaces another only when it supersedes it: a higher CRL number (RFC 5280
5.2.3; thor-pki counts up at every issue), or the same number issued later.

During a CA rollover the nodes trust two CAs, and the CRL file holds one CRL of
each, issued together with the same number (thor.pki). A RevocationList is that
file: every trusted CA must have its CRL in it (OpenSSL refuses the certificates
of a CA it has no CRL of); a CRL of a CA that is not trusted here (yet, or any
more) is left aside, since it can only speak of certificates that are refused anyway.
"""

from datetime import UTC, datetime

from cryptography import x509

from thor.x509compat import crl_last_update, crl_next_update, pem_blocks

__all__ = ["CRLError", "RevocationList"]

# A CRL of tens of thousands of revoked certificates is a few MB; a member refuses anything larger
# rather than parse it (it may come from any member over the bus).
MAX_CRL_BYTES = 4 * 1024 * 1024
# Two during a CA rollover; a few more leave room, not room for a member to make us parse hundreds.
MAX_CRLS = 4


class CRLError(ValueError):
    """A CRL that cannot be used; str() says why in one line."""


class RevocationList:
    """The CRLs of the trusted CAs, their signatures checked: the lowest number, the earliest
    dates, every revoked serial and the PEM text."""

    __slots__ = ("last_update", "next_update", "number", "pem", "revoked_serials")

    def __init__(self, pem, ca_certificates):
        """ca_certificates: the trusted CAs (a list, or one certificate)."""
        if isinstance(ca_certificates, x509.Certificate):
            ca_certificates = [ca_certificates]
        if isinstance(pem, str):
            pem = pem.encode("ascii", "replace")
        if len(pem) > MAX_CRL_BYTES:
            raise CRLError(f"is larger than {MAX_CRL_BYTES} bytes")
        blocks = pem_blocks(pem, "X509 CRL")
        if not blocks:
            raise CRLError("is not a PEM CRL")
        if len(blocks) > MAX_CRLS:
            raise CRLError(f"holds {len(blocks)} CRLs, more than {MAX_CRLS}")
        crls = {}  # trusted CA's subject -> its CRL
        for block in blocks:
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError:
                raise CRLError("is not a PEM CRL") from None
            issuers = [ca for ca in ca_certificates if ca.subject == crl.issuer]
            if not issuers:
                continue  # a CA not trusted here: see the module documentation
            if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):
                raise CRLError("is not signed by the CA")
            if crl.issuer in crls:
                raise CRLError(f"holds two CRLs of {crl.issuer.rfc4514_string()}")
            crls[crl.issuer] = crl
        if not crls:
            raise CRLError("is not signed by the CA")
        for ca in ca_certificates:
            if ca.subject not in crls:
                raise CRLError(f"holds no CRL of the trusted CA {ca.subject.rfc4514_string()}")
        self.number = min(_number(crl) for crl in crls.values())
        self.pem = pem
        self.last_update = min(crl_last_update(crl) for crl in crls.values())
        ends = [crl_next_update(crl) for crl in crls.values() if crl_next_update(crl) is not None]
        self.next_update = min(ends) if ends else None
        self.revoked_serials = frozenset(revoked.serial_number for crl in crls.values() for revoked in crl)

    @classmethod
    def load(cls, path, ca_certificates):
        """The CRL in file path; OSError when it cannot be read, CRLError when it cannot be used."""
        with open(path, "rb") as stream:
            return cls(stream.read(MAX_CRL_BYTES + 1), ca_certificates)

    def is_text(self, text):
        """Whether text (a Thor.CRL body's PEM, say) is this CRL's, cheaply: no parsing."""
        return isinstance(text, str) and text.encode("ascii", "replace") == self.pem

    def supersedes(self, other):
        """True when this CRL replaces other (None: nothing held yet)."""
        if other is None:
            return True
        return (self.number, self.last_update) > (other.number, other.last_update)

    def expired(self, now=None):
        return self.next_update is not None and self.next_update <= (now or datetime.now(UTC))

    def __str__(self):
        return f"CRL number {self.number} of {self.last_update:%Y-%m-%d %H:%M:%S} UTC"


def _number(crl):
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0  # CRLs of other tools; any numbered one supersedes them
