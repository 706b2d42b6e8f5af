"""Brute-force reference rasterizer: every pixel against every Gaussian, a literal 3DGS loop.

Used only by tests to pin down :func:`dreamlab.renderers.gaussians.rasterize.rasterize_gaussians`.
It is written independently (full 3x3 matrices, dense [pixels, Gaussians] tensors, a Python loop
over depth-sorted Gaussians with the per-pixel ``done`` flag of the CUDA kernel) and applies the
same cut-offs: near plane, 3-sigma ellipse, alpha >= 1/255, alpha <= 0.99, stop before T < 1e-4.
Only for tiny scenes: memory is O(H W N) and time O(N) Python iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreamlab.renderers.gaussians.rasterize import (
    ALPHA_MAX,
    ALPHA_MIN,
    DILATION,
    FOV_CLAMP,
    SIGMA_CUTOFF,
    T_MIN,
)
from dreamlab.types import Cameras


def _rotation(q: Tensor) -> Tensor:  # [N, 4] wxyz -> [N, 3, 3]
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    rows = [
        [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
    ]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def reference_rasterize(
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cams: Cameras,
    background: Tensor,
    near: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as ``rasterize_gaussians`` (without aux): rgb, alpha, depth."""
    bsz, h, w = len(cams), cams.height, cams.width
    n = means.shape[0]
    if colors.ndim == 2:
        colors = colors[None].expand(bsz, n, colors.shape[-1])
    nc = colors.shape[-1]
    background = background.to(means.dtype).reshape(-1, nc).expand(bsz, nc)
    rot = _rotation(quats)
    scale = torch.diag_embed(torch.exp(log_scales))
    sigma = rot @ scale @ scale @ rot.transpose(1, 2)  # [N, 3, 3]
    jj, ii = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    pix = torch.stack([jj.reshape(-1) + 0.5, ii.reshape(-1) + 0.5], -1).to(means.dtype)  # [P, 2]
    rgbs, alphas, depths = [], [], []
    for b in range(bsz):
        view = torch.linalg.inv(cams.c2w[b].to(means.dtype))
        wr, wt = view[:3, :3], view[:3, 3]
        pc = means @ wr.T + wt  # [N, 3]
        d = -pc[:, 2]
        f = 0.5 * h / torch.tan(0.5 * cams.fov_y[b].to(means.dtype))
        mean2d = torch.stack([w / 2 + f * pc[:, 0] / d, h / 2 - f * pc[:, 1] / d], -1)
        lx, ly = FOV_CLAMP * (w / 2) / f, FOV_CLAMP * (h / 2) / f
        tx = torch.clamp(pc[:, 0] / d, -lx, lx)
        ty = torch.clamp(pc[:, 1] / d, -ly, ly)
        jac = torch.zeros(n, 2, 3, dtype=means.dtype)
        jac[:, 0, 0] = f / d
        jac[:, 0, 2] = f * tx / d
        jac[:, 1, 1] = -f / d
        jac[:, 1, 2] = -f * ty / d
        cov = jac @ wr @ sigma @ wr.T @ jac.transpose(1, 2)
        cov = cov + DILATION * torch.eye(2, dtype=means.dtype)
        conic = torch.linalg.inv(cov)  # [N, 2, 2]
        delta = pix[:, None, :] - mean2d[None]  # [P, N, 2]
        q = torch.einsum("pni,nij,pnj->pn", delta, conic, delta)
        alpha_all = torch.clamp(opacities[None] * torch.exp(-0.5 * q), max=ALPHA_MAX)
        valid = (q <= SIGMA_CUTOFF**2) & (d[None] > near)
        order = torch.argsort(d.detach(), stable=True)
        trans = torch.ones(h * w, dtype=means.dtype)
        done = torch.zeros(h * w, dtype=torch.bool)
        col = torch.zeros(h * w, nc, dtype=means.dtype)
        dep = torch.zeros(h * w, dtype=means.dtype)
        for k in order.tolist():
            a = alpha_all[:, k]
            use = valid[:, k] & ~done & (a >= ALPHA_MIN)
            test_t = trans * (1 - a)
            stop = use & (test_t < T_MIN)
            done = done | stop
            use = use & ~stop
            wgt = torch.where(use, a * trans, torch.zeros_like(a))
            col = col + wgt[:, None] * colors[b, k][None]
            dep = dep + wgt * d[k]
            trans = torch.where(use, test_t, trans)
        rgbs.append((col + trans[:, None] * background[b][None]).reshape(h, w, nc))
        alphas.append((1 - trans).reshape(h, w, 1))
        depths.append(dep.reshape(h, w, 1))
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)
