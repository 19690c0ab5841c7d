"""Role names: what a node can do in the overlay.

The names are those the original SIP Thor software and its public consumers
(mediaproxy, openxcap, msrprelay) use. Third-party software adds roles by
configuration; their names follow the same syntax.
"""

import re

__all__ = [
    "BUILTIN_ROLES",
    "DATABASE",
    "DNS_MANAGER",
    "EVENT_SERVER",
    "INFRASTRUCTURE_ROLES",
    "MANAGER",
    "MEDIA_RELAY",
    "MONITOR",
    "MSRP_RELAY",
    "PROVISIONING_SERVER",
    "SIP_PROXY",
    "VOICEMAIL_SERVER",
    "XCAP_SERVER",
    "RoleError",
    "check_role_name",
    "parse_roles",
]

# The Thor infrastructure, each announced by its own program.
EVENT_SERVER = "thor_eventserver"
MANAGER = "thor_manager"
MONITOR = "thor_monitor"
DATABASE = "thor_database"
DNS_MANAGER = "thor_dnsmanager"
# The services of the platform.
SIP_PROXY = "sip_proxy"
MEDIA_RELAY = "media_relay"
XCAP_SERVER = "xcap_server"
MSRP_RELAY = "msrprelay_server"
VOICEMAIL_SERVER = "voicemail_server"
PROVISIONING_SERVER = "provisioning_server"

INFRASTRUCTURE_ROLES = frozenset({EVENT_SERVER, MANAGER, MONITOR, DATABASE, DNS_MANAGER})
SERVICE_ROLES = frozenset({SIP_PROXY, MEDIA_RELAY, XCAP_SERVER, MSRP_RELAY, VOICEMAIL_SERVER, PROVISIONING_SERVER})

BUILTIN_ROLES = INFRASTRUCTURE_ROLES | SERVICE_ROLES

_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")


class RoleError(ValueError):
    pass


def check_role_name(name):
    """Return name if it has the syntax of a role name, else raise RoleError."""
    if not _ROLE_NAME.match(name):
        raise RoleError(
            f"invalid role name {name!r}: expected a lowercase letter followed by up to 62 "
            "lowercase letters, digits or underscores"
        )
    return name


def parse_roles(text, extra_roles=()):
    """Parse a comma separated role list; every role must be known.

    Known roles are the built-in ones plus extra_roles (third-party roles the
    operator declared). Returns a sorted tuple without duplicates.
    """
    known = BUILTIN_ROLES | frozenset(extra_roles)
    roles = set()
    for item in text.split(","):
        name = item.strip()
        if not name:
            continue
        check_role_name(name)
        if name not in known:
            raise RoleError(
                f"unknown role {name!r}; known roles: {', '.join(sorted(known))} "
                "(declare third-party roles in [PKI] extra_roles)"
            )
        roles.add(name)
    if not roles:
        raise RoleError("no role given")
    return tuple(sorted(roles))
