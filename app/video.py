"""Rollout videos: MP4 files browsers and the MLflow UI play, a sigma strip under each frame, captions.

Frames are (T, H, W, 3) uint8 arrays throughout, so the pieces compose::

    frames = render_path(env, trace_xy, goal_xy)                 # app/tasks/maze/video.py
    frames = with_sigma_strip(frames, trace_sigma, sigma_max)     # the policy's sigma along the episode
    frames = caption(frames, f"episode 3: success")
    write_mp4(frames, "episode-3.mp4")

Nothing here imports MuJoCo: the renderers live with their tasks. The sigma curve is drawn once per episode
with matplotlib; a frame then only adds its cursor, marker and value with numpy and a cached text patch, so
a 1000-frame episode costs a fraction of a second on top of the rendering.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.plots import pyplot

CURVE_RGB = (31, 119, 180)  # matplotlib's tab:blue: the sigma curve
CURSOR_RGB = (214, 39, 40)  # tab:red: the current step's cursor, marker and value


def check_frames(frames: np.ndarray, who: str) -> np.ndarray:
    """``frames`` as an array, checked to be (T, H, W, 3) uint8 with T >= 1; a ValueError naming ``who``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"{who}: frames are {frames.dtype} {frames.shape}; expected uint8 (T, H, W, 3) with T >= 1"
        )
    return frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 20, quality: float = 8.0) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 to ``path`` as an H.264 MP4 (yuv420p, faststart) and return it.

    Encoded by imageio's FFMPEG plugin with imageio-ffmpeg's bundled ffmpeg: nothing to install. H.264 in
    yuv420p needs even sizes: an odd height or width gets one more row or column, a copy of the last.
    ``quality`` runs from 1 to 10 (imageio's scale; 8 is x264's crf 10, near lossless at these sizes).
    Missing parent folders are made. The file is written to a temporary name beside ``path`` and renamed
    when complete, so a failed or killed encode never leaves a truncated video at ``path``.

    Raises:
        ValueError: frames of the wrong shape or dtype, or ``fps`` < 1.
    """
    import imageio.v2 as imageio

    frames = check_frames(frames, "write_mp4")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"write_mp4: fps={fps!r}; expected an integer >= 1")
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")  # .mp4: ffmpeg picks the container by name
    try:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=quality,
            macro_block_size=1,  # sizes are even already: no resizing by imageio
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],  # the index first: browsers play while loading
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@lru_cache(maxsize=256)
def _text_alpha(text: str, size_px: int) -> np.ndarray:
    """(h, w) float32 coverage in [0, 1] of ``text`` drawn in PIL's default font, ``size_px`` pixels tall."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=size_px)
    except (TypeError, ImportError, OSError):  # a Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    image = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(image).text((-left, -top), text, fill=255, font=font)
    alpha = np.asarray(image, np.float32) / 255.0
    alpha.setflags(write=False)  # shared by the cache
    return alpha


def _blend(canvas: np.ndarray, alpha: np.ndarray, rgb: tuple[int, ...], row: int, col: int) -> None:
    """Paint colour ``rgb`` with coverage ``alpha`` (h, w) into ``canvas`` (..., H, W, 3) at (row, col), in
    place; the part outside the canvas is dropped."""
    height, width = canvas.shape[-3:-1]
    h, w = min(alpha.shape[0], height - row), min(alpha.shape[1], width - col)
    if h <= 0 or w <= 0:
        return
    a = alpha[:h, :w, None]
    region = canvas[..., row : row + h, col : col + w, :]
    region[...] = (region * (1.0 - a) + np.asarray(rgb, np.float32) * a + 0.5).astype(np.uint8)


