"""Data flows one way through the package, stage by stage (docs/architecture.md).

Each stage is a subpackage. A module imports only modules of its own stage or of a lower
one; the modules of one stage import each other without cycles; the foundation
(``errors``, the package's ``__version__``) imports nothing of ours; and the reference
stamp shares only a few leaf modules with the proxy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "geoproxy"

#: Lowest first. "" is the foundation: the top-level modules every stage may use.
STAGES = ("", "config", "health", "routing", "proxy", "surfaces", "process")
FOUNDATION = {"__init__", "errors"}
ENTRY = "__main__"  # `python -m geoproxy`: above every stage
#: What the reference stamp may take from the proxy's side: leaf modules only.
STAMP_MAY_USE = {"errors", "config.schema", "config.pem", "proxy.responses"}


def name_of(path: Path) -> str:
    """``geoproxy/proxy/relay.py`` -> ``proxy.relay``; ``geoproxy/errors.py`` -> ``errors``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {name_of(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def imports_of(path: Path) -> set[str]:
    """The geoproxy modules a file imports, named as ``name_of`` names them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "geoproxy"
        ):
            base = node.module.split(".")[1:]
            for alias in node.names:  # `from geoproxy.proxy import compat` names a module
                dotted = ".".join([*base, alias.name])
                if dotted in MODULES:
                    found.add(dotted)
                elif ".".join(base) in MODULES:
                    found.add(".".join(base))
                elif not base:  # `from geoproxy import __version__`
                    found.add("__init__")
                else:
                    found.add(".".join(base) + ".__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("geoproxy."):
                    found.add(alias.name.removeprefix("geoproxy."))
    return found


def test_every_module_is_in_a_stage_or_the_foundation() -> None:
    stray = [
        m
        for m in MODULES
        if stage_of(m) not in (*STAGES, "stamp") and m not in FOUNDATION | {ENTRY}
    ]
    top = {m for m in MODULES if stage_of(m) == ""} - FOUNDATION - {ENTRY}
    assert stray == [] and top == set(), "a module outside the stages"
    for stage in [*STAGES[1:], "stamp"]:
        assert (PACKAGE / stage / "__init__.py").read_text().startswith('"""'), (
            f"{stage}/__init__.py says what the stage is"
        )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if stage_of(m) != "stamp"))
def test_module_imports_only_its_own_or_lower_stages(module: str) -> None:
    for imported in imports_of(MODULES[module]):
        assert imported in MODULES, f"{module} imports unknown geoproxy.{imported}"
        if module == ENTRY:
            continue
        if module in FOUNDATION:
            assert imported == "__init__", f"the foundation module {module} imports {imported}"
            continue
        if stage_of(imported) == "stamp":
            assert stage_of(module) == "process", f"{module} uses the stamp"
            assert imported in ("stamp.__init__", "stamp.config", "stamp.serve"), (
                f"{module} reaches into the stamp's internals ({imported})"
            )
            continue
        rank = STAGES.index
        assert rank(stage_of(imported)) <= rank(stage_of(module)), (
            f"{module} (stage {stage_of(module)}) imports {imported} "
            f"(the later stage {stage_of(imported)})"
        )


def test_no_import_cycles_within_a_stage() -> None:
    graph = {m: imports_of(p) & set(MODULES) for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path, module])
        if module in done:
            return
        for imported in sorted(graph[module]):
            if imported.endswith("__init__"):
                continue
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


@pytest.mark.parametrize("module", sorted(m for m in MODULES if stage_of(m) == "stamp"))
def test_stamp_shares_only_leaf_modules_with_the_proxy(module: str) -> None:
    used = {m for m in imports_of(MODULES[module]) if stage_of(m) != "stamp"}
    assert used <= STAMP_MAY_USE, f"{module} imports {sorted(used - STAMP_MAY_USE)}"


def test_the_proxy_stage_knows_nothing_of_who_serves_it() -> None:
    """The fast lane and the forwarder name what they need of the Gateway as protocols
    (``fastlane.Host``); they import neither the process nor the surfaces."""
    for module in (m for m in MODULES if stage_of(m) == "proxy"):
        later = {m for m in imports_of(MODULES[module]) if stage_of(m) in ("surfaces", "process")}
        assert later == set(), f"{module} imports {sorted(later)}"
