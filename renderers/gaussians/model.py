"""3D Gaussian splats (Kerbl et al. 2023) as a dreamlab Renderer, with DreamGaussian-like defaults.

Parameters use the standard 3DGS layout (so the .ply writer can dump them unchanged): means,
quaternions (w, x, y, z; normalised in use), log scales, opacity logits, SH coefficients (DC and
the rest, colour = max(0, 0.5 + SH(view direction))). Rendering goes through
:func:`dreamlab.renderers.gaussians.rasterize.rasterize_gaussians`; densify / prune through
:class:`dreamlab.renderers.gaussians.strategy.DensifyStrategy`. ``density`` / ``color`` evaluate
the Gaussian mixture on arbitrary points (3-sigma cut-off, KD-tree neighbour search) for the mesh
exporter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor, nn

from dreamlab.renderers.base import ParamGroup, Renderer
from dreamlab.renderers.gaussians.field import gaussian_field
from dreamlab.renderers.gaussians.rasterize import RasterAux, rasterize_gaussians, select_backend
from dreamlab.renderers.gaussians.strategy import DensifyConfig, DensifyReport, DensifyStrategy
from dreamlab.schedules import Constant, Exponential, Schedule
from dreamlab.types import Cameras, RenderOutput

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)

PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")
"""The per-Gaussian parameters, in checkpoint / densify order."""


@dataclass
class GaussianConfig:
    """3D Gaussian splats: initialisation, learning rates, rasterizer and densification."""

    num_init: int = 5000
    """Gaussians at initialisation (DreamGaussian: 5000 in a ball of radius 0.5)."""
    init_radius: float = 0.5
    """Initial Gaussians are uniform in a ball of this radius around the origin."""
    sh_degree: int = 0
    """Spherical-harmonics degree of the colour (0: view-independent, up to 3)."""
    init_color: float = 0.5
    """Initial grey level of every Gaussian."""
    init_color_noise: float = 0.05
    """Uniform noise of this half-width added to the initial colour (per channel)."""
    init_opacity: float = 0.1
    """Initial opacity (after the sigmoid)."""
    init_scale: float | None = None
    """Initial scale (world units) of every Gaussian; None: RMS distance to the 3 nearest
    neighbours, per Gaussian (3DGS)."""
    lr_means: Schedule = field(default_factory=lambda: Exponential(1e-3, 2e-5))
    """Learning rate of the positions (3DGS-style log-linear decay; DreamGaussian's values)."""
    lr_features: Schedule = field(default_factory=lambda: Constant(1e-2))
    """Learning rate of the DC colour coefficients."""
    lr_sh_rest: Schedule = field(default_factory=lambda: Constant(5e-4))
    """Learning rate of the higher SH coefficients (3DGS: features / 20); unused at degree 0."""
    lr_opacity: Schedule = field(default_factory=lambda: Constant(5e-2))
    """Learning rate of the opacity logits."""
    lr_scales: Schedule = field(default_factory=lambda: Constant(5e-3))
    """Learning rate of the log scales."""
    lr_rotations: Schedule = field(default_factory=lambda: Constant(5e-3))
    """Learning rate of the quaternions."""
    near_plane: float = 0.01
    """Gaussians closer to the camera than this (camera depth) are culled."""
    backend: Literal["auto", "torch", "cuda", "gsplat"] = "auto"
    """Rasterizer backend: "auto" (on a GPU dreamlab's CUDA kernels, else gsplat, else torch; torch
    on CPU), "torch" (pure PyTorch, any device), "cuda" (dreamlab's kernels, built on first use)
    or "gsplat" (needs the gsplat package). Resolved once, at the first render."""
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    """Clone / split / prune schedule."""
    init_from: str | None = None
    """Coarse-to-fine: start from points sampled where this finished run's field is dense (a run
    folder or a checkpoint file, e.g. of a ``--renderer nerf`` run) instead of a random ball
    (``dreamlab.renderers.gaussians.from_density``)."""
    init_surface_fraction: float = 0.8
    """With ``init_from``: share of the points drawn in surface cells (the rest inside)."""
    init_grid_resolution: int = 64
    """With ``init_from``: cells per axis of the density grid the points are drawn from."""

    def validate(self) -> None:
        if self.num_init < 1:
            raise ValueError(f"num_init must be >= 1, got {self.num_init}")
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be 0, 1, 2 or 3, got {self.sh_degree}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"init_opacity must lie in (0, 1), got {self.init_opacity}")
        if self.init_radius <= 0:
            raise ValueError(f"init_radius must be positive, got {self.init_radius}")
        if self.init_scale is not None and self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if not 0.0 <= self.init_surface_fraction <= 1.0:
            raise ValueError(f"init_surface_fraction must lie in [0, 1], got {self.init_surface_fraction}")
        if self.init_grid_resolution < 4:
            raise ValueError(f"init_grid_resolution must be >= 4, got {self.init_grid_resolution}")
        self.densify.validate()


