"""The one config loader: a YAML file and command-line ``key=value`` overrides onto a dataclass schema.

Precedence: schema defaults < YAML file < overrides (applied in order). OmegaConf merges them
(``OmegaConf.structured(schema)`` with one layer per source), resolves ``${...}`` references and builds
the result with ``OmegaConf.to_object``, which runs each ``__post_init__``: nested dataclasses and
plain lists, never a ``DictConfig``.

First, plain code walks the PyYAML nodes and the override texts so that every problem (unknown keys,
wrong types, unset required values, references to unknown keys) is raised at once in one
``ConfigError`` whose lines give the source (``file:line`` or the override), the dotted key, the
expected type and the value. That walk also converts each value from the text as written:

- ``int``: decimal text, or a float text with an integral value (``1e6`` -> 1000000); never a bool.
- ``float``: any number text (``1e-3``, ``3``, ``.inf``); never a bool.
- ``bool``: ``true``/``false`` (YAML 1.1 ``yes``/``no``/``on``/``off`` too); ``1``/``0`` are refused.
- ``str``: the text exactly as written: ``name: yes`` gives ``"yes"`` (OmegaConf's YAML reading would
  give ``"True"``). An override value that is not a YAML scalar (``name=a: b``) is taken verbatim.
- ``X | None``: ``null`` (or ``~``, or an empty value) gives None.
- ``list[X]``: a YAML list; each item converted as ``X``. An override replaces the whole list.
- nested dataclass: a mapping, merged key by key onto the field's default. For ``Section | None``
  fields, ``null`` gives None and setting any key (``enc.width=3``) creates the section.

References: ``${other.key}`` anywhere in a value (list items too) is resolved after the merge, e.g.
``output_dir: runs/${tracking.experiment}`` or ``eval.sample_steps=${policy.sample_steps}``. A value
that is one whole reference takes the referenced value, converted to the field's type by OmegaConf's
rules (a non-zero int gives ``True`` for a ``bool``). ``\\${`` is a literal ``${``; inside a flow list,
quote the reference (``['${a}', 2]``). No custom resolvers are registered (OmegaConf's built-in
``oc.*`` ones, e.g. ``${oc.env:HOME}``, still work).

A field with no default (a section too), or with the default ``'???'`` (``omegaconf.MISSING``), is
required. A plain ``???`` marks a value as required again (OmegaConf's merge alone would keep the
earlier value); a quoted ``'???'`` is a string. ``init=False`` fields are refused: OmegaConf sets them
after ``__post_init__``, overwriting what it computed. An empty YAML file is allowed.

The file is looked for as given (relative to the current directory), then, for a relative path, under
the project root (the directory holding the shipped ``configs/``): ``configs/quickstart.yaml`` works
from any directory. Schema introspection and value conversion live in ``app.config_types``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import app
from app.config_export import flatten, to_dict, to_yaml
from app.config_types import (
    _BadValue,
    _convert,
    _fields,
    _is_null,
    _is_reference,
    _parse_override_value,
    _schema_types,
    _section_type,
    _show,
    _split_optional,
    _type_name,
)

__all__ = [
    "MISSING_VALUE",
    "ConfigError",
    "check_ranges",
    "check_writable",
    "find_config_file",
    "flatten",
    "load_config",
    "to_dict",
    "to_yaml",
]

T = TypeVar("T")

MISSING_VALUE = MISSING  # "???"

# Where a relative config path missing from the current directory is looked for: the directory holding the
# shipped configs/, i.e. the repository for a source checkout or an editable install (pip install -e .).
# A wheel installs only the packages (app, modules, datamodules) into site-packages, not configs/: there
# this is site-packages, has no configs/, and only the current directory is searched.
_PROJECT_ROOT = Path(app.__file__).resolve().parent.parent

# ${a.b.c}, not escaped as \${; relative (${.x}) and resolver (${oc.env:X}) forms are left to OmegaConf.
_REFERENCE = re.compile(r"(?<!\\)\$\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}")


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


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where values come from: a YAML file (messages carry line numbers) or one override."""

    origin: str
    is_file: bool

    def at(self, node: yaml.Node) -> str:
        return f"{self.origin}:{node.start_mark.line + 1}" if self.is_file else self.origin


def _did_you_mean(guesses: Sequence[str]) -> str:
    return "; did you mean " + " or ".join(f"'{g}'" for g in guesses) + "?" if guesses else ""


