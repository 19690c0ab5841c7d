"""A network that runs for years: certificates renewed in place, the CRL renewed before it
expires, members reconnecting on days nobody touched the network.

The programs run under libfaketime: their wall clock (what OpenSSL checks certificates and
CRLs against, what expiry warnings count from) is the real one plus the offset in a file the
test moves forward; their monotonic clock, which timers and keepalives use, stays real.
"""

import json
import os
import shutil
import signal
import time
from datetime import UTC, datetime, timedelta

import gevent
from cryptography import x509

from thor import roles
from thor.loopback.network import Overlay, members
from thor.loopback.pki import ScratchPKI
from thor.loopback.process import wait_for
from thor.transport.tls import TLSContexts, TLSError, connect
from thor.x509compat import common_name

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
NODES = ("node1", "node2")
EVERYONE = {"es1", "es2", "manager1", *NODES}
STEPS, STEP_DAYS = 18, 45
# Fast reloads: a renewed file is taken up within a fraction of a simulated day's step.
TLS_SETTINGS = {"crl_check_interval": 0.2}


def use_faketime(monkeypatch, clock):
    """Every program started from now on reads its wall clock as real time plus clock's offset."""
    assert os.path.exists(LIBFAKETIME), f"{LIBFAKETIME} is missing: apt install faketime (make deps)"
    clock.write_text("+0d\n")
    monkeypatch.setenv("LD_PRELOAD", LIBFAKETIME)
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(clock))
    monkeypatch.setenv("FAKETIME_CACHE_DURATION", "1")  # a new offset is seen within a second
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    monkeypatch.setenv("DONT_FAKE_MONOTONIC", "1")  # its name before libfaketime 0.9.8


def monitor_report(overlay, step):
    """thor-monitor --once --json, run now (at the simulated date)."""
    monitor = overlay.monitor("--once", "--json", run=f"monitor-{step}")
    if monitor.exited(30) != 0:
        return None
    return json.loads(monitor.stdout())


def healthy(overlay, step, why):
    """The report when every member is in the status and nothing in the PKI expires within a week;
    else None, and what is wrong in why[0]."""
    report = monitor_report(overlay, step)
    if report is None:
        why[:] = ["thor-monitor failed"]
        return None
    missing = EVERYONE - set(report["members"])
    expiring = [(row["name"], row["days_left"]) for row in report["pki"] if row["days_left"] <= 7]
    if missing or expiring:
        why[:] = [f"missing {sorted(missing)}, expiring {expiring}"]
        return None
    return report


