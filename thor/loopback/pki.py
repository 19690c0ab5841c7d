"""A throw-away provider CA: keys are made when asked for, never kept."""

import os
from datetime import UTC, datetime, timedelta

from thor.pki import CertificateAuthority
from thor.transport.tls import TLSContexts

__all__ = ["ScratchPKI"]


class ScratchPKI:
    def __init__(self, directory, certificate_days=730, now=None):
        """now: the CA's clock for every certificate it issues (a test's simulated date)."""
        self.directory = str(directory)
        self.certificate_days = certificate_days
        self.now = now
        self.ca = CertificateAuthority.init(self.directory, now=now)

    def issue(self, name, roles="sip_proxy", **kwargs):
        kwargs.setdefault("days", self.certificate_days)
        kwargs.setdefault("now", self.now)
        self.ca.issue(name, roles, **kwargs)
        return self.files(name)

    def has(self, name):
        return os.path.exists(self.ca.certificate_path(name))

    def files(self, name, roles=None, **kwargs):
        """The TLS files of name ({ca, certificate, private_key, crl}); issued first with roles if new."""
        if roles is not None and not self.has(name):
            self.issue(name, roles, **kwargs)
        return dict(
            ca=self.ca.ca_certificate_path,
            certificate=self.ca.certificate_path(name),
            private_key=self.ca.key_path(name),
            crl=self.ca.crl_path,
        )

    def contexts(self, name, roles="sip_proxy", **kwargs):
        return TLSContexts(**self.files(name, roles, **kwargs))

    def expired(self, name, roles="sip_proxy"):
        now = datetime.now(UTC)
        return self.issue(name, roles, not_before=now - timedelta(days=10), days=-1)

    def not_yet_valid(self, name, roles="sip_proxy"):
        now = datetime.now(UTC)
        return self.issue(name, roles, not_before=now + timedelta(days=1), days=10)
