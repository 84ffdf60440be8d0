"""TMRL actor, critic ensemble and per-head SAC loss, checked against hand computations."""

import math

import pytest
import torch
from tensordict import TensorDict
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution

from modules.tmrl import ChunkActor, CriticEnsemble, HeadSpec, TMRLLoss, make_optimizers, split_heads, update
from modules.tmrl.actor import tanh_log_det
from modules.tmrl.critic import sigma_features

HEADS = [HeadSpec("z", 2), HeadSpec("sigma", 1), HeadSpec("eps_c", 2, target_entropy=-0.5)]
OBS_DIM, GOAL_DIM, ACT_DIM, B = 2, 1, 5, 3
STATE_DIM = OBS_DIM + GOAL_DIM
GAMMA = 0.9  # far from 1 so that gamma**5 and gamma**3 differ clearly
ALPHAS = [0.1, 0.5, 2.0]
LOGP = [[0.3, -1.2, 0.7], [-0.4, 0.9, -2.0], [1.1, 0.2, -0.3]]  # (B, n_heads) fed by the fake actor
ENV_STEPS = [5, 3, 5]
TERMINATED = [False, False, True]


def make_batch(seed: int = 0, env_steps: bool = True) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    nxt = {
        "observation": torch.randn(B, OBS_DIM, generator=g),
        "goal": torch.randn(B, GOAL_DIM, generator=g),
        "reward": torch.randn(B, 1, generator=g),
        "terminated": torch.tensor(TERMINATED).reshape(B, 1),
    }
    if env_steps:
        nxt["env_steps"] = torch.tensor(ENV_STEPS).reshape(B, 1)
    root = {
        "observation": torch.randn(B, OBS_DIM, generator=g),
        "goal": torch.randn(B, GOAL_DIM, generator=g),
        "action": torch.rand(B, ACT_DIM, generator=g) * 2 - 1,
        "next": nxt,
    }
    return TensorDict(root, batch_size=[B])


def fake_policy(state, deterministic=False):
    """A known actor: a = tanh(0.5 * state[:, [0, 1, 2, 0, 1]]), log-probs = LOGP."""
    return torch.tanh(0.5 * state[:, [0, 1, 2, 0, 1]]), torch.tensor(LOGP)


def fake_action(state: list[float]) -> list[float]:
    return [math.tanh(0.5 * state[j]) for j in (0, 1, 2, 0, 1)]


def linear_q(weights: list[list[float]], biases: list[float], x: list[float]) -> list[float]:
    """Hand evaluation of the linear critics (layers=0): Q_k(x) = w_k . x + b_k."""
    return [
        sum(w * v for w, v in zip(wk, x, strict=True)) + bk for wk, bk in zip(weights, biases, strict=True)
    ]


@pytest.fixture
def known_loss(monkeypatch):
    """A loss with a fake actor, 2 linear critics and 3 known temperatures; returns the known numbers."""

    def build(**kwargs):
        torch.manual_seed(0)
        actor = ChunkActor(STATE_DIM, HEADS, hidden=16, layers=1)
        monkeypatch.setattr(actor, "forward", fake_policy)
        critic = CriticEnsemble(STATE_DIM, ACT_DIM, num_critics=2, layers=0)
        loss = TMRLLoss(actor, critic, HEADS, gamma=GAMMA, **kwargs)
        loss.log_alpha.data.copy_(torch.tensor(ALPHAS).log())
        g = torch.Generator().manual_seed(1)
        # online and target weights differ, so using the wrong set changes the numbers
        critic.out.weight.data.copy_(torch.randn(2, STATE_DIM + ACT_DIM, 1, generator=g))
        critic.out.bias.data.copy_(torch.randn(2, 1, generator=g))
        loss.target_critic_params["out", "weight"].data.copy_(
            torch.randn(2, STATE_DIM + ACT_DIM, 1, generator=g)
        )
        loss.target_critic_params["out", "bias"].data.copy_(torch.randn(2, 1, generator=g))
        online = (critic.out.weight.squeeze(-1).tolist(), critic.out.bias.squeeze(-1).tolist())
        target = tuple(loss.target_critic_params["out", k].squeeze(-1).tolist() for k in ("weight", "bias"))
        return loss, online, target

    return build


