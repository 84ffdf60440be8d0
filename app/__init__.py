"""tmrl application layer: CLI, orchestration, configuration and tracking."""

import os

# Headless MuJoCo rendering (cameras, depth clouds) everywhere the app runs: mujoco picks its GL backend
# when it is first imported, and a library may import it before any renderer of ours is built.
os.environ.setdefault("MUJOCO_GL", "egl")
