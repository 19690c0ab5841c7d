"""thor: ask a node's lookup interface who is responsible for a subscriber, and what the network holds.

    thor lookup sip_proxy alice@example.com        10.0.0.5
    thor is-online 10.0.0.5 sip_proxy              Yes
    thor members sip_proxy                         10.0.0.5 10.0.0.6
    thor status                                    version, then each role and its members

--server HOST[:PORT] picks the node (default 127.0.0.1:9500); --json prints
one JSON object. Exit status: 0 answered, 1 the server answered an error (or
No), 2 usage, 69 (EX_UNAVAILABLE) the server could not be reached.
"""

import argparse
import json
import sys

from thor import __version__
from thor.datatypes import Endpoint
from thor.lookup.client import LookupClient, LookupClientError
from thor.lookup.config import LOOKUP_PORT

EX_UNAVAILABLE = 69
# `thor status` reads the status again when it changed while being read; it gives up after this many.
STATUS_ATTEMPTS = 5


def parse_server(text):
    try:
        return Endpoint(LOOKUP_PORT).parse(text)
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def build_parser():
    parser = argparse.ArgumentParser(prog="thor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        type=parse_server,
        default=("127.0.0.1", LOOKUP_PORT),
        metavar="HOST[:PORT]",
        help=f"a node's lookup interface (default 127.0.0.1:{LOOKUP_PORT})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")
    parser.add_argument("--version", action="version", version=f"thor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lookup = commands.add_parser("lookup", help="the node responsible for a subscriber in a role")
    lookup.add_argument("role")
    lookup.add_argument("key", metavar="USER@DOMAIN")
    online = commands.add_parser("is-online", help="whether an address is a live member of a role")
    online.add_argument("address")
    online.add_argument("role")
    members = commands.add_parser("members", help="the live members of a role")
    members.add_argument("role")
    commands.add_parser("status", help="the status version and every role's members")
    return parser


def main(argv=None):
    options = build_parser().parse_args(argv)
    host, port = options.server
    try:
        with LookupClient(host, port, timeout=options.timeout) as client:
            result, ok = run(client, options)
    except LookupClientError as problem:
        print(f"thor: {problem}", file=sys.stderr)
        return EX_UNAVAILABLE
    if options.json:
        result.pop("text")
        print(json.dumps(result, sort_keys=True))
    elif "error" in result:
        print(f"thor: {result['error']}", file=sys.stderr)
    else:
        print(result["text"])
    return 0 if ok else 1


def run(client, options):
    """(result dict, ok) for the command; result["text"] is the plain-text output."""
    if options.command == "lookup":
        (line,) = client.query(f"lookup {options.role} for {options.key}")
        return _single(line, {"role": options.role, "key": options.key}, {"node": line})
    if options.command == "is-online":
        (line,) = client.query(f"is_online {options.address} as {options.role}")
        result, ok = _single(line, {"role": options.role, "address": options.address}, {"online": line == "Yes"})
        return result, ok and line == "Yes"
    if options.command == "members":
        (line,) = client.query(f"members {options.role}")
        return _single(line, {"role": options.role}, {"members": line.split()})
    return _status(client)


def _status(client):
    # The answers of one query each come from whichever status is current: ask again until
    # the version is the same after the members as before, so all of them are of one status.
    for _ in range(STATUS_ATTEMPTS):
        version, roles = client.query("version", "roles")
        for line in (version, roles):
            if line.startswith("error "):
                return {"text": line, "error": line[len("error ") :]}, False
        names = roles.split()
        *answers, after = client.query(*(f"members {role}" for role in names), "version")
        if after == version:
            break
    else:
        problem = f"the network status changed during each of {STATUS_ATTEMPTS} attempts to read it"
        return {"text": f"error busy {problem}", "error": f"busy {problem}"}, False
    members = {role: line.split() for role, line in zip(names, answers, strict=True)}
    text = "\n".join([f"version {version}", *(f"{role}: {' '.join(members[role])}" for role in names)])
    return {"text": text, "version": int(version), "roles": members}, True


def _single(line, query, answer):
    """The result of a one-line answer: the query's fields, then the answer's or the error."""
    if line.startswith("error "):
        return {**query, "text": line, "error": line[len("error ") :]}, False
    return {**query, **answer, "text": line}, True


if __name__ == "__main__":
    sys.exit(main())
