"""The one config loader: a YAML file and command-line ``key=value`` overrides onto a dataclass schema.

Precedence: schema defaults < YAML file < overrides (applied in order). Every problem found (unknown
keys, wrong types, unset required values) is collected and raised together as one ``ConfigError``
whose lines say where the value came from (``file:line`` or the override), the dotted key, the
expected type and the value given. The result is an instance of the schema: nested dataclasses and
plain lists, never a ``DictConfig``.

Plain code over PyYAML nodes is used rather than OmegaConf so that the messages carry YAML line
numbers and values are converted from the text the user wrote. Conversion rules:

- ``int``: decimal text, or a float text with an integral value (``1e6`` -> 1000000); never a bool.
- ``float``: any number text (``1e-3``, ``3``, ``.inf``); never a bool.
- ``bool``: ``true``/``false`` (YAML 1.1 ``yes``/``no``/``on``/``off`` too); ``1``/``0`` are refused.
- ``str``: the text exactly as written, so ``name: 3`` gives ``"3"`` and ``name: yes`` gives ``"yes"``
  (OmegaConf would give ``"3"`` and ``"True"``). An override whose value is not a YAML scalar
  (``name=[a]``, ``name=a: b``) is taken verbatim for a ``str`` field.
- ``X | None``: ``null`` (or ``~``, or an empty value) gives None.
- ``list[X]``: a YAML list; each item converted as ``X``. An override replaces the whole list.
- nested dataclass: a mapping, merged key by key onto the field's default. For ``Section | None``
  fields, ``null`` gives None and setting any key (``enc.width=3``) creates the section.

A field with no default, or with the default ``'???'`` (``omegaconf.MISSING``), is required; a plain
``???`` in YAML or an override marks a value as required again. An empty YAML file is allowed.
Fields declared ``init=False`` are not settable and are left out of ``to_dict``/``to_yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["MISSING_VALUE", "ConfigError", "flatten", "load_config", "to_dict", "to_yaml"]

T = TypeVar("T")

MISSING_VALUE = "???"  # same string as omegaconf.MISSING, so schemas may use either

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
_NO_DEFAULT = object()  # the field has no default at all
_UNSET = object()  # the user wrote a plain ??? : the value must come from a later source


class ConfigError(ValueError):
    """The configuration supplied by the user is unusable; the message says where and how to fix it.

    ``problems`` holds every problem found, one self-contained line each.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in the configuration:\n{lines}"
        super().__init__(message)


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


def _schema_keys(cls: type, prefix: str = "", seen: frozenset[type] = frozenset()) -> list[str]:
    """Every dotted key of the schema, sections included, in declaration order; checks every type."""
    keys = []
    for name, (_, tp) in _fields(cls).items():
        keys.append(prefix + name)
        section = _section_type(tp)
        if section is None:
            _check_leaf(tp, prefix + name)
        elif section not in seen:  # a self-referencing schema is walked once
            keys += _schema_keys(section, f"{prefix}{name}.", seen | {cls})
    return keys


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


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: str}


def _convert(tp: Any, node: yaml.Node) -> Any:
    """Convert a YAML node to the leaf type ``tp``; raises _BadValue naming expected type and value."""
    inner, optional = _split_optional(tp)
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


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where values come from: a YAML file (messages carry line numbers) or one override."""

    origin: str
    is_file: bool

    def at(self, node: yaml.Node) -> str:
        return f"{self.origin}:{node.start_mark.line + 1}" if self.is_file else self.origin


@dataclasses.dataclass
class _Given:
    """A value set by the user, already converted to its field's type."""

    value: Any
    origin: str


@dataclasses.dataclass
class _Section:
    """A fully resolved section, waiting to be instantiated (which runs its ``__post_init__``)."""

    cls: type
    key: str
    values: dict[str, Any]
    origins: list[str]


