"""Config instances out again: plain dicts, YAML that ``app.config.load_config`` reads back, flat params.

Import these from ``app.config``; they live here only to keep the loader a file you read in one sitting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["flatten", "to_dict", "to_yaml"]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config instance as plain nested dicts and lists (settable fields only)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _ConfigDumper(yaml.SafeDumper):
    """Writes lists of scalars on one line, like hand-written configs, and keeps strings literal."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, list | dict) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Read back, a plain ??? means "unset" and ${...} is a reference: quote the one, escape the other.
    style = "'" if data == "???" else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data.replace("${", "\\${"), style=style)


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
