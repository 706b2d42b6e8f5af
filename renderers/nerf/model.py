"""A hash-grid NeRF (Instant-NGP encoding, DreamFusion-style density blob) as a dreamlab Renderer.

Pieces: :class:`~dreamlab.renderers.nerf.field.NeRFField` (hash encoding + density / albedo MLPs),
:func:`~dreamlab.renderers.nerf.render.render_cameras` (volume rendering in the box
``[-bound, bound]^3``) and :class:`~dreamlab.renderers.nerf.render.OccupancyGrid` (empty-space
skipping, refreshed in :meth:`NeRFRenderer.after_backward`). Shading is plain albedo for now
(no lighting / normals in the image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dreamlab.renderers.base import ParamGroup, Renderer
from dreamlab.renderers.nerf.field import NeRFField
from dreamlab.renderers.nerf.hash_encoding import LevelSchedule
from dreamlab.renderers.nerf.render import OccupancyGrid, VolumeAux, render_cameras
from dreamlab.schedules import Constant, Schedule
from dreamlab.types import Cameras, RenderOutput


@dataclass
class NeRFConfig:
    """Hash-grid NeRF: encoding, MLPs, density initialisation, sampling and learning rates."""

    bound: float = 1.0
    """The scene box is ``[-bound, bound]^3``."""
    num_levels: int = 16
    """Hash-encoding levels L (Instant-NGP / threestudio: 16)."""
    features_per_level: int = 2
    """Features per level F."""
    log2_hashmap_size: int = 19
    """Table size per level ``T = 2**log2_hashmap_size``."""
    base_resolution: int = 16
    """Coarsest grid resolution N_min."""
    max_resolution: int = 2048
    """Finest grid resolution N_max."""
    level_start: int = 4
    """Progressive unlocking: levels active at step 0 (with ``level_every > 0``)."""
    level_every: int = 0
    """Progressive unlocking: one more level every this many steps (0: all levels from the start)."""
    hidden: int = 64
    """Neurons per hidden layer of the density and albedo MLPs."""
    hidden_layers: int = 1
    """Hidden layers of each MLP."""
    density_activation: Literal["softplus", "trunc_exp", "exp"] = "softplus"
    """sigma = activation(raw + blob)."""
    density_blob: Literal["blob_magic3d", "blob_dreamfusion", "none"] = "blob_magic3d"
    """Initial density bias (see dreamlab.renderers.nerf.field)."""
    blob_scale: float = 10.0
    """Blob strength (pre-activation density at the origin)."""
    blob_radius: float = 0.5
    """Blob radius (magic3d: zero crossing; dreamfusion: Gaussian std)."""
    num_samples: int = 64
    """Samples per ray (stratified while training)."""
    near_plane: float = 0.01
    """Samples closer than this to the camera are skipped."""
    occupancy_grid: bool = True
    """Skip empty space with a coarse density grid."""
    grid_resolution: int = 32
    """Occupancy-grid cells per axis."""
    grid_threshold: float = 0.01
    """A cell is occupied when its density EMA exceeds min(this, mean EMA)."""
    grid_decay: float = 0.95
    """Per-update decay of the density EMA."""
    grid_update_every: int = 16
    """Steps between occupancy-grid refreshes."""
    lambda_sparsity: float = 0.0
    """Weight of the mean accumulated alpha (DreamFusion's opacity penalty), 0: off."""
    lr_encoding: Schedule = field(default_factory=lambda: Constant(1e-2))
    """Learning rate of the hash tables (threestudio's DreamFusion recipe: 1e-2)."""
    lr_mlp: Schedule = field(default_factory=lambda: Constant(1e-3))
    """Learning rate of the MLPs (threestudio: 1e-3)."""

    def validate(self) -> None:
        if self.bound <= 0:
            raise ValueError(f"bound must be positive, got {self.bound}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_levels < 1 or self.features_per_level < 1:
            raise ValueError("num_levels and features_per_level must be >= 1")
        if not 1 <= self.base_resolution <= self.max_resolution:
            raise ValueError("need 1 <= base_resolution <= max_resolution")
        if self.grid_resolution < 1:
            raise ValueError(f"grid_resolution must be >= 1, got {self.grid_resolution}")
        if self.lambda_sparsity < 0:
            raise ValueError("lambda_sparsity must be >= 0")


class NeRFRenderer(Renderer):
    """Density + albedo hash-grid field rendered by volume rendering."""

    def __init__(
        self, cfg: NeRFConfig | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else NeRFConfig()
        cfg.validate()
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        self.field = NeRFField(
            bound=cfg.bound,
            num_levels=cfg.num_levels,
            features_per_level=cfg.features_per_level,
            log2_hashmap_size=cfg.log2_hashmap_size,
            base_resolution=cfg.base_resolution,
            max_resolution=cfg.max_resolution,
            level_schedule=LevelSchedule(cfg.level_start, cfg.level_every),
            hidden=cfg.hidden,
            hidden_layers=cfg.hidden_layers,
            activation=cfg.density_activation,
            blob=cfg.density_blob,
            blob_scale=cfg.blob_scale,
            blob_radius=cfg.blob_radius,
            generator=generator,
        )
        self.grid = (
            OccupancyGrid(
                cfg.grid_resolution,
                cfg.bound,
                cfg.grid_threshold,
                cfg.grid_decay,
                cfg.grid_update_every,
            )
            if cfg.occupancy_grid
            else None
        )
        # stratified-sampling / grid-jitter randomness, saved in checkpoints
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.sample_generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> list[ParamGroup]:
        mlp = list(self.field.density_mlp.parameters()) + list(self.field.albedo_mlp.parameters())
        return [
            ParamGroup("encoding", [self.field.encoding.table], self.cfg.lr_encoding),
            ParamGroup("mlp", mlp, self.cfg.lr_mlp),
        ]

    def render(self, cams: Cameras, background: Tensor) -> RenderOutput:
        """Renders every camera (stratified samples while training with gradients enabled)."""
        table = self.field.encoding.table
        cams = cams.to(table.device)
        if cams.c2w.dtype != table.dtype:
            cams = Cameras(
                cams.c2w.to(table.dtype),
                cams.fov_y.to(table.dtype),
                cams.width,
                cams.height,
                cams.elevation_deg,
                cams.azimuth_deg,
                cams.distance,
            )
        stratified = self.training and torch.is_grad_enabled()
        rgb, alpha, depth, aux = render_cameras(
            self.field,
            cams,
            background.to(table),
            num_samples=self.cfg.num_samples,
            bound=self.cfg.bound,
            near=self.cfg.near_plane,
            grid=self.grid,
            generator=self.sample_generator if stratified else None,
        )
        return RenderOutput(rgb=rgb.clamp(0.0, 1.0), alpha=alpha, depth=depth, aux=aux)

    def regularizers(self, out: RenderOutput, progress: float) -> Tensor:
        loss = out.rgb.new_zeros(())
        if self.cfg.lambda_sparsity > 0:
            loss = loss + self.cfg.lambda_sparsity * out.alpha.mean()
        return loss

    def after_backward(
        self, out: RenderOutput, step: int, progress: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Advances the level schedule and refreshes the occupancy grid on its schedule."""
        self.field.encoding.update_step(step + 1)
        if self.grid is not None:
            self.grid.maybe_update(step, self.field.density, self.sample_generator)

    @torch.no_grad()
    def _chunked(self, fn, xyz: Tensor, chunk: int = 65536) -> Tensor:
        table = self.field.encoding.table
        pts = xyz.to(device=table.device, dtype=table.dtype)
        out = torch.cat([fn(pts[s : s + chunk]) for s in range(0, max(len(pts), 1), chunk)])
        return out[: len(pts)].to(dtype=xyz.dtype, device=xyz.device)

    def density(self, xyz: Tensor) -> Tensor:
        """sigma ``[N]`` at world points ``[N, 3]`` (0 outside the scene box)."""
        inside = (xyz.abs() <= self.cfg.bound).all(-1)
        return self._chunked(self.field.density, xyz) * inside.to(xyz.dtype)

    def color(self, xyz: Tensor) -> Tensor:
        """Albedo ``[N, 3]`` at world points ``[N, 3]``."""
        return self._chunked(self.field.albedo, xyz)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "active_levels": int(self.field.encoding.active_levels),
            "sample_generator": self.sample_generator.get_state(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["state_dict"])
        self.field.encoding.active_levels = int(state["active_levels"])
        self.sample_generator.set_state(state["sample_generator"])


__all__ = ["NeRFConfig", "NeRFRenderer", "VolumeAux"]
