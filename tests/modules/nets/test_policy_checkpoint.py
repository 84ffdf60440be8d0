"""Policy checkpoints across versions: version-1 files load with the same outputs (to the float tolerance
of another machine), version 2 carries the sensor."""

from pathlib import Path

import numpy as np
import pytest
import torch

from modules.nets.checkpoint import CHECKPOINT_VERSION, READABLE_VERSIONS, upgrade_v1_state_dict
from modules.nets.keys import GOAL, OBS, POINTCLOUD
from modules.nets.policy import CSPPolicy

DATA = Path(__file__).resolve().parents[2] / "data"  # written by tests/data/make_v1_fixtures.py (v1 code)
MODES = ("goal", "pointcloud")
SENSOR = {
    "cameras": [{"name": "front", "pos": [0.5, -0.4, 0.6]}, {"name": "side", "pos": (0.0, 0.7, 0.5)}],
    "crop_box": [[0.2, -0.3, 0.0], [0.8, 0.3, 0.4]],
    "num_points": 16,
    "denoise": True,
    "seed": None,
}


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(DATA / "policy_v1_expected.pt", weights_only=True)


def v1_checkpoint(mode: str) -> dict:
    return torch.load(DATA / f"policy_v1_{mode}.pt", weights_only=True)


def samples(policy: CSPPolicy, want: dict) -> tuple[torch.Tensor, torch.Tensor]:
    noises = {"action_noise": want["action_noise"], "context_noise": want["context_noise"]}
    return policy.sample(want["obs"], want["sigma"], **noises), policy.sample(
        want["obs"], 0.3, **noises, steps=2
    )


# The expected samples were computed on another machine: CPU kernels (vector widths, summation order)
# differ there in the last bits, 1.1e-5 after 10 denoising steps; one weight matrix x1.01 moves them 1.5e-2.
TOL = dict(rtol=1e-4, atol=1e-4)


