"""Digest responses (thor.sip.digest): the home node's check and a device's answer agree."""

import hashlib
import re

import pytest

from thor.sip import digest

# RFC 2617, section 3.5.
RFC = {
    "username": "Mufasa",
    "realm": "testrealm@host.com",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
    "qop": "auth",
    "nc": "00000001",
    "cnonce": "0a4f113b",
    "response": "6629fae49393a05397450978507c4ef1",
}
RFC_HA1 = hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()


def fields_of(header, method):
    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', header.split(" ", 1)[1]))
    return digest.check_fields({**fields, "method": method})


def test_the_rfc_2617_example():
    fields = digest.check_fields(RFC)
    assert digest.expected_response(RFC_HA1, fields) == RFC["response"]
    assert digest.matches(RFC_HA1, fields)
    assert not digest.matches(hashlib.md5(b"Mufasa:testrealm@host.com:wrong").hexdigest(), fields)


@pytest.mark.parametrize("qop", ['qop="auth"', 'qop="auth,auth-int"', None])
def test_a_devices_answer_is_what_the_home_node_accepts(qop):
    challenge = 'Digest realm="example.com", nonce="abc123"' + (f", {qop}" if qop else "")
    header = digest.authorization("alice", "secret", "INVITE", "sip:bob@example.com", challenge)
    fields = fields_of(header, "INVITE")
    assert (fields.get("qop") == "auth") == (qop is not None)
    ha1 = hashlib.md5(b"alice:example.com:secret").hexdigest()
    assert digest.matches(ha1, fields)
    assert not digest.matches(hashlib.md5(b"alice:example.com:other").hexdigest(), fields)
