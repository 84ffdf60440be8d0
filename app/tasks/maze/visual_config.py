"""The visual maze task's `tmrl fit` schema: camera demonstrations and image data. Light: importing it builds
no environment and imports neither MuJoCo nor timm."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.schema import DemoConfig, FitConfig
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
        camera, enc = self.demos.camera, self.policy.image_encoder
        size = [camera.height, camera.width]
        sizes = {"demos.camera [height, width]": size, "data.image_size": list(self.data.image_size)}
        sizes["policy.image_encoder.image_size"] = list(enc.image_size)
        if any(value != size for value in sizes.values()):
            raise ValueError(
                f"the frame size must agree: {sizes}; set data.image_size: [${{demos.camera.height}}, "
                "${demos.camera.width}] and policy.image_encoder.image_size: ${data.image_size}"
            )
        views = {"len(demos.camera.cameras) x data.frame_stack": len(camera.cameras) * self.data.frame_stack}
        views |= {"data.cameras x data.frame_stack": self.data.cameras * self.data.frame_stack}
        views["policy.image_encoder.views"] = enc.views
        if len(set(views.values())) != 1:
            raise ValueError(f"the number of views must agree: {views}")
        if self.eval.enabled and self.eval.exec_horizon > self.policy.chunk_len:  # refused before training
            raise ValueError(
                f"eval.exec_horizon={self.eval.exec_horizon} exceeds policy.chunk_len={self.policy.chunk_len}"
            )
