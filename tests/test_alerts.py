"""The shipped alert rules (etc/prometheus/thor.rules.yml): promtool finds them valid, and each
alert fires on the series that describe its condition, and not on a healthy network's."""

import os
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout's rules, or those thor-monitor installed (the suite of make deb-test).
RULES = next(
    (
        path
        for path in (
            os.path.join(ROOT, "etc", "prometheus", "thor.rules.yml"),
            "/usr/share/thor/prometheus/thor.rules.yml",
        )
        if os.path.exists(path)
    ),
    None,
)
# Debian's promtool, or the one make unpacks from Debian's prometheus package (no server started).
PROMTOOL = shutil.which("promtool") or os.path.join(ROOT, "build", "prometheus", "usr", "bin", "promtool")

DAY = 86400
NODE = 'job="thor-node",instance="node1:9813"'


def promtool(*arguments):
    if not os.path.exists(PROMTOOL):
        pytest.skip(f"no promtool ({PROMTOOL}): make promtool")
    assert RULES is not None, "no thor.rules.yml"
    return subprocess.run([PROMTOOL, *arguments], capture_output=True, text=True, timeout=60, check=False)


def load_rules():
    with open(RULES) as stream:
        return yaml.safe_load(stream)


def test_the_rules_are_valid():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [rule["alert"] for group in load_rules()["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names)) >= 12


CASES = [
    # (alert, series [(series, values)], eval_time, expected alerts' labels)
    (
        "ThorProgramDown",
        [
            ('up{job="thor-manager",instance="manager1:9812"}', "1 0x5"),
            ('up{job="thor-node",instance="n:9813"}', "1x5"),
        ],
        "3m",
        [{"severity": "critical", "job": "thor-manager", "instance": "manager1:9812"}],
    ),
    (
        "ThorNoActiveManager",
        [
            ('thor_manager_active{job="thor-manager",instance="m1"}', "1 0x5"),
            ('thor_manager_active{instance="m2"}', "0x5"),
        ],
        "3m",
        [{"severity": "critical"}],
    ),
    (
        "ThorEventServersMissing",
        [('up{job="thor-eventserver",instance="es1"}', "1x5"), ('up{job="thor-eventserver",instance="es2"}', "1 0x5")],
        "3m",
        [{"severity": "warning"}],
    ),
    (
        "ThorMemberLosesEventServers",
        [(f"thor_eventserver_links_up{{{NODE}}}", "2 1x10"), (f"thor_eventserver_links{{{NODE}}}", "2x10")],
        "8m",
        [{"severity": "warning", "job": "thor-node", "instance": "node1:9813"}],
    ),
    (
        "ThorRoleWithoutLiveMember",
        [
            ('thor_role_up{role="sip_proxy",instance="node1"}', "1 0x5"),
            ('thor_role_up{role="sip_proxy",instance="node2"}', "1 0x5"),
            ('thor_role_up{role="media_relay",instance="node1"}', "1x5"),
        ],
        "3m",
        [{"severity": "critical", "role": "sip_proxy"}],
    ),
    (
        "ThorRoleFlapping",
        [(f'thor_role_up{{{NODE},role="sip_proxy"}}', "1 0 1 0 1 0 1")],
        "6m",
        [{"severity": "warning", "job": "thor-node", "instance": "node1:9813", "role": "sip_proxy"}],
    ),
    (
        "ThorProgramRestarting",
        [(f"process_start_time_seconds{{{NODE}}}", "100 100 200 200 300 400")],
        "5m",
        [{"severity": "warning", "job": "thor-node", "instance": "node1:9813"}],
    ),
    (
        "ThorTLSExpiresSoon",
        [
            (f'thor_tls_expiry_seconds{{{NODE},file="crl"}}', f"{30 * DAY} {6 * DAY}x3"),
            (f'thor_tls_expiry_seconds{{{NODE},file="certificate"}}', f"{600 * DAY}x3"),
        ],
        "2m",
        [{"severity": "warning", "job": "thor-node", "instance": "node1:9813", "file": "crl"}],
    ),
    (
        "ThorTLSExpired",
        [(f'thor_tls_expiry_seconds{{{NODE},file="certificate"}}', "100 -5x3")],
        "2m",
        [{"severity": "critical", "job": "thor-node", "instance": "node1:9813", "file": "certificate"}],
    ),
    (
        "ThorNGNProFaults",
        [
            ('thor_ngnpro_calls_total{instance="p1",operation="addAccount",outcome="ok"}', "0+60x20"),
            (
                'thor_ngnpro_calls_total{instance="p1",operation="addAccount",outcome="Server.DatabaseUnavailable"}',
                "0+20x20",
            ),
            ('thor_ngnpro_calls_total{instance="p1",operation="getAccount",outcome="Client.NotFound"}', "0+100x20"),
            ('thor_ngnpro_calls_total{instance="p2",operation="addAccount",outcome="ok"}', "0+60x20"),
        ],
        "15m",
        [{"severity": "warning", "instance": "p1"}],
    ),
    (
        "ThorNGNProDatabaseErrors",
        [
            ('thor_ngnpro_database_errors_total{instance="p1"}', "0 0 0 3 3"),
            ('thor_ngnpro_database_errors_total{instance="p2"}', "0x4"),
        ],
        "4m",
        [{"severity": "warning", "instance": "p1"}],
    ),
    (
        "ThorDNSBackendErrors",
        [
            ('thor_dns_backend_errors_total{instance="ns1"}', "0 0 1 1"),
            ('thor_dns_backend_errors_total{instance="ns2"}', "0x3"),
        ],
        "3m",
        [{"severity": "warning", "instance": "ns1"}],
    ),
]


def test_every_alert_is_tested():
    names = {rule["alert"] for group in load_rules()["groups"] for rule in group["rules"]}
    assert names == {case[0] for case in CASES}


@pytest.mark.parametrize(("name", "series", "eval_time", "expected"), CASES, ids=[case[0] for case in CASES])
def test_the_alert_fires_on_its_condition_only(tmp_path, name, series, eval_time, expected):
    """promtool's rule unit test: at eval_time, name fires for exactly the expected label sets;
    at the start (a healthy network: the first value of each series) it does not. The rules are
    tested without their annotations (promtool would compare their rendered text; check rules
    checks their templates)."""
    rules = load_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    test = {
        "rule_files": [str(tmp_path / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": text, "values": values} for text, values in series],
                "alert_rule_test": [
                    {"eval_time": "0m", "alertname": name, "exp_alerts": []},
                    {
                        "eval_time": eval_time,
                        "alertname": name,
                        "exp_alerts": [{"exp_labels": labels} for labels in expected],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
