"""The rollout videos of `tmrl eval`: a success and a failure per sigma (pre-training runs) or per mode
(fine-tuning runs), replayed by the task's renderer, as MP4 files under ``<out>/videos/``.

    pre-training run   the zero-shot rollouts the task recorded (``ZeroShot.replays``): per sigma of
                       ``eval.sigmas`` the first successful and the first failed rollout
    fine-tuning run    the agent's evaluation episodes (``EpisodeTrace``), deterministic and stochastic;
                       when the agent chose sigma (method tmrl), its choice at every step is drawn as a
                       strip under the frames (``app.video.with_sigma_strip``), cursor on the current step

A replay is kinematic (the recorded positions or simulator states put back, nothing simulated), so the video
shows exactly the evaluated episode. Long episodes are shown every k-th step, k chosen to keep a video at
most ``max_frames`` frames (a 1000-step maze episode: 250 frames, 12.5 s at 20 frames/s).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from app.agent_eval import EpisodeTrace
from app.tasks.base import Replay, Task
from app.video import caption, with_sigma_strip, write_mp4

FPS = 20
SHORT = {"deterministic": "determ.", "stochastic": "stoch."}  # the modes in captions
SUCCESS_RGB, FAILURE_RGB = (120, 230, 120), (255, 120, 120)  # the caption's colour


def trace_replays(traces: dict[str, Sequence[EpisodeTrace]], per_outcome: int = 1) -> list[Replay]:
    """Per mode, the first ``per_outcome`` successful and failed episodes of ``traces`` (episode order), as
    replays: the simulator state per step where the trace has it (the cube's qpos), else the xy path (the
    maze), with the agent's sigma per step (None without a choice)."""
    chosen = []
    for mode, episodes in traces.items():
        for wanted, word in ((True, "success"), (False, "failure")):
            for trace in [t for t in episodes if t.success == wanted][:per_outcome]:
                path = trace.scene if trace.scene is not None else trace.xy
                label = f"{mode}_episode_{trace.episode}_{word}"
                title = f"{SHORT.get(mode, mode)} ep {trace.episode} {'ok' if wanted else 'fail'}"
                sigma = trace.sigma_per_step
                chosen.append(Replay(label, wanted, path, trace.goal, sigma, group=mode, title=title))
    return chosen


def frame_steps(length: int, max_frames: int) -> tuple[int, np.ndarray]:
    """(every, steps): show every ``every``-th of ``length`` recorded steps so at most ``max_frames`` remain;
    ``steps`` are the recorded indices shown."""
    if length < 1 or max_frames < 1:
        raise ValueError(f"frame_steps: length={length}, max_frames={max_frames}; expected both >= 1")
    every = max(1, math.ceil(length / max_frames))
    return every, np.arange(0, length, every)


def film(
    task: Task, env: str, replay: Replay, sigma_max: float | None, size: int = 128, max_frames: int = 250
) -> np.ndarray:
    """The frames of ``replay``: rendered by ``task``, the sigma strip under them when the replay has a
    sigma per step (its axis spanning [0, ``sigma_max``]), captioned with its title, green for a success and
    red for a failure."""
    every, steps = frame_steps(len(replay.path), max_frames)
    frames = task.render_replay(env, replay, size=size, every=every)
    if replay.sigma is not None and len(replay.sigma) and sigma_max:
        # the path has one more entry than actions (the reset): its last frame shows the last action's sigma
        shown = np.minimum(steps, len(replay.sigma) - 1)
        frames = with_sigma_strip(frames, replay.sigma, sigma_max, steps=shown)
    color = SUCCESS_RGB if replay.success else FAILURE_RGB
    return caption(frames, replay.title or replay.label.replace("_", " "), color=color)


def write_videos(
    task: Task,
    env: str,
    replays: Iterable[Replay],
    out: Path,
    sigma_max: float | None = None,
    size: int = 128,
    max_frames: int = 250,
) -> tuple[list[Path], str | None]:
    """Write one ``<out>/<label>.mp4`` per replay; returns (the files, a note when none could be made: a
    task without a renderer)."""
    replays = list(replays)
    if not replays:
        return [], "no videos: the evaluation recorded no episodes to film"
    files = []
    for replay in replays:
        try:
            frames = film(task, env, replay, sigma_max, size, max_frames)
        except NotImplementedError as err:
            return files, f"no videos: {err}"
        files.append(write_mp4(frames, out / f"{replay.label}.mp4", fps=FPS))
    return files, None
