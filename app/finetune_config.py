"""The typed schema of `tmrl finetune`: the method, the target task, chunk execution, the agent, data
collection, evaluation, offline mixing and tracking. YAML under configs/ (tmrl_*.yaml) and command-line
overrides are merged onto these defaults by ``app.config.load_config``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from app.config import check_ranges
from app.envs.decoders import EPS_MAPS, Z_MAPS, Z_MODES
from app.methods import METHODS
from app.tasks.registry import TaskConfig
from app.tracking import TrackingConfig


@dataclass
class ChunkConfig:
    """How a high-level action becomes low-level actions."""

    exec_horizon: int = 5  # H_exec: actions of each chunk run open loop
    sample_steps: int = 10  # K Euler steps of the base policy
    sigma_max: float = 1.0  # tmrl: sigma = sigma_max * (u + 1) / 2
    fixed_sigma: float = 0.5  # fixed_sigma method (dsrl always uses 0)
    # "full": z is the whole L x d_a noise (the base's own noise space); "repeat": one d_a vector repeated
    # over the chunk (the reference's; off the noise distribution the base was trained on)
    z_mode: str = "full"
    # "atanh": z = atanh(u), so the actor's initial N(0, 1) pre-tanh distribution IS the base's N(0, I)
    # noise; "erfinv": a uniform u -> N(0, 1); "linear": 3 * u
    z_map: str = "atanh"
    z_bound: float = 4.0  # |z| clip of the atanh map
    eps_map: str = "atanh"  # eps_c (or its code) = atanh(u) ("atanh") or eps_bound * u ("linear")
    eps_bound: float = 4.0  # |eps_c| <= eps_bound (the clip of "atanh", the scale of "linear")

    def __post_init__(self) -> None:
        check_ranges("chunk", self, exec_horizon=">= 1", sample_steps=">= 1", sigma_max="in (0, 1]")
        check_ranges("chunk", self, fixed_sigma="in [0, 1]", z_bound="> 0", eps_bound="> 0")
        for name, allowed in (("z_mode", Z_MODES), ("z_map", Z_MAPS), ("eps_map", EPS_MAPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"chunk.{name}={getattr(self, name)!r}; expected one of {list(allowed)}")


@dataclass
class AgentConfig:
    """The high-level SAC agent and its updates."""

    hidden: int = 256
    actor_layers: int = 2
    # pre-tanh std of the z and eps_c heads at the start (None: the usual SAC start, std 0.22, which keeps
    # z near 0, a noise the base policy never saw); 1.0 with chunk.z_map=atanh starts at the base's noise
    init_std: float | None = 1.0
    # the sigma head's start: median sigma and pre-tanh std (near 0: the agent starts as the base at
    # sigma = 0 and explores upward as its temperature asks)
    sigma_init: float = 0.02
    sigma_init_std: float = 0.3
    # what each head's temperature weighs. "entropy" (SAC): the actor is pulled towards maximum entropy,
    # for the sigma head sigma_max / 2, where the base fails. "prior": KL to the actor's initial
    # distribution (the base's noise at sigma near 0): with no advantage in sight the agent stays the base.
    # "auto": prior for the methods with a base policy, entropy for sac / rlpd.
    regularizer: str = "auto"
    autotune_alpha: bool = True  # False: every temperature stays at init_alpha
    # entropy targets (regularizer=entropy): per dimension for z and eps_c (target = value * dim), sigma head
    target_entropy_per_dim: float = -1.0
    target_entropy_sigma: float = -1.0
    # KL budgets (regularizer=prior): per dimension for z and eps_c, and for the sigma head
    target_kl_per_dim: float = 0.05
    target_kl_sigma: float = 0.5
    critic_layers: int = 3
    num_critics: int = 5
    gamma: float = 0.99  # per ENVIRONMENT step; a chunk of n steps discounts by gamma ** n
    tau: float = 0.005
    lr: float = 3e-4
    init_alpha: float = 1.0
    entropy_in_target: bool = True
    batch_size: int = 256
    utd_ratio: float = 1.0  # gradient updates per collected high-level transition (chunk)

    def __post_init__(self) -> None:
        check_ranges("agent", self, hidden=">= 1", actor_layers=">= 1", critic_layers=">= 0")
        check_ranges("agent", self, num_critics=">= 1", gamma="in [0, 1]", tau="in (0, 1]", lr="> 0")
        check_ranges("agent", self, init_alpha="> 0", batch_size=">= 1", utd_ratio=">= 0", init_std="> 0")
        check_ranges("agent", self, sigma_init_std="> 0")
        if self.regularizer not in ("auto", "entropy", "prior"):
            raise ValueError(f"agent.regularizer={self.regularizer!r}; expected 'auto', 'entropy' or 'prior'")
        if not self.target_kl_per_dim >= 0 or not self.target_kl_sigma >= 0:
            raise ValueError("agent.target_kl_per_dim and agent.target_kl_sigma must be >= 0")


@dataclass
class CollectConfig:
    """Data collection and replay."""

    num_envs: int = 8  # sub-environments stepped together (the base policy samples for all at once)
    chunks_per_batch: int = 1  # high-level steps per sub-env per collector batch
    # 0: collect in this process (torchrl Collector), alternating with the updates; n >= 1: n worker
    # processes, each with num_envs sub-envs (what each setting runs: app.collect)
    workers: int = 0
    # False: each batch is one worker's while the others collect on, WHILE the agent updates (weights at
    # most one batch old; MultiAsyncCollector). True: each batch gathers one sub-batch from every worker,
    # all acting with the weights of the last update, and the workers wait during the updates
    sync: bool = False
    # "local": worker processes of this machine (TorchRL's multiprocess collectors); "distributed": TorchRL's
    # torch.distributed collector (gloo over TCP), its workers launched by `launcher`
    backend: str = "local"
    launcher: str = "mp"  # backend=distributed: "mp", processes here; "submitit", one SLURM job per worker
    tcp_port: int = 0  # backend=distributed: the learner listens on it and the next two; 0: free ones
    # launcher=submitit: each worker's SLURM job (TorchRL's defaults, but a day's time limit, not 10 min)
    slurm_partition: str = "train"
    slurm_cpus_per_task: int = 32
    slurm_timeout_min: int = 1440
    warmup_chunks: int = 500  # chunks collected before the first update
    # what acts during the warm-up: "actor", the initial actor (for base-policy methods: the base's own
    # noise at sigma near 0); "uniform": uniform random high-level actions (TorchRL's init_random_frames)
    warmup_actions: str = "actor"
    buffer_size: int = 1_000_000
    memmap: bool = False  # LazyMemmapStorage (on disk) instead of LazyTensorStorage (memory)

    def __post_init__(self) -> None:
        check_ranges("collect", self, num_envs=">= 1", chunks_per_batch=">= 1", workers=">= 0")
        check_ranges("collect", self, warmup_chunks=">= 0", buffer_size=">= 1")
        check_ranges("collect", self, slurm_cpus_per_task=">= 1", slurm_timeout_min=">= 1")
        for name, allowed in (("warmup_actions", ("actor", "uniform")), ("backend", ("local", "distributed")),
                              ("launcher", ("mp", "submitit"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"collect.{name}={getattr(self, name)!r}; expected one of {list(allowed)}")
        if not (self.tcp_port == 0 or 1024 <= self.tcp_port <= 65533):
            raise ValueError(f"collect.tcp_port must be 0 (free) or in [1024, 65533], got {self.tcp_port}")
        if self.workers == 0 and (self.sync or self.backend != "local"):
            what = "collect.sync=true" if self.sync else f"collect.backend={self.backend}"
            raise ValueError(f"{what} needs collect.workers >= 1 (collector processes), got 0")
        if self.launcher != "mp" and self.backend != "distributed":
            raise ValueError(f"collect.launcher={self.launcher} needs collect.backend=distributed")
        if self.launcher == "submitit" and importlib.util.find_spec("submitit") is None:
            raise ValueError("collect.launcher=submitit needs the submitit package: pip install submitit")


@dataclass
class FinetuneEvalConfig:
    """Periodic evaluation on a fixed, seeded set of episodes (starts, goals and the agent's sampling
    noise all seeded), at env step 0 and every ``every_env_steps``."""

    every_env_steps: int = 10_000  # 0 disables evaluation (benchmarks)
    episodes: int = 20
    seed: int = 12345
    # False: the agent SAMPLES its actions (the TMRL reference's evaluation). True: tanh(mean), which for
    # a fresh agent decodes to z = 0, a noise the base never saw (it succeeds 0% from there)
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_ranges("eval", self, every_env_steps=">= 0", episodes=">= 1")


@dataclass
class OfflineConfig:
    """RLPD-style mixing with the demonstrations (method=rlpd: raw actions, no base policy)."""

    fraction: float = 0.5  # share of each replay batch drawn from the demonstrations
    path: str | None = None  # episode store; None: the pre-training run's data.path

    def __post_init__(self) -> None:
        check_ranges("offline", self, fraction="in [0, 1]")


@dataclass
class FinetuneConfig:
    """Everything `tmrl finetune` needs."""

    seed: int = 0
    method: str = "tmrl"  # tmrl | dsrl | fixed_sigma | sac | rlpd
    env_steps: int = 100_000  # total REAL environment steps
    checkpoint_every_env_steps: int = 50_000
    output_dir: str = "runs"
    task: TaskConfig = field(default_factory=TaskConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resume: str | None = None  # id of a fine-tuning run (of the same pre-training run) to continue
    progress_bar: bool = True
    threads: int = 1  # torch threads: small nets and a busy 2-core machine favour 1 (0 = torch's default)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {sorted(METHODS)}")
        check_ranges("", self, env_steps=">= 1", checkpoint_every_env_steps=">= 1", threads=">= 0")
        if self.method == "tmrl" and not 0.0 < self.agent.sigma_init < self.chunk.sigma_max:
            raise ValueError(
                f"agent.sigma_init={self.agent.sigma_init} must lie inside (0, chunk.sigma_max="
                f"{self.chunk.sigma_max}): it is the sigma head's initial median"
            )
        if self.method == "rlpd" and not self.task.task.offline_demos:
            raise ValueError(
                f"method=rlpd mixes in the maze demonstrations' chunks; on task.env={self.task.env!r} use "
                "tmrl, fixed_sigma, dsrl or sac"
            )
