"""Differentiable 3D Gaussian splatting rasterizer: the PyTorch twin and the backend switch.

The pure-PyTorch path runs on CPU or any torch device. It is hand-written because no library
rasterizes Gaussians on CPU: gsplat's projection works on CPU tensors but its tile intersection is
a Python loop and its compositing needs CUDA; the public pure-PyTorch renderers keep dense
per-tile tensors for autograd and are 10-50x slower. On CUDA tensors :func:`select_backend` can
pick dreamlab's own kernels (``dreamlab.cuda_ext``: same projection and boxes from here, tile
binning and compositing on the GPU) or gsplat (:mod:`.gsplat_backend`); both are imported lazily,
only on a CUDA device.

Algorithm (the 3DGS forward model, Kerbl et al. 2023, with one deliberate difference noted):

1. **Projection** (plain autograd, O(B N)): camera-space means, EWA covariance
   ``Σ2D = J W Σ Wᵀ Jᵀ + 0.3 I`` (screen-space dilation as in 3DGS; the Jacobian's x/d, y/d are
   clamped to 1.3x the half-fov as in 3DGS), conic ``Σ2D⁻¹``; Gaussians with depth
   ``d = -z < near`` are culled.
2. **Cut-offs** (same in :mod:`.reference`): a (Gaussian, pixel) pair contributes only if the
   pixel centre lies inside the 3-sigma ellipse (Mahalanobis² ``q <= 9``; 3DGS uses a square
   3-sigma box instead) and ``alpha = opacity * exp(-q/2) >= 1/255``; alpha is clamped to 0.99.
3. **Pair list**: every visible Gaussian enumerates the pixel centres in the bounding box of the
   part of its ellipse where both cut-offs can hold, in front-to-back depth order; the surviving
   pairs are stable-sorted by pixel, so each pixel's pairs are contiguous and depth ordered.
4. **Compositing** on the packed pairs with a segmented scan: ``log T`` is an exclusive cumulative
   sum of ``log(1 - alpha)`` per pixel (done in float64). 3DGS's early termination (stop before
   the Gaussian that would bring ``T`` below 1e-4) keeps a prefix of each pixel's list; the
   background is added with the final ``T`` of the kept prefix. Expected depth is the
   alpha-compositing weight times camera depth, summed (0 where empty, like the rgb over black).
5. **Backward** of step 4 is hand-written (:class:`_Composite`): it needs one reverse segmented
   scan and one scatter-add of 10 numbers per pair, where autograd would keep ~20 pair-sized
   intermediates. Steps 1 and the colour / opacity activations stay in autograd.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamlab.types import Cameras

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda", "gsplat")
"""Backends that :func:`select_backend` accepts."""

ALPHA_MIN = 1.0 / 255.0
"""Pairs with a smaller alpha are skipped (3DGS)."""
ALPHA_MAX = 0.99
"""Alpha is clamped to this (3DGS)."""
T_MIN = 1e-4
"""Early termination: a pixel stops before the Gaussian that would bring T below this (3DGS)."""
SIGMA_CUTOFF = 3.0
"""Pairs outside the 3-sigma ellipse of the 2D Gaussian are skipped."""
DILATION = 0.3
"""Added to the diagonal of every 2D covariance, in pixels² (3DGS's low-pass filter)."""
FOV_CLAMP = 1.3
"""x/d and y/d are clamped to this multiple of the half-fov tangent inside the EWA Jacobian."""
CUTOFFS = (ALPHA_MIN, ALPHA_MAX, T_MIN, SIGMA_CUTOFF**2)
"""(alpha_min, alpha_max, t_min, q_max) as passed to the CUDA kernels (one source of truth)."""

_logged_backends: set[tuple[str, str]] = set()
_gsplat_problem_cache: list[str | None] = []


def _cuda_ext_problem() -> str | None:
    """None when dreamlab's CUDA rasterizer is built and loaded (building it now if needed)."""
    from dreamlab.cuda_ext import CudaExtensionError, load_extension

    try:
        load_extension()
    except CudaExtensionError as exc:
        return str(exc)
    return None


def _gsplat_problem() -> str | None:
    """None when ``import gsplat`` works (checked once per process)."""
    if not _gsplat_problem_cache:
        try:
            import gsplat  # noqa: F401

            _gsplat_problem_cache.append(None)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
            _gsplat_problem_cache.append(
                f"gsplat cannot be imported ({type(exc).__name__}: {exc}); pip install gsplat "
                "(it compiles its CUDA kernels with the CUDA toolkit on first use)"
            )
    return _gsplat_problem_cache[0]


def select_backend(backend: str, device: torch.device | str) -> str:
    """The one place that picks a rasterizer backend. Logs the choice once per (request, device).

    * ``"torch"``: the pure-PyTorch twin, on any device.
    * ``"cuda"``: dreamlab's own CUDA kernels (``dreamlab.cuda_ext``), built on first use.
    * ``"gsplat"``: ``gsplat.rasterization`` (if installed).
    * ``"auto"``: on CUDA tensors the first of cuda / gsplat / torch that works here (saying why
      the others were passed over); on any other device torch.

    Nothing is imported or compiled for a non-CUDA device.

    Args:
        backend: one of :data:`BACKENDS`.
        device: where the Gaussians live.
    Returns:
        The backend that will run: "torch", "cuda" or "gsplat".
    Raises:
        ValueError: unknown name, or "cuda" / "gsplat" asked for on a non-CUDA device.
        RuntimeError: "cuda" / "gsplat" asked for on CUDA but unavailable (the message says what
            to install or use instead).
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; choose one of {BACKENDS}")
    why = ""
    if device.type != "cuda":
        if backend in ("cuda", "gsplat"):
            raise ValueError(
                f"rasterizer backend {backend!r} needs the Gaussians on a CUDA GPU, but they are "
                f"on {device.type!r}: use backend 'torch' or 'auto' here, or run on a GPU "
                "(--device cuda)"
            )
        chosen = "torch"
    elif backend == "torch":
        chosen = "torch"
    elif backend == "cuda":
        problem = _cuda_ext_problem()
        if problem is not None:
            raise RuntimeError(
                f"rasterizer backend 'cuda' was asked for but is unavailable: {problem}. "
                "Use backend 'auto' (falls back to gsplat or torch) or 'torch'"
            )
        chosen = "cuda"
    elif backend == "gsplat":
        problem = _gsplat_problem()
        if problem is not None:
            raise RuntimeError(
                f"rasterizer backend 'gsplat' was asked for but is unavailable: {problem}; "
                "or use backend 'cuda' (dreamlab's own kernels) or 'torch'"
            )
        chosen = "gsplat"
    else:  # auto on CUDA
        cuda_problem = _cuda_ext_problem()
        if cuda_problem is None:
            chosen = "cuda"
        else:
            gsplat_problem = _gsplat_problem()
            if gsplat_problem is None:
                chosen, why = "gsplat", f"dreamlab's CUDA kernels unavailable: {cuda_problem}"
            else:
                chosen = "torch"
                why = f"{cuda_problem}; and {gsplat_problem}; the torch backend is much slower"
    key = (backend, device.type)
    if key not in _logged_backends:
        _logged_backends.add(key)
        if why:
            log.warning(
                "gaussian rasterizer: backend %r on %s -> %s (%s)",
                backend,
                device.type,
                chosen,
                why,
            )
        else:
            log.info("gaussian rasterizer: backend %r on %s -> %s", backend, device.type, chosen)
    return chosen


@dataclass
class RasterAux:
    """Per-render extras for densification and diagnostics."""

    means2d: Tensor  # [B, N, 2] pixel-space means; gradient retained when it requires grad
    radii: Tensor  # [B, N] 3-sigma screen radius in pixels (0 where culled)
    visible: Tensor  # [B, N] bool: in front of the near plane and touching the image
    depths: Tensor  # [B, N] camera depth d = -z
    num_pairs: int  # torch: (Gaussian, pixel) pairs; cuda / gsplat: (Gaussian, tile) intersections
    backend: str  # the backend that rendered: "torch", "cuda" or "gsplat"


@dataclass
class Projection:
    """Screen-space Gaussians for a batch of cameras (all [B, N, ...])."""

    means2d: Tensor  # [B, N, 2] (u, v) pixels
    cov2d: Tensor  # [B, N, 3] (a, b, c) of [[a, b], [b, c]], dilation included
    conic: Tensor  # [B, N, 3] (A, B, C) of the inverse covariance
    depth: Tensor  # [B, N] d = -z


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] from quaternions [N, 4] (w, x, y, z), normalised here."""
    q = F.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)  # fmt: skip


