"""A whole overlay as processes on loopback: event servers, managers, nodes; and an in-process observer."""

import os

import processes
from conftest import wait_for
from eventbus import EventServerProcess

from thor.events.client import EventClient
from thor.membership.member import OverlayMember


class Overlay:
    def __init__(self, directory, pki):
        self.directory = directory
        self.pki = pki
        self.eventservers = []
        self.programs = {}
        self.clients = []

    def start_eventservers(self, count=3, **settings):
        for index in range(count):
            self.eventservers.append(EventServerProcess(self.directory, self.pki, f"es{index + 1}", **settings))
        for server in self.eventservers:
            server.wait_ready()

    def network(self):
        return {
            "domain": "sipthor.test",
            "event_servers": ", ".join(f"127.0.0.1:{server.port}" for server in self.eventservers),
        }

    def start(self, name, module, roles, address, certificate=None, **sections):
        """Start a member program (thor.manager.main, thor.node.main, ...) with its own certificate,
        or with the certificate of another name (programs sharing a host: one name, one certificate)."""
        certificate = certificate or name
        if not os.path.exists(self.pki.ca.certificate_path(certificate)):
            self.pki.ca.issue(certificate, roles, address=address)
        files = self.pki.files(certificate)
        config = {"ThorNetwork": self.network(), "TLS": processes.tls_values(files), **sections}
        program = processes.Program(self.directory, name, ["-m", module], config)
        self.programs[name] = program
        return program

    def manager(self, name, address="127.0.1.1", **settings):
        return self.start(name, "thor.manager.main", "thor_manager", address, Manager=settings)

    def node(self, name, roles, address, checks=None, lookup=None, **settings):
        """Start thor-node; its lookup interface and account cache listen on address and free ports
        (program.lookup, program.accounts)."""
        roles_text = roles if isinstance(roles, str) else ",".join(roles)
        node = {"accounts_listen": f"{address}:{processes.free_port(address)}", **settings}
        node["checks"] = checks if checks is not None else ", ".join(f"{r}=none" for r in roles_text.split(","))
        lookup = {"listen": f"{address}:{processes.free_port(address)}", **(lookup or {})}
        program = self.start(name, "thor.node.main", roles_text, address, Node=node, Lookup=lookup)
        program.lookup = _endpoint(lookup["listen"])
        program.accounts = _endpoint(node["accounts_listen"])
        return program

    def observer(self, name="observer"):
        """An in-process member that only follows the network status."""
        client = EventClient(
            self.pki.contexts(name, "thor_monitor"),
            servers=[server.endpoint for server in self.eventservers],
            backoff=(0.1, 1),
        )
        member = OverlayMember(client, name, None, announce=False)
        member.start()
        self.clients.append(client)
        return member

    def close(self):
        for client in self.clients:
            client.stop(flush_timeout=0)
        for program in [*self.programs.values(), *self.eventservers]:
            program.close()


def _endpoint(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def wait_status(observer, predicate, timeout=10, message="network status"):
    return wait_for(lambda: predicate(observer.status.status) and observer.status.status, timeout, message=message)


def members(status):
    return set(status.members)
