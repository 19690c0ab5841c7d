"""The daemon base in a real process: signals, logging, configuration errors, CRL reload on SIGHUP."""

import os
import signal
import subprocess
import sys

import pytest
from test_tls import ask, refused

from thor.daemon import EX_CONFIG
from thor.loopback.process import Program, free_port, wait_for
from thor.transport.tls import connect

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ECHO = os.path.join(ROOT, "tests", "programs", "tls_echo.py")


class Program(Program):
    """The echo daemon; it listens on a free port given with --listen."""

    def __init__(self, tmp_path, text, *args):
        self.port = free_port()
        super().__init__(str(tmp_path), "echo", [ECHO, "--listen", f"127.0.0.1:{self.port}", *args], text)

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def wait_log(self, text, timeout=5):
        super().wait_log(text, timeout)


def tls_section(files, crl_check_interval=300):
    lines = [f"{key} = {value}" for key, value in files.items()]
    return "[TLS]\n" + "\n".join(lines) + f"\ncrl_check_interval = {crl_check_interval}\nhandshake_timeout = 1\n"


@pytest.fixture
def program(tmp_path, pki):
    started = []

    def start(config_text, *args):
        started.append(Program(tmp_path, config_text, *args))
        return started[-1]

    yield start
    for process in started:
        process.close()


def test_signals_reload_debug_and_clean_stop(pki, program):
    echo = program(tls_section(pki.issue("es1", "thor_eventserver")))
    echo.wait_log("thor-test-echo 0.1.0 started")
    client = pki.contexts("node1", "sip_proxy")
    live, _ = connect(echo.address, client)
    assert ask(live) == "node1 sip_proxy ping"

    # USR1 toggles debug logging, both ways.
    echo.signal(signal.SIGUSR1)
    echo.wait_log("debug logging on")
    live2, _ = connect(echo.address, pki.contexts("node2", "sip_proxy"))
    echo.wait_log("accepted node2 (127.0.0.1:")  # a debug line
    live2.close()
    echo.signal(signal.SIGUSR1)
    echo.wait_log("debug logging off")

    # The CRL file watcher is slow here (300 s): SIGHUP alone makes the revocation effective.
    pki.ca.revoke("node1")
    assert not refused(echo.address, client)
    echo.signal(signal.SIGHUP)
    echo.wait_log("SIGHUP received, reloading")
    wait_for(lambda: refused(echo.address, client), message="refusal after SIGHUP")
    echo.wait_log("closing node1 (127.0.0.1:")  # the live connection of the revoked node is cut
    echo.wait_log("certificate revoked")

    echo.signal(signal.SIGTERM)
    assert echo.exited(5) == 0
    log = echo.log()
    assert "SIGTERM received, stopping" in log
    assert log.rstrip().endswith("thor-test-echo stopped")
    for line in log.splitlines():
        assert line.split()[2].startswith("thor-test-echo["), log


def test_interrupt_stops_cleanly(pki, program):
    echo = program(tls_section(pki.issue("es1", "thor_eventserver")), "--debug")
    echo.wait_log(f"listening on 127.0.0.1:{echo.port}")  # --debug is on from the start
    echo.signal(signal.SIGINT)
    assert echo.exited(5) == 0


def assert_fails_at_start(program, message):
    assert program.exited(10) == EX_CONFIG
    lines = program.log().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("thor-test-echo: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("handshake_timeout = -1\n", "[TLS] handshake_timeout = '-1': expected a number from 0.1 to 300"),
        ("unknown = 1\n", "[TLS] unknown: unknown key"),
    ],
)
def test_bad_value_fails_at_start_in_one_line(pki, program, extra, message):
    files = pki.issue("es1", "thor_eventserver")
    config = "[TLS]\n" + extra + "\n".join(f"{key} = {value}" for key, value in files.items()) + "\n"
    assert_fails_at_start(program(config), message)


def test_missing_tls_files_fail_at_start_in_one_line(pki, program):
    files = {key: "/nonexistent/" + os.path.basename(value) for key, value in pki.issue("es1").items()}
    assert_fails_at_start(program(tls_section(files)), "cannot read CA /nonexistent/ca.crt: No such file")


def test_missing_config_file_named_on_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, ECHO, "--config", str(tmp_path / "missing.ini"), "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=30,
    )
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        f"thor-test-echo: error: {tmp_path / 'missing.ini'}: cannot read configuration: No such file or directory\n"
    )
