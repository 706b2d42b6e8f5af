"""nerfacc's occupancy-grid estimator and volume rendering behind ``render.py``'s contract (CUDA).

The GPU path of the NeRF's ray marching: :class:`NerfaccGrid` wraps nerfacc's
``OccGridEstimator`` (Instant-NGP's density grid) over the scene box with the interface of
:class:`~dreamlab.renderers.nerf.render.OccupancyGrid` (``maybe_update`` / ``update`` / ``query`` /
``occupied_fraction``), and :func:`render_rays_nerfacc` / :func:`render_cameras_nerfacc` return
what :func:`~dreamlab.renderers.nerf.render.render_rays` / ``render_cameras`` return. Chosen by
:func:`resolve_sampler_backend`; ``nerfacc`` is imported only for a CUDA device (never on CPU),
and this module imports nothing from it at import time. Needs nerfacc >= 0.5.2.

Same as the torch path: rays (``render.camera_rays``), clipping to ``[-bound, bound]^3`` and the
``near`` plane (``render.ray_box``, passed to nerfacc as per-ray ``t_min`` / ``t_max``), the
emission-absorption quadrature (``alpha_i = 1 - exp(-sigma_i delta_i)``, ``w_i = T_i alpha_i``,
computed by ``nerfacc.rendering``), the composite over a per-ray background
``rgb = sum w c + (1 - A) bg``, and the expected distance ``sum w t`` *not* divided by ``A``
(computed here: nerfacc's own depth output divides by the opacity in some versions). Stratified
jitter comes from the caller's generator (one uniform offset per ray, scaled by the step), so
training renders are reproducible like the torch path's.

What differs:

* **Samples**: nerfacc marches with a fixed ``render_step_size`` (see :func:`step_size_for`) and
  keeps only samples in occupied cells, so the number of samples varies per ray; the torch path
  cuts every ray's chord into ``num_samples`` equal intervals. Images agree up to the quadrature
  error of the two samplings.
* **Early stop**: given ``density_fn``, nerfacc first evaluates the density without gradients at
  every marched sample and drops the samples behind transmittance ``< early_stop_eps`` (1e-4) or
  with ``alpha < alpha_thre``; the kept samples are evaluated again with gradients. That pass is
  counted in ``num_density_queries``.
* **Aux**: :class:`PackedVolumeAux` holds *packed* arrays, ``[M]`` per kept sample with
  ``ray_indices [M]``, instead of :class:`~dreamlab.renderers.nerf.render.VolumeAux`'s ``[R, S]``
  arrays and ``sample_mask``.
* **Grid**: the threshold is ``min(threshold, mean of the positive EMA values)`` (torch: mean of
  all cells); after ``warmup_steps`` an update evaluates a random quarter of the cells plus
  occupied ones instead of all; the jitter uses torch's global CUDA RNG (the ``generator``
  argument of ``update`` / ``maybe_update`` is accepted for the shared interface and unused). The
  grid's cell layout is ``[x, y, z]`` (torch path: flat ``x + res (y + res z)``), so the two
  grids' states are not interchangeable: a checkpoint must record which sampler wrote it.
* float32 inside nerfacc (float64 inputs are cast; outputs come back in the input dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dreamlab.renderers.nerf.backends import resolve_cuda_backend
from dreamlab.renderers.nerf.render import FieldFn, cell_coords, ray_box, render_camera_rays
from dreamlab.types import Cameras

SAMPLER_BACKENDS = ("auto", "torch", "nerfacc")
"""Backends that :func:`resolve_sampler_backend` accepts."""

NERFACC_INSTALL = "pip install nerfacc"
"""How nerfacc is installed (it compiles its CUDA kernels on first use, or use a prebuilt wheel)."""

NERFACC_MIN_VERSION = (0, 5, 2)
"""Oldest nerfacc with the API used here (``OccGridEstimator.sampling(t_min=, t_max=)``)."""

_nerfacc_problem_cache: list[str | None] = []


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.5.3+cu118"`` -> ``(0, 5, 3)`` (leading digits of each dotted part)."""
    parts: list[int] = []
    for part in version.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _nerfacc_problem() -> str | None:
    """None when a recent enough ``nerfacc`` imports (tried once per process, only for CUDA)."""
    if not _nerfacc_problem_cache:
        problem: str | None
        try:
            import nerfacc

            version = str(getattr(nerfacc, "__version__", "0"))
            if _version_tuple(version) < NERFACC_MIN_VERSION:
                problem = (
                    f"nerfacc {version} is too old (dreamlab needs >= 0.5.2); "
                    f"upgrade with '{NERFACC_INSTALL} --upgrade'"
                )
            else:
                problem = None
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
            problem = (
                f"nerfacc cannot be imported ({type(exc).__name__}: {exc}); install it with "
                f"'{NERFACC_INSTALL}' (it builds its CUDA kernels on first use; prebuilt wheels "
                "are on nerfacc's own wheel index)"
            )
        _nerfacc_problem_cache.append(problem)
    return _nerfacc_problem_cache[0]