def test_a_network_lives_800_days_renewing_its_crl_and_certificates_and_takes_reconnects(tmp_path, monkeypatch):
    use_faketime(monkeypatch, tmp_path / "clock")
    start = datetime.now(UTC)
    # Steps of 45 days; certificates of 150 days renewed when 61 are left, a CRL of 60 days
    # renewed at every step: the 810 days see 6 certificate generations and 18 CRLs.
    pki = ScratchPKI(tmp_path / "ca", certificate_days=150)
    overlay = Overlay(tmp_path, pki, tls_settings=TLS_SETTINGS)
    try:
        overlay.start_eventservers(2)
        overlay.manager("manager1")
        for index, name in enumerate(NODES):
            overlay.node(name, roles.SIP_PROXY, f"127.0.0.{21 + index}")
        overlay.wait_started()
        why = [""]
        wait_for(lambda: healthy(overlay, "start", why), 60, interval=0.5, message="the network formed")
        generations = set()
        for step in range(1, STEPS + 1):
            # The daily job where the CA lives, on the last simulated day before the next step.
            today = start + timedelta(days=STEP_DAYS * (step - 1))
            pki.ca.renew_crl(days=60, now=today)
            # 61: a certificate issued on day 0 is renewed on day 90 (its 150 days end a few seconds
            # after day 150, the test having started a few seconds before it was issued).
            for record in pki.ca.renew(timedelta(days=61), days=150, now=today):
                generations.add((record.name, record.serial))
            (tmp_path / "clock").write_text(f"+{STEP_DAYS * step}d\n")
            if step % 6 == 0:  # an event server restarted: every member reconnects to it
                index = (step // 6) % 2
                old = overlay.eventservers[index]
                old.stop()
                restarted = overlay.eventserver(old.name, old.address, old.port)
                overlay.eventservers.remove(restarted)
                overlay.eventservers[index] = restarted
                restarted.wait_ready()
            began = time.monotonic()
            why[:] = ["healthy at once"]
            try:
                report = wait_for(lambda step=step: healthy(overlay, step, why), 60, interval=0.5)
            except AssertionError as error:
                raise AssertionError(f"day {STEP_DAYS * step}: {error}; {why[0]}") from None
            print(f"day {STEP_DAYS * step}: healthy after {time.monotonic() - began:.1f} s {why}")
        # The last report: every member and every certificate it shows, 810 days on.
        assert set(report["members"]) >= EVERYONE
        assert len({name for name, _ in generations}) >= len(EVERYONE) + 1  # the monitor's too
        assert len(generations) >= 5 * len(EVERYONE)
        for program in overlay.programs.values():
            assert "CRL has expired" not in program.log() and "certificate has expired" not in program.log()
    finally:
        overlay.close()


def test_a_renewed_certificate_is_taken_up_without_a_restart_and_the_member_stays_listed(tmp_path):
    pki = ScratchPKI(tmp_path / "ca", certificate_days=100)
    overlay = Overlay(tmp_path, pki, tls_settings=TLS_SETTINGS)
    try:
        overlay.start_eventservers(2)
        overlay.manager("manager1")
        node = overlay.node("node1", roles.SIP_PROXY, "127.0.0.21")
        overlay.wait_started()
        observer = overlay.observer()
        wait_for(lambda: "node1" in members(observer.status.status), 20, message="node1 listed")
        pid = node.pid
        renewed = {record.name for record in pki.ca.renew(timedelta(days=200), days=730)}
        assert renewed >= {"es1", "es2", "manager1", "node1"}
        absent = []

        def watch():
            while True:
                if "node1" not in members(observer.status.status):
                    absent.append(time.monotonic())
                gevent.sleep(0.01)

        watcher = gevent.spawn(watch)

        def moved_to_the_new_certificate():
            log = node.log()
            marker = "with the renewed certificate"
            return log.count(marker) >= 2 and "connected to" in log[log.rindex(marker) :]

        wait_for(moved_to_the_new_certificate, 30, message="node1 reconnected to both servers with its new certificate")
        assert node.pid == pid and node.process.poll() is None
        report = overlay.monitor("--once", "--json")
        assert report.exited(30) == 0, report.log()
        days_left = {row["name"]: row["days_left"] for row in json.loads(report.stdout())["pki"]}
        # Every server sees node1's new certificate (the report gives the soonest over its connections).
        assert days_left["node1"] > 700, days_left
        watcher.kill()
        assert absent == [], f"node1 left the network status {len(absent)} times"
    finally:
        overlay.close()


def test_a_ca_rollover_moves_every_program_to_the_new_ca_and_no_member_leaves_the_status(tmp_path):
    pki = ScratchPKI(tmp_path / "ca")
    overlay = Overlay(tmp_path, pki, tls_settings=TLS_SETTINGS)
    try:
        overlay.start_eventservers(2)
        overlay.manager("manager1")
        overlay.node("node1", roles.SIP_PROXY, "127.0.0.21")
        overlay.wait_started()
        observer = overlay.observer()
        observer.client.contexts.watch(TLS_SETTINGS["crl_check_interval"])
        listed = {"es1", "es2", "manager1", "node1"}
        wait_for(lambda: members(observer.status.status) >= listed, 20, message="everyone listed")
        programs = [*overlay.eventservers, *overlay.programs.values()]
        absent = []

        def watch():
            while True:
                missing = listed - members(observer.status.status)
                if missing:
                    absent.append(missing)
                gevent.sleep(0.01)

        watcher = gevent.spawn(watch)

        def reloaded(text):
            wait_for(lambda: all(text in program.log() for program in programs), 20, message=f"{text!r} everywhere")

        # Begin: every program trusts both CAs.
        pki.ca.rollover_begin()
        number = crl_number(pki)
        reloaded(f"TLS files reloaded (2 trusted CAs, CRL number {number} ")
        new_ca = common_name(pki.ca.trusted()[1])
        # What playbooks/ca-rollover.yml waits on before it retires the old CA: nobody is there yet.
        early = overlay.monitor("--once", "--issuer", new_ca, "--wait", "1", run="monitor-early")
        assert early.exited(30) == 4, early.log()
        assert f"node1: certificate of SIP Thor provider CA, not of {new_ca}" in early.stdout()
        # Switch: every certificate re-issued by the new CA; each member moves its links over.
        old_certificate = tmp_path / "node1-old.crt"
        shutil.copyfile(pki.ca.certificate_path("node1"), old_certificate)
        pki.ca.rollover_switch()
        renewed = {record.name for record in pki.ca.renew(timedelta(days=1))}
        assert renewed >= listed | {"observer", "monitor1"}
        # Started before the members move, as playbooks/ca-rollover.yml starts it: it waits until
        # the connections it was told of at first have given way to new ones.
        moved_over = overlay.monitor("--once", "--issuer", new_ca, "--wait", "30", run="monitor-moved")
        clients = [program for program in overlay.programs.values() if program is not moved_over]

        def moved(program):
            log = program.log()
            marker = "with the renewed certificate"
            return log.count(marker) >= 2 and "connected to" in log[log.rindex(marker) :]

        wait_for(lambda: all(map(moved, clients)), 30, message="every member on its new certificate")
        links = observer.client.links.values()
        serial = observer.client.contexts.certificate_serial

        def observer_moved():
            return all(link.connected and link.certificate_serial == serial for link in links)

        wait_for(observer_moved, 30, message="the observer on its new certificate")
        assert moved_over.exited(40) == 0, moved_over.log()
        # Finish: the old CA retired. Every link holds certificates of the new CA on both ends.
        pki.ca.rollover_finish()
        reloaded(f"TLS files reloaded (1 trusted CA, CRL number {crl_number(pki)} ")
        wait_for(
            lambda: all(link.connected and link.server_identity.issuer == new_ca for link in links),
            30,
            message="the observer's links on servers certified by the new CA",
        )
        report = overlay.monitor("--once", "--json")
        assert report.exited(30) == 0, report.log()
        assert set(json.loads(report.stdout())["members"]) >= listed
        watcher.kill()
        assert absent == [], f"members left the network status: {absent[:5]}"
        # A certificate of the retired CA is refused now.
        files = dict(pki.files("node1"), certificate=str(old_certificate))
        server = overlay.eventservers[0]
        refusals = server.log().count("refused")
        try:  # under TLS 1.3 the server checks the client's certificate after the client is done
            tls_socket, _ = connect(server.endpoint, TLSContexts(**files), timeout=5)
            tls_socket.settimeout(5)
            try:
                data = tls_socket.recv(1)
            except OSError:  # the server's alert
                data = b""
            assert data == b"", "the server kept a connection certified by the retired CA"
        except TLSError as error:
            assert "TLS handshake failed" in str(error)
        wait_for(lambda: server.log().count("refused") > refusals, 10, message="the refusal logged")
        assert "unable to get local issuer certificate" in server.log()
        for program in programs:
            assert "TLS reload failed" not in program.log(), program.log()
    finally:
        overlay.close()


def crl_number(pki):
    return pki.ca.crls()[0].extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_the_rollover_gate_sees_an_event_server_that_takes_its_new_certificate_after_the_gate_started(tmp_path):
    """What playbooks/ca-rollover.yml waits on before it retires the old CA (thor-monitor --once
    --issuer) started as soon as the rollout had installed the renewed certificates, before the
    event servers had reloaded theirs: it knew each server by the certificate of its first
    handshake and waited out its 300 s (molecule, CI). Now it connects again to a server that
    presented another CA's certificate, and passes once the server has taken the new one up."""
    pki = ScratchPKI(tmp_path / "ca")
    # The programs reload their files on SIGHUP only: the test decides who has the new certificate.
    overlay = Overlay(tmp_path, pki, tls_settings={"crl_check_interval": 3600})
    try:
        overlay.start_eventservers(1)
        overlay.manager("manager1")
        overlay.node("node1", roles.SIP_PROXY, "127.0.0.21")
        overlay.wait_started()
        member_programs = list(overlay.programs.values())
        everyone = [*overlay.eventservers, *member_programs]

        def reload(programs, text):
            for program in programs:
                program.signal(signal.SIGHUP)
            wait_for(lambda: all(program.log().count(text) for program in programs), 20, message=text)

        pki.ca.rollover_begin()
        reload(everyone, "TLS files reloaded (2 trusted CAs")
        new_ca = common_name(pki.ca.trusted()[1])
        pki.ca.rollover_switch()
        pki.ca.renew(timedelta(days=1))
        reload(member_programs, "with the renewed certificate")
        gate = overlay.monitor("--once", "--issuer", new_ca, "--wait", "30", run="gate")
        gate.wait_log("connected to es1", 20)
        # The event server takes its renewed certificate up only now.
        overlay.eventservers[0].signal(signal.SIGHUP)
        assert gate.exited(40) == 0, gate.stdout() + gate.log()
    finally:
        overlay.close()
