"""Shared data types passed between dreamlab's components, and the one camera convention.

Conventions (the whole project uses these; convert only inside a backend that needs another):

* World space is right-handed and **Y-up**, in metres, like glTF. The object being generated
  sits near the origin inside a ball of radius ~0.5 during training; the exporter moves it so
  that it rests on the ground plane (y = 0) with its pivot at the base centre.
* The object's *front* faces **+Z** (glTF's forward). A camera at azimuth 0° looks at the
  front; azimuth grows counter-clockwise seen from above (+Y), so azimuth 90° is on +X.
  Elevation is positive above the horizon. Camera centre for (elevation e, azimuth a,
  distance d) is ``d * (cos e sin a, sin e, cos e cos a)``.
* Cameras are stored as camera-to-world matrices in the **OpenGL** convention: the camera
  looks down its local -Z axis, +X is right and +Y is up in the image.
* Pixel (row i, column j) has its centre at image coordinates (u, v) = (j + 0.5, i + 0.5); u
  grows to the right, v grows downwards. A camera-space point (x, y, z) with depth
  ``d = -z > 0`` lands at ``u = W/2 + f x / d`` and ``v = H/2 - f y / d`` with
  ``f = (H/2) / tan(fov_y / 2)`` (square pixels, principal point at the centre).
* Images leaving a renderer are channels-last floats in [0, 1]: ``rgb [B, H, W, 3]``.
  Images entering a diffusion prior are channels-first: ``[B, C, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

VIEW_NAMES: tuple[str, ...] = ("front", "side", "back", "overhead")
"""View-direction words, in the order PromptEmbeds stores them."""


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size."""

    c2w: Tensor  # [B, 4, 4] camera-to-world, OpenGL convention (looks down -Z)
    fov_y: Tensor  # [B] vertical field of view, radians
    width: int
    height: int
    elevation_deg: Tensor  # [B] elevation the camera was placed at
    azimuth_deg: Tensor  # [B] azimuth in (-180, 180]
    distance: Tensor  # [B] distance from the look-at point

    def __post_init__(self) -> None:
        assert self.c2w.ndim == 3 and self.c2w.shape[1:] == (4, 4), self.c2w.shape
        batch = self.c2w.shape[0]
        for name in ("fov_y", "elevation_deg", "azimuth_deg", "distance"):
            value = getattr(self, name)
            assert value.shape == (batch,), f"{name} has shape {tuple(value.shape)}, want ({batch},)"
        assert self.width > 0 and self.height > 0, (self.width, self.height)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def w2c(self) -> Tensor:  # [B, 4, 4]
        return torch.linalg.inv(self.c2w)

    @property
    def focal(self) -> Tensor:  # [B] focal length in pixels (same for x and y)
        return 0.5 * self.height / torch.tan(0.5 * self.fov_y)

    @property
    def centers(self) -> Tensor:  # [B, 3] camera centres in world space
        return self.c2w[:, :3, 3]

    def with_resolution(self, width: int, height: int) -> Cameras:
        """The same cameras rendering a different image size (fov kept)."""
        return Cameras(
            self.c2w, self.fov_y, width, height, self.elevation_deg, self.azimuth_deg, self.distance
        )

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            self.c2w.to(device),
            self.fov_y.to(device),
            self.width,
            self.height,
            self.elevation_deg.to(device),
            self.azimuth_deg.to(device),
            self.distance.to(device),
        )

    def __getitem__(self, index: int | slice | Tensor) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(
            self.c2w[index],
            self.fov_y[index],
            self.width,
            self.height,
            self.elevation_deg[index],
            self.azimuth_deg[index],
            self.distance[index],
        )


