"""The typed schema of `tmrl fit`: one dataclass per concern, each living beside the code it configures.

``FitConfig`` is the maze task's (the default); another task's schema derives from it in its own folder
(``app/tasks/cube/config.py``), chosen by ``app.tasks.registry.fit_schema``.

YAML files under configs/ and command-line ``key=value`` overrides are merged onto these defaults by
``app.config.load_config``; nothing past the loader sees anything but these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.config import check_ranges
from app.tasks.maze.config import DemoConfig, EvalConfig
from app.tracking import TrackingConfig
from datamodules.state import StateDataConfig
from modules.csp import OptimConfig
from modules.nets.policy import PolicyConfig


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (strategy, devices and precision scale pre-training out)."""

    max_steps: int = 20_000
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: str = "auto"  # "auto", a count ("2"), or a list ("[0,1]")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp | deepspeed ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    val_check_interval: int = 1000  # training steps between validations
    limit_val_batches: int = 20
    log_every_n_steps: int = 50
    # training steps between saves of checkpoints/last.ckpt (also saved at the last step): what a killed fit
    # resumed with resume=<run id> loses at most
    checkpoint_every_n_steps: int = 100
    progress_bar: bool = True

    def __post_init__(self) -> None:
        check_ranges("trainer", self, max_steps=">= 1", val_check_interval=">= 1", num_nodes=">= 1")
        check_ranges("trainer", self, limit_val_batches=">= 0", log_every_n_steps=">= 1")
        check_ranges("trainer", self, checkpoint_every_n_steps=">= 1")

    def devices_arg(self) -> str | int | list[int]:
        """`devices` as Lightning wants it: 'auto', an int, or a list of indices."""
        text = self.devices.strip()
        if text.isdigit():
            return int(text)
        if text.startswith("["):
            return [int(v) for v in text.strip("[]").split(",") if v.strip()]
        return text


@dataclass
class FitConfig:
    """Everything `tmrl fit` needs: data, policy, optimization, trainer, evaluation and tracking."""

    seed: int = 0
    output_dir: str = "runs"  # local checkpoints go to <output_dir>/<run_id>/checkpoints
    # a `tmrl fit` run id: continue that run from its last checkpoint; or a .ckpt path: a new run from it
    resume: str | None = None
    data: StateDataConfig = field(default_factory=StateDataConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def check_frames(camera: str, size: list[int], cameras: int, data: Any, encoder: Any, evaluate: bool) -> None:
    """Refuse a camera, a frame store and an image encoder that disagree on the frame size or the number of
    views, for the image tasks' fit schemas. ``camera`` names the camera section (``size`` [H, W] and
    ``cameras`` views are its values); ``data`` is the ImageDataConfig, ``encoder`` ``policy.image_encoder``.
    Frame stacking is the DataModule's alone (the evaluator and fine-tuning render one frame per camera per
    chunk), so ``data.frame_stack`` > 1 is refused while ``evaluate`` (``eval.enabled``) is on."""
    sizes = {f"{camera} [height, width]": size, "data.image_size": list(data.image_size)}
    sizes["policy.image_encoder.image_size"] = list(encoder.image_size)
    if any(value != size for value in sizes.values()):
        raise ValueError(
            f"the frame size must agree: {sizes}; set data.image_size: [${{{camera}.height}}, "
            f"${{{camera}.width}}] and policy.image_encoder.image_size: ${{data.image_size}}"
        )
    views = {f"len({camera}.cameras) x data.frame_stack": cameras * data.frame_stack}
    views |= {"data.cameras x data.frame_stack": data.cameras * data.frame_stack}
    views["policy.image_encoder.views"] = encoder.views
    if len(set(views.values())) != 1:
        raise ValueError(f"the number of views must agree: {views}")
    if evaluate and data.frame_stack > 1:
        raise ValueError(
            f"data.frame_stack={data.frame_stack} with eval.enabled: the zero-shot evaluation and "
            "fine-tuning render one frame per camera per chunk and stack none; set data.frame_stack=1, or "
            "eval.enabled=false to pre-train a frame-stacked policy (it cannot be fine-tuned)"
        )
