"""Tests for modules.nets: the CSP policy's config, context modes, loss, sampling and checkpoints."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.nets import CONTEXTS, CSPPolicy, PolicyConfig
from modules.nets.contexts import ContextMode
from modules.nets.encoders import ENCODERS
from modules.nets.keys import ACTION, GOAL, OBS

REPO = Path(__file__).resolve().parents[3]
D_O, D_G, D_A, L, B = 5, 2, 3, 4, 6


def tiny_config(**overrides) -> PolicyConfig:
    kwargs = dict(width=32, depth=2, heads=4, chunk_len=L, sample_steps=2)
    kwargs.update(overrides)
    return PolicyConfig(**kwargs)


def make_stats(goal: bool = True) -> dict[str, np.ndarray]:
    stats = {
        "observation_mean": np.linspace(-1.0, 1.0, D_O),
        "observation_std": np.linspace(0.5, 2.0, D_O),
        "action_min": np.array([-2.0, 0.0, 1.0]),
        "action_max": np.array([2.0, 1.0, 5.0]),
    }
    if goal:
        stats |= {"goal_mean": np.array([3.0, -3.0]), "goal_std": np.array([2.0, 0.5])}
    return stats


def make_policy(mode: str = "goal", goal_dim: int = D_G, seed: int = 0, **cfg) -> CSPPolicy:
    torch.manual_seed(seed)
    policy = CSPPolicy(tiny_config(context_mode=mode, **cfg), obs_dim=D_O, action_dim=D_A, goal_dim=goal_dim)
    policy.set_normalization(make_stats(goal=goal_dim > 0))
    return policy


def make_batch(seed: int = 1, goal: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 5.0])
    batch = {
        OBS: torch.randn(B, D_O, generator=g),
        ACTION: low + (high - low) * torch.rand(B, L, D_A, generator=g),
    }
    if goal:
        batch[GOAL] = torch.randn(B, D_G, generator=g) * 2 + 3
    return batch


def perturb(policy: CSPPolicy) -> CSPPolicy:
    """Give the zero-initialized output layers nonzero weights so outputs depend on every input."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return policy


# ---------------------------------------------------------------- policy: config and construction
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"context_mode": "image"}, "context_mode='image'"),
        ({"encoder": "resnet"}, "encoder='resnet'"),
        ({"schedule": "sqrt"}, "schedule='sqrt'"),
        ({"width": 30, "heads": 4}, "divisible by PolicyConfig.heads=4"),
        ({"chunk_len": 0}, "chunk_len=0"),
        ({"depth": 1.5}, "depth=1.5"),
        ({"sample_steps": True}, "sample_steps=True"),
        ({"mlp_ratio": -1.0}, "mlp_ratio=-1.0"),
    ],
)
def test_policy_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_policy_construction_errors_and_dims() -> None:
    with pytest.raises(ValueError, match="goal_dim > 0"):
        CSPPolicy(tiny_config(context_mode="goal"), obs_dim=D_O, action_dim=D_A)
    assert CSPPolicy(tiny_config(), D_O, D_A, D_G).context_dim == D_G
    assert CSPPolicy(tiny_config(context_mode="observation"), D_O, D_A, D_G).context_dim == D_O + D_G
    policy = CSPPolicy(tiny_config(), D_O, D_A, D_G)
    with pytest.raises(ValueError, match=r"missing keys \['goal_mean', 'goal_std'\]"):
        policy.set_normalization(make_stats(goal=False))
    bad = make_stats() | {"observation_std": np.ones(D_O + 1)}
    with pytest.raises(ValueError, match=r"observation_std has shape \(6,\)"):
        policy.set_normalization(bad)
    with pytest.raises(RuntimeError, match="never set"):
        policy.loss(make_batch())


def test_the_registry_drives_the_config() -> None:
    assert list(CONTEXTS) == ["goal", "observation", "pointcloud", "image_embedding"]
    names = str(list(CONTEXTS)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"PolicyConfig.context_mode='image'; expected one of {names}"):
        tiny_config(context_mode="image")
    with pytest.raises(ValueError, match=r"num_points=4 with context_mode='observation'"):
        tiny_config(context_mode="observation", num_points=4)  # the mode's own check runs


