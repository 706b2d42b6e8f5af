"""UV unwrap (xatlas) and texture baking by direct colour queries.

Instead of rendering the object from many views and projecting the pictures (DreamGaussian), the
baker asks the field itself: every texel covered by a UV chart is mapped to its 3D point on the
mesh surface and ``color_fn`` is evaluated there. This needs no rasteriser and no GL/CUDA context,
works for any renderer with a ``color(xyz)`` verb, and has no view-dependent seams.

The UV-space rasteriser (texel centre -> triangle + barycentric coordinates) is hand-written in
vectorised numpy because no CPU library in the dependency set does it (threestudio and
stable-dreamfusion use nvdiffrast, which needs a GPU). Seams are padded by copying each empty
texel's nearest chart texel (scipy's Euclidean distance transform) within ``padding_texels``;
texels farther away get the mean chart colour so mipmaps stay clean.

UV convention: ``uvs`` use glTF's convention, (0, 0) is the top-left corner of the image and v
grows downwards; texel (row i, column j) covers u in [j, j+1]/W, v in [i, i+1]/H. The OBJ writer
flips v (``1 - v``) for OBJ's bottom-left origin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from dreamlab.export.mesh import ExtractedMesh, FieldFn, query_field

log = logging.getLogger(__name__)


@dataclass
class TextureConfig:
    """How the UV atlas and the base-colour texture are made."""

    size: int = 1024
    """Texture width and height in texels (a power of two keeps mipmapping everywhere happy)."""
    padding_texels: int = 8
    """Empty texels within this distance of a chart take the nearest chart texel's colour (seams)."""
    atlas_padding: int = 2
    """Texels xatlas keeps free between charts."""
    chart_max_iterations: int = 1
    """xatlas chart-growing iterations (more: slightly better charts, much slower)."""
    chunk_size: int = 262144
    """Texels per colour query."""

    def validate(self) -> None:
        if not 16 <= self.size <= 16384:
            raise ValueError(f"texture size must lie in [16, 16384], got {self.size}")
        if self.padding_texels < 0 or self.atlas_padding < 0:
            raise ValueError("texture padding values must be >= 0")
        if self.chart_max_iterations < 1:
            raise ValueError(f"chart_max_iterations must be >= 1, got {self.chart_max_iterations}")


@dataclass
class TexturedMesh:
    """A UV-mapped mesh in export space, ready for the .glb / .obj writers.

    Vertices are split along UV seams (one vertex per distinct (position, uv) pair).
    """

    vertices: np.ndarray  # [V, 3] float32, export space (Y-up metres, base centre at the origin)
    normals: np.ndarray  # [V, 3] float32, unit length, outward
    uvs: np.ndarray  # [V, 2] float32 in [0, 1], glTF convention (origin top-left, v down)
    faces: np.ndarray  # [F, 3] uint32, counter-clockwise seen from outside
    texture: np.ndarray  # [S, S, 3] uint8 sRGB base colour
    coverage: float = 0.0  # fraction of texels covered by charts (before padding)


def unwrap_uv(
    vertices: np.ndarray, faces: np.ndarray, cfg: TextureConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas -> (vmapping [V'] into the input vertices, faces [F, 3], uvs [V', 2] in [0, 1])."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(
        np.ascontiguousarray(vertices, dtype=np.float32),
        np.ascontiguousarray(faces, dtype=np.uint32),
    )
    chart = xatlas.ChartOptions()
    chart.max_iterations = cfg.chart_max_iterations
    pack = xatlas.PackOptions()
    pack.resolution = cfg.size
    pack.padding = cfg.atlas_padding
    pack.bilinear = True
    atlas.generate(chart, pack)
    vmapping, indices, uvs = atlas.get_mesh(0)
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float64)