class _Loader:
    """Checks and converts each source into one layer (nested dicts) for OmegaConf to merge, then builds.

    Problems are collected in ``self.problems`` rather than raised, so the user sees all of them at once.
    ``origins`` holds, per key, the source that set it last and where (``file:line``); ``unset`` the keys
    whose last value was a plain ``???``.
    """

    def __init__(self, schema: type, path: str | Path | None) -> None:
        self.schema = schema
        self.path = None if path is None else str(path)
        self.types = _schema_types(schema)  # raises TypeError for unsupported types
        self.layers: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.origins: dict[str, tuple[str, str]] = {}
        self.unset: dict[str, None] = {}

    def unknown_key(self, cls: type, prefix: str, name: str) -> str:
        valid = list(_fields(cls))
        guesses = [prefix + c for c in difflib.get_close_matches(name, valid, n=3, cutoff=0.6)]
        if not guesses:  # maybe the right name at the wrong level, e.g. 'max_steps' for 'trainer.max_steps'
            guesses = [k for k in self.types if k.rsplit(".", 1)[-1] == name]
        level = f"keys under '{prefix[:-1]}'" if prefix else "top-level keys"
        return f"unknown key '{prefix}{name}'{_did_you_mean(guesses)} (valid {level}: {', '.join(valid)})"

    def record(self, key: str, node: yaml.Node, src: _Source, unset: bool = False) -> None:
        """Note who set ``key`` last (replacing an earlier ``???`` there and below); check its references."""
        for k in [k for k in self.unset if (k + ".").startswith(key + ".")]:
            del self.unset[k]
        if unset:
            self.unset[key] = None
        self.origins[key] = (src.origin, src.at(node))
        for item in node.value if isinstance(node, yaml.SequenceNode) else [node]:
            for ref in _REFERENCE.findall(item.value) if _is_reference(item) else []:
                if ref not in self.types:  # OmegaConf would say so too, but without file:line or a guess
                    guesses = difflib.get_close_matches(ref, list(self.types), n=3, cutoff=0.8)
                    self.problems.append(
                        f"{src.at(item)}: '{key}' refers to unknown key '{ref}' in {item.value!r}"
                        + _did_you_mean(guesses)
                    )

    def merge_mapping(
        self, cls: type, layer: dict, node: yaml.MappingNode, prefix: str, src: _Source
    ) -> None:
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
                self.assign(cls, layer, name, value_node, prefix, src)

    def assign(self, cls: type, layer: dict, name: str, node: yaml.Node, prefix: str, src: _Source) -> None:
        """Set field ``name`` of section ``cls`` in this source's layer from a YAML node."""
        tp = _fields(cls)[name][1]
        key, section = prefix + name, _section_type(tp)
        # Only a plain ??? means "unset"; a quoted '???' is a string like any other.
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.value == MISSING:
            self.record(key, node, src, unset=True)
        elif section is not None and isinstance(node, yaml.MappingNode):
            self.unset.pop(key, None)
            layer[name] = {}
            self.merge_mapping(section, layer[name], node, key + ".", src)
        elif section is None or _is_reference(node) or (_is_null(node) and _split_optional(tp)[1]):
            try:
                layer[name] = _convert(tp, node)
                self.record(key, node, src)
            except _BadValue as exc:
                self.problems.append(f"{src.at(node)}: wrong type for '{key}': {exc}")
        else:
            self.problems.append(
                f"{src.at(node)}: wrong type for '{key}': expected a mapping of {section.__name__} settings "
                f"(keys: {', '.join(_fields(section))}), got {_show(node)}"
            )

    def merge_file(self, path: Path) -> None:
        node = _read_yaml(path)
        if node is None:  # empty file: nothing to merge
            return
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(
                f"{path}: the top level must be a mapping of settings (key: value lines), got {_show(node)}"
            )
        self.layers.append({})
        self.merge_mapping(self.schema, self.layers[-1], node, "", _Source(str(path), is_file=True))

    def apply_override(self, text: str) -> None:
        src = _Source(f"command-line override {text!r}", is_file=False)
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            example = key if key in self.types else next(iter(self.types), "key")
            self.problems.append(f"{src.origin}: expected the form key=value, e.g. '{example}=...'")
            return
        cls, layer, prefix = self.schema, {}, ""
        self.layers.append(layer)
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
            self.unset.pop(prefix + part, None)  # setting a key creates (or keeps) its section
            cls, layer, prefix = section, layer.setdefault(part, {}), f"{prefix}{part}."
        if name not in _fields(cls):
            self.problems.append(f"{src.origin}: {self.unknown_key(cls, prefix, name)}")
            return
        try:
            node = _parse_override_value(raw, str_target=_split_optional(_fields(cls)[name][1])[0] is str)
        except _BadValue as exc:
            self.problems.append(f"{src.origin}: {exc}")
            return
        self.assign(cls, layer, name, node, prefix, src)

    def required(self, cfg: DictConfig) -> list[str]:
        """One problem per required value still unset, in schema order."""
        where = f"in {self.path}" if self.path else "in a YAML config file"
        return [
            f"required value '{key}' ({_type_name(tp)}) is not set: set it {where} "
            f"or on the command line as '{key}=...'" + (f" or '{key}.<key>=...'" if _section_type(tp) else "")
            for key, tp in self.types.items()
            if key in self.unset or _is_missing(cfg, key)
        ]

    def build(self) -> Any:
        """Merge schema defaults < each layer with OmegaConf, check required values, build the dataclasses."""
        cfg = OmegaConf.create()  # so the __post_init__ handler below always has a config to search
        try:
            # The layers hold only checked values, so the merge runs despite the problems found so far.
            cfg = OmegaConf.merge(OmegaConf.structured(self.schema), *self.layers)
            if problems := self.problems + self.required(cfg):
                raise ConfigError(problems)
            return _plain_strings(OmegaConf.to_object(cfg))  # resolves ${...}, runs each __post_init__
        except ConfigError:  # the problems above, or raised by a __post_init__ itself
            raise
        except OmegaConfBaseException as exc:  # a case the checks above missed: still name key and source
            key = exc.full_key or ""
            origin = self.origins.get(key.partition("[")[0])  # 'tags[1]' was set with 'tags'
            where = f"{origin[1]}: " if origin else ""
            what = f"invalid value for '{key}'" if key else "cannot build the configuration"
            raise ConfigError(f"{where}{what}: {str(exc).splitlines()[0]}") from exc
        except ValueError as exc:  # a __post_init__ refused its values
            key = _refusing_section(cfg, "")
            prefix = key + "." if key else ""
            below = [
                self.origins[k][0] for k in self.types if k in self.origins and (k + ".").startswith(prefix)
            ]
            sources = f"set from {', '.join(dict.fromkeys(below))}" if below else "schema defaults only"
            where = f"'{key}'" if key else "the configuration"
            raise ConfigError(f"invalid settings in {where} ({sources}): {exc}") from exc


