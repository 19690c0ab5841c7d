"""thor-pki: the provider's certificate authority for SIP Thor nodes."""

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta

import gevent

from thor import __version__, roles
from thor.config import DEFAULT_CONFIG_PATH, EVENT_SERVER_PORT, ConfigError, ThorNetworkConfig, load_config
from thor.datatypes import EndpointList
from thor.events import topics
from thor.events.client import EventClient
from thor.pki import REVOCATION_REASONS, CertificateAuthority, PKIConfig, PKIError
from thor.transport.tls import TLSContexts, TLSError
from thor.x509compat import common_name, not_valid_after

EX_USAGE = 2
EX_FAILURE = 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="thor-pki",
        description="Create the provider CA, issue node certificates with their roles, revoke them, keep the CRL.",
    )
    parser.add_argument(
        "--config", metavar="PATH", help=f"configuration file, section [PKI] (default: {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument("--dir", metavar="DIR", help="CA directory (default: [PKI] directory)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the provider CA and an empty CRL")
    init.add_argument("--name", default="SIP Thor provider CA", help="the CA's common name")
    init.add_argument("--days", type=int, help="CA validity in days (default: [PKI] ca_days)")

    issue = commands.add_parser("issue", help="issue a node certificate and key")
    issue.add_argument("name", help="node name: the certificate's common name, a lowercase DNS name")
    issue.add_argument("--roles", required=True, help="comma separated roles the node may take")
    issue.add_argument("--address", help="the node's IP address, added to the certificate")
    issue.add_argument("--days", type=int, help="validity in days (default: [PKI] certificate_days)")
    issue.add_argument(
        "--replace", action="store_true", help="revoke the node's current certificate (superseded) and issue anew"
    )

    sign = commands.add_parser(
        "sign",
        help="certify the key of a CSR made on the node's host (unless its current certificate does already)",
    )
    sign.add_argument("name", help="node name: must be the CSR's common name")
    sign.add_argument("--csr", required=True, metavar="FILE", help="the PEM certificate signing request ('-': stdin)")
    sign.add_argument("--roles", required=True, help="comma separated roles the node may take (not the CSR's)")
    sign.add_argument("--address", help="the node's IP address, added to the certificate")
    sign.add_argument("--days", type=int, help="validity in days (default: [PKI] certificate_days)")

    renew = commands.add_parser(
        "renew", help="re-issue, for the same key, every certificate that expires soon (run it daily)"
    )
    renew.add_argument("--within", type=int, metavar="DAYS", help="expiring within DAYS (default: [PKI] renew_days)")
    renew.add_argument("--days", type=int, help="validity in days (default: [PKI] certificate_days)")

    revoke = commands.add_parser("revoke", help="revoke a node's certificates and re-issue the CRL")
    revoke.add_argument("name")
    revoke.add_argument("--reason", default="unspecified", choices=sorted(REVOCATION_REASONS))

    crl = commands.add_parser("crl", help="re-issue the CRL (do it before it expires)")
    crl.add_argument("--days", type=int, help="CRL validity in days (default: [PKI] crl_days)")
    crl.add_argument(
        "--within", type=int, metavar="DAYS", help="only when the CRL expires within DAYS (for a daily timer)"
    )

    publish = commands.add_parser(
        "publish-crl", help="hand the CRL to the event servers, which pass it on to every member"
    )
    publish.add_argument(
        "--servers", metavar="HOST:PORT,...", help="event servers (default: [ThorNetwork] of the configuration)"
    )
    publish.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the servers (30)")

    rollover = commands.add_parser(
        "rollover",
        help="replace the CA in three steps, each followed by a rollout (docs/pki.md)",
        description="begin: a new CA, trusted beside the current one; switch: the new CA signs "
        "(then 'renew' re-issues every certificate); finish: the old CA is retired. "
        "Install ca.crt, crl.pem and the certificates on every host after each step.",
    )
    rollover.add_argument("step", choices=("status", "begin", "switch", "finish"))
    rollover.add_argument("--name", help="begin: the new CA's common name (default: today's date added)")
    rollover.add_argument("--days", type=int, help="begin: the new CA's validity in days (default: [PKI] ca_days)")

    listing = commands.add_parser("list", help="list issued certificates")
    listing.add_argument("--json", action="store_true", help="machine readable output")
    return parser


def main(argv=None):
    options = build_parser().parse_args(argv)
    try:
        (config,) = load_config(options.config or DEFAULT_CONFIG_PATH, PKIConfig, required=options.config is not None)
        directory = options.dir or config.directory
        for option in ("days", "within"):
            if getattr(options, option, None) is not None and getattr(options, option) < 1:
                raise PKIError(f"--{option} must be at least 1")
        return COMMANDS[options.command](options, config, directory)
    except (ConfigError, PKIError) as error:
        print(f"thor-pki: error: {error}", file=sys.stderr)
        return EX_FAILURE
    except OSError as error:
        print(f"thor-pki: error: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return EX_FAILURE


def _open(config, directory):
    return CertificateAuthority(directory, extra_roles=config.extra_roles)


def command_init(options, config, directory):
    ca = CertificateAuthority.init(
        directory, common_name=options.name, days=options.days or config.ca_days, crl_days=config.crl_days
    )
    print(f"CA created in {ca.directory}")
    print(f"  certificate: {ca.ca_certificate_path}")
    print(f"  CRL:         {ca.crl_path} (valid until {ca.crl_expiry():%Y-%m-%d %H:%M} UTC)")
    return 0


def command_issue(options, config, directory):
    ca = _open(config, directory)
    record = ca.issue(
        options.name,
        options.roles,
        address=options.address,
        days=options.days or config.certificate_days,
        replace=options.replace,
    )
    _print_certificate(ca, "issued", record)
    print(f"  key:         {ca.key_path(record.name)}")
    return 0


def command_sign(options, config, directory):
    ca = _open(config, directory)
    if options.csr == "-":
        request = sys.stdin.buffer.read()
    else:
        with open(options.csr, "rb") as stream:
            request = stream.read()
    record, issued = ca.sign(
        options.name, request, options.roles, address=options.address, days=options.days or config.certificate_days
    )
    _print_certificate(ca, "issued" if issued else "unchanged", record)
    return 0


def _print_certificate(ca, state, record):
    print(f"{state} {record.name} (serial {record.serial:x}) roles {','.join(record.roles)}")
    print(f"  valid until: {record.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  certificate: {ca.certificate_path(record.name)}")


def command_renew(options, config, directory):
    ca = _open(config, directory)
    within = options.within or config.renew_days
    renewed = ca.renew(timedelta(days=within), days=options.days or config.certificate_days)
    for record in renewed:
        print(f"renewed {record.name} (serial {record.serial:x}) valid until {record.not_after:%Y-%m-%d %H:%M} UTC")
    if not renewed:
        print(f"no certificate expires within {within} days")
    return 0


def command_revoke(options, config, directory):
    ca = _open(config, directory)
    for record in ca.revoke(options.name, reason=options.reason):
        print(f"revoked {record.name} (serial {record.serial:x}, reason {record.reason})")
    print(f"CRL updated: {ca.crl_path}; copy it to every node (they reload it without restart)")
    return 0


def command_crl(options, config, directory):
    ca = _open(config, directory)
    expiry = ca.crl_expiry()
    if options.within and expiry - datetime.now(UTC) > timedelta(days=options.within):
        print(f"CRL kept: {ca.crl_path}, valid until {expiry:%Y-%m-%d %H:%M} UTC")
        return 0
    expiry = ca.renew_crl(days=options.days or config.crl_days)
    print(f"CRL re-issued: {ca.crl_path}, valid until {expiry:%Y-%m-%d %H:%M} UTC")
    return 0


# The certificate the CA gives itself to reach the event servers (role monitor: it announces nothing).
PUBLISHER = "thor-pki"


def command_publish_crl(options, config, directory):
    ca = _open(config, directory)
    if options.servers:
        try:
            servers = EndpointList(EVENT_SERVER_PORT).parse(options.servers)
        except ValueError as error:
            raise PKIError(f"--servers: {error}") from None
        discovery = {}
    else:  # the event servers of [ThorNetwork], or its domain's SRV records
        (network,) = load_config(
            options.config or DEFAULT_CONFIG_PATH, ThorNetworkConfig, required=options.config is not None
        )
        servers = network.event_servers
        discovery = {"domain": network.domain, "nameservers": network.nameservers}
    if not any(record.name == PUBLISHER and record.status() == "valid" for record in ca.records()):
        ca.issue(PUBLISHER, [roles.MONITOR], days=config.certificate_days, replace=True)
    try:
        contexts = TLSContexts(
            ca.ca_certificate_path, ca.certificate_path(PUBLISHER), ca.key_path(PUBLISHER), ca.crl_path
        )
    except TLSError as error:
        raise PKIError(str(error)) from None
    ours = contexts.revocation_list
    held = {}  # event server -> the CRL it hands out
    client = EventClient(contexts, servers=servers, connect_timeout=5.0, **discovery)
    client.subscribe(topics.CRL, lambda message: held.__setitem__(message.server, message.body.get("crl")))
    client.start()
    try:
        deadline = time.monotonic() + options.timeout
        while time.monotonic() < deadline:
            connected = client.connected_servers
            behind = [server for server in connected if not ours.is_text(held.get(server))]
            if connected and not behind and (not servers or len(connected) == len(servers)):
                break
            if behind:
                client.publish(topics.CRL, {"crl": ours.pem.decode("ascii")})
            gevent.sleep(1.5)
    finally:
        client.stop()
    for server in sorted(held):
        state = "holds it" if ours.is_text(held[server]) else "does not take it (it holds a newer one?)"
        print(f"{server}: {state}")
    done = [server for server in held if ours.is_text(held[server])]
    if not done or (servers and len(done) < len(servers)):
        raise PKIError(f"{ours} reached {len(done)} of {len(servers) or 'the'} event servers in {options.timeout:g} s")
    print(f"{ours} handed to {len(done)} event servers; they pass it on to every member")
    return 0


def command_list(options, config, directory):
    ca = _open(config, directory)
    now = datetime.now(UTC)
    records = ca.records()
    if options.json:
        output = {
            "crl_next_update": ca.crl_expiry().isoformat(),
            "certificates": [dict(record.to_json(), status=record.status(now)) for record in records],
        }
        print(json.dumps(output, indent=2))
        return 0
    print(f"{'NAME':<24} {'ROLES':<40} {'SERIAL':<40} {'EXPIRES':<16} STATUS")
    for record in records:
        print(
            f"{record.name:<24} {','.join(record.roles):<40} {record.serial:<40x} "
            f"{record.not_after:%Y-%m-%d %H:%M} {record.status(now)}"
        )
    print(f"CRL valid until {ca.crl_expiry():%Y-%m-%d %H:%M} UTC")
    return 0


ROLLOUT = "install ca.crt and crl.pem on every host (ansible-playbook playbooks/renew.yml)"
NEXT_STEP = {
    "none": "no CA rollover under way",
    "begun": f"rollover begun: {ROLLOUT}, then 'thor-pki rollover switch'",
    "switched": f"rollover switched: 'thor-pki renew', {ROLLOUT} with the new certificates, "
    "then 'thor-pki rollover finish'",
}


def command_rollover(options, config, directory):
    ca = _open(config, directory)
    if options.step == "begin":
        new = ca.rollover_begin(common_name=options.name, days=options.days or config.ca_days)
        print(f"new CA {new.subject.rfc4514_string()} made, trusted beside the current one; it does not sign yet")
    elif options.step == "switch":
        new = ca.rollover_switch()
        print(f"{new.subject.rfc4514_string()} signs from now on; the old CA stays trusted")
    elif options.step == "finish":
        old = ca.rollover_finish()
        print(f"{old.subject.rfc4514_string()} retired: no longer trusted, its key deleted")
        print(f"install ca.crt and crl.pem on every host: {ROLLOUT}")
        return 0
    for number, certificate in enumerate(ca.trusted()):
        role = "signs" if number == 0 else "trusted"
        expiry = not_valid_after(certificate)
        print(f"  {role:<8} {common_name(certificate)} (valid until {expiry:%Y-%m-%d %H:%M} UTC)")
    print(NEXT_STEP[ca.rollover_state()])
    return 0


COMMANDS = {
    "init": command_init,
    "issue": command_issue,
    "sign": command_sign,
    "renew": command_renew,
    "revoke": command_revoke,
    "crl": command_crl,
    "publish-crl": command_publish_crl,
    "rollover": command_rollover,
    "list": command_list,
}


if __name__ == "__main__":
    sys.exit(main())
