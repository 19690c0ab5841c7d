"""The rollout's own settings, read as an operator about to run site.yml against production."""

import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ansible_checks_host_keys():
    """A host impersonated to the controller would receive config.ini with the network's passwords."""
    config = configparser.ConfigParser()
    assert config.read(os.path.join(ROOT, "ansible.cfg"))
    assert config.getboolean("defaults", "host_key_checking", fallback=True)
    for inventory in ("lab", "production"):
        with open(os.path.join(ROOT, "inventories", inventory, "hosts.yml")) as stream:
            assert "StrictHostKeyChecking=no" not in stream.read()