def rasterize_uv(
    uvs: np.ndarray, faces: np.ndarray, size: int, max_batch_texels: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which triangle covers each texel, and where (hand-written, vectorised numpy rasteriser).

    Conservative: a texel is assigned to a triangle when its centre lies inside it, or when the
    centre lies within half a texel diagonal outside it (then the barycentrics are clamped onto
    the triangle). Centre-inside hits win over near hits, so chart borders and sub-texel
    triangles still get their own surface colour instead of a neighbour's.

    Args:
        uvs: [V, 2] in [0, 1] (glTF convention: u right, v down).
        faces: [F, 3] vertex indices.
        size: texture width = height.
    Returns:
        texel [M] flat texel indices (row * size + col), face [M] the triangle chosen for it,
        bary [M, 3] barycentric coordinates (inside the triangle) of its sample point. Each
        texel appears once.
    """
    reach = 0.7072  # half the texel diagonal, in texels
    pix = uvs * size - 0.5  # texel (i, j) centre sits at pixel coordinates (x=j, y=i)
    tri = pix[faces]  # [F, 3, 2]
    x0 = np.clip(np.ceil(tri[..., 0].min(1) - reach), 0, size - 1).astype(np.int64)
    x1 = np.clip(np.floor(tri[..., 0].max(1) + reach), 0, size - 1).astype(np.int64)
    y0 = np.clip(np.ceil(tri[..., 1].min(1) - reach), 0, size - 1).astype(np.int64)
    y1 = np.clip(np.floor(tri[..., 1].max(1) + reach), 0, size - 1).astype(np.int64)
    w = x1 - x0 + 1
    h = y1 - y0 + 1
    a = tri[:, 0]
    e1 = tri[:, 1] - a
    e2 = tri[:, 2] - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # Height of the triangle over the edge opposite each vertex: b_k * height_k is the signed
    # distance (in texels) of a point from that edge.
    edge_len = np.stack(
        [
            np.linalg.norm(tri[:, 2] - tri[:, 1], axis=1),
            np.linalg.norm(tri[:, 0] - tri[:, 2], axis=1),
            np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1),
        ],
        axis=1,
    )
    height = np.abs(det)[:, None] / np.maximum(edge_len, 1e-12)
    valid = (w > 0) & (h > 0) & (np.abs(det) > 1e-12)
    order = np.nonzero(valid)[0]
    order = order[np.argsort((w * h)[order], kind="stable")]

    texels, face_ids, barys, scores = [], [], [], []
    start = 0
    while start < len(order):
        # Grow the batch while (count x largest bbox) stays under the texel budget.
        end = start + 1
        max_w, max_h = w[order[start]], h[order[start]]
        step = 1
        while end < len(order):
            nxt = min(len(order), end + step)
            mw, mh = max(max_w, w[order[nxt - 1]]), max(max_h, h[order[nxt - 1]])
            if (nxt - start) * mw * mh > max_batch_texels:
                break
            end, max_w, max_h = nxt, mw, mh
            step *= 2
        ids = order[start:end]
        start = end
        oy, ox = np.meshgrid(np.arange(max_h), np.arange(max_w), indexing="ij")
        px = x0[ids, None, None] + ox[None]  # [T, mh, mw]
        py = y0[ids, None, None] + oy[None]
        dx = px - a[ids, 0, None, None]
        dy = py - a[ids, 1, None, None]
        inv = 1.0 / det[ids, None, None]
        b1 = (dx * e2[ids, 1, None, None] - dy * e2[ids, 0, None, None]) * inv
        b2 = (e1[ids, 0, None, None] * dy - e1[ids, 1, None, None] * dx) * inv
        b0 = 1.0 - b1 - b2
        hs = height[ids]
        dist = np.minimum(
            np.minimum(b0 * hs[:, 0, None, None], b1 * hs[:, 1, None, None]),
            b2 * hs[:, 2, None, None],
        )  # signed distance to the triangle's nearest edge line (> 0 inside)
        hit = (dist >= -reach) & (px <= x1[ids, None, None]) & (py <= y1[ids, None, None])
        t, r, c = np.nonzero(hit)
        texels.append(py[t, r, c] * size + px[t, r, c])
        face_ids.append(ids[t])
        barys.append(np.stack([b0[t, r, c], b1[t, r, c], b2[t, r, c]], axis=1))
        scores.append(np.minimum(dist[t, r, c], 0.0))  # all centre-inside hits tie at 0
    if not texels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    texel = np.concatenate(texels)
    face = np.concatenate(face_ids)
    bary = np.clip(np.concatenate(barys), 0.0, None)
    bary /= np.maximum(bary.sum(axis=1, keepdims=True), 1e-12)
    score = np.concatenate(scores)
    best = np.lexsort((-score, texel))  # by texel, best score first
    texel, face, bary = texel[best], face[best], bary[best]
    texel, first = np.unique(texel, return_index=True)
    return texel, face[first], bary[first]


def pad_texture(image: np.ndarray, mask: np.ndarray, padding: int) -> np.ndarray:
    """Fills empty texels: nearest covered texel within ``padding``, the mean colour beyond.

    Args:
        image: [H, W, C] float colours (only ``mask`` texels are meaningful).
        mask: [H, W] bool, covered texels.
    """
    from scipy.ndimage import distance_transform_edt

    out = image.copy()
    if not mask.any():
        return out
    mean = image[mask].mean(axis=0)
    if mask.all():
        return out
    dist, (ri, ci) = distance_transform_edt(~mask, return_indices=True)
    near = (~mask) & (dist <= padding)
    out[near] = image[ri[near], ci[near]]
    out[(~mask) & ~near] = mean
    return out


def bake_texture(
    extracted: ExtractedMesh,
    color_fn: FieldFn,
    cfg: TextureConfig | None = None,
    device: torch.device | str | None = None,
) -> TexturedMesh:
    """UV-unwraps the mesh and bakes ``color_fn`` into a base-colour texture.

    Each covered texel's surface point is computed in export space, mapped back with
    ``extracted.export_to_world`` and the colour field is queried at that ORIGINAL world position,
    so normalising the mesh (scale to ``size_m``, move to the ground) never shifts the texture.

    Args:
        extracted: mesh from :func:`dreamlab.export.mesh.extract_mesh` (decimate first: xatlas is
            slow on big meshes, ~0.6 s at 7.5k faces, ~17 s at 55k).
        color_fn: world points [N, 3] -> RGB [N, 3] in [0, 1] (e.g. ``renderer.color``).
        cfg: texture options.
        device: device the query points are sent to.
    """
    cfg = cfg or TextureConfig()
    cfg.validate()
    mesh = extracted.mesh
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    vmap, faces, uvs = unwrap_uv(vertices, np.asarray(mesh.faces), cfg)
    new_vertices = vertices[vmap]
    new_normals = normals[vmap]
    new_normals /= np.maximum(np.linalg.norm(new_normals, axis=1, keepdims=True), 1e-12)

    size = cfg.size
    texel, face, bary = rasterize_uv(uvs, faces, size)
    surface = np.einsum("mk,mkd->md", bary, new_vertices[faces[face]])  # export-space points
    world = extracted.export_to_world(surface)
    colors = np.clip(query_field(color_fn, world, cfg.chunk_size, device).reshape(-1, 3), 0.0, 1.0)

    image = np.zeros((size * size, 3), dtype=np.float64)
    mask = np.zeros(size * size, dtype=bool)
    image[texel] = colors
    mask[texel] = True
    image = pad_texture(image.reshape(size, size, 3), mask.reshape(size, size), cfg.padding_texels)
    coverage = float(mask.mean())
    log.info(
        "texture bake: %d charts' texels %.1f%% of %dx%d", len(texel), 100 * coverage, size, size
    )
    return TexturedMesh(
        vertices=new_vertices.astype(np.float32),
        normals=new_normals.astype(np.float32),
        uvs=np.clip(uvs, 0.0, 1.0).astype(np.float32),
        faces=faces.astype(np.uint32),
        texture=np.round(image * 255.0).astype(np.uint8),
        coverage=coverage,
    )
