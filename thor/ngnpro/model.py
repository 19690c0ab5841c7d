"""What NGNPro provisions, and the rules its input must follow.

A SIP domain holds accounts (username@domain) and aliases (another
username@domain that leads to an account). Passwords are never stored: an
account keeps the two digest hashes SIP proxies check credentials with
(Kamailio's auth_db with calculate_ha1=no):

    ha1  = md5("username:domain:password")
    ha1b = md5("username@domain:domain:password")
"""

import hashlib
import re

from thor.lookup.ring import MAX_KEY_LENGTH, normalize_key

__all__ = [
    "InvalidInputError",
    "account_record",
    "check_domain",
    "check_password",
    "check_sip_id",
    "check_username",
    "digests",
]

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}\Z")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
MIN_PASSWORD = 8
MAX_PASSWORD = 128
MAX_TEXT = 128


class InvalidInputError(ValueError):
    """Input that breaks a rule; str() names the field and the rule."""


def check_username(value):
    value = (value or "").strip().lower()
    if not _USERNAME.match(value):
        raise InvalidInputError("username: expected 1 to 64 of a-z 0-9 . _ + -, starting with a letter or digit")
    return value


def check_domain(value):
    value = (value or "").strip().lower().rstrip(".")
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise InvalidInputError("domain: expected a DNS name such as example.com")
    return value


def check_sip_id(username, domain, name="id"):
    """(username, domain) of an account or alias, checked; together they are its ring key, so they
    must fit in one (docs/lookup-protocol.md)."""
    username, domain = check_username(username), check_domain(domain)
    if len(username) + 1 + len(domain) > MAX_KEY_LENGTH:
        raise InvalidInputError(f"{name}: username@domain may have at most {MAX_KEY_LENGTH} characters")
    return username, domain


def check_password(value):
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD or not value.isprintable():
        raise InvalidInputError(f"password: expected {MIN_PASSWORD} to {MAX_PASSWORD} printable characters")
    return value


def check_text(name, value):
    value = "" if value is None else str(value).strip()
    if len(value) > MAX_TEXT or not value.isprintable():
        raise InvalidInputError(f"{name}: expected at most {MAX_TEXT} printable characters")
    return value


def check_email(value):
    value = check_text("email", value)
    if value and (value.count("@") != 1 or " " in value or value.startswith("@") or value.endswith("@")):
        raise InvalidInputError("email: expected name@domain")
    return value


def digests(username, domain, password):
    ha1 = hashlib.md5(f"{username}:{domain}:{password}".encode()).hexdigest()  # the SIP digest, RFC 2617
    ha1b = hashlib.md5(f"{username}@{domain}:{domain}:{password}".encode()).hexdigest()
    return ha1, ha1b


def sip_key(username, domain):
    """The ring key of an account or alias (docs/lookup-protocol.md)."""
    return normalize_key(f"{username}@{domain}")


def account_record(row):
    """The account as pushed to nodes and returned by the API (no password, ever)."""
    username, domain, ha1, ha1b, first_name, last_name, email, enabled = row
    return {
        "username": username,
        "domain": domain,
        "ha1": ha1,
        "ha1b": ha1b,
        "first_name": first_name,
        "last_name": last_name,
        "email": email,
        "enabled": enabled,
    }
