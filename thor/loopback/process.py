"""Thor programs as real processes on loopback: configuration files, ports, logs, waits."""

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time

import gevent

import thor
from thor.loopback.metrics import scrape
from thor.metrics import DEFAULT_PORTS

__all__ = [
    "PACKAGE_ROOT",
    "ProcessGroup",
    "Program",
    "config_text",
    "die_with_parent",
    "exited",
    "free_port",
    "python_command",
    "tls_values",
    "wait_for",
    "write_config",
]

# Where the thor package lives: the programs run from the same code as their caller.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(thor.__file__)))

# Below the kernel's ephemeral range (32768-60999): a port handed out here is not taken by an
# outgoing connection before the program binds it, and none is handed out twice in one run
# (two servers asking before either binds would otherwise get the same port).
PORT_RANGE = (20000, 32000)
_handed_out = set()

_PR_SET_PDEATHSIG = 1


def wait_for(condition, timeout=5.0, interval=0.02, message="condition"):
    """Poll condition() until it returns a true value or timeout passes; return that value.

    Cooperative (gevent.sleep): in-process event clients keep their keepalives going."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        gevent.sleep(interval)


def free_port(host="127.0.0.1"):
    for _ in range(10000):
        port = random.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {PORT_RANGE}")


def exited(process, timeout):
    """Wait for a child process to end and return its exit code, or None after timeout. Unlike
    Popen.wait, the wait is cooperative: in-process event clients keep their keepalives going."""
    try:
        wait_for(lambda: process.poll() is not None, timeout, interval=0.01, message="the process to exit")
    except AssertionError:
        return None
    return process.returncode


class ProcessGroup:
    """A service started in a session of its own (start_new_session), its output in log_path:
    Kamailio, rtpengine. Stopping it ends every process of the group (Kamailio's workers outlive
    a SIGKILL of their parent)."""

    process = None
    log_path = None

    def stop(self):
        """TERM (the service ends its children), then KILL to the whole group."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            exited(self.process, 10)
        self.kill()

    def kill(self):
        """kill -9 of the service and every process of its group."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            exited(self.process, 5)

    def log(self):
        with open(self.log_path, errors="replace") as stream:
            return stream.read()


def config_text(sections, header=""):
    """INI text from {section: {key: value}}."""
    lines = [header] if header else []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def write_config(path, sections, header=""):
    with open(path, "w") as stream:
        stream.write(config_text(sections, header))


def python_command(module, *args):
    """The command line running module with this interpreter."""
    return [sys.executable, "-m", module, *args]


def tls_values(files, learned_crl="", **extra):
    """A [TLS] section from a PKI's files (ca, certificate, private_key, crl), handshakes bounded at 2 s;
    learned_crl: where the program keeps a newer CRL handed over by another member (none: takes none)."""
    values = dict(files, learned_crl=learned_crl)
    values.setdefault("handshake_timeout", 2)
    values.update(extra)
    return values


def die_with_parent():
    """Runs in the child before exec: the kernel sends TERM when the process that started it
    dies, however it dies, so no program outlives its test, benchmark or demo. A parent that
    died between the fork and this call is too late for the kernel to tell: then end now."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent or parent == 1:
        os._exit(1)


class Program:
    """A program started with --config; its stderr goes to a file the caller can read."""

    def __init__(self, directory, name, command, sections, python=sys.executable, arguments=()):
        """command: what follows the interpreter (["-m", "thor.node.main"]); sections:
        {section: {key: value}}, or the configuration file's text."""
        os.makedirs(directory, exist_ok=True)
        self.name = name
        self.config = os.path.join(directory, f"{name}.ini")
        # Many programs share this host: each gets its own free metrics ports (docs/metrics.md).
        self.metrics = {key: ("127.0.0.1", free_port()) for key in DEFAULT_PORTS}
        metrics_section = {key: f"{host}:{port}" for key, (host, port) in self.metrics.items()}
        if isinstance(sections, str):
            text = sections if "[Metrics]" in sections else sections + "\n" + config_text({"Metrics": metrics_section})
        else:
            text = config_text({"Metrics": metrics_section, **sections})
        with open(self.config, "w") as stream:
            stream.write(text)
        self.log_path = os.path.join(directory, f"{name}.log")
        self.stdout_path = os.path.join(directory, f"{name}.out")
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        with open(self.log_path, "wb") as log, open(self.stdout_path, "wb") as out:
            self.command = command
            self.process = subprocess.Popen(
                [python, *command, "--config", self.config, *arguments],
                stderr=log,
                stdout=out,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches the caller, which stops its programs in order
                preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl call, safe between fork and exec)
            )

    @property
    def pid(self):
        return self.process.pid

    def scrape(self):
        """This program's /metrics now (thor.loopback.metrics.Samples)."""
        module = next(part for part in self.command if part.startswith("thor."))
        return scrape(self.metrics[module.split(".")[1]])

    def log(self):
        with open(self.log_path, errors="replace") as stream:
            return stream.read()

    def stdout(self):
        with open(self.stdout_path, errors="replace") as stream:
            return stream.read()

    def wait_log(self, text, timeout=10):
        """Wait until text is in the log; fail at once, with the log, if the program ends first."""

        def logged():
            if text in self.log():
                return True
            if self.process.poll() is not None:
                status = self.process.returncode
                raise AssertionError(f"{self.name} exited ({status}) before logging {text!r}:\n{self.log()}")
            return False

        wait_for(logged, timeout=timeout, message=f"{text!r} in the log of {self.name}")

    def signal(self, signum):
        self.process.send_signal(signum)

    def exited(self, timeout):
        return exited(self.process, timeout)

    def kill(self):
        """kill -9: no clean up, the kernel closes its sockets."""
        self.process.send_signal(signal.SIGKILL)
        assert self.exited(10) is not None, f"{self.name} did not end on SIGKILL within 10s"

    def stop(self, timeout=10):
        """TERM, then the exit status (KILL and an error after timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if self.exited(timeout) is None:
                self.process.kill()
                self.exited(5)
                raise AssertionError(f"{self.name} did not stop on SIGTERM within {timeout}s")
        return self.process.returncode

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            assert self.exited(10) is not None, f"{self.name} did not end on SIGKILL within 10s"