def hand_targets(batch: TensorDict, target_critic, entropy: bool, steps=ENV_STEPS, pick=min) -> list[float]:
    """y_b = r_b + gamma^n_b (1 - term_b) (pick_k Qtarget_k(s'_b, a'_b) - sum_h alpha_h logp_bh)."""
    ys = []
    for b in range(B):
        s1 = batch["next", "observation"][b].tolist() + batch["next", "goal"][b].tolist()
        v = pick(linear_q(*target_critic, s1 + fake_action(s1)))
        if entropy:
            v -= sum(ALPHAS[h] * LOGP[b][h] for h in range(3))
        alive = 0.0 if TERMINATED[b] else 1.0
        ys.append(batch["next", "reward"][b, 0].item() + GAMMA ** steps[b] * alive * v)
    return ys


def hand_qvalue_loss(batch: TensorDict, online_critic, ys: list[float]) -> float:
    total = 0.0
    for b in range(B):
        s = batch["observation"][b].tolist() + batch["goal"][b].tolist()
        for q in linear_q(*online_critic, s + batch["action"][b].tolist()):
            total += (q - ys[b]) ** 2
    return total / (2 * B)


@pytest.mark.parametrize("entropy", [True, False])
def test_qvalue_loss_matches_hand_computation(known_loss, entropy):
    loss, online, target = known_loss(entropy_in_target=entropy)
    batch = make_batch()
    out = loss(batch)
    ys = hand_targets(batch, target, entropy=entropy)
    assert out["target_mean"].item() == pytest.approx(sum(ys) / B, rel=1e-5)
    assert out["loss_qvalue"].item() == pytest.approx(hand_qvalue_loss(batch, online, ys), rel=1e-5)
    # the entropy term matters in these numbers, so the two variants must differ
    other = hand_targets(batch, target, entropy=not entropy)
    assert abs(sum(other) - sum(ys)) > 1e-2


def test_default_steps_when_env_steps_absent(known_loss):
    batch = make_batch(env_steps=False)
    loss, online, target = known_loss(default_steps=4)
    ys = hand_targets(batch, target, entropy=True, steps=[4] * B)
    assert loss(batch)["loss_qvalue"].item() == pytest.approx(hand_qvalue_loss(batch, online, ys), rel=1e-5)
    loss_no_default, _, _ = known_loss()
    with pytest.raises(KeyError, match="env_steps"):
        loss_no_default(batch)


def test_min_subset_takes_one_random_critic(known_loss):
    loss, online, target = known_loss(min_subset=1)
    batch = make_batch()
    candidates = [
        hand_qvalue_loss(batch, online, hand_targets(batch, target, True, pick=lambda qs, k=k: qs[k]))
        for k in range(2)
    ]
    got = {round(loss(batch)["loss_qvalue"].item(), 4) for _ in range(20)}
    assert got <= {round(c, 4) for c in candidates}
    assert len(got) == 2  # both critics get picked over 20 draws (fails with prob 2^-19)


def test_actor_and_alpha_losses_match_hand_computation(known_loss):
    loss, online, _ = known_loss()
    batch = make_batch()
    out = loss(batch)
    actor_terms = []
    for b in range(B):
        s = batch["observation"][b].tolist() + batch["goal"][b].tolist()
        q_mean = sum(linear_q(*online, s + fake_action(s))) / 2
        actor_terms.append(sum(ALPHAS[h] * LOGP[b][h] for h in range(3)) - q_mean)
    assert out["loss_actor"].item() == pytest.approx(sum(actor_terms) / B, rel=1e-5)
    targets = [-2.0, -1.0, -0.5]  # -dim for z and sigma, the override for eps_c
    hand_alpha = sum(
        -math.log(ALPHAS[h]) * sum(LOGP[b][h] + targets[h] for b in range(B)) / B for h in range(3)
    )
    assert out["loss_alpha"].item() == pytest.approx(hand_alpha, rel=1e-5)
    for h, head in enumerate(HEADS):
        assert out[f"alpha_{head.name}"].item() == pytest.approx(ALPHAS[h], rel=1e-6)
        assert out[f"entropy_{head.name}"].item() == pytest.approx(-sum(r[h] for r in LOGP) / B, rel=1e-6)


