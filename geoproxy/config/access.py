"""Edge access control: what stops at the proxy listener and never reaches a geode.

Pure decisions over values, used by both request paths (``Forwarder.refusal``), by
``geoproxy route --path`` and by the admin ``/route?path=``:

- methods: ``CONNECT`` never (a reverse proxy does not tunnel), ``TRACE`` only with
  ``forwarding.forward_trace`` (cross-site tracing);
- paths: the config's ordered ``access`` rules (``AccessRules.decide``).

How a path is read. The request path as it is forwarded (without its query) is split at
``/`` and each segment is percent-decoded once. A decoded ``/`` or ``\\``, a literal ``\\``
(IIS reads it as ``/``), a NUL, or decoded bytes that are not UTF-8 make the path
*unsafe*: a geode could read it as something no rule can name, so it gets a 400 instead of
a guess. A safe path is then read each way geodes are known to differ:

- ``;`` parameters kept, or cut from every segment (servlet containers read
  ``/a;x=1/b`` as ``/a/b``, and ``..;`` as ``..``);
- empty segments kept (RFC 3986) or merged (``//a`` as ``/a``: nginx, most frameworks);
- dot segments removed as RFC 3986 5.2.4 does (``/a/../b`` is ``/b``), in every reading;
- letters as sent, or lower-cased (a case-insensitive geode).

For each reading the rules are walked in order and the first whose ``path_prefix`` the
reading starts with decides it; no match allows it. The request is denied when any
reading is denied. So a deny rule cannot be dodged by spelling the path differently, and
an allow rule (an exception before a broader deny) lets a request through only if it holds
however the geode reads the path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

DENY, ALLOW = "deny", "allow"
#: ``geoproxy_requests_denied_total{rule}`` for what no configured rule decides; a rule's
#: own name cannot contain ``:``.
CONNECT_REFUSED, TRACE_REFUSED, UNSAFE_PATH = "method:CONNECT", "method:TRACE", "path:unsafe"
#: What a 405 names as forwarded (TRACE only with ``forwarding.forward_trace``).
ALLOWED_METHODS = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
#: Verdicts remembered per rule list (the request paths of a busy edge repeat); a path
#: beyond this clears them.
CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One entry of ``access``."""

    name: str  # the metric label and access-log value: as given, else ``access[N]``.
    path_prefix: str  # matched against each reading of the path (see the module doc);
    # a plain string prefix: ``/replication/`` fences that folder, ``/metrics`` also
    # ``/metrics/x`` and ``/metricsx``. Written decoded and normalised (validated).
    action: str  # deny | allow (an exception to a later, broader deny).
    status: int = 404  # a denied request's answer: 404 (the default: the path does not
    # exist as far as the internet can tell) or 403.
    folded: str = field(init=False, repr=False, compare=False)  # path_prefix lower-cased

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded", self.path_prefix.lower())


UNSAFE = AccessRule(UNSAFE_PATH, "", DENY, 400)


class Decision(NamedTuple):
    allowed: bool
    rule: AccessRule | None  # denied: the rule (``UNSAFE`` for an unsafe path); allowed:
    # the rule that matched the path as sent, if any


ALLOWED = Decision(True, None)


def refused_method(method: str, forward_trace: bool) -> str | None:
    """The label of a method the edge refuses (405), or None."""
    if method == "CONNECT":
        return CONNECT_REFUSED
    if method == "TRACE" and not forward_trace:
        return TRACE_REFUSED
    return None


def prefix_problem(prefix: str) -> str | None:
    """What is wrong with a rule's ``path_prefix``, or None."""
    if not prefix.startswith("/"):
        return f"must start with '/': {prefix!r}"
    for bad, why in (
        ("?", "a query"),
        ("#", "a fragment"),
        (";", "a ';' parameter (geodes may cut it off)"),
        ("%", "percent-encoding (write the path decoded)"),
        ("\\", "a backslash"),
    ):
        if bad in prefix:
            return f"must not contain {why}: {prefix!r}"
    if any(not c.isprintable() for c in prefix):
        return f"must not contain control characters: {prefix!r}"
    normal = _resolve(prefix.split("/")[1:], merge=True)
    if normal != prefix:
        return f"not a normalised path: {prefix!r} (geodes read it as {normal!r})"
    return None


class AccessRules:
    """A config's rules in order, with the verdicts of recent paths."""

    __slots__ = ("_cache", "_folded", "_prefixes", "rules")

    def __init__(self, rules: tuple[AccessRule, ...]) -> None:
        self.rules = rules
        self._prefixes = tuple(r.path_prefix for r in rules)
        self._folded = tuple(r.folded for r in rules)
        self._cache: dict[str, Decision] = {}

    def decide(self, target: str) -> Decision:
        """The verdict on a request target in origin-form (a query is ignored)."""
        if not self.rules:
            return ALLOWED
        path = target.partition("?")[0]
        found = self._cache.get(path)
        if found is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            found = self._cache[path] = self._decide(path)
        return found

    def _decide(self, path: str) -> Decision:
        if path == "*":  # OPTIONS *: the server, no path
            return ALLOWED
        first = self._first
        if path.startswith("/") and _READ_ALIKE.search(path) is None:
            matched = [first(path, False), first(path.lower(), True)]  # all there are
        else:
            segments = _segments(path or "/")
            if segments is None:
                return Decision(False, UNSAFE)
            matched = [first(text, folded) for text, folded in _readings(segments)]
        rules = self.rules
        denied = [i for i in matched if i is not None and rules[i].action == DENY]
        if denied:  # named by the first such rule in the list, however it was reached
            return Decision(False, rules[min(denied)])
        return Decision(True, None if matched[0] is None else rules[matched[0]])

    def _first(self, text: str, folded: bool) -> int | None:
        """The index of the first rule that decides one reading."""
        for index, prefix in enumerate(self._folded if folded else self._prefixes):
            if text.startswith(prefix):
                return index
        return None


#: A path with none of these reads the same every way but for case (the common case,
#: decided without splitting it): no escape, parameter, empty or dot segment, backslash.
_READ_ALIKE = re.compile(r"[%;\\\0]|//|/\.")


def _segments(path: str) -> list[str] | None:
    """The decoded segments of a path, or None when it is unsafe to read."""
    if not path.startswith("/") or "\\" in path or "\0" in path:
        return None
    out = []
    for raw in path.split("/")[1:]:
        if "%" in raw:
            try:
                data = unquote_to_bytes(raw)
                if b"/" in data or b"\\" in data or b"\0" in data:
                    return None
                raw = data.decode("utf-8")
            except UnicodeError:
                return None
        out.append(raw)
    return out


def _readings(segments: list[str]) -> dict[tuple[str, bool], None]:
    """Every way a geode may read these segments: (path, lower-cased), as sent first."""
    cut = [s.partition(";")[0] for s in segments]
    out: dict[tuple[str, bool], None] = {}
    for variant in (segments, cut):
        for merge in (False, True):
            text = _resolve(variant, merge)
            out[(text, False)] = None
            out[(text.lower(), True)] = None
    return out


def _resolve(segments: list[str], merge: bool) -> str:
    """The path of these segments with dot segments removed (RFC 3986 5.2.4) and, with
    ``merge``, empty ones dropped; a trailing ``/`` stays."""
    out: list[str] = []
    last = len(segments) - 1
    for index, seg in enumerate(segments):
        if seg == "." or seg == "..":
            if seg == ".." and out:
                out.pop()
            if index == last:
                out.append("")
        elif seg or not merge or index == last:
            out.append(seg)
    return "/" + "/".join(out)
