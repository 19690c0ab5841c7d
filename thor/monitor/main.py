"""thor-monitor: a live view of the network (curses), or a plain snapshot with --once."""

from gevent import monkey

monkey.patch_all()

import collections
import curses
import json
import logging
import sys
import time

import gevent

from thor.daemon import StartupError, run
from thor.events.topics import CONNECTIONS, STATISTICS
from thor.membership.program import MemberDaemon
from thor.monitor.report import (
    EX_PKI,
    EX_UNMET,
    parse_expectation,
    pki_lines,
    pki_problems,
    pki_rows,
    snapshot_lines,
    unmet_expectations,
)
from thor.sip.media import relay_report
from thor.x509compat import not_valid_after

EX_NO_STATUS = 1
# --issuer: seconds between two handshakes with an event server that presented another CA's
# certificate (it takes a renewed one up within its files' check interval, 5 s by default).
ISSUER_RECHECK = 5.0


class MonitorDaemon(MemberDaemon):
    program = "thor-monitor"
    description = "Shows the SIP Thor network: roles, members, addresses, versions and recent events."
    announce = False  # a monitor watches; it is not a member others look up

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--once", action="store_true", help="print one plain snapshot and exit")
        parser.add_argument("--json", action="store_true", help="with --once: the status as JSON")
        parser.add_argument(
            "--wait", type=float, default=10.0, help="with --once: seconds to wait for a status (default 10)"
        )
        parser.add_argument(
            "--expect",
            metavar="NAME=ROLE[,ROLE]",
            type=parse_expectation,
            action="append",
            default=[],
            help=f"with --once: wait (up to --wait) until member NAME announces these roles; repeatable. "
            f"Exit {EX_UNMET} naming what is missing and why when the status does not list them in time",
        )
        parser.add_argument(
            "--started-after",
            metavar="EPOCH",
            type=float,
            help="with --expect: the roles must be announced by programs started at or after this time "
            "(seconds since 1970, the restarted host's clock): a rolling restart's health gate",
        )
        parser.add_argument(
            "--check-pki",
            action="store_true",
            help=f"with --once: exit {EX_PKI}, saying what to run, when the CA, the CRL or a member's certificate "
            "expires within --days",
        )
        parser.add_argument("--days", type=float, default=7.0, help="with --check-pki: days of warning (default 7)")
        parser.add_argument(
            "--issuer",
            metavar="CA",
            help=f"with --once: wait (up to --wait) until every member presents, on every connection, a "
            f"certificate of the CA with this common name, and every event server too (a CA rollover); "
            f"exit {EX_UNMET} naming the others",
        )

    def setup(self):
        if (self.options.expect or self.options.check_pki or self.options.issuer) and not self.options.once:
            raise StartupError("--expect, --check-pki and --issuer go with --once")
        if self.options.started_after is not None and not self.options.expect:
            raise StartupError("--started-after goes with --expect")
        if not self.options.once and not sys.stdout.isatty():
            raise StartupError("the live view needs a terminal; use --once")
        self.events = collections.deque(maxlen=200)
        self.certificates = {}  # member name -> when its certificate expires (the soonest of its connections)
        # (event server, connection id) -> (member name, the CA of its certificate), as the servers report.
        self.connection_issuers = {}
        self._rechecked = {}  # event server -> when --issuer last reconnected to it
        self.client.subscribe(CONNECTIONS, self._on_connection)
        self.relays = {}
        self.client.subscribe(STATISTICS, self._on_statistics)
        if self.options.once:
            gevent.spawn(self._once)
        else:
            self._screen = gevent.spawn(self._live)

    def _on_statistics(self, message):
        report = relay_report(message.body)
        if report is not None and (report["name"] in self.relays or len(self.relays) < 10000):
            self.relays[report["name"]] = report

    def _on_connection(self, message):
        body = message.body
        connected = {"snapshot": body.get("members"), "connected": [body.get("member")]}.get(body.get("event"))
        server = str(body.get("server"))
        if body.get("event") == "snapshot":  # what the server holds now: its earlier reports are over
            for key in [key for key in self.connection_issuers if key[0] == server]:
                del self.connection_issuers[key]
        for member in connected if isinstance(connected, list) else ():
            self._note_certificate(server, member)
        if body.get("event") == "disconnected" and isinstance(body.get("member"), dict):
            self.connection_issuers.pop((server, str(body["member"].get("connection"))), None)
        if body.get("event") == "snapshot":
            count = len(body.get("members", []))
            self.events.append(
                (body.get("time", time.time()), f"{'watching':<12} {count} members on {body.get('server')}")
            )
        elif body.get("event") in ("connected", "disconnected"):
            member = body.get("member", {})
            self.events.append(
                (body.get("time", time.time()), f"{body['event']:<12} {member.get('name')} on {body.get('server')}")
            )

    def _note_certificate(self, server, member):
        """When a connected member's certificate expires (the soonest of its connections), and its CA."""
        if isinstance(member, dict) and isinstance(member.get("certificate_expires"), (int, float)):
            name, expires = str(member.get("name")), member["certificate_expires"]
            if name in self.certificates or len(self.certificates) < 100000:
                self.certificates[name] = min(expires, self.certificates.get(name, expires))
            if len(self.connection_issuers) < 1000000:
                key = (server, str(member.get("connection")))
                self.connection_issuers[key] = (name, str(member.get("certificate_issuer")))

    def unmet(self, status):
        """What --expect and --issuer ask for that status (and the connections seen) lacks, one line each."""
        problems = unmet_expectations(status, self.options.expect, self.options.started_after)
        wanted = self.options.issuer
        if wanted is None:
            return problems
        issuers = {}
        for name, issuer in self.connection_issuers.values():
            issuers.setdefault(name, set()).add(issuer)
        for link in self.client.links.values():
            identity = link.server_identity if link.connected else None
            if identity is not None:
                issuers.setdefault(identity.name, set()).add(str(identity.issuer))
        for name in sorted(status.members):
            others = issuers.get(name, {"no connection seen yet"}) - {wanted}
            if others:
                problems.append(f"{name}: certificate of {', '.join(sorted(others))}, not of {wanted}")
        return problems

    def _recheck_servers_of_another_ca(self):
        """--issuer: a link knows the certificate its server presented when it connected. A server
        that has taken a certificate of the wanted CA up since (the rollout installs it on every
        host, the programs reload within seconds) is seen only by connecting again."""
        if self.options.issuer is None:
            return
        now = time.monotonic()
        for link in self.client.links.values():
            identity = link.server_identity if link.connected else None
            if identity is None or str(identity.issuer) == self.options.issuer:
                continue
            if now - self._rechecked.get(link.server_name, float("-inf")) >= ISSUER_RECHECK:
                self._rechecked[link.server_name] = now
                link.reconnect()

    def _once(self):
        # Polled too: what --issuer waits for arrives with the connection reports, not with a new status.
        deadline = time.monotonic() + self.options.wait
        while True:
            remaining = deadline - time.monotonic()
            status = self.member.status.wait(
                lambda status: status.version > 0 and not self.unmet(status), timeout=max(0, min(0.5, remaining))
            )
            if status is not None or remaining <= 0:
                break
            self._recheck_servers_of_another_ca()
        # What the servers retain (the relays' statistics) has reached us once they answer a ping.
        self.client.sync(timeout=2)
        if status is None and self.member.status.status.version > 0:
            status = self.member.status.status
            problems = self.unmet(status)
            print(f"network status v{status.version} after {self.options.wait:g}s lacks:")
            print("\n".join(f"  {problem}" for problem in problems))
            sys.stdout.flush()
            self.finish(EX_UNMET)
            return
        if status is None:
            print(f"thor-monitor: no network status within {self.options.wait:g}s", file=sys.stderr)
            self.finish(EX_NO_STATUS)
            return
        rows = self.pki_rows(status)
        if self.options.json:
            print(json.dumps(dict(status.to_json(), pki=rows), indent=2, sort_keys=True))
        else:
            print("\n".join([*snapshot_lines(status, relays=self.relays), "", *pki_lines(rows)]))
        problems = pki_problems(rows, self.options.days) if self.options.check_pki else []
        if problems:
            print("\n".join(problems), file=sys.stderr)
        sys.stdout.flush()
        self.finish(EX_PKI if problems else 0)

    def pki_rows(self, status):
        """When the CA, the CRL and each member's certificate (the event servers' included) expire."""
        certificates = {name: when for name, when in self.certificates.items() if name in status.members}
        for link in self.client.links.values():
            if link.server_name and link.server_certificate_expires:
                certificates[link.server_name] = link.server_certificate_expires
        return pki_rows(not_valid_after(self.tls.ca_certificate), self.tls.revocation_list.next_update, certificates)

    def _live(self):
        # Log lines would tear the screen: keep them for the events pane instead.
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_EventsHandler(self.events))
        screen = curses.initscr()
        curses.noecho()
        curses.cbreak()
        screen.nodelay(True)
        try:
            while True:
                if screen.getch() in (ord("q"), ord("Q")):
                    self.finish(0)
                    return
                self._draw(screen)
                gevent.sleep(0.25)
        finally:
            curses.nocbreak()
            curses.echo()
            curses.endwin()

    def _draw(self, screen):
        height, width = screen.getmaxyx()
        status = self.member.status.status
        servers = ", ".join(self.client.connected_servers) or "none"
        lines = [f"SIP Thor monitor  event servers: {servers}  (q quits)", ""]
        if status.version:
            lines.extend(snapshot_lines(status, relays=self.relays))
            lines.extend(["", *pki_lines(self.pki_rows(status))])
        else:
            lines.append("waiting for the network status ...")
        lines.extend(["", "RECENT EVENTS"])
        room = max(0, height - len(lines) - 1)
        recent = list(self.events)[-room:] if room else []
        lines.extend(f"{time.strftime('%H:%M:%S', time.localtime(when))} {text}" for when, text in recent)
        screen.erase()
        for row, line in enumerate(lines[: height - 1]):
            screen.addnstr(row, 0, line, width - 1)
        screen.refresh()

    def stop(self):
        if not self.options.once and hasattr(self, "_screen"):
            self._screen.kill()
        super().stop()


class _EventsHandler(logging.Handler):
    def __init__(self, events):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record):
        self.events.append((record.created, f"{record.levelname.lower():<12} {record.getMessage()}"))


def main(argv=None):
    return run(MonitorDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
