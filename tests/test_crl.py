"""The CRL: never replaced by an older one, and spread to every member over the bus."""

import logging
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from thor import roles
from thor.loopback.network import Overlay, members
from thor.loopback.process import wait_for
from thor.monitor.report import pki_problems, pki_rows
from thor.transport.crl import CRLError, RevocationList
from thor.transport.tls import TLSContexts


def crl_bytes(pki):
    with open(pki.ca.crl_path, "rb") as stream:
        return stream.read()


def publish_crl(pki, tmp_path, servers):
    config = tmp_path / "pki.ini"
    config.write_text("[PKI]\n")
    command = [sys.executable, "-m", "thor.cli.pki", "--config", str(config), "--dir", pki.directory]
    return subprocess.run(
        [*command, "publish-crl", "--servers", servers, "--timeout", "20"], capture_output=True, text=True, timeout=60
    )


def contexts_with_learning(pki, tmp_path, name="node1"):
    files = pki.issue(name, "sip_proxy")
    crl = tmp_path / f"{name}.crl.pem"
    shutil.copyfile(files["crl"], crl)
    return TLSContexts(**dict(files, crl=str(crl)), learned_crl=str(tmp_path / f"{name}.learned.pem"))


def test_a_crl_supersedes_another_by_its_number_and_only_when_signed_by_the_ca(pki, other_pki):
    ca = pki.contexts("node0").ca_certificate
    first = RevocationList(crl_bytes(pki), ca)
    pki.ca.renew_crl()
    second = RevocationList(crl_bytes(pki), ca)
    assert second.number == first.number + 1
    assert second.supersedes(first) and not first.supersedes(second) and not first.supersedes(first)
    assert first.supersedes(None)
    with pytest.raises(CRLError, match="is not signed by the CA"):
        RevocationList(crl_bytes(other_pki), ca)
    with pytest.raises(CRLError, match="is not a PEM CRL"):
        RevocationList("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", ca)


def test_a_member_takes_a_newer_crl_keeps_it_across_restarts_and_refuses_an_older_one(pki, tmp_path, caplog):
    contexts = contexts_with_learning(pki, tmp_path)
    old = crl_bytes(pki)
    pki.issue("node2", "sip_proxy")  # serials to revoke
    pki.ca.revoke("node2")
    new = crl_bytes(pki)
    assert contexts.offer_crl(new.decode()) is True
    assert contexts.revocation_list.pem == new
    assert pki.ca.records()[-1].serial in contexts.revoked_serials
    assert contexts.offer_crl(old.decode()) is False  # replayed: would un-revoke node2
    assert contexts.offer_crl(new.decode()) is False  # held already
    assert contexts.offer_crl("garbage") is False
    assert contexts.revocation_list.pem == new
    # A restart reads the configured file (still the old CRL) and the learned one: the newest wins.
    again = TLSContexts(*contexts.files, learned_crl=contexts.learned_crl)
    assert again.revocation_list.pem == new
    # The configured file replaced by an older CRL than the one in use: refused, the previous kept.
    pki.ca.renew_crl()
    newest = crl_bytes(pki)
    with open(contexts.crl, "wb") as stream:
        stream.write(newest)
    assert contexts.reload() is True and contexts.revocation_list.pem == newest
    with open(contexts.learned_crl, "wb") as stream:
        stream.write(old)
    with open(contexts.crl, "wb") as stream:
        stream.write(new)
    with caplog.at_level(logging.ERROR, "thor.tls"):
        assert contexts.reload() is False
    assert contexts.revocation_list.pem == newest
    assert any("older than the CRL number" in record.getMessage() for record in caplog.records)


def test_a_member_without_a_place_to_keep_crls_takes_none(pki):
    contexts = pki.contexts("node1")
    pki.ca.renew_crl()
    assert contexts.offer_crl(crl_bytes(pki).decode()) is False


