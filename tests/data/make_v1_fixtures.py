"""Provenance of the version-1 policy fixtures in this folder (run once, from the repository root).

It was run with the version-1 policy code (commit 7fb80bb, before the context-mode registry), so
``tests/test_policy_checkpoint.py`` and ``tests/test_csp_module.py`` can check that later code reads
those files with identical outputs. It needs that code (it reads the version-1 attribute
``policy.noised_encoder``); it is kept as the record of how the fixtures were made.

    python -m tests.data.make_v1_fixtures

Writes:
    policy_v1_goal.pt, policy_v1_pointcloud.pt: ``CSPPolicy.save`` files (goal mode, MLP encoders;
        pointcloud mode, Fourier clean encoder, 16 points, context code of 4).
    policy_v1_expected.pt: per policy, the inputs, noises and expected ``sample`` outputs, and for the
        cloud the PointNet features of the clean normalized cloud.
    lightning_v1.ckpt: a ``Trainer.save_checkpoint`` of a CSPModule of an even smaller goal policy
        (width 8) after 2 training steps.
"""

from pathlib import Path

import lightning as L
import numpy as np
import torch

from modules.csp import CSPModule, OptimConfig
from modules.nets.keys import ACTION, GOAL, OBS, POINTCLOUD
from modules.nets.policy import CSPPolicy, PolicyConfig

HERE = Path(__file__).resolve().parent
D_O, D_G, D_A, L_CHUNK, B, N, CODE = 5, 2, 3, 4, 3, 16, 4


def _stats(rng: np.random.Generator, cloud: bool) -> dict[str, np.ndarray]:
    stats = {
        "observation_mean": rng.normal(size=D_O), "observation_std": rng.uniform(0.5, 2.0, D_O),
        "goal_mean": rng.normal(size=D_G), "goal_std": rng.uniform(0.5, 2.0, D_G),
        "action_min": -rng.uniform(0.5, 2.0, D_A), "action_max": rng.uniform(0.5, 2.0, D_A),
    }  # fmt: skip
    if cloud:
        stats |= {"pointcloud_center": rng.normal(size=3), "pointcloud_scale": rng.uniform(0.1, 0.3, 3)}
    return stats


def _perturbed(policy: CSPPolicy, seed: int) -> CSPPolicy:
    """Random nonzero weights everywhere (the zero-initialized output layers would hide the inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return policy.eval()


def _obs(seed: int, cloud: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = {OBS: torch.randn(B, D_O, generator=g), GOAL: torch.randn(B, D_G, generator=g)}
    if cloud:
        obs[POINTCLOUD] = 0.2 * torch.randn(B, N, 3, generator=g) + torch.tensor([0.5, 0.0, 0.1])
    return obs


def make_policies() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    goal_cfg = PolicyConfig(width=16, depth=1, heads=2, chunk_len=L_CHUNK, sample_steps=3)
    goal = CSPPolicy(goal_cfg, D_O, D_A, D_G)
    goal.set_normalization(_stats(rng, cloud=False))
    cloud_cfg = PolicyConfig(
        context_mode="pointcloud", encoder="fourier", schedule="linear", width=16, depth=1, heads=2,
        chunk_len=L_CHUNK, sample_steps=3, num_points=N, pointnet_widths=[8, 16], context_code_dim=CODE,
    )  # fmt: skip
    cloud = CSPPolicy(cloud_cfg, D_O, D_A, D_G)
    cloud.set_normalization(_stats(rng, cloud=True))
    expected = {}
    for name, policy, seed in (("goal", goal, 1), ("pointcloud", cloud, 2)):
        _perturbed(policy, seed)
        policy.save(HERE / f"policy_v1_{name}.pt")
        g = torch.Generator().manual_seed(10 + seed)
        obs = _obs(seed, cloud=name == "pointcloud")
        z = torch.randn(B, L_CHUNK, D_A, generator=g)
        if name == "pointcloud":
            code = torch.randn(B, CODE, generator=g)
            eps = policy.context_noise_from_code(code)
        else:
            code, eps = None, torch.randn(B, policy.context_dim, generator=g)
        sigma = torch.tensor([0.0, 0.4, 0.9])
        entry = {
            "obs": obs, "action_noise": z, "context_noise": eps, "sigma": sigma,
            "sample": policy.sample(obs, sigma, action_noise=z, context_noise=eps),
            "sample_sigma_0.3_steps_2": policy.sample(obs, 0.3, action_noise=z, context_noise=eps, steps=2),
        }  # fmt: skip
        if code is not None:
            with torch.no_grad():
                zeros = torch.zeros(B, policy.context_dim)
                _, clean_cloud = policy.noised_context(obs, torch.zeros(B), zeros)
                entry |= {"code": code, "clean_cloud_features": policy.noised_encoder(clean_cloud)}
        expected[name] = entry
    torch.save(expected, HERE / "policy_v1_expected.pt")
    return expected


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(5)
        self.obs, self.goal = torch.randn(n, D_O, generator=g), torch.randn(n, D_G, generator=g)
        self.action = torch.rand(n, L_CHUNK, D_A, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.obs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {OBS: self.obs[i], GOAL: self.goal[i], ACTION: self.action[i]}


def make_lightning_checkpoint() -> None:
    torch.manual_seed(0)
    cfg = PolicyConfig(width=8, depth=1, heads=2, mlp_ratio=1.0, chunk_len=L_CHUNK, sample_steps=2)
    policy = CSPPolicy(cfg, D_O, D_A, D_G)
    policy.set_normalization(_stats(np.random.default_rng(1), cloud=False))
    module = CSPModule(policy, OptimConfig(lr=1e-3, ema_decay=0.9))
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=HERE / "_lightning_tmp",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(_Windows(), batch_size=8))
    trainer.save_checkpoint(HERE / "lightning_v1.ckpt")


if __name__ == "__main__":
    make_policies()
    make_lightning_checkpoint()
