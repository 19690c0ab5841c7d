import io
import json
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from thor.cli.pki import main as pki_main
from thor.identity import ROLE_URI_PREFIX, Identity
from thor.loopback.process import python_command
from thor.pki import CertificateAuthority, PKIError
from thor.transport.crl import CRLError, RevocationList
from thor.transport.tls import TLSContexts
from thor.x509compat import common_name, crl_next_update, load_pem_certificates, not_valid_after, pem_blocks

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_certificate(path):
    with open(path, "rb") as stream:
        return x509.load_pem_x509_certificate(stream.read())


def load_crl(path):
    with open(path, "rb") as stream:
        return x509.load_pem_x509_crl(stream.read())


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_round_trip_init_issue_list_revoke_renew(tmp_path):
    directory = tmp_path / "ca"
    ca = CertificateAuthority.init(directory)
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert len(list(load_crl(ca.crl_path))) == 0

    record = ca.issue("node1.example.com", "sip_proxy,media_relay", address="10.0.0.5")
    assert record.roles == ("media_relay", "sip_proxy")
    assert mode(ca.key_path("node1.example.com")) == 0o600

    certificate = load_certificate(ca.certificate_path("node1.example.com"))
    assert certificate.subject.rfc4514_string() == "CN=node1.example.com"
    assert certificate.serial_number == record.serial
    alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.UniformResourceIdentifier) == [
        ROLE_URI_PREFIX + "media_relay",
        ROLE_URI_PREFIX + "sip_proxy",
    ]
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    # The certificate's signature is the CA's.
    ca_certificate = load_certificate(ca.ca_certificate_path)
    ca_certificate.public_key().verify(
        certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(certificate.signature_hash_algorithm)
    )
    identity = Identity.load(ca.certificate_path("node1.example.com"))
    assert identity.name == "node1.example.com"
    assert identity.roles == {"sip_proxy", "media_relay"}
    assert identity.addresses == ("10.0.0.5",)

    ca.issue("node2.example.com", ["xcap_server"])
    assert [(r.name, r.status()) for r in ca.records()] == [
        ("node1.example.com", "valid"),
        ("node2.example.com", "valid"),
    ]

    (revoked,) = ca.revoke("node1.example.com", reason="key_compromise")
    crl = load_crl(ca.crl_path)
    assert crl.is_signature_valid(ca_certificate.public_key())
    assert [entry.serial_number for entry in crl] == [revoked.serial]
    assert (
        crl.get_revoked_certificate_by_serial_number(revoked.serial)
        .extensions.get_extension_for_class(x509.CRLReason)
        .value.reason
        == x509.ReasonFlags.key_compromise
    )
    assert [(r.name, r.status()) for r in ca.records()] == [
        ("node1.example.com", "revoked"),
        ("node2.example.com", "valid"),
    ]

    # A revoked name can be issued again; the CRL keeps the old serial.
    again = ca.issue("node1.example.com", "sip_proxy")
    assert again.serial != revoked.serial

    # CRL renewal: a later next-update, a higher CRL number, the same revoked serials.
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    later = datetime.now(UTC) + timedelta(days=1)
    ca.renew_crl(days=60, now=later)
    renewed = load_crl(ca.crl_path)
    assert crl_next_update(renewed) > crl_next_update(crl) + timedelta(days=29)
    assert renewed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert [entry.serial_number for entry in renewed] == [revoked.serial]


def test_duplicate_name_needs_replace(pki):
    first = pki.ca.issue("node1", "sip_proxy")
    with pytest.raises(
        PKIError, match="a certificate for node1 exists already .* revoke it first or issue with --replace"
    ):
        pki.ca.issue("node1", "sip_proxy")
    second = pki.ca.issue("node1", "sip_proxy,xcap_server", replace=True)
    statuses = {r.serial: r.status() for r in pki.ca.records()}
    assert statuses == {first.serial: "revoked", second.serial: "valid"}
    assert [entry.serial_number for entry in pki.ca.crls()[0]] == [first.serial]