class _LastObsDimContext(ContextMode):
    """A mode outside the package: only the last observation entry is noised, the rest is clean."""

    def __init__(self, cfg: PolicyConfig, obs_dim: int, goal_dim: int) -> None:
        super().__init__(cfg, obs_dim, goal_dim)
        self.clean_encoder = ENCODERS[cfg.encoder](obs_dim - 1 + goal_dim, cfg.width, cfg.width)
        self.noised_encoder = ENCODERS[cfg.encoder](1, cfg.width // 2, cfg.width)
        self.noise_shape, self.feature_dim = (1,), cfg.width // 2

    def split(self, batch, dtype):
        o_n, g_n = self.low_dim(batch, dtype)
        return torch.cat([o_n[:, :-1], g_n], dim=-1), o_n[:, -1:]


def test_a_mode_is_one_class_plus_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CONTEXTS, "last_obs", _LastObsDimContext)
    policy = perturb(make_policy("last_obs"))
    assert policy.context_dim == 1 and policy.feature_dim == 16 and policy.net.feature_dim == 32 + 16
    obs = make_batch()
    z = torch.randn(B, L, D_A)
    assert policy.sample(obs, 0.5, z, torch.randn(B, 1)).shape == (B, L, D_A)
    assert policy.context_features(obs).shape == (B, 16)
    ckpt = policy.to_checkpoint()
    assert ckpt["config"]["context_mode"] == "last_obs"
    torch.testing.assert_close(
        CSPPolicy.from_checkpoint(ckpt).sample(obs, 0.5, z, torch.ones(B, 1)),
        policy.sample(obs, 0.5, z, torch.ones(B, 1)),
    )


@pytest.mark.parametrize(
    ("mode", "goal_dim", "keys"),
    [("goal", D_G, (OBS, GOAL)), ("observation", D_G, (OBS, GOAL)), ("observation", 0, (OBS,))],
)
def test_input_and_stats_keys_per_mode(mode: str, goal_dim: int, keys: tuple) -> None:
    policy = make_policy(mode, goal_dim=goal_dim)
    assert policy.input_keys == keys
    assert policy.stats_keys == set(make_stats(goal=goal_dim > 0))
    batch = make_batch(goal=goal_dim > 0)
    # the policy reads exactly its input keys: extra keys are ignored, each missing one is named
    obs = {k: batch[k] for k in keys}
    assert policy.sample(obs | {"extra": torch.zeros(1)}, 0.3).shape == (B, L, D_A)
    for key in keys:
        with pytest.raises(ValueError, match=f"batch has no key '{key}'"):
            policy.sample({k: v for k, v in obs.items() if k != key}, 0.3)


@pytest.mark.parametrize("mode", ["goal", "observation"])
def test_low_dim_modes_have_no_context_features(mode: str) -> None:
    policy = make_policy(mode)
    assert policy.feature_dim == 0
    with pytest.raises(ValueError, match=rf"context_mode='{mode}' has no context features \(feature_dim 0\)"):
        policy.context_features(make_batch())


