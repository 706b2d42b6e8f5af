"""The "gsplat" rasterizer backend: dreamlab's conventions mapped onto ``gsplat.rasterization``.

Imported only when ``select_backend`` picks gsplat. Mapping: OpenGL camera-to-world -> OpenCV
world-to-camera ``viewmats`` (``diag(1, -1, -1, 1) @ w2c``), ``Ks`` with the principal point at
(W/2, H/2), quaternions (w, x, y, z) as they are, ``scales = exp(log_scales)``, ``eps2d = 0.3``,
``packed=False`` (``means2d`` keeps its gradient for densification), ``render_mode="RGB+D"``
(accumulated depth, our convention; "RGB+ED" would divide by alpha).

Differences left, all inside gsplat's kernels: no per-pixel 3-sigma ellipse test (a pair counts
wherever alpha >= 1/255 inside its tiles, whose box reaches min(3.33, sqrt(2 ln(255 o))) sigma,
so splats with opacity above ~0.35 reach a little further), alpha clamped at 0.999 (ours 0.99),
termination at T <= 1e-4 (ours <), fast ``__expf``, float32 only (float64 is cast). In
``RasterAux``, ``num_pairs`` counts its (Gaussian, tile) intersections and ``radii`` is ours,
recomputed from its conics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreamlab.renderers.gaussians.rasterize import DILATION, RasterAux, screen_radius
from dreamlab.types import Cameras

_GL_TO_CV = (1.0, -1.0, -1.0, 1.0)
"""Row signs that turn an OpenGL world-to-camera matrix into an OpenCV one (y down, z forward)."""


def gsplat_cameras(
    cams: Cameras, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """gsplat's ``viewmats`` [B, 4, 4] (world-to-camera, OpenCV) and ``Ks`` [B, 3, 3]."""
    w2c = cams.w2c.to(device=device, dtype=dtype)
    flip = torch.tensor(_GL_TO_CV, dtype=dtype, device=device)
    viewmats = flip[None, :, None] * w2c
    focal = cams.focal.to(device=device, dtype=dtype)
    ks = torch.zeros(len(cams), 3, 3, dtype=dtype, device=device)
    ks[:, 0, 0] = focal
    ks[:, 1, 1] = focal
    ks[:, 0, 2] = 0.5 * cams.width
    ks[:, 1, 2] = 0.5 * cams.height
    ks[:, 2, 2] = 1.0
    return viewmats, ks


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cams: Cameras,
    background: Tensor,
    near: float,
) -> tuple[Tensor, Tensor, Tensor, RasterAux]:
    """:func:`..rasterize.rasterize_gaussians` through gsplat (colors [B, N, C], background [B, C])."""
    import gsplat

    dtype, device = means.dtype, means.device
    bsz, n, nc = colors.shape
    height, width = cams.height, cams.width
    f32 = torch.float32
    if n == 0:  # gsplat does not take empty scenes
        zeros = torch.zeros(bsz, height, width, 1, dtype=dtype, device=device)
        rgb = zeros + background[:, None, None, :]
        empty = torch.zeros(bsz, 0, dtype=dtype, device=device)
        aux = RasterAux(empty.new_zeros(bsz, 0, 2), empty, empty.bool(), empty, 0, "gsplat")
        return rgb, zeros, zeros.clone(), aux
    viewmats, ks = gsplat_cameras(cams, f32, device)
    # Colours shared by every camera go in as [N, C]; per-camera ones as [B, N, C].
    gs_colors = colors[0] if colors.stride(0) == 0 else colors
    render, alphas, meta = gsplat.rasterization(
        means.to(f32),
        quats.to(f32),
        torch.exp(log_scales.to(f32)),
        opacities.to(f32),
        gs_colors.to(f32),
        viewmats,
        ks,
        width,
        height,
        near_plane=near,
        far_plane=1e10,
        radius_clip=0.0,
        eps2d=DILATION,
        sh_degree=None,
        packed=False,
        tile_size=16,
        backgrounds=background.to(f32).contiguous(),
        render_mode="RGB+D",
        rasterize_mode="classic",
    )
    rgb = render[..., :nc].to(dtype)
    depth = render[..., nc : nc + 1].to(dtype)
    alpha = alphas.to(dtype)
    means2d = meta["means2d"]  # [B, N, 2], part of gsplat's graph
    if means2d.requires_grad:
        means2d.retain_grad()
    with torch.no_grad():
        gs_radii = meta["radii"]
        visible = (gs_radii > 0).all(-1) if gs_radii.ndim == 3 else gs_radii > 0
        a, b, c = meta["conics"].detach().unbind(-1)  # inverse covariance
        det = (a * c - b * b).clamp_min(1e-30)
        cov = torch.stack([c / det, -b / det, a / det], dim=-1)
        radii = torch.where(visible, screen_radius(cov), torch.zeros_like(a)).to(dtype)
    isect = meta.get("isect_ids")
    aux = RasterAux(
        means2d=means2d,
        radii=radii,
        visible=visible,
        depths=meta["depths"].detach().to(dtype),
        num_pairs=int(isect.shape[0]) if isect is not None else -1,
        backend="gsplat",
    )
    return rgb, alpha, depth, aux