@pytest.mark.parametrize(
    ("name", "roles", "address", "message"),
    [
        ("node1", "sip_proxi", None, "unknown role 'sip_proxi'"),
        ("node1", "", None, "no role given"),
        ("node1", "Sip-Proxy", None, "invalid role name"),
        ("Node_1", "sip_proxy", None, "invalid node name 'Node_1'"),
        ("../etc", "sip_proxy", None, "invalid node name"),
        ("node1", "sip_proxy", "10.0.0.300", "invalid address '10.0.0.300'"),
    ],
)
def test_issue_refuses_bad_input(pki, name, roles, address, message):
    with pytest.raises(PKIError, match=message):
        pki.ca.issue(name, roles, address=address)
    assert pki.ca.records() == []


def test_third_party_roles_are_declared(tmp_path):
    CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match="unknown role 'conference_server'"):
        CertificateAuthority(tmp_path / "ca").issue("node1", "conference_server")
    ca = CertificateAuthority(tmp_path / "ca", extra_roles=["conference_server"])
    assert ca.issue("node1", "conference_server").roles == ("conference_server",)


def test_expired_ca_is_refused(tmp_path):
    past = datetime.now(UTC) - timedelta(days=30)
    ca = CertificateAuthority.init(tmp_path / "ca", days=10, now=past)
    with pytest.raises(PKIError, match="the CA certificate expired on .*create a new CA"):
        ca.issue("node1", "sip_proxy")
    with pytest.raises(PKIError, match="expired"):
        ca.renew_crl()


def test_node_certificate_never_outlives_the_ca(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca", days=100)
    ca.issue("node1", "sip_proxy", days=1000)
    node = load_certificate(ca.certificate_path("node1"))
    assert not_valid_after(node) == not_valid_after(load_certificate(ca.ca_certificate_path))


def test_init_refuses_to_overwrite_and_open_needs_a_ca(tmp_path):
    CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match="a CA exists already"):
        CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match="no CA here"):
        CertificateAuthority(tmp_path / "elsewhere")


def test_revoke_unknown_name(pki):
    with pytest.raises(PKIError, match="nobody has no certificate to revoke .no certificate was ever issued"):
        pki.ca.revoke("nobody")


