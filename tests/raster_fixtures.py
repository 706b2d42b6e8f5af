"""Test helpers shared by the rasterizer-backend tests: random scenes, cameras, running one
backend with gradients, and the agreement measures (relative L2, cosine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamlab.renderers.gaussians import rasterize as raster
from dreamlab.types import Cameras, orbit_cameras


def cameras(width: int, height: int, dtype=torch.float64, device="cpu") -> Cameras:
    """Two cameras at different azimuths, elevations and distances."""
    cams = orbit_cameras(
        torch.tensor([10.0, -20.0]), torch.tensor([30.0, 100.0]), torch.tensor([2.5, 2.0]),
        torch.tensor([49.0, 49.0]), width, height,
    )  # fmt: skip
    cams.c2w = cams.c2w.to(dtype)
    return cams.to(device)


def scene(
    n: int,
    seed: int,
    channels: int = 3,
    dtype=torch.float64,
    device="cpu",
    opaque: float = 0.0,
    max_opacity: float = 0.65,
    per_camera: int = 0,
    spread: float = 0.6,
    scale: tuple[float, float] = (0.02, 0.1),
) -> list[torch.Tensor]:
    """(means, quats, log_scales, opacities, colors): a random cloud in a cube of side ``spread``;
    a fraction ``opaque`` of opacity 0.999 (early termination); colours per camera when
    ``per_camera`` > 0 ([per_camera, N, C])."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * spread
    quats = torch.randn(n, 4, generator=g)
    log_scales = torch.log(torch.rand(n, 3, generator=g) * (scale[1] - scale[0]) + scale[0])
    opac = torch.rand(n, generator=g) * (max_opacity - 0.05) + 0.05
    opac[: int(n * opaque)] = 0.999
    shape = (per_camera, n, channels) if per_camera else (n, channels)
    colors = torch.rand(*shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (means, quats, log_scales, opac, colors)]


@dataclass
class Result:
    outputs: list[torch.Tensor]  # rgb, alpha, depth
    grads: list[torch.Tensor]  # d loss / d (means, quats, log_scales, opacities, colors)
    means2d_grad: torch.Tensor | None
    aux: raster.RasterAux


def render_with_grads(inputs, cams, background, backend: str, seed: int = 0) -> Result:
    """Renders with ``backend`` and back-propagates fixed random cotangents of all outputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    rgb, alpha, depth, aux = raster.rasterize_gaussians(*leaves, cams, background, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1000)
    outs = [rgb, alpha, depth]
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    torch.autograd.backward(outs, cot)
    return Result(
        outputs=[o.detach() for o in outs],
        grads=[t.grad for t in leaves],
        means2d_grad=aux.means2d.grad,
        aux=aux,
    )


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float(a.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 1.0


GRAD_NAMES = ("means", "quats", "log_scales", "opacities", "colors")


def assert_grads_agree(test: Result, ref: Result, max_rel: float, min_cos: float) -> None:
    """Every input gradient (and the retained means2d gradient) within ``max_rel`` relative L2
    of the reference and with cosine similarity at least ``min_cos``."""
    pairs = list(zip(GRAD_NAMES, test.grads, ref.grads))
    if test.means2d_grad is not None and ref.means2d_grad is not None:
        pairs.append(("means2d", test.means2d_grad, ref.means2d_grad))
    for name, a, b in pairs:
        assert a is not None and b is not None, name
        r, c = rel_l2(a, b), cosine(a, b)
        assert r <= max_rel and c >= min_cos, f"{name}: relative L2 {r:.3g}, cosine {c:.6f}"
