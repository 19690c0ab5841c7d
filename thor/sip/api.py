"""The loopback HTTP interface the SIP proxy beside thor-node asks (docs/sip.md), under /sip:

    GET  /sip/ring            200 {"version": V, "points": P, "sip_proxy": [ADDRESS, ...]}: the live
                              sip_proxy nodes (their requests are trusted) and the ring's points per
                              node, from which the SIP proxy computes each key's home itself, as
                              thor.lookup.ring does here (503 until this node has a network status)
    GET  /sip/home/KEY        200 the home node's address (what the SIP proxy asks when the ring is
                              too big to build in each of its processes) | 400 not a key | 503
    GET  /sip/domain/DOMAIN   200 when DOMAIN is provisioned | 404
    POST /sip/verify          {"key": KEY, "credentials": {username, realm, method, uri, nonce, nc,
                              cnonce, qop, response}}: 200 ok | 401 wrong | 403 disabled | 404 unknown
    GET  /sip/location/AOR    200 an rtjson routing document | 404 unknown | 480 offline

and 503 (with Retry-After) when the home node cannot answer in time. It is
served with the account cache (thor.accounts.cache) on [Node] accounts_listen.
"""

import json
import logging
import urllib.parse

from thor.lookup.ring import InvalidKeyError
from thor.lookup.table import NoMembersError
from thor.sip.location import localize
from thor.sip.service import UnavailableError
from thor.transport.http import reply

__all__ = ["RETRY_AFTER", "sip_application"]

log = logging.getLogger("thor.sip")

MAX_BODY = 8192
# What a device is told to wait for when a home node does not answer (a ring change settles in seconds).
RETRY_AFTER = 5
VERIFY_CODES = {"ok": "200 OK", "wrong": "401 Unauthorized", "disabled": "403 Forbidden", "unknown": "404 Not Found"}


def sip_application(service):
    def application(environ, start_response):
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        parts = path.strip("/").split("/", 2)
        if len(parts) < 2 or parts[0] != "sip":
            return _text(start_response, "404 Not Found", "not found: see /sip/")
        what, argument = parts[1], urllib.parse.unquote(parts[2]) if len(parts) > 2 else ""
        method = environ["REQUEST_METHOD"]
        try:
            if method == "POST" and what == "verify":
                return _verify(service, environ, start_response)
            if method != "GET":
                return _text(start_response, "405 Method Not Allowed", "GET, or POST /sip/verify")
            if what == "home":
                return _text(start_response, "200 OK", service.home(argument))
            if what == "ring":
                body = json.dumps(service.ring(), separators=(",", ":"))
                return reply(start_response, "200 OK", body, "application/json")
            if what == "domain":
                found = service.serves(argument)
                return _text(start_response, "200 OK" if found else "404 Not Found", "yes" if found else "no")
            if what == "location":
                return _location(service, argument, start_response)
            return _text(start_response, "404 Not Found", f"no such question: {what}")
        except InvalidKeyError as problem:
            return _text(start_response, "400 Bad Request", str(problem))
        except (NoMembersError, UnavailableError) as problem:
            log.warning("SIP proxy asked %s %s: %s", what, argument, problem)
            return _text(start_response, "503 Service Unavailable", str(problem), [("Retry-After", str(RETRY_AFTER))])

    return application


def _verify(service, environ, start_response):
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        return _text(start_response, "400 Bad Request", f"a JSON body of 1 to {MAX_BODY} bytes")
    try:
        body = json.loads(environ["wsgi.input"].read(length))
        key, credentials = body["key"], body["credentials"]
    except (ValueError, KeyError, TypeError):
        return _text(start_response, "400 Bad Request", 'expected {"key": ..., "credentials": {...}}')
    if not isinstance(key, str):
        return _text(start_response, "400 Bad Request", "key: expected user@domain")
    result = service.verify(key, credentials)
    return _text(start_response, VERIFY_CODES.get(result, "401 Unauthorized"), result)


def _location(service, aor, start_response):
    answer = service.location(aor)
    result = answer.get("result")
    if result == "ok":
        body = json.dumps(localize(answer["routing"], service.address), separators=(",", ":"))
        return reply(start_response, "200 OK", body, "application/json")
    if result == "offline":
        return _text(start_response, "480 Temporarily Unavailable", f"{aor} has no registered device")
    return _text(start_response, "404 Not Found", f"{aor} is not a subscriber")


def _text(start_response, status, body, headers=()):
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))), *headers]
    )
    return [data]
