"""Rollout videos: MP4 writing, the sigma strip, captions, kinematic replays of maze and cube episodes."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest

# imported before anything renders: MuJoCo's software EGL (Mesa llvmpipe) loads an LLVM that makes a LATER
# first import of triton (torchvision -> torch._dynamo, pulled in by the cube task) segfault
from app.tasks.cube.config import CubeConfig
from app.tasks.cube.env import CubePointCloudEnv
from app.tasks.cube.video import render_qpos
from app.tasks.maze.env import MazeExpert, make_maze_env, seeded_global_numpy
from app.tasks.maze.video import render_path
from app.video import CURSOR_RGB, CURVE_RGB, SigmaStrip, caption, with_sigma_strip, write_mp4


def pattern(t: int = 12, h: int = 30, w: int = 41) -> np.ndarray:
    """(t, h, w, 3) uint8: a left block whose grey level steps with the frame, a constant colour beside it."""
    frames = np.empty((t, h, w, 3), np.uint8)
    frames[:, :, : w // 2] = (20 + 15 * np.arange(t, dtype=np.uint8))[:, None, None, None]
    frames[:, :, w // 2 :] = (200, 60, 30)
    return frames


def read_mp4(path) -> tuple[np.ndarray, dict]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([frame for frame in reader.iter_data()]), reader.get_meta_data()
    finally:
        reader.close()


def test_an_mp4_reads_back_as_the_frames_written(tmp_path):
    frames = pattern()  # odd width: padded by one column for yuv420p
    path = write_mp4(frames, tmp_path / "videos" / "ep.mp4", fps=10)
    assert path == tmp_path / "videos" / "ep.mp4"
    back, meta = read_mp4(path)
    assert back.shape == (12, 30, 42, 3)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 10
    error = np.abs(back[:, :, :41].astype(int) - frames.astype(int))
    assert error.mean() < 3 and np.median(error) <= 2  # lossy, but close (chroma is subsampled)
    # the frames are in order: the left block's grey level steps up frame after frame
    assert np.all(np.diff(back[:, 15, 5].astype(int).mean(-1)) > 10)
    np.testing.assert_allclose(back[:, :, 41].astype(int), back[:, :, 40].astype(int), atol=4)  # edge copy
    assert sorted(p.name for p in path.parent.iterdir()) == ["ep.mp4"]  # no temporary file left


def test_a_failed_encode_leaves_no_video_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ep.mp4"
    path.write_bytes(b"the previous video")
    real = imageio.get_writer

    def failing_writer(*args, **kwargs):
        writer, calls = real(*args, **kwargs), []

        def append(frame):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("killed mid-encode")
            writer.__class__.append_data(writer, frame)

        writer.append_data = append
        return writer

    monkeypatch.setattr(imageio, "get_writer", failing_writer)
    with pytest.raises(RuntimeError, match="killed mid-encode"):
        write_mp4(pattern(), path)
    assert path.read_bytes() == b"the previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep.mp4"]
    with pytest.raises(RuntimeError):
        write_mp4(pattern(), tmp_path / "new.mp4")
    assert not (tmp_path / "new.mp4").exists()


def test_bad_frames_are_named_in_the_error(tmp_path):
    good = pattern()
    cases = [good.astype(np.float32), good[..., 0], good[..., :2], good[:0], good[0]]
    for bad in cases:
        with pytest.raises(ValueError, match=r"write_mp4: frames are .* expected uint8 \(T, H, W, 3\)"):
            write_mp4(bad, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="fps=0"):
        write_mp4(good, tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError, match="with_sigma_strip: frames are float32"):
        with_sigma_strip(good.astype(np.float32), np.zeros(12), 1.0)
    with pytest.raises(ValueError, match=r"steps span \[0, 11\] but sigma has 5 values"):
        with_sigma_strip(good, np.zeros(5), 1.0)
    with pytest.raises(ValueError, match=r"steps are .* expected integers \(12,\)"):
        with_sigma_strip(good, np.zeros(12), 1.0, steps=np.arange(3))
    with pytest.raises(ValueError, match="sigma_max=0"):
        with_sigma_strip(good, np.zeros(12), 0.0)
    assert not (tmp_path / "x.mp4").exists()


def colour_mask(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(rgb)).max(-1) <= tol


def test_the_sigma_cursor_follows_the_step_and_the_marker_the_value():
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 96, 3), dtype=np.uint8)
    sigma = np.linspace(0.0, 0.5, 50)  # a ramp over the whole range [0, sigma_max]
    steps = np.array([0, 10, 25, 40, 49])
    out = with_sigma_strip(frames, sigma, sigma_max=0.5, steps=steps, height=40)
    assert out.shape == (5, 80, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :40], frames)  # the frames themselves are untouched
    strip = SigmaStrip(sigma, 0.5, 96, 40)
    columns, rows = [], []
    for k in range(5):
        red = colour_mask(out[k, 40:], CURSOR_RGB, tol=10)
        red[: strip.top] = False  # the value's text is red too
        per_column = red.sum(0)
        cursor = int(per_column.argmax())
        assert per_column[cursor] >= strip.bottom - strip.top  # a full-height line
        columns.append(cursor)
        wide = red.sum(1) >= 4  # the marker: the only red wider than the line
        rows.append(np.flatnonzero(wide).mean())
    assert columns == [strip.x_of(s) for s in steps]
    assert columns[0] == strip.left and columns[-1] == strip.right and np.all(np.diff(columns) > 0)
    assert rows[0] == pytest.approx(strip.bottom, abs=1) and rows[-1] == pytest.approx(strip.top, abs=1)
    assert np.all(np.diff(rows) < 0)  # sigma rises: the marker climbs


def test_the_sigma_strip_spans_zero_to_sigma_max_and_writes_the_value():
    ramp = SigmaStrip(np.linspace(0.0, 2.0, 30), 2.0, 96, 40)
    blue = np.flatnonzero(colour_mask(ramp.background, CURVE_RGB).any(1))
    assert blue.min() == pytest.approx(ramp.top, abs=1) and blue.max() == pytest.approx(ramp.bottom, abs=1)
    half = SigmaStrip(np.full(30, 1.0), 2.0, 96, 40)
    rows = np.flatnonzero(colour_mask(half.background, CURVE_RGB).any(1))
    assert rows.mean() == pytest.approx((ramp.top + ramp.bottom) / 2, abs=1)
    over = SigmaStrip(np.full(30, 5.0), 2.0, 96, 40)  # beyond the range: drawn at its top edge
    assert np.flatnonzero(colour_mask(over.background, CURVE_RGB).any(1)).mean() == pytest.approx(
        over.top, abs=1
    )
    # the value is written in the title band: equal values draw equal text, different values differ
    steps = SigmaStrip(np.array([0.25, 0.25, 1.75, np.nan]), 2.0, 96, 40)
    band = [steps.draw(t)[: steps.top - 3, 48:] for t in range(4)]
    np.testing.assert_array_equal(band[0], band[1])
    assert not np.array_equal(band[0], band[2]) and not np.array_equal(band[0], band[3])
    assert colour_mask(band[2], CURSOR_RGB, tol=60).any()
    nan_frame = colour_mask(steps.draw(3)[steps.top :], CURSOR_RGB, tol=10)
    assert nan_frame.sum(1).max() == 1  # a cursor, but no marker where sigma is unknown


def test_a_caption_is_stamped_top_left_only():
    frames = np.full((3, 64, 64, 3), 128, np.uint8)
    out = caption(frames, "ep 7: success", color=(0, 255, 0))
    assert out.shape == frames.shape and (frames == 128).all()  # a copy: the input is untouched
    changed = (out != frames).any(-1)  # (T, H, W)
    assert changed[:, :4, :4].all() and not changed[:, 32:].any()
    assert colour_mask(out[0, :12], (0, 255, 0), tol=100).sum() > 10  # the text, in its colour
    np.testing.assert_array_equal(out[0], out[2])


AGENT = "agent"


def blob(frame: np.ndarray, kind: str) -> np.ndarray:
    """(row, col) centroid of the agent's yellow or the goal marker's pink pixels in an (H, W, 3) frame."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    mask = (r > 150) & (g > 100) & (g - b > 30) if kind == AGENT else (r > 150) & (r - g > 60) & (b > 60)
    assert mask.sum() >= 2, f"no {kind} in the frame"
    return np.argwhere(mask).mean(0)


