"""The visual cube task: OGBench cube-single seen through RGB cameras (``visual-cube-single``, after OGBench's
``visual-cube-single-v0``: its ``front_pixels`` camera, 64 x 64, its pixel-task colours).

The policy reads the arm's 19-d proprioception and the target cube position (3-d, clean), and the camera
frames, whose normalized embedding is the context CSP noises (context_mode ``image_embedding``): the cube
itself is seen only in the frames. Scenes, variations, the scripted oracle, the backend and the Success@K
evaluation are the point-cloud cube task's; only the sensor's output differs (``CubeConfig.output``
"image"), and those camera settings are saved in the policy checkpoint as its ``sensor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from app.tasks.cube.config import VISUAL_CUBE_ENVS
from app.tasks.cube.task import CubeTask
from app.tasks.cube.visual_config import VisualCubeDemoConfig, VisualCubeFitConfig

if TYPE_CHECKING:
    from datamodules.image import ImageDataModule
    from modules.nets.policy import CSPPolicy

# CubeConfig fields that only shape a point cloud: `tmrl demos` flags for them do not apply to frames
CLOUD_ONLY = ("num_points",)


class VisualCubeTask(CubeTask):
    """The cube task through RGB cameras: its env names are ``visual-cube-*``, its sensor renders frames."""

    name = "visual-cube"
    env_names = VISUAL_CUBE_ENVS
    context_modes = ("image_embedding",)
    demo_schema = VisualCubeDemoConfig

    def fit_schema(self) -> type[VisualCubeFitConfig]:
        return VisualCubeFitConfig

    def datamodule(self, cfg: VisualCubeFitConfig) -> ImageDataModule:
        from datamodules.image import ImageDataModule

        return ImageDataModule(cfg.data, chunk_len=cfg.policy.chunk_len, seed=cfg.seed)

    def legacy_sensor(self, run_config: Mapping[str, Any], policy: CSPPolicy, who: str) -> dict[str, Any]:
        return {}  # every visual cube policy was saved with its sensor: there is no older kind to recover

    def demo_config(
        self, env: str, episodes: int, length: int | None, seed: int, noise_std: float | None,
        options: Mapping[str, Any],
    ) -> VisualCubeDemoConfig:  # fmt: skip
        if unknown := sorted(set(options) & set(CLOUD_ONLY)):
            flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
            raise ValueError(f"{flags} do(es) not apply to {env!r}: it records camera frames, not clouds")
        return super().demo_config(env, episodes, length, seed, noise_std, options)
