"""Cameras on an OGBench pointmaze: RGB frames of the maze with its goal marker, rendered headless by MuJoCo.

The visual maze task (``visual-pointmaze-*``) shows its goal ONLY in the image: the policy reads the point's
xy position (clean proprioception) and the frames, whose embedding is the context CSP noises. Cameras:

- ``top``: the whole maze from straight above (x to the right, y up, as the path plots draw it): walls, the
  point and the goal marker.
- ``follow``: from above the point, ``follow_cells`` maze cells across: the walls around it, the goal
  only once it is near.

OGBench's goal marker (a flat cylinder, radius 0.5, rendering only) would be about one pixel wide at 64
pixels; ``marker_radius`` enlarges it (it has no collision: physics are unchanged). One ``mujoco.Renderer``
serves every sub-env of a batch: the sub-envs share one model layout, and a frame is the scene of one
sub-env's ``MjData`` with the marker moved to that sub-env's goal. Shadows are off (software rendering is
5-30x faster without them): about 150 frames/s at 64 x 64 on one core here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CAMERAS = ("top", "follow")


@dataclass
class MazeCameraConfig:
    """The cameras of the visual maze task (saved in the policy checkpoint as its ``sensor``).

    Attributes:
        cameras: names from ``CAMERAS``, one frame each per step, in this order.
        width, height: pixels of every frame.
        marker_radius: radius of the rendered goal marker, maze units (a cell is 4 units wide).
        follow_cells: how many maze cells the ``follow`` camera spans.
    """

    cameras: list[str] = field(default_factory=lambda: ["top"])
    width: int = 64
    height: int = 64
    marker_radius: float = 3.0
    follow_cells: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.cameras, str) or not list(self.cameras):
            raise ValueError(f"camera.cameras={self.cameras!r}; expected a non-empty list of {list(CAMERAS)}")
        self.cameras = [str(c) for c in self.cameras]
        if unknown := [c for c in self.cameras if c not in CAMERAS]:
            raise ValueError(
                f"camera.cameras has unknown cameras {unknown}; expected names from {list(CAMERAS)}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 1024:
                raise ValueError(f"camera.{name}={value!r}; expected an integer in [8, 1024] pixels")
        for name in ("marker_radius", "follow_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"camera.{name}={value!r}; expected a number > 0")

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """(C, H, W, 3): one step's frames."""
        return (len(self.cameras), self.height, self.width, 3)


class MazeCamera:
    """Renders ``cfg.cameras`` of any sub-env of one maze layout (``maze``: an unwrapped OGBench maze env)."""

    def __init__(self, maze: Any, cfg: MazeCameraConfig) -> None:
        import mujoco

        self.cfg = cfg
        self._mujoco = mujoco
        self._model = maze.model
        target = self._model.geom("target")
        target.size[0] = cfg.marker_radius
        self._target_id = int(target.id)
        try:
            self._renderer = mujoco.Renderer(self._model, cfg.height, cfg.width)
        except Exception as err:  # no GL backend: say how to get one
            raise RuntimeError(
                f"headless rendering failed ({err}); set MUJOCO_GL=egl (or osmesa) in the environment before "
                f"anything imports mujoco (it is {os.environ.get('MUJOCO_GL')!r})"
            ) from err
        unit = float(maze._maze_unit)
        rows, cols = np.asarray(maze.maze_map).shape
        fovy = math.radians(float(self._model.vis.global_.fovy))
        span = 2.0 * math.tan(fovy / 2.0)  # visible extent per unit of camera distance
        top = mujoco.MjvCamera()
        # the interior of the map (the outer ring is wall): its centre, seen from straight above
        top.lookat[:] = [*maze.ij_to_xy(((rows - 1) / 2, (cols - 1) / 2)), 0.0]
        top.distance = unit * (max(rows, cols) - 1) / span
        top.elevation, top.azimuth = -90.0, 90.0
        follow = mujoco.MjvCamera()
        follow.distance = unit * cfg.follow_cells / span
        follow.elevation, follow.azimuth = -90.0, 90.0
        self._cameras = {"top": top, "follow": follow}

    def render(self, data: Any, goal_xy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(C, H, W, 3) uint8 frames of the sub-env whose state is ``data`` (its ``MjData``), goal marker at
        ``goal_xy`` (2,). Written into ``out`` when given."""
        mujoco = self._mujoco
        frames = np.empty(self.cfg.frame_shape, np.uint8) if out is None else out
        follow = self._cameras["follow"]
        follow.lookat[:] = [float(data.qpos[0]), float(data.qpos[1]), 0.0]
        for c, name in enumerate(self.cfg.cameras):
            self._renderer.update_scene(data, camera=self._cameras[name])
            scene = self._renderer.scene
            scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            # the marker is drawn where this row's goal is (its geom's world position in ``data`` is the
            # one OGBench set at that sub-env's reset): move it in the scene, leaving ``data`` untouched
            for k in range(scene.ngeom):
                geom = scene.geoms[k]
                if geom.objtype == mujoco.mjtObj.mjOBJ_GEOM and geom.objid == self._target_id:
                    geom.pos[:2] = goal_xy[:2]
            self._renderer.render(out=frames[c])
        return frames

    def close(self) -> None:
        """Free the GL context."""
        self._renderer.close()
