"""The visual cube task's `tmrl fit` schema: oracle demonstrations recorded through RGB cameras, image data,
and the cube's Success@K evaluation. Light: importing it builds no environment and imports neither MuJoCo
nor timm."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.schema import FitConfig, check_frames
from app.tasks.cube.config import CubeConfig, CubeEvalConfig, PointCloudDemoConfig
from datamodules.image import ImageDataConfig
from modules.nets.keys import IMAGE


def pixel_camera() -> CubeConfig:
    """OGBench's visual-cube-single-v0 sensor: its ``front_pixels`` camera, 64 x 64 RGB."""
    return CubeConfig(cameras=["front_pixels"], output=IMAGE, width=64, height=64)


@dataclass
class VisualCubeDemoConfig(PointCloudDemoConfig):
    """The cube oracle's demonstrations (the same scenes and noise as the point-cloud task's), recorded as
    RGB frames: ``cube.output`` is "image", ``cube.cameras`` / ``width`` / ``height`` are the cameras."""

    env: str = "visual-cube-single"
    cube: CubeConfig = field(default_factory=pixel_camera)


@dataclass
class VisualCubeFitConfig(FitConfig):
    """`tmrl fit` with ``policy.context_mode: image_embedding`` on the visual cube: the arm's proprioception
    and the target (clean) and camera frames (their embedding noised) in; the cube's Success@K evaluation
    in ``demos.cube``'s cameras. The cameras, the stored frames and the policy's image encoder must agree."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    demos: VisualCubeDemoConfig = field(default_factory=VisualCubeDemoConfig)
    eval: CubeEvalConfig = field(default_factory=CubeEvalConfig)

    def __post_init__(self) -> None:
        cube = self.demos.cube
        size = [cube.height, cube.width]
        encoder = self.policy.image_encoder
        check_frames("demos.cube", size, len(cube.cameras), self.data, encoder, self.eval.enabled)
        if self.eval.enabled and self.eval.exec_horizon > self.policy.chunk_len:  # refused before training
            raise ValueError(
                f"eval.exec_horizon={self.eval.exec_horizon} exceeds policy.chunk_len={self.policy.chunk_len}"
            )