@dataclass
class SplatArrays:
    """Gaussian parameters as numpy arrays (N Gaussians, K = (degree+1)^2 - 1 SH rest coeffs)."""

    means: np.ndarray  # [N, 3] world positions
    sh_dc: np.ndarray  # [N, 3] degree-0 SH coefficients (RGB)
    sh_rest: np.ndarray  # [N, K, 3] higher-order SH coefficients
    opacity_logits: np.ndarray  # [N] pre-sigmoid opacity
    log_scales: np.ndarray  # [N, 3] log of the per-axis standard deviations
    quats: np.ndarray  # [N, 4] rotation quaternions (w, x, y, z)


def num_sh_rest(degree: int) -> int:
    """K, the number of SH coefficients per channel beyond the DC term."""
    return (degree + 1) ** 2 - 1


def eval_sh(degree: int, sh_dc: Tensor, sh_rest: Tensor, dirs: Tensor) -> Tensor:
    """Real SH (3DGS constants and signs) at unit directions; returns the SH sum (no +0.5).

    Args:
        sh_dc: [..., 3]; sh_rest: [..., K, 3]; dirs: [..., 3] unit vectors, broadcastable.
    """
    result = SH_C0 * sh_dc
    if degree == 0:
        return result
    x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
    c = [sh_rest[..., k, :] for k in range(sh_rest.shape[-2])]
    result = result - SH_C1 * y * c[0] + SH_C1 * z * c[1] - SH_C1 * x * c[2]
    if degree > 1:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        result = (
            result
            + SH_C2[0] * xy * c[3]
            + SH_C2[1] * yz * c[4]
            + SH_C2[2] * (2.0 * zz - xx - yy) * c[5]
            + SH_C2[3] * xz * c[6]
            + SH_C2[4] * (xx - yy) * c[7]
        )
        if degree > 2:
            result = (
                result
                + SH_C3[0] * y * (3.0 * xx - yy) * c[8]
                + SH_C3[1] * xy * z * c[9]
                + SH_C3[2] * y * (4.0 * zz - xx - yy) * c[10]
                + SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * c[11]
                + SH_C3[4] * x * (4.0 * zz - xx - yy) * c[12]
                + SH_C3[5] * z * (xx - yy) * c[13]
                + SH_C3[6] * x * (xx - 3.0 * yy) * c[14]
            )
    return result


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """The DC coefficient whose colour is ``rgb`` (inverse of 0.5 + C0 * dc)."""
    return (rgb - 0.5) / SH_C0


def nearest_neighbour_scale(xyz: Tensor, k: int = 3) -> Tensor:
    """[N] RMS distance of every point to its ``k`` nearest neighbours (3DGS's initial scale)."""
    n = xyz.shape[0]
    if n < 2:
        return torch.full((n,), 0.01, dtype=xyz.dtype)
    pts = xyz.detach().cpu().double().numpy()
    kk = min(k, n - 1)
    dist, _ = cKDTree(pts).query(pts, k=kk + 1)
    rms = np.sqrt((dist[:, 1:] ** 2).mean(axis=1))
    return torch.from_numpy(np.maximum(rms, 1e-7)).to(xyz.dtype)


