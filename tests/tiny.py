"""The test-size configs, derived from the shipped ones: ``configs/tiny/<name>.yaml`` holds only what a test
run changes (sizes, budgets, CPU), and the config a test loads is the shipped config of ``BASES`` with that
overlay merged on top, so the tests exercise the shipped settings they do not shrink."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASES = {  # overlay in configs/tiny/ -> the shipped config it shrinks
    "csp_state": "csp_state.yaml",
    "csp_pointcloud": "csp_pointcloud.yaml",
    "tmrl": "tmrl_pointmaze.yaml",
    "tmrl_cube": "tmrl_cube.yaml",
    "csp_image": "csp_image.yaml",
    "tmrl_image": "tmrl_image.yaml",
    "csp_image_cube": "csp_image_cube.yaml",
    "tmrl_image_cube": "tmrl_image_cube.yaml",
}


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in overlay.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


@functools.cache
def _scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tmrl-tiny-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def tiny_config(name: str) -> str:
    """Path of the derived test-size config ``name`` (a key of ``BASES``), written once per process."""
    base = yaml.safe_load((ROOT / "configs" / BASES[name]).read_text())
    overlay = yaml.safe_load((ROOT / "configs" / "tiny" / f"{name}.yaml").read_text()) or {}
    path = _scratch() / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge(base, overlay), sort_keys=False))
    return str(path)
