"""Small helpers over cryptography.x509 that read the same on every supported version.

bookworm ships cryptography 38, whose validity properties return naive UTC
datetimes; 42 and newer add the *_utc variants and deprecate the naive ones.
"""

from datetime import UTC

__all__ = ["crl_last_update", "crl_next_update", "not_valid_after"]


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
