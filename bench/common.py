"""What the benchmarks share beyond the loopback harness (thor.loopback): machine facts and figures."""

import os
import platform
import statistics
import sys
import tempfile

# Run as scripts (python bench/x.py): the checkout's thor, whichever interpreter runs them.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def cpu_seconds(pids=(), groups=()):
    """CPU time (user + system) used so far by the processes pids and every process of the process
    groups groups (Kamailio and its workers): a step's CPU is the difference of two readings."""
    pids, groups, total = set(pids), set(groups), 0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                fields = stream.read().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        # After the command: state, ppid, pgrp, ..., utime and stime are the 12th and 13th.
        if int(entry) in pids or int(fields[2]) in groups:
            total += int(fields[11]) + int(fields[12])
    return total / tick


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