def covariance_3d(quats: Tensor, log_scales: Tensor) -> Tensor:
    """World covariances [N, 3, 3] = R S Sᵀ Rᵀ with S = diag(exp(log_scales))."""
    m = quat_to_rotmat(quats) * torch.exp(log_scales)[..., None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor, quats: Tensor, log_scales: Tensor, cams: Cameras
) -> Projection:
    """EWA projection of N Gaussians into B cameras (differentiable; no culling).

    Written with broadcast element-wise products: batched 2x3 / 3x3 matmuls are ~10x slower
    on CPU for tens of thousands of tiny matrices.
    """
    w2c = cams.w2c.to(means.dtype)  # [B, 4, 4]
    rot = w2c[:, None, :3, :3]  # [B, 1, 3, 3]
    p = (rot * means[None, :, None, :]).sum(-1) + w2c[:, None, :3, 3]  # [B, N, 3]
    x, y = p[..., 0], p[..., 1]
    d = -p[..., 2]
    focal = (0.5 * cams.height / torch.tan(0.5 * cams.fov_y.to(means.dtype)))[:, None]  # [B, 1]
    w, h = cams.width, cams.height
    safe_d = torch.where(d.abs() < 1e-6, torch.full_like(d, 1e-6), d)
    fd = focal / safe_d
    u = 0.5 * w + fd * x
    v = 0.5 * h - fd * y
    # EWA Jacobian J = [[f/d, 0, f tx/d], [0, -f/d, -f ty/d]] with 3DGS's clamp of x/d, y/d;
    # T = J W (rows t0, t1), Σ2D = T Σ Tᵀ = (T M)(T M)ᵀ with M = R diag(s).
    lim_x = FOV_CLAMP * 0.5 * w / focal
    lim_y = FOV_CLAMP * 0.5 * h / focal
    tx = torch.maximum(torch.minimum(x / safe_d, lim_x), -lim_x)
    ty = torch.maximum(torch.minimum(y / safe_d, lim_y), -lim_y)
    t0 = fd[..., None] * (rot[:, :, 0] + tx[..., None] * rot[:, :, 2])  # [B, N, 3]
    t1 = -fd[..., None] * (rot[:, :, 1] + ty[..., None] * rot[:, :, 2])
    m = quat_to_rotmat(quats) * torch.exp(log_scales)[..., None, :]  # [N, 3, 3]
    v0 = (t0[..., :, None] * m[None]).sum(-2)  # [B, N, 3] = t0 M
    v1 = (t1[..., :, None] * m[None]).sum(-2)
    a = (v0 * v0).sum(-1) + DILATION
    b = (v0 * v1).sum(-1)
    c = (v1 * v1).sum(-1) + DILATION
    det = (a * c - b * b).clamp_min(1e-12)
    conic = torch.stack([c / det, -b / det, a / det], dim=-1)
    return Projection(
        means2d=torch.stack([u, v], dim=-1),
        cov2d=torch.stack([a, b, c], dim=-1),
        conic=conic,
        depth=d,
    )


