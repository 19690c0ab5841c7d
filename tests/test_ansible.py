"""The rollout's own settings, read as an operator about to run site.yml against production."""

import configparser
import glob
import os
import re

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ansible_checks_host_keys():
    """A host impersonated to the controller would receive config.ini with the network's passwords."""
    config = configparser.ConfigParser()
    assert config.read(os.path.join(ROOT, "ansible.cfg"))
    assert config.getboolean("defaults", "host_key_checking", fallback=True)
    for inventory in ("lab", "production"):
        with open(os.path.join(ROOT, "inventories", inventory, "hosts.yml")) as stream:
            assert "StrictHostKeyChecking=no" not in stream.read()


# A Jinja expression naming a secret: a password, the nonce secret.
SECRET = re.compile(r"\{\{[^}]*(password|secret)[^}]*\}\}")
# Modules that print nothing of their arguments (a check, the inclusion of other tasks, which
# are checked themselves).
SILENT = {"ansible.builtin.assert", "ansible.builtin.include_role", "ansible.builtin.import_role"}


def role_tasks():
    """(role folder, task) of every task of every role, blocks included."""
    for path in sorted(glob.glob(os.path.join(ROOT, "roles", "*", "tasks", "*.yml"))):
        with open(path) as stream:
            pending = list(yaml.safe_load(stream) or [])
        while pending:
            task = pending.pop()
            pending.extend(task.get("block", []) + task.get("rescue", []) + task.get("always", []))
            yield os.path.dirname(os.path.dirname(path)), task


def test_every_task_that_handles_a_secret_keeps_it_out_of_the_output():
    """--diff and -v print a task's arguments and the files it writes: every task given a password or
    secret, writing a template holding one, or writing /etc/thor/config.ini (the host's passwords)
    has no_log."""
    exposed = []
    for role, task in role_tasks():
        module = next((key for key in task if key.startswith("ansible.") or key.startswith("community.")), None)
        if module is None or module in SILENT or task.get("no_log"):
            continue
        handled = yaml.safe_dump({module: task[module], "environment": task.get("environment")})
        if module == "ansible.builtin.template":
            with open(os.path.join(role, "templates", task[module]["src"])) as stream:
                handled += stream.read()
        arguments = task[module] if isinstance(task[module], dict) else {}
        writes = str(arguments.get("path", arguments.get("dest", "")))
        if SECRET.search(handled) or writes == "/etc/thor/config.ini":
            exposed.append(f"{os.path.basename(role)}: {task.get('name')}")
    assert exposed == []
