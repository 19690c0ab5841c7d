import configparser
import os
import re

import pytest

from thor.config import ConfigError, Section, ThorNetworkConfig, TLSConfig, load_config
from thor.datatypes import Boolean, DomainName, Endpoint, EndpointList, Float, Integer, NameList, Port

# The checkout (its etc/ and tests/programs/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In the source tree, or as thor-common installs it (debian/tests).
SAMPLE = next(
    path
    for path in (os.path.join(ROOT, "etc", "config.ini.sample"), "/etc/thor/config.ini.sample")
    if os.path.exists(path)
)


def write(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    return str(path)


def test_values_are_parsed_with_their_types(tmp_path):
    path = write(
        tmp_path,
        "[ThorNetwork]\ndomain = SipThor.Example.COM.\n"
        "event_servers = 10.0.0.1, es2.example.com:8001, [2001:db8::1]:9000\n"
        "[TLS]\nca = tls/ca.crt\nhandshake_timeout = 2.5\n",
    )
    network, tls = load_config(path, ThorNetworkConfig, TLSConfig)
    assert network.domain == "sipthor.example.com"
    assert network.event_servers == (("10.0.0.1", 8000), ("es2.example.com", 8001), ("2001:db8::1", 9000))
    assert tls.ca == str(tmp_path / "tls" / "ca.crt")  # relative to the config file's folder
    assert tls.certificate == "/etc/thor/tls/node.crt"  # default
    assert tls.handshake_timeout == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ThorNetwork]\n", "[ThorNetwork] domain: required, expected a DNS domain name"),
        ("[ThorNetwork]\ndomain = not a domain\n", "[ThorNetwork] domain = 'not a domain': expected a DNS domain"),
        (
            "[ThorNetwork]\ndomain = a.example\nevent_servers = 10.0.0.1:99999\n",
            "[ThorNetwork] event_servers = '10.0.0.1:99999': expected a comma separated list of host[:port]",
        ),
        (
            "[ThorNetwork]\ndomain = a.example\ndomian = b\n",
            "[ThorNetwork] domian: unknown key (known keys: address, discovery_interval, domain, ",
        ),
        ("[ThorNetwork]\ndomain = a.example\n[TLS]\nhandshake_timeout = soon\n", "[TLS] handshake_timeout = 'soon'"),
        ("[ThorNetwork]\ndomain = a.example\n[TLS]\nhandshake_timeout = 0\n", "a number from 0.1 to 300"),
        ("[ThorNetwork]\ndomain = a\ndomain = b\n", "option 'domain' in section 'ThorNetwork' already exists"),
        ("domain = a.example\n", "File contains no section headers"),
    ],
)
def test_bad_configuration_fails_with_one_line_naming_file_section_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, ThorNetworkConfig, TLSConfig)
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith(path)
    assert message in line


def test_missing_file_is_an_error_only_when_required(tmp_path):
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match=r"nope.ini: cannot read configuration: No such file"):
        load_config(missing, TLSConfig)
    (tls,) = load_config(missing, TLSConfig, required=False)
    assert tls.crl == "/etc/thor/tls/crl.pem"
    # Defaults cannot stand in for a required value.
    with pytest.raises(ConfigError, match=r"\[ThorNetwork\] domain: required"):
        load_config(missing, ThorNetworkConfig, required=False)


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "config.ini"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path), TLSConfig)


def test_cross_key_validation_names_the_section(tmp_path):
    class Window(Section):
        name = "TestWindow"
        low = _setting(Integer(0), "1")
        high = _setting(Integer(0), "2")

        def validate(self):
            if self.low > self.high:
                raise ValueError("low: expected at most high")

    path = write(tmp_path, "[TestWindow]\nlow = 5\n")
    with pytest.raises(ConfigError, match=r"\[TestWindow\] low: expected at most high"):
        load_config(path, Window)
    Section.registry.pop("TestWindow")