def _max_mahalanobis(opacities: Tensor) -> Tensor:
    """Largest q at which both cut-offs can hold: min(9, 2 log(255 o)) (<= 0: never visible)."""
    return torch.minimum(
        torch.full_like(opacities, SIGMA_CUTOFF**2),
        2.0 * torch.log((opacities / ALPHA_MIN).clamp_min(1e-30)),
    )


@dataclass
class _Boxes:
    """Per flat Gaussian (camera * N + gaussian): the pixel box where both cut-offs can hold."""

    x0: Tensor  # [B * N] first / last pixel column and row (floats with integral values),
    x1: Tensor  # inclusive; meaningful only where ``visible``
    y0: Tensor
    y1: Tensor
    visible: Tensor  # [B * N] bool: in front of the near plane, finite, box inside the image


@dataclass
class _Pairs:
    gauss: Tensor  # [M] int64 flat (camera * N + gaussian) index
    pixel: Tensor  # [M] int64 flat (camera * H * W + row * W + col), sorted, depth-ordered within
    visible: Tensor  # [B * N] bool


@torch.no_grad()
def _pixel_boxes(
    proj: Projection, opacities: Tensor, near: float, height: int, width: int
) -> _Boxes:
    """Bounding boxes of the ellipses ``q <= min(9, 2 ln(255 o))`` (shared by every backend)."""
    bsz, n = proj.depth.shape
    means2d = proj.means2d.detach().reshape(-1, 2)
    cov = proj.cov2d.detach().reshape(-1, 3)
    depth = proj.depth.detach().reshape(-1)
    opac = opacities.detach().expand(bsz, n).reshape(-1)
    qmax = _max_mahalanobis(opac)
    # Half extents of the ellipse q <= qmax, plus a hair so that rounding never loses a pixel.
    rx = torch.sqrt(qmax.clamp_min(0) * cov[:, 0]) + 1e-4
    ry = torch.sqrt(qmax.clamp_min(0) * cov[:, 2]) + 1e-4
    u, v = means2d[:, 0], means2d[:, 1]
    finite = torch.isfinite(u) & torch.isfinite(v) & torch.isfinite(rx) & torch.isfinite(ry)
    # Pixel column j has centre j + 0.5: columns with |j + 0.5 - u| <= rx.
    big = float(max(width, height) + 2)
    x0 = torch.ceil((u - rx - 0.5).clamp(-big, big)).clamp_min(0)
    x1 = torch.floor((u + rx - 0.5).clamp(-big, big)).clamp_max(width - 1)
    y0 = torch.ceil((v - ry - 0.5).clamp(-big, big)).clamp_min(0)
    y1 = torch.floor((v + ry - 0.5).clamp(-big, big)).clamp_max(height - 1)
    visible = (depth > near) & (qmax > 0) & finite & (x1 >= x0) & (y1 >= y0)
    return _Boxes(x0=x0, x1=x1, y0=y0, y1=y1, visible=visible)