def make_real_loss(**kwargs) -> TMRLLoss:
    torch.manual_seed(0)
    actor = ChunkActor(STATE_DIM, HEADS, hidden=16)
    with torch.no_grad():  # as after some training: the output layer's weights start at zero
        actor.out.weight.normal_(0.0, 0.1)
    critic = CriticEnsemble(STATE_DIM, ACT_DIM, num_critics=2, hidden=16, sigma_index=2, sigma_features=4)
    return TMRLLoss(actor, critic, HEADS, **kwargs)


def test_gradients_go_only_where_they_belong():
    loss = make_real_loss()
    batch = make_batch()
    loss_pi, logp = loss.actor_loss(batch)
    loss_pi.backward()
    assert all(p.grad is None for p in loss.critic_params.values(True, True))
    assert loss.log_alpha.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.actor.parameters())
    loss.zero_grad(set_to_none=True)
    loss.qvalue_loss(batch)[0].backward()
    assert all(p.grad is None for p in loss.actor.parameters())
    assert loss.log_alpha.grad is None
    assert all(p.grad is not None for p in loss.critic_params.values(True, True))
    loss.alpha_loss(logp).backward()
    assert all(p.grad is None for p in loss.actor.parameters())
    assert loss.log_alpha.grad is not None and (loss.log_alpha.grad != 0).all()


def test_update_changes_actor_critic_alpha_and_moves_target_by_tau():
    loss = make_real_loss(tau=0.01)
    optimizers = make_optimizers(loss, lr=1e-2)
    before = {
        "actor": [p.detach().clone() for p in loss.actor.parameters()],
        "critic": [p.detach().clone() for p in loss.critic_params.values(True, True)],
        "alpha": loss.log_alpha.detach().clone(),
    }
    target_before = [p.clone() for p in loss.target_critic_params.values(True, True)]
    out = update(loss, optimizers, make_batch())
    assert {"loss_actor", "loss_qvalue", "loss_alpha", "q_std", "alpha_sigma"} <= set(out.keys())
    assert any(not torch.equal(a, p) for a, p in zip(before["actor"], loss.actor.parameters(), strict=True))
    online = list(loss.critic_params.values(True, True))
    assert all(not torch.equal(a, p) for a, p in zip(before["critic"], online, strict=True))
    assert not torch.equal(before["alpha"], loss.log_alpha.detach())
    # target <- target + tau * (online - target), with the online weights AFTER the step
    for t_old, t_new, p in zip(
        target_before, loss.target_critic_params.values(True, True), online, strict=True
    ):
        torch.testing.assert_close(t_new, t_old + 0.01 * (p.detach() - t_old), rtol=1e-6, atol=1e-7)
        assert not torch.equal(t_new, p.detach())


def test_soft_update_moves_target_by_exactly_tau():
    loss = make_real_loss(tau=0.005)
    for p in loss.target_critic_params.values(True, True):
        p.data.zero_()
    loss.update_targets()
    for t, p in zip(
        loss.target_critic_params.values(True, True), loss.critic_params.values(True, True), strict=True
    ):
        torch.testing.assert_close(t, 0.005 * p.detach(), rtol=1e-6, atol=0.0)


