"""dreamlab's CUDA rasterizer (``dreamlab.cuda_ext``).

Without a GPU: the sources compile with nvcc (so they cannot rot; ~40 s on a 2-core CPU, most of
it bindings.cpp against torch's headers), importing builds nothing, and the kernels themselves,
built for a CPU emulation (``tests/cuda_cpu/``: one fiber per CUDA thread), match the PyTorch
twin through the real ``dreamlab.cuda_ext.composite`` code path: to ~1e-12 in float64 and to
float32 rounding in float32, gradients included.

With a GPU (marked ``gpu``): the real extension against the twin on the same device. Tolerances:
forward ``assert_close`` atol 2e-4 / rtol 1e-4 in float32 (the kernels take the same per-pair
decisions as the twin, so what is left is summation order, plus a rare pixel whose transmittance
lands within rounding of the 1e-4 termination threshold), 1e-9 in float64; backward relative L2
<= 1e-3 and cosine >= 0.999 for every input gradient in float32, 1e-9 / 1 - 1e-12 in float64.
"""

from __future__ import annotations

import pytest
import torch
from cuda_emulation import EmulatedExtension, build_emulator
from raster_fixtures import assert_grads_agree, cameras, render_with_grads, scene

from dreamlab import cuda_ext
from dreamlab.cuda_ext import composite
from dreamlab.cuda_ext.build import compile_check, nvcc_executable
from dreamlab.renderers.gaussians import rasterize as raster

F64, F32 = torch.float64, torch.float32

# ----------------------------------------------------------------------------- compile check


def test_cuda_sources_compile_with_nvcc(tmp_path):
    if nvcc_executable() is None:
        pytest.fail(
            "nvcc not found: this test compiles cuda_ext/*.cu so the CUDA rasterizer cannot rot "
            "on CPU-only machines, and must not be skipped. Install the CUDA toolkit (nvcc on "
            "PATH or CUDA_HOME set)."
        )
    steps = compile_check(tmp_path)
    summary = "\n".join(f"{s.returncode:3d} {s.seconds:6.1f} s {s.name}" for s in steps)
    for step in steps:
        assert step.returncode == 0, f"{step.name} failed\n{summary}\n{step.output[-6000:]}"
    assert len(steps) == 4, summary


# ----------------------------------------------------------------------------- lazy loading


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would really build")
def test_nothing_builds_without_cuda(monkeypatch):
    from torch.utils import cpp_extension

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.utils.cpp_extension.load must not run without CUDA")

    monkeypatch.setattr(cpp_extension, "load", forbidden)
    cuda_ext._reset_for_tests()
    try:
        with pytest.raises(cuda_ext.CudaExtensionError, match="CPU-only|no CUDA|toolkit"):
            cuda_ext.load_extension()
        assert raster.select_backend("auto", "cpu") == "torch"
        assert not cuda_ext.is_loaded()
    finally:
        cuda_ext._reset_for_tests()


def test_build_directory_honours_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cuda_ext.build_directory()
    assert path.parent.parent == tmp_path and path.name == cuda_ext.EXTENSION_NAME
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert ".cache/dreamlab/torch_extensions" in cuda_ext.build_directory().as_posix()


def test_sources_ship_with_the_package():
    for path in cuda_ext.source_paths() + [cuda_ext.SOURCE_DIR / h for h in cuda_ext.HEADERS]:
        assert path.is_file(), path


# ----------------------------------------------------------------------------- CPU emulation


@pytest.fixture(scope="module")
def emulated_ext(tmp_path_factory):
    return EmulatedExtension(build_emulator(tmp_path_factory.mktemp("cuda_emulation")))


@pytest.fixture
def emulated_cuda_backend(emulated_ext, monkeypatch):
    """rasterize_gaussians(backend="cuda") runs the emulated kernels on CPU tensors."""
    real = raster.select_backend

    def select(backend, device):
        return "cuda" if backend == "cuda" else real(backend, device)

    monkeypatch.setattr(raster, "select_backend", select)
    monkeypatch.setattr(composite, "load_extension", lambda: emulated_ext)
    return emulated_ext


