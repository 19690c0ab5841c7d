"""Value types of configuration settings.

Each type parses the text of an INI value and, on failure, raises ValueError
whose message says what is expected; the configuration loader turns that into
one line naming file, section and key.
"""

import ipaddress
import math
import re

from thor.roles import RoleError, check_role_name

__all__ = [
    "Boolean",
    "Choice",
    "Datatype",
    "DomainName",
    "Endpoint",
    "EndpointList",
    "Float",
    "Integer",
    "NameList",
    "NetworkList",
    "Path",
    "Port",
    "String",
]


class Datatype:
    """Base of the setting types: parse(text) -> value."""

    expected = "a value"

    def parse(self, text):
        return text


class String(Datatype):
    expected = "a string"

    def __init__(self, allow_empty=True):
        self.allow_empty = allow_empty
        if not allow_empty:
            self.expected = "a non-empty string"

    def parse(self, text):
        if not text and not self.allow_empty:
            raise ValueError(self.expected)
        return text


class Path(Datatype):
    """A file system path; relative paths are taken from the config file's folder."""

    expected = "a file system path"

    def __init__(self, allow_empty=False):
        self.allow_empty = allow_empty

    def parse(self, text):
        if not text and not self.allow_empty:
            raise ValueError(self.expected)
        return text


class Choice(Datatype):
    def __init__(self, *choices):
        self.choices = choices
        self.expected = "one of " + ", ".join(choices)

    def parse(self, text):
        if text not in self.choices:
            raise ValueError(self.expected)
        return text


class Boolean(Datatype):
    expected = "yes or no (also true/false, on/off, 1/0)"
    _values = {
        "yes": True,
        "true": True,
        "on": True,
        "1": True,
        "no": False,
        "false": False,
        "off": False,
        "0": False,
    }

    def parse(self, text):
        try:
            return self._values[text.lower()]
        except KeyError:
            raise ValueError(self.expected) from None


class Integer(Datatype):
    def __init__(self, minimum=None, maximum=None):
        self.minimum = minimum
        self.maximum = maximum
        self.expected = "an integer" + _range_text(minimum, maximum)

    def parse(self, text):
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(self.expected) from None
        _check_range(value, self.minimum, self.maximum, self.expected)
        return value


class Port(Integer):
    def __init__(self):
        super().__init__(1, 65535)
        self.expected = "a port number from 1 to 65535"


class Float(Datatype):
    def __init__(self, minimum=None, maximum=None):
        self.minimum = minimum
        self.maximum = maximum
        self.expected = "a number" + _range_text(minimum, maximum)

    def parse(self, text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(self.expected) from None
        if not math.isfinite(value):
            raise ValueError(self.expected)
        _check_range(value, self.minimum, self.maximum, self.expected)
        return value


_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def _check_hostname(text):
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ValueError
    return name.lower()


class DomainName(Datatype):
    expected = "a DNS domain name such as sipthor.example.com"

    def __init__(self, allow_empty=False):
        self.allow_empty = allow_empty

    def parse(self, text):
        if not text and self.allow_empty:
            return ""
        try:
            return _check_hostname(text)
        except ValueError:
            raise ValueError(self.expected) from None


class Endpoint(Datatype):
    """host[:port] or [ipv6]:port; host is an IP address or a DNS name (allow_empty: "" is None)."""

    def __init__(self, default_port, allow_empty=False):
        self.default_port = default_port
        self.allow_empty = allow_empty
        self.expected = f"host[:port] (port defaults to {default_port}; IPv6 as [addr]:port)"
        if allow_empty:
            self.expected += ", or nothing"

    def parse(self, text):
        text = text.strip()
        if not text and self.allow_empty:
            return None
        host, port = text, self.default_port
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(self.expected)
            host, rest = text[1:end], text[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(self.expected)
                port = self._port(rest[1:])
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(self.expected) from None
            return host, port
        if text.count(":") == 1:
            host, port_text = text.split(":")
            port = self._port(port_text)
        elif text.count(":") > 1:
            raise ValueError(self.expected)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                host = _check_hostname(host)
            except ValueError:
                raise ValueError(self.expected) from None
        return host, port

    def _port(self, text):
        try:
            port = int(text, 10)
        except ValueError:
            raise ValueError(self.expected) from None
        if not 1 <= port <= 65535:
            raise ValueError(self.expected)
        return port


class EndpointList(Datatype):
    """A comma separated list of endpoints, possibly empty."""

    def __init__(self, default_port):
        self.endpoint = Endpoint(default_port)
        self.expected = "a comma separated list of " + self.endpoint.expected

    def parse(self, text):
        endpoints = []
        for item in text.split(","):
            if item.strip():
                try:
                    endpoints.append(self.endpoint.parse(item))
                except ValueError:
                    raise ValueError(f"{self.expected}; {item.strip()!r} is not one") from None
        return tuple(endpoints)


class NetworkList(Datatype):
    """A comma separated list of IP addresses or networks (192.0.2.7, 10.0.0.0/8, 2001:db8::/32)."""

    expected = "a comma separated list of IP addresses or networks"

    def parse(self, text):
        networks = []
        for item in text.split(","):
            if item.strip():
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    raise ValueError(f"{self.expected}; {item.strip()!r} is not one") from None
        return tuple(networks)


class NameList(Datatype):
    """A comma separated list of role names, possibly empty."""

    expected = "a comma separated list of role names (lowercase letters, digits, underscores)"

    def parse(self, text):
        names = []
        for item in text.split(","):
            name = item.strip()
            if name:
                try:
                    names.append(check_role_name(name))
                except RoleError:
                    raise ValueError(f"{self.expected}; {name!r} is not one") from None
        return tuple(names)


def _range_text(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    if maximum is not None:
        return f" of at most {maximum}"
    return ""


def _check_range(value, minimum, maximum, expected):
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(expected)