def test_cli_round_trip(tmp_path, capsys):
    directory = str(tmp_path / "ca")
    assert pki_main(["--dir", directory, "init"]) == 0
    assert pki_main(["--dir", directory, "issue", "es1", "--roles", "thor_eventserver,thor_manager"]) == 0
    assert pki_main(["--dir", directory, "issue", "node1", "--roles", "sip_proxy", "--address", "127.0.0.2"]) == 0
    assert pki_main(["--dir", directory, "revoke", "node1", "--reason", "key_compromise"]) == 0
    assert pki_main(["--dir", directory, "crl", "--days", "7"]) == 0
    capsys.readouterr()
    assert pki_main(["--dir", directory, "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["roles"], c["status"]) for c in listing["certificates"]] == [
        ("es1", ["thor_eventserver", "thor_manager"], "valid"),
        ("node1", ["sip_proxy"], "revoked"),
    ]
    next_update = datetime.fromisoformat(listing["crl_next_update"])
    assert timedelta(days=6) < next_update - datetime.now(UTC) <= timedelta(days=7)
    assert pki_main(["--dir", directory, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "ROLES", "SERIAL", "EXPIRES", "STATUS"]
    assert table[2].split()[0] == "node1" and table[2].split()[-1] == "revoked"


def test_cli_reads_pki_section_and_reports_errors_in_one_line(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text(f"[PKI]\ndirectory = {tmp_path / 'ca'}\nextra_roles = conference_server\ncrl_days = 3\n")
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(*args):
        return subprocess.run(
            python_command("thor.cli.pki", "--config", str(config), *args),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    assert run("init").returncode == 0
    assert run("issue", "conf1", "--roles", "conference_server").returncode == 0
    duplicate = run("issue", "conf1", "--roles", "conference_server")
    assert duplicate.returncode == 1
    assert duplicate.stderr.startswith("thor-pki: error: a certificate for conf1 exists already")
    assert duplicate.stderr.count("\n") == 1
    crl = CertificateAuthority(tmp_path / "ca").crls()[0]
    assert crl_next_update(crl) - datetime.now(UTC) <= timedelta(days=3)

    config.write_text("[PKI]\ncrl_days = soon\n")
    bad = run("list")
    assert bad.returncode == 1
    assert bad.stderr == f"thor-pki: error: {config}: [PKI] crl_days = 'soon': expected an integer from 1 to 3650\n"


def test_generated_material_is_ignored_by_git():
    ignored = subprocess.run(
        ["git", "check-ignore", "pki/ca.key", "pki/mynetwork/nodes/node1.key", "pki/README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == ["pki/ca.key", "pki/mynetwork/nodes/node1.key"]


def make_request(name, key=None, curve=None):
    """A CSR for name as a host makes it: (its private key, the PEM request)."""
    key = key or ec.generate_private_key(curve or ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        # What the CSR asks for besides its key never counts: the inventory decides.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ROLE_URI_PREFIX + "thor_manager")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, request.public_bytes(serialization.Encoding.PEM)


def public_der(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_sign_certifies_the_hosts_key_with_the_given_roles_and_keeps_no_key(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    key, request = make_request("node1")
    record, issued = ca.sign("node1", request, "sip_proxy", address="10.0.0.5")
    assert issued
    assert not os.path.exists(ca.key_path("node1"))
    certificate = load_certificate(ca.certificate_path("node1"))
    assert public_der(certificate.public_key()) == public_der(key.public_key())
    identity = Identity.load(ca.certificate_path("node1"))
    assert (identity.name, identity.roles, identity.addresses) == ("node1", {"sip_proxy"}, ("10.0.0.5",))

    # The same key, roles and address again: nothing issued (rollouts run this every time).
    _, again = make_request("node1", key=key)
    unchanged, issued = ca.sign("node1", again, ["sip_proxy"], address="10.0.0.5")
    assert not issued and unchanged.serial == record.serial
    assert [r.status() for r in ca.records()] == ["valid"]

    # New roles, or a new key (the host lost it): a new certificate, the old one superseded.
    second, issued = ca.sign("node1", again, "sip_proxy,media_relay", address="10.0.0.5")
    assert issued and second.roles == ("media_relay", "sip_proxy")
    _, other = make_request("node1")
    third, issued = ca.sign("node1", other, "sip_proxy,media_relay", address="10.0.0.5")
    assert issued
    assert [(r.serial, r.status()) for r in ca.records()] == [
        (record.serial, "revoked"),
        (second.serial, "revoked"),
        (third.serial, "valid"),
    ]
    assert {entry.serial_number for entry in load_crl(ca.crl_path)} == {record.serial, second.serial}


def test_sign_after_issue_drops_the_key_the_ca_made(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("node1", "sip_proxy")
    assert os.path.exists(ca.key_path("node1"))
    _, request = make_request("node1")
    assert ca.sign("node1", request, "sip_proxy")[1]
    assert not os.path.exists(ca.key_path("node1"))


@pytest.mark.parametrize(
    ("request_pem", "message"),
    [
        (b"hello", "not a PEM certificate signing request"),
        (make_request("node2")[1], "the certificate signing request is for 'node2', not 'node1'"),
        (make_request("node1", curve=ec.SECP192R1())[1], "key is not accepted: use EC secp256r1 or secp384r1"),
    ],
)
def test_sign_refuses_bad_requests(tmp_path, request_pem, message):
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match=message):
        ca.sign("node1", request_pem, "sip_proxy")
    assert ca.records() == []


def test_sign_refuses_a_request_whose_signature_does_not_verify(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    _, request = make_request("node1")
    der = bytearray(x509.load_pem_x509_csr(request).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PKIError, match="signature does not verify"):
        ca.sign("node1", tampered, "sip_proxy")


def test_renew_reissues_what_expires_soon_for_the_same_key_and_keeps_the_old_one_valid(tmp_path):
    start = datetime.now(UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", now=start)
    key, request = make_request("node1")
    first, _ = ca.sign("node1", request, "sip_proxy", address="10.0.0.5", days=100, now=start)
    ca.issue("es1", "thor_eventserver", days=400, now=start)
    ca.revoke("es1", now=start)
    ca.issue("es2", "thor_eventserver", days=400, now=start)

    assert ca.renew(timedelta(days=30), now=start + timedelta(days=60)) == []
    later = start + timedelta(days=75)
    (renewed,) = ca.renew(timedelta(days=30), days=100, now=later)
    assert (renewed.name, renewed.roles, renewed.address) == ("node1", ("sip_proxy",), "10.0.0.5")
    assert renewed.not_after - later == timedelta(days=100)
    certificate = load_certificate(ca.certificate_path("node1"))
    assert certificate.serial_number == renewed.serial
    assert public_der(certificate.public_key()) == public_der(key.public_key())
    statuses = {r.serial: r.status(later) for r in ca.records() if r.name == "node1"}
    assert statuses == {first.serial: "valid", renewed.serial: "valid"}
    assert {entry.serial_number for entry in load_crl(ca.crl_path)} == {ca.records()[1].serial}
    # Renewed once: the next run finds nothing to do.
    assert ca.renew(timedelta(days=30), now=later) == []


def test_cli_sign_and_renew(tmp_path, capsys, monkeypatch):
    directory = str(tmp_path / "ca")
    assert pki_main(["--dir", directory, "init"]) == 0
    capsys.readouterr()
    request_file = tmp_path / "node1.csr"
    request_file.write_bytes(make_request("node1")[1])
    arguments = ["--dir", directory, "sign", "node1", "--csr", str(request_file), "--roles", "sip_proxy"]
    assert pki_main(arguments) == 0
    assert capsys.readouterr().out.startswith("issued node1 ")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(request_file.read_bytes())))
    assert pki_main([*arguments[:5], "-", *arguments[6:]]) == 0
    assert capsys.readouterr().out.startswith("unchanged node1 ")
    assert pki_main(["--dir", directory, "renew"]) == 0
    assert capsys.readouterr().out == "no certificate expires within 30 days\n"
    assert pki_main(["--dir", directory, "renew", "--within", "800"]) == 0
    assert capsys.readouterr().out.startswith("renewed node1 (serial ")
    assert pki_main(["--dir", directory, "renew", "--within", "0"]) == 1
    assert "--within must be at least 1" in capsys.readouterr().err


def test_renew_stops_where_the_ca_expires(tmp_path):
    start = datetime.now(UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", days=100, now=start)
    record = ca.issue("node1", "sip_proxy", now=start)  # 730 days asked, 100 given: the CA's end
    assert record.not_after == not_valid_after(load_certificate(ca.ca_certificate_path))
    assert ca.renew(timedelta(days=30), now=start + timedelta(days=80)) == []


def issuers(path):
    """The common names of the CAs in a CA file, or of the issuers of the CRLs in a CRL file."""
    with open(path, "rb") as stream:
        data = stream.read()
    blocks = pem_blocks(data, "CERTIFICATE")
    if blocks:
        return [common_name(load_pem_certificates(block)[0]) for block in blocks]
    return [
        x509.load_pem_x509_crl(block).issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        for block in pem_blocks(data, "X509 CRL")
    ]


def test_a_ca_rollover_trusts_the_new_ca_then_signs_with_it_then_retires_the_old_one(tmp_path):
    start = datetime(2026, 12, 3, tzinfo=UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", now=start)
    key, request = make_request("node1")
    first, _ = ca.sign("node1", request, "sip_proxy", address="10.0.0.5", now=start)
    ca.issue("es1", "thor_eventserver", now=start)
    ca.issue("gone", "sip_proxy", now=start)
    ca.revoke("gone", now=start)
    assert ca.rollover_state() == "none"

    # Begin: both CAs trusted, a CRL of each with one number; the old CA still signs.
    ca.rollover_begin(now=start)
    new_name = "SIP Thor provider CA 2026-12-03"
    assert issuers(ca.ca_certificate_path) == ["SIP Thor provider CA", new_name]
    assert sorted(issuers(ca.crl_path)) == sorted(["SIP Thor provider CA", new_name])
    assert len({crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in ca.crls()}) == 1
    unchanged, issued = ca.sign("node1", request, "sip_proxy", address="10.0.0.5", now=start)
    assert (unchanged.serial, issued) == (first.serial, False)
    assert ca.renew(timedelta(days=30), now=start) == []
    TLSContexts(ca.ca_certificate_path, ca.certificate_path("es1"), ca.key_path("es1"), ca.crl_path)
    with pytest.raises(PKIError, match="a rollover has begun"):
        ca.rollover_begin(now=start)

    # Switch: the new CA signs; renew() re-issues every current certificate for its key.
    ca.rollover_switch(now=start)
    assert ca.rollover_state() == "switched"
    assert issuers(ca.ca_certificate_path) == [new_name, "SIP Thor provider CA"]
    with pytest.raises(PKIError, match="the old CA issued the current certificates of es1, node1"):
        ca.rollover_finish(now=start)
    renewed = {record.name: record for record in ca.renew(timedelta(days=30), now=start)}
    assert set(renewed) == {"es1", "node1"}
    certificate = load_certificate(ca.certificate_path("node1"))
    assert common_name_of_issuer(certificate) == new_name
    assert public_der(certificate.public_key()) == public_der(key.public_key())
    assert ca.sign("node1", request, "sip_proxy", address="10.0.0.5", now=start)[1] is False
    # A revocation now reaches the CRL of the CA that issued each certificate.
    ca.revoke("node1", now=start)
    revoked = {
        crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value: {entry.serial_number for entry in crl}
        for crl in ca.crls()
    }
    gone = next(record.serial for record in ca.records() if record.name == "gone")
    assert revoked == {"SIP Thor provider CA": {gone, first.serial}, new_name: {renewed["node1"].serial}}

    # Finish: the new CA alone, the old key deleted, its certificate kept.
    old = ca.rollover_finish(now=start)
    assert ca.rollover_state() == "none"
    assert issuers(ca.ca_certificate_path) == issuers(ca.crl_path) == [new_name]
    assert not os.path.exists(tmp_path / "ca" / "ca-previous.key")
    assert load_certificate(tmp_path / "ca" / "retired" / f"{old.serial_number:x}.crt") == old
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    with pytest.raises(PKIError, match="no rollover is under way"):
        ca.rollover_switch(now=start)
    # The next rollover names its CA after the first, with its own date.
    later = start + timedelta(days=400)
    assert common_name(ca.rollover_begin(now=later)) == "SIP Thor provider CA 2028-01-07"


def common_name_of_issuer(certificate):
    return certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_cli_rollover_says_what_to_do_next(tmp_path, capsys):
    directory = str(tmp_path / "ca")
    assert pki_main(["--dir", directory, "init"]) == 0
    assert pki_main(["--dir", directory, "issue", "node1", "--roles", "sip_proxy"]) == 0
    capsys.readouterr()
    assert pki_main(["--dir", directory, "rollover", "status"]) == 0
    assert capsys.readouterr().out.endswith("no CA rollover under way\n")
    assert pki_main(["--dir", directory, "rollover", "begin", "--name", "Provider CA 2"]) == 0
    out = capsys.readouterr().out
    assert "new CA CN=Provider CA 2 made" in out and "then 'thor-pki rollover switch'" in out
    assert pki_main(["--dir", directory, "rollover", "finish"]) == 1
    assert "cannot finish: a rollover has begun" in capsys.readouterr().err
    assert pki_main(["--dir", directory, "rollover", "switch"]) == 0
    assert "then 'thor-pki rollover finish'" in capsys.readouterr().out
    assert pki_main(["--dir", directory, "rollover", "finish"]) == 1
    assert "the old CA issued the current certificates of node1" in capsys.readouterr().err
    assert pki_main(["--dir", directory, "renew"]) == 0
    assert capsys.readouterr().out.startswith("renewed node1 ")
    assert pki_main(["--dir", directory, "rollover", "finish"]) == 0
    assert "CN=SIP Thor provider CA retired" in capsys.readouterr().out


def test_a_crl_file_must_cover_every_trusted_ca_and_may_carry_others(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    alone = (tmp_path / "ca" / "crl.pem").read_bytes()
    old_ca = load_certificate(ca.ca_certificate_path)
    new_ca = ca.rollover_begin()
    both = (tmp_path / "ca" / "crl.pem").read_bytes()
    with pytest.raises(CRLError, match="holds no CRL of the trusted CA CN=SIP Thor provider CA "):
        RevocationList(alone, [old_ca, new_ca])
    # Trusting the old CA only (a host not rolled out yet), the new CA's CRL is left aside.
    assert RevocationList(both, [old_ca]).supersedes(RevocationList(alone, [old_ca]))
    with pytest.raises(CRLError, match="holds 5 CRLs, more than 4"):
        RevocationList(both * 2 + alone, [old_ca])
    with pytest.raises(CRLError, match="holds two CRLs of"):
        RevocationList(both + alone, [old_ca, new_ca])
