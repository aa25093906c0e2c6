"""What the stamp takes as an item value: JSON within bounds. Values are checked without
recursion, so no input can exhaust the stack, here or on a peer that receives it later."""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Containers (arrays, objects) inside one another in a value, at most.
MAX_DEPTH = 32
#: An item's (or a counter's) id.
ID = re.compile(r"^[A-Za-z0-9._~:@!$'()*+,;=-]{1,200}$")
ID_RULE = "1 to 200 characters: letters, digits and ._~:@!$'()*+,;=-"


class BadValue(ValueError):
    """A body or value the stamp does not take; ``code`` for the JSON error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are refused)")


def loads(raw: bytes | str) -> Any:
    """Parse JSON text; BadValue if it is not JSON (NaN and Infinity included)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadValue("too_deep", f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadValue("bad_json", f"body is not valid JSON: {exc}") from None


def check(value: Any, what: str = "value") -> None:
    """BadValue unless ``value`` nests at most MAX_DEPTH containers deep and every number
    in it is finite (``1e999`` parses to infinity)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise BadValue(
                    "too_deep",
                    f"{what} nests deeper than {MAX_DEPTH} levels (the limit is {MAX_DEPTH})",
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadValue(
                "bad_number", f"{what} holds a number out of range ({item}): numbers must be finite"
            )