def caption(
    frames: np.ndarray, text: str, color: tuple[int, int, int] = (255, 255, 255), size_px: int | None = None
) -> np.ndarray:
    """A copy of ``frames`` (T, H, W, 3) uint8 with ``text`` stamped at the top left on a dark box.

    ``size_px``: the text height, by default about a twelfth of the frame height (at least 8 pixels). The
    text is rendered once and blended into every frame with numpy; what does not fit is cut off.
    """
    frames = check_frames(frames, "caption").copy()
    size_px = size_px or max(8, frames.shape[1] // 12)
    alpha = _text_alpha(text, size_px)
    pad = max(1, size_px // 4)
    box = np.full((alpha.shape[0] + 2 * pad, alpha.shape[1] + 2 * pad), 0.6, np.float32)
    _blend(frames, box, (0, 0, 0), 0, 0)
    _blend(frames, alpha, color, pad, pad)
    return frames


class SigmaStrip:
    """The sigma curve of one episode, drawn once; :meth:`draw` adds one step's cursor to a copy.

    The strip is ``width`` x ``height`` pixels: a title band (``label`` and the plotted range "[0, sigma_max]"
    on the left, the current value on the right) over a plot of ``sigma`` against the episode step, the
    vertical axis spanning exactly [0, ``sigma_max``] (values outside are clipped to its edges). NaN
    values (steps with no sigma) leave gaps in the curve and no marker.
    """

    def __init__(self, sigma: np.ndarray, sigma_max: float, width: int, height: int, label: str = "sigma"):
        sigma = np.asarray(sigma, np.float64)
        if sigma.ndim != 1 or len(sigma) == 0:
            raise ValueError(f"SigmaStrip: sigma has shape {sigma.shape}; expected (T,) with T >= 1")
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"SigmaStrip: sigma_max={sigma_max!r}; expected a finite number > 0")
        if width < 16 or height < 16:
            raise ValueError(f"SigmaStrip: {width} x {height} pixels is too small; expected at least 16 x 16")
        self.sigma, self.sigma_max, self.width, self.height = sigma, float(sigma_max), width, height
        self.text_px = max(7, height // 5)
        band = self.text_px + 3  # the title band's height in pixels
        margin = 3  # pixels around the plot: room for the marker at the plot's edges
        # plot area in pixel rows/cols of the strip (row 0 at the top)
        self.left, self.right = margin, width - 1 - margin
        self.top, self.bottom = band + margin, height - 1 - margin
        if self.bottom - self.top < 4:
            raise ValueError(f"SigmaStrip: height={height} leaves no room for the plot under its title")
        self.background = self._draw_curve(label)

    def x_of(self, step: int) -> int:
        """Pixel column of episode step ``step`` (0 at the plot's left edge, the last step at its right)."""
        last = max(1, len(self.sigma) - 1)
        return self.left + int(round(step * (self.right - self.left) / last))

    def y_of(self, value: float) -> int:
        """Pixel row of sigma ``value`` (0 at the plot's bottom edge, sigma_max at its top), clipped to it."""
        frac = min(max(value / self.sigma_max, 0.0), 1.0)
        return self.bottom - int(round(frac * (self.bottom - self.top)))

    def _draw_curve(self, label: str) -> np.ndarray:
        """(height, width, 3) uint8: the title and the whole curve, the plot area mapped as x_of / y_of."""
        plt = pyplot()
        dpi = 100
        fig = plt.figure(figsize=(self.width / dpi, self.height / dpi), dpi=dpi, facecolor="white")
        # axes in figure fractions (origin bottom-left) whose data corners land on the plot area's pixels
        w, h = self.width, self.height
        x0, x1 = (self.left + 0.5) / w, (self.right + 0.5) / w
        y0, y1 = 1 - (self.bottom + 0.5) / h, 1 - (self.top + 0.5) / h
        ax = fig.add_axes((x0, y0, x1 - x0, y1 - y0))
        steps = np.arange(len(self.sigma))
        ax.plot(
            steps,
            np.clip(self.sigma, 0.0, self.sigma_max),
            color=np.array(CURVE_RGB) / 255,
            lw=1.0,
            clip_on=False,
        )
        ax.set_xlim(0, max(1, len(self.sigma) - 1))
        ax.set_ylim(0.0, self.sigma_max)
        ax.set_axis_off()
        ax.axhline(self.sigma_max, color="0.8", lw=0.5)  # the range's edges, light
        ax.axhline(0.0, color="0.8", lw=0.5)
        fig.canvas.draw()
        strip = np.array(fig.canvas.buffer_rgba())[..., :3]
        plt.close(fig)
        strip = _fit(strip, h, w)
        _blend(strip, _text_alpha(f"{label} [0, {self.sigma_max:g}]", self.text_px), (0, 0, 0), 1, 2)
        return strip

    def draw(self, step: int, out: np.ndarray | None = None) -> np.ndarray:
        """(height, width, 3) uint8: the curve with a cursor at ``step``, a marker on the curve there and the
        value in the title band. Written into ``out`` when given."""
        if out is None:
            out = self.background.copy()
        else:
            out[...] = self.background
        x, value = self.x_of(step), float(self.sigma[step])
        out[self.top : self.bottom + 1, x] = CURSOR_RGB
        if math.isfinite(value):
            y = self.y_of(value)
            out[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = CURSOR_RGB
        alpha = _text_alpha(f"{value:.3f}" if math.isfinite(value) else "-", self.text_px)
        _blend(out, alpha, CURSOR_RGB, 1, max(0, self.width - 2 - alpha.shape[1]))
        return out


def _fit(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """``image`` cropped or padded (white) to (h, w, 3): matplotlib may round a canvas by a pixel."""
    image = image[:h, :w]
    pad = ((0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0))
    return np.pad(image, pad, constant_values=255) if any(p[1] for p in pad) else np.ascontiguousarray(image)


def with_sigma_strip(
    frames: np.ndarray,
    sigma: np.ndarray,
    sigma_max: float,
    label: str = "sigma",
    steps: np.ndarray | None = None,
    height: int | None = None,
) -> np.ndarray:
    """``frames`` (T, H, W, 3) uint8 with a :class:`SigmaStrip` under each: (T, H + height, W, 3).

    ``sigma`` (N,): the value at every step of the episode, all drawn as one curve; ``steps`` (T,): the
    episode step each frame shows, by default ``arange(T)`` (then N must be T). Frames rendered every k-th
    step pass ``steps=np.arange(0, N, k)`` with the full ``sigma``. ``height``: the strip's pixels, by default
    a third of the frame width (at least 32).

    Raises:
        ValueError: frames of the wrong shape or dtype, ``sigma`` not 1-d, steps out of range or not one
            per frame, ``sigma_max`` not > 0.
    """
    frames = check_frames(frames, "with_sigma_strip")
    t, h, w, _ = frames.shape
    sigma = np.asarray(sigma, np.float64)
    steps = np.arange(t) if steps is None else np.asarray(steps)
    if sigma.ndim != 1:
        raise ValueError(f"with_sigma_strip: sigma has shape {sigma.shape}; expected (N,) per episode step")
    if steps.shape != (t,) or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"with_sigma_strip: steps are {steps.dtype} {steps.shape}; expected integers ({t},)")
    if steps.min() < 0 or steps.max() >= len(sigma):
        raise ValueError(
            f"with_sigma_strip: steps span [{steps.min()}, {steps.max()}] but sigma has {len(sigma)} values"
        )
    strip = SigmaStrip(sigma, sigma_max, w, height or max(32, w // 3), label)
    out = np.empty((t, h + strip.height, w, 3), np.uint8)
    out[:, :h] = frames
    for k, step in enumerate(steps):
        strip.draw(int(step), out=out[k, h:])
    return out