class _Loader:
    """Merges YAML and overrides into a tree of ``_Given`` leaves, then resolves it against the schema.

    Problems are collected in ``self.problems`` rather than raised, so the user sees all of them at once.
    """

    def __init__(self, schema: type, path: str | Path | None) -> None:
        self.schema = schema
        self.path = None if path is None else str(path)
        self.tree: dict[str, Any] = {}
        self.problems: list[str] = []
        self.all_keys = _schema_keys(schema)  # raises TypeError for unsupported types

    def unknown_key(self, cls: type, prefix: str, name: str) -> str:
        valid = list(_fields(cls))
        guesses = [prefix + c for c in difflib.get_close_matches(name, valid, n=3, cutoff=0.6)]
        if not guesses:  # maybe the right name at the wrong level, e.g. 'max_steps' for 'trainer.max_steps'
            guesses = [k for k in self.all_keys if k.rsplit(".", 1)[-1] == name]
        message = f"unknown key '{prefix}{name}'"
        if guesses:
            message += "; did you mean " + " or ".join(f"'{g}'" for g in guesses) + "?"
        level = f"keys under '{prefix[:-1]}'" if prefix else "top-level keys"
        return f"{message} (valid {level}: {', '.join(valid)})"

    def merge_mapping(self, cls: type, tree: dict, node: yaml.MappingNode, prefix: str, src: _Source) -> None:
        fields = _fields(cls)
        first_seen: dict[str, str] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else _show(key_node)
            if name not in fields:
                self.problems.append(f"{src.at(key_node)}: {self.unknown_key(cls, prefix, name)}")
            elif name in first_seen:  # PyYAML would silently keep the last one
                self.problems.append(
                    f"{src.at(key_node)}: duplicate key '{prefix}{name}' (first set at {first_seen[name]})"
                )
            else:
                first_seen[name] = src.at(key_node)
                self.assign(cls, tree, name, value_node, prefix, src)

    def assign(self, cls: type, tree: dict, name: str, node: yaml.Node, prefix: str, src: _Source) -> None:
        """Set field ``name`` of section ``cls`` from a YAML node (a later call overrides an earlier one)."""
        tp = _fields(cls)[name][1]
        key, section = prefix + name, _section_type(tp)
        # Only a plain ??? means "unset"; a quoted '???' is a string like any other.
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.value == MISSING_VALUE:
            tree[name] = _Given(_UNSET, src.origin)
        elif section is not None and isinstance(node, yaml.MappingNode):
            if not isinstance(tree.get(name), dict):
                tree[name] = {}
            self.merge_mapping(section, tree[name], node, key + ".", src)
        elif section is not None and _is_null(node) and _split_optional(tp)[1]:
            tree[name] = _Given(None, src.origin)
        elif section is not None:
            self.problems.append(
                f"{src.at(node)}: wrong type for '{key}': expected a mapping of {section.__name__} settings "
                f"(keys: {', '.join(_fields(section))}), got {_show(node)}"
            )
        else:
            try:
                tree[name] = _Given(_convert(tp, node), src.origin)
            except _BadValue as exc:
                self.problems.append(f"{src.at(node)}: wrong type for '{key}': {exc}")

    def merge_file(self, path: Path) -> None:
        node = _read_yaml(path)
        if node is None:  # empty file: nothing to merge
            return
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(
                f"{path}: the top level must be a mapping of settings (key: value lines), got {_show(node)}"
            )
        self.merge_mapping(self.schema, self.tree, node, "", _Source(str(path), is_file=True))

    def apply_override(self, text: str) -> None:
        src = _Source(f"command-line override {text!r}", is_file=False)
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            example = key if key in self.all_keys else next(iter(self.all_keys), "key")
            self.problems.append(f"{src.origin}: expected the form key=value, e.g. '{example}=...'")
            return
        cls, tree, prefix = self.schema, self.tree, ""
        *sections, name = key.split(".")
        for part in sections:
            if part not in _fields(cls):
                self.problems.append(f"{src.origin}: {self.unknown_key(cls, prefix, part)}")
                return
            section = _section_type(_fields(cls)[part][1])
            if section is None:
                self.problems.append(
                    f"{src.origin}: unknown key '{key}': '{prefix}{part}' is a single value "
                    f"({_type_name(_fields(cls)[part][1])}), not a section with keys"
                )
                return
            if not isinstance(tree.get(part), dict):
                tree[part] = {}
            cls, tree, prefix = section, tree[part], f"{prefix}{part}."
        if name not in _fields(cls):
            self.problems.append(f"{src.origin}: {self.unknown_key(cls, prefix, name)}")
            return
        str_target = _split_optional(_fields(cls)[name][1])[0] is str
        try:
            node = _parse_override_value(raw, str_target)
        except _BadValue as exc:
            self.problems.append(f"{src.origin}: {exc}")
            return
        self.assign(cls, tree, name, node, prefix, src)

    def resolve(self, cls: type, tree: dict, prefix: str, base: Any) -> _Section:
        """Fill every field from the tree or its default; unset required values become problems."""
        values: dict[str, Any] = {}
        origins: list[str] = []
        for name, (field, tp) in _fields(cls).items():
            key, entry, section = prefix + name, tree.get(name), _section_type(tp)
            if isinstance(entry, _Given):
                origins.append(entry.origin)
                value = entry.value
            else:
                value = _default(field, base)
            if section is not None and (
                isinstance(entry, dict) or value is _NO_DEFAULT or isinstance(value, section)
            ):
                # Untouched sections are resolved too, so required values inside them are named; a section
                # with no default at all is built from its own class defaults.
                base_value = value if isinstance(value, section) else None
                sub = self.resolve(section, entry if isinstance(entry, dict) else {}, key + ".", base_value)
                origins += sub.origins
                values[name] = sub
            elif value is _UNSET or value is _NO_DEFAULT or (entry is None and value == MISSING_VALUE):
                where = f"in {self.path}" if self.path else "in a YAML config file"
                self.problems.append(
                    f"required value '{key}' ({_type_name(tp)}) is not set: set it {where} "
                    f"or on the command line as '{key}=...'"
                )
            else:
                values[name] = value
        return _Section(cls, prefix[:-1], values, origins)


