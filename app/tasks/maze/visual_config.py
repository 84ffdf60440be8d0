"""The visual maze task's `tmrl fit` schema: camera demonstrations and image data. Light: importing it builds
no environment and imports neither MuJoCo nor timm."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.schema import DemoConfig, FitConfig, check_frames
from app.tasks.maze.camera import MazeCameraConfig
from datamodules.image import ImageDataConfig


@dataclass
class VisualMazeDemoConfig(DemoConfig):
    """The maze expert's demonstrations, recorded through ``camera``."""

    env: str = "visual-pointmaze-medium"
    camera: MazeCameraConfig = field(default_factory=MazeCameraConfig)


@dataclass
class VisualMazeFitConfig(FitConfig):
    """`tmrl fit` with ``policy.context_mode: image_embedding`` on a visual maze: camera frames in, the goal
    seen only in them. The cameras, the stored frames and the policy's image encoder must agree."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    demos: VisualMazeDemoConfig = field(default_factory=VisualMazeDemoConfig)

    def __post_init__(self) -> None:
        camera = self.demos.camera
        size = [camera.height, camera.width]
        encoder = self.policy.image_encoder
        check_frames("demos.camera", size, len(camera.cameras), self.data, encoder, self.eval.enabled)
        if self.eval.enabled and self.eval.exec_horizon > self.policy.chunk_len:  # refused before training
            raise ValueError(
                f"eval.exec_horizon={self.eval.exec_horizon} exceeds policy.chunk_len={self.policy.chunk_len}"
            )
