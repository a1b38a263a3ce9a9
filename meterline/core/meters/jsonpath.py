"""JSONPath compiled once into a getter ``data -> value | MISSING | Many``.

Simple paths (``$.a.b``, ``$.a[0]``, ``$['a']``) are compiled to a plain dict/list walk because
jsonpath-ng costs ~20µs per lookup, far beyond the processor's >100k events/s budget; anything else
falls back to jsonpath-ng (``jsonpath_ng.ext``). Both agree exactly (see tests/unit/test_meters.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from jsonpath_ng import jsonpath as _jp
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import parse as _jsonpath_parse

__all__ = ["MISSING", "Getter", "Many", "compile_path", "top_level_key"]


class _Missing:
    """Sentinel: the path matched nothing (distinct from a JSON null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Many(tuple[Any, ...]):
    """Several matches of one path (only jsonpath-ng paths can produce this)."""

    __slots__ = ()


Getter = Callable[[Any], Any]
"""data -> value | MISSING | Many(values)."""


def simple_steps(expr: Any) -> list[str | int] | None:
    """Flatten a jsonpath-ng AST made only of Root/Fields(one name)/Index(one index) children.

    Returns None for anything else (wildcards, filters, slices, unions, descendants...).
    """
    if type(expr) is _jp.Root:
        return []
    if type(expr) is _jp.Fields:
        fields = expr.fields
        if (
            len(fields) != 1
            or getattr(expr, "_deprecated_wildcard_use", False)
            or fields[0] == "*"
            or fields[0] == _jp.auto_id_field
        ):
            return None
        return [fields[0]]
    if type(expr) is _jp.Index:
        if len(expr.indices) != 1:
            return None
        return [int(expr.indices[0])]
    if type(expr) is _jp.Child:
        left = simple_steps(expr.left)
        if left is None:
            return None
        right = simple_steps(expr.right)
        if right is None or (type(expr.right) is _jp.Root):
            return None
        return left + right
    return None


def _fast_getter(steps: Sequence[str | int]) -> Getter:
    """A plain dict/list walk with jsonpath-ng's semantics for Fields and Index."""
    steps = tuple(steps)
    if not steps:
        return lambda data: data
    if len(steps) == 1 and isinstance(steps[0], str):
        key = steps[0]

        def get1(data: Any) -> Any:
            if isinstance(data, dict):
                return data.get(key, MISSING)
            return MISSING

        return get1

    def get(data: Any) -> Any:
        cur = data
        for step in steps:
            if isinstance(step, str):
                if not isinstance(cur, dict):
                    return MISSING
                cur = cur.get(step, MISSING)
                if cur is MISSING:
                    return MISSING
            else:
                if not isinstance(cur, (list, tuple)) or not -len(cur) <= step < len(cur):
                    return MISSING
                cur = cur[step]
        return cur

    return get


def _slow_getter(expr: Any) -> Getter:
    def get(data: Any) -> Any:
        found = expr.find(data)
        if not found:
            return MISSING
        if len(found) == 1:
            return found[0].value
        return Many(m.value for m in found)

    return get


@lru_cache(maxsize=4096)
def compile_path(path: str) -> Getter:
    """Compile a JSONPath once (cached) into a getter ``data -> value | MISSING``.

    Raises ValueError carrying the parser's message for an invalid path.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("JSONPath must be a non-empty string")
    try:
        expr = _jsonpath_parse(path)
    except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
        # jsonpath-ng raises bare Exception subclasses for some inputs; all are "invalid".
        raise ValueError(f"invalid JSONPath {path!r}: {exc}") from exc
    steps = simple_steps(expr)
    if steps is not None:
        return _fast_getter(steps)
    return _slow_getter(expr)


def jsonpath_ng_getter(path: str) -> Getter:
    """Always the jsonpath-ng evaluation; tests compare the fast path against it."""
    return _slow_getter(_jsonpath_parse(path))


@lru_cache(maxsize=4096)
def top_level_key(path: str) -> str | None:
    """``"model"`` for ``$.model`` or ``$['model']``: a path that is one dict lookup, else None.

    Most meters read top-level fields; `meterline.core.meters.reading` reads all of an event's with
    one ``dict.get`` each instead of one getter call per meter.
    """
    steps = simple_steps(_jsonpath_parse(path))
    if steps is not None and len(steps) == 1 and isinstance(steps[0], str):
        return steps[0]
    return None