def test_a_crl_put_on_one_host_reaches_every_member_and_cuts_the_revoked_one_off(pki, tmp_path):
    overlay = Overlay(tmp_path, pki, own_crl=True)
    try:
        overlay.start_eventservers(2)
        overlay.manager("manager1")
        overlay.node("node1", roles.SIP_PROXY, "127.0.0.21")
        overlay.node("node2", roles.SIP_PROXY, "127.0.0.22")
        overlay.node("node3", roles.SIP_PROXY, "127.0.0.23")
        observer = overlay.observer()
        listed = {"node1", "node2", "node3"}
        wait_for(lambda: listed <= members(observer.status.status), 20, message="the nodes listed")
        old = crl_bytes(pki)
        pki.ca.revoke("node2", reason="key_compromise")
        new = RevocationList(crl_bytes(pki), observer.client.contexts.ca_certificate)
        # The operator puts the new CRL on node1's host only; nobody copies it anywhere else.
        shutil.copyfile(pki.ca.crl_path, tmp_path / "node1.crl.pem")
        # Every program but node2, which is cut off.
        learned = {name: tmp_path / f"{name}.learned-crl.pem" for name in ("es1", "es2", "manager1", "node3")}

        def holding_the_new_crl():
            return all(path.exists() and path.read_bytes() == new.pem for path in learned.values())

        wait_for(holding_the_new_crl, 30, message="every program holding the new CRL")
        wait_for(lambda: "node2" not in members(observer.status.status), 30, message="node2 gone")
        for server in overlay.eventservers:
            server.wait_log("its certificate was revoked", 10)  # node2's live connection, cut
            server.wait_log("certificate revoked", 10)  # node2 coming back, refused
        # A replayed older CRL on a host: refused there; node2 stays out.
        with open(tmp_path / "node1.crl.pem", "wb") as stream:
            stream.write(old)
        overlay.programs["node1"].wait_log("older than the CRL number", 10)
        assert all(path.read_bytes() == new.pem for path in learned.values())
        assert "node2" not in members(observer.status.status)
    finally:
        overlay.close()


def test_thor_pki_publish_crl_hands_a_renewed_crl_to_the_network(pki, tmp_path):
    overlay = Overlay(tmp_path, pki, own_crl=True)
    try:
        overlay.start_eventservers(2)
        overlay.node("node1", roles.SIP_PROXY, "127.0.0.21")
        overlay.programs["node1"].wait_log("connected to", 20)
        pki.ca.renew_crl()  # the daily renewal where the CA lives
        renewed = crl_bytes(pki)
        servers = ",".join(f"{host}:{port}" for host, port in (s.endpoint for s in overlay.eventservers))
        result = publish_crl(pki, tmp_path, servers)
        assert result.returncode == 0, result.stderr
        assert "handed to 2 event servers" in result.stdout
        for name in ("es1", "es2", "node1"):
            learned = tmp_path / f"{name}.learned-crl.pem"
            wait_for(lambda learned=learned: learned.exists() and learned.read_bytes() == renewed, 10, message=name)
        # Offering what the servers hold already changes nothing and says so.
        again = publish_crl(pki, tmp_path, servers)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("holds it") == 2
    finally:
        overlay.close()


def test_what_expires_within_a_week_is_logged_and_what_expired_is_an_error(pki, caplog):
    contexts = pki.contexts("node1")
    caplog.clear()
    crl_end = contexts.revocation_list.next_update  # 30 days ahead; the certificate 730, the CA 3650
    with caplog.at_level(logging.WARNING, "thor.tls"):
        contexts.check_expiry(now=crl_end - timedelta(days=3))
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "in 3.0 days; run 'thor-pki crl' and 'thor-pki publish-crl'" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, "thor.tls"):
        contexts.check_expiry(now=contexts.certificate_expiry + timedelta(hours=1))
    levels = {record.levelno for record in caplog.records}
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert levels == {logging.ERROR}
    assert (
        "this node's certificate" in text
        and "expired at" in text
        and "'thor-pki renew' and playbooks/renew.yml where the CA is" in text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, "thor.tls"):
        contexts.check_expiry(now=crl_end - timedelta(days=8))
    assert caplog.records == []


def test_the_pki_report_lists_the_soonest_first_and_names_what_to_run():
    now = 1_800_000_000.0
    day = 86400
    rows = pki_rows(
        datetime.fromtimestamp(now + 3000 * day, UTC),
        datetime.fromtimestamp(now + 5 * day, UTC),
        {"node1": now - day, "node2": now + 700 * day},
        now=now,
    )
    assert [(row["what"], row["name"], row["days_left"]) for row in rows] == [
        ("certificate", "node1", -1.0),
        ("crl", "the CRL", 5.0),
        ("certificate", "node2", 700.0),
        ("ca", "the CA certificate", 3000.0),
    ]
    assert pki_problems(rows, 7) == [
        "the certificate of node1 has expired: a new certificate for it"
        " ('thor-pki renew' and playbooks/renew.yml where the CA is)",
        "the CRL expires in 5.0 days: 'thor-pki crl' and 'thor-pki publish-crl' where the CA is",
    ]
    assert pki_problems(rows, 4) == pki_problems(rows, 7)[:1]
