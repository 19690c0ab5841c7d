"""A whole overlay as processes on loopback: event servers, managers, nodes, thor-database,
thor-dns, NGNPro; and in-process observers that follow the network status.

The tests, the benchmarks and `make demo` build their networks with it.
"""

import os
import shutil
import sys

from thor import __version__, roles
from thor.events.client import EventClient
from thor.loopback.process import Program, free_port, tls_values, wait_for
from thor.membership.member import OverlayMember

__all__ = ["EventServerProcess", "Overlay", "Recorder", "event_client", "members", "start_eventservers", "wait_status"]

EVENTSERVER = ["-m", "thor.eventserver.main"]


def host_files(directory, name, files, own_crl, **tls_settings):
    """files, with a copy of the CRL of name's own when own_crl (as on a host of its own, where a
    new CRL arrives over the bus or is put by hand), else the CA's file (each CA change seen at once)."""
    if own_crl:
        crl = os.path.join(directory, f"{name}.crl.pem")
        shutil.copyfile(files["crl"], crl)
        files = dict(files, crl=crl)
    return tls_values(files, learned_crl=os.path.join(directory, f"{name}.learned-crl.pem"), **tls_settings)


class EventServerProcess(Program):
    def __init__(
        self,
        directory,
        pki,
        name,
        address="127.0.0.1",
        port=None,
        python=sys.executable,
        own_crl=False,
        tls_settings=None,
        **settings,
    ):
        self.address = address
        self.port = port or free_port(address)
        files = pki.files(name, roles.EVENT_SERVER, address=address)
        values = {"listen": f"{address}:{self.port}", "keepalive": 0.5, "idle_timeout": 1.5}
        values.update(settings)
        tls = host_files(directory, name, files, own_crl, **(tls_settings or {}))
        super().__init__(directory, name, EVENTSERVER, {"TLS": tls, "EventServer": values}, python)

    @property
    def endpoint(self):
        return (self.address, self.port)

    def wait_ready(self, timeout=10):
        self.wait_log(f"listening on {self.address}:{self.port}", timeout)


def start_eventservers(directory, pki, count=3, **settings):
    servers = [EventServerProcess(directory, pki, f"es{index + 1}", **settings) for index in range(count)]
    for server in servers:
        server.wait_ready()
    return servers


class Recorder:
    """A subscriber that keeps every message it was handed."""

    def __init__(self):
        self.messages = []

    def __call__(self, message):
        self.messages.append(message)

    def bodies(self, topic=None):
        return [m.body for m in self.messages if topic is None or m.topic == topic]


def event_client(pki, name, member_roles, servers, connect=True, address=None, **kwargs):
    """An in-process EventClient of name (its certificate granting member_roles and naming address,
    the one it may announce), started, and connected to every one of servers unless connect is False."""
    contexts = pki.contexts(name, member_roles, address=address)
    client = EventClient(contexts, servers=[server.endpoint for server in servers], backoff=(0.1, 1), **kwargs)
    client.start()
    if connect:
        wait_for(lambda: len(client.connected_servers) == len(servers), message=f"{name} connected")
    return client


