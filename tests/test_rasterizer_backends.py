"""The rasterizer backend switch (``select_backend``), the renderer keeping its backend, the
gsplat convention mapping (checked on CPU without gsplat), and on a GPU gsplat against the twin.

gsplat tolerances (GPU): scenes keep every opacity below 0.35, where gsplat's missing per-pixel
3-sigma test and its 0.999 alpha clamp make no difference. What remains is float32 rounding in
its fused projection and its fast ``__expf`` (~1e-6 relative), which can move a pair across the
1/255 alpha cut-off: such a pair changes its pixel by at most 1/255, so the forward check is
``assert_close`` with atol 1/255 + 1e-4 (rtol 1e-4) plus a mean absolute difference below 1e-5;
gradients: relative L2 <= 1e-3 and cosine >= 0.999 for every input.
"""

from __future__ import annotations

import logging
import sys
import typing

import pytest
import torch
from raster_fixtures import assert_grads_agree, cameras, render_with_grads, scene

from dreamlab.renderers.gaussians import GaussianConfig, GaussianRenderer
from dreamlab.renderers.gaussians import model as model_module
from dreamlab.renderers.gaussians import rasterize as raster
from dreamlab.renderers.gaussians.gsplat_backend import gsplat_cameras

F32 = torch.float32

# ----------------------------------------------------------------------------- select_backend


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(raster, "_logged_backends", set())


def test_auto_and_torch_on_cpu_pick_torch(fresh_log):
    assert raster.select_backend("auto", "cpu") == "torch"
    assert raster.select_backend("torch", torch.device("cpu")) == "torch"
    assert "gsplat" not in sys.modules  # nothing GPU-side is imported for a CPU device


@pytest.mark.parametrize("backend", ["cuda", "gsplat"])
def test_gpu_backends_on_cpu_fail_clearly(fresh_log, backend):
    with pytest.raises(ValueError) as info:
        raster.select_backend(backend, "cpu")
    message = str(info.value)
    assert backend in message and "CUDA" in message and "'torch'" in message


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown rasterizer backend 'opengl'.*auto"):
        raster.select_backend("opengl", "cpu")


def test_choice_is_logged_once(fresh_log, caplog):
    with caplog.at_level(logging.INFO, logger=raster.__name__):
        for _ in range(3):
            raster.select_backend("auto", "cpu")
    records = [r for r in caplog.records if "gaussian rasterizer" in r.getMessage()]
    assert len(records) == 1 and "-> torch" in records[0].getMessage()


def test_config_accepts_every_backend():
    hint = typing.get_type_hints(GaussianConfig)["backend"]
    assert typing.get_args(hint) == raster.BACKENDS
    for name in raster.BACKENDS:
        GaussianConfig(backend=name).validate()


def test_run_config_takes_a_rasterizer():
    from dreamlab.config import config_from_json, config_to_json, make_run_config

    cfg = make_run_config("a red cube", rasterizer="gsplat")
    assert cfg.renderer.backend == "gsplat"
    assert config_from_json(config_to_json(cfg)).renderer.backend == "gsplat"
    assert make_run_config("a red cube").renderer.backend == "auto"
    with pytest.raises(ValueError, match="unknown --rasterizer 'opengl'"):
        make_run_config("a red cube", rasterizer="opengl")


# ----------------------------------------------------------------------------- the renderer


def test_renderer_resolves_its_backend_once(monkeypatch):
    calls = []

    def counting(backend, device):
        calls.append((backend, torch.device(device).type))
        return raster.select_backend(backend, device)

    monkeypatch.setattr(model_module, "select_backend", counting)
    model = GaussianRenderer(GaussianConfig(num_init=40))
    assert model.backend is None
    cams = cameras(16, 16, F32)
    for _ in range(3):
        out = model.render(cams, torch.ones(3))
    assert calls == [("auto", "cpu")]
    assert model.backend == "torch" and out.aux.backend == "torch"


def test_renderer_asked_for_cuda_on_cpu_fails_at_first_render():
    model = GaussianRenderer(GaussianConfig(num_init=10, backend="cuda"))
    with pytest.raises(ValueError, match="'cuda' needs the Gaussians on a CUDA GPU"):
        model.render(cameras(8, 8, F32), torch.ones(3))


# ----------------------------------------------------------------------------- gsplat mapping


def test_gsplat_camera_conventions_reproduce_our_projection():
    """gsplat's pinhole model with our viewmats / Ks gives our means2d, depths and covariances."""
    cams = cameras(40, 30)
    means, quats, log_scales, _, _ = scene(30, 7, spread=0.3)
    proj = raster.project_gaussians(means, quats, log_scales, cams)
    viewmats, ks = gsplat_cameras(cams, torch.float64, torch.device("cpu"))
    p = (viewmats[:, None, :3, :3] @ means[None, :, :, None]).squeeze(-1) + viewmats[:, None, :3, 3]
    x, y, z = p.unbind(-1)
    fx, cx = ks[:, None, 0, 0], ks[:, None, 0, 2]
    fy, cy = ks[:, None, 1, 1], ks[:, None, 1, 2]
    torch.testing.assert_close(torch.stack([fx * x / z + cx, fy * y / z + cy], -1), proj.means2d)
    torch.testing.assert_close(z, proj.depth)  # OpenCV z (forward) is our depth d = -z_gl
    # EWA covariance in the OpenCV camera (no fov clamp is active for these central points).
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [torch.stack([fx / z, zero, -fx * x / z**2], -1), torch.stack([zero, fy / z, -fy * y / z**2], -1)],
        dim=-2,
    )  # fmt: skip
    cov3 = raster.covariance_3d(quats, log_scales)
    t = jac @ viewmats[:, None, :3, :3]
    cov2 = t @ cov3[None] @ t.transpose(-1, -2)
    ours = torch.stack(
        [proj.cov2d[..., 0] - raster.DILATION, proj.cov2d[..., 1], proj.cov2d[..., 2] - raster.DILATION],
        dim=-1,
    )  # fmt: skip
    torch.testing.assert_close(
        torch.stack([cov2[..., 0, 0], cov2[..., 0, 1], cov2[..., 1, 1]], -1), ours
    )


# ----------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
def test_gsplat_backend_matches_twin_on_gpu():
    pytest.importorskip("gsplat")
    assert raster.select_backend("gsplat", "cuda") == "gsplat"
    cams = cameras(64, 48, F32, "cuda")
    inputs = scene(600, 8, dtype=F32, device="cuda", max_opacity=0.34, per_camera=2)
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(3)).cuda()
    ref = render_with_grads(inputs, cams, bg, "torch")
    test = render_with_grads(inputs, cams, bg, "gsplat")
    assert test.aux.backend == "gsplat" and test.aux.means2d.shape == ref.aux.means2d.shape
    for a, b in zip(test.outputs, ref.outputs):
        torch.testing.assert_close(a, b, atol=1 / 255 + 1e-4, rtol=1e-4)
        assert float((a - b).abs().mean()) < 1e-5
    assert_grads_agree(test, ref, max_rel=1e-3, min_cos=0.999)
