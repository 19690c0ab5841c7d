"""Digest responses (RFC 2617 / 7616, MD5) checked with the HA1 a home node holds.

An edge node receives a request with credentials but holds no HA1 for the
subscriber; it sends the credentials' fields to the subscriber's home node,
which answers whether the response matches. The HA1 never leaves its home.
The nonce is the edge's business (Kamailio checked it before asking).
authorization() is the other side, a device answering a challenge (the test
and benchmark devices of thor.loopback).
"""

import hashlib
import hmac
import os
import re

__all__ = ["DigestError", "authorization", "check_fields", "expected_response", "matches"]

# What a field of the Authorization header may hold: no control characters, bounded.
_TOKEN = re.compile(r"^[\x21-\x7e]{1,256}\Z")
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
FIELDS = ("username", "realm", "method", "uri", "nonce", "response")
OPTIONAL = ("qop", "nc", "cnonce")


class DigestError(ValueError):
    """Fields that do not make a digest response; str() says which."""


def _md5(text):
    return hashlib.md5(text.encode()).hexdigest()


def check_fields(fields):
    """A clean copy of the fields of a digest response, or DigestError."""
    if not isinstance(fields, dict):
        raise DigestError("the credentials are not an object")
    clean = {}
    for name in FIELDS + OPTIONAL:
        value = fields.get(name)
        if value is None or value == "":
            if name in FIELDS:
                raise DigestError(f"the credentials lack {name}")
            continue
        if not isinstance(value, str) or not _TOKEN.match(value):
            raise DigestError(f"the credentials' {name} is not a short token")
        clean[name] = value
    clean["response"] = clean["response"].lower()
    if not _HEX32.match(clean["response"]):
        raise DigestError("the response is not an MD5 digest")
    qop = clean.get("qop")
    if qop not in (None, "auth"):
        raise DigestError(f"qop {qop!r} is not supported (auth only)")
    if qop and not (clean.get("nc") and clean.get("cnonce")):
        raise DigestError("qop=auth needs nc and cnonce")
    return clean


def expected_response(ha1, fields):
    """The response a subscriber holding ha1 would have sent with these fields."""
    ha2 = _md5(f"{fields['method']}:{fields['uri']}")
    if fields.get("qop") == "auth":
        return _md5(f"{ha1}:{fields['nonce']}:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")
    return _md5(f"{ha1}:{fields['nonce']}:{ha2}")


def matches(ha1, fields):
    """Whether the (checked) fields carry the right response for ha1, compared in constant time."""
    return hmac.compare_digest(expected_response(ha1, fields), fields["response"])


def authorization(username, password, method, uri, challenge):
    """The Authorization / Proxy-Authorization value a device sends to answer challenge (a
    WWW-Authenticate / Proxy-Authenticate value): the response expected_response computes."""
    offered = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    realm, nonce = offered["realm"], offered["nonce"]
    fields = {"method": method, "uri": uri, "nonce": nonce}
    value = f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
    if "auth" in offered.get("qop", "").split(","):
        fields.update(qop="auth", nc="00000001", cnonce=os.urandom(8).hex())
        value += f', qop=auth, nc={fields["nc"]}, cnonce="{fields["cnonce"]}"'
    response = expected_response(_md5(f"{username}:{realm}:{password}"), fields)
    return f'{value}, response="{response}"'
