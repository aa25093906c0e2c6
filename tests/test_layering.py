"""Data flows one way through the package: a module imports only from lower layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "geoproxy"

# Lower number = lower layer. Modules of one layer do not import each other.
LAYERS: dict[str, int] = {
    "__init__": 0,
    "errors": 0,
    "countries": 0,
    "logs": 0,
    "hotmetrics": 0,
    "compat": 0,
    "chunks": 0,
    "control": 3,
    "sockets": 3,
    "worker_handle": 4,
    "metrics": 1,
    "schema": 1,
    "access": 1,
    "config": 2,
    "traffic": 2,
    "fleet": 3,
    "model": 3,
    "changes": 4,
    "clientip": 3,
    "geoip": 4,
    "resolver": 5,
    "health": 5,
    "router": 5,
    "responses": 5,
    "runtime": 6,
    "explain": 6,
    "headers": 6,
    "trace": 6,
    "upstream": 6,
    "policy": 7,
    "protocol": 7,
    "prelude": 7,
    "relay": 7,
    "websocket": 8,
    "status_page": 8,
    "forwarder": 9,
    "observe": 10,
    "admin": 10,
    "app": 11,
    "stamp": 11,  # the reference stamp package, checked on its own below
    "fastlane": 12,
    "server": 13,
    "demo": 13,
    "worker": 14,
    "supervisor": 15,
    "cli": 16,
    "__main__": 17,
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("geoproxy"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # `from geoproxy import x`
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("geoproxy."))
    return found


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {"stamp"}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", sorted(set(LAYERS) - {"stamp"}))
def test_module_imports_only_lower_layers(module: str) -> None:
    for imported in imports_of(PACKAGE / f"{module}.py"):
        if imported == "__version__":
            continue
        assert imported in LAYERS, f"{module} imports unknown geoproxy.{imported}"
        assert LAYERS[imported] < LAYERS[module] or imported == "__init__", (
            f"{module} (layer {LAYERS[module]}) imports {imported} (layer {LAYERS[imported]})"
        )


STAMP_MAY_USE = {"errors", "schema", "responses", "stamp"}


@pytest.mark.parametrize("module", sorted(p.stem for p in (PACKAGE / "stamp").glob("*.py")))
def test_stamp_shares_only_leaf_modules_with_the_proxy(module: str) -> None:
    used = imports_of(PACKAGE / "stamp" / f"{module}.py")
    assert used <= STAMP_MAY_USE, f"stamp.{module} imports {sorted(used - STAMP_MAY_USE)}"
