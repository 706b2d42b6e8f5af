"""The pure-PyTorch Gaussian rasterizer: analytic cases, gradcheck, agreement with the reference."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dreamlab.renderers.gaussians.rasterize import (
    ALPHA_MAX,
    rasterize_gaussians,
    select_backend,
)
from dreamlab.renderers.gaussians.reference import reference_rasterize
from dreamlab.types import Cameras, orbit_cameras

F64 = torch.float64


def front_camera(size: int = 9, distance: float = 2.5, fov: float = 49.0, dtype=F64) -> Cameras:
    cams = orbit_cameras(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([distance]), torch.tensor([fov]),
        size, size,
    )  # fmt: skip
    cams.c2w = cams.c2w.to(dtype)
    return cams


def splats(n: int, dtype=F64):
    quats = torch.zeros(n, 4, dtype=dtype)
    quats[:, 0] = 1.0
    return quats, torch.full((n, 3), math.log(0.05), dtype=dtype)


def random_scene(n: int, seed: int, dtype=F64, opaque: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = ((torch.rand(n, 3, generator=g) - 0.5) * 0.8).to(dtype)
    quats = torch.randn(n, 4, generator=g).to(dtype)
    log_scales = torch.log(torch.rand(n, 3, generator=g) * 0.1 + 0.03).to(dtype)
    opac = (torch.rand(n, generator=g) * 0.9 + 0.05).to(dtype)
    opac[:opaque] = 1.0
    colors = torch.rand(n, 3, generator=g).to(dtype)
    return means, quats, log_scales, opac, colors


def two_cameras(width: int = 16, height: int = 12, dtype=F64) -> Cameras:
    cams = orbit_cameras(
        torch.tensor([10.0, -20.0]), torch.tensor([30.0, 100.0]), torch.tensor([2.5, 2.0]),
        torch.tensor([49.0, 49.0]), width, height,
    )  # fmt: skip
    cams.c2w = cams.c2w.to(dtype)
    return cams


def test_empty_scene_gives_background():
    cams = front_camera(8)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=F64)
    empty = torch.zeros(0, 3, dtype=F64)
    rgb, alpha, depth, aux = rasterize_gaussians(
        empty, torch.zeros(0, 4, dtype=F64), empty, torch.zeros(0, dtype=F64), empty, cams, bg
    )
    assert rgb.shape == (1, 8, 8, 3) and alpha.shape == depth.shape == (1, 8, 8, 1)
    assert torch.equal(rgb, bg.expand(1, 8, 8, 3))
    assert torch.all(alpha == 0) and torch.all(depth == 0) and aux.num_pairs == 0
    # Gaussians behind the camera are culled, too.
    quats, log_scales = splats(1)
    behind = torch.tensor([[0.0, 0.0, 5.0]], dtype=F64)
    rgb, alpha, _, aux = rasterize_gaussians(
        behind, quats, log_scales, torch.ones(1, dtype=F64), torch.ones(1, 3, dtype=F64), cams, bg
    )
    assert torch.equal(rgb, bg.expand(1, 8, 8, 3)) and aux.num_pairs == 0
    assert not aux.visible.any()


def test_opaque_splat_covers_centre_pixel():
    cams = front_camera(9)
    quats, log_scales = splats(1)
    red = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    bg = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    rgb, alpha, depth, aux = rasterize_gaussians(
        torch.zeros(1, 3, dtype=F64), quats, log_scales, torch.ones(1, dtype=F64), red, cams, bg
    )
    centre = rgb[0, 4, 4]
    assert torch.allclose(centre, torch.tensor([ALPHA_MAX, 0.0, 1 - ALPHA_MAX], dtype=F64))
    assert alpha[0, 4, 4, 0] == pytest.approx(ALPHA_MAX)
    assert depth[0, 4, 4, 0] == pytest.approx(ALPHA_MAX * 2.5)
    # Symmetric falloff around the centre, nothing in the corners.
    assert torch.allclose(rgb[0, 3, 4], rgb[0, 5, 4]) and torch.allclose(rgb[0, 4, 3], rgb[0, 4, 5])
    assert rgb[0, 3, 4, 0] < centre[0]
    assert torch.equal(rgb[0, 0, 0], bg)
    assert aux.means2d[0, 0].tolist() == pytest.approx([4.5, 4.5])


def test_depth_order_of_two_splats():
    cams = front_camera(9)
    quats, log_scales = splats(2)
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    opac = torch.tensor([0.7, 0.6], dtype=F64)
    bg = torch.zeros(3, dtype=F64)
    near, far = 0.3, -0.3  # +z is towards the camera at azimuth 0

    def centre(z_red: float, z_green: float) -> torch.Tensor:
        means = torch.tensor([[0.0, 0.0, z_red], [0.0, 0.0, z_green]], dtype=F64)
        return rasterize_gaussians(means, quats, log_scales, opac, colors, cams, bg)[0][0, 4, 4]

    red_front, green_front = centre(near, far), centre(far, near)
    assert red_front.tolist() == pytest.approx([0.7, 0.3 * 0.6, 0.0])
    assert green_front.tolist() == pytest.approx([0.4 * 0.7, 0.6, 0.0])


def test_gradcheck_whole_render():
    cams = two_cameras(8, 8)
    g = torch.Generator().manual_seed(3)
    means = (torch.rand(3, 3, generator=g, dtype=F64) - 0.5) * 0.3
    quats = torch.randn(3, 4, generator=g, dtype=F64)
    # Splats ~1.5-3 px wide and opacities well above 1/255: every cut-off is far from any pixel.
    log_scales = torch.log(torch.rand(3, 3, generator=g, dtype=F64) * 0.15 + 0.35)
    opac = torch.tensor([0.5, 0.7, 0.3], dtype=F64)
    colors = torch.rand(3, 3, generator=g, dtype=F64)
    bg = torch.tensor([0.3, 0.2, 0.1], dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (means, quats, log_scales, opac, colors)]

    def fn(m, q, s, o, c):
        rgb, alpha, depth, _ = rasterize_gaussians(m, q, s, o, c, cams, bg)
        return rgb, alpha, depth

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_bruteforce_reference(seed):
    cams = two_cameras()
    scene = random_scene(30, seed, opaque=6)  # opaque splats exercise early termination
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    fast_in = [t.clone().requires_grad_() for t in scene]
    ref_in = [t.clone().requires_grad_() for t in scene]
    fast = rasterize_gaussians(*fast_in, cams, bg)
    ref = reference_rasterize(*ref_in, cams, bg)
    assert fast[3].num_pairs > 200
    for a, b in zip(fast[:3], ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    gen = torch.Generator().manual_seed(seed + 10)
    cot = [torch.randn(x.shape, generator=gen, dtype=F64) for x in ref]
    torch.autograd.backward(fast[:3], cot)
    torch.autograd.backward(ref, cot)
    for a, b in zip(fast_in, ref_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), (a.grad - b.grad).abs().max()


def test_early_termination_matches_reference():
    cams = front_camera(9)
    quats, log_scales = splats(4)
    means = torch.tensor([[0.0, 0.0, z] for z in (0.3, 0.1, -0.1, -0.3)], dtype=F64)
    opac = torch.tensor([1.0, 0.98, 1.0, 1.0], dtype=F64)  # alphas 0.99, 0.98, 0.99, 0.99
    colors = torch.eye(4, 3, dtype=F64)
    bg = torch.zeros(3, dtype=F64)
    rgb, alpha, _, _ = rasterize_gaussians(means, quats, log_scales, opac, colors, cams, bg)
    ref_rgb, ref_alpha, _ = reference_rasterize(means, quats, log_scales, opac, colors, cams, bg)
    assert torch.allclose(rgb, ref_rgb, atol=1e-12) and torch.allclose(alpha, ref_alpha, atol=1e-12)
    # T = 2e-4 after two splats; the third would bring it to 2e-6 < 1e-4, so the pixel stops.
    assert rgb[0, 4, 4].tolist() == pytest.approx([0.99, 0.01 * 0.98, 0.0])
    assert alpha[0, 4, 4, 0] == pytest.approx(1 - 0.01 * 0.02)


def test_float32_close_to_float64_reference():
    cams = two_cameras(dtype=torch.float32)
    scene = [t.float() for t in random_scene(30, 5)]
    bg = torch.full((3,), 0.5)
    fast = rasterize_gaussians(*scene, cams, bg)
    cams64 = two_cameras()
    ref = reference_rasterize(*[t.double() for t in scene], cams64, bg.double())
    for a, b in zip(fast[:3], ref):
        assert torch.allclose(a.double(), b, atol=2e-4), (a.double() - b).abs().max()


def test_per_camera_colors_and_batched_background():
    cams = two_cameras()
    means, quats, log_scales, opac, colors = random_scene(20, 2)
    per_cam = torch.stack([colors, 1 - colors])
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64)
    rgb = rasterize_gaussians(means, quats, log_scales, opac, per_cam, cams, bg)[0]
    ref = reference_rasterize(means, quats, log_scales, opac, per_cam, cams, bg)[0]
    assert torch.allclose(rgb, ref, atol=1e-10)


def test_means2d_gradient_is_retained():
    cams = front_camera(16)
    scene = [t.clone().requires_grad_() for t in random_scene(10, 4)]
    rgb, _, _, aux = rasterize_gaussians(*scene, cams, torch.zeros(3, dtype=F64))
    rgb.sum().backward()
    assert aux.means2d.grad is not None and aux.means2d.grad.shape == (1, 10, 2)
    assert aux.radii.shape == (1, 10) and torch.all(aux.radii[aux.visible] > 0)


def test_backend_selection():
    assert select_backend("auto", "cpu") == "torch"
    assert select_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        select_backend("gsplat", "cpu")
    with pytest.raises(ValueError):
        select_backend("opengl", "cpu")
    assert "gsplat" not in sys.modules


def test_large_batches_use_wide_sort_keys_consistently():
    # 2 x 192 x 192 pixels exceed the int16 sort keys; each camera alone does not.
    cams = two_cameras(192, 192, dtype=torch.float32)
    scene = [t.float() for t in random_scene(40, 6)]
    bg = torch.tensor([0.1, 0.2, 0.3])
    both = rasterize_gaussians(*scene, cams, bg)
    for b in range(2):
        single = rasterize_gaussians(*scene, cams[b], bg)
        for x, y in zip(both[:3], single[:3]):
            assert torch.allclose(x[b : b + 1], y, atol=1e-6)
