"""The node's account cache in-process: how changes and loads combine, whatever order they come in.

The event bus is replaced by a recorder; the rings are real. The end-to-end paths (SOAP ->
PostgreSQL -> the owner node) are in test_ngnpro.py.
"""

import gevent
import pytest

from thor.accounts import cache as accounts
from thor.accounts.cache import AccountCache
from thor.accounts.protocol import ACCOUNTS_WANTED, PROVISIONING, accounts_topic
from thor.events.client import Message
from thor.lookup.table import LookupTable
from thor.loopback.process import wait_for

ADDRESS = "10.0.0.1"
KEY = "alice@example.com"


class Client:
    """What AccountCache uses of an EventClient, recording what it publishes."""

    def __init__(self):
        self.handlers = {}
        self.published = []

    def subscribe(self, topic, handler):
        self.handlers[topic] = handler

    def on_connect(self, callback):
        pass

    def publish(self, topic, body, retain=False):
        self.published.append((topic, body))
        return 1

    def deliver(self, topic, body, publisher="ngnpro1"):
        self.handlers[topic](Message(topic, publisher, "s", 1, body, "server1"))

    def requests(self):
        return [body["request"] for topic, body in self.published if topic == ACCOUNTS_WANTED]


class Member:
    def __init__(self):
        self.client, self.name, self.address = Client(), "node1", ADDRESS


class Rings:
    """A RingFollower with one table: this node alone owns every key."""

    def __init__(self):
        self.table = LookupTable(1, "manager1", {"sip_proxy": [ADDRESS], "provisioning_server": ["10.0.0.9"]})

    def on_change(self, callback):
        pass


@pytest.fixture
def cache():
    member = Member()
    built = AccountCache(member, Rings(), reload_interval=3600, request_timeout=2.0)
    built.start()
    built._want()  # as when the event client connects
    yield built
    built.stop()


def change(seq, ha1="0" * 32, key=KEY):
    data = None if ha1 is None else {"username": key.split("@")[0], "domain": key.split("@")[1], "ha1": ha1}
    return {"kind": "account", "key": key, "seq": seq, "data": data}


def load(cache, records, parts=1):
    """Answer the node's pending request with records, in parts."""
    client = cache.member.client
    request = wait_for(lambda: cache._pending and cache._pending[0], message="a request for the accounts")
    size = -(-len(records) // parts) if records else 0
    for part in range(parts):
        chunk = records[part * size : (part + 1) * size]
        body = {"request": request, "part": part, "records": chunk, "last": part == parts - 1}
        client.deliver(accounts_topic("node1"), body)
    return request


def test_a_change_still_on_its_way_after_a_load_cannot_bring_a_deleted_account_back(cache):
    client = cache.member.client
    load(cache, [])
    client.deliver(PROVISIONING, {"changes": [change(5, "a" * 32)]})
    client.deliver(PROVISIONING, {"changes": [change(7, None)]})  # deleted
    cache._want()
    load(cache, [])  # the snapshot, taken after the deletion, does not list it
    client.deliver(PROVISIONING, {"changes": [change(6, "b" * 32)]})  # an older change, late
    assert cache.get(KEY) is None


def test_deletions_are_forgotten_once_nothing_older_can_arrive(cache, monkeypatch):
    client = cache.member.client
    load(cache, [])
    client.deliver(PROVISIONING, {"changes": [change(7, None)]})
    monkeypatch.setattr(accounts, "TOMBSTONE_SECONDS", 0.0)
    cache._want()
    load(cache, [])
    assert KEY not in cache.entries  # memory: no tombstone outlives its use


def test_the_snapshot_replaces_what_was_cached_before_the_request_whatever_its_seq(cache):
    # After the database is restored from a backup, its sequence is behind what nodes saw.
    client = cache.member.client
    load(cache, [])
    client.deliver(PROVISIONING, {"changes": [change(100, "a" * 32)]})
    cache._want()
    load(cache, [change(50, "b" * 32)])
    assert cache.get(KEY).data["ha1"] == "b" * 32
    client.deliver(PROVISIONING, {"changes": [change(51, "c" * 32)]})  # and changes after it apply
    assert cache.get(KEY).data["ha1"] == "c" * 32


def test_a_change_that_arrives_during_a_load_is_not_undone_by_the_snapshot(cache):
    client = cache.member.client
    load(cache, [])
    cache._want()
    wait_for(lambda: len(client.requests()) == 2, message="the second request")
    client.deliver(PROVISIONING, {"changes": [change(9, "n" * 32)]})  # committed after the snapshot began
    load(cache, [change(8, "o" * 32)])
    assert cache.get(KEY).data["ha1"] == "n" * 32


def test_a_long_load_is_not_abandoned_while_its_parts_keep_coming(cache):
    client = cache.member.client
    request = wait_for(lambda: cache._pending and cache._pending[0], message="a request")
    records = [change(index, key=f"user{index}@example.com") for index in range(1, 6)]
    for part, record in enumerate(records):  # 5 parts over 2.5 s: longer than request_timeout (2 s) in all
        gevent.sleep(0.5)
        body = {"request": request, "part": part, "records": [record], "last": part == len(records) - 1}
        client.deliver(accounts_topic("node1"), body)
    assert cache.loads == 1
    assert client.requests() == [request]  # never asked again
    assert cache.counts() == (5, 0)


def test_a_load_that_stops_coming_is_asked_again(cache):
    client = cache.member.client
    request = wait_for(lambda: cache._pending and cache._pending[0], message="a request")
    client.deliver(accounts_topic("node1"), {"request": request, "part": 0, "records": [], "last": False})
    wait_for(lambda: len(client.requests()) == 2, timeout=5, message="the request made again")
    load(cache, [change(1)])
    assert cache.loads == 1 and cache.get(KEY) is not None


def test_with_a_credential_the_cache_answers_only_requests_that_carry_it(cache):
    load(cache, [change(1)])
    wait_for(lambda: cache.get(KEY), message="alice cached")
    application = accounts.accounts_application(cache, "a-secret-of-the-sip-proxy")

    def get(path, **headers):
        answer = {}
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, **headers}
        body = b"".join(application(environ, lambda status, _headers: answer.setdefault("status", status)))
        return answer["status"], body

    assert get(f"/accounts/{KEY}/ha1")[0] == "401 Unauthorized"
    assert get(f"/accounts/{KEY}/ha1", HTTP_AUTHORIZATION="Bearer a-guess")[0] == "401 Unauthorized"
    assert get(f"/accounts/{KEY}/ha1", HTTP_AUTHORIZATION="Bearer a-secret-of-the-sip-proxy") == ("200 OK", b"0" * 32)
    # Without a credential (loopback), the header is not needed.
    open_application = accounts.accounts_application(cache)
    answer = []
    open_application({"REQUEST_METHOD": "GET", "PATH_INFO": "/accounts"}, lambda status, _: answer.append(status))
    assert answer == ["200 OK"]