def look_at_c2w(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices (OpenGL convention) for cameras at ``eye`` looking at ``target``.

    Args:
        eye: [B, 3] camera centres.
        target: [B, 3] points looked at.
        up: [3] world up direction (default +Y). Cameras looking straight along it get +Z
            (glTF forward) as their up-hint instead, so the matrix stays well defined.
    Returns:
        [B, 4, 4] camera-to-world matrices.
    """
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)  # camera looks along -Z
    up_hint = up.expand_as(forward).clone()
    parallel = torch.linalg.cross(forward, up_hint).norm(dim=-1) < 1e-6
    if parallel.any():
        up_hint[parallel] = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_hint), dim=-1)
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def orbit_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """World positions [B, 3] for the orbit angles described in the module docstring."""
    elev = torch.deg2rad(elevation_deg)
    azim = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [
            distance * torch.cos(elev) * torch.sin(azim),
            distance * torch.sin(elev),
            distance * torch.cos(elev) * torch.cos(azim),
        ],
        dim=-1,
    )


def orbit_cameras(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    distance: Tensor,
    fov_y_deg: Tensor,
    width: int,
    height: int,
) -> Cameras:
    """Cameras on a sphere around the origin, all looking at the origin. All tensors are [B]."""
    azimuth_deg = wrap_azimuth(azimuth_deg)
    eye = orbit_position(elevation_deg, azimuth_deg, distance)
    c2w = look_at_c2w(eye, torch.zeros_like(eye))
    return Cameras(
        c2w=c2w,
        fov_y=torch.deg2rad(fov_y_deg),
        width=width,
        height=height,
        elevation_deg=elevation_deg,
        azimuth_deg=azimuth_deg,
        distance=distance,
    )


def wrap_azimuth(azimuth_deg: Tensor) -> Tensor:
    """Maps azimuths to (-180, 180]."""
    wrapped = torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0
    return torch.where(wrapped == -180.0, torch.full_like(wrapped, 180.0), wrapped)


def fov_for_framing(radius: float, distance: float, margin: float = 1.0) -> float:
    """Vertical fov (degrees) at which a ball of ``radius`` at ``distance`` just fits, times margin."""
    return math.degrees(2.0 * math.asin(min(1.0, margin * radius / distance)))


@dataclass
class RenderOutput:
    """What a renderer returns for a batch of cameras."""

    rgb: Tensor  # [B, H, W, 3] composited over the background, in [0, 1]
    alpha: Tensor  # [B, H, W, 1] accumulated opacity
    depth: Tensor  # [B, H, W, 1] expected depth (alpha-weighted camera-space depth, 0 where empty)
    aux: object | None = None
    """Renderer-specific extras (e.g. screen-space means for densification); opaque to others."""


@dataclass
class PromptEmbeds:
    """Text embeddings of one prompt: per view direction, plus the negative and empty prompts.

    ``by_view[k]`` embeds ``"{prompt}, {VIEW_NAMES[k]} view"``; ``plain`` embeds the prompt as
    typed; ``negative`` is the negative prompt (the "unconditional" branch of CFG, "" by default);
    ``null`` is always the empty prompt "" (some methods need the true null next to the negative).
    """

    prompt: str
    plain: Tensor  # [L, D]
    by_view: Tensor  # [len(VIEW_NAMES), L, D]
    negative: Tensor  # [L, D]
    null: Tensor  # [L, D]


@dataclass
class GuidanceOutput:
    """What a guidance rule returns for one batch of renders."""

    loss: Tensor  # [] scalar whose gradient w.r.t. the renders is the guidance's update
    timesteps: Tensor  # [B] integer diffusion timesteps used
    grad_norm: Tensor  # [] L2 norm of the applied gradient, for logging
    aux: object | None = None


@dataclass
class StepReport:
    """One training step, as the trainer yields it to the CLI, UI and tests."""

    step: int  # 1-based index of the step just taken
    total_steps: int
    loss: float
    skipped: bool  # True when a non-finite loss or gradient made the trainer skip the update
    num_gaussians: int  # size of the representation (points for splats)
    resolution: int  # render resolution used for this step
    seconds: float  # wall time of this step
    timesteps: list[int] = field(default_factory=list)
    checkpoint: str | None = None  # path of a checkpoint written after this step, if any
    preview: Tensor | None = None  # [H, W, 3] a render from a fixed camera, every preview_every
    message: str | None = None  # a warning to show the user (e.g. why a step was skipped)
