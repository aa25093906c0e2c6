"""The documentation stays true to the tree: every relative link in README.md and docs/*.md
points at a file that exists (and at a heading that exists, when it names one), every
module is in docs/architecture.md, and README's configuration table names every config key
the loader knows, and no other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from geoproxy.config import loader as config
from geoproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"#{1,6} (.+)")


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    slugs = [
        re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for line in prose(path)
        if (m := HEADING.fullmatch(line))
    ]
    return set(slugs)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc: Path) -> None:
    broken = []
    for target in (m.group(1) for line in prose(doc) for m in LINK.finditer(line)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_every_module_is_in_the_architecture_table() -> None:
    table = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "geoproxy"
    modules = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))]
    assert [m for m in modules if f"| `{m}` |" not in table] == []


PROBE = "zz_not_a_key"  # a key no section has: its error lists the section's known keys


def config_table() -> dict[str, str]:
    """The README's configuration table: every key it documents, spelled out
    (``health_check.interval`` / ``jitter`` is two), with its row's meaning."""
    text = (ROOT / "README.md").read_text().split("| key | default | meaning |\n")[1]
    keys: dict[str, str] = {}
    for row in text.split("\n\n")[0].splitlines()[1:]:
        first, *more = re.findall(r"`([^`]+)`", row.split("|")[1])
        parent = first.rpartition(".")[0]
        for key in (first, *more):
            if key.startswith("."):  # `listen.proxy.host` / `.port`
                key = parent + key
            elif key is not first and "." not in key and parent:  # `.interval` / `jitter`
                key = f"{parent}.{key}"
            keys[key] = row
    return keys


def known_keys(sections: set[str]) -> dict[str, set[str]]:
    """Each section's keys, as the config loader names them for an unknown one."""
    doc: dict[str, Any] = {}
    for section in sections:
        node = doc
        for name in section.split(".") if section else ():
            node = node.setdefault(name, {})
        node[PROBE] = 1
    text = yaml.safe_dump(doc).replace("[]:\n", ":\n-").replace("<id>", "eu-west")
    with pytest.raises(ConfigError) as raised:
        config.load("probe.yaml", given={"probe.yaml": text.encode()})
    found = {}
    for line in raised.value.problems:
        if m := re.fullmatch(rf"probe.yaml: (.*?)\.?{PROBE}: unknown key \(known: (.*)\)", line):
            section = m.group(1).replace("[0]", "[]").replace("eu-west", "<id>")
            found[section] = set(m.group(2).split(", "))
    return found


def test_the_config_table_documents_every_config_key_and_no_other() -> None:
    table = config_table()
    sections = {k.rsplit(".", 1)[0] for k in table if "." in k and "<" not in k.rsplit(".", 1)[1]}
    sections |= {k for k in table if k.endswith("[]")}
    known = known_keys(sections | {""})
    assert sections | {""} <= set(known), "documented as a section, but no mapping of keys"
    for section, keys in known.items():
        prefix = f"{section}." if section else ""
        documented = {
            k[len(prefix) :].split(".")[0].split("[")[0]
            for k in table
            if k.startswith(prefix) and k != section
        }
        if section.endswith("[]"):  # a list: its fields are named in the row's meaning
            documented = set(re.findall(r"`([a-z_]+)`", table[section]))
            assert keys <= documented, (section, keys - documented)
        else:
            assert documented == keys, (section or "top level", documented ^ keys)
