"""The policy checkpoint format: versions, the version-1 upgrade, plain-data checks and file reading.

A checkpoint is a dict of plain types and CPU tensors (``CSPPolicy.to_checkpoint``), loadable with
``torch.load(weights_only=True)``: format, version, config (``PolicyConfig`` fields), dims (obs_dim,
action_dim, goal_dim), sensor (since version 2) and state_dict. A Lightning checkpoint carries one
under ``LIGHTNING_KEY``.
"""

import pickle
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor

CHECKPOINT_FORMAT = "tmrl-policy"
CHECKPOINT_VERSION = 2  # 2: "sensor"; the context's modules under "context." in the state_dict
READABLE_VERSIONS = (1, 2)
LIGHTNING_KEY = "tmrl_policy"  # where a Lightning checkpoint carries the policy checkpoint dict
# version 1 kept the context's modules at the top level of the policy's state_dict
_V1_CONTEXT_MODULES = ("obs_norm", "goal_norm", "cloud_norm", "clean_encoder", "noised_encoder")
_PLAIN = (str, int, float, bool, type(None))


def plain_copy(value: Any, where: str) -> Any:
    """A deep copy of a JSON-like ``value`` (str-keyed dicts, lists, tuples, str, int, float, bool, None).

    Raises ValueError naming the offending entry (``where`` names the whole value).
    """
    if type(value) in _PLAIN:  # exact types: np.float64 (a float subclass) would not load weights_only
        return value
    if type(value) in (list, tuple):
        return type(value)(plain_copy(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: plain_copy(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ValueError(
        f"{where} is {value!r} ({type(value).__name__}); expected plain data: dicts with str keys, lists, "
        "tuples, str, int, float, bool or None"
    )


def upgrade_v1_state_dict(state_dict: Mapping[str, Tensor], prefixes: tuple[str, ...] = ("",)) -> dict:
    """A version-1 policy state_dict with its keys renamed to version 2's; the tensors are not copied.

    Version 1 held the context's modules at the policy's top level, version 2 under ``context.``:
    ``<prefix>obs_norm.*`` -> ``<prefix>context.obs_norm.*``, likewise goal_norm, cloud_norm,
    clean_encoder and noised_encoder, for each prefix in ``prefixes`` (a Lightning module's state_dict
    holds policies under "policy." and "ema."). Every other key is kept as it is.
    """
    old = tuple(f"{name}." for name in _V1_CONTEXT_MODULES)
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.startswith(old):
                key = f"{prefix}context.{rest}"
                break
        out[key] = value
    return out


def read_checkpoint(ckpt: Any) -> tuple[dict, dict, dict, dict]:
    """(config, dims, sensor, version-2 state_dict) of a policy checkpoint of any of ``READABLE_VERSIONS``.

    A version-1 checkpoint gets sensor {} and its state_dict renamed by ``upgrade_v1_state_dict``.
    Raises ValueError for anything else.
    """
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a policy checkpoint: expected a dict with format={CHECKPOINT_FORMAT!r}")
    version = ckpt.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"policy checkpoint version {version!r}; this code reads versions {list(READABLE_VERSIONS)}"
        )
    required = {"config", "dims", "state_dict"} | ({"sensor"} if version > 1 else set())
    missing = required - set(ckpt)
    if missing:
        raise ValueError(f"policy checkpoint (version {version}) lacks keys {sorted(missing)}")
    if version == 1:
        return ckpt["config"], ckpt["dims"], {}, upgrade_v1_state_dict(ckpt["state_dict"])
    return ckpt["config"], ckpt["dims"], ckpt["sensor"], dict(ckpt["state_dict"])


def load_checkpoint_file(path: str | PathLike, map_location: Any) -> Mapping[str, Any]:
    """The policy checkpoint dict of a ``CSPPolicy.save`` file or of a Lightning checkpoint.

    Raises ValueError naming ``path`` when torch.load(weights_only=True) cannot read it or it is neither.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({err}); expected a file written "
            f"by CSPPolicy.save or a Lightning checkpoint with plain-typed contents"
        ) from err
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, Mapping) and LIGHTNING_KEY in obj:
        return obj[LIGHTNING_KEY]
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"{path}: expected a policy checkpoint (format {CHECKPOINT_FORMAT!r}, from CSPPolicy.save) "
        f"or a Lightning checkpoint with the top-level key {LIGHTNING_KEY!r}; found {found}"
    )