def test_tanh_log_prob_matches_torch_distributions():
    torch.manual_seed(3)
    actor = ChunkActor(STATE_DIM, HEADS, hidden=16, log_std_min=-2.0, log_std_max=0.5)
    state = torch.randn(64, STATE_DIM)
    action, logp = actor(state)  # (64, 5), (64, 3)
    assert action.shape == (64, ACT_DIM) and logp.shape == (64, len(HEADS))
    loc_all, raw_all = actor.out(actor.trunk(state)).chunk(2, dim=-1)  # (64, 5) each, head after head
    locs, raws = split_heads(loc_all, HEADS), split_heads(raw_all, HEADS)
    for h, (name, part) in enumerate(split_heads(action, HEADS).items()):
        loc, raw = locs[name], raws[name]
        base = Independent(Normal(loc, actor._squash_log_std(raw).exp()), 1)
        dist = TransformedDistribution(base, [TanhTransform()])
        # change of variables evaluated at the squashed sample (atanh is accurate for |a| < 1 - 1e-3)
        ok = part.abs().amax(-1) < 0.999
        assert ok.sum() > 32, name
        torch.testing.assert_close(logp[ok, h], dist.log_prob(part)[ok], rtol=1e-4, atol=1e-3)


def test_tanh_log_det_is_stable_and_deterministic_mode():
    u = torch.tensor([0.0, 1.0, 20.0, -20.0])
    naive = torch.log(1 - torch.tanh(u) ** 2)
    stable = tanh_log_det(u)
    torch.testing.assert_close(stable[:2], naive[:2])
    assert torch.isfinite(stable).all() and not torch.isfinite(naive[2:]).any()
    assert stable[2].item() == pytest.approx(2 * (math.log(2) - 20), rel=1e-6)
    actor = ChunkActor(STATE_DIM, HEADS, hidden=16)
    state = torch.randn(4, STATE_DIM)
    a1, lp = actor(state, deterministic=True)
    a2, _ = actor(state, deterministic=True)
    assert torch.equal(a1, a2) and torch.equal(lp, torch.zeros(4, 3))
    loc_z = actor.out(actor.trunk(state))[:, :2]
    torch.testing.assert_close(a1[:, :2], torch.tanh(loc_z))


def test_critic_ensemble_equals_per_member_mlp():
    torch.manual_seed(0)
    critic = CriticEnsemble(
        STATE_DIM, ACT_DIM, num_critics=3, hidden=8, layers=2, sigma_index=2, sigma_features=4
    )
    with torch.no_grad():
        for norm in critic.norms:  # non-trivial affines so that a mixed-up member index shows
            norm.weight.normal_()
            norm.bias.normal_()
    state, action = torch.randn(5, STATE_DIM), torch.rand(5, ACT_DIM) * 2 - 1
    q = critic(state, action)
    assert q.shape == (3, 5)
    x = torch.cat([state, action, sigma_features(action[:, 2], 4)], dim=-1)
    for k in range(3):
        h = x
        for lin, norm in zip(critic.hidden, critic.norms, strict=True):
            h = torch.nn.functional.layer_norm(h @ lin.weight[k] + lin.bias[k], (8,))
            h = torch.relu(h * norm.weight[k, 0] + norm.bias[k, 0])
        torch.testing.assert_close(q[k], (h @ critic.out.weight[k] + critic.out.bias[k]).squeeze(-1))
    assert not torch.allclose(q[0], q[1])  # members are initialized independently


