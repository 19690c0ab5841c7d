"""Shared pieces of the benchmarks: a throw-away PKI, programs as processes, machine facts."""

import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from thor.pki import CertificateAuthority


class BenchPKI:
    def __init__(self, directory):
        self.ca = CertificateAuthority.init(os.path.join(directory, "pki"))

    def files(self, name, roles):
        if not os.path.exists(self.ca.certificate_path(name)):
            self.ca.issue(name, roles)
        return {
            "ca": self.ca.ca_certificate_path,
            "certificate": self.ca.certificate_path(name),
            "private_key": self.ca.key_path(name),
            "crl": self.ca.crl_path,
        }


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path, sections):
    with open(path, "w") as stream:
        for section, values in sections.items():
            stream.write(f"[{section}]\n")
            for key, value in values.items():
                stream.write(f"{key} = {value}\n")


def start_eventserver(directory, pki, name="es1", **settings):
    """Start thor-eventserver; returns (process, port, log path) once it listens."""
    port = free_port()
    config = os.path.join(directory, f"{name}.ini")
    values = {"listen": f"127.0.0.1:{port}", "max_connections": 5000}
    values.update(settings)
    write_config(config, {"TLS": pki.files(name, "thor_eventserver"), "EventServer": values})
    log_path = os.path.join(directory, f"{name}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "thor.eventserver.main", "--config", config],
            stderr=log,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
    deadline = time.monotonic() + 20
    while f"listening on 127.0.0.1:{port}" not in read_text(log_path):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{name} did not start:\n{read_text(log_path)}")
        time.sleep(0.05)
    return process, port, log_path


def read_text(path):
    with open(path, errors="replace") as stream:
        return stream.read()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as stream:
        for line in stream:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import cryptography
    import gevent

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()} ({sys.executable}), gevent {gevent.__version__}, "
        f"cryptography {cryptography.__version__}"
    )


def median(values):
    return statistics.median(values)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def temporary_directory():
    return tempfile.TemporaryDirectory(prefix="thor-bench-")