def _setting(kind, default):
    from thor.config import Setting

    return Setting(kind, default, "test")


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (Boolean(), [("yes", True), ("Off", False), ("1", True)], ["maybe", ""]),
        (Integer(1, 10), [("1", 1), ("10", 10)], ["0", "11", "1.5", "x"]),
        (Float(0.5), [("0.5", 0.5), ("1e3", 1000.0)], ["0.1", "nan", "inf", ""]),
        (Port(), [("5060", 5060)], ["0", "65536", "http"]),
        (DomainName(), [("Example.COM.", "example.com"), ("_sip._udp.x", "_sip._udp.x")], ["", "a..b", "-a.b", "a b"]),
        (
            Endpoint(8000),
            [("es1", ("es1", 8000)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]", ("::1", 8000))],
            ["a:b:c", "[::1", "[x]:1", "host:0", "a b"],
        ),
        (EndpointList(8000), [("", ()), ("a, b:2", (("a", 8000), ("b", 2)))], ["a,,b:x"]),
        (NameList(), [("", ()), ("my_role, other", ("my_role", "other"))], ["Bad-Role"]),
    ],
)
def test_datatypes(kind, good, bad):
    for text, value in good:
        assert kind.parse(text) == value
    for text in bad:
        with pytest.raises(ValueError):
            kind.parse(text)


def import_every_program():
    """Every module that declares a configuration section, so that all are registered."""
    import importlib

    for module in (
        "thor.pki",
        "thor.eventserver.config",
        "thor.manager.config",
        "thor.node.config",
        "thor.lookup.config",
        "thor.ngnpro.config",
        "thor.database.config",
        "thor.dns.config",
    ):
        importlib.import_module(module)


def test_sample_documents_every_key_with_its_default():
    """etc/config.ini.sample must list every section and key the code reads, with the code's default."""
    import_every_program()

    parser = configparser.ConfigParser(interpolation=None)
    sample_keys = {}
    section = None
    with open(SAMPLE) as stream:
        for line in stream:
            header = re.match(r"^\[(\w+)\]", line)
            if header:
                section = header.group(1)
                sample_keys.setdefault(section, {})
                continue
            setting = re.match(r"^;(\w+) = ?(.*)$", line.rstrip("\n"))
            if setting and section:
                sample_keys[section][setting.group(1)] = setting.group(2)
    parser.read(SAMPLE)
    for name, section_class in Section.registry.items():
        assert name in sample_keys, f"[{name}] missing from the sample"
        for key, setting in section_class.settings().items():
            assert key in sample_keys[name], f"[{name}] {key} missing from the sample"
            expected = setting.default if setting.default is not None else ""
            assert sample_keys[name][key] == expected, f"[{name}] {key}: sample default differs"
    for name, keys in sample_keys.items():
        if name in Section.registry:
            unknown = set(keys) - set(Section.registry[name].settings())
            assert not unknown, f"[{name}] sample documents unknown keys {unknown}"


def test_sample_uncommented_is_a_valid_configuration(tmp_path):
    """Uncommenting every default (and giving the required domain and password) yields a configuration that loads."""
    import_every_program()

    with open(SAMPLE) as stream:
        text = stream.read()
    text = re.sub(r"^;(\w+ = ?.*)$", r"\1", text, flags=re.MULTILINE)
    text = re.sub(r"^domain =$", "domain = sipthor.example.com", text, flags=re.MULTILINE)
    text = re.sub(r"^password =$", "password = twelve-chars-at-least", text, flags=re.MULTILINE)
    path = write(tmp_path, text)
    loaded = load_config(path, *Section.registry.values())
    network = loaded[list(Section.registry).index("ThorNetwork")]
    assert network.domain == "sipthor.example.com"
    pki_config = loaded[list(Section.registry).index("PKI")]
    assert pki_config.crl_days == 30


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:9501", True),
        ("[::1]:9501", True),
        ("localhost:9501", True),
        ("0.0.0.0:9501", False),
        ("192.0.2.7", False),
    ],
)
def test_thor_node_serves_its_account_cache_beyond_loopback_only_with_a_credential(tmp_path, listen, loopback):
    from thor.node.config import NodeConfig

    path = write(tmp_path, f"[Node]\naccounts_listen = {listen}\n")
    if loopback:
        (node,) = load_config(path, NodeConfig)
        assert node.accounts_on_loopback
    else:
        with pytest.raises(ConfigError, match="not a loopback address, where anyone who reaches it would read"):
            load_config(path, NodeConfig)
    credential = "a-secret-of-the-sip-proxy"
    (node,) = load_config(
        write(tmp_path, f"[Node]\naccounts_listen = {listen}\naccounts_credential = {credential}\n"), NodeConfig
    )
    assert node.accounts_on_loopback is loopback and node.accounts_credential == credential
    with pytest.raises(ConfigError, match="accounts_credential: at least 16 characters"):
        load_config(write(tmp_path, f"[Node]\naccounts_listen = {listen}\naccounts_credential = short\n"), NodeConfig)