def resolve_sampler_backend(name: str, device: torch.device | str) -> str:
    """The one place that picks the NeRF's ray sampler. Logs the choice once per (request, device).

    * ``"torch"``: :func:`~dreamlab.renderers.nerf.render.render_rays` with
      :class:`~dreamlab.renderers.nerf.render.OccupancyGrid`, on any device.
    * ``"nerfacc"``: :func:`render_rays_nerfacc` with :class:`NerfaccGrid`; needs a CUDA device
      and nerfacc >= 0.5.2.
    * ``"auto"``: ``"nerfacc"`` on a CUDA device where nerfacc imports, else ``"torch"``.

    Nothing is imported for a non-CUDA device.

    Returns:
        ``"torch"`` or ``"nerfacc"``.
    Raises:
        ValueError: unknown name, or ``"nerfacc"`` on a non-CUDA device or without the package
            (the message says what to install or use instead).
    """
    return resolve_cuda_backend(
        name,
        device,
        kind="NeRF sampler",
        choices=SAMPLER_BACKENDS,
        library="nerfacc",
        library_label="'nerfacc'",
        package="nerfacc",
        owner="renderer",
        install=NERFACC_INSTALL,
        problem=_nerfacc_problem,
        log_label="nerf sampler",
    )


def _import_nerfacc():
    """``import nerfacc``, or ValueError saying what to install."""
    problem = _nerfacc_problem()
    if problem is not None:
        raise ValueError(problem)
    import nerfacc

    return nerfacc


def step_size_for(num_samples: int, bound: float = 1.0) -> float:
    """Marching step giving ``num_samples`` samples on a ray through the box centre along an axis.

    ``2 * bound / num_samples``: the torch path's sample spacing on that chord. Longer chords
    (up to the diagonal, ``sqrt(3)`` times longer) get proportionally more samples, shorter ones
    fewer; empty cells get none.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return 2.0 * float(bound) / num_samples


class NerfaccGrid(nn.Module):
    """nerfacc's ``OccGridEstimator`` over ``[-bound, bound]^3`` with ``OccupancyGrid``'s interface.

    Every cell is occupied until the first update (as in ``OccupancyGrid``; nerfacc's own start
    is all empty). ``update_every = 0`` never updates (dense marching in the box). The state
    (nerfacc's ``occs`` EMA and ``binaries``, plus ``num_updates``) is in ``state_dict``, so it
    round-trips through checkpoints like ``OccupancyGrid``'s buffers (same backend only).
    """

    backend = "nerfacc"

    def __init__(
        self,
        resolution: int = 32,
        bound: float = 1.0,
        threshold: float = 0.01,
        decay: float = 0.95,
        update_every: int = 16,
        warmup_steps: int = 256,
        device: torch.device | str = "cuda",
        chunk: int = 65536,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(
                f"NerfaccGrid needs a CUDA device, got {device.type!r}: use "
                "render.OccupancyGrid (sampler backend 'torch') here"
            )
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        nerfacc = _import_nerfacc()
        self.resolution = int(resolution)
        self.bound = float(bound)
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.warmup_steps = int(warmup_steps)
        self.chunk = int(chunk)
        b = self.bound
        self.estimator = nerfacc.OccGridEstimator(
            roi_aabb=[-b, -b, -b, b, b, b], resolution=self.resolution, levels=1
        ).to(device)
        with torch.no_grad():
            self.estimator.binaries.fill_(True)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))

    def _occupancy_fn(self, density_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """nerfacc's ``occ_eval_fn``: float32 density ``[N]`` at points ``[N, 3]``, chunked."""

        def occ(x: Tensor) -> Tensor:
            if x.shape[0] == 0:
                return x.new_zeros(0)
            parts = [
                density_fn(x[s : s + self.chunk]).float().reshape(-1)
                for s in range(0, x.shape[0], self.chunk)
            ]
            return torch.cat(parts)

        return occ

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[Tensor], Tensor],
        generator: torch.Generator | None = None,
        step: int = 0,
    ) -> None:
        """Refreshes the grid from ``density_fn`` (world points ``[M, 3]`` -> ``[M]``) now.

        ``step`` decides nerfacc's cell selection (all cells before ``warmup_steps``).
        ``generator`` is unused (nerfacc jitters with torch's global CUDA RNG).
        """
        was_training = self.estimator.training
        self.estimator.train(True)  # nerfacc refuses updates in eval mode
        try:
            self.estimator.update_every_n_steps(
                step=int(step),
                occ_eval_fn=self._occupancy_fn(density_fn),
                occ_thre=self.threshold,
                ema_decay=self.decay,
                warmup_steps=self.warmup_steps,
                n=1,
            )
        finally:
            self.estimator.train(was_training)
        self.num_updates += 1

    def maybe_update(
        self,
        step: int,
        density_fn: Callable[[Tensor], Tensor],
        generator: torch.Generator | None = None,
    ) -> bool:
        """:meth:`update` every ``update_every`` steps (step 0 included); True if it ran."""
        if self.update_every <= 0 or step % self.update_every != 0:
            return False
        self.update(density_fn, generator, step=step)
        return True

    def query(self, xyz: Tensor) -> Tensor:
        """``[N]`` bool: the point lies in the box, in an occupied cell."""
        ijk, inside = cell_coords(xyz, self.bound, self.resolution)
        binaries = self.estimator.binaries[0]  # [res_x, res_y, res_z]
        occupied = binaries[ijk[:, 0], ijk[:, 1], ijk[:, 2]].to(xyz.device)
        return inside & occupied

    @property
    def occupied_fraction(self) -> float:
        return float(self.estimator.binaries.float().mean())


