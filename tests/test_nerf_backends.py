"""The NeRF's optional GPU paths: tiny-cuda-nn hash encoding and nerfacc's estimator / renderer.

CPU tests: backend resolution ("auto" -> torch on CPU without even *trying* to import tinycudann
or nerfacc, checked in a fresh interpreter), actionable errors for explicit GPU requests, the
factory's torch path bit-identical to a direct ``HashEncoding``, and the level mask shared by both
encodings. Tests marked ``gpu`` need a CUDA device (and skip when tinycudann / nerfacc are not
installed there): tcnn output / gradients / progressive zeroing, and nerfacc's render against the
torch path's dense sampling on an analytic sphere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from dreamlab.renderers.nerf import hash_encoding as he
from dreamlab.renderers.nerf import nerfacc_backend as nb
from dreamlab.renderers.nerf.field import NeRFField
from dreamlab.renderers.nerf.hash_encoding import (
    TCNN_INSTALL,
    HashEncoding,
    LevelSchedule,
    growth_factor,
    level_mask,
    make_hash_encoding,
    select_backend,
)
from dreamlab.renderers.nerf.nerfacc_backend import (
    NERFACC_INSTALL,
    NerfaccGrid,
    render_cameras_nerfacc,
    resolve_sampler_backend,
    step_size_for,
)
from dreamlab.renderers.nerf.render import render_cameras
from dreamlab.renderers.nerf.tcnn_backend import TcnnHashEncoding, tcnn_config
from dreamlab.types import orbit_cameras

SMALL = {
    "num_levels": 4,
    "features_per_level": 2,
    "log2_hashmap_size": 12,
    "base_resolution": 4,
    "max_resolution": 32,
}

# ------------------------------------------------------------------ CPU: resolution and errors

_PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    attempts = []


    class Recorder(importlib.abc.MetaPathFinder):
        # records every attempt to import the GPU libraries, even ones that would fail
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in ("tinycudann", "nerfacc") or root.startswith("tinycudann_bindings"):
                attempts.append(name)
            return None


    sys.meta_path.insert(0, Recorder())

    import torch
    from dreamlab.renderers.nerf import NeRFField, NeRFRenderer  # noqa: F401
    from dreamlab.renderers.nerf import nerfacc_backend, tcnn_backend  # noqa: F401
    from dreamlab.renderers.nerf.hash_encoding import make_hash_encoding, select_backend
    from dreamlab.renderers.nerf.nerfacc_backend import resolve_sampler_backend

    small = dict(num_levels=2, log2_hashmap_size=8, base_resolution=2, max_resolution=4)
    out = {
        "encoding": select_backend("auto", "cpu"),
        "sampler": resolve_sampler_backend("auto", torch.device("cpu")),
        "factory": type(make_hash_encoding("auto", "cpu", **small)).__name__,
        "field": NeRFField(hidden=4, encoding_backend="auto", device="cpu", **small).encoding_backend,
    }
    for fn, name in ((select_backend, "tcnn"), (resolve_sampler_backend, "nerfacc")):
        try:
            fn(name, "cpu")
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    out["attempts"] = attempts
    out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tinycudann", "nerfacc"))
    print(json.dumps(out))
    """
)


def test_auto_resolves_to_torch_on_cpu_without_touching_gpu_libraries():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["encoding"] == "torch" and out["sampler"] == "torch"
    assert out["factory"] == "HashEncoding" and out["field"] == "torch"
    assert TCNN_INSTALL in out["tcnn"] and NERFACC_INSTALL in out["nerfacc"]
    assert out["attempts"] == [], out["attempts"]  # not even a failed import attempt
    assert out["modules"] == []


