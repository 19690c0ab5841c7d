"""Run Thor programs as real processes on loopback for multi-process tests."""

import os
import random
import signal
import socket
import subprocess
import sys

from conftest import REPO, wait_for

# Below the kernel's ephemeral range (32768-60999): a port handed out here is not taken by an
# outgoing connection before the program binds it, and none is handed out twice in one run
# (two servers asking before either binds would otherwise get the same port).
PORT_RANGE = (20000, 32000)
_handed_out = set()


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


def config_text(sections):
    """INI text from {section: {key: value}}."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


class Program:
    """A program started with --config; its stderr goes to a file the test can read."""

    def __init__(self, directory, name, command, sections):
        """sections: {section: {key: value}}, or the configuration file's text."""
        os.makedirs(directory, exist_ok=True)
        self.name = name
        self.config = os.path.join(directory, f"{name}.ini")
        with open(self.config, "w") as stream:
            stream.write(sections if isinstance(sections, str) else config_text(sections))
        self.log_path = os.path.join(directory, f"{name}.log")
        self.stdout_path = os.path.join(directory, f"{name}.out")
        env = dict(os.environ, PYTHONPATH=REPO)
        with open(self.log_path, "wb") as log, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, *command, "--config", self.config],
                stderr=log,
                stdout=out,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        with open(self.log_path, errors="replace") as stream:
            return stream.read()

    def stdout(self):
        with open(self.stdout_path, errors="replace") as stream:
            return stream.read()

    def wait_log(self, text, timeout=10):
        wait_for(lambda: text in self.log(), timeout=timeout, message=f"{text!r} in the log of {self.name}")

    def signal(self, signum):
        self.process.send_signal(signum)

    def exited(self, timeout):
        return exited(self.process, timeout)

    def kill(self):
        """kill -9: no clean up, the kernel closes its sockets."""
        self.process.send_signal(signal.SIGKILL)
        assert self.exited(10) is not None, f"{self.name} did not end on SIGKILL within 10s"

    def stop(self, timeout=10):
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


def tls_values(files, **extra):
    values = dict(files)
    values.setdefault("handshake_timeout", 2)
    values.update(extra)
    return values
