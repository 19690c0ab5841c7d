"""The provider CRL as a value: parsed, checked against the CA, and ordered.

A CRL is self-authenticating (the CA signs it), so any member may hand one to
any other (thor.events.crl spreads the newest over the bus). What a member must
never do is go back: a replayed older CRL would un-revoke a certificate. So a
CRL replaces another only when it supersedes it: a higher CRL number (RFC 5280
5.2.3; thor-pki counts up at every issue), or the same number issued later.
"""

from datetime import UTC, datetime

from cryptography import x509

from thor.x509compat import crl_last_update, crl_next_update

__all__ = ["CRLError", "RevocationList"]

# A CRL of tens of thousands of revoked certificates is a few MB; a member refuses anything larger
# rather than parse it (it may come from any member over the bus).
MAX_CRL_BYTES = 4 * 1024 * 1024


class CRLError(ValueError):
    """A CRL that cannot be used; str() says why in one line."""


class RevocationList:
    """A CRL whose signature is the CA's: number, dates, revoked serials and its PEM text."""

    __slots__ = ("last_update", "next_update", "number", "pem", "revoked_serials")

    def __init__(self, pem, ca_certificate):
        if isinstance(pem, str):
            pem = pem.encode("ascii", "replace")
        if len(pem) > MAX_CRL_BYTES:
            raise CRLError(f"is larger than {MAX_CRL_BYTES} bytes")
        try:
            crl = x509.load_pem_x509_crl(pem)
        except ValueError:
            raise CRLError("is not a PEM CRL") from None
        if crl.issuer != ca_certificate.subject or not crl.is_signature_valid(ca_certificate.public_key()):
            raise CRLError("is not signed by the CA")
        try:
            self.number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            self.number = 0  # CRLs of other tools; any numbered one supersedes them
        self.pem = pem
        self.last_update = crl_last_update(crl)
        self.next_update = crl_next_update(crl)
        self.revoked_serials = frozenset(revoked.serial_number for revoked in crl)

    @classmethod
    def load(cls, path, ca_certificate):
        """The CRL in file path; OSError when it cannot be read, CRLError when it cannot be used."""
        with open(path, "rb") as stream:
            return cls(stream.read(MAX_CRL_BYTES + 1), ca_certificate)

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
