"""make demo-sip: SIP through a SIP Thor network on one machine (docs/sip.md).

PostgreSQL, NGNPro, 2 event servers, a manager and 3 sip_proxy nodes (thor-node +
Kamailio with SIP Thor's configuration) on loopback addresses; alice, bob and carol
provisioned over SOAP; their devices (sipp) register through different nodes, bob's
from behind a NAT (his Contact names a private address); alice calls bob and carol
calls alice. It prints each subscriber's home node, each call's outcome and how many
Thor nodes it crossed, then keeps the network running until Ctrl-C (--check: stops).
Needs the test extras (zeep) and Debian's kamailio-python3-modules and sip-tester.
"""

import argparse
import shutil
import sys
import tempfile
import time

from thor.loopback.ngnpro import DOMAIN, NODE_ADDRESSES, SipNetwork, account, owner
from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.loopback.process import free_port
from thor.loopback.sipp import Sipp, thor_vias_of_invites

NODES = ("node1", "node2", "node3")
PASSWORD = "demo-password"
# Where each subscriber's device is, which node it talks to, and what its Contact says.
DEVICES = {
    "alice": ("127.0.5.1", "node1", None),
    "bob": ("127.0.5.2", "node2", "192.168.1.50"),
    "carol": ("127.0.5.3", "node3", None),
}
CALLS = (("alice", "bob"), ("carol", "alice"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make demo-sip", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="register, call, print, stop (exit 1 if a call failed)")
    options = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="thor-demo-sip-")
    print(f"SIP demo network {DOMAIN} in {directory} (configs, logs)", flush=True)
    postgresql = PostgreSQL()
    network = None
    answering = {}
    status = 0
    try:
        network = SipNetwork(directory, ScratchPKI(f"{directory}/pki"), postgresql)
        network.start_nodes(*NODES)
        soap = network.client()
        soap.addDomain(DOMAIN)
        for user in DEVICES:
            soap.addAccount(account(user, password=PASSWORD))
        by_address = {address: name for name, address in NODE_ADDRESSES.items()}
        time.sleep(1)  # the changes reach the home nodes
        for user, (address, edge, contact_host) in DEVICES.items():
            home = by_address[owner(network, f"{user}@{DOMAIN}")]
            local = (address, free_port(address))
            keys = {"contact_host": contact_host} if contact_host else None
            result = Sipp(
                directory,
                f"{user}-register",
                "register",
                local,
                [[user, DOMAIN, PASSWORD]],
                (NODE_ADDRESSES[edge], 5060),
                keys=keys,
            ).run(1, timeout=20)
            outcome = "registered" if result.successful == 1 else f"NOT registered: {result.errors[-300:]}"
            behind = f", behind NAT (Contact {contact_host})" if contact_host else ""
            print(f"{user}@{DOMAIN}: home {home}, device {local[0]}:{local[1]} talks to {edge}{behind}: {outcome}")
            status = status or (0 if result.successful == 1 else 1)
            answering[user] = Sipp(directory, f"{user}-answer", "answer", local).start()
        for caller, callee in CALLS:
            address, edge, _ = DEVICES[caller]
            before = len(thor_vias_of_invites(answering[callee].messages()))
            result = Sipp(
                directory,
                f"{caller}-calls-{callee}",
                "call",
                (address, free_port(address)),
                [[caller, DOMAIN, PASSWORD, callee]],
                (NODE_ADDRESSES[edge], 5060),
            ).run(1, timeout=20)
            hops = thor_vias_of_invites(answering[callee].messages())[before:]
            if result.successful == 1:
                print(
                    f"call {caller} -> {callee} through {edge}: answered, set up in {result.setup_ms[0]:.0f} ms, "
                    f"crossed {hops[0] if hops else '?'} Thor node(s)"
                )
            else:
                print(f"call {caller} -> {callee} through {edge}: FAILED {result.errors[-500:]}")
                status = 1
        if not options.check:
            print("the network runs; Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the SIP demo network ...")
        for sipp in answering.values():
            sipp.stop()
        if network is not None:
            network.close()
        postgresql.remove()
        if status == 0:
            shutil.rmtree(directory, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
