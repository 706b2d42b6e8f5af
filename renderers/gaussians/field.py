"""The Gaussian mixture as a field on arbitrary points (for mesh export): density and colour.

``density(x) = Σ_g o_g exp(-q_g(x) / 2)`` over Gaussians with ``q_g(x) = dᵀ Σ_g⁻¹ d <= 9``
(3-sigma ellipsoid cut-off); the colour is the same weights' average of the Gaussians' colours.

Two exact evaluators of the same sum:

* **Lattice** (fast path): when the query points are (a subset of) a regular grid, as the mesh
  exporter's chunks are, every Gaussian walks the grid lines (x, y fixed) crossing its 3-sigma
  box and solves the quadratic ``q(z) <= 9`` for the exact run of z-samples inside its
  ellipsoid, so no candidate pair is wasted. A 128³ grid against 20k Gaussians takes ~1-2 s.
* **KD-tree** (any points): Gaussians bucketed by cut-off radius, scipy's ``cKDTree``
  ``sparse_distance_matrix`` finds the candidate pairs, the ellipsoid test filters them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from dreamlab.renderers.gaussians.rasterize import quat_to_rotmat

CUTOFF = 9.0
"""Mahalanobis² cut-off (3 sigma)."""
PAIR_BATCH = 1 << 22
"""At most this many (Gaussian, point) pairs are held at once."""


def _precision(quats: Tensor, log_scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse covariances [N, 3, 3] (float64), covariance diagonals [N, 3], largest scales [N]."""
    rot = quat_to_rotmat(quats.double())
    scales = torch.exp(log_scales.double())
    prec = (rot / scales[:, None, :] ** 2) @ rot.transpose(1, 2)
    diag = ((rot * scales[:, None, :]) ** 2).sum(-1)
    return prec, diag, scales.amax(1)


def _lattice(points: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int]] | None:
    """(origin [3], spacing [3], index [Q, 3], shape) if the points lie on a regular grid."""
    num = points.shape[0]
    if num < 64:
        return None
    origin = torch.empty(3, dtype=torch.float64)
    spacing = torch.ones(3, dtype=torch.float64)
    shape = []
    for a in range(3):
        values = torch.unique(points[:, a])
        origin[a] = values[0]
        if values.numel() > 1:
            steps = values[1:] - values[:-1]
            h = float(values[-1] - values[0]) / (values.numel() - 1)
            if h <= 0 or float((steps - h).abs().max()) > 1e-3 * h:
                return None
            spacing[a] = h
        shape.append(int(values.numel()))
    size = shape[0] * shape[1] * shape[2]
    if size > 8 * num + (1 << 20):
        return None
    index = torch.round((points - origin) / spacing).long()
    if float(((origin + index * spacing) - points).abs().max() / spacing.min()) > 1e-2:
        return None
    return origin, spacing, index, (shape[0], shape[1], shape[2])


def _accumulate(
    dens: Tensor, cols: list[Tensor], pid: Tensor, w: Tensor, gid: Tensor, colors: Tensor | None
) -> None:
    dens.index_add_(0, pid, w)
    if colors is not None:
        for k in range(3):
            cols[k].index_add_(0, pid, w * colors[:, k].index_select(0, gid))


