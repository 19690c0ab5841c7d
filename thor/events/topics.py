"""Topics of the event bus, who may publish on them and who may read them.

Names known from AG Projects' public consumers of the original thor library
are kept: Thor.Presence, Thor.Leave, Thor.Members, Thor.Statistics. Topics
under "Thor." are reserved: each has a rule, and an unknown Thor.* topic is
refused. The core declares the overlay's own; applications declare theirs
with declare() (thor.accounts.protocol: NGNPro's and the nodes'), and the
event server imports those declarations to enforce them. Other topics are
free for applications to use between authenticated members. Most topics may
be read by every member; an application may restrict who reads its own.
"""

import ipaddress
import json

from thor import roles

__all__ = [
    "CONNECTIONS",
    "CRL",
    "LEAVE",
    "MEMBERS",
    "PRESENCE",
    "STATISTICS",
    "ForbiddenError",
    "authorize_publish",
    "authorize_subscribe",
    "declare",
    "is_log",
    "own_name",
    "role_rule",
]

PRESENCE = "Thor.Presence"
LEAVE = "Thor.Leave"
MEMBERS = "Thor.Members"
STATISTICS = "Thor.Statistics"
# Published by each event server about the members connected to it.
CONNECTIONS = "Thor.Connections"
# The provider CRL, {"crl": PEM}: any member may offer the one it holds; an event server takes
# it only when it supersedes its own (thor.transport.crl) and then hands it to every subscriber.
CRL = "Thor.CRL"

RESERVED_PREFIX = "Thor."


class ForbiddenError(Exception):
    """The publisher may not publish this; str() says why."""


# What a presence may hold: an entity (thor.membership.entity) and nothing else, within a size
# that the largest valid entity (32 attributes and 32 withdrawn roles of 256 characters) stays
# under. Every subscriber of Thor.Presence gets every member's at once, so padding would be
# multiplied by the network's size in each new manager's catch-up.
PRESENCE_FIELDS = frozenset({"name", "address", "roles", "version", "status", "since", "attributes", "withdrawn"})
MAX_PRESENCE_BYTES = 32 << 10


def _own_entity(identity, body):
    """Presence: a member speaks for itself, with roles its certificate grants."""
    if not isinstance(body, dict) or body.get("name") != identity.name:
        raise ForbiddenError(f"presence must carry the publisher's own name {identity.name!r}")
    unknown = set(body) - PRESENCE_FIELDS
    if unknown:
        raise ForbiddenError(f"presence carries fields an entity has not: {', '.join(sorted(map(str, unknown)))}")
    if len(json.dumps(body)) > MAX_PRESENCE_BYTES:
        raise ForbiddenError(f"presence is larger than {MAX_PRESENCE_BYTES} bytes")
    announced = body.get("roles")
    if not isinstance(announced, list) or not all(isinstance(role, str) for role in announced):
        raise ForbiddenError("presence roles must be a list of role names")
    extra = set(announced) - identity.roles
    if extra:
        raise ForbiddenError(f"certificate of {identity.name} does not grant {', '.join(sorted(extra))}")
    _own_address(identity, body.get("address"))


def _own_address(identity, address):
    """The address a member announces is one its certificate names: DNS publishes it, rings route
    subscribers to it and NGNPro sends it accounts, so a stolen certificate must not point them
    at an address of the thief's choosing (or a victim's)."""
    try:
        announced = ipaddress.ip_address(address)
    except ValueError:
        raise ForbiddenError(f"presence address {address!r} is not an IP address") from None
    certified = {ipaddress.ip_address(text) for text in identity.addresses}
    if not certified:
        raise ForbiddenError(
            f"certificate of {identity.name} names no IP address, so it may announce none "
            "(issue it with --address, as the rollout does)"
        )
    if announced not in certified:
        raise ForbiddenError(
            f"presence address {announced} is not the one certificate of {identity.name} names "
            f"({', '.join(sorted(map(str, certified)))})"
        )


def own_name(identity, body):
    """A rule: the body carries the publisher's own name."""
    if not isinstance(body, dict) or body.get("name") != identity.name:
        raise ForbiddenError(f"this must carry the publisher's own name {identity.name!r}")


def role_rule(role, what="publish this"):
    """A rule (identity, body or topic) that lets only certificates granting role do what."""

    def rule(identity, _):
        if role not in identity.roles:
            raise ForbiddenError(f"only {role} certificates may {what}")

    return rule


def _nobody(identity, body):
    raise ForbiddenError("only event servers publish this")


# topic -> rule(identity, body) for publishing, rule(identity, topic) for subscribing.
_PUBLISH = {}
_SUBSCRIBE = {}
# The same for topics named by a prefix (and, say, a member's name).
_PUBLISH_PREFIX = {}
_SUBSCRIBE_PREFIX = {}


# Topics whose publishers keep a retained log (retain "append"), bounded on its own
# ([EventServer] max_log_bytes) rather than by the connection's retained bytes.
_LOGS = set()


def declare(topic, publish=None, subscribe=None, prefix=False, log=False):
    """Declare who may publish on topic (publish: rule(identity, body); none: every member
    for topics outside Thor., nobody for Thor.*) and who may read it (subscribe:
    rule(identity, topic); none: every member). prefix: topic names every topic it starts.
    log: a publisher's connection may keep a retained log on topic (a snapshot in parts and
    the changes after it), which every new subscriber receives in order."""
    if publish is not None:
        (_PUBLISH_PREFIX if prefix else _PUBLISH)[topic] = publish
    if subscribe is not None:
        (_SUBSCRIBE_PREFIX if prefix else _SUBSCRIBE)[topic] = subscribe
    if log:
        _LOGS.add(topic)


def is_log(topic):
    """Whether topic keeps retained logs (declare(..., log=True))."""
    return topic in _LOGS


declare(PRESENCE, publish=_own_entity)
declare(LEAVE, publish=own_name)
declare(MEMBERS, publish=role_rule(roles.MANAGER), log=True)
declare(STATISTICS, publish=role_rule(roles.MEDIA_RELAY))
declare(CONNECTIONS, publish=_nobody)


def _a_crl(identity, body):
    """A CRL offer: its signature, not its sender, makes it good (checked by the event server)."""
    if not isinstance(body, dict) or not isinstance(body.get("crl"), str):
        raise ForbiddenError('a CRL offer is {"crl": PEM text}')


declare(CRL, publish=_a_crl)


def _rule(topic, rules, prefix_rules):
    rule = rules.get(topic)
    if rule is None:
        rule = next((rule for prefix, rule in prefix_rules.items() if topic.startswith(prefix)), None)
    return rule


def authorize_publish(identity, topic, body):
    """Raise ForbiddenError unless identity may publish body on topic."""
    rule = _rule(topic, _PUBLISH, _PUBLISH_PREFIX)
    if rule is not None:
        rule(identity, body)
    elif topic.startswith(RESERVED_PREFIX):
        raise ForbiddenError(f"{topic} is a reserved topic with no publisher")


def authorize_subscribe(identity, topic):
    """Raise ForbiddenError unless identity may receive what is published on topic."""
    rule = _rule(topic, _SUBSCRIBE, _SUBSCRIBE_PREFIX)
    if rule is not None:
        rule(identity, topic)
