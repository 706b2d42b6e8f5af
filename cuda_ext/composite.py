"""Tile binning and the autograd wrapper of dreamlab's CUDA compositing kernels.

Used by the "cuda" backend of ``dreamlab.renderers.gaussians.rasterize``, which keeps the
projection (and its autograd) and the per-Gaussian pixel boxes in PyTorch and hands over what
``_Composite`` (the PyTorch twin) takes: flat means2d / conic / opacity / features, returning
composited features and the final transmittance, so the rest of the graph is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dreamlab.cuda_ext import load_extension

TILE = 16
"""Tile edge in pixels (kTile in rasterizer.h)."""


@dataclass
class TileBins:
    """Sorted (Gaussian, tile) intersections of one render."""

    ranges: Tensor  # [cameras * tiles_y * tiles_x, 2] int32: [start, end) into ids
    ids: Tensor  # [M] int32 flat Gaussian index, per tile front to back
    num_intersections: int


@torch.no_grad()
def bin_tiles(
    x0: Tensor,
    x1: Tensor,
    y0: Tensor,
    y1: Tensor,
    visible: Tensor,
    depth: Tensor,
    num_cameras: int,
    height: int,
    width: int,
) -> TileBins:
    """Sorts every visible Gaussian into the 16x16 tiles that its pixel box touches.

    Args:
        x0, x1, y0, y1: [G] inclusive pixel-index bounds of each flat Gaussian's box (as floats
            with integral values; only read where ``visible``), G = cameras * N, camera-major.
        visible: [G] bool.
        depth: [G] camera depth; the key's low 32 bits hold the depth *rank* (stable argsort), so
            ties and float64 depths order exactly as in the PyTorch twin.
    """
    ext = load_extension()
    device = depth.device
    num_gauss = depth.shape[0]
    per_camera = max(1, num_gauss // max(1, num_cameras))
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    num_tiles = num_cameras * tiles_x * tiles_y
    zero = torch.zeros((), dtype=torch.int32, device=device)
    tx0 = torch.where(visible, torch.div(x0, TILE, rounding_mode="floor").to(torch.int32), zero)
    ty0 = torch.where(visible, torch.div(y0, TILE, rounding_mode="floor").to(torch.int32), zero)
    tx1 = torch.where(visible, torch.div(x1, TILE, rounding_mode="floor").to(torch.int32), zero - 1)
    ty1 = torch.where(visible, torch.div(y1, TILE, rounding_mode="floor").to(torch.int32), zero - 1)
    counts = ((tx1 - tx0 + 1) * (ty1 - ty0 + 1)).to(torch.int64) * visible
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if num_gauss > 0 else 0  # one device sync: the key array's size
    if total >= 2**31:
        raise RuntimeError(
            f"{total} (Gaussian, tile) intersections exceed the CUDA rasterizer's 2^31 limit; "
            "render fewer cameras or pixels at once"
        )
    order = torch.argsort(depth, stable=True)
    rank = torch.empty(num_gauss, dtype=torch.int32, device=device)
    rank[order] = torch.arange(num_gauss, dtype=torch.int32, device=device)
    rects = torch.stack([tx0, ty0, tx1, ty1], dim=1).contiguous()
    keys = ext.emit_intersections(rects, ends, rank, per_camera, tiles_x, tiles_y, total)
    keys = torch.sort(keys).values  # unique keys: (tile, rank)
    ids = order.index_select(0, keys & 0xFFFFFFFF).to(torch.int32)
    ranges = ext.tile_ranges(keys, num_tiles)
    return TileBins(ranges=ranges, ids=ids, num_intersections=total)


class TileComposite(torch.autograd.Function):
    """Front-to-back compositing on the GPU with the same interface as the twin's ``_Composite``.

    Inputs per flat Gaussian (G = B N): means2d [G, 2], conic [G, 3], opacity [G], features
    [G, F]; outputs per flat pixel (P = B H W): composited features [P, F] and final
    transmittance [P]. Cut-offs come from the caller (rasterize.py's constants).
    """

    @staticmethod
    def forward(ctx, means2d, conic, opac, feats, bins, num_cameras, height, width, cutoffs):
        ext = load_extension()
        means2d, conic = means2d.contiguous(), conic.contiguous()
        opac, feats = opac.contiguous(), feats.contiguous()
        out, t_final, n_contrib = ext.composite_forward(
            bins.ranges, bins.ids, means2d, conic, opac, feats, num_cameras, height, width,
            *cutoffs,
        )  # fmt: skip
        ctx.save_for_backward(
            means2d, conic, opac, feats, bins.ranges, bins.ids, t_final, n_contrib
        )
        ctx.shape = (num_cameras, height, width)
        ctx.cutoffs = cutoffs
        return out, t_final

    @staticmethod
    def backward(ctx, grad_out, grad_t_final):
        ext = load_extension()
        means2d, conic, opac, feats, ranges, ids, t_final, n_contrib = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(
                t_final.shape[0], feats.shape[1], dtype=feats.dtype, device=feats.device
            )
        if grad_t_final is None:
            grad_t_final = torch.zeros_like(t_final)
        g_means2d, g_conic, g_opac, g_feats = ext.composite_backward(
            ranges, ids, means2d, conic, opac, feats, *ctx.shape, *ctx.cutoffs, t_final,
            n_contrib, grad_out.contiguous(), grad_t_final.contiguous(),
        )  # fmt: skip
        return g_means2d, g_conic, g_opac, g_feats, None, None, None, None, None


def tile_composite(
    means2d: Tensor,
    conic: Tensor,
    opac: Tensor,
    feats: Tensor,
    bins: TileBins,
    num_cameras: int,
    height: int,
    width: int,
    cutoffs: tuple[float, float, float, float],
) -> tuple[Tensor, Tensor]:
    """(out [P, F], t_final [P]); ``cutoffs`` = (alpha_min, alpha_max, t_min, q_max)."""
    return TileComposite.apply(
        means2d,
        conic,
        opac,
        feats,
        bins,
        num_cameras,
        height,
        width,
        tuple(float(c) for c in cutoffs),
    )