def _compare(inputs, cams, bg, dtype, seed=0):
    ref = render_with_grads(inputs, cams, bg, "torch", seed)
    test = render_with_grads(inputs, cams, bg, "cuda", seed)
    assert test.aux.backend == "cuda" and ref.aux.backend == "torch"
    if dtype == F64:
        for a, b in zip(test.outputs, ref.outputs):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        assert_grads_agree(test, ref, max_rel=1e-10, min_cos=1 - 1e-12)
    else:
        for a, b in zip(test.outputs, ref.outputs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert_grads_agree(test, ref, max_rel=1e-5, min_cos=1 - 1e-8)
    torch.testing.assert_close(test.aux.radii, ref.aux.radii)
    assert torch.equal(test.aux.visible, ref.aux.visible)
    return test, ref


@pytest.mark.parametrize("dtype", [F64, F32])
def test_emulated_kernels_match_twin(emulated_cuda_backend, dtype):
    # Two cameras, sizes not multiples of 16, opaque splats (early termination), per-camera
    # colours and backgrounds.
    cams = cameras(37, 21, dtype)
    inputs = scene(120, 0, dtype=dtype, opaque=0.2, per_camera=2)
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    test, ref = _compare(inputs, cams, bg, dtype)
    assert ref.aux.num_pairs > 2000 and test.aux.num_pairs > 0
    assert float(ref.outputs[1].max()) > 0.99  # some pixels terminate early


def test_emulated_batches_longer_than_a_block(emulated_cuda_backend):
    # 400 Gaussians on a 24 x 20 image: every tile list is longer than one 256-entry batch, so
    # the shared-memory batching of both kernels is crossed (forward and back to front).
    cams = cameras(24, 20)
    inputs = scene(400, 2, spread=0.5, opaque=0.05, max_opacity=0.3)
    _compare(inputs, cams, torch.tensor([0.2, 0.5, 0.8], dtype=F64), F64)


@pytest.mark.parametrize("channels", [1, 40])
def test_emulated_any_channel_count(emulated_cuda_backend, channels):
    # 40 colour channels + depth = 41 features: composited in chunks of 32 and 9.
    cams = cameras(20, 18)
    inputs = scene(50, 3, channels=channels, opaque=0.1)
    bg = torch.linspace(0, 1, channels, dtype=F64)
    _compare(inputs, cams, bg, F64)


def test_emulated_empty_and_culled_scenes(emulated_cuda_backend):
    cams = cameras(17, 16)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=F64)
    empty = scene(0, 0)
    rgb, alpha, depth, aux = raster.rasterize_gaussians(*empty, cams, bg, backend="cuda")
    assert torch.equal(rgb, bg.expand(2, 16, 17, 3)) and not alpha.any() and not depth.any()
    assert aux.num_pairs == 0
    behind = scene(5, 1)
    behind[0] = behind[0] * 0 + torch.tensor([0.0, 10.0, 0.0], dtype=F64)  # above both cameras
    rgb, alpha, _, aux = raster.rasterize_gaussians(*behind, cams, bg, backend="cuda")
    assert torch.equal(rgb, bg.expand(2, 16, 17, 3)) and aux.num_pairs == 0


# ----------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_backend_matches_twin_on_gpu(dtype):
    cams = cameras(96, 72, dtype, "cuda")
    inputs = scene(3000, 4, dtype=dtype, device="cuda", opaque=0.1, per_camera=2)
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(2), dtype=dtype).cuda()
    ref = render_with_grads(inputs, cams, bg, "torch")
    test = render_with_grads(inputs, cams, bg, "cuda")
    assert test.aux.backend == "cuda"
    if dtype == F32:
        for a, b in zip(test.outputs, ref.outputs):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
        assert_grads_agree(test, ref, max_rel=1e-3, min_cos=0.999)
    else:
        for a, b in zip(test.outputs, ref.outputs):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        assert_grads_agree(test, ref, max_rel=1e-9, min_cos=1 - 1e-12)


@pytest.mark.gpu
def test_cuda_backend_many_channels_on_gpu():
    cams = cameras(64, 48, F32, "cuda")
    inputs = scene(800, 5, channels=40, dtype=F32, device="cuda", opaque=0.1)
    bg = torch.rand(40, dtype=F32).cuda()
    ref = render_with_grads(inputs, cams, bg, "torch")
    test = render_with_grads(inputs, cams, bg, "cuda")
    for a, b in zip(test.outputs, ref.outputs):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert_grads_agree(test, ref, max_rel=1e-3, min_cos=0.999)


@pytest.mark.gpu
def test_auto_picks_cuda_kernels_and_renderer_trains_with_them():
    from dreamlab.renderers.gaussians import GaussianConfig, GaussianRenderer

    assert raster.select_backend("auto", "cuda") == "cuda"
    model = GaussianRenderer(GaussianConfig(num_init=2000, backend="cuda")).cuda()
    cams = cameras(64, 64, F32, "cuda")
    out = model.render(cams, torch.ones(3, device="cuda"))
    (out.rgb.mean() + out.depth.mean()).backward()
    assert model.backend == "cuda" and out.aux.backend == "cuda"
    assert out.aux.means2d.grad is not None and torch.isfinite(model.means.grad).all()
    assert float(model.means.grad.abs().sum()) > 0
