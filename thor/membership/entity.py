"""An entity: what a member publishes about itself on Thor.Presence.

    {"name": "node1", "address": "192.0.2.21", "roles": ["sip_proxy"],
     "version": "0.1.0", "status": "ok", "since": 1764048000.0,
     "attributes": {"control_port": 25060},
     "withdrawn": {"media_relay": "health check ng:127.0.0.1:2223 does not answer"}}

name and roles are checked against the certificate by the event server; the
rest is checked here by whoever consumes presence (the manager). attributes
belong to the roles this program announces (programs sharing a host keep
their own, docs/membership.md); withdrawn names the roles the program would
announce but whose service fails its health check, and why.
"""

import functools
import ipaddress

from thor.roles import RoleError, check_role_name

__all__ = [
    "EntityError",
    "make_entity",
    "validate_attributes",
    "validate_entity",
    "validate_identity",
    "validate_withdrawn",
]

MAX_ATTRIBUTES = 32
MAX_TEXT = 256


class EntityError(ValueError):
    pass


def make_entity(name, address, roles, version, since, status="ok", attributes=None, withdrawn=None):
    return validate_entity(
        {
            "name": name,
            "address": address,
            "roles": sorted(roles),
            "version": version,
            "status": status,
            "since": since,
            "attributes": dict(attributes or {}),
            "withdrawn": dict(withdrawn or {}),
        }
    )


def validate_entity(body):
    """Return a normalized copy of body, or raise EntityError saying what is wrong."""
    if not isinstance(body, dict):
        raise EntityError("entity is not an object")
    entity = validate_identity(body, body.get("roles"))
    entity["attributes"] = validate_attributes(entity["name"], body.get("attributes", {}))
    entity["withdrawn"] = validate_withdrawn(entity["name"], body.get("withdrawn", {}))
    return entity


def validate_identity(body, roles):
    """A normalized copy of the fields every entity has (name, address, roles, version, status,
    since), roles being given apart (a status member's are its services' roles)."""
    name = _text(body, "name")
    try:
        address = _normal_address(_text(body, "address"))
    except ValueError:
        raise EntityError(f"entity {name}: address is not an IP address") from None
    if not isinstance(roles, list):
        raise EntityError(f"entity {name}: roles is not a list")
    try:
        roles = sorted({check_role_name(role) for role in roles if isinstance(role, str)})
    except RoleError as error:
        raise EntityError(f"entity {name}: {error}") from None
    since = body.get("since", 0)
    if not isinstance(since, (int, float)) or isinstance(since, bool):
        raise EntityError(f"entity {name}: since is not a number")
    return {
        "name": name,
        "address": address,
        "roles": roles,
        "version": _text(body, "version", default=""),
        "status": _text(body, "status", default="ok"),
        "since": float(since),
    }


@functools.lru_cache(maxsize=4096)
def _normal_address(text):
    """The canonical text of an IP address. Cached: every status a member receives repeats the same
    few thousand addresses, and parsing one costs more than the rest of its member's checks."""
    return str(ipaddress.ip_address(text))


def validate_attributes(name, attributes):
    """A copy of a free attributes object: at most MAX_ATTRIBUTES short strings, numbers or booleans."""
    if not isinstance(attributes, dict) or len(attributes) > MAX_ATTRIBUTES:
        raise EntityError(f"entity {name}: attributes must be an object of at most {MAX_ATTRIBUTES} keys")
    for key, value in attributes.items():
        if len(key) > MAX_TEXT:
            raise EntityError(f"entity {name}: an attribute name is longer than {MAX_TEXT}")
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise EntityError(f"entity {name}: attribute {key!r} is not a string, number or boolean")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise EntityError(f"entity {name}: attribute {key!r} is longer than {MAX_TEXT}")
    return dict(attributes)


def validate_withdrawn(name, withdrawn):
    """A copy of {role: why it is withdrawn}, as short text."""
    if not isinstance(withdrawn, dict) or len(withdrawn) > MAX_ATTRIBUTES:
        raise EntityError(f"entity {name}: withdrawn must be an object of at most {MAX_ATTRIBUTES} roles")
    for role, reason in withdrawn.items():
        try:
            check_role_name(role)
        except RoleError as error:
            raise EntityError(f"entity {name}: withdrawn: {error}") from None
        if not isinstance(reason, str) or len(reason) > MAX_TEXT:
            raise EntityError(f"entity {name}: withdrawn {role}: the reason must be text of at most {MAX_TEXT}")
    return dict(withdrawn)


def _text(body, key, default=None):
    value = body.get(key, default)
    if not isinstance(value, str) or (default is None and not value) or len(value) > MAX_TEXT:
        raise EntityError(f"entity: {key} must be a string of 1 to {MAX_TEXT} characters")
    return value
