"""make demo, run as a check: the whole network forms on loopback and stops cleanly."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_demo_network_forms_and_stops_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "thor.cli.demo", "--check"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert "network status v" in output and "by manager1" in output
    for line in (
        "sip_proxy            node1 (127.0.0.11), node2 (127.0.0.12), node3 (127.0.0.13)",
        "thor_manager         manager1 (127.0.1.1), manager2 (127.0.1.2), manager3 (127.0.1.3)",
        "thor_database        database1 (127.0.0.5)",
    ):
        assert line in output
    assert "DNS _sip._udp.demo.sipthor.test SRV: ['10 10 5060 node" in output
    asked = re.search(r"lookup sip_proxy for alice@demo.sipthor.test, asked of every node: \[(.*)\]", output)
    answers = [answer.strip("' ") for answer in asked.group(1).split(",")]
    assert len(answers) == 5 and len(set(answers)) == 1  # every node names the same owner
    assert answers[0] in {"127.0.0.11", "127.0.0.12", "127.0.0.13"}
    assert "not stopped cleanly" not in result.stderr
