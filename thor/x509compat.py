"""Small helpers over cryptography.x509 that read the same on every supported version.

bookworm ships cryptography 38, whose validity properties return naive UTC
datetimes; 42 and newer add the *_utc variants and deprecate the naive ones.
38 also lacks load_pem_x509_certificates (39) for a file of several certificates.
"""

import re
from datetime import UTC

from cryptography import x509

__all__ = [
    "common_name",
    "crl_last_update",
    "crl_next_update",
    "load_pem_certificates",
    "not_valid_after",
    "pem_blocks",
]

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


def common_name(certificate):
    """The common name of a certificate's subject, or None."""
    names = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return names[0].value if names else None


def pem_blocks(data, label):
    """The PEM blocks of data (bytes) labelled label ("CERTIFICATE", "X509 CRL"), in order."""
    return [match.group(0) for match in _PEM_BLOCK.finditer(data) if match.group(1) == label.encode()]


def load_pem_certificates(data):
    """Every certificate in data (bytes), in order; ValueError when there is none or one is bad."""
    blocks = pem_blocks(data, "CERTIFICATE")
    if not blocks:
        raise ValueError("no PEM certificate")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def _utc(obj, name):
    value = getattr(obj, name + "_utc", None)
    if value is None:
        value = getattr(obj, name)
        if value is not None:
            value = value.replace(tzinfo=UTC)
    return value


def not_valid_after(certificate):
    return _utc(certificate, "not_valid_after")


def crl_last_update(crl):
    return _utc(crl, "last_update")


def crl_next_update(crl):
    return _utc(crl, "next_update")
