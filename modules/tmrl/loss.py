"""The TMRL loss: SAC over chunk-level actions with one autotuned temperature per action head.

TorchRL's ``SACLoss`` has a single temperature; TMRL's action is (z, sigma, eps_c), each head with its
own entropy target (METHOD.md section 2), so this ``LossModule`` keeps one log-alpha per head.

One high-level transition covers a whole executed chunk::

    s_t --chunk A_t (H_exec env steps, open loop)--> s_{t+1}
          reward = sum of the H_exec env rewards     discount = gamma ** env_steps

``env_steps`` may be below H_exec when the episode ends mid-chunk. Only ``terminated`` (task success)
stops bootstrapping; a time-limit truncation bootstraps from the stored true final observation.
"""

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from torch import Tensor
from torchrl.objectives import LossModule, SoftUpdate

from modules.nets.keys import ACTION, CONTEXT_FEATURE, ENV_STEPS, GOAL, NEXT, OBS, REWARD, TERMINATED
from modules.tmrl.actor import ChunkActor, HeadSpec
from modules.tmrl.critic import CriticEnsemble

# What the high-level agent sees, in the order it is concatenated; keys after OBS are optional.
STATE_KEYS = (OBS, GOAL, CONTEXT_FEATURE)


def state_of(
    td: TensorDictBase, obs_key: str = OBS, goal_key: str = GOAL, feature_key: str = CONTEXT_FEATURE
) -> Tensor:
    """The high-level state (B, d_o [+ d_g] [+ F]): observation, then the goal and the point-cloud
    features (``CONTEXT_FEATURE``) where present."""
    parts = [td.get(obs_key)] + [td.get(k) for k in (goal_key, feature_key) if k in td.keys()]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class TMRLLoss(LossModule):
    """SAC losses for the high-level TMRL agent, one temperature per action head.

    Args:
        actor: the high-level policy; its heads must equal ``heads``.
        critic: the Q ensemble; a Polyak-averaged target copy is kept as ``target_critic_params``.
        heads: the action layout (gives each temperature its entropy target).
        gamma: discount PER ENV STEP; a transition of n env steps is discounted by ``gamma ** n``.
        init_alpha: initial value of every temperature.
        entropy_in_target: subtract ``sum_h alpha_h * logp_h(a'|s')`` in the critic target (SAC).
            False reproduces the reference implementation's target without the entropy term.
        min_subset: None takes the min over all target critics; k takes it over a fresh random
            subset of k critics per update (REDQ).
        default_steps: discount exponent (H_exec) used when the batch has no ``("next", "env_steps")``;
            None makes that a KeyError, so a missing key never silently means one step.
        tau: Polyak rate of the target update that ``update`` applies after each gradient step.
        autotune_alpha: False keeps every temperature at ``init_alpha`` (the alpha loss is zero).

    With an actor whose ``regularizer`` is "prior" the log-probs are log-ratios to the actor's initial
    distribution, so every "entropy" term below is a KL to that prior (a head's ``target_entropy`` is then
    minus its KL budget) and the diagnostics report ``kl_<head>``.
    """

    @dataclass
    class _AcceptedKeys:
        """TensorDict keys read by the loss (configurable with ``set_keys``)."""

        observation: str = OBS
        goal: str = GOAL
        context_feature: str = CONTEXT_FEATURE
        action: str = ACTION
        reward: str = REWARD
        terminated: str = TERMINATED
        env_steps: str = ENV_STEPS

    # convert_to_functional looks these names up in the class annotations
    critic: CriticEnsemble
    critic_params: TensorDictParams
    target_critic_params: TensorDictParams

    def __init__(
        self,
        actor: ChunkActor,
        critic: CriticEnsemble,
        heads: list[HeadSpec],
        gamma: float = 0.99,
        init_alpha: float = 1.0,
        entropy_in_target: bool = True,
        min_subset: int | None = None,
        default_steps: int | None = None,
        tau: float = 0.005,
        autotune_alpha: bool = True,
    ) -> None:
        super().__init__()
        if [(h.name, h.dim) for h in heads] != [(h.name, h.dim) for h in actor.heads]:
            raise ValueError(f"heads {heads} do not match the actor's heads {actor.heads}")
        if critic.action_dim != actor.action_dim:
            raise ValueError(f"critic action_dim {critic.action_dim} != actor action_dim {actor.action_dim}")
        if min_subset is not None and not 1 <= min_subset <= critic.num_critics:
            raise ValueError(f"min_subset must be in [1, {critic.num_critics}], got {min_subset}")
        if init_alpha <= 0:
            raise ValueError(f"init_alpha must be > 0, got {init_alpha}")
        self.heads = list(heads)
        self.actor = actor
        # critic_params: the online weights (the critic module's own Parameters);
        # target_critic_params: a detached copy, moved by self.target_updater
        self.convert_to_functional(critic, "critic", create_target_params=True)
        self.gamma = gamma
        self.entropy_in_target = entropy_in_target
        self.min_subset = min_subset
        self.default_steps = default_steps
        self.autotune_alpha = autotune_alpha
        self.log_alpha = torch.nn.Parameter(torch.full((len(heads),), float(init_alpha)).log())  # (H,)
        self.register_buffer("target_entropy", torch.tensor([h.entropy_target for h in heads]))  # (H,)
        self.target_updater = SoftUpdate(self, tau=tau)

    @property
    def alpha(self) -> Tensor:
        """Current temperatures (n_heads,), detached."""
        return self.log_alpha.detach().exp()

    def update_targets(self) -> None:
        """One Polyak step: target <- (1 - tau) * target + tau * online."""
        self.target_updater.step()

    def _state(self, td: TensorDictBase) -> Tensor:
        keys = self.tensor_keys
        return state_of(td, keys.observation, keys.goal, keys.context_feature)

    def _next_state(self, td: TensorDictBase) -> Tensor:
        nxt = td.get(NEXT)
        for key in (self.tensor_keys.goal, self.tensor_keys.context_feature):
            if (key in td.keys()) != (key in nxt.keys()):
                raise KeyError(
                    f"{key!r} must be present in both the root and 'next' of a transition, or in neither"
                )
        return self._state(nxt)

    def _discount(self, td: TensorDictBase, like: Tensor) -> Tensor:
        """gamma ** n per transition (B,), like ``like``; n = real env steps this chunk ran."""
        steps = td.get((NEXT, self.tensor_keys.env_steps), None)
        if steps is None:
            if self.default_steps is None:
                key = (NEXT, self.tensor_keys.env_steps)
                raise KeyError(f"batch has no {key} and TMRLLoss.default_steps is None")
            return torch.full_like(like, self.gamma**self.default_steps)
        return torch.pow(self.gamma, steps.reshape(like.shape).to(like))

    def _min_target_q(self, q: Tensor) -> Tensor:
        """Min (B,) over the ensemble (E, B), or over a random subset of ``min_subset`` critics."""
        if self.min_subset is not None:
            q = q[torch.randperm(q.shape[0], device=q.device)[: self.min_subset]]
        return q.min(dim=0).values

    def qvalue_loss(self, td: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """Critic loss mean_k,b (Q_k(s, a) - y)^2 (no 0.5 factor) and its diagnostics."""
        state, action = self._state(td), td.get(self.tensor_keys.action)  # (B, S), (B, D)
        batch = state.shape[0]
        with torch.no_grad():
            next_state = self._next_state(td)
            next_action, next_logp = self.actor(next_state)  # (B, D), (B, H)
            with self.target_critic_params.to_module(self.critic):
                next_q = self._min_target_q(self.critic(next_state, next_action))  # (B,)
            if self.entropy_in_target:
                next_q = next_q - (next_logp * self.log_alpha.exp()).sum(-1)
            reward = td.get((NEXT, self.tensor_keys.reward)).reshape(batch)
            alive = 1.0 - td.get((NEXT, self.tensor_keys.terminated)).reshape(batch).to(next_q)
            target = reward + self._discount(td, next_q) * alive * next_q  # (B,)
        # online weights through to_module: after loss.to(device) only critic_params are moved
        with self.critic_params.to_module(self.critic):
            q = self.critic(state, action)  # (E, B)
        loss = (q - target).pow(2).mean()
        # population std across the ensemble (correction=0 keeps a 1-critic ensemble finite)
        q_std = q.detach().std(0, correction=0).mean()
        info = {"q_mean": q.detach().mean(), "q_std": q_std, "target_mean": target.mean()}
        return loss, info

    def actor_loss(self, td: TensorDictBase) -> tuple[Tensor, Tensor]:
        """Actor loss mean(sum_h alpha_h * logp_h - mean_k Q_k(s, a)) and the log-probs (B, H).

        The critic runs on detached copies of its weights, so this loss sends gradient to the actor
        (through the reparameterized action) and never to the critic.
        """
        state = self._state(td)
        action, logp = self.actor(state)  # (B, D), (B, H)
        with self.critic_params.detach().to_module(self.critic):
            q = self.critic(state, action).mean(0)  # (B,)
        loss = ((logp * self.log_alpha.detach().exp()).sum(-1) - q).mean()
        return loss, logp

    def alpha_loss(self, logp: Tensor) -> Tensor:
        """Temperature loss: sum over heads of mean_b(-log_alpha_h * (logp_h + target_h)), logp detached
        (zero, with no gradient to log_alpha, when ``autotune_alpha`` is off)."""
        gap = (logp.detach() + self.target_entropy).mean(0)  # (H,)
        return (-self.log_alpha * gap).sum() * float(self.autotune_alpha)

    def _diagnostics(self, logp: Tensor) -> dict[str, Tensor]:
        alpha, mean = self.alpha, logp.detach().mean(0)
        kl = self.actor.regularizer == "prior"
        out = {}
        for i, head in enumerate(self.heads):
            out[f"alpha_{head.name}"] = alpha[i]
            out[f"kl_{head.name}" if kl else f"entropy_{head.name}"] = mean[i] if kl else -mean[i]
        return out

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """All three losses on one batch, plus diagnostics, as a TensorDict of scalars."""
        td = tensordict.reshape(-1) if tensordict.batch_dims != 1 else tensordict
        loss_q, info = self.qvalue_loss(td)
        loss_pi, logp = self.actor_loss(td)
        out = {"loss_actor": loss_pi, "loss_qvalue": loss_q, "loss_alpha": self.alpha_loss(logp)}
        return TensorDict({**out, **info, **self._diagnostics(logp)}, batch_size=[])


def make_optimizers(loss: TMRLLoss, lr: float = 3e-4) -> dict[str, torch.optim.Optimizer]:
    """Adam for the actor, the critic ensemble and the temperatures (METHOD: lr 3e-4 for all three)."""
    return {
        "actor": torch.optim.Adam(loss.actor.parameters(), lr=lr),
        "critic": torch.optim.Adam(list(loss.critic_params.values(True, True)), lr=lr),
        "alpha": torch.optim.Adam([loss.log_alpha], lr=lr),
    }


def update(loss: TMRLLoss, optimizers: dict[str, torch.optim.Optimizer], batch: TensorDictBase) -> TensorDict:
    """ONE gradient step of critic, then actor and temperatures, then a Polyak target step.

    The actor step sees the freshly updated critic. Returns the losses and diagnostics, detached.
    """
    td = batch.reshape(-1) if batch.batch_dims != 1 else batch
    loss_q, info = loss.qvalue_loss(td)
    optimizers["critic"].zero_grad(set_to_none=True)
    loss_q.backward()
    optimizers["critic"].step()

    loss_pi, logp = loss.actor_loss(td)
    loss_a = loss.alpha_loss(logp)
    optimizers["actor"].zero_grad(set_to_none=True)
    optimizers["alpha"].zero_grad(set_to_none=True)
    (loss_pi + loss_a).backward()  # disjoint graphs: alpha is detached in loss_pi, logp in loss_a
    optimizers["actor"].step()
    optimizers["alpha"].step()
    loss.update_targets()

    out = {"loss_qvalue": loss_q, "loss_actor": loss_pi, "loss_alpha": loss_a, **info}
    return TensorDict({**out, **loss._diagnostics(logp)}, batch_size=[]).detach()
