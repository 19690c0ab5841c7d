import os
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from thor.pki import CertificateAuthority
from thor.transport.tls import TLSContexts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, timeout=5.0, interval=0.02, message="condition"):
    """Poll condition() until it returns a true value or timeout passes; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        _sleep(interval)


def _sleep(seconds):
    # Cooperative when gevent is running the test, plain sleep otherwise.
    import gevent

    gevent.sleep(seconds)


class ScratchPKI:
    """A throw-away provider CA for one test; keys are made at test time, never committed."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.ca = CertificateAuthority.init(self.directory)

    def issue(self, name, roles="sip_proxy", **kwargs):
        self.ca.issue(name, roles, **kwargs)
        return self.files(name)

    def files(self, name):
        return dict(
            ca=self.ca.ca_certificate_path,
            certificate=self.ca.certificate_path(name),
            private_key=self.ca.key_path(name),
            crl=self.ca.crl_path,
        )

    def contexts(self, name, roles="sip_proxy", **kwargs):
        if not os.path.exists(self.ca.certificate_path(name)):
            self.issue(name, roles, **kwargs)
        return TLSContexts(**self.files(name))

    def expired(self, name, roles="sip_proxy"):
        now = datetime.now(UTC)
        return self.issue(name, roles, not_before=now - timedelta(days=10), days=-1)

    def not_yet_valid(self, name, roles="sip_proxy"):
        now = datetime.now(UTC)
        return self.issue(name, roles, not_before=now + timedelta(days=1), days=10)


@pytest.fixture
def pki(tmp_path):
    return ScratchPKI(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path):
    return ScratchPKI(tmp_path / "other-pki")


def python_command(module, *args):
    return [sys.executable, "-m", module, *args]


def pytest_collection_finish(session):
    """The programs' entry points (thor.*.main) patch gevent into the standard library when
    imported; in the test process that would happen after ssl is in use (RecursionError in
    the SOAP client, changed timing everywhere). Tests import library modules, never those."""
    import gevent.monkey

    if gevent.monkey.is_module_patched("socket"):
        raise pytest.UsageError("a test module imported a program's entry point (thor.*.main), which patches gevent")


def pytest_report_header(config):
    """Say which stack runs the suite: the dev venv's PyPI releases or bookworm's packages."""
    import cryptography
    import gevent

    versions = f"gevent {gevent.__version__}, cryptography {cryptography.__version__}"
    return f"thor test stack: {sys.executable} ({versions})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI nothing may be skipped: a skip there is a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which is not allowed: {report.longrepr}"