@pytest.fixture(scope="module")
def recorded_episode():
    """The scripted expert's path on the medium maze's task 1 (first 120 steps) and its goal."""
    env, rng, expert = make_maze_env("pointmaze-medium"), np.random.default_rng(0), MazeExpert()
    with seeded_global_numpy(rng):
        ob, info = env.reset(seed=1, options=dict(task_id=1))
        goal = info["goal"][:2]
        expert.reset(env, rng)
        expert.set_goal(goal)
        path = [ob[:2]]
        for _ in range(119):
            ob, *_ = env.step(expert.act(ob[:2]))
            path.append(ob[:2])
    env.close()
    return np.array(path), np.asarray(goal)


def test_a_maze_replay_draws_the_point_where_the_path_says(recorded_episode):
    path, goal = recorded_episode
    state = np.random.get_state()[1].copy()
    frames = render_path("pointmaze-medium", path, goal, size=64)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global generator is left alone
    assert frames.shape == (120, 64, 64, 3) and frames.dtype == np.uint8
    assert np.linalg.norm(path[-1] - path[0]) > 8  # the path crosses cells: the frames must show it
    centroids = np.array([blob(f, AGENT) for f in frames])  # (T, 2) of (row, col)
    # top-down, x to the right and y up: column = a x + b, row = c - a y, one scale for both axes
    col_fit = np.polyfit(path[:, 0], centroids[:, 1], 1)
    row_fit = np.polyfit(path[:, 1], centroids[:, 0], 1)
    assert col_fit[0] > 0 and row_fit[0] < 0 and col_fit[0] == pytest.approx(-row_fit[0], rel=0.1)
    predicted = np.stack([np.polyval(row_fit, path[:, 1]), np.polyval(col_fit, path[:, 0])], 1)
    assert np.abs(predicted - centroids).max() < 1.5  # every frame: the point within a pixel or so
    marker = blob(frames[0], "goal")
    np.testing.assert_allclose(marker, [np.polyval(row_fit, goal[1]), np.polyval(col_fit, goal[0])], atol=1.5)
    thinned = render_path("pointmaze-medium", path, goal, size=64, every=7)
    assert len(thinned) == 18  # ceil(120 / 7)
    np.testing.assert_array_equal(thinned, frames[::7])