class GaussianRenderer(Renderer):
    """A cloud of anisotropic 3D Gaussians rendered by EWA splatting."""

    def __init__(
        self,
        cfg: GaussianConfig | None = None,
        generator: torch.Generator | None = None,
        xyz: Tensor | None = None,
        rgb: Tensor | None = None,
    ) -> None:
        """Random initialisation in a ball (seeded by ``generator``), or from points ``xyz``.

        Args:
            cfg: settings (defaults if None).
            generator: CPU generator for every random choice of the initialisation.
            xyz: [N, 3] optional initial positions (see :meth:`from_points`).
            rgb: [N, 3] optional initial colours in [0, 1] (with ``xyz``).
        """
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else GaussianConfig()
        cfg.validate()
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        if xyz is None:
            n = cfg.num_init
            direction = torch.randn(n, 3, generator=generator)
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
            radius = cfg.init_radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
            xyz = direction * radius
        else:
            xyz = xyz.detach().float().cpu()
            assert xyz.ndim == 2 and xyz.shape[1] == 3, xyz.shape
            n = xyz.shape[0]
        if rgb is None:
            noise = (torch.rand(n, 3, generator=generator) * 2.0 - 1.0) * cfg.init_color_noise
            rgb = (cfg.init_color + noise).clamp(0.0, 1.0)
        else:
            rgb = rgb.detach().float().cpu()
            assert rgb.shape == (n, 3), rgb.shape
        if cfg.init_scale is None:
            scale = nearest_neighbour_scale(xyz)
        else:
            scale = torch.full((n,), float(cfg.init_scale))
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        logit = math.log(cfg.init_opacity / (1.0 - cfg.init_opacity))
        self.sh_degree = cfg.sh_degree
        self.means = nn.Parameter(xyz.clone())  # [N, 3]
        self.quats = nn.Parameter(quats)  # [N, 4] (w, x, y, z)
        self.log_scales = nn.Parameter(torch.log(scale)[:, None].repeat(1, 3))  # [N, 3]
        self.opacity_logits = nn.Parameter(torch.full((n,), logit))  # [N]
        self.sh_dc = nn.Parameter(rgb_to_sh_dc(rgb))  # [N, 3]
        self.sh_rest = nn.Parameter(torch.zeros(n, num_sh_rest(cfg.sh_degree), 3))  # [N, K, 3]
        self.strategy = DensifyStrategy(cfg.densify, n)
        self.last_densify: DensifyReport | None = None
        self._backend: tuple[torch.device, str] | None = None  # (device, backend) resolved

    @classmethod
    def from_points(
        cls,
        xyz: Tensor,
        rgb: Tensor | None = None,
        cfg: GaussianConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> GaussianRenderer:
        """Gaussians at ``xyz`` [N, 3] with colours ``rgb`` [N, 3] (grey + noise if None)."""
        return cls(cfg, generator=generator, xyz=xyz, rgb=rgb)

    # ------------------------------------------------------------------ parameters

    @property
    def size(self) -> int:
        return int(self.means.shape[0])

    def gaussian_params(self) -> dict[str, nn.Parameter]:
        """The per-Gaussian parameters by name (PARAM_NAMES order)."""
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def set_gaussian_param(self, name: str, value: nn.Parameter) -> None:
        """Replaces one per-Gaussian parameter (used by densification and checkpoint loading)."""
        assert name in PARAM_NAMES, name
        setattr(self, name, value)

    def param_groups(self) -> list[ParamGroup]:
        cfg = self.cfg
        groups = [
            ParamGroup("means", [self.means], cfg.lr_means),
            ParamGroup("features", [self.sh_dc], cfg.lr_features),
            ParamGroup("opacity", [self.opacity_logits], cfg.lr_opacity),
            ParamGroup("scales", [self.log_scales], cfg.lr_scales),
            ParamGroup("rotations", [self.quats], cfg.lr_rotations),
        ]
        if self.sh_degree > 0:
            groups.append(ParamGroup("sh_rest", [self.sh_rest], cfg.lr_sh_rest))
        return groups

    # ------------------------------------------------------------------ rendering

    def colors_for(self, cams: Cameras) -> Tensor:
        """Per-Gaussian RGB seen from each camera: [N, 3] (degree 0) or [B, N, 3]."""
        if self.sh_degree == 0:
            return (0.5 + SH_C0 * self.sh_dc).clamp_min(0.0)
        centers = cams.centers.to(self.means)  # [B, 3]
        dirs = self.means[None] - centers[:, None]  # [B, N, 3]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sh = eval_sh(self.sh_degree, self.sh_dc[None], self.sh_rest[None], dirs)
        return (0.5 + sh).clamp_min(0.0)

    def base_colors(self) -> Tensor:
        """[N, 3] view-independent colour (DC term only), clamped to [0, 1]."""
        return (0.5 + SH_C0 * self.sh_dc).clamp(0.0, 1.0)

    @property
    def backend(self) -> str | None:
        """The rasterizer backend this renderer uses ("torch", "cuda", "gsplat"); None before the
        first render."""
        return None if self._backend is None else self._backend[1]

    def _resolve_backend(self) -> str:
        """``cfg.backend`` resolved once (first render) and kept, so a run never switches
        backends mid-way; resolved again only if the parameters move to another device."""
        device = self.means.device
        if self._backend is None or self._backend[0] != device:
            self._backend = (device, select_backend(self.cfg.backend, device))
        return self._backend[1]

    def render(self, cams: Cameras, background: Tensor) -> RenderOutput:
        """Renders every camera; the image is clamped to [0, 1] (as DreamGaussian does)."""
        background = background.to(self.means)
        backend = self._resolve_backend()
        rgb, alpha, depth, aux = rasterize_gaussians(
            self.means,
            self.quats,
            self.log_scales,
            torch.sigmoid(self.opacity_logits),
            self.colors_for(cams),
            cams,
            background,
            near=self.cfg.near_plane,
            backend=backend,
        )
        return RenderOutput(rgb=rgb.clamp(0.0, 1.0), alpha=alpha, depth=depth, aux=aux)

    def after_backward(
        self, out: RenderOutput, step: int, progress: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Accumulates densification statistics and densifies / prunes on schedule."""
        self.last_densify = None
        if not isinstance(out.aux, RasterAux):
            return
        if out.aux.means2d.shape[1] != self.size:
            return
        if self.strategy.grad_accum.device != self.means.device:
            self.strategy.load_state_dict(self.strategy.state_dict(), self.means.device)
        height, width = out.rgb.shape[1], out.rgb.shape[2]
        self.last_densify = self.strategy.step(
            self, out.aux, step, progress, optimizer, width=width, height=height
        )

    # ------------------------------------------------------------------ fields for export

    @torch.no_grad()
    def _field(self, xyz: Tensor, want_color: bool) -> tuple[Tensor, Tensor | None]:
        """Density [Q] and (with ``want_color``) the weighted mean DC colour [Q, 3] at ``xyz``."""
        assert xyz.ndim == 2 and xyz.shape[1] == 3, xyz.shape
        base = self.base_colors().detach()
        dens, colsum = gaussian_field(
            xyz,
            self.means,
            self.quats,
            self.log_scales,
            torch.sigmoid(self.opacity_logits.detach()),
            base if want_color else None,
        )
        if not want_color:
            return dens, None
        assert colsum is not None
        col = colsum / dens.clamp_min(1e-300)[:, None]
        weak = dens < 1e-8
        if bool(weak.any()):
            if self.size == 0:
                col[weak] = self.cfg.init_color
            else:
                means = self.means.detach().double().cpu().numpy()
                _, nearest = cKDTree(means).query(xyz[weak].detach().double().cpu().numpy(), k=1)
                nearest = torch.from_numpy(np.asarray(nearest, dtype=np.int64).reshape(-1))
                col[weak] = base.double().cpu()[nearest]
        return dens, col

    def density(self, xyz: Tensor) -> Tensor:
        """[N] sum over Gaussians of opacity * exp(-d^T Σ^-1 d / 2), cut off at 3 sigma."""
        dens, _ = self._field(xyz, want_color=False)
        return dens.to(dtype=xyz.dtype, device=xyz.device)

    def color(self, xyz: Tensor) -> Tensor:
        """[N, 3] weighted mean of nearby Gaussians' DC colour (nearest Gaussian where none)."""
        _, col = self._field(xyz, want_color=True)
        return col.clamp(0.0, 1.0).to(dtype=xyz.dtype, device=xyz.device)

    def splat_arrays(self) -> SplatArrays:
        """The raw parameters in the standard 3DGS .ply layout, as float32 numpy arrays."""

        def arr(t: Tensor) -> np.ndarray:
            return t.detach().cpu().float().numpy().copy()

        return SplatArrays(
            means=arr(self.means),
            sh_dc=arr(self.sh_dc),
            sh_rest=arr(self.sh_rest),
            opacity_logits=arr(self.opacity_logits),
            log_scales=arr(self.log_scales),
            quats=arr(self.quats),
        )

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "params": {
                name: p.detach().cpu().clone() for name, p in self.gaussian_params().items()
            },
            "sh_degree": int(self.sh_degree),
            "strategy": self.strategy.state_dict(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if int(state["sh_degree"]) != self.sh_degree:
            raise ValueError(
                f"checkpoint has SH degree {state['sh_degree']}, this renderer {self.sh_degree}"
            )
        device = self.means.device
        for name in PARAM_NAMES:
            value = state["params"][name].to(device=device, dtype=getattr(self, name).dtype)
            self.set_gaussian_param(name, nn.Parameter(value.clone()))
        self.strategy.load_state_dict(state["strategy"], device)