@dataclass
class PackedVolumeAux:
    """Bookkeeping of one nerfacc render: packed per-sample arrays (``M`` kept samples)."""

    weights: Tensor  # [M] compositing weights (float32, differentiable)
    t: Tensor  # [M] sample distances (interval midpoints)
    t_starts: Tensor  # [M]
    t_ends: Tensor  # [M]
    ray_indices: Tensor  # [M] int64: the ray of each sample
    points: Tensor  # [M, 3] world positions that were evaluated with gradients
    num_rays: int  # R
    num_evaluated: int  # M
    num_samples: int  # M as well: empty cells are skipped while marching, never materialised
    num_density_queries: int  # no-grad density evaluations of the early-stop pass
    shading: object | None = None  # set by NeRFRenderer.render: its ShadingAux (mode, lights, orientation loss)


def render_rays_nerfacc(
    field_fn: FieldFn,
    origins: Tensor,
    dirs: Tensor,
    background: Tensor,
    grid: NerfaccGrid,
    render_step_size: float,
    bound: float = 1.0,
    near: float = 0.0,
    generator: torch.Generator | None = None,
    density_fn: Callable[[Tensor], Tensor] | None = None,
    early_stop_eps: float = 1e-4,
    alpha_thre: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, PackedVolumeAux]:
    """Volume-renders CUDA rays ``[R, 3]`` (unit ``dirs``) over ``background [R, 3]`` with nerfacc.

    Same contract as :func:`~dreamlab.renderers.nerf.render.render_rays`: returns color
    ``[R, 3]``, accumulated alpha ``[R]``, expected distance ``sum w t`` ``[R]`` (not divided by
    alpha) and the aux (here :class:`PackedVolumeAux`). ``generator`` turns on stratified
    sampling. ``density_fn`` (world points -> sigma ``[M]``) enables nerfacc's early-stop pass
    (see the module docstring); without it every marched sample in an occupied cell is kept.
    """
    nerfacc = _import_nerfacc()
    if origins.device.type != "cuda":
        raise ValueError("render_rays_nerfacc needs CUDA tensors; use render.render_rays here")
    num_rays = origins.shape[0]
    dtype, device = origins.dtype, origins.device
    bg = background.to(device=device, dtype=dtype)
    t_near, t_far, hit = ray_box(origins, dirs, bound, near)
    t_min = t_near
    if generator is not None:  # stratified: one jitter per ray, from the caller's generator
        u = torch.rand(num_rays, generator=generator, dtype=torch.float32).to(device)
        t_min = t_near + u.to(t_near) * render_step_size
    zero = torch.zeros_like(t_near)
    t_min = torch.where(hit, t_min, zero).float().contiguous()
    t_max = torch.where(hit, t_far, zero).float().contiguous()
    rays_o = origins.float().contiguous()
    rays_d = dirs.float().contiguous()

    num_queries = 0
    sigma_fn = None
    if density_fn is not None and (early_stop_eps > 0 or alpha_thre > 0):

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            nonlocal num_queries
            if t_starts.numel() == 0:
                return t_starts.new_zeros(0)
            mid = ((t_starts + t_ends) * 0.5).to(dtype)
            ri = ray_indices.long()
            pts = origins[ri] + dirs[ri] * mid[:, None]
            num_queries += int(t_starts.numel())
            return density_fn(pts).float().reshape(-1)

    ray_indices, t_starts, t_ends = grid.estimator.sampling(
        rays_o,
        rays_d,
        sigma_fn=sigma_fn,
        near_plane=float(near),
        t_min=t_min,
        t_max=t_max,
        render_step_size=float(render_step_size),
        early_stop_eps=float(early_stop_eps),
        alpha_thre=float(alpha_thre),
        stratified=False,  # jittered through t_min above, reproducibly
    )
    ray_indices = ray_indices.long()
    t_mid = (t_starts + t_ends) * 0.5
    num_kept = int(ray_indices.numel())
    if num_kept == 0:  # nothing to composite: exactly the background
        zeros = origins.new_zeros(num_rays)
        empty = t_starts.new_zeros(0)
        aux = PackedVolumeAux(
            weights=empty,
            t=empty,
            t_starts=empty,
            t_ends=empty,
            ray_indices=ray_indices,
            points=origins.new_zeros(0, 3),
            num_rays=num_rays,
            num_evaluated=0,
            num_samples=0,
            num_density_queries=num_queries,
        )
        return bg.clone(), zeros, zeros.clone(), aux
    pts = origins[ray_indices] + dirs[ray_indices] * t_mid.to(dtype)[:, None]
    sigma, rgb = field_fn(pts)
    sigma32, rgb32 = sigma.float().reshape(-1), rgb.float()
    colors, opacities, _, extras = nerfacc.rendering(
        t_starts,
        t_ends,
        ray_indices,
        n_rays=num_rays,
        rgb_sigma_fn=lambda _ts, _te, _ri: (rgb32, sigma32),
    )
    weights = extras["weights"]  # [M]
    acc = opacities.reshape(num_rays).to(dtype)
    dist = torch.zeros(num_rays, dtype=weights.dtype, device=device)
    dist = dist.index_add(0, ray_indices, weights * t_mid).to(dtype)
    color = colors.to(dtype) + (1.0 - acc)[:, None] * bg
    aux = PackedVolumeAux(
        weights=weights,
        t=t_mid,
        t_starts=t_starts,
        t_ends=t_ends,
        ray_indices=ray_indices,
        points=pts,
        num_rays=num_rays,
        num_evaluated=num_kept,
        num_samples=num_kept,
        num_density_queries=num_queries,
    )
    return color, acc, dist, aux


