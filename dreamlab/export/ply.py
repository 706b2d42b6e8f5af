"""Gaussian splats as a standard 3DGS .ply (the Inria ``GaussianModel.save_ply`` layout).

Properties, all float32, binary little endian, one ``vertex`` element per Gaussian::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3K-1)  opacity  scale_0..2  rot_0..3

``f_rest`` is channel-major as in the Inria code (``features_rest.transpose(1, 2).flatten(1)``):
all K red coefficients, then K green, then K blue. ``opacity`` is the pre-sigmoid logit,
``scale_*`` are log scales, ``rot_*`` is the quaternion (w, x, y, z), not necessarily normalised;
normals are zeros. Positions stay in dreamlab world space (Y-up, +Z front; the exporter does not
rescale splats). Viewers built for COLMAP captures (Y-down) may show the object upside down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from dreamlab.export.atomic import atomic_write

from dreamlab.renderers.gaussians.model import SplatArrays

__all__ = ["SplatArrays", "read_splats_ply", "splat_property_names", "write_splats_ply"]


def splat_property_names(num_rest: int) -> list[str]:
    """Property names of the standard layout for K = ``num_rest`` SH rest coefficients per channel."""
    return (
        ["x", "y", "z", "nx", "ny", "nz"]
        + [f"f_dc_{i}" for i in range(3)]
        + [f"f_rest_{i}" for i in range(3 * num_rest)]
        + ["opacity"]
        + [f"scale_{i}" for i in range(3)]
        + [f"rot_{i}" for i in range(4)]
    )


def _as_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(value, dtype=np.float32)


def _check(arrays: SplatArrays) -> tuple[int, int]:
    means = _as_numpy(arrays.means)
    n = means.shape[0]
    rest = _as_numpy(arrays.sh_rest)
    if rest.ndim == 2 and rest.shape[1] == 0:
        rest = rest.reshape(n, 0, 3)
    expected = {
        "means": (n, 3),
        "sh_dc": (n, 3),
        "opacity_logits": (n,),
        "log_scales": (n, 3),
        "quats": (n, 4),
    }
    for name, shape in expected.items():
        got = _as_numpy(getattr(arrays, name)).shape
        if got != shape:
            raise ValueError(f"SplatArrays.{name} has shape {got}, want {shape}")
    if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3:
        raise ValueError(f"SplatArrays.sh_rest has shape {rest.shape}, want ({n}, K, 3)")
    return n, rest.shape[1]


def write_splats_ply(path: str | os.PathLike[str], arrays: SplatArrays) -> Path:
    """Writes Gaussians as a binary little-endian 3DGS .ply (atomically). Returns the path.

    Accepts numpy arrays or torch tensors in the fields of ``arrays``.
    """
    n, k = _check(arrays)
    rest = _as_numpy(arrays.sh_rest).reshape(n, k, 3)
    columns = np.concatenate(
        [
            _as_numpy(arrays.means),
            np.zeros((n, 3), dtype=np.float32),
            _as_numpy(arrays.sh_dc),
            rest.transpose(0, 2, 1).reshape(
                n, 3 * k
            ),  # channel-major: R coeffs, G coeffs, B coeffs
            _as_numpy(arrays.opacity_logits).reshape(n, 1),
            _as_numpy(arrays.log_scales),
            _as_numpy(arrays.quats),
        ],
        axis=1,
    )
    names = splat_property_names(k)
    assert columns.shape == (n, len(names)), (columns.shape, len(names))
    vertex = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertex[name] = columns[:, i]
    data = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")
    with atomic_write(path) as tmp:
        data.write(str(tmp))
    return Path(path)


def read_splats_ply(path: str | os.PathLike[str]) -> SplatArrays:
    """Reads a 3DGS .ply (this layout, or the Inria one) back into :class:`SplatArrays`."""
    ply = PlyData.read(str(path))
    v = ply["vertex"].data
    names = v.dtype.names or ()
    n = len(v)
    rest_names = sorted(
        (p for p in names if p.startswith("f_rest_")), key=lambda p: int(p.split("_")[-1])
    )
    if len(rest_names) % 3:
        raise ValueError(f"{path}: {len(rest_names)} f_rest properties is not a multiple of 3")
    k = len(rest_names) // 3

    def cols(props: list[str]) -> np.ndarray:
        if not props:
            return np.zeros((n, 0), dtype=np.float32)
        return np.stack([np.asarray(v[p], dtype=np.float32) for p in props], axis=1)

    rest = cols(rest_names).reshape(n, 3, k).transpose(0, 2, 1)
    return SplatArrays(
        means=cols(["x", "y", "z"]),
        sh_dc=cols([f"f_dc_{i}" for i in range(3)]),
        sh_rest=np.ascontiguousarray(rest),
        opacity_logits=np.asarray(v["opacity"], dtype=np.float32),
        log_scales=cols([f"scale_{i}" for i in range(3)]),
        quats=cols([f"rot_{i}" for i in range(4)]),
    )
