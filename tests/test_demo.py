"""make demo, run as a check: the whole network forms on loopback and stops cleanly."""

import os
import re
import socket
import subprocess
import sys
import time

from thor.loopback.process import wait_for

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_network_forms_and_stops_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "thor.cli.demo", "--check"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert re.search(r"network status v\d+ by manager1,", output), output  # the eldest
    for line in (
        "sip_proxy            node1 (127.0.0.11), node2 (127.0.0.12), node3 (127.0.0.13)",
        "thor_manager         manager1 (127.0.1.1), manager2 (127.0.1.2), manager3 (127.0.1.3)",
        "thor_database        database1 (127.0.0.5)",
    ):
        assert line in output, output
    assert "DNS _sip._udp.demo.sipthor.test SRV: ['10 10 5060 node" in output
    asked = re.search(r"lookup sip_proxy for alice@demo.sipthor.test, asked of every node: \[(.*)\]", output)
    answers = [answer.strip("' ") for answer in asked.group(1).split(",")]
    assert len(answers) == 5 and len(set(answers)) == 1  # every node names the same owner
    assert answers[0] in {"127.0.0.11", "127.0.0.12", "127.0.0.13"}
    assert "not stopped cleanly" not in result.stderr


def demo_processes(directory):
    """The pids of processes whose command line names the demo's folder (its programs)."""
    result = subprocess.run(["pgrep", "-f", directory], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split()]


def test_demo_fails_fast_naming_the_program_that_cannot_start_and_leaves_nothing_running():
    """Another demo (here: a socket) holds es1's port: the demo says so at once and cleans up."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.2", 8000))
        holder.listen()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "thor.cli.demo", "--check", "--keep"],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=ROOT),
            cwd=ROOT,
        )
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 30, f"the demo took {elapsed:.0f}s to give up"
    assert "es1 exited (78)" in result.stderr and "127.0.0.2:8000" in result.stderr, result.stderr
    directory = re.search(r"demo network \S+ in (\S+) ", result.stdout).group(1)
    assert demo_processes(directory) == []


def test_no_program_outlives_a_demo_that_is_killed():
    demo = subprocess.Popen(
        [sys.executable, "-m", "thor.cli.demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    try:
        directory = re.search(r"demo network \S+ in (\S+) ", demo.stdout.readline()).group(1)
        wait_for(lambda: len(demo_processes(directory)) >= 12, timeout=60, message="the demo's programs running")
    finally:
        demo.kill()
        demo.wait(10)
    wait_for(lambda: demo_processes(directory) == [], timeout=20, message="the demo's programs gone with it")


def test_sip_demo_registers_and_calls_through_the_nodes():
    result = subprocess.run(
        [sys.executable, "-m", "thor.cli.demo_sip", "--check"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count(": registered") == 3
    assert "behind NAT (Contact 192.168.1.50): registered" in result.stdout
    assert len(re.findall(r"answered, set up in \d+ ms, crossed [12] Thor node", result.stdout)) == 2
