"""Topics of the event bus, who may publish on them and who may read them.

Names known from AG Projects' public consumers of the original thor library
are kept: Thor.Presence, Thor.Leave, Thor.Members, Thor.Statistics. Topics
under "Thor." are reserved: each has a rule below, and an unknown Thor.*
topic is refused. Other topics are free for applications to use between
authenticated members. Most topics may be read by every member; those that
carry subscribers' digest hashes only by the members that need them.
"""

__all__ = [
    "ACCOUNTS_PREFIX",
    "ACCOUNTS_WANTED",
    "CONNECTIONS",
    "LEAVE",
    "MEMBERS",
    "PRESENCE",
    "PROVISIONING",
    "STATISTICS",
    "USAGE",
    "ForbiddenError",
    "accounts_topic",
    "authorize_publish",
    "authorize_subscribe",
]

PRESENCE = "Thor.Presence"
LEAVE = "Thor.Leave"
MEMBERS = "Thor.Members"
STATISTICS = "Thor.Statistics"
# Published by each event server about the members connected to it.
CONNECTIONS = "Thor.Connections"
# Provisioning (docs/provisioning.md): NGNPro publishes every committed change; a
# node asks for the accounts it owns and gets them on its own topic; nodes
# report their usage.
PROVISIONING = "Thor.Provisioning"
ACCOUNTS_WANTED = "Thor.AccountsWanted"
ACCOUNTS_PREFIX = "Thor.Accounts."
USAGE = "Thor.Usage"

RESERVED_PREFIX = "Thor."


class ForbiddenError(Exception):
    """The publisher may not publish this; str() says why."""


def _own_entity(identity, body):
    """Presence: a member speaks for itself, with roles its certificate grants."""
    if not isinstance(body, dict) or body.get("name") != identity.name:
        raise ForbiddenError(f"presence must carry the publisher's own name {identity.name!r}")
    roles = body.get("roles")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise ForbiddenError("presence roles must be a list of role names")
    extra = set(roles) - identity.roles
    if extra:
        raise ForbiddenError(f"certificate of {identity.name} does not grant {', '.join(sorted(extra))}")


def _own_name(identity, body):
    if not isinstance(body, dict) or body.get("name") != identity.name:
        raise ForbiddenError(f"this must carry the publisher's own name {identity.name!r}")


def _role(role, what="publish this"):
    """A rule (identity, body or topic) that lets only certificates granting role do what."""

    def rule(identity, _):
        if role not in identity.roles:
            raise ForbiddenError(f"only {role} certificates may {what}")

    return rule


def _nobody(identity, body):
    raise ForbiddenError("only event servers publish this")


RULES = {
    PRESENCE: _own_entity,
    LEAVE: _own_name,
    MEMBERS: _role("thor_manager"),
    STATISTICS: _role("media_relay"),
    CONNECTIONS: _nobody,
    PROVISIONING: _role("provisioning_server"),
    ACCOUNTS_WANTED: _own_name,
    USAGE: _own_name,
}
# Topics named by a prefix and a member's name.
PREFIX_RULES = {
    ACCOUNTS_PREFIX: _role("provisioning_server"),
}


def _addressee(identity, topic):
    if topic != accounts_topic(identity.name):
        raise ForbiddenError(f"only {topic[len(ACCOUNTS_PREFIX) :]!r} may subscribe to {topic}")


# Who may read: every member, but for these.
SUBSCRIBE_RULES = {
    PROVISIONING: _role("sip_proxy", f"subscribe to {PROVISIONING}: it carries digest hashes"),
}
SUBSCRIBE_PREFIX_RULES = {
    ACCOUNTS_PREFIX: _addressee,
}


def accounts_topic(name):
    """The topic on which a node receives the accounts it asked for."""
    return ACCOUNTS_PREFIX + name


def _rule(topic, rules, prefix_rules):
    rule = rules.get(topic)
    if rule is None:
        rule = next((rule for prefix, rule in prefix_rules.items() if topic.startswith(prefix)), None)
    return rule


def authorize_publish(identity, topic, body):
    """Raise ForbiddenError unless identity may publish body on topic."""
    rule = _rule(topic, RULES, PREFIX_RULES)
    if rule is not None:
        rule(identity, body)
    elif topic.startswith(RESERVED_PREFIX):
        raise ForbiddenError(f"{topic} is a reserved topic with no publisher")


def authorize_subscribe(identity, topic):
    """Raise ForbiddenError unless identity may receive what is published on topic."""
    rule = _rule(topic, SUBSCRIBE_RULES, SUBSCRIBE_PREFIX_RULES)
    if rule is not None:
        rule(identity, topic)