@torch.no_grad()
def _build_pairs(
    proj: Projection, opacities: Tensor, boxes: _Boxes, height: int, width: int
) -> _Pairs:
    """Enumerates the (Gaussian, pixel) pairs that pass the cut-offs, sorted by (pixel, depth)."""
    bsz, n = proj.depth.shape
    device = proj.depth.device
    means2d = proj.means2d.detach().reshape(-1, 2)
    conic = proj.conic.detach().reshape(-1, 3)
    depth = proj.depth.detach().reshape(-1)
    opac = opacities.detach().expand(bsz, n).reshape(-1)
    u, v = means2d[:, 0], means2d[:, 1]
    x0, x1, y0, y1, visible = boxes.x0, boxes.x1, boxes.y0, boxes.y1, boxes.visible

    idx = visible.nonzero().squeeze(1)
    idx = idx[torch.argsort(depth[idx], stable=True)]  # front to back
    x0i, y0i = x0[idx].long(), y0[idx].long()
    wx = x1[idx].long() - x0i + 1
    counts = wx * (y1[idx].long() - y0i + 1)
    total = int(counts.sum())
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if total == 0:
        return _Pairs(empty, empty, visible)
    # Every (Gaussian, pixel-in-box) candidate; 1-D gathers (contiguous columns are fastest).
    owner = torch.repeat_interleave(
        torch.arange(idx.shape[0], device=device), counts, output_size=total
    )
    starts = torch.cumsum(counts, 0) - counts
    off = torch.arange(total, device=device) - starts.index_select(0, owner)
    wrep = wx.index_select(0, owner)
    row = torch.div(off, wrep, rounding_mode="floor")
    col = x0i.index_select(0, owner) + off - row * wrep
    row = row + y0i.index_select(0, owner)
    del off, wrep
    g = idx.index_select(0, owner)
    dx = (col.to(means2d.dtype) + 0.5) - u.index_select(0, g)
    dy = (row.to(means2d.dtype) + 0.5) - v.index_select(0, g)
    q = (
        conic[:, 0].index_select(0, g) * dx * dx
        + 2.0 * conic[:, 1].index_select(0, g) * dx * dy
        + conic[:, 2].index_select(0, g) * dy * dy
    )
    keep = (q <= SIGMA_CUTOFF**2) & (opac.index_select(0, g) * torch.exp(-0.5 * q) >= ALPHA_MIN)
    keep = keep.nonzero().squeeze(1)
    g = g.index_select(0, keep)
    cam = torch.div(g, n, rounding_mode="floor")
    pixel = (cam * height + row.index_select(0, keep)) * width + col.index_select(0, keep)
    num_pixels = bsz * height * width
    # Stable sort by pixel keeps the depth order within each pixel. Small keys sort fastest.
    if num_pixels <= 65536:
        key = (pixel - 32768).to(torch.int16)
    elif num_pixels <= 2**31 - 1:
        key = pixel.to(torch.int32)
    else:
        key = pixel
    order = torch.sort(key, stable=True).indices
    return _Pairs(g.index_select(0, order), pixel.index_select(0, order), visible)