def assert_reproduces(policy: CSPPolicy, want: dict) -> None:
    per_sample, shared = samples(policy, want)
    torch.testing.assert_close(per_sample, want["sample"], **TOL)
    torch.testing.assert_close(shared, want["sample_sigma_0.3_steps_2"], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_version_1_files_load_with_identical_outputs(mode: str, expected: dict) -> None:
    assert v1_checkpoint(mode)["version"] == 1 and "sensor" not in v1_checkpoint(mode)
    policy = CSPPolicy.load(DATA / f"policy_v1_{mode}.pt")
    assert policy.cfg.context_mode == mode and policy.sensor == {} and not policy.training
    want = expected[mode]
    assert_reproduces(policy, want)
    # the context reads the inputs it did before: the samples move when any of them does
    noises = (want["action_noise"], want["context_noise"])
    base = policy.sample(want["obs"], 0.0, *noises)
    for key in policy.input_keys:
        moved = want["obs"] | {key: want["obs"][key] + 0.5}
        assert not torch.allclose(policy.sample(moved, 0.0, *noises), base), key


def test_version_1_pointcloud_features_and_code_map(expected: dict) -> None:
    policy = CSPPolicy.load(DATA / "policy_v1_pointcloud.pt")
    want = expected["pointcloud"]
    assert policy.input_keys == (OBS, GOAL, POINTCLOUD) and policy.feature_dim == 16
    # what the fine-tuning agent saw (PointNet of the clean cloud) is still what it sees
    torch.testing.assert_close(policy.context_features(want["obs"]), want["clean_cloud_features"], **TOL)
    torch.testing.assert_close(policy.context_noise_from_code(want["code"]), want["context_noise"], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_version_1_state_dict_keys_move_under_context(mode: str) -> None:
    old = v1_checkpoint(mode)["state_dict"]
    new = upgrade_v1_state_dict(old)
    moved = ("obs_norm.", "goal_norm.", "clean_encoder.", "noised_encoder.") + (
        ("cloud_norm.",) if mode == "pointcloud" else ()
    )
    mapping = dict(zip(old, new, strict=True))
    assert {k for k in old if k.startswith(moved)}  # the fixture has every moved module
    for key, value in old.items():
        want = f"context.{key}" if key.startswith(moved) else key
        assert mapping[key] == want and new[want] is value
    assert {k.split(".")[0] for k in new} == {"action_norm", "context", "net"} | (
        {"code_map"} if mode == "pointcloud" else set()
    )
    assert set(new) == set(CSPPolicy.load(DATA / f"policy_v1_{mode}.pt").state_dict())
    # prefixed keys (a Lightning module's "policy." and "ema.") move too; others stay
    prefixed = upgrade_v1_state_dict(
        {
            "policy.obs_norm.mean": 1,
            "ema.noised_encoder.net.0.bias": 2,
            "policy.net.pos_embed": 3,
            "obs_norm.x": 4,
        },
        ("policy.", "ema."),
    )
    assert prefixed == {
        "policy.context.obs_norm.mean": 1, "ema.context.noised_encoder.net.0.bias": 2,
        "policy.net.pos_embed": 3, "obs_norm.x": 4,
    }  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_version_2_round_trip_keeps_the_sensor(mode: str, expected: dict, tmp_path: Path) -> None:
    policy = CSPPolicy.load(DATA / f"policy_v1_{mode}.pt")
    policy.sensor = SENSOR
    ckpt = policy.to_checkpoint()
    assert ckpt["version"] == CHECKPOINT_VERSION == 2 and ckpt["sensor"] == SENSOR
    policy.save(tmp_path / "p.pt")
    loaded = CSPPolicy.load(tmp_path / "p.pt")
    assert loaded.sensor == SENSOR and loaded.sensor["cameras"][1]["pos"] == (0.0, 0.7, 0.5)
    assert_reproduces(loaded, expected[mode])
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a Lightning checkpoint carries the same dict
    torch.save({"state_dict": {}, "tmrl_policy": ckpt}, tmp_path / "l.ckpt")
    assert CSPPolicy.load(tmp_path / "l.ckpt").sensor == SENSOR


def test_sensor_is_plain_data_copied_in() -> None:
    policy = CSPPolicy.load(DATA / "policy_v1_goal.pt")
    assert policy.to_checkpoint()["sensor"] == {} == CSPPolicy.from_checkpoint(policy.to_checkpoint()).sensor
    sensor = {"cameras": ["front"], "num_points": 16}
    built = CSPPolicy(policy.cfg, policy.obs_dim, policy.action_dim, policy.goal_dim, sensor=sensor)
    sensor["cameras"].append("side")  # the policy holds its own copy
    assert built.sensor == {"cameras": ["front"], "num_points": 16}
    assert built.to_checkpoint()["sensor"] == built.sensor
    with pytest.raises(
        ValueError, match=r"CSPPolicy.sensor\['crop'\]\[1\] is .*0.5.* \(float32\); expected plain"
    ):
        built.sensor = {"crop": [0.1, np.float32(0.5)]}
    with pytest.raises(ValueError, match=r"CSPPolicy.sensor\['scale'\] is .* \(float64\)"):
        built.sensor = {"scale": np.float64(0.5)}  # a float subclass that torch.load(weights_only) refuses
    with pytest.raises(ValueError, match=r"CSPPolicy.sensor must be a dict; got list"):
        built.sensor = ["front"]
    with pytest.raises(ValueError, match="expected plain data"):
        built.sensor = {1: "front"}
    built.sensor["bad"] = torch.zeros(1)  # mutated in place: refused when saved
    with pytest.raises(ValueError, match=r"CSPPolicy.sensor\['bad'\] is tensor"):
        built.to_checkpoint()


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_other_versions_are_refused_naming_the_readable_ones(version, tmp_path: Path) -> None:
    assert READABLE_VERSIONS == (1, 2)
    ckpt = v1_checkpoint("goal") | {"version": version, "sensor": {}}
    torch.save(ckpt, tmp_path / "v.pt")
    with pytest.raises(
        ValueError, match=rf"v\.pt: policy checkpoint version {version!r}; .*versions \[1, 2\]"
    ):
        CSPPolicy.load(tmp_path / "v.pt")


def test_a_version_2_checkpoint_needs_its_sensor_and_new_keys() -> None:
    ckpt = v1_checkpoint("goal")
    with pytest.raises(ValueError, match=r"version 2\) lacks keys \['sensor'\]"):
        CSPPolicy.from_checkpoint(ckpt | {"version": 2})
    # a version-1 state_dict labelled version 2 is not silently renamed
    with pytest.raises(ValueError, match="does not match its config and dims"):
        CSPPolicy.from_checkpoint(ckpt | {"version": 2, "sensor": {}})
