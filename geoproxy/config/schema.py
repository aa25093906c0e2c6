"""A small typed walker over parsed YAML that records problems with their path.

``Node`` wraps one value and the path that leads to it (``geodes[2].region``); its readers
return the typed value, or ``None`` after recording a problem, so a loader can keep going and
report every error in one pass.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from geoproxy.errors import ConfigError

_MISSING = object()


class Problems:
    """The problems found in one file, each line ``FILE: PATH: MESSAGE``."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{self.file}: {path}: {message}" if path else f"{self.file}: {message}")

    def __bool__(self) -> bool:
        return bool(self.lines)


class Node:
    __slots__ = ("_problems", "path", "value")

    def __init__(self, value: Any, path: str, problems: Problems) -> None:
        self.value = value
        self.path = path
        self._problems = problems

    @property
    def missing(self) -> bool:
        return self.value is _MISSING

    def problem(self, message: str) -> None:
        self._problems.add(self.path, message)

    def path_of(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else str(key)

    def get(self, key: str) -> Node:
        value = self.value.get(key, _MISSING) if isinstance(self.value, dict) else _MISSING
        return Node(value, self.path_of(key), self._problems)

    def keys(self) -> list[str]:
        return [str(k) for k in self.value] if isinstance(self.value, dict) else []

    def expect_mapping(
        self,
        allowed: Iterable[str] | None,
        required: Iterable[str] = (),
        allow_missing: bool = False,
    ) -> bool:
        """Check that this is a mapping with only ``allowed`` keys (any when ``None``) and
        every ``required`` key. False when it is not a mapping at all."""
        if self.missing or (self.value is None and allow_missing):
            if not allow_missing:
                self.problem("is required")
            return False
        if not isinstance(self.value, dict):
            self.problem(f"must be a mapping, got {_show(self.value)}")
            return False
        if allowed is not None:
            allowed = list(allowed)
            for key in self.value:
                if key not in allowed:
                    hint = difflib.get_close_matches(str(key), allowed, n=1)
                    also = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(allowed)}"
                    self._problems.add(self.path_of(str(key)), f"unknown key ({also})")
        for key in required:
            if key not in self.value:
                self._problems.add(self.path_of(key), "is required")
        return True

    def pairs(self) -> Iterator[tuple[str, Node]]:
        """Key/value pairs of an optional mapping."""
        if self.missing or self.value is None:
            return
        if not isinstance(self.value, dict):
            self.problem(f"must be a mapping, got {_show(self.value)}")
            return
        for key, value in self.value.items():
            yield str(key), Node(value, self.path_of(str(key)), self._problems)

    def items(self, optional: bool = False) -> list[Node]:
        """Elements of a list (a missing optional list is empty)."""
        if self.missing or (optional and self.value is None):
            if not optional:
                self.problem("is required")
            return []
        if not isinstance(self.value, list):
            self.problem(f"must be a list, got {_show(self.value)}")
            return []
        return [Node(v, self.path_of(i), self._problems) for i, v in enumerate(self.value)]

    def string(self, optional: bool = False) -> str | None:
        if self.missing or self.value is None:
            if not optional:
                self.problem("is required")
            return None
        if not isinstance(self.value, str) or not self.value.strip():
            self.problem(f"must be a non-empty string, got {_show(self.value)}")
            return None
        return self.value

    def integer(self, low: int, high: int, optional: bool = False) -> int | None:
        if self.missing:
            if not optional:
                self.problem("is required")
            return None
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"must be a whole number from {low} to {high}, got {_show(value)}")
            return None
        if not low <= value <= high:
            self.problem(f"must be from {low} to {high}, got {value}")
            return None
        return value

    def boolean(self, optional: bool = False) -> bool | None:
        if self.missing:
            if not optional:
                self.problem("is required")
            return None
        if not isinstance(self.value, bool):
            self.problem(f"must be true or false, got {_show(self.value)}")
            return None
        return self.value

    def choice(self, options: Iterable[str], optional: bool = False) -> str | None:
        text = self.string(optional)
        if text is None:
            return None
        options = tuple(options)
        norm = text.strip().lower()
        if norm not in options:
            self.problem(f"unknown value {text!r} (choose from: {', '.join(options)})")
            return None
        return norm

    def region(self, known: set[str], quiet: set[str] | None = None) -> str | None:
        """A reference to a declared region. ``quiet``: ids declared but invalid (reported
        where declared): a reference to one is not reported again."""
        text = self.string()
        if text is None:
            return None
        if not known or text in (quiet or ()):
            return None  # `regions` itself is broken and already reported; no flood
        if text not in known:
            hint = difflib.get_close_matches(text, sorted(known), n=1)
            also = f"; did you mean {hint[0]!r}?" if hint else ""
            self.problem(f"unknown region {text!r} (known: {', '.join(sorted(known))}){also}")
            return None
        return text


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(node: Node, allow_zero: bool = False) -> float | None:
    """``250ms``, ``5s``, ``1.5m``, ``1h`` -> seconds."""
    value = node.value
    if isinstance(value, int | float) and not isinstance(value, bool):
        node.problem(f"a duration needs a unit: {value!r} (e.g. '{value}s' or '{value}ms')")
        return None
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        node.problem(f"not a duration: {_show(value)} (e.g. 250ms, 5s, 1m)")
        return None
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds == 0 and not allow_zero:
        node.problem(f"must be longer than zero, got {value!r}")
        return None
    if seconds > 86400:
        node.problem(f"must be at most 24h, got {value!r}")
        return None
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)\s*$")
_SIZE_UNIT = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(node: Node) -> int | None:
    """``512B``, ``64KiB``, ``100MiB``, ``2GiB`` -> bytes."""
    value = node.value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        node.problem(f"not a size: {_show(value)} (e.g. 64KiB, 100MiB, 2GiB)")
        return None
    size = int(match.group(1)) * _SIZE_UNIT[match.group(2)]
    if size == 0:
        node.problem(f"must be larger than zero, got {value!r}")
        return None
    return size