def _scatter_sum(index: Tensor, values: Tensor, size: int) -> Tensor:
    """out[i] = sum of values[k] with index[k] == i (1-D; much faster than a 2-D index_add_)."""
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing over packed pairs, with a hand-written backward.

    Inputs per flat Gaussian (G = B N): means2d [G, 2], conic [G, 3], opacity [G], features
    [G, F] (colour channels, then depth). Outputs per flat pixel (P): composited features [P, F]
    and the final transmittance [P]. Pair-sized work uses contiguous 1-D columns only.
    """

    @staticmethod
    def forward(ctx, means2d, conic, opac, feats, gauss, pixel, num_pixels, height, width):
        dtype = means2d.dtype
        acc = torch.float64
        num_gauss = means2d.shape[0]
        mx = means2d[:, 0].index_select(0, gauss)
        my = means2d[:, 1].index_select(0, gauss)
        ca = conic[:, 0].index_select(0, gauss)
        cb = conic[:, 1].index_select(0, gauss)
        cc = conic[:, 2].index_select(0, gauss)
        op = opac.index_select(0, gauss)
        fcols = [feats[:, k].index_select(0, gauss) for k in range(feats.shape[1])]
        pix_in = torch.remainder(pixel, height * width)
        row = torch.div(pix_in, width, rounding_mode="floor")
        col = pix_in - row * width
        dx = (col.to(dtype) + 0.5) - mx
        dy = (row.to(dtype) + 0.5) - my
        del pix_in, row, col, mx, my
        power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
        gauss_val = torch.exp(power)
        del power
        alpha_raw = op * gauss_val
        alpha = alpha_raw.clamp(max=ALPHA_MAX)
        log1m = torch.log1p(-alpha.to(acc))
        counts = torch.bincount(pixel, minlength=num_pixels)
        seg_start = torch.cumsum(counts, 0) - counts
        first = seg_start.index_select(0, pixel)  # [M] index of the pixel's first pair
        excl = torch.cumsum(log1m, 0) - log1m
        log_t = excl - excl.index_select(0, first)  # log T before this pair
        del excl, first
        keep = (log_t + log1m) >= math.log(T_MIN)
        trans = torch.exp(log_t).to(dtype)
        del log_t
        weight = alpha * trans * keep.to(dtype)
        out = torch.stack([_scatter_sum(pixel, weight * fc, num_pixels) for fc in fcols], dim=1)
        log_final = _scatter_sum(
            pixel, torch.where(keep, log1m, torch.zeros_like(log1m)), num_pixels
        )
        t_final = torch.exp(log_final).to(dtype)
        ctx.save_for_backward(dx, dy, ca, cb, cc, gauss_val, alpha_raw, alpha, trans, weight, keep,
                              gauss, pixel, seg_start, counts, t_final, *fcols)  # fmt: skip
        ctx.num_gauss = num_gauss
        return out, t_final

    @staticmethod
    def backward(ctx, grad_out, grad_t_final):
        (dx, dy, ca, cb, cc, gauss_val, alpha_raw, alpha, trans, weight, keep,
         gauss, pixel, seg_start, counts, t_final, *fcols) = ctx.saved_tensors  # fmt: skip
        acc = torch.float64
        dtype = dx.dtype
        num_gauss = ctx.num_gauss
        nf = len(fcols)
        if grad_out is None:
            grad_out = torch.zeros(t_final.shape[0], nf, dtype=dtype, device=dx.device)
        if grad_t_final is None:
            grad_t_final = torch.zeros_like(t_final)
        g_cols = [grad_out[:, k].contiguous().index_select(0, pixel) for k in range(nf)]
        s = g_cols[0] * fcols[0]
        for k in range(1, nf):
            s = s + g_cols[k] * fcols[k]
        cs = torch.cumsum((weight * s).to(acc), 0)
        last = (seg_start + counts - 1).clamp_min(0).index_select(0, pixel)
        # Everything composited behind this pair: later kept pairs plus the background term.
        after = cs.index_select(0, last) - cs
        del cs, last
        after = after + (t_final * grad_t_final).to(acc).index_select(0, pixel)
        d_alpha = trans * s - (after / (1.0 - alpha.to(acc))).to(dtype)
        del after, s
        d_alpha = d_alpha * (keep & (alpha_raw <= ALPHA_MAX)).to(dtype)
        d_opac = d_alpha * gauss_val
        d_power = d_alpha * alpha_raw
        del d_alpha
        e = d_power * dx
        f = d_power * dy
        grad_mx = _scatter_sum(gauss, ca * e + cb * f, num_gauss)
        grad_my = _scatter_sum(gauss, cb * e + cc * f, num_gauss)
        grad_ca = _scatter_sum(gauss, -0.5 * e * dx, num_gauss)
        grad_cb = _scatter_sum(gauss, -e * dy, num_gauss)
        grad_cc = _scatter_sum(gauss, -0.5 * f * dy, num_gauss)
        grad_op = _scatter_sum(gauss, d_opac, num_gauss)
        grad_feats = torch.stack(
            [_scatter_sum(gauss, weight * gc, num_gauss) for gc in g_cols], dim=1
        )
        return (
            torch.stack([grad_mx, grad_my], dim=1),
            torch.stack([grad_ca, grad_cb, grad_cc], dim=1),
            grad_op,
            grad_feats,
            None, None, None, None, None,
        )  # fmt: skip


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cams: Cameras,
    background: Tensor,
    near: float = 0.01,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, RasterAux]:
    """Renders N 3D Gaussians into B cameras, differentiably in every tensor input.

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] rotations (w, x, y, z); normalised here.
        log_scales: [N, 3] log standard deviations along the Gaussian's axes.
        opacities: [N] in [0, 1] (after the sigmoid).
        colors: [N, C] or [B, N, C] colours (any C >= 1; C = 3 for RGB).
        cams: B cameras (see dreamlab.types for the convention).
        background: [C], [B, C] colour behind everything.
        near: Gaussians with camera depth below this are culled.
        backend: one of :data:`BACKENDS` (see :func:`select_backend`).
    Returns:
        rgb [B, H, W, C] composited over the background, alpha [B, H, W, 1], depth [B, H, W, 1]
        (alpha-weighted camera depth, 0 where empty), and a :class:`RasterAux`.
    """
    assert means.ndim == 2 and means.shape[1] == 3, means.shape
    n = means.shape[0]
    assert quats.shape == (n, 4), quats.shape
    assert log_scales.shape == (n, 3), log_scales.shape
    assert opacities.shape == (n,), opacities.shape
    chosen = select_backend(backend, means.device)
    bsz, height, width = len(cams), cams.height, cams.width
    if colors.ndim == 2:
        colors = colors[None].expand(bsz, n, colors.shape[-1])
    assert colors.shape[:2] == (bsz, n), colors.shape
    nc = colors.shape[-1]
    background = background.to(means.dtype).reshape(-1, nc).expand(bsz, nc)
    if chosen == "gsplat":
        from dreamlab.renderers.gaussians.gsplat_backend import rasterize_gsplat

        return rasterize_gsplat(means, quats, log_scales, opacities, colors, cams, background, near)

    proj = project_gaussians(means, quats, log_scales, cams)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    boxes = _pixel_boxes(proj, opacities, near, height, width)
    num_pixels = bsz * height * width
    feats = torch.cat([colors, proj.depth[..., None]], dim=-1).reshape(bsz * n, nc + 1)
    flat_opac = opacities[None].expand(bsz, n).reshape(-1)
    if chosen == "cuda":
        from dreamlab.cuda_ext.composite import bin_tiles, tile_composite

        depth_flat = proj.depth.detach().reshape(-1)
        bins = bin_tiles(
            boxes.x0, boxes.x1, boxes.y0, boxes.y1, boxes.visible, depth_flat, bsz, height, width
        )
        out, t_final = tile_composite(
            means2d.reshape(-1, 2), proj.conic.reshape(-1, 3), flat_opac, feats, bins,
            bsz, height, width, CUTOFFS,
        )  # fmt: skip
        num_pairs = bins.num_intersections
    else:
        pairs = _build_pairs(proj, opacities, boxes, height, width)
        out, t_final = _Composite.apply(
            means2d.reshape(-1, 2), proj.conic.reshape(-1, 3), flat_opac, feats,
            pairs.gauss, pairs.pixel, num_pixels, height, width,
        )  # fmt: skip
        num_pairs = int(pairs.gauss.shape[0])
    out = out.reshape(bsz, height, width, nc + 1)
    t_final = t_final.reshape(bsz, height, width, 1)
    rgb = out[..., :nc] + t_final * background[:, None, None, :]
    alpha = 1.0 - t_final
    depth = out[..., nc:]
    with torch.no_grad():
        visible = boxes.visible.reshape(bsz, n)
        radii = torch.where(visible, screen_radius(proj.cov2d), torch.zeros_like(proj.depth))
    aux = RasterAux(
        means2d=means2d,
        radii=radii,
        visible=visible,
        depths=proj.depth.detach(),
        num_pairs=num_pairs,
        backend=chosen,
    )
    return rgb, alpha, depth, aux


@torch.no_grad()
def screen_radius(cov2d: Tensor) -> Tensor:
    """3-sigma screen radius ``3 sqrt(λmax)`` of 2D covariances [..., 3] (a, b, c)."""
    a, b, c = cov2d.detach().unbind(-1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - (a * c - b * b)).clamp_min(0))
    return SIGMA_CUTOFF * torch.sqrt(lam)
