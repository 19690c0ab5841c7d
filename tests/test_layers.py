"""The package's layering, read from its imports: no daemon imports another daemon, and the
core (everything but the daemons and the command-line tools) imports no daemon."""

import ast
import pathlib

import thor

PACKAGE = pathlib.Path(thor.__file__).parent
DAEMONS = {"eventserver", "manager", "node", "database", "dns", "monitor", "ngnpro"}
TOOLS = {"cli"}


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def package_of(module):
    parts = module.split(".")
    return parts[1] if parts[0] == "thor" and len(parts) > 1 else None


def test_no_daemon_imports_another_and_the_core_imports_none():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        own = relative[0] if len(relative) > 1 else None
        for module in imported_modules(path):
            target = package_of(module)
            if target in DAEMONS and target != own and own not in TOOLS:
                wrong.append(f"{'/'.join(relative)} imports {module}")
    assert wrong == []
