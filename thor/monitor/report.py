"""What thor-monitor prints of a network status, and the checks of --expect.

Kept apart from the program (thor.monitor.main patches gevent when imported)
so that tests and other tools can use it.
"""

import argparse
import time

__all__ = [
    "EX_PKI",
    "EX_UNMET",
    "format_age",
    "parse_expectation",
    "pki_lines",
    "pki_problems",
    "pki_rows",
    "snapshot_lines",
    "unmet_expectations",
]

# --expect: the network status did not list every expected role in time.
EX_UNMET = 4
# --check-pki: the CA, the CRL or a member's certificate expires within --days (or has expired).
EX_PKI = 5


def format_age(seconds):
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def snapshot_lines(status, now=None, relays=None):
    """The network status as plain text lines (also the top of the live view); relays: the live
    media relays' latest Thor.Statistics, by name."""
    now = now or time.time()
    lines = [
        f"network status v{status.version} by {status.manager}, published {format_age(now - status.published)} ago, "
        f"{len(status.members)} members"
    ]
    lines.append("")
    lines.append(f"{'ROLE':<20} MEMBERS")
    for role in sorted(status.roles):
        members = ", ".join(f"{name} ({status.members[name]['address']})" for name in status.roles[role])
        lines.append(f"{role:<20} {members}")
    lines.append("")
    lines.append(f"{'NAME':<24} {'ADDRESS':<16} {'VERSION':<10} {'UP FOR':<8} ROLES")
    for name in sorted(status.members):
        entity = status.members[name]
        lines.append(
            f"{name:<24} {entity['address']:<16} {entity['version']:<10} "
            f"{format_age(now - entity['since']):<8} {','.join(entity['roles']) or '-'}"
        )
    withdrawn = [
        (name, role, reason)
        for name in sorted(status.members)
        for role, reason in sorted(status.members[name]["withdrawn"].items())
    ]
    if withdrawn:
        lines.append("")
        lines.append("WITHDRAWN (the service behind the role fails its health check)")
        lines.extend(f"{name:<24} {role:<20} {reason}" for name, role, reason in withdrawn)
    live_relays = sorted(name for name in (relays or {}) if name in status.members)
    if live_relays:
        lines.append("")
        lines.append(f"{'MEDIA RELAY':<24} {'SESSIONS':>8} {'PACKETS/S':>10} {'BYTES/S':>12} {'RELAYED PACKETS':>16}")
        for name in live_relays:
            report = relays[name]
            lines.append(
                f"{name:<24} {report.get('sessions', '-'):>8} {report.get('packets_per_s', '-'):>10} "
                f"{report.get('bytes_per_s', '-'):>12} {report.get('relayed_packets', '-'):>16}"
            )
    return lines


def parse_expectation(text):
    """NAME=ROLE[,ROLE...] -> (name, roles)."""
    name, equals, roles = text.partition("=")
    roles = tuple(sorted({role.strip() for role in roles.split(",") if role.strip()}))
    if not equals or not name.strip() or not roles:
        raise argparse.ArgumentTypeError(f"expected NAME=ROLE[,ROLE...], not {text!r}")
    return name.strip(), roles


def unmet_expectations(status, expected, started_after=None):
    """One line per expected (name, role) the status does not list, saying what keeps it out.
    With started_after (epoch), a role announced by a program started before it is not met yet:
    a rolling restart waits until the restarted program itself is back."""
    problems = []
    for name, roles in expected:
        member = status.members.get(name)
        if member is None:
            problems.append(f"{name}: not in the network status (none of its programs is connected)")
            continue
        for role in roles:
            if role in member["roles"]:
                since = member["services"].get(role, {}).get("since", 0.0)
                if started_after is not None and since < started_after:
                    problems.append(
                        f"{name}: {role} announced by a program started {format_age(started_after - since)} "
                        f"before {time.strftime('%H:%M:%S', time.localtime(started_after))}, not by a newer one yet"
                    )
                continue
            reason = member["withdrawn"].get(role)
            if reason is not None:
                problems.append(f"{name}: {role} withdrawn: {reason}")
            else:
                problems.append(f"{name}: {role} not announced (the program that announces it is not connected)")
    return problems


def pki_rows(ca_expires, crl_expires, certificates, now=None):
    """What expires when, soonest first: [{"what", "name", "expires" (epoch), "days_left"}] of the CA,
    the CRL (datetimes, None: unknown) and each member's certificate ({name: epoch})."""
    now = now or time.time()
    rows = [("ca", "the CA certificate", ca_expires), ("crl", "the CRL", crl_expires)]
    entries = [(what, name, when.timestamp()) for what, name, when in rows if when is not None]
    entries.extend(("certificate", name, when) for name, when in certificates.items() if when is not None)
    return [
        {"what": what, "name": name, "expires": when, "days_left": round((when - now) / 86400, 1)}
        for what, name, when in sorted(entries, key=lambda entry: (entry[2], entry[1]))
    ]


def pki_lines(rows):
    lines = [f"{'EXPIRES':<17} {'DAYS LEFT':>9}  WHAT"]
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["expires"]))
        what = row["name"] if row["what"] != "certificate" else f"the certificate of {row['name']}"
        lines.append(f"{when:<17} {row['days_left']:>9.1f}  {what}")
    return lines


def pki_problems(rows, days):
    """One line per row that expires within days (or has expired), saying what to run."""
    remedy = {
        "ca": "a CA rollover (docs/pki.md)",
        "crl": "'thor-pki crl' and 'thor-pki publish-crl' where the CA is",
        "certificate": "a new certificate for it ('thor-pki renew' and playbooks/renew.yml where the CA is)",
    }
    problems = []
    for row in rows:
        if row["days_left"] < days:
            what = row["name"] if row["what"] != "certificate" else f"the certificate of {row['name']}"
            state = "has expired" if row["days_left"] <= 0 else f"expires in {row['days_left']:.1f} days"
            problems.append(f"{what} {state}: {remedy[row['what']]}")
    return problems