def _is_missing(cfg: DictConfig, key: str) -> bool:
    """``key`` holds ``???`` (a reference to an unset value is not itself unset, and is not resolved here)."""
    parent, _, name = key.rpartition(".")
    section = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    return isinstance(section, DictConfig) and OmegaConf.is_missing(section, name)


def _refusing_section(node: DictConfig, key: str) -> str:
    """The innermost section whose ``__post_init__`` refuses its values (inner ones are built first)."""
    for name in node:
        child = node[name]
        if isinstance(child, DictConfig):
            try:
                OmegaConf.to_object(child)
            except ValueError:
                return _refusing_section(child, f"{key}.{name}" if key else str(name))
    return key


def _plain_strings(cfg: Any) -> Any:
    """OmegaConf hands a literal '???' back as a ``str`` subclass; make it a plain ``str`` again."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            _plain_strings(value)
        elif isinstance(value, str) and type(value) is not str:
            object.__setattr__(cfg, field.name, str(value))  # frozen dataclasses too
        elif isinstance(value, list):
            value[:] = [str(v) if isinstance(v, str) else v for v in value]
    return cfg


RANGES = {  # the ranges a schema's __post_init__ names in check_ranges, and their tests (NaN fails all)
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(section: str, cfg: Any, **ranges: str) -> None:
    """Refuse the first field of dataclass ``cfg`` (the config section ``section``, "" for the top level)
    outside its range, a key of ``RANGES`` given by field name: ``check_ranges("agent", self, lr="> 0")``.
    None values pass.

    Raises:
        ValueError: ``"<section>.<field> must be <range>, got <value>"``.
    """
    for name, rule in ranges.items():
        value = getattr(cfg, name)
        if value is not None and not RANGES[rule](value):
            raise ValueError(f"{section + '.' if section else ''}{name} must be {rule}, got {value}")


def check_writable(path: str | Path, key: str) -> None:
    """Refuse a directory ``path`` (config key ``key``'s value) that cannot be created or written in, before
    any work: a scratch directory is made and removed in its nearest existing ancestor (nothing is left).

    Raises:
        ConfigError: naming ``key``, its value and why.
    """
    ancestor = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"{ancestor} is not a directory")
        Path(tempfile.mkdtemp(prefix=".tmrl-write-check-", dir=ancestor)).rmdir()
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r} is not a writable directory: {err}") from None


def find_config_file(path: str | Path) -> Path:
    """The config file ``path`` names: as given (relative to the current directory) if it exists, else,
    for a relative path, the same path under the project root, so ``configs/x.yaml`` works from anywhere.

    Raises ``ConfigError`` naming every place looked if there is no such file.
    """
    path = Path(path)
    if path.exists():
        return path
    if path.is_absolute():
        raise ConfigError(f"config file not found: '{path}'")
    looked = [path.resolve()]
    if (_PROJECT_ROOT / "configs").is_dir() and (shipped := _PROJECT_ROOT / path) != looked[0]:
        if shipped.exists():
            return shipped  # absolute: read, and named in messages, as if given so
        looked.append(shipped)
    raise ConfigError(f"config file not found: '{path}' (looked for {' and '.join(map(str, looked))})")


def _read_yaml(path: Path) -> yaml.Node | None:
    """The YAML node tree of an existing file (None if empty); unreadable or invalid YAML is a ConfigError."""
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


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``schema`` defaults, then the YAML file at ``path``, then ``key=value`` overrides, in order.

    ``path`` is looked for by ``find_config_file``: as given, then (if relative) under the project root.

    Returns an instance of ``schema`` (nested dataclasses, plain lists). Raises ``ConfigError`` listing
    every problem in the file and the overrides, and ``TypeError`` if the schema itself is unsupported.
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"load_config needs a dataclass type as schema, got {schema!r}")
    if isinstance(overrides, str):  # a lone string would be iterated character by character
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    path = None if path is None else find_config_file(path)
    loader = _Loader(schema, path)
    if path is not None:
        loader.merge_file(path)
    for override in overrides:
        loader.apply_override(override)
    return loader.build()