def _field_lattice(
    points: Tensor,
    lattice: tuple[Tensor, Tensor, Tensor, tuple[int, int, int]],
    means: Tensor,
    prec: Tensor,
    diag: Tensor,
    opac: Tensor,
    colors: Tensor | None,
    dens: Tensor,
    cols: list[Tensor],
) -> None:
    origin, h, index, (nx, ny, nz) = lattice
    num = points.shape[0]
    # Lattice node -> query point; nodes without a query point map to a dummy slot ``num``.
    lookup = torch.full((nx * ny * nz,), num, dtype=torch.long)
    lookup[(index[:, 0] * ny + index[:, 1]) * nz + index[:, 2]] = torch.arange(num)
    ext = 3.0 * torch.sqrt(diag)  # [N, 3] half extents of the 3-sigma ellipsoid's box
    lo = torch.ceil((means - ext - origin) / h).long()
    hi = torch.floor((means + ext - origin) / h).long()
    lo = torch.maximum(lo, torch.zeros(3, dtype=torch.long))
    hi = torch.minimum(hi, torch.tensor([nx - 1, ny - 1, nz - 1]))
    gids = (hi >= lo).all(1).nonzero().squeeze(1)
    if gids.numel() == 0:
        return
    lo = lo.index_select(0, gids)
    cx = hi[:, 0].index_select(0, gids) - lo[:, 0] + 1
    rows_per = cx * (hi[:, 1].index_select(0, gids) - lo[:, 1] + 1)
    dens_ext = torch.zeros(num + 1, dtype=torch.float32)
    cols_ext = [torch.zeros(num + 1, dtype=torch.float32) for _ in cols]
    # Rows (Gaussian, ix, iy) in batches of Gaussians to bound memory.
    cum = torch.cumsum(rows_per, 0)
    start = 0
    while start < gids.numel():
        base = int(cum[start - 1]) if start > 0 else 0
        stop = max(int(torch.searchsorted(cum, base + PAIR_BATCH // 8, right=True)), start + 1)
        _lattice_rows(
            gids[start:stop], lo[start:stop], cx[start:stop], rows_per[start:stop],
            origin, h, (ny, nz), lookup, means, prec, opac, colors, dens_ext, cols_ext,
        )  # fmt: skip
        start = stop
    dens += dens_ext[:num].double()
    for c, ce in zip(cols, cols_ext):
        c += ce[:num].double()


def _lattice_rows(gids, lo, cx, rows_per, origin, h, dims, lookup, means, prec, opac, colors,
                  dens, cols) -> None:  # fmt: skip
    """Lattice lines (x, y fixed) through each Gaussian's box: exact z-runs inside q <= 9."""
    ny, nz = dims
    total = int(rows_per.sum())
    owner = torch.repeat_interleave(torch.arange(gids.numel()), rows_per, output_size=total)
    off = torch.arange(total) - (torch.cumsum(rows_per, 0) - rows_per).index_select(0, owner)
    cxo = cx.index_select(0, owner)
    ry = torch.div(off, cxo, rounding_mode="floor")
    ix = lo[:, 0].index_select(0, owner) + off - ry * cxo
    iy = lo[:, 1].index_select(0, owner) + ry
    del off, cxo, ry
    g = gids.index_select(0, owner)
    del owner
    dx = origin[0] + ix * h[0] - means[:, 0].index_select(0, g)
    dy = origin[1] + iy * h[1] - means[:, 1].index_select(0, g)
    # q(dz) = qa dz² + 2 qb dz + qc along the line.
    qa = prec[:, 2, 2].index_select(0, g)
    qb = prec[:, 0, 2].index_select(0, g) * dx + prec[:, 1, 2].index_select(0, g) * dy
    qc = (
        prec[:, 0, 0].index_select(0, g) * dx * dx
        + 2.0 * prec[:, 0, 1].index_select(0, g) * dx * dy
        + prec[:, 1, 1].index_select(0, g) * dy * dy
    )
    del dx, dy
    disc = qb * qb - qa * (qc - CUTOFF)
    root = torch.sqrt(disc.clamp_min(0))
    zmu = means[:, 2].index_select(0, g)
    iz0 = torch.ceil((zmu + (-qb - root) / qa - origin[2]) / h[2] - 1e-9).long().clamp_min(0)
    iz1 = torch.floor((zmu + (-qb + root) / qa - origin[2]) / h[2] + 1e-9).long().clamp_max(nz - 1)
    count = torch.where(disc >= 0, (iz1 - iz0 + 1).clamp_min(0), torch.zeros_like(iz0))
    keep = (count > 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    count = count.index_select(0, keep)
    g = g.index_select(0, keep)
    # Fold the opacity into the constant: o exp(-q/2) = exp(-(q - 2 log o)/2).
    qc = qc.index_select(0, keep) - 2.0 * torch.log(opac.index_select(0, g).clamp_min(1e-300))
    iz0 = iz0.index_select(0, keep)
    cell = (ix.index_select(0, keep) * ny + iy.index_select(0, keep)) * nz + iz0
    dz0 = origin[2] + iz0 * h[2] - zmu.index_select(0, keep)  # dz at the run's first sample
    qa = qa.index_select(0, keep).float()
    qb2 = 2.0 * qb.index_select(0, keep).float()
    qc, dz0 = qc.float(), dz0.float()
    del ix, iy, iz0, zmu, keep, disc, root, iz1, qb
    # Runs padded to a power-of-two width class (waste < 2x, no per-sample gathers of row data).
    hz = float(h[2])
    last = lookup.numel() - 1
    width = 1
    while True:
        sel = (
            ((count > width // 2) & (count <= width)).nonzero().squeeze(1)
            if width > 1
            else ((count == 1).nonzero().squeeze(1))
        )
        if sel.numel() > 0:
            k = torch.arange(width)
            kh = k.float() * hz
            for lo_ in range(0, sel.numel(), max(1, PAIR_BATCH // width)):
                part = sel[lo_ : lo_ + max(1, PAIR_BATCH // width)]
                dz = dz0.index_select(0, part)[:, None] + kh
                q = (
                    qa.index_select(0, part)[:, None] * dz + qb2.index_select(0, part)[:, None]
                ) * dz
                q += qc.index_select(0, part)[:, None]
                w = torch.exp(-0.5 * q)
                w = torch.where(k < count.index_select(0, part)[:, None], w, torch.zeros_like(w))
                node = (cell.index_select(0, part)[:, None] + k).clamp_max(last)
                node = lookup.index_select(0, node.reshape(-1))
                w = w.reshape(-1)
                dens.index_add_(0, node, w)
                if colors is not None:
                    gid = g.index_select(0, part)
                    for c in range(3):
                        wc = w.reshape(-1, width) * colors[:, c].index_select(0, gid)[:, None]
                        cols[c].index_add_(0, node, wc.reshape(-1))
        if width >= int(count.max()):
            break
        width *= 2


def _field_kdtree(
    points: Tensor,
    means: Tensor,
    prec: Tensor,
    smax: Tensor,
    opac: Tensor,
    colors: Tensor | None,
    dens: Tensor,
    cols: list[Tensor],
) -> None:
    radius = 3.0 * smax * (1.0 + 1e-9)
    # Buckets of Gaussians whose cut-off radii differ by < 1.5x share one KD-tree query radius.
    bucket = torch.floor(torch.log(radius.clamp_min(1e-12)) / math.log(1.5)).long()
    qtree = cKDTree(points.numpy())
    for b in torch.unique(bucket).tolist():
        members = (bucket == b).nonzero().squeeze(1)
        gtree = cKDTree(means[members].numpy())
        pairs = qtree.sparse_distance_matrix(
            gtree, float(radius[members].max()), output_type="ndarray"
        )
        if pairs.shape[0] == 0:
            continue
        i = torch.from_numpy(np.ascontiguousarray(pairs["i"]).astype(np.int64))
        gid = members[torch.from_numpy(np.ascontiguousarray(pairs["j"]).astype(np.int64))]
        dx, dy, dz = (
            points[:, a].index_select(0, i) - means[:, a].index_select(0, gid) for a in range(3)
        )
        q = (
            prec[:, 0, 0].index_select(0, gid) * dx * dx
            + prec[:, 1, 1].index_select(0, gid) * dy * dy
            + prec[:, 2, 2].index_select(0, gid) * dz * dz
            + 2.0 * prec[:, 0, 1].index_select(0, gid) * dx * dy
            + 2.0 * prec[:, 0, 2].index_select(0, gid) * dx * dz
            + 2.0 * prec[:, 1, 2].index_select(0, gid) * dy * dz
        )
        w = opac.index_select(0, gid) * torch.exp(-0.5 * q)
        valid = (q <= CUTOFF).nonzero().squeeze(1)
        _accumulate(dens, cols, i[valid], w[valid], gid[valid], colors)


@torch.no_grad()
def gaussian_field(
    xyz: Tensor,
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacities: Tensor,
    colors: Tensor | None = None,
    chunk: int = 1 << 18,
) -> tuple[Tensor, Tensor | None]:
    """Density [Q] and (if ``colors`` [N, 3] is given) the weighted colour sum [Q, 3], float64, CPU.

    Args:
        xyz: [Q, 3] query points.
        means, quats (w, x, y, z), log_scales, opacities ([N] in [0, 1]): the Gaussians.
        colors: [N, 3] per-Gaussian colour, or None for density only.
        chunk: KD-tree path: query points per tree (bounds memory).
    """
    num = xyz.shape[0]
    dens = torch.zeros(num, dtype=torch.float64)
    cols = [torch.zeros(num, dtype=torch.float64) for _ in range(3)] if colors is not None else []
    colsum = torch.zeros(num, 3, dtype=torch.float64) if colors is not None else None
    if num == 0 or means.shape[0] == 0:
        return dens, colsum
    points = xyz.detach().double().cpu()
    means = means.detach().double().cpu()
    prec, diag, smax = _precision(quats.detach().cpu(), log_scales.detach().cpu())
    opac = opacities.detach().double().cpu()
    colors = colors.detach().double().cpu() if colors is not None else None
    colors32 = colors.float() if colors is not None else None
    lattice = _lattice(points)
    if lattice is not None:
        _field_lattice(points, lattice, means, prec, diag, opac, colors32, dens, cols)
    else:
        for lo in range(0, num, chunk):
            part_d = dens[lo : lo + chunk]
            part_c = [c[lo : lo + chunk] for c in cols]
            _field_kdtree(points[lo : lo + chunk], means, prec, smax, opac, colors, part_d, part_c)
    if colors is not None:
        colsum = torch.stack(cols, dim=1)
    del colors32
    return dens, colsum
