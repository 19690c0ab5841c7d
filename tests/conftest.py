"""Fixtures of the suite; the harness itself is thor.loopback (tests, benchmarks and the demo share it)."""

import os
import sys

import pytest

from thor.loopback.network import Overlay
from thor.loopback.pki import ScratchPKI


@pytest.fixture
def pki(tmp_path):
    return ScratchPKI(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path):
    return ScratchPKI(tmp_path / "other-pki")


@pytest.fixture
def overlay(tmp_path, pki):
    """An Overlay of processes on loopback (thor.loopback.network), closed after the test."""
    network = Overlay(str(tmp_path), pki)
    yield network
    network.close()


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
