"""Nested parameter trees addressed by path: 'layers_0/attention/query/kernel'.

Checkpoint loading and the converters compare and map parameters by these paths, so the
flattening and the strict comparison of two trees live here, once. Pure Python (no jax), so the
scaling tools can use `flatten` for their nested results too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# How many names a mismatch report lists before it says "and N more".
REPORT_LIMIT = 8


def flatten(tree: Mapping[str, Any], separator: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}; any Mapping is a node, anything else a leaf."""
    out: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{separator}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(value, path)
            else:
                out[path] = value

    visit(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], separator: str = "/") -> dict[str, Any]:
    """Inverse of `flatten`: {'a/b': x} -> {'a': {'b': x}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(separator)
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def shape_differences(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                      found_label: str, expected_label: str) -> list[str]:
    """What keeps `found` (path -> shape) from matching `expected`, one phrase per kind of problem.

    Empty when both have the same paths with the same shapes. The phrases name the missing paths,
    the unexpected ones and the shape mismatches ('path: <found_label> (..) vs <expected_label> (..)'),
    at most REPORT_LIMIT of each.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{name}: {found_label} {tuple(found[name])} vs {expected_label} {tuple(expected[name])}"
                  for name in sorted(set(expected) & set(found)) if tuple(found[name]) != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_few(mismatched)}")
    return problems


def _few(items: list[str]) -> str:
    extra = len(items) - REPORT_LIMIT
    return str(items[:REPORT_LIMIT]) + (f" and {extra} more" if extra > 0 else "")