# ---------------------------------------------------------------- policy: loss
def test_loss_matches_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy()
    batch = make_batch()
    tau = torch.linspace(0.1, 0.9, B)
    eps_a = torch.randn(B, L, D_A)
    v_known = torch.randn(B, L, D_A)
    seen = {}

    def fake_velocity(x, tau_, sigma, features):
        seen["x"] = x
        return v_known

    monkeypatch.setattr(policy, "velocity", fake_velocity)
    loss = policy.loss(
        batch, sigma=torch.full((B,), 0.5), tau=tau, action_noise=eps_a, context_noise=torch.zeros(B, D_G)
    )
    low, high = torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 5.0])
    a_n = 2 * (batch[ACTION] - low) / (high - low) - 1
    t = tau[:, None, None]
    torch.testing.assert_close(seen["x"], (1 - t) * a_n + t * eps_a)
    expected = ((v_known - (eps_a - a_n)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_loss_with_zero_output_is_target_energy() -> None:
    policy = make_policy()  # zero-initialized decoder: v_hat == 0
    batch = make_batch()
    eps_a = torch.randn(B, L, D_A)
    loss = policy.loss(batch, sigma=torch.rand(B), tau=torch.rand(B), action_noise=eps_a)
    a_n = policy.action_norm.normalize(batch[ACTION])
    torch.testing.assert_close(loss, ((eps_a - a_n) ** 2).mean())


def test_loss_shape_errors() -> None:
    policy = make_policy()
    batch = make_batch()
    with pytest.raises(ValueError, match=r"batch\['action'\] has shape \(6, 5, 3\)"):
        policy.loss(batch | {ACTION: torch.zeros(B, L + 1, D_A)})
    with pytest.raises(ValueError, match="no key 'goal'"):
        policy.loss({k: v for k, v in batch.items() if k != GOAL})
    with pytest.raises(ValueError, match="tau has shape"):
        policy.loss(batch, tau=torch.rand(B, 1))


@pytest.mark.parametrize("mode", ["goal", "observation"])
def test_a_few_steps_reduce_the_loss(mode: str) -> None:
    policy = make_policy(mode)
    batch = make_batch()
    fixed = dict(
        sigma=torch.rand(B),
        tau=torch.rand(B),
        action_noise=torch.randn(B, L, D_A),
        context_noise=torch.randn(B, policy.context_dim),
    )
    assert overfit_ratio(policy, batch, fixed) < 0.7


# ---------------------------------------------------------------- policy: sampling
def test_sample_deterministic_and_shape() -> None:
    policy = perturb(make_policy())
    obs = make_batch()
    z, eps_c = torch.randn(B, L, D_A), torch.randn(B, D_G)
    a1 = policy.sample(obs, 0.5, action_noise=z, context_noise=eps_c)
    a2 = policy.sample(obs, torch.full((B,), 0.5), action_noise=z, context_noise=eps_c)
    assert a1.shape == (B, L, D_A)
    assert torch.equal(a1, a2)
    # raw units: inside [action_min, action_max] (the normalized sample is clamped to [-1, 1])
    assert bool((a1 >= torch.tensor([-2.0, 0.0, 1.0])).all() and (a1 <= torch.tensor([2.0, 1.0, 5.0])).all())
    assert not torch.equal(a1, policy.sample(obs, 0.5, action_noise=z, context_noise=eps_c, steps=3))
    assert policy.sample(obs, 0.0).shape == (B, L, D_A)  # default noises


def test_sample_euler_loop_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """A constant velocity integrates by hand; the net is queried only at tau = 1, 0.75, 0.5, 0.25."""
    policy = make_policy()
    taus = []

    def fake_forward(x, tau, cond):
        taus.append(tau.tolist())
        return torch.full_like(x, 0.25)

    monkeypatch.setattr(policy.net, "forward", fake_forward)
    z = torch.zeros(B, L, D_A)
    out = policy.sample(make_batch(), 0.3, action_noise=z, steps=4)
    assert taus == [[t] * B for t in (1.0, 0.75, 0.5, 0.25)]
    # x_0 = z - 4 steps * dt 0.25 * v 0.25 = -0.25 in normalized units
    torch.testing.assert_close(out, policy.action_norm.unnormalize(torch.full_like(z, -0.25)))


def test_sample_sigma_and_noise_errors() -> None:
    policy = make_policy()
    obs = make_batch()
    with pytest.raises(TypeError):
        policy.sample(obs)  # sigma is required
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        policy.sample(obs, 1.5)
    with pytest.raises(ValueError, match=r"action_noise has shape \(6, 4\)"):
        policy.sample(obs, 0.5, action_noise=torch.zeros(B, L))
    with pytest.raises(ValueError, match=r"context_noise has shape \(6, 5\); expected \(6, 2\)"):
        policy.sample(obs, 0.5, context_noise=torch.zeros(B, D_O))
    with pytest.raises(ValueError, match=r"sigma has shape \(3,\)"):
        policy.sample(obs, torch.zeros(3))


def test_context_noise_matters_only_above_zero_sigma() -> None:
    policy = perturb(make_policy("goal"))
    obs = make_batch()
    z = torch.randn(B, L, D_A)
    e1, e2 = torch.randn(B, D_G), torch.randn(B, D_G)
    assert torch.equal(policy.sample(obs, 0.0, z, e1), policy.sample(obs, 0.0, z, e2))
    assert not torch.allclose(policy.sample(obs, 0.6, z, e1), policy.sample(obs, 0.6, z, e2))
    # at sigma 0 the goal matters; at sigma 1 it (almost) does not
    obs2 = obs | {GOAL: obs[GOAL] + 3.0}
    assert not torch.allclose(policy.sample(obs, 0.0, z, e1), policy.sample(obs2, 0.0, z, e1))
    torch.testing.assert_close(
        policy.sample(obs, 1.0, z, e1), policy.sample(obs2, 1.0, z, e1), atol=1e-5, rtol=0
    )


def test_observation_mode_without_goal() -> None:
    policy = perturb(make_policy("observation", goal_dim=0))
    obs = make_batch(goal=False)
    assert policy.context_dim == D_O
    assert policy.sample(obs, 0.2, context_noise=torch.zeros(B, D_O)).shape == (B, L, D_A)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    policy = perturb(make_policy(schedule="linear"))
    obs, z, eps_c = make_batch(), torch.randn(B, L, D_A), torch.randn(B, D_G)
    expected = policy.sample(obs, 0.4, z, eps_c)

    path = tmp_path / "policy.pt"
    policy.save(path)
    loaded = CSPPolicy.load(path)
    assert not loaded.training and loaded.cfg == policy.cfg
    assert torch.equal(loaded.sample(obs, 0.4, z, eps_c), expected)

    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "epoch": 3, "tmrl_policy": policy.to_checkpoint()}, wrapped)
    assert torch.equal(CSPPolicy.load(wrapped).sample(obs, 0.4, z, eps_c), expected)
    assert torch.equal(CSPPolicy.from_checkpoint(policy.to_checkpoint()).sample(obs, 0.4, z, eps_c), expected)


