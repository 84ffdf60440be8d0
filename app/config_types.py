"""Schema introspection and YAML-node conversion for ``app.config.load_config``.

Internal to the loader (import the public API from ``app.config``): what keys and types a dataclass
schema has, and how one PyYAML node or one override value becomes a value of a field's type. Nothing
here knows about files, overrides or OmegaConf; a value that does not fit raises ``_BadValue`` and the
loader adds the key and the source.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

import yaml

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
_MISSING_SPELLING = re.compile(r"\\*\?\?\?")  # what OmegaConf reads as "unset" unless escaped


@functools.cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Settable fields of a dataclass with their resolved types (string annotations included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(rest) == 1:
            return rest[0], True
    return tp, False


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a field type (``S`` or ``S | None``), or None for a leaf."""
    inner, _ = _split_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    if optional:
        return f"{_type_name(inner)} | None"
    if typing.get_origin(inner) is list:
        return f"list[{_type_name(typing.get_args(inner)[0])}]"
    return getattr(inner, "__name__", repr(inner))


def _check_leaf(tp: Any, key: str) -> None:
    """Refuse leaf types the loader cannot convert (a bug in the schema, not in the user's config)."""
    inner, _ = _split_optional(tp)
    if typing.get_origin(inner) is list and len(typing.get_args(inner)) == 1:
        return _check_leaf(typing.get_args(inner)[0], key)
    if inner not in (int, float, bool, str):
        raise TypeError(
            f"config schema field '{key}' has unsupported type {tp!r}; supported: int, float, bool, str, "
            "list[X], X | None and nested dataclasses"
        )


def _schema_types(cls: type, prefix: str = "", seen: frozenset[type] = frozenset()) -> dict[str, Any]:
    """Every dotted key of the schema (sections included) to its type, in declaration order."""
    if fixed := [f.name for f in dataclasses.fields(cls) if not f.init]:
        raise TypeError(
            f"config schema {cls.__name__} declares {fixed} with init=False; OmegaConf would set them after "
            "__post_init__ and overwrite what it computed: use a property instead"
        )
    types_ = {}
    for name, (_, tp) in _fields(cls).items():
        types_[prefix + name] = tp
        section = _section_type(tp)
        if section is None:
            _check_leaf(tp, prefix + name)
        elif section not in seen:  # a self-referencing schema is walked once
            types_ |= _schema_types(section, f"{prefix}{name}.", seen | {cls})
    return types_


class _BadValue(Exception):
    """A value does not fit its type; the caller adds the key and the source."""


def _show(node: yaml.Node) -> str:
    """A short rendering of the value the user gave, for messages."""
    if isinstance(node, yaml.ScalarNode):
        text = "null" if _is_null(node) else repr(node.value)
    elif isinstance(node, yaml.SequenceNode):
        text = "[" + ", ".join(_show(item) for item in node.value) + "]"
    else:
        text = "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in node.value) + "}"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _is_reference(node: yaml.Node) -> bool:
    """A value with ``${...}`` in it: left as text for OmegaConf to resolve after the merge."""
    return isinstance(node, yaml.ScalarNode) and not _is_null(node) and "${" in node.value


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        number = float(text)  # raises ValueError for non-numbers, which the caller reports
        if not number.is_integer():
            raise
        return int(number)


def _to_float(text: str) -> float:
    return _YAML_FLOATS[text.lower()] if text.lower() in _YAML_FLOATS else float(text)


def _to_bool(text: str) -> bool:
    if text.lower() not in _BOOLS:
        raise ValueError(text)
    return _BOOLS[text.lower()]


def _to_str(text: str) -> str:
    # OmegaConf reads ??? as "unset" and \??? as the text ???: one more backslash keeps the text as written.
    return "\\" + text if _MISSING_SPELLING.fullmatch(text) else text


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def _convert(tp: Any, node: yaml.Node) -> Any:
    """Convert a YAML node to the leaf type ``tp``; raises _BadValue naming expected type and value."""
    inner, optional = _split_optional(tp)
    if _is_reference(node):
        return node.value
    if _is_null(node):
        if optional:
            return None
        raise _BadValue(f"expected {_type_name(tp)}, got null")
    if typing.get_origin(inner) is list:
        if not isinstance(node, yaml.SequenceNode):
            raise _BadValue(f"expected {_type_name(tp)}, got {_show(node)} (a list is written [a, b, c])")
        items = []
        for i, item in enumerate(node.value):
            try:
                items.append(_convert(typing.get_args(inner)[0], item))
            except _BadValue as exc:
                raise _BadValue(f"expected {_type_name(tp)}, got {_show(node)}: item {i}: {exc}") from None
        return items
    if not isinstance(node, yaml.ScalarNode):
        raise _BadValue(f"expected {_type_name(tp)}, got {_show(node)}")
    try:
        return _SCALARS[inner](node.value)
    except ValueError:
        raise _BadValue(f"expected {_type_name(tp)}, got {_show(node)}") from None


def _parse_override_value(text: str, str_target: bool) -> yaml.Node:
    """Parse the value half of ``key=value`` as YAML, so ``3``, ``1e-3``, ``true``, ``[0, 1]`` are typed."""
    try:
        node = yaml.compose(text) if text.strip() else None
    except yaml.YAMLError as exc:
        if not str_target:
            reason = getattr(exc, "problem", None) or str(exc)
            raise _BadValue(f"value {text!r} is not valid YAML ({reason})") from None
        node = None
    if node is None or (str_target and not isinstance(node, yaml.ScalarNode)):
        node = yaml.ScalarNode(_STR_TAG, text, style="'")
    return node
