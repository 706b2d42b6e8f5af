"""Coarse-to-fine (issue 6): initialise Gaussian splats from another renderer's density field.

A hash-grid NeRF converges to a stable shape but renders slowly; Gaussian splats render fast but
start from a random ball. This module bridges the two: it samples points where a trained
renderer (usually a :class:`~dreamlab.renderers.nerf.model.NeRFRenderer`) is dense, reads the
colour there and builds a :class:`~dreamlab.renderers.gaussians.model.GaussianRenderer` on those
points, ready to be refined by a Gaussian run.

Point-sampling rule (:func:`sample_dense_points`):

1. The box ``[-bound, bound]^3`` is split into ``resolution``^3 equal cells and the density is
   evaluated once at every cell centre (the mesh exporter's
   :func:`~dreamlab.export.mesh.sample_density_grid`, chunked, without gradients).
2. A cell is *occupied* when its centre density reaches the threshold: a number, or ``"auto"``,
   the mesh exporter's Otsu rule (:func:`~dreamlab.export.mesh.auto_threshold`), which separates
   "inside" from "fuzzy outside" whatever the density's scale.
3. Points are spread *evenly over cells*, not in proportion to density: every chosen cell is
   equally likely (stratified: with more points than cells each cell gets the same share and the
   remainder goes to distinct random cells; with fewer, distinct random cells get one point each).
   Density-weighted sampling would pile points into the dense core, which splats never show.
   Each point is uniform inside its cell.
4. ``surface_fraction`` (default :data:`DEFAULT_SURFACE_FRACTION`) sends that fraction of the
   points to *shell* cells (occupied cells with an empty 6-neighbour; outside the box counts as
   empty) and the rest to interior cells; ``None`` draws from all occupied cells alike. Splats
   only show their surface, so the shell gets most of the budget; the interior share keeps the
   colours right (shell points sit where a NeRF's colour blends with the outside). On the toy
   NeRFs of docs/nerf.md 0.8 gave the best or near-best silhouette and colour.

:func:`gaussians_from_renderer` turns those points into Gaussians (colour from the source's
``color``, scale from the nearest neighbours as in 3DGS, the configured initial opacity) and
:func:`load_renderer_from_checkpoint` reads the source back from a training run's checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dreamlab.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from dreamlab.export.mesh import auto_threshold, renderer_device, sample_density_grid
from dreamlab.renderers.base import Renderer
from dreamlab.renderers.gaussians.model import GaussianConfig, GaussianRenderer

log = logging.getLogger(__name__)

DensityFn = Callable[[Tensor], Tensor]
"""World points [N, 3] float32 -> density [N] (e.g. ``renderer.density``)."""

DEFAULT_SURFACE_FRACTION = 0.8
"""Default share of the points drawn from shell cells (see the module docstring)."""


@dataclasses.dataclass
class DenseCells:
    """Occupancy of a density field on a ``resolution``^3 cell grid over ``[-bound, bound]^3``."""

    values: np.ndarray
    """[R, R, R] density at the cell centres, indexed [x, y, z]."""
    occupied: np.ndarray
    """[R, R, R] bool: density >= threshold."""
    shell: np.ndarray
    """[R, R, R] bool: occupied cells with at least one empty 6-neighbour (or on the box's face)."""
    threshold: float
    """The density level used."""
    bound: float
    """Half side of the box."""

    @property
    def resolution(self) -> int:
        return int(self.values.shape[0])

    @property
    def cell_size(self) -> float:
        """Side of one cell in world units."""
        return 2.0 * self.bound / self.resolution


def _empty_error(max_density: float, threshold: float | str, bound: float) -> ValueError:
    level = threshold if isinstance(threshold, str) else f"{threshold:.4g}"
    return ValueError(
        "the NeRF is empty: train it longer or lower the threshold "
        f"(no cell of [-{bound:g}, {bound:g}]^3 reaches density {level}; "
        f"max density {max_density:.4g})"
    )


def dense_cells(
    density_fn: DensityFn,
    bound: float,
    resolution: int = 64,
    threshold: float | Literal["auto"] = "auto",
    chunk: int = 262144,
    device: torch.device | str | None = None,
) -> DenseCells:
    """Evaluates ``density_fn`` at the cell centres and marks the occupied and shell cells.

    Raises:
        ValueError: bad arguments, or no cell reaches the threshold (the field is empty).
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive number, got {bound}")
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2 cells per axis, got {resolution}")
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be a positive number or 'auto', got {threshold!r}")
    elif not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number or 'auto', got {threshold}")
    half_cell = bound / resolution
    lo = np.full(3, -bound + half_cell)
    hi = np.full(3, bound - half_cell)
    # The grid nodes of [lo, hi] are exactly the cell centres of [-bound, bound].
    values = sample_density_grid(density_fn, lo, hi, resolution, chunk, device)
    vmax = float(values.max())
    thr = auto_threshold(values) if threshold == "auto" else float(threshold)
    if not thr > 0 or not vmax >= thr:
        raise _empty_error(vmax, threshold, bound)
    occupied = values >= thr
    from scipy import ndimage

    interior = ndimage.binary_erosion(occupied, border_value=0)  # 6-connected cross
    return DenseCells(
        values=values, occupied=occupied, shell=occupied & ~interior, threshold=thr, bound=bound
    )


def _cell_counts(num_cells: int, num_points: int, generator: torch.Generator) -> Tensor:
    """[num_cells] points per cell, as even as possible; the remainder goes to random cells."""
    counts = torch.full((num_cells,), num_points // num_cells, dtype=torch.long)
    extra = num_points % num_cells
    if extra:
        counts[torch.randperm(num_cells, generator=generator)[:extra]] += 1
    return counts


def _points_in_cells(
    cells: np.ndarray, num_points: int, cell_size: float, bound: float, generator: torch.Generator
) -> Tensor:
    """``num_points`` points uniform inside the cells ``cells`` ([K, 3] integer indices)."""
    if num_points == 0:
        return torch.zeros(0, 3)
    counts = _cell_counts(len(cells), num_points, generator)
    ijk = torch.from_numpy(cells).long().repeat_interleave(counts, dim=0)  # [num_points, 3]
    jitter = torch.rand(num_points, 3, generator=generator, dtype=torch.float64)
    xyz = -bound + (ijk.double() + jitter) * cell_size
    return xyz.float()


def sample_dense_points(
    density_fn: DensityFn,
    num_points: int,
    bound: float,
    generator: torch.Generator,
    resolution: int = 64,
    threshold: float | Literal["auto"] = "auto",
    surface_fraction: float | None = DEFAULT_SURFACE_FRACTION,
    chunk: int = 262144,
    device: torch.device | str | None = None,
) -> Tensor:
    """``num_points`` points [N, 3] (CPU float32) inside the occupied cells of a density field.

    See the module docstring for the rule. Deterministic given ``generator``'s state.

    Args:
        density_fn: world points [M, 3] -> density [M] (``renderer.density``).
        num_points: how many points (exactly).
        bound: the field is searched in ``[-bound, bound]^3``.
        generator: CPU generator for every random choice.
        resolution: cells per axis.
        threshold: occupied-cell density level, or ``"auto"`` (Otsu, as the mesh exporter).
        surface_fraction: share of the points drawn from shell cells (the rest from interior
            cells; all from the shell when there is no interior); ``None``: all occupied cells
            alike.
        chunk: points per density query.
        device: where the query points are sent (the renderer's device).

    Raises:
        ValueError: bad arguments, or nothing is occupied ("the NeRF is empty ...").
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if surface_fraction is not None and not 0.0 <= surface_fraction <= 1.0:
        raise ValueError(f"surface_fraction must lie in [0, 1] or be None, got {surface_fraction}")
    cells = dense_cells(density_fn, bound, resolution, threshold, chunk, device)
    return points_from_cells(cells, num_points, generator, surface_fraction)


def points_from_cells(
    cells: DenseCells,
    num_points: int,
    generator: torch.Generator,
    surface_fraction: float | None = DEFAULT_SURFACE_FRACTION,
) -> Tensor:
    """The drawing half of :func:`sample_dense_points` on an already evaluated grid."""
    if surface_fraction is None:
        groups = [(np.argwhere(cells.occupied), num_points)]
    else:
        shell = np.argwhere(cells.shell)
        interior = np.argwhere(cells.occupied & ~cells.shell)
        n_shell = num_points if len(interior) == 0 else round(surface_fraction * num_points)
        groups = [(shell, n_shell), (interior, num_points - n_shell)]
    parts = [
        _points_in_cells(idx, n, cells.cell_size, cells.bound, generator)
        for idx, n in groups
        if n > 0
    ]
    xyz = torch.cat(parts)
    # Shell and interior points come out grouped; shuffle so any prefix is a fair sample.
    return xyz[torch.randperm(len(xyz), generator=generator)]


def _source_bound(source: Renderer) -> float:
    bound = getattr(getattr(source, "cfg", None), "bound", None)
    return float(bound) if bound is not None else 1.0


def gaussians_from_renderer(
    source: Renderer,
    cfg: GaussianConfig | None = None,
    generator: torch.Generator | None = None,
    num_points: int | None = None,
    *,
    bound: float | None = None,
    resolution: int = 64,
    threshold: float | Literal["auto"] = "auto",
    surface_fraction: float | None = DEFAULT_SURFACE_FRACTION,
    chunk: int = 262144,
) -> GaussianRenderer:
    """Gaussian splats (on CPU) initialised from ``source``'s density and colour fields.

    Points come from :func:`sample_dense_points` on ``source.density``; each Gaussian's colour is
    ``source.color`` at its centre and its scale the RMS distance to its 3 nearest neighbours
    (``cfg.init_scale`` if set), so neighbouring splats overlap and cover the surface.

    Args:
        source: the trained renderer (a NeRF, or any Renderer with ``density`` / ``color``).
        cfg: the Gaussians' settings (defaults if None); ``cfg.num_init`` is the default count.
        generator: CPU generator for the point draw (seed 0 if None).
        num_points: how many Gaussians (default ``cfg.num_init``).
        bound: half side of the searched box (default the source's ``cfg.bound``, else 1).
        resolution, threshold, surface_fraction, chunk: see :func:`sample_dense_points`.

    Every Gaussian starts at ``cfg.init_opacity`` (DreamGaussian's 0.1): on the toy NeRFs of
    docs/nerf.md that gave the closest silhouette; higher opacities widen it (the splats reach
    past the surface by about their scale).

    Raises:
        ValueError: the source's density is empty, or a bad argument.
    """
    cfg = cfg if cfg is not None else GaussianConfig()
    cfg.validate()
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    n = cfg.num_init if num_points is None else int(num_points)
    bound = _source_bound(source) if bound is None else float(bound)
    device = renderer_device(source)
    with torch.no_grad():
        xyz = sample_dense_points(
            source.density,
            n,
            bound,
            generator,
            resolution=resolution,
            threshold=threshold,
            surface_fraction=surface_fraction,
            chunk=chunk,
            device=device,
        )
        rgb = torch.cat(
            [source.color(xyz[s : s + chunk].to(device)).float().cpu() for s in range(0, n, chunk)]
        )
    rgb = torch.nan_to_num(rgb, nan=0.5).clamp(0.0, 1.0)
    return GaussianRenderer.from_points(xyz, rgb, cfg, generator)


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A checkpoint file as is; for a run folder its newest ``checkpoints/step_*.pt`` (or the newest
    ``step_*.pt`` in the folder itself, for a ``checkpoints`` folder).

    Raises:
        CheckpointError: the path does not exist, or the folder holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: give a checkpoint file (step_*.pt) or a run folder"
        )
    if path.is_file():
        return path
    found = find_latest_checkpoint(path / "checkpoints") or find_latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} holds no checkpoint (no step_*.pt in {path / 'checkpoints'}): "
            "train with a run folder (--out) first, or give a checkpoint file"
        )
    return found