def _default(field: dataclasses.Field, base: Any) -> Any:
    """The value a field takes when nobody sets it: the enclosing default instance's, else its own."""
    if base is not None:  # base is already this load's own copy
        return getattr(base, field.name)
    if field.default is not dataclasses.MISSING:
        # A class-level default instance (frozen dataclasses are allowed) is shared: copy it, so one
        # loaded config never aliases another's lists.
        return copy.deepcopy(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _NO_DEFAULT


def _read_yaml(path: Path) -> yaml.Node | None:
    if not path.exists():
        looked = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        raise ConfigError(f"config file not found: '{path}'{looked}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from exc
    try:
        return yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{path}{position}: invalid YAML: {exc.problem}{context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def _instantiate(section: _Section) -> Any:
    """Build the dataclass instances bottom-up; a ``__post_init__`` ValueError becomes a ConfigError."""
    kwargs = {n: _instantiate(v) if isinstance(v, _Section) else v for n, v in section.values.items()}
    try:
        return section.cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        origins = list(dict.fromkeys(section.origins))
        sources = f"set from {', '.join(origins)}" if origins else "schema defaults only"
        where = f"'{section.key}'" if section.key else "the configuration"
        raise ConfigError(f"invalid settings in {where} ({sources}): {exc}") from exc


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``schema`` defaults, then the YAML file at ``path``, then ``key=value`` overrides, in order.

    Returns an instance of ``schema`` (nested dataclasses, plain lists). Raises ``ConfigError`` listing
    every problem in the file and the overrides, and ``TypeError`` if the schema itself is unsupported.
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"load_config needs a dataclass type as schema, got {schema!r}")
    if isinstance(overrides, str):  # a lone string would be iterated character by character
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    loader = _Loader(schema, path)
    if path is not None:
        loader.merge_file(Path(path))
    for override in overrides:
        loader.apply_override(override)
    resolved = loader.resolve(schema, loader.tree, "", None)
    if loader.problems:
        raise ConfigError(loader.problems)
    return _instantiate(resolved)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config instance as plain nested dicts and lists (settable fields only)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return {name: _plain(getattr(cfg, name)) for name in _fields(type(cfg))}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _ConfigDumper(yaml.SafeDumper):
    """Writes lists of scalars on one line, like hand-written configs, and quotes a literal '???'."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, list | dict) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # A plain ??? would read back as "unset", so a string that happens to be ??? is quoted.
    style = "'" if data == MISSING_VALUE else None
    return dumper.represent_scalar(_STR_TAG, data, style=style)


_ConfigDumper.add_representer(list, _represent_list)
_ConfigDumper.add_representer(str, _represent_str)


def to_yaml(cfg: Any) -> str:
    """The config instance as YAML text that ``load_config`` reads back to an equal instance."""
    return yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)


def flatten(cfg: Any) -> dict[str, str | int | float | bool | None]:
    """Dotted keys to scalar values in declaration order, lists as their ``str`` (e.g. for MLflow params).

    Takes a config instance or a nested mapping.
    """
    flat: dict[str, str | int | float | bool | None] = {}
    _flatten_into(flat, "", cfg if isinstance(cfg, Mapping) else to_dict(cfg))
    return flat


def _flatten_into(flat: dict[str, Any], prefix: str, mapping: Mapping[str, Any]) -> None:
    for name, value in mapping.items():
        if isinstance(value, Mapping):
            _flatten_into(flat, f"{prefix}{name}.", value)
        elif isinstance(value, list | tuple):
            flat[prefix + name] = str(_plain(value))
        else:
            flat[prefix + name] = value
