"""Image and mesh metrics of the benchmarks, as small pure functions (definitions: docs/metrics.md).

Images are channels-last floats in [0, 1] (``[B, H, W, 3]``, the renderer convention) unless a
function says otherwise; masks are ``[B, H, W]`` (bool, or float coverage thresholded at 0.5).
Every function is deterministic and runs on whatever device its inputs live on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PSNR_CAP_DB = 100.0
"""PSNR of identical images (MSE = 0) is reported as this many dB instead of infinity."""

MASK_THRESHOLD = 0.5
"""A pixel is foreground when its alpha / coverage exceeds this."""


def _as_mask(mask: Tensor) -> Tensor:
    """[B, H, W] or [B, H, W, 1] bool/float -> [B, H, W] bool."""
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    return mask if mask.dtype == torch.bool else mask > MASK_THRESHOLD


# ------------------------------------------------------------------------ per-view image metrics


def silhouette_iou(pred_mask: Tensor, gt_mask: Tensor) -> Tensor:
    """Per-view IoU [B] of two silhouettes; 1 when both are empty.

    Args:
        pred_mask: [B, H, W] (or [B, H, W, 1]) result alpha, foreground where > 0.5.
        gt_mask: [B, H, W] ground-truth coverage, foreground where > 0.5.
    """
    pred, gt = _as_mask(pred_mask), _as_mask(gt_mask)
    assert pred.shape == gt.shape, (pred.shape, gt.shape)
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def masked_psnr(
    pred_rgb: Tensor,
    gt_rgb: Tensor,
    pred_mask: Tensor,
    gt_mask: Tensor,
    cap_db: float = PSNR_CAP_DB,
) -> Tensor:
    """Per-view PSNR [B] in dB over the union of the two silhouettes (peak value 1).

    MSE is averaged over the union's pixels and the 3 channels; PSNR = -10 log10(MSE), capped at
    ``cap_db`` (identical images, or an empty union, give exactly ``cap_db``).
    """
    assert pred_rgb.shape == gt_rgb.shape and pred_rgb.shape[-1] == 3, (
        pred_rgb.shape,
        gt_rgb.shape,
    )
    union = (_as_mask(pred_mask) | _as_mask(gt_mask)).float()  # [B, H, W]
    sq = ((pred_rgb.float() - gt_rgb.float()) ** 2).mean(-1)  # [B, H, W]
    count = union.flatten(1).sum(1)
    mse = (sq * union).flatten(1).sum(1) / count.clamp_min(1.0)
    floor = 10.0 ** (-cap_db / 10.0)
    psnr = -10.0 * torch.log10(mse.clamp_min(floor))
    return torch.where(count > 0, psnr, torch.full_like(psnr, cap_db))


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (``[..., 3]``) -> CIE L*a*b* (D65 white), float32. L* in [0, 100]."""
    rgb = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ],
        dtype=torch.float32,
        device=rgb.device,
    )
    xyz = linear @ m.T
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float32, device=rgb.device)
    t = xyz / white
    delta = 6.0 / 29.0
    f = torch.where(
        t > delta**3, t.clamp_min(1e-12) ** (1.0 / 3.0), t / (3 * delta**2) + 4.0 / 29.0
    )
    lab_l = 116.0 * f[..., 1] - 16.0
    lab_a = 500.0 * (f[..., 0] - f[..., 1])
    lab_b = 200.0 * (f[..., 1] - f[..., 2])
    return torch.stack([lab_l, lab_a, lab_b], dim=-1)


def delta_e(rgb_a: Tensor, rgb_b: Tensor) -> Tensor:
    """CIE76 colour difference ΔE*ab (Euclidean distance in L*a*b*) of sRGB colours ``[..., 3]``.

    About 2.3 is a just-noticeable difference; pure red vs pure green is ~170.
    """
    return (srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b)).norm(dim=-1)


def foreground_colour_error(
    pred_rgb: Tensor, gt_rgb: Tensor, pred_mask: Tensor, gt_mask: Tensor
) -> Tensor:
    """Per-view mean ΔE*ab [B] over the pixels that are foreground in BOTH images.

    Silhouette errors are IoU's business; this measures only the colour of the overlap. NaN for
    a view whose overlap is empty.
    """
    both = (_as_mask(pred_mask) & _as_mask(gt_mask)).float()  # [B, H, W]
    de = delta_e(pred_rgb, gt_rgb)  # [B, H, W]
    count = both.flatten(1).sum(1)
    mean = (de * both).flatten(1).sum(1) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def hsv_saturation(rgb: Tensor) -> Tensor:
    """HSV saturation (max − min) / max of sRGB colours ``[..., 3]`` (0 for black)."""
    high, low = rgb.amax(-1), rgb.amin(-1)
    return torch.where(high > 1e-6, (high - low) / high.clamp_min(1e-6), torch.zeros_like(high))


