"""Tests for modules.nets: the context-noise schedule and the normalizers."""

import math

import numpy as np
import pytest
import torch

from modules.nets.normalizer import MinMax, ZScore
from modules.nets.schedule import SCHEDULES, alpha_bar, noise_context


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize(("kind", "end_max"), [("cosine", 1e-6), ("linear", 1e-3)])
def test_schedule_end_points_and_monotone(kind: str, end_max: float) -> None:
    ends = alpha_bar(torch.tensor([0.0, 1.0]), kind)
    assert ends[0].item() == 1.0
    assert 0.0 <= ends[1].item() < end_max
    values = alpha_bar(torch.linspace(0, 1, 2001), kind)
    assert bool((values[1:] <= values[:-1]).all())
    assert bool((values >= 0).all())


def test_linear_schedule_matches_ddpm_product() -> None:
    betas = np.linspace(1e-4, 0.02, 1000)
    for steps in (1, 250, 1000):
        expected = np.prod(1 - betas[:steps])
        got = alpha_bar(torch.tensor([steps / 1000], dtype=torch.float64), "linear").item()
        assert got == pytest.approx(expected, rel=1e-9)
    # halfway between steps 10 and 11: geometric mean (log-abar linear in sigma)
    mid = alpha_bar(torch.tensor([0.0105], dtype=torch.float64), "linear").item()
    assert mid == pytest.approx(math.sqrt(np.prod(1 - betas[:10]) * np.prod(1 - betas[:11])), rel=1e-9)


def test_schedule_bad_input() -> None:
    with pytest.raises(ValueError, match="cosine"):
        alpha_bar(torch.tensor([0.5]), "quadratic")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        alpha_bar(torch.tensor([0.5, 1.5]))
    assert set(SCHEDULES) == {"cosine", "linear"}


def test_noise_context_by_hand() -> None:
    torch.manual_seed(0)
    c, eps = torch.randn(3, 4), torch.randn(3, 4)
    out = noise_context(c, torch.tensor([0.0, 1.0, 0.3]), eps)
    assert torch.equal(out[0], c[0])  # sigma 0: the context exactly
    torch.testing.assert_close(out[1], eps[1], atol=1e-6, rtol=0)  # sigma 1: pure noise
    s = 0.008
    abar = math.cos((0.3 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(out[2], math.sqrt(abar) * c[2] + math.sqrt(1 - abar) * eps[2])
    # trailing dims broadcast (point-cloud-like context)
    assert noise_context(torch.zeros(2, 5, 3), torch.zeros(2), torch.ones(2, 5, 3)).abs().max() == 0
    with pytest.raises(ValueError, match=r"\[-0.1"):
        noise_context(c, torch.tensor([-0.1, 0.0, 0.0]), eps)
    with pytest.raises(ValueError, match="sigma has shape"):
        noise_context(c, torch.zeros(2), eps)


# ---------------------------------------------------------------- normalizers
def test_normalizer_round_trip_and_bounds() -> None:
    z = ZScore(3, "observation")
    z.set_stats(np.array([1.0, -2.0, 0.0]), np.array([2.0, 0.5, 0.0]))  # last dim constant
    x = torch.randn(7, 3)
    torch.testing.assert_close(z.unnormalize(z.normalize(x)), x)
    torch.testing.assert_close(
        z.normalize(torch.tensor([[3.0, -1.0, 0.002]])), torch.tensor([[1.0, 2.0, 2.0]])
    )

    m = MinMax(2, "action")
    m.set_stats(torch.tensor([-1.0, 3.0]), torch.tensor([4.0, 3.0]))  # last dim constant
    torch.testing.assert_close(
        m.normalize(torch.tensor([[-1.0, 3.0], [4.0, 3.0]])), torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    )
    a = torch.rand(5, 2)
    torch.testing.assert_close(m.unnormalize(m.normalize(a)), a)
    assert bool(m.is_set) and "center" in m.state_dict()


def test_normalizer_errors() -> None:
    with pytest.raises(RuntimeError, match="never set"):
        ZScore(2).normalize(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"action_min has shape \(3,\); expected \(2,\)"):
        MinMax(2).set_stats(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="action_max must be >= action_min"):
        MinMax(1).set_stats(np.ones(1), np.zeros(1))
