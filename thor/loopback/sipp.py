"""sipp (Debian's sip-tester) as SIP devices on loopback: registrations, calls, answering devices.

Scenarios are in thor/loopback/sipp/ (register.xml, call.xml, answer.xml);
subscribers come from an -inf CSV. A run is bounded in count and time and
says how many calls succeeded or failed, with each call's setup time; the
answering devices log what they received, from which the number of Thor
nodes a call crossed is read (the proxies' Via headers).
"""

import csv
import glob
import os
import re
import signal
import subprocess

from thor.loopback.process import die_with_parent, exited, wait_for

__all__ = ["SCENARIOS", "Sipp", "SippResult", "thor_vias_of_invites"]

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")


class SippResult:
    def __init__(self, status, successful, failed, setup_ms, errors):
        self.status = status
        self.successful = successful
        self.failed = failed
        self.setup_ms = setup_ms  # per successful call, when the scenario times it
        self.errors = errors

    def __repr__(self):
        return f"SippResult(status {self.status}, {self.successful} ok, {self.failed} failed)"


class Sipp:
    """One sipp process: scenario with rows of fields (-inf), from local (address, port)."""

    def __init__(self, directory, name, scenario, local, rows=(), target=None, transport="u1", keys=None, hold_ms=200):
        self.directory = os.path.join(str(directory), f"sipp-{name}")
        os.makedirs(self.directory, exist_ok=True)
        self.name = name
        self.local = local
        self.command = ["sipp"]
        if target is not None:
            self.command.append("{}:{}".format(*target))
        self.command += [
            "-sf",
            os.path.join(SCENARIOS, f"{scenario}.xml"),
            "-i",
            local[0],
            "-p",
            str(local[1]),
            "-t",
            transport,
            "-nostdin",
            "-trace_err",
            "-trace_stat",
            "-fd",
            "1",
            "-trace_rtt",
            "-rtt_freq",
            "1",
            "-trace_msg",
            "-max_recv_loops",
            "1000",
            "-d",
            str(hold_ms),  # how long a call lasts (call.xml's pause)
        ]
        keys = {"contact_host": local[0], "expires": "3600", **(keys or {})}
        for key, value in keys.items():
            self.command += ["-key", key, str(value)]
        if rows:
            users = os.path.join(self.directory, "users.csv")
            with open(users, "w", newline="") as stream:
                stream.write("SEQUENTIAL\n")
                csv.writer(stream, delimiter=";", lineterminator="\n").writerows(rows)
            self.command += ["-inf", users]
        self.process = None

    def run(self, calls, rate=50, timeout=60, concurrent=None):
        """Make calls calls at rate per second; wait (at most timeout) for the end; the result."""
        self.start(
            ["-m", str(calls), "-r", str(rate), "-timeout", f"{timeout}s", "-timeout_error"]
            + (["-l", str(concurrent)] if concurrent else [])
        )
        status = exited(self.process, timeout + 10)
        if status is None:
            self.stop()
            status = "killed"
        return self.result(status)

    def start(self, arguments=()):
        """Start in the background (an answering device: stop() it)."""
        log = open(os.path.join(self.directory, "sipp.out"), "wb")  # noqa: SIM115 (as long as the process)
        self.process = subprocess.Popen(
            [*self.command, *arguments],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl call, safe between fork and exec)
        )
        return self

    def wait_listening(self, timeout=10):
        wait_for(lambda: glob.glob(os.path.join(self.directory, "*_.csv")) or self.process.poll() is not None, timeout)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # sipp's "stop gracefully" in background mode
            if exited(self.process, 5) is None:
                self.process.kill()
                exited(self.process, 5)

    def result(self, status=None):
        successful = failed = 0
        stats = glob.glob(os.path.join(self.directory, "*_.csv"))
        if stats:
            with open(stats[0], newline="") as stream:
                rows = list(csv.reader(stream, delimiter=";"))
            if len(rows) >= 2:
                header, last = rows[0], rows[-1]
                successful = int(last[header.index("SuccessfulCall(C)")])
                failed = int(last[header.index("FailedCall(C)")])
        setup = []
        for path in glob.glob(os.path.join(self.directory, "*_rtt.csv")):
            with open(path, newline="") as stream:
                for row in csv.reader(stream, delimiter=";"):
                    if len(row) >= 3 and row[2].strip() == "setup":
                        setup.append(float(row[1]))
        errors = "".join(_read(path) for path in glob.glob(os.path.join(self.directory, "*_errors.log")))
        return SippResult(status, successful, failed, setup, errors[-4000:])

    def messages(self):
        return "".join(_read(path) for path in glob.glob(os.path.join(self.directory, "*_messages.log")))


def _read(path):
    with open(path, errors="replace") as stream:
        return stream.read()


def thor_vias_of_invites(messages):
    """For each INVITE an answering device received (its sipp messages log): the number of Via
    headers the proxies added (all of them but the caller's own)."""
    counts = []
    for block in re.split(r"\n(?=-{10,})", messages):
        lines = block.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("INVITE ")), None)
        if start is None or not re.search(r"message received", block):
            continue
        headers = []
        for line in lines[start + 1 :]:
            if not line.strip():
                break
            headers.append(line)
        vias = sum(len(line.split(":", 1)[1].split(",")) for line in headers if re.match(r"(?i)(via|v)\s*:", line))
        counts.append(vias - 1)
    return counts
