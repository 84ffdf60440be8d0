"""Property tests: the config loader round-trips any valid overrides and refuses invalid ones naming the key;
demonstration windows stay inside their episode and reach every step of an episode long enough."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import ConfigError, load_config, to_yaml
from app.schema import FitConfig
from datamodules.state import window_starts
from tests.app.test_fit_e2e import TINY

SETTINGS = settings(max_examples=60, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False)
word = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).filter(
    lambda s: s.lower() not in ("null", "true", "false", "yes", "no", "on", "off", "y", "n", "nan", "inf")
)
VALUES = {  # a handful of typed keys of the fit schema, with their valid values
    "seed": st.integers(0, 2**31),
    "trainer.max_steps": st.integers(1, 10**9),
    "data.batch_size": st.integers(1, 4096),
    "optim.lr": st.floats(1e-9, 10.0),
    "data.val_fraction": st.floats(0.0, 0.99),
    "trainer.progress_bar": st.booleans(),
    "eval.enabled": st.booleans(),
    "tracking.experiment": word,
    "tracking.run_name": st.none() | word,
    "eval.sigmas": st.lists(unit, max_size=5, unique=True),  # eval configs refuse a repeated sigma
    "optim.betas": st.lists(st.floats(0.0, 0.99), min_size=2, max_size=2),
}


def text(value) -> str:
    """``value`` as written on the command line."""
    if isinstance(value, list):
        return "[" + ",".join(map(repr, value)) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def get(cfg, key: str):
    """The value of the dotted ``key`` in ``cfg``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@SETTINGS
@given(st.fixed_dictionaries({}, optional=VALUES))
def test_valid_overrides_load_and_round_trip_through_yaml(values):
    cfg = load_config(FitConfig, TINY, [f"{k}={text(v)}" for k, v in values.items()])
    assert {k: get(cfg, k) for k in values} == values
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "config.yaml"
        saved.write_text(to_yaml(cfg))
        assert load_config(FitConfig, saved) == cfg


@SETTINGS
@given(st.sampled_from([k for k in VALUES if k not in ("tracking.experiment", "tracking.run_name")]), word)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"wrong type for '{key}'")):
        load_config(FitConfig, TINY, [f"{key}=x{value}"])


@SETTINGS
@given(
    st.sampled_from(["", "trainer.", "data.", "optim."]), st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True)
)
def test_an_unknown_key_is_refused_naming_it(section, name):
    if name in vars(get(FitConfig(), section[:-1]) if section else FitConfig()):
        return  # a field of the section: not unknown
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{section}{name}'")):
        load_config(FitConfig, TINY, [f"{section}{name}=1"])


@SETTINGS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 16), st.data())
def test_windows_stay_inside_their_episode_and_reach_every_step_of_a_long_enough_one(
    lengths, chunk_len, data
):
    ends = np.cumsum(lengths)
    chosen = data.draw(st.lists(st.sampled_from(range(len(lengths))), unique=True).map(sorted))
    windows = window_starts(ends, np.asarray(chosen, dtype=np.int64), chunk_len)
    begins = ends - np.asarray(lengths)
    covered = np.zeros(ends[-1], dtype=bool)
    for start, goal_end in windows:
        e = int(np.searchsorted(ends, start, side="right"))
        assert e in chosen and begins[e] <= start and start + chunk_len <= ends[e] == goal_end
        covered[start : start + chunk_len] = True
    assert len(windows) == len(set(windows[:, 0].tolist()))
    for e in range(len(lengths)):
        steps = covered[begins[e] : ends[e]]
        assert steps.all() if e in chosen and lengths[e] >= chunk_len else not steps.any()
