"""Turntable videos and preview grids rendered with the renderer's own ``render`` verb.

Cameras come from :func:`dreamlab.cameras.evaluation_orbit` (the same fixed orbit used for
metrics), so a turntable starts at the object's front (+Z) and turns counter-clockwise seen from
above. Videos are H.264 in yuv420p (plays everywhere), which needs even frame sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dreamlab.cameras import evaluation_orbit
from dreamlab.export.atomic import atomic_write
from dreamlab.export.mesh import renderer_device
from dreamlab.renderers.base import Renderer
from dreamlab.types import Cameras


@dataclass
class VideoConfig:
    """Turntable video and preview-grid options."""

    num_frames: int = 120
    """Frames in one full turn."""
    resolution: int = 512
    """Frame width = height in pixels (must be even for yuv420p)."""
    fps: int = 30
    """Frames per second of the .mp4."""
    elevation_deg: float = 15.0
    """Camera elevation above the horizon."""
    distance: float = 2.4
    """Camera distance from the origin (world units, as in training)."""
    fov_y_deg: float = 47.5
    """Vertical field of view."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RGB background the object is composited over."""
    quality: float = 8.0
    """imageio-ffmpeg quality (0-10, 10 best)."""
    grid_views: int = 8
    """Views in the preview grid (evenly spaced azimuths)."""
    grid_columns: int = 4
    """Columns of the preview grid."""
    grid_resolution: int = 256
    """Size of each preview tile."""

    def validate(self) -> None:
        if self.num_frames < 1 or self.fps < 1:
            raise ValueError(f"num_frames and fps must be >= 1, got {self.num_frames}, {self.fps}")
        if self.resolution < 2 or self.resolution % 2:
            raise ValueError(
                f"video resolution must be an even number >= 2 (yuv420p), got {self.resolution}"
            )
        if self.grid_views < 1 or self.grid_columns < 1 or self.grid_resolution < 1:
            raise ValueError("grid_views, grid_columns and grid_resolution must be >= 1")


def _override(cfg: VideoConfig | None, **values: int | None) -> VideoConfig:
    cfg = replace(cfg or VideoConfig(), **{k: v for k, v in values.items() if v is not None})
    cfg.validate()
    return cfg


def _orbit(cfg: VideoConfig, n: int, resolution: int) -> Cameras:
    return evaluation_orbit(
        resolution,
        num_azimuths=n,
        elevations_deg=(cfg.elevation_deg,),
        distance=cfg.distance,
        fov_y_deg=cfg.fov_y_deg,
    )


def render_frames(
    renderer: Renderer, cams: Cameras, background: tuple[float, float, float]
) -> Iterator[np.ndarray]:
    """Renders cameras one at a time -> [H, W, 3] uint8 frames (no gradients)."""
    device = renderer_device(renderer)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    with torch.no_grad():
        for i in range(len(cams)):
            out = renderer.render(cams[i].to(device), bg)
            rgb = out.rgb[0].detach().float().clamp(0, 1).cpu().numpy()
            yield np.round(rgb * 255.0).astype(np.uint8)


def write_turntable(
    path: str | os.PathLike[str],
    renderer: Renderer,
    num_frames: int | None = None,
    resolution: int | None = None,
    fps: int | None = None,
    cfg: VideoConfig | None = None,
) -> Path:
    """Renders a full turn around the object and writes it as an H.264 .mp4 (atomically).

    ``num_frames``, ``resolution`` and ``fps``, when given, override the matching ``cfg`` fields
    (defaults: 120 frames, 512 px, 30 fps).
    """
    import imageio.v2 as imageio

    cfg = _override(cfg, num_frames=num_frames, resolution=resolution, fps=fps)
    cams = _orbit(cfg, cfg.num_frames, cfg.resolution)
    with atomic_write(path) as tmp:
        writer = imageio.get_writer(
            str(tmp),
            format="FFMPEG",
            mode="I",
            fps=cfg.fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=cfg.quality,
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        try:
            for frame in render_frames(renderer, cams, cfg.background):
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def preview_grid(renderer: Renderer, cfg: VideoConfig | None = None) -> np.ndarray:
    """[rows * R, columns * R, 3] uint8 grid of ``cfg.grid_views`` views (front first)."""
    cfg = cfg or VideoConfig()
    cfg.validate()
    n, cols, res = cfg.grid_views, min(cfg.grid_columns, cfg.grid_views), cfg.grid_resolution
    rows = math.ceil(n / cols)
    bg = np.round(np.asarray(cfg.background) * 255).astype(np.uint8)
    grid = np.empty((rows * res, cols * res, 3), dtype=np.uint8)
    grid[:] = bg
    for k, frame in enumerate(render_frames(renderer, _orbit(cfg, n, res), cfg.background)):
        r, c = divmod(k, cols)
        grid[r * res : (r + 1) * res, c * res : (c + 1) * res] = frame
    return grid


def write_preview_grid(
    path: str | os.PathLike[str],
    renderer: Renderer,
    num_views: int | None = None,
    resolution: int | None = None,
    columns: int | None = None,
    cfg: VideoConfig | None = None,
) -> Path:
    """Writes a PNG grid of ``num_views`` evenly spaced views (atomically). Returns the path.

    Arguments given override ``cfg.grid_views`` / ``grid_resolution`` / ``grid_columns``
    (defaults: 8 views of 256 px in 4 columns).
    """
    import imageio.v2 as imageio

    cfg = _override(cfg, grid_views=num_views, grid_resolution=resolution, grid_columns=columns)
    image = preview_grid(renderer, cfg)
    with atomic_write(path) as tmp:
        imageio.imwrite(str(tmp), image, format="PNG")
    return Path(path)
