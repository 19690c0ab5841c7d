"""The accounts protocol between NGNPro and the sip_proxy nodes: topics, their rules, messages.

    Thor.Provisioning       NGNPro -> nodes: every committed change, {"changes": [record, ...]}
    Thor.AccountsWanted     a node -> NGNPro: {"name", "address", "request", "ring"}
    Thor.Accounts.<name>    NGNPro -> that node: its accounts, {"request", "part", "records", "last"}
    Thor.Usage              a node -> NGNPro: what it does, for getStatistics (retained)

A record is {"kind": "account" | "alias", "key": "user@domain", "seq": N, "data": {...} | None}, or a
served domain, {"kind": "domain", "key": "example.com", ...}, which every node keeps whatever it owns.
Importing this module declares the topics' rules on the event bus
(thor.events.topics.declare): the event server imports it to enforce them.
"""

import json

from thor import roles
from thor.events import topics

__all__ = [
    "ACCOUNTS_PREFIX",
    "ACCOUNTS_WANTED",
    "EVERYONE_KEEPS",
    "KINDS",
    "PROVISIONING",
    "USAGE",
    "accounts_topic",
    "record_batches",
    "usage_report",
]

PROVISIONING = "Thor.Provisioning"
ACCOUNTS_WANTED = "Thor.AccountsWanted"
ACCOUNTS_PREFIX = "Thor.Accounts."
USAGE = "Thor.Usage"

KINDS = ("account", "alias", "domain")
# Records every node keeps, not only the owner of their key.
EVERYONE_KEEPS = frozenset({"domain"})

# Records per message: at most this many and about MAX_BATCH_BYTES of JSON, well inside
# the event bus's frames (1 MiB) whatever the records hold.
MAX_BATCH_RECORDS = 2000
MAX_BATCH_BYTES = 256 * 1024
# What getStatistics reports of a node's Thor.Usage, and the types each must have.
USAGE_FIELDS = {
    "uptime": (int, float),
    "accounts": (int,),
    "aliases": (int,),
    "lookups": (int,),
    "lookup_connections": (int,),
    "load_average": (int, float),
}


def accounts_topic(name):
    """The topic on which a node receives the accounts it asked for."""
    return ACCOUNTS_PREFIX + name


def _addressee(identity, topic):
    if topic != accounts_topic(identity.name):
        raise topics.ForbiddenError(f"only {topic[len(ACCOUNTS_PREFIX) :]!r} may subscribe to {topic}")


# Who may publish and read: only NGNPro pushes accounts; digest hashes reach only the
# sip_proxy nodes that serve them; a node speaks for itself.
topics.declare(
    PROVISIONING,
    publish=topics.role_rule(roles.PROVISIONING_SERVER),
    subscribe=topics.role_rule(roles.SIP_PROXY, f"subscribe to {PROVISIONING}: it carries digest hashes"),
)
topics.declare(ACCOUNTS_WANTED, publish=topics.own_name)
topics.declare(USAGE, publish=topics.own_name)
topics.declare(ACCOUNTS_PREFIX, prefix=True, publish=topics.role_rule(roles.PROVISIONING_SERVER), subscribe=_addressee)


def record_batches(records, max_records=MAX_BATCH_RECORDS, max_bytes=MAX_BATCH_BYTES):
    """The records (an iterable) in lists of at most max_records and about max_bytes of JSON."""
    batch, size = [], 0
    for record in records:
        length = len(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode())
        if batch and (len(batch) >= max_records or size + length > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += length
    if batch:
        yield batch


def usage_report(body, fields=USAGE_FIELDS):
    """The fields getStatistics shows of a Thor.Usage body (or another report of fields), or None
    when it is not one.

    A member's report is its own word: a field of the wrong type is left out, not shown."""
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("address"), str):
        return None
    report = {"name": body["name"][:255], "address": body["address"][:64]}
    for field, types in fields.items():
        value = body.get(field)
        if isinstance(value, types) and not isinstance(value, bool) and abs(value) < 2**63:
            report[field] = value
    return report