def test_a_maze_replay_checks_its_inputs():
    with pytest.raises(ValueError, match=r"path_xy has shape \(5, 3\)"):
        render_path("pointmaze-medium", np.zeros((5, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=r"goal_xy has shape \(3,\)"):
        render_path("pointmaze-medium", np.zeros((5, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="every=0"):
        render_path("pointmaze-medium", np.zeros((5, 2)), np.zeros(2), every=0)
    with pytest.raises(ValueError, match="view='side'"):
        render_path("pointmaze-medium", np.zeros((5, 2)), np.zeros(2), view="side")
    with pytest.raises(ValueError, match="unknown maze environment 'pointmaze-tiny'"):
        render_path("pointmaze-tiny", np.zeros((5, 2)), np.zeros(2))


def red_cube(frame: np.ndarray) -> np.ndarray:
    """(row, col) centroid of the opaque red cube's pixels in a cube-single frame."""
    r, g = frame[..., 0].astype(int), frame[..., 1].astype(int)
    mask = (r > 150) & (r - g > 80)
    assert mask.sum() >= 3, "no cube in the frame"
    return np.argwhere(mask).mean(0)


@pytest.fixture(scope="module")
def cube_scene():
    """A recorded cube-single state (the full qpos after a reset), its target and the scene's cube index."""
    env = CubePointCloudEnv(CubeConfig(output="image", cameras=["front_pixels"], width=32, height=32))
    try:
        _, info = env.reset(seed=3)
        cube = env.sim._model.jnt_qposadr[env.sim._model.joint("object_joint_0").id]
        return info["qpos"].copy(), env.goal(), int(cube)
    finally:
        env.close()


def test_a_cube_replay_puts_the_cube_where_the_qpos_says(cube_scene):
    qpos, goal, cube = cube_scene
    moved = np.stack([qpos, qpos, qpos])
    moved[1, cube] += 0.08  # the cube 8 cm along +x: towards the front camera, lower in its image
    moved[2, cube + 1] += 0.08  # 8 cm along +y: to the right in its image
    frames = render_qpos(moved, goal, size=64)
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    at, nearer, right = (red_cube(f) for f in frames)
    assert nearer[0] - at[0] > 3 and abs(nearer[1] - at[1]) < 2
    assert right[1] - at[1] > 3 and abs(right[0] - at[0]) < 2
    with pytest.raises(ValueError, match="qpos has 20 values per step; the scene has 21"):
        render_qpos(qpos[None, :20], goal, size=16)


@pytest.mark.slow
def test_a_cube_replay_shows_the_target_at_the_goal(cube_scene):
    qpos, goal, _ = cube_scene
    shown = render_qpos(qpos[None], goal, size=64)[0].astype(int)
    hidden = render_qpos(qpos[None], np.array([goal[0], goal[1], -1.0]), size=64)[0].astype(
        int
    )  # below the floor
    changed = np.argwhere(np.abs(shown - hidden).max(-1) > 10)
    assert len(changed) >= 4  # the translucent target is drawn ...
    far = np.array([goal[0], goal[1] + 0.15, goal[2]])  # ... and where the goal is: 15 cm to the right
    moved = render_qpos(qpos[None], far, size=64)[0].astype(int)
    changed_far = np.argwhere(np.abs(moved - hidden).max(-1) > 10)
    assert changed_far[:, 1].mean() - changed[:, 1].mean() > 5
