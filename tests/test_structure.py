"""The shape of the code: which layer may import which, and one home for every contract string.

Layers point one way: the Pulumi program -> the deployer -> the contract <- the node side. The
lab and the tests stand outside and drive the product through its real entry points.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from edgecdn import contract

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted(
    [*ROOT.glob("edgecdn/**/*.py"), *ROOT.glob("site_sync/**/*.py"), ROOT / "__main__.py", ROOT / "lab.py"]
)
THIRD_PARTY_NODE = {"brotli"}  # Debian's python3-brotli, installed on every node


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute and dotted."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


def layer(path: Path) -> str:
    name = rel(path)
    if name == "edgecdn/contract.py":
        return "contract"
    if name.startswith("edgecdn/node/agent/"):
        return "agent"
    if name.startswith("edgecdn/node/"):
        return "node"
    if name.startswith("site_sync/"):
        return "deployer"
    if name == "lab.py":
        return "lab"
    return "program"


def allowed(importer: str, module: str) -> bool:
    """Whether a file of layer `importer` may import `module`."""
    ours = module.split(".")[0] in {"edgecdn", "site_sync", "lab"}
    if module.startswith("edgecdn.node.agent") and importer != "agent":
        return False  # nothing imports the agent program; the node files read it as data
    if module.split(".")[0] == "lab" and importer != "lab":
        return False
    if importer == "contract":
        return is_stdlib(module)
    if importer == "agent":
        return (
            is_stdlib(module) or module in THIRD_PARTY_NODE or module.startswith(("edgecdn.contract", "edgecdn.node"))
        )
    if importer == "node":
        return not ours or module.startswith(("edgecdn.contract", "edgecdn.node"))
    if importer == "deployer":
        return not ours or module.startswith(("edgecdn.contract", "site_sync"))
    return True  # the program and the lab may import the deployer, the node files and the contract


@pytest.mark.parametrize("path", PRODUCT, ids=rel)
def test_layers_point_one_way(path):
    wrong = sorted(m for m in imports(path) if not allowed(layer(path), m) and m != "edgecdn")
    assert not wrong, f"{rel(path)} ({layer(path)}) may not import {wrong}"


def test_the_rule_catches_the_imports_that_once_made_cycles():
    assert not allowed("deployer", "lab")
    assert not allowed("deployer", "edgecdn.node.agent.protocol")
    assert not allowed("deployer", "edgecdn.edge_node")
    assert not allowed("node", "edgecdn.edge_node")
    assert not allowed("program", "edgecdn.node.agent.store")
    assert not allowed("agent", "pulumi")
    assert allowed("program", "site_sync.handoff") and allowed("deployer", "edgecdn.contract")


def contract_strings() -> dict[str, str]:
    """Strings that only edgecdn/contract.py may spell, by the name they have there."""
    return {
        "HEALTH_PATH": contract.HEALTH_PATH,
        "HEALTH_FILE": contract.HEALTH_FILE,
        "HEALTH_MARKER": contract.HEALTH_MARKER,
        "RESERVED_PREFIX": contract.RESERVED_PREFIX.rstrip("/"),
        "RELEASE_ID": contract.RELEASE_ID.pattern,
        "RELEASE_ID (body)": "[0-9a-f]{20}",
        "DOMAIN": contract.DOMAIN.pattern,
        "NODE_NAME": contract.NODE_NAME.pattern,
        "SHA256_HEX": contract.SHA256_HEX.pattern,
    }


def string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize("path", [p for p in PRODUCT if rel(p) != "edgecdn/contract.py"], ids=rel)
def test_contract_strings_are_spelled_only_in_the_contract(path):
    exact = {contract.LAYOUT_FILE, *contract.RULE_FILES}
    found = [
        f"line {line}: {name} {text[:60]!r}"
        for line, text in string_constants(path)
        for name, value in contract_strings().items()
        if value in text
    ] + [f"line {line}: {text!r}" for line, text in string_constants(path) if text in exact]
    assert not found, f"{rel(path)} spells contract strings; import them from edgecdn.contract: {found}"


def test_the_check_sees_a_second_spelling(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Docs may say /.well-known/edgecdn/health."""\nPATH = "/.well-known/edgecdn/health"\n')
    texts = [text for _, text in string_constants(planted)]
    assert texts == ["/.well-known/edgecdn/health"], "the docstring is prose; the constant is a second spelling"
