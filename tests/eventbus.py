"""Event servers as processes, and in-process clients, for the event bus tests."""

import os

import processes
from conftest import wait_for

from thor.events.client import EventClient

EVENTSERVER = ["-m", "thor.eventserver.main"]


class EventServerProcess(processes.Program):
    def __init__(self, directory, pki, name, **settings):
        self.port = processes.free_port()
        files = pki.issue(name, "thor_eventserver") if not os.path.exists(pki.ca.certificate_path(name)) else None
        files = files or pki.files(name)
        values = {"listen": f"127.0.0.1:{self.port}", "keepalive": 0.5, "idle_timeout": 1.5}
        values.update(settings)
        sections = {"TLS": processes.tls_values(files), "EventServer": values}
        super().__init__(directory, name, EVENTSERVER, sections)

    @property
    def endpoint(self):
        return ("127.0.0.1", self.port)

    def wait_ready(self):
        self.wait_log(f"listening on 127.0.0.1:{self.port}")


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


def client(pki, name, roles, servers, connect=True, **kwargs):
    contexts = pki.contexts(name, roles)
    event_client = EventClient(contexts, servers=[server.endpoint for server in servers], backoff=(0.1, 1), **kwargs)
    event_client.start()
    if connect:
        wait_for(lambda: len(event_client.connected_servers) == len(servers), message=f"{name} connected")
    return event_client