def saturation_excess(pred_rgb: Tensor, gt_rgb: Tensor, pred_mask: Tensor, gt_mask: Tensor) -> Tensor:
    """Per-view mean HSV saturation of the result minus that of the truth [B], over the pixels
    foreground in BOTH images: > 0 means more saturated than the ground truth (the
    over-saturation score-distillation papers discuss). NaN for a view whose overlap is empty."""
    both = (_as_mask(pred_mask) & _as_mask(gt_mask)).float()
    diff = hsv_saturation(pred_rgb) - hsv_saturation(gt_rgb)
    count = both.flatten(1).sum(1)
    mean = (diff * both).flatten(1).sum(1) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


# ----------------------------------------------------------------------------- Janus


def feature_projection(result: Tensor, truth: Tensor, alternative: Tensor, region: Tensor) -> float:
    """How far ``result`` moved from ``truth`` towards ``alternative`` inside ``region``.

    t = Σ_region (R − T)·(A − T) / Σ_region |A − T|², summed over pixels and channels: 0 when the
    result equals the truth there, 1 when it equals the alternative. NaN when truth and
    alternative agree on the region (nothing to tell apart).

    Args:
        result, truth, alternative: [H, W, 3] images.
        region: [H, W] bool pixels to compare.
    """
    region = region.bool()[..., None].float()
    diff = (alternative.float() - truth.float()) * region
    denom = float((diff**2).sum())
    if denom < 1e-6:
        return float("nan")
    return float(((result.float() - truth.float()) * diff).sum()) / denom


def _angle_close(a: float, b: float, tol: float = 1e-3) -> bool:
    return abs((a - b + 180.0) % 360.0 - 180.0) < tol


def janus_scores(
    result_rgb: Tensor,
    gt_rgb: Tensor,
    gt_feature: Tensor,
    azimuth_deg: Tensor,
    elevation_deg: Tensor,
) -> tuple[float, float]:
    """(janus, front_feature) of a result with a front, rendered on an orbit that includes, at
    every elevation, azimuth 0 (front) and 180 (back). Definitions in docs/metrics.md.

    * janus: mean over views with |azimuth| >= 90° of clip(t, 0, 1), where t =
      feature_projection(R_v, G_v, G_front, P_front − P_v) with G_front the truth at azimuth 0 and
      the same elevation and P_x the truth's front-feature pixels in view x. 0 for a perfect
      reproduction; 1 for a result whose every rear view looks like the front.
    * front_feature: mean over the front views of clip(t, 0, 1) with t =
      feature_projection(R_front, G_back, G_front, P_front − P_back): 1 when the front features
      formed exactly, 0 when the front looks like the back (no features). Janus means something
      only where this is clearly above 0.

    Args:
        result_rgb, gt_rgb: [V, H, W, 3] renders of the result and of the truth, same cameras.
        gt_feature: [V, H, W] bool, pixels where the truth shows a front-only feature (the parts
            ``dreamlab.world.catalog.front_parts`` names: nose, eyes, door, logo, face...).
        azimuth_deg, elevation_deg: [V] the cameras' angles.
    Returns:
        (janus, front_feature); NaN where no view qualifies.
    """
    az = [float(a) for a in azimuth_deg.tolist()]
    el = [float(e) for e in elevation_deg.tolist()]
    feature = gt_feature.bool()  # [V, H, W]

    def find(azimuth: float, elevation: float) -> int | None:
        for k, (a, e) in enumerate(zip(az, el)):
            if _angle_close(a, azimuth) and abs(e - elevation) < 1e-3:
                return k
        return None

    janus, front = [], []
    for v, (a, e) in enumerate(zip(az, el)):
        f = find(0.0, e)
        if f is None:
            continue
        wrapped = (a + 180.0) % 360.0 - 180.0
        if abs(wrapped) >= 90.0 - 1e-3:
            t = feature_projection(result_rgb[v], gt_rgb[v], gt_rgb[f], feature[f] & ~feature[v])
            if math.isfinite(t):
                janus.append(min(max(t, 0.0), 1.0))
        if v == f:
            b = find(180.0, e)
            if b is not None:
                t = feature_projection(
                    result_rgb[f], gt_rgb[b], gt_rgb[f], feature[f] & ~feature[b]
                )
                if math.isfinite(t):
                    front.append(min(max(t, 0.0), 1.0))
    nan = float("nan")
    return (float(np.mean(janus)) if janus else nan, float(np.mean(front)) if front else nan)