def test_explicit_gpu_backends_on_cpu_raise_with_the_install_command():
    with pytest.raises(ValueError, match="CUDA") as exc:
        select_backend("tcnn", torch.device("cpu"))
    assert TCNN_INSTALL in str(exc.value)
    with pytest.raises(ValueError, match="CUDA") as exc:
        resolve_sampler_backend("nerfacc", "cpu")
    assert NERFACC_INSTALL in str(exc.value)
    with pytest.raises(ValueError, match="tiny-cuda-nn"):
        NeRFField(encoding_backend="tcnn", **SMALL)
    with pytest.raises(ValueError, match="CUDA"):
        TcnnHashEncoding(**SMALL, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        NerfaccGrid(device="cpu")
    with pytest.raises(ValueError, match="make_hash_encoding"):
        HashEncoding(**SMALL, backend="tcnn")
    for bad in (lambda: select_backend("cuda", "cpu"), lambda: resolve_sampler_backend("x", "cpu")):
        with pytest.raises(ValueError, match="unknown"):
            bad()


def test_resolution_rules_on_a_cuda_device(monkeypatch):
    """The CUDA branches, with the import probes replaced (no GPU or package needed)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(he, "_tcnn_problem", lambda: None)
    monkeypatch.setattr(nb, "_nerfacc_problem", lambda: None)
    assert select_backend("auto", cuda) == "tcnn" and select_backend("tcnn", "cuda:0") == "tcnn"
    assert select_backend("torch", cuda) == "torch"
    assert resolve_sampler_backend("auto", cuda) == "nerfacc"
    assert resolve_sampler_backend("nerfacc", cuda) == "nerfacc"
    assert resolve_sampler_backend("torch", cuda) == "torch"

    monkeypatch.setattr(he, "_tcnn_problem", lambda: f"tinycudann missing; {TCNN_INSTALL}")
    monkeypatch.setattr(nb, "_nerfacc_problem", lambda: f"nerfacc missing; {NERFACC_INSTALL}")
    assert select_backend("auto", cuda) == "torch"
    assert resolve_sampler_backend("auto", cuda) == "torch"
    with pytest.raises(ValueError, match="unavailable") as exc:
        select_backend("tcnn", cuda)
    assert TCNN_INSTALL in str(exc.value)
    with pytest.raises(ValueError, match="unavailable") as exc:
        resolve_sampler_backend("nerfacc", cuda)
    assert NERFACC_INSTALL in str(exc.value)


def test_import_probes_explain_what_to_install(monkeypatch):
    monkeypatch.setattr(he, "_tcnn_problem_cache", [])
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # makes `import tinycudann` fail
    problem = he._tcnn_problem()
    assert problem is not None and TCNN_INSTALL in problem
    with pytest.raises(ValueError, match="unavailable"):
        select_backend("tcnn", "cuda")

    for version, ok in (("0.5.1", False), ("0.5.2", True), ("0.5.3+pt21cu118", True)):
        monkeypatch.setattr(nb, "_nerfacc_problem_cache", [])
        monkeypatch.setitem(sys.modules, "nerfacc", types.SimpleNamespace(__version__=version))
        problem = nb._nerfacc_problem()
        assert (problem is None) == ok, (version, problem)
        if not ok:
            assert "too old" in problem and NERFACC_INSTALL in problem
    monkeypatch.setattr(nb, "_nerfacc_problem_cache", [])
    monkeypatch.setitem(sys.modules, "nerfacc", None)
    problem = nb._nerfacc_problem()
    assert problem is not None and NERFACC_INSTALL in problem


# ------------------------------------------------------------------ CPU: factory and field


def test_factory_torch_path_is_bit_identical_to_hash_encoding():
    sched = LevelSchedule(start=2, every=10)
    direct = HashEncoding(**SMALL, schedule=sched, generator=torch.Generator().manual_seed(11))
    for backend in ("torch", "auto"):
        enc = make_hash_encoding(
            backend, "cpu", **SMALL, schedule=sched, generator=torch.Generator().manual_seed(11)
        )
        assert type(enc) is HashEncoding and enc.backend == "torch"
        assert torch.equal(enc.table, direct.table) and enc.params is enc.table
        x = torch.rand(64, 3, generator=torch.Generator().manual_seed(12))
        assert torch.equal(enc(x), direct(x))
        assert enc.active_levels == direct.active_levels == 2
        assert torch.equal(enc(x, active_levels=4), direct(x, active_levels=4))


def test_field_default_and_auto_on_cpu_are_bit_identical():
    def build(**kw):
        return NeRFField(**SMALL, hidden=16, generator=torch.Generator().manual_seed(5), **kw)

    base = build()
    assert base.encoding_backend == "torch"
    for other in (build(encoding_backend="torch"), build(encoding_backend="auto", device="cpu")):
        sa, sb = base.state_dict(), other.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        x = torch.rand(32, 3, generator=torch.Generator().manual_seed(6)) * 2 - 1
        for a, b in zip(base(x), other(x)):
            assert torch.equal(a, b)
    assert base.device == torch.device("cpu") and base.dtype == torch.float32


def test_level_mask_pure_function():
    torch.testing.assert_close(
        level_mask(2, 4, 3), torch.tensor([1.0] * 6 + [0.0] * 6), atol=0, rtol=0
    )
    assert torch.equal(level_mask(0, 3, 2), torch.zeros(6))
    assert torch.equal(level_mask(9, 3, 2, torch.float64), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError):
        level_mask(1, 0, 2)
    # the encodings' methods use it; masking a full output equals running with fewer levels
    enc = HashEncoding(**SMALL, init_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(enc.level_mask(3), level_mask(3, 4, 2))
    x = torch.rand(16, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(enc(x, active_levels=4) * level_mask(3, 4, 2), enc(x, active_levels=3))


def test_tcnn_config_uses_the_twins_growth_factor():
    cfg = tcnn_config(16, 2, 19, 16, 2048)
    assert cfg["otype"] == "HashGrid" and cfg["n_levels"] == 16
    assert cfg["n_features_per_level"] == 2 and cfg["log2_hashmap_size"] == 19
    assert cfg["base_resolution"] == 16 and cfg["interpolation"] == "Linear"
    assert cfg["per_level_scale"] == pytest.approx(growth_factor(16, 16, 2048))
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON, as tiny-cuda-nn wants


def test_step_size_and_version_parsing():
    assert step_size_for(64, 1.0) == pytest.approx(2.0 / 64)
    assert step_size_for(100, 0.5) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        step_size_for(0)
    assert nb._version_tuple("0.5.3+pt21cu118") == (0, 5, 3)
    assert nb._version_tuple("0.5.0rc1") == (0, 5, 0)


# ------------------------------------------------------------------ GPU: tiny-cuda-nn


@pytest.mark.gpu
def test_tcnn_encoding_shapes_gradients_and_progressive_levels():
    pytest.importorskip("tinycudann", reason="tiny-cuda-nn is not installed")
    enc = make_hash_encoding(
        "auto",
        "cuda",
        num_levels=8,
        features_per_level=2,
        log2_hashmap_size=15,
        base_resolution=4,
        max_resolution=128,
        init_scale=1.0,
        schedule=LevelSchedule(start=2, every=10),
        generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(enc, TcnnHashEncoding) and enc.backend == "tcnn"
    assert enc.params.is_cuda and enc.output_dim == 16 and enc.active_levels == 2
    x = torch.rand(1000, 3, device="cuda")  # not a multiple of tcnn's batch granularity
    out = enc(x)
    assert out.shape == (1000, 16) and out.dtype == torch.float32 and out.isfinite().all()
    assert torch.all(out[:, 4:] == 0) and out[:, :4].abs().sum() > 0
    full = enc(x, active_levels=8)
    torch.testing.assert_close(out[:, :4], full[:, :4], atol=1e-6, rtol=0)
    assert full[:, 4:].abs().sum() > 0
    assert enc(x[:0]).shape == (0, 16)

    def grads(active: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc.zero_grad()
        xx = x.clone().requires_grad_(True)
        (enc(xx, active_levels=active) ** 2).sum().backward()
        return enc.params.grad.clone(), xx.grad

    g_part, gx = grads(2)
    g_full, _ = grads(8)
    assert g_part.isfinite().all() and g_full.isfinite().all() and gx.isfinite().all()
    assert 0 < int((g_part != 0).sum()) < int((g_full != 0).sum())  # locked levels get none
    enc.update_step(100)
    assert enc.active_levels == 8

    field = NeRFField(**SMALL, hidden=16, encoding_backend="tcnn", device="cuda")
    assert field.encoding_backend == "tcnn" and field.device.type == "cuda"
    sigma, albedo = field(torch.rand(300, 3, device="cuda") * 2 - 1)
    (sigma.mean() + albedo.mean()).backward()
    assert sigma.shape == (300,) and albedo.shape == (300, 3)
    assert field.encoding.params.grad.isfinite().all()
    assert field.encoding.params.grad.abs().sum() > 0


# ------------------------------------------------------------------ GPU: nerfacc


def _sphere_field(sigma: float, color, radius: float = 0.5):
    """Constant density inside a ball at the origin, constant colour (an analytic toy field)."""

    def density(x: torch.Tensor) -> torch.Tensor:
        inside = x.norm(dim=-1) <= radius
        return torch.where(inside, torch.full_like(x[:, 0], sigma), torch.zeros_like(x[:, 0]))

    def field(x: torch.Tensor):
        c = torch.tensor(color, dtype=x.dtype, device=x.device).expand(x.shape[0], 3)
        return density(x), c

    return field, density


def _cuda_cams(size: int = 32):
    cams = orbit_cameras(
        torch.tensor([15.0, -30.0]),
        torch.tensor([20.0, 200.0]),
        torch.tensor([3.0, 2.5]),
        torch.tensor([40.0, 45.0]),
        size,
        size,
    )
    return cams.to("cuda")


@pytest.mark.gpu
def test_nerfacc_matches_dense_torch_sampling_on_a_sphere():
    pytest.importorskip("nerfacc", reason="nerfacc is not installed")
    field, density = _sphere_field(10.0, [0.8, 0.3, 0.2])
    cams = _cuda_cams()
    bg = torch.tensor([0.2, 0.3, 0.4], device="cuda")
    with torch.no_grad():
        dense = render_cameras(field, cams, bg, num_samples=512, bound=1.0, near=0.01)
    grid = NerfaccGrid(resolution=64, bound=1.0, update_every=1, device="cuda")
    assert grid.occupied_fraction == 1.0
    for step in range(4):  # a few jittered updates so cells cut by the surface are caught
        assert grid.maybe_update(step, density)
    assert int(grid.num_updates) == 4 and 0.0 < grid.occupied_fraction < 0.2
    probe = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9]], device="cuda")
    assert grid.query(probe).tolist() == [True, False]
    with torch.no_grad():
        got = render_cameras_nerfacc(
            field, cams, bg, grid, step_size_for(512), bound=1.0, near=0.01, density_fn=density
        )
    rgb_err = (got[0] - dense[0]).abs().mean().item()
    alpha_err = (got[1] - dense[1]).abs().mean().item()
    depth_err = (got[2] - dense[2]).abs().mean().item()
    assert rgb_err < 0.02 and alpha_err < 0.02 and depth_err < 0.05, (rgb_err, alpha_err, depth_err)
    assert dense[1].max() > 0.99 and got[1].max() > 0.99  # the sphere is seen, opaque at centre
    aux = got[3]
    assert aux.weights.shape == aux.t.shape == aux.ray_indices.shape == (aux.num_evaluated,)
    assert aux.num_evaluated < 0.5 * dense[3].num_evaluated  # empty space was skipped


@pytest.mark.gpu
def test_nerfacc_empty_space_gives_background_exactly():
    pytest.importorskip("nerfacc", reason="nerfacc is not installed")
    field, density = _sphere_field(0.0, [1.0, 0.0, 0.0])
    cams = _cuda_cams(16)
    bg = torch.rand(2, 16, 16, 3, device="cuda")
    grid = NerfaccGrid(resolution=16, device="cuda")
    for stage in ("all cells occupied", "after an update: all empty"):
        rgb, alpha, depth, aux = render_cameras_nerfacc(
            field, cams, bg, grid, step_size_for(64), near=0.01, density_fn=density
        )
        assert torch.equal(rgb, bg), stage
        assert torch.equal(alpha, torch.zeros_like(alpha)), stage
        assert torch.equal(depth, torch.zeros_like(depth)), stage
        grid.update(density)
    assert grid.occupied_fraction == 0.0 and aux.num_evaluated == 0


@pytest.mark.gpu
def test_nerfacc_stratified_training_render_and_grid_checkpoint():
    pytest.importorskip("nerfacc", reason="nerfacc is not installed")
    log_sigma = torch.tensor(1.0, device="cuda", requires_grad=True)
    _, ball = _sphere_field(1.0, [0.5, 0.5, 0.5])

    def field(x):
        return ball(x) * log_sigma.exp(), torch.full_like(x, 0.5)

    cams = _cuda_cams(16)
    bg = torch.ones(3, device="cuda")
    grid = NerfaccGrid(resolution=32, update_every=2, device="cuda")
    assert grid.maybe_update(0, lambda x: field(x)[0].detach())
    assert not grid.maybe_update(1, lambda x: field(x)[0].detach())

    def render(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return render_cameras_nerfacc(field, cams, bg, grid, step_size_for(64), generator=gen)

    a, b = render(3), render(3)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)  # same jitter, same image
    a[1].mean().backward()
    assert log_sigma.grad is not None and log_sigma.grad.isfinite() and log_sigma.grad > 0

    restored = NerfaccGrid(resolution=32, update_every=2, device="cuda")
    restored.load_state_dict(grid.state_dict())
    assert torch.equal(restored.estimator.binaries, grid.estimator.binaries)
    assert torch.equal(restored.estimator.occs, grid.estimator.occs)
    assert int(restored.num_updates) == 1