def load_renderer_from_checkpoint(path: Path | str) -> Renderer:
    """The renderer of a dreamlab training checkpoint, rebuilt on CPU in eval mode.

    ``path``: a checkpoint file, or a run folder (its newest checkpoint is used). The renderer is
    built from the run config stored in the checkpoint (``dreamlab.train.build_renderer``) and
    its saved state loaded, so it is whatever the run trained (Gaussians or a NeRF).

    Raises:
        CheckpointError: missing path, folder without checkpoints, unreadable / corrupt / foreign
            file, or a stored state that does not fit the stored config (one-line messages).
    """
    from dreamlab.config import config_from_json  # lazy: dreamlab.train may import this module
    from dreamlab.train import build_renderer

    file = resolve_checkpoint_path(path)
    state = load_checkpoint(file, required=("config_json", "renderer"))
    try:
        run_cfg = config_from_json(state["config_json"])
    except Exception as exc:  # noqa: BLE001 - any failure means the stored config is unusable
        raise CheckpointError(
            f"{file}: its run config cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if getattr(run_cfg.renderer, "init_from", None):  # the stored state replaces the start anyway
        run_cfg.renderer = dataclasses.replace(run_cfg.renderer, init_from=None)
    try:
        renderer = build_renderer(
            run_cfg, torch.Generator(device="cpu").manual_seed(0), torch.device("cpu")
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: this dreamlab cannot build its renderer ({exc})") from None
    stored_type = state.get("renderer_type")
    if stored_type is not None and stored_type != type(renderer).__name__:
        raise CheckpointError(
            f"{file} holds a {stored_type} but its config builds a {type(renderer).__name__}"
        )
    try:
        renderer.load_checkpoint_state(state["renderer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{file}: the stored renderer state does not fit its config "
            f"({type(exc).__name__}: {exc})"
        ) from None
    log.info("loaded %s (%d primitives) from %s", type(renderer).__name__, renderer.size, file)
    return renderer.eval()


__all__ = [
    "DEFAULT_SURFACE_FRACTION",
    "DenseCells",
    "dense_cells",
    "gaussians_from_renderer",
    "load_renderer_from_checkpoint",
    "points_from_cells",
    "resolve_checkpoint_path",
    "sample_dense_points",
]