class Overlay:
    def __init__(self, directory, pki, domain="sipthor.test", python=sys.executable, own_crl=False, tls_settings=None):
        """own_crl: each program reads a copy of the CRL of its own (host_files()); tls_settings:
        more [TLS] settings of every program."""
        self.directory = str(directory)
        self.own_crl = own_crl
        self.tls_settings = dict(tls_settings or {})
        self.pki = pki
        self.domain = domain
        self.python = python
        self.eventservers = []
        self.programs = {}
        self.clients = []

    def eventserver(self, name, address="127.0.0.1", port=None, **settings):
        """Start an event server (not waiting for it: wait_ready())."""
        server = EventServerProcess(
            self.directory, self.pki, name, address, port, self.python, self.own_crl, self.tls_settings, **settings
        )
        self.eventservers.append(server)
        return server

    def restart_eventserver(self, index, **settings):
        """Start event server index again, on its name and port, once it has ended (not waiting
        for it: wait_ready())."""
        old = self.eventservers[index]
        assert old.process.poll() is not None, f"{old.name} still runs"
        self.eventservers[index] = EventServerProcess(
            self.directory,
            self.pki,
            old.name,
            old.address,
            old.port,
            self.python,
            self.own_crl,
            self.tls_settings,
            **settings,
        )
        return self.eventservers[index]

    def start_eventservers(self, count=3, **settings):
        for index in range(count):
            self.eventserver(f"es{index + 1}", **settings)
        for server in self.eventservers:
            server.wait_ready()

    def network(self):
        """The [ThorNetwork] section of every member."""
        return {
            "domain": self.domain,
            "event_servers": ", ".join(f"{host}:{port}" for host, port in (s.endpoint for s in self.eventservers)),
        }

    def start(self, name, module, member_roles, address, certificate=None, arguments=(), **sections):
        """Start a member program (thor.manager.main, thor.node.main, ...) with its own certificate,
        or with the certificate of another name (programs sharing a host: one name, one certificate)."""
        files = self.pki.files(certificate or name, member_roles, address=address)
        tls = host_files(self.directory, name, files, self.own_crl, **self.tls_settings)
        config = {"ThorNetwork": self.network(), "TLS": tls, **sections}
        program = Program(self.directory, name, ["-m", module], config, self.python, arguments)
        self.programs[name] = program
        return program

    def manager(self, name, address="127.0.1.1", **settings):
        return self.start(name, "thor.manager.main", roles.MANAGER, address, Manager=settings)

    def node(self, name, member_roles, address, checks=None, lookup=None, **settings):
        """Start thor-node; its lookup interface, account cache and peer API listen on address and free
        ports (program.lookup, program.accounts, program.peers) unless lookup / settings say where."""
        roles_text = member_roles if isinstance(member_roles, str) else ",".join(member_roles)
        node = {
            "accounts_listen": f"{address}:{free_port(address)}",
            "peer_listen": f"{address}:{free_port(address)}",
            **settings,
        }
        node["checks"] = checks if checks is not None else ", ".join(f"{r}=none" for r in roles_text.split(","))
        lookup = {"listen": f"{address}:{free_port(address)}", **(lookup or {})}
        program = self.start(name, "thor.node.main", roles_text, address, Node=node, Lookup=lookup)
        program.lookup = _endpoint(lookup["listen"])
        program.accounts = _endpoint(node["accounts_listen"])
        program.peers = _endpoint(node["peer_listen"])
        return program

    def observer(self, name="observer", servers=None):
        """An in-process member that only follows the network status (through servers: those
        event servers only, of self.eventservers)."""
        client = EventClient(
            self.pki.contexts(name, roles.MONITOR),
            servers=[server.endpoint for server in servers or self.eventservers],
            backoff=(0.1, 1),
        )
        member = OverlayMember(client, name, None, announce=False)
        member.start()
        self.clients.append(client)
        return member

    def monitor(self, *arguments, name="monitor1", run=None):
        """thor-monitor with arguments (run: a name for its files, default name), under the
        certificate of name (issued role thor_monitor on first use)."""
        sections = {"ThorNetwork": self.network(), "TLS": tls_values(self.pki.files(name, roles.MONITOR))}
        return Program(self.directory, run or name, ["-m", "thor.monitor.main", *arguments], sections, self.python)

    def wait_started(self, timeout=20):
        """Wait until every program runs; the first that exits instead fails with its log."""
        for server in self.eventservers:
            server.wait_ready(timeout)
        for program in self.programs.values():
            program.wait_log(f" {__version__} started", timeout)

    def stop(self):
        """TERM everyone, members first and event servers last (all leave while the bus is
        there); returns the programs that did not stop cleanly, with their exit status."""
        failed = []
        for program in [*reversed(self.programs.values()), *reversed(self.eventservers)]:
            try:
                status = program.stop()
            except AssertionError:
                status = "killed"
            if status != 0:
                failed.append(f"{program.name} (exit {status})")
        for client in self.clients:
            client.stop(flush_timeout=0)
        return failed

    def close(self):
        """Kill whatever still runs."""
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
