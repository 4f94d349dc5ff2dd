"""What Pinterest's spec says about a proxied call: its resource and rate-limit category.

Both come from the vendored spec (via `endpoints_data`), so they form fixed sets: safe as
metric labels, and the scopes Pinterest itself rate-limits in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pinauth.pinterest.endpoints_data import OPERATIONS

OTHER = "other"


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    parameter: _Node | None = None
    categories: dict[str, str] = field(default_factory=dict)  # method -> category


def _build() -> _Node:
    root = _Node()
    for method, template, category in OPERATIONS:
        node = root
        for segment in template.split("/"):
            if segment.startswith("{"):
                node.parameter = node.parameter or _Node()
                node = node.parameter
            else:
                node = node.literal.setdefault(segment, _Node())
        node.categories[method] = category
    return root


_ROOT = _build()
RESOURCES: frozenset[str] = frozenset(_ROOT.literal)
CATEGORIES: frozenset[str] = frozenset(category for _, _, category in OPERATIONS)


def resource(path: str) -> str:
    """The path's first segment if Pinterest's spec knows it, else `other`."""
    first = path.split("/", 1)[0]
    return first if first in RESOURCES else OTHER


def _walk(node: _Node, segments: list[str], index: int) -> _Node | None:
    if index == len(segments):
        return node
    segment = segments[index]
    # A literal beats a parameter (`pins/analytics` is not `pins/{pin_id}`), but a
    # literal branch that dead-ends must still fall back to the parameter.
    child = node.literal.get(segment)
    if child is not None:
        found = _walk(child, segments, index + 1)
        if found is not None:
            return found
    if node.parameter is not None:
        return _walk(node.parameter, segments, index + 1)
    return None


def rate_limit_category(method: str, path: str) -> str:
    """The `x-ratelimit-category` of the operation `method path` hits, else `other`."""
    node = _walk(_ROOT, path.split("/"), 0)
    if node is None:
        return OTHER
    return node.categories.get(method, OTHER)