def parse_http_url(node: Node) -> URL | None:
    """An http(s) URL with a host, no credentials, query or fragment, a valid port."""
    text = node.string()
    if text is None:
        return None
    try:
        url = URL(text.strip())
    except ValueError as exc:
        node.problem(f"malformed URL {text!r}: {exc}")
        return None
    if url.scheme not in ("http", "https"):
        node.problem(f"URL scheme must be http or https: {text!r}")
    elif not url.host:
        node.problem(f"URL has no host: {text!r}")
    elif url.user or url.password:
        node.problem(f"URL must not carry credentials: {text!r}")
    elif url.query_string or url.fragment:
        node.problem(f"URL must not have a query or fragment: {text!r}")
    elif (why := host_name_problem(url.raw_host or "")) is not None:
        node.problem(f"URL host can never resolve in DNS ({why}): {text!r}")
    else:
        try:
            url.port  # noqa: B018 -- yarl validates the port lazily
        except ValueError:
            node.problem(f"URL has an invalid port: {text!r}")
            return None
        return url
    return None


def host_name_problem(host: str) -> str | None:
    """Why a host name (IDNA-encoded, as in a URL) can never be looked up in DNS, or
    ``None``: a label over 63 bytes, an empty label, a name over 253 bytes (RFC 1035).
    One trailing dot (a fully qualified name) is allowed; IP literals pass."""
    if not host or ":" in host or re.fullmatch(r"[\d.]+", host):
        return None  # an IPv6 literal, or an IPv4 one (yarl rejects malformed literals)
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        return f"a name of {len(name)} bytes, at most 253"
    for label in name.split("."):
        if not label:
            return "an empty label: '..' or a leading dot"
        if len(label) > 63:
            return f"a label of {len(label)} bytes, at most 63"
    return None


def parse_statuses(node: Node) -> frozenset[int] | None:
    """A list of HTTP statuses and ranges: ``[200, 204, "300-399"]``."""
    out: set[int] = set()
    items = node.items()
    for item in items:
        value = item.value
        low = high = None
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and (m := re.match(r"^\s*(\d{3})\s*-\s*(\d{3})\s*$", value)):
            low, high = int(m.group(1)), int(m.group(2))
        if low is None or high is None or not 100 <= low <= high <= 599:
            item.problem(f"not an HTTP status or range: {_show(value)} (e.g. 200 or '200-299')")
            continue
        out.update(range(low, high + 1))
    if isinstance(node.value, list) and not node.value:  # not a list: already reported
        node.problem("must list at least one status")
    return frozenset(out) if out else None


class StrictBoolLoader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 booleans (only true/false: YAML 1.1's yes/no/on/off
    would turn Norway's country code ``NO`` into ``False``) that rejects duplicate keys
    (PyYAML silently keeps the last one: a second ``eu-west:`` would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    StrictBoolLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )


def read_yaml(path: Path) -> Any:
    return read_yaml_bytes(path)[0]


def read_yaml_bytes(path: Path, raw: bytes | None = None) -> tuple[Any, bytes]:
    """The parsed YAML and the exact bytes it came from (``raw``: those bytes, already
    read)."""
    if raw is None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    try:
        return yaml.load(text, Loader=StrictBoolLoader), raw
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from None


def read_side_file(
    path: Path,
    given: Mapping[str, bytes],
    read: list[bytes],
    keys: tuple[str, ...],
    allow_missing: bool = False,
) -> tuple[Node | None, Problems]:
    """A YAML file the config names (the region map, a tenant map): its top ``Node`` when
    it reads and is a mapping of ``keys``, else None; and its problems, as
    ``FILE: PATH: MESSAGE`` lines for the caller to file under the key that named it once
    the entries are read too. Its bytes join ``read`` (the config's fingerprint)."""
    try:
        data, raw = read_yaml_bytes(path, given.get(str(path)))
    except ConfigError as exc:
        failed = Problems("")
        failed.lines.extend(exc.problems)
        return None, failed
    read.append(raw)
    problems = Problems(str(path))
    top = Node(data, "", problems)
    return (top if top.expect_mapping(keys, allow_missing=allow_missing) else None), problems