# ----------------------------------------------------------------------------- nearest reference


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] images (reflect pad); sigma in pixels (0: none)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(2.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def blurred_features(images: Tensor, blur_sigma: float = 1.0) -> Tensor:
    """[N, 3, H, W] images -> [N, 3·H·W] blurred, flattened vectors (what the L2 compares)."""
    return gaussian_blur(images.float(), blur_sigma).flatten(1)


def feature_distances(sample_features: Tensor, reference_features: Tensor) -> Tensor:
    """[N, M] mean squared distance between every sample vector [N, F] and reference [M, F]."""
    d = torch.cdist(sample_features.float(), reference_features.float()).pow(2)
    return d / sample_features.shape[1]


def nearest_in(distances: Tensor, candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(index [N], distance [N]) of the smallest entry of each row of ``distances`` [N, M],
    among the True entries of ``candidates`` ([N, M] or [M] bool) when given. Several candidate
    sets can share one :func:`feature_distances` matrix this way."""
    if candidates is not None:
        distances = torch.where(candidates, distances, torch.full_like(distances, float("inf")))
    dist, index = distances.min(dim=1)
    return index, dist


def nearest_by_features(
    sample_features: Tensor, reference_features: Tensor, candidates: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(index [N], mean squared distance [N]) of the nearest reference vector to each sample's."""
    return nearest_in(feature_distances(sample_features, reference_features), candidates)


def nearest_reference(
    samples: Tensor, references: Tensor, blur_sigma: float = 1.0, candidates: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Nearest reference image of each sample under the blurred mean squared pixel distance.

    d(x, r) = mean over pixels and channels of (blur(x) − blur(r))², blur = Gaussian of
    ``blur_sigma`` pixels (1 px at 32×32 forgives a one-pixel shift, not a wrong shape).

    Args:
        samples: [N, 3, H, W] in [0, 1].
        references: [M, 3, H, W] in [0, 1], same size.
        blur_sigma: blur in pixels (0: plain L2).
        candidates: optional [N, M] bool; only True references compete for a sample.
    Returns:
        (index [N] long into references, distance [N]).
    """
    assert samples.shape[1:] == references.shape[1:], (samples.shape, references.shape)
    return nearest_by_features(
        blurred_features(samples, blur_sigma), blurred_features(references, blur_sigma), candidates
    )


# ----------------------------------------------------------------------------- meshes


def mesh_topology(vertices: np.ndarray, faces: np.ndarray) -> tuple[int, int, float]:
    """(components, Euler characteristic χ = V − E + F, genus) of a triangle mesh.

    Vertices are merged by position first and unused ones dropped, so UV-seam duplicates do not
    count. Genus = (2·components − χ) / 2, the total number of handles of a closed orientable
    surface (sphere 0, torus 1); a half-integer or negative value flags an open or broken mesh.
    """
    import trimesh

    mesh = trimesh.Trimesh(vertices=np.asarray(vertices), faces=np.asarray(faces), process=True)
    if len(mesh.faces) == 0:
        return 0, 0, float("nan")
    edges = mesh.edges_unique
    chi = int(len(mesh.vertices) - len(edges) + len(mesh.faces))
    labels = trimesh.graph.connected_component_labels(
        mesh.face_adjacency, node_count=len(mesh.faces)
    )
    components = len(np.unique(labels))
    return components, chi, (2 * components - chi) / 2.0


def mean_texture_colour(
    uvs: np.ndarray, faces: np.ndarray, vertices: np.ndarray, texture: np.ndarray
) -> np.ndarray:
    """Area-weighted mean base colour [3] in [0, 1] of a UV-textured mesh.

    Each face contributes the texel under its UV centroid (nearest texel, glTF UVs: origin
    top-left, v down) weighted by its surface area.
    """
    faces = np.asarray(faces, dtype=np.int64)
    tri = np.asarray(vertices, dtype=np.float64)[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    uv = np.asarray(uvs, dtype=np.float64)[faces].mean(axis=1)  # [F, 2]
    h, w = texture.shape[:2]
    col = np.clip((uv[:, 0] * w).astype(np.int64), 0, w - 1)
    row = np.clip((uv[:, 1] * h).astype(np.int64), 0, h - 1)
    texels = texture[row, col, :3].astype(np.float64) / 255.0  # [F, 3]
    total = area.sum()
    if not total > 0:
        return texels.mean(axis=0) if len(texels) else np.full(3, np.nan)
    return (texels * area[:, None]).sum(axis=0) / total