def test_sigma_features_and_validation():
    feats = sigma_features(torch.tensor([0.0, 1.0]), 16)
    assert feats.shape == (2, 16)
    torch.testing.assert_close(feats[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert feats[1, 0].item() == pytest.approx(-1.0)  # cos(pi): the lowest frequency spans [-1, 1]
    actor = ChunkActor(STATE_DIM, HEADS, hidden=16)
    critic = CriticEnsemble(STATE_DIM, ACT_DIM, num_critics=2, hidden=16)
    with pytest.raises(ValueError, match="do not match"):
        TMRLLoss(actor, critic, [HeadSpec("z", 5)])
    with pytest.raises(ValueError, match="min_subset"):
        TMRLLoss(actor, critic, HEADS, min_subset=3)


def test_init_std_sets_the_starting_spread_of_every_head():
    torch.manual_seed(0)
    state = torch.randn(4096, STATE_DIM)
    for std in (0.3, 1.0, 2.0):
        actor = ChunkActor(STATE_DIM, HEADS, hidden=16, init_std=std)
        actor.out.weight.data.zero_()  # the trunk's features no longer move loc or log-std
        loc, raw = actor.out(actor.trunk(state)).chunk(2, dim=-1)
        torch.testing.assert_close(actor._squash_log_std(raw).exp(), torch.full_like(raw, std))
        action, _ = actor(state)
        pre_tanh = torch.atanh(action.double().clamp(-1 + 1e-12, 1 - 1e-12))
        assert (pre_tanh - loc).std().item() == pytest.approx(std, rel=0.05)
    with pytest.raises(ValueError, match="init_std=100"):
        ChunkActor(STATE_DIM, HEADS, hidden=16, init_std=100.0)


def test_a_fresh_actor_has_the_same_per_head_distribution_in_every_state():
    """Zero output weights: loc and std are the biases alone; a head's init_loc / init_std win."""
    heads = [HeadSpec("z", 3), HeadSpec("sigma", 1, init_loc=-2.0, init_std=0.3)]
    actor = ChunkActor(STATE_DIM, heads, hidden=16, init_std=1.0)
    state = torch.randn(20000, STATE_DIM) * 5.0
    pre_tanh = torch.atanh(actor(state)[0].double().clamp(-1 + 1e-12, 1 - 1e-12))
    torch.testing.assert_close(pre_tanh.mean(0), torch.tensor([0.0, 0.0, 0.0, -2.0], dtype=torch.double),
                               atol=0.03, rtol=0)  # fmt: skip
    torch.testing.assert_close(pre_tanh.std(0), torch.tensor([1.0, 1.0, 1.0, 0.3], dtype=torch.double),
                               atol=0.03, rtol=0)  # fmt: skip
    det, _ = actor(state, deterministic=True)
    torch.testing.assert_close(det, torch.tanh(torch.tensor([0.0, 0, 0, -2.0])).expand(20000, 4))


def test_the_prior_regularizer_is_a_kl_to_the_initial_distribution():
    """regularizer="prior": the per-head log-prob is log pi - log p0 (p0 = the initial distribution), whose
    mean is the closed-form KL of the two pre-tanh Gaussians; zero (in expectation and per sample) at init."""
    heads = [HeadSpec("z", 3), HeadSpec("sigma", 1, init_loc=-2.0, init_std=0.3)]
    actor = ChunkActor(STATE_DIM, heads, hidden=16, init_std=1.0, regularizer="prior")
    state = torch.randn(50000, STATE_DIM)
    _, ratio = actor(state)
    torch.testing.assert_close(ratio, torch.zeros_like(ratio), atol=1e-5, rtol=0)  # pi == p0 at init
    with torch.no_grad():  # move the actor: loc + 0.5 and std x 0.5 on every dim
        actor.out.bias[:4] += 0.5
        raw = [actor._raw_log_std(0.5, "z")] * 3 + [actor._raw_log_std(0.15, "sigma")]
        actor.out.bias[4:] = torch.tensor(raw)
    _, ratio = actor(state)
    loc0, s0 = torch.tensor([0.0, 0.0, 0.0, -2.0]), torch.tensor([1.0, 1.0, 1.0, 0.3])
    loc, s = loc0 + 0.5, s0 * 0.5
    kl = torch.log(s0 / s) + (s**2 + (loc - loc0) ** 2) / (2 * s0**2) - 0.5  # per dim
    torch.testing.assert_close(ratio.mean(0), torch.stack([kl[:3].sum(), kl[3]]), atol=0.03, rtol=0.01)
    with pytest.raises(ValueError, match="regularizer='kl'"):
        ChunkActor(STATE_DIM, heads, hidden=16, regularizer="kl")


def test_autotune_off_keeps_the_temperatures():
    loss = make_real_loss(autotune_alpha=False, init_alpha=0.05)
    optimizers = make_optimizers(loss, lr=1e-1)
    before = loss.log_alpha.detach().clone()
    for _ in range(3):
        update(loss, optimizers, make_batch())
    torch.testing.assert_close(loss.log_alpha.detach(), before)
