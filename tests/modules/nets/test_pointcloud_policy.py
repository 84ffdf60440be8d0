"""CSPPolicy's point-cloud context: PointNet, cloud normalizer, noising, batches, checkpoints, eps_c code."""

from pathlib import Path

import numpy as np
import pytest
import torch

from modules.nets import CSPPolicy, PolicyConfig
from modules.nets.keys import ACTION, GOAL, OBS, POINTCLOUD
from modules.nets.pointnet import NoiseCodeMap, PointCloudNorm, PointNetEncoder, pointcloud_stats
from modules.nets.schedule import alpha_bar
from tests.modules.nets.test_nets import overfit_ratio, perturb

D_O, D_G, D_A, L, B, N = 4, 2, 3, 4, 8, 64
A_LOW, A_HIGH = torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 2.0])


def tiny_config(**overrides) -> PolicyConfig:
    kwargs = dict(
        context_mode="pointcloud", num_points=N, pointnet_widths=[16, 32], width=32, depth=1, heads=4,
        chunk_len=L, sample_steps=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return PolicyConfig(**kwargs)


def make_clouds(b: int, n: int = N, seed: int = 0) -> torch.Tensor:
    """(b, n, 3) points in metres on the faces of a box around (0.5, 0, 0.1): structured, off-centre."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(b, n, 3, generator=g) * 2 - 1
    face = torch.randint(0, 3, (b, n), generator=g)
    pts.scatter_(2, face[..., None], torch.sign(pts.gather(2, face[..., None])))  # push onto a face
    return pts * torch.tensor([0.1, 0.2, 0.05]) + torch.tensor([0.5, 0.0, 0.1])


def make_stats(goal: bool = True) -> dict:
    stats = {
        "observation_mean": np.linspace(-1.0, 1.0, D_O), "observation_std": np.linspace(0.5, 2.0, D_O),
        "action_min": A_LOW.numpy(), "action_max": A_HIGH.numpy(),
    }  # fmt: skip
    if goal:
        stats |= {"goal_mean": np.array([0.5, 0.0]), "goal_std": np.array([0.1, 0.2])}
    return stats | pointcloud_stats(make_clouds(64, seed=99).numpy())


def make_policy(goal_dim: int = D_G, seed: int = 0, **cfg) -> CSPPolicy:
    torch.manual_seed(seed)
    policy = CSPPolicy(tiny_config(**cfg), obs_dim=D_O, action_dim=D_A, goal_dim=goal_dim)
    policy.set_normalization(make_stats(goal=goal_dim > 0))
    return policy


def make_batch(b: int = B, seed: int = 1, goal: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        OBS: torch.randn(b, D_O, generator=g),
        POINTCLOUD: make_clouds(b, seed=seed),
        ACTION: A_LOW + (A_HIGH - A_LOW) * torch.rand(b, L, D_A, generator=g),
    }
    if goal:
        batch[GOAL] = torch.randn(b, D_G, generator=g) * 0.1 + 0.5
    return batch


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


# ---------------------------------------------------------------- encoder and normalizer
def test_pointnet_is_invariant_to_point_order_and_sees_the_points() -> None:
    torch.manual_seed(0)
    enc = PointNetEncoder(32, [16, 32])
    x = torch.randn(5, N, 3)
    out = enc(x)
    assert out.shape == (5, 32)
    for seed in range(3):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(enc(x[:, perm]), out, atol=1e-6, rtol=0)
    moved = x.clone()
    moved[:, 0] += 3.0  # one point far out: the max-pool must notice
    assert (enc(moved) - out).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"expected \(B, N, 3\)"):
        enc(torch.zeros(5, N))
    with pytest.raises(ValueError, match="non-empty list"):
        PointNetEncoder(32, [])


def test_cloud_normalizer_stats_and_round_trip() -> None:
    clouds = make_clouds(16).numpy()
    iso, aniso = pointcloud_stats(clouds), pointcloud_stats(clouds, isotropic=False)
    flat = clouds.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(iso["pointcloud_center"], flat.mean(0))
    np.testing.assert_allclose(aniso["pointcloud_scale"], flat.std(0))
    assert np.ptp(iso["pointcloud_scale"]) == 0
    norm = PointCloudNorm()
    norm.set_stats(iso["pointcloud_center"], float(iso["pointcloud_scale"][0]))  # a scalar scale
    c_n = norm.normalize(torch.from_numpy(clouds))
    assert c_n.mean((0, 1)).abs().max() < 1e-4  # centred
    assert abs(c_n.var((0, 1), unbiased=False).mean().item() - 1.0) < 1e-4  # unit variance on average
    torch.testing.assert_close(norm.unnormalize(c_n), torch.from_numpy(clouds))
    one = PointCloudNorm()
    one.set_stats(iso["pointcloud_center"], iso["pointcloud_scale"][:1])  # (1,), as the datamodule gives it
    assert torch.equal(one.scale, norm.scale)
    assert {"center", "scale", "is_set"} <= set(norm.state_dict())
    with pytest.raises(ValueError, match=r"pointcloud_center has shape \(2,\)"):
        norm.set_stats(np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="pointcloud_scale must be >= 0"):
        norm.set_stats(np.zeros(3), -1.0)
    with pytest.raises(RuntimeError, match="pointcloud normalization statistics were never set"):
        PointCloudNorm().normalize(torch.zeros(1, 3))


# ---------------------------------------------------------------- config, construction, stats
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_points": 0}, "num_points must be >= 1 with context_mode='pointcloud'"),
        ({"context_mode": "goal"}, r"num_points=64 with context_mode='goal'"),
        ({"pointnet_widths": []}, "PolicyConfig.pointnet_widths"),
        ({"pointnet_widths": [16, 0]}, "PolicyConfig.pointnet_widths"),
        ({"context_code_dim": -1}, "context_code_dim=-1"),
    ],
)
def test_pointcloud_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_construction_dims_and_normalization_keys() -> None:
    policy = CSPPolicy(tiny_config(), D_O, D_A, D_G)
    assert policy.context_dim == 3 * N and policy.context_code_dim == 0
    assert policy.context.clean_encoder.in_dim == D_O + D_G  # the goal sits clean beside the state
    with pytest.raises(ValueError, match=r"missing keys \['pointcloud_center', 'pointcloud_scale'\]"):
        policy.set_normalization({k: v for k, v in make_stats().items() if "pointcloud" not in k})
    goal_policy = CSPPolicy(tiny_config(context_mode="goal", num_points=0), D_O, D_A, D_G)
    with pytest.raises(ValueError, match=r"unexpected keys \['pointcloud_center', 'pointcloud_scale'\]"):
        goal_policy.set_normalization(make_stats())
    with pytest.raises(ValueError, match=r"context_code_dim=193 exceeds context_dim=192"):
        CSPPolicy(tiny_config(context_code_dim=3 * N + 1), D_O, D_A, D_G)


# ---------------------------------------------------------------- noising
def test_sigma_zero_leaves_the_normalized_cloud_unchanged() -> None:
    policy = make_policy()
    batch = make_batch()
    clean, noised = policy.noised_context(batch, torch.zeros(B), torch.randn(B, 3 * N))
    c = policy.context.cloud_norm
    expected = (batch[POINTCLOUD] - c.center) / c.scale
    assert torch.equal(noised, policy.context.cloud_norm.normalize(batch[POINTCLOUD]))
    torch.testing.assert_close(noised, expected)
    assert clean.shape == (B, D_O + D_G)
    torch.testing.assert_close(clean[:, D_O:], policy.context.goal_norm.normalize(batch[GOAL]))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_sigma_one_leaves_no_correlation_with_the_cloud(schedule: str) -> None:
    policy = make_policy(schedule=schedule)
    batch = make_batch(b=32)
    c_n = policy.context.cloud_norm.normalize(batch[POINTCLOUD])
    eps = torch.randn(32, 3 * N, generator=torch.Generator().manual_seed(5))

    def noised(sigma: float) -> torch.Tensor:
        return policy.noised_context(batch, torch.full((32,), sigma), eps)[1]

    assert abs(corr(noised(1.0), c_n)) < 0.05  # 6144 values: chance |corr| ~ 0.013
    assert corr(noised(1.0), eps) > 0.999
    # the eps_c layout: point i's xyz noise is eps[:, 3i:3i + 3]
    torch.testing.assert_close(noised(1.0), eps.reshape(32, N, 3), atol=0.02, rtol=0)
    # between the ends the signal share follows sqrt(abar(sigma)) (same formula as every mode)
    a = alpha_bar(torch.tensor(0.5), schedule).item()
    torch.testing.assert_close(noised(0.5), a**0.5 * c_n + (1 - a) ** 0.5 * eps.reshape(32, N, 3))


# ---------------------------------------------------------------- loss and sampling
def test_loss_and_sample_shapes_and_gradients() -> None:
    policy = perturb(make_policy())
    batch = make_batch()
    loss = policy.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    first_layer = policy.context.noised_encoder.point_mlp[0]
    assert first_layer.weight.grad.abs().sum() > 0  # the cloud reaches the loss
    fixed = dict(sigma=torch.rand(B), tau=torch.rand(B), context_noise=torch.randn(B, 3 * N))
    assert policy.loss(batch, **fixed).shape == ()
    obs = {k: v for k, v in batch.items() if k != ACTION}
    assert policy.sample(obs, 0.3).shape == (B, L, D_A)
    chunk = policy.sample(obs, torch.rand(B), torch.randn(B, L, D_A), torch.randn(B, 3 * N), steps=3)
    assert chunk.shape == (B, L, D_A)
    assert bool(((chunk >= A_LOW) & (chunk <= A_HIGH)).all())
    with pytest.raises(ValueError, match=r"context_noise has shape \(8, 64, 3\); expected \(8, 192\)"):
        policy.sample(obs, 0.3, context_noise=torch.zeros(B, N, 3))


def test_goal_free_pointcloud_policy() -> None:
    policy = perturb(make_policy(goal_dim=0))
    batch = make_batch(goal=False)
    assert policy.context.clean_encoder.in_dim == D_O
    assert policy.sample(batch, 0.5).shape == (B, L, D_A)
    assert torch.isfinite(policy.loss(batch))


def test_input_and_stats_keys() -> None:
    assert make_policy().input_keys == (OBS, GOAL, POINTCLOUD)
    assert make_policy(goal_dim=0).input_keys == (OBS, POINTCLOUD)
    assert make_policy().stats_keys == set(make_stats())
    assert make_policy(goal_dim=0).stats_keys == set(make_stats(goal=False))


def test_context_features_are_the_pointnet_of_the_clean_cloud() -> None:
    policy = perturb(make_policy()).train()
    batch = make_batch()
    assert policy.feature_dim == 32  # cfg.width, the PointNet's output
    feats = policy.context_features(batch)
    assert feats.shape == (B, 32) and feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.equal(policy.context_features(batch), feats)  # deterministic
    _, clean_cloud = policy.noised_context(batch, torch.zeros(B), torch.randn(B, 3 * N))
    assert torch.equal(feats, policy.context.noised_encoder(clean_cloud).detach())  # sigma = 0
    # the cloud alone, in any order, row by row: not the state, not the goal
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    shuffled = batch | {POINTCLOUD: batch[POINTCLOUD][:, perm]}
    torch.testing.assert_close(policy.context_features(shuffled), feats, atol=1e-6, rtol=0)
    assert torch.equal(
        policy.context_features(batch | {OBS: batch[OBS] + 1.0, GOAL: batch[GOAL] - 1.0}), feats
    )
    assert (policy.context_features(batch | {POINTCLOUD: make_clouds(B, seed=7)}) - feats).abs().max() > 1e-3
    torch.testing.assert_close(policy.context_features({k: v[:3] for k, v in batch.items()}), feats[:3])
    with pytest.raises(ValueError, match="batch has no key 'pointcloud'"):
        policy.context_features({k: v for k, v in batch.items() if k != POINTCLOUD})
    with pytest.raises(ValueError, match=r"batch\['pointcloud'\] has 32 points per cloud"):
        policy.context_features(batch | {POINTCLOUD: make_clouds(B, n=32)})


def test_cloud_matters_at_sigma_zero_not_at_one_and_order_does_not() -> None:
    policy = perturb(make_policy())
    obs = make_batch()
    z, eps = torch.randn(B, L, D_A), torch.randn(B, 3 * N)
    other = obs | {POINTCLOUD: make_clouds(B, seed=7)}
    assert not torch.allclose(policy.sample(obs, 0.0, z, eps), policy.sample(other, 0.0, z, eps), atol=1e-4)
    torch.testing.assert_close(policy.sample(obs, 1.0, z, eps), policy.sample(other, 1.0, z, eps))
    # permuting the points together with their noise changes nothing, at any sigma
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    shuffled = obs | {POINTCLOUD: obs[POINTCLOUD][:, perm]}
    eps_perm = eps.reshape(B, N, 3)[:, perm].reshape(B, 3 * N)
    torch.testing.assert_close(policy.sample(shuffled, 0.4, z, eps_perm), policy.sample(obs, 0.4, z, eps))


def test_a_few_steps_reduce_the_loss() -> None:
    policy = make_policy()
    batch = make_batch()
    fixed = dict(
        sigma=torch.rand(B), tau=torch.rand(B), action_noise=torch.randn(B, L, D_A),
        context_noise=torch.randn(B, 3 * N),
    )  # fmt: skip
    assert overfit_ratio(policy, batch, fixed) < 0.7


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {POINTCLOUD: make_clouds(B, n=32)},
            r"batch\['pointcloud'\] has 32 points per cloud; .* built for 64",
        ),
        (
            {POINTCLOUD: torch.zeros(B, N, 2)},
            r"batch\['pointcloud'\] is \(8, 64, 2\); expected .*\(B, N=64, 3\)",
        ),
        ({POINTCLOUD: make_clouds(3)}, r"batch\['pointcloud'\] has 3 rows but batch\['observation'\] has 8"),
        ({POINTCLOUD: None}, r"batch has no key 'pointcloud'"),
    ],
)
def test_bad_cloud_batches_are_refused(change: dict, match: str) -> None:
    policy = make_policy()
    batch = {k: v for k, v in (make_batch() | change).items() if v is not None}
    with pytest.raises(ValueError, match=match):
        policy.loss(batch)
    with pytest.raises(ValueError, match=match):
        policy.sample({k: v for k, v in batch.items() if k != ACTION}, 0.5)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    policy = perturb(make_policy(schedule="linear", context_code_dim=6))
    obs = {k: v for k, v in make_batch().items() if k != ACTION}
    z, eps = torch.randn(B, L, D_A), policy.context_noise_from_code(torch.randn(B, 6))
    expected = policy.sample(obs, 0.4, z, eps)

    policy.save(tmp_path / "policy.pt")
    loaded = CSPPolicy.load(tmp_path / "policy.pt")
    assert not loaded.training and loaded.cfg == policy.cfg and loaded.context_dim == 3 * N
    saved, again = policy.state_dict(), loaded.state_dict()
    assert set(saved) == set(again) and {
        "context.cloud_norm.center",
        "context.cloud_norm.scale",
        "code_map.weight",
    } <= set(saved)
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(loaded.sample(obs, 0.4, z, eps), expected)
    assert torch.equal(
        loaded.context_noise_from_code(torch.ones(2, 6)), policy.context_noise_from_code(torch.ones(2, 6))
    )

    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "tmrl_policy": policy.to_checkpoint()}, wrapped)
    assert torch.equal(CSPPolicy.load(wrapped).sample(obs, 0.4, z, eps), expected)
    ckpt = policy.to_checkpoint()
    ckpt["config"]["num_points"] = N // 2
    with pytest.raises(ValueError, match="does not match its config and dims"):
        CSPPolicy.from_checkpoint(ckpt)


# ---------------------------------------------------------------- low-dimensional eps_c
def test_code_map_gives_standard_normal_context_noise() -> None:
    policy = make_policy(context_code_dim=8)
    assert policy.context_code_dim == 8
    torch.testing.assert_close(
        policy.code_map.weight.norm(dim=1), torch.ones(3 * N)
    )  # exact N(0, 1) marginals
    code = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0))
    eps = policy.context_noise_from_code(code)
    assert eps.shape == (20_000, 3 * N)
    assert eps.mean(0).abs().max() < 0.04  # per-coordinate mean, chance ~ 0.007
    assert (eps.var(0) - 1).abs().max() < 0.06  # per-coordinate variance, chance ~ 0.01
    assert abs(eps.mean().item()) < 0.02 and abs(eps.var().item() - 1) < 0.02
    assert policy.sample(make_batch(), 0.5, context_noise=eps[:B]).shape == (B, L, D_A)
    with pytest.raises(ValueError, match=r"context code has shape \(8, 3\); expected \(B, 8\)"):
        policy.context_noise_from_code(torch.zeros(B, 3))
    with pytest.raises(ValueError, match="no context code map"):
        make_policy().context_noise_from_code(torch.zeros(B, 8))


def test_code_map_is_fixed_and_leaves_the_weight_init_alone() -> None:
    torch.manual_seed(0)
    a = NoiseCodeMap(4, 30)
    torch.manual_seed(1)
    assert torch.equal(NoiseCodeMap(4, 30).weight, a.weight)  # seeded, not the global RNG
    with_map, without = make_policy(context_code_dim=4), make_policy()
    for name, value in without.state_dict().items():
        assert torch.equal(with_map.state_dict()[name], value), name
