"""The public lookup interface: plain TCP, one query per line, one answer line per query.

    lookup sip_proxy for alice@example.com   ->  10.0.0.5
    is_online 10.0.0.5 as sip_proxy          ->  Yes | No
    members sip_proxy                        ->  10.0.0.5 10.0.0.6   (empty line: none)
    roles                                    ->  media_relay sip_proxy
    version                                  ->  1764048000123
    quit                                     ->  (closes the connection)
    anything wrong                           ->  error <code> <text>

docs/lookup-protocol.md is the reference; thor.transport.lines serves it
with its bounds (line length, connections, idle time, unread answers).
"""

import collections
import ipaddress

from thor.lookup.ring import InvalidKeyError
from thor.lookup.table import NoMembersError
from thor.roles import RoleError, check_role_name
from thor.transport.lines import LineServer, error

__all__ = ["COMMANDS", "LookupServer", "answer"]

COMMANDS = ("lookup", "is_online", "members", "roles", "version", "quit")


def answer(table, line):
    """The answer line (without CRLF) to one query line, from an immutable LookupTable."""
    words = line.split()
    command = words[0].lower() if words else ""
    count = len(words)
    if command == "lookup":
        if count != 4 or words[2].lower() != "for":
            return error("syntax", "expected: lookup ROLE for USER@DOMAIN")
        if not table.version:
            return _no_status(table)
        try:
            return table.lookup(words[1], words[3])
        except NoMembersError:
            return _no_members(words[1])
        except InvalidKeyError as problem:
            return error("bad-key", str(problem))
    if command == "is_online":
        if count != 4 or words[2].lower() != "as":
            return error("syntax", "expected: is_online ADDRESS as ROLE")
        try:
            address = str(ipaddress.ip_address(words[1]))
        except ValueError:
            return error("bad-address", f"{words[1][:60]!r} is not an IP address")
        return _unknown_role(words[3]) or _no_status(table) or ("Yes" if table.is_online(address, words[3]) else "No")
    if command == "members":
        if count != 2:
            return error("syntax", "expected: members ROLE")
        return _unknown_role(words[1]) or _no_status(table) or " ".join(table.members(words[1]))
    if command == "roles":
        if count != 1:
            return error("syntax", "expected: roles")
        return _no_status(table) or " ".join(table.roles)
    if command == "version":
        if count != 1:
            return error("syntax", "expected: version")
        return str(table.version)
    return error("unknown-command", "expected one of: lookup, is_online, members, roles, version, quit")


def _no_status(table):
    """The error line while the node has no network status; None once it has one."""
    return None if table.version else error("no-status", "no network status received yet")


def _unknown_role(role):
    """The error line for a text that is not a role name; None for a role name."""
    try:
        check_role_name(role)
    except RoleError:
        return error("bad-role", f"{role[:60]!r} is not a role name")
    return None


def _no_members(role):
    return _unknown_role(role) or error("no-members", f"no live member has the role {role}")


class LookupServer(LineServer):
    """The lookup interface over TCP, answering from the table table_source() returns at each query."""

    def __init__(self, listen, table_source, **limits):
        super().__init__(listen, self._answer, "lookup interface", **limits)
        self._table_source = table_source
        self.queries = collections.Counter()  # answered, by command (other: not a command)

    def _answer(self, line):
        words = line.split(None, 1)
        command = words[0].lower() if words else ""
        self.queries[command if command in COMMANDS else "other"] += 1
        return answer(self._table_source(), line)