def test_checkpoint_bad_files(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt: expected a policy checkpoint.*tmrl_policy"):
        CSPPolicy.load(other)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        CSPPolicy.load(text)
    ckpt = make_policy().to_checkpoint()
    ckpt["version"] = 3
    future = tmp_path / "future.pt"
    torch.save(ckpt, future)
    with pytest.raises(
        ValueError, match=r"future\.pt: policy checkpoint version 3; this code reads versions \[1, 2\]"
    ):
        CSPPolicy.load(future)
    ckpt["version"] = 2
    ckpt["dims"]["obs_dim"] = D_O + 1
    with pytest.raises(ValueError, match="does not match its config and dims"):
        CSPPolicy.from_checkpoint(ckpt)


# ---------------------------------------------------------------- dependency direction
def test_nets_import_no_lightning_torchrl_mlflow() -> None:
    code = (
        "import sys, modules.nets, modules.nets.policy\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'torchrl', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_fourier_encoder_shapes_and_checkpoint_round_trip(tmp_path):
    from modules.nets.encoders import FourierEncoder

    enc = FourierEncoder(2, 16, 32)
    assert enc(torch.zeros(5, 2)).shape == (5, 16)
    assert enc.net[0].in_features == 2 * (1 + 2 * FourierEncoder.NUM_FREQS)
    cfg = PolicyConfig(encoder="fourier", chunk_len=4, width=32, depth=1, heads=2, sample_steps=2)
    policy = CSPPolicy(cfg, obs_dim=2, action_dim=2, goal_dim=2)
    policy.set_normalization(
        {
            "observation_mean": np.zeros(2), "observation_std": np.ones(2), "goal_mean": np.zeros(2),
            "goal_std": np.ones(2), "action_min": -np.ones(2), "action_max": np.ones(2),
        }
    )  # fmt: skip
    policy.save(tmp_path / "p.pt")
    obs = {"observation": torch.randn(3, 2), "goal": torch.randn(3, 2)}
    z, eps = torch.randn(3, 4, 2), torch.randn(3, 2)
    expected = policy.sample(obs, 0.2, action_noise=z, context_noise=eps)
    assert torch.equal(
        CSPPolicy.load(tmp_path / "p.pt").sample(obs, 0.2, action_noise=z, context_noise=eps), expected
    )


def overfit_ratio(policy: CSPPolicy, batch: dict, fixed: dict, steps: int = 30) -> float:
    """Loss after ``steps`` Adam steps on one batch with fixed noises, over the loss before."""
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    first = policy.loss(batch, **fixed).item()
    for _ in range(steps):
        opt.zero_grad()
        policy.loss(batch, **fixed).backward()
        opt.step()
    return policy.loss(batch, **fixed).item() / first