def render_cameras_nerfacc(
    field_fn: FieldFn,
    cams: Cameras,
    background: Tensor,
    grid: NerfaccGrid,
    render_step_size: float,
    bound: float = 1.0,
    near: float = 0.0,
    generator: torch.Generator | None = None,
    density_fn: Callable[[Tensor], Tensor] | None = None,
    early_stop_eps: float = 1e-4,
    alpha_thre: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, PackedVolumeAux]:
    """Renders every camera like :func:`~dreamlab.renderers.nerf.render.render_cameras`: rgb
    ``[B, H, W, 3]``, alpha ``[B, H, W, 1]``, camera depth ``[B, H, W, 1]`` (not divided by alpha)
    and :class:`PackedVolumeAux` (ray index ``b * H * W + row * W + col``).

    ``background``: ``[3]``, ``[B, 3]`` or per pixel ``[B, H, W, 3]``.
    """

    def rays_fn(origins: Tensor, dirs: Tensor, bg: Tensor):
        return render_rays_nerfacc(
            field_fn, origins, dirs, bg, grid, render_step_size, bound=bound, near=near,
            generator=generator, density_fn=density_fn, early_stop_eps=early_stop_eps,
            alpha_thre=alpha_thre,
        )

    return render_camera_rays(rays_fn, cams, background)
