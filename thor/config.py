"""Declarative INI configuration.

One file, /etc/thor/config.ini, serves every program: shared sections
([ThorNetwork], [TLS]) and one section per program. A section is a class whose
Setting attributes give each key's type, default and meaning; the default is
written as text, exactly as it appears in etc/config.ini.sample, and parsed
by the same type as the file's value.

Any error -- a missing file named on the command line, INI syntax, an unknown
key, a value of the wrong type, a missing required value -- raises
ConfigError with one line naming file, section, key and what is expected.
"""

import configparser
import os

from thor.datatypes import Datatype, DomainName, EndpointList, Float, Integer, Path, String

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "Section",
    "Setting",
    "TLSConfig",
    "ThorNetworkConfig",
    "load_config",
]

DEFAULT_CONFIG_PATH = "/etc/thor/config.ini"

EVENT_SERVER_PORT = 8000


class ConfigError(Exception):
    """A configuration problem; str() is one line for the operator."""


class Setting:
    """One key of a section.

    kind: a Datatype; default: the default as INI text, or None when the key
    is required; description: one or more sentences for the sample file.
    """

    def __init__(self, kind, default, description):
        if not isinstance(kind, Datatype):
            raise TypeError("kind must be a Datatype")
        self.kind = kind
        self.default = default
        self.description = description
        self.name = None

    def __set_name__(self, owner, name):
        self.name = name

    @property
    def required(self):
        return self.default is None


class Section:
    """Base of configuration sections; subclasses set `name` and Settings."""

    name = None
    registry = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name is None:
            raise TypeError(f"{cls.__name__} must set a section name")
        for setting in cls.settings().values():
            if setting.default is not None:
                try:
                    setting.kind.parse(setting.default)
                except ValueError as error:
                    raise TypeError(f"[{cls.name}] {setting.name}: bad default: {error}") from None
        Section.registry[cls.name] = cls

    @classmethod
    def settings(cls):
        found = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if isinstance(value, Setting):
                    found[key] = value
        return found

    def __init__(self, values=None, source="<defaults>", base_dir="."):
        """Build from a mapping of key -> INI text; keys not given take defaults."""
        values = dict(values or {})
        settings = self.settings()
        for key in values:
            if key not in settings:
                known = ", ".join(sorted(settings))
                raise ConfigError(f"{source}: [{self.name}] {key}: unknown key (known keys: {known})")
        for key, setting in settings.items():
            text = values.get(key, setting.default)
            if text is None:
                raise ConfigError(f"{source}: [{self.name}] {key}: required, expected {setting.kind.expected}")
            text = text.strip()
            try:
                value = setting.kind.parse(text)
            except ValueError as error:
                raise ConfigError(f"{source}: [{self.name}] {key} = {text!r}: expected {error}") from None
            if isinstance(setting.kind, Path) and value and not os.path.isabs(value):
                value = os.path.normpath(os.path.join(base_dir, value))
            # Settings are class attributes; the parsed value shadows them per instance.
            self.__dict__[key] = value
        try:
            self.validate()
        except ValueError as error:
            raise ConfigError(f"{source}: [{self.name}] {error}") from None

    def validate(self):
        """Cross-key checks; raise ValueError('key: what is expected')."""

    def __repr__(self):
        values = ", ".join(f"{key}={self.__dict__[key]!r}" for key in self.settings())
        return f"{type(self).__name__}({values})"


class ThorNetworkConfig(Section):
    name = "ThorNetwork"
    domain = Setting(
        DomainName(),
        None,
        "The network's DNS domain; every node of one SIP Thor network uses the same. Required.",
    )
    address = Setting(
        String(),
        "",
        "This host's IP address as announced to the network. Empty: the IP address in this node's "
        "certificate, else the address its node name resolves to.",
    )
    event_servers = Setting(
        EndpointList(EVENT_SERVER_PORT),
        "",
        "Event servers as host[:port], comma separated (port 8000 when omitted). "
        "Empty: discover them through the _eventserver._tcp SRV records of the domain.",
    )
    nameservers = Setting(
        EndpointList(53),
        "",
        "DNS servers for event server discovery, host[:port] (port 53 when omitted), "
        "comma separated. Empty: those of /etc/resolv.conf.",
    )
    discovery_interval = Setting(
        Float(1, 86400), "60", "Seconds between SRV lookups of the event servers (when discovered through DNS)."
    )
    ring_points = Setting(
        # At most 20000: 100 nodes x 20000 points is already about 55 MB of rings per role.
        Integer(1, 20000),
        "4000",
        "Virtual points each node owns on the lookup rings (docs/lookup-protocol.md). Must be the same "
        "on every host of the network, or hosts disagree on who is responsible for a subscriber.",
    )


class TLSConfig(Section):
    name = "TLS"
    ca = Setting(Path(), "/etc/thor/tls/ca.crt", "The provider CA certificate (PEM).")
    certificate = Setting(Path(), "/etc/thor/tls/node.crt", "This node's certificate (PEM), issued by thor-pki.")
    private_key = Setting(Path(), "/etc/thor/tls/node.key", "This node's private key (PEM, mode 0600).")
    crl = Setting(
        Path(),
        "/etc/thor/tls/crl.pem",
        "The provider CRL (PEM). Required: without a CRL every peer is refused. "
        "Re-read on SIGHUP and when the file changes.",
    )
    learned_crl = Setting(
        Path(allow_empty=True),
        "/var/lib/thor/crl.pem",
        "Where this host keeps a newer CRL than `crl` that another member handed over (the CRL "
        "spreads over the bus, docs/pki.md); writable by the thor user. Empty: take none.",
    )
    handshake_timeout = Setting(
        Float(0.1, 300),
        "5",
        "Seconds a peer has to complete the TLS handshake before it is dropped.",
    )
    crl_check_interval = Setting(
        Float(0.1, 3600),
        "5",
        "Seconds between checks of the CA, certificate, key and CRL files for changes.",
    )


def load_config(path, *section_classes, required=True):
    """Read path and return one instance per section class, in order.

    required=False lets a missing file stand for "all defaults" (used when the
    program was started without --config and the default file is absent).
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str.lower
    if os.path.exists(path) or required:
        try:
            with open(path, encoding="utf-8") as stream:
                parser.read_file(stream, source=path)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read configuration: {error.strerror or error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason})") from None
        except configparser.Error as error:
            raise ConfigError(f"{path}: {_one_line(error)}") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    result = []
    for section_class in section_classes:
        values = dict(parser.items(section_class.name)) if parser.has_section(section_class.name) else {}
        result.append(section_class(values, source=path, base_dir=base_dir))
    return result


def _one_line(error):
    text = " ".join(str(error).split())
    return text.replace("While reading from ", "").strip()
