"""GaussianRenderer: rendering, density / colour fields, densify strategy, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

from dreamlab.renderers.gaussians import (
    DensifyConfig,
    GaussianConfig,
    GaussianRenderer,
    SplatArrays,
    eval_sh,
)
from dreamlab.renderers.gaussians.field import gaussian_field
from dreamlab.renderers.gaussians.model import SH_C0, rgb_to_sh_dc
from dreamlab.renderers.gaussians.rasterize import quat_to_rotmat
from dreamlab.types import orbit_cameras


def cams(n: int = 2, size: int = 32):
    return orbit_cameras(
        torch.linspace(-10.0, 30.0, n), torch.linspace(0.0, 170.0, n), torch.full((n,), 2.5),
        torch.full((n,), 49.0), size, size,
    )  # fmt: skip


def model(num: int = 200, seed: int = 0, **kw) -> GaussianRenderer:
    cfg = GaussianConfig(num_init=num, **kw)
    return GaussianRenderer(cfg, generator=torch.Generator().manual_seed(seed))


def adam_for(r: GaussianRenderer) -> torch.optim.Adam:
    groups = [{"params": g.params, "lr": g.lr(0.0), "name": g.name} for g in r.param_groups()]
    return torch.optim.Adam(groups, eps=1e-15)


def brute_density(r: GaussianRenderer, xyz: torch.Tensor):
    x = xyz.double()
    rot = quat_to_rotmat(r.quats.detach().double())
    s = torch.exp(r.log_scales.detach().double())
    prec = (rot / s[:, None, :] ** 2) @ rot.transpose(1, 2)
    d = x[:, None, :] - r.means.detach().double()[None]
    q = torch.einsum("qni,nij,qnj->qn", d, prec, d)
    o = torch.sigmoid(r.opacity_logits.detach().double())
    w = torch.where(q <= 9.0, o * torch.exp(-0.5 * q), torch.zeros_like(q))
    return w.sum(1), w @ r.base_colors().detach().double()


# ---------------------------------------------------------------------- init and rendering


def test_init_is_seeded_and_inside_the_ball():
    a, b, c = model(seed=1), model(seed=1), model(seed=2)
    assert torch.equal(a.means, b.means) and not torch.equal(a.means, c.means)
    assert a.size == 200 and float(a.means.detach().norm(dim=1).max()) <= 0.5 + 1e-6
    assert torch.allclose(torch.sigmoid(a.opacity_logits), torch.full((200,), 0.1))
    colour = a.base_colors().detach()
    assert float((colour - 0.5).abs().max()) <= 0.05 + 1e-6
    assert a.sh_rest.shape == (200, 0, 3) and a.quats.shape == (200, 4)
    # Initial scales: RMS distance to the 3 nearest neighbours, isotropic.
    assert torch.allclose(a.log_scales[:, 0], a.log_scales[:, 2])
    assert 0.005 < float(torch.exp(a.log_scales.detach()).median()) < 0.2


def test_render_shapes_range_and_aux():
    r = model()
    out = r.render(cams(2, 24), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert out.rgb.shape == (2, 24, 24, 3) and out.alpha.shape == (2, 24, 24, 1)
    assert out.depth.shape == (2, 24, 24, 1)
    rgb = out.rgb.detach()
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    assert float(out.alpha.detach().max()) > 0.3 and out.aux.num_pairs > 0
    out.rgb.mean().backward()
    for p in (r.means, r.quats, r.log_scales, r.opacity_logits, r.sh_dc):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_param_groups_cover_every_trainable_tensor():
    r = model(sh_degree=2)
    names = [g.name for g in r.param_groups()]
    assert names == ["means", "features", "opacity", "scales", "rotations", "sh_rest"]
    ids = {id(p) for g in r.param_groups() for p in g.params}
    assert ids == {id(p) for p in r.parameters()}
    assert [g.name for g in model().param_groups()][-1] == "rotations"  # no sh_rest at degree 0
    lr = r.param_groups()[0].lr
    assert lr(0.0) == pytest.approx(1e-3) and lr(1.0) == pytest.approx(2e-5)


def test_sh_degree_zero_and_higher():
    g = torch.Generator().manual_seed(0)
    dc, rest = torch.randn(5, 3, generator=g), torch.randn(5, 15, 3, generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=-1)
    assert torch.allclose(eval_sh(0, dc, rest[:, :0], dirs), SH_C0 * dc)
    # Degree 1 against the 3DGS formula written out.
    want = SH_C0 * dc - 0.4886025119029199 * (
        dirs[:, 1:2] * rest[:, 0] - dirs[:, 2:3] * rest[:, 1] + dirs[:, 0:1] * rest[:, 2]
    )
    assert torch.allclose(eval_sh(1, dc, rest[:, :3], dirs), want, atol=1e-6)
    r = model(sh_degree=3)
    with torch.no_grad():
        r.sh_rest.normal_(0.0, 0.3, generator=g)
    out = r.render(cams(2, 16), torch.ones(3))
    out.rgb.sum().backward()
    assert r.sh_rest.grad is not None and r.sh_rest.grad.abs().sum() > 0


def test_from_points_and_splat_arrays():
    xyz = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = GaussianRenderer.from_points(xyz, rgb)
    assert torch.allclose(r.base_colors(), rgb, atol=1e-6)
    arrays = r.splat_arrays()
    assert isinstance(arrays, SplatArrays)
    assert arrays.means.shape == (3, 3) and arrays.sh_dc.shape == (3, 3)
    assert arrays.sh_rest.shape == (3, 0, 3) and arrays.opacity_logits.shape == (3,)
    assert arrays.log_scales.shape == (3, 3) and arrays.quats.shape == (3, 4)
    assert arrays.quats[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert arrays.means.dtype.name == "float32"
    assert torch.allclose(torch.from_numpy(arrays.sh_dc), rgb_to_sh_dc(rgb))


# ---------------------------------------------------------------------- density and colour


def test_density_peaks_at_centre_and_vanishes_far_away():
    r = GaussianRenderer.from_points(torch.zeros(1, 3), torch.tensor([[0.2, 0.4, 0.6]]))
    with torch.no_grad():
        r.opacity_logits.fill_(2.0)
        r.log_scales.fill_(math.log(0.05))
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.1, 0.0], [0.5, 0.5, 0.5]])
    d = r.density(pts)
    o = torch.sigmoid(torch.tensor(2.0))
    assert d[0] == pytest.approx(float(o), rel=1e-5)
    assert d[1] == pytest.approx(float(o * math.exp(-0.5)), rel=1e-5)
    assert d[0] > d[1] > d[2] > 0 and d[3] == 0  # 10 sigma away: cut off
    c = r.color(pts)
    assert torch.allclose(c, torch.tensor([0.2, 0.4, 0.6]).expand(4, 3), atol=1e-5)


def test_density_and_color_match_bruteforce_on_grid_and_scattered_points():
    r = model(300, seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        r.quats.copy_(torch.randn(300, 4, generator=g))
        r.log_scales.add_(torch.randn(300, 3, generator=g) * 0.3)
        r.opacity_logits.normal_(generator=g)
        r.sh_dc.normal_(generator=g)
    axis = torch.linspace(-0.55, 0.55, 20, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    scattered = (torch.rand(3000, 3, generator=g, dtype=torch.float64) - 0.5) * 1.1
    for pts in (grid, grid[1000:5000], scattered):  # lattice path, partial lattice, KD-tree path
        want_d, want_c = brute_density(r, pts)
        dens, colsum = gaussian_field(
            pts, r.means, r.quats, r.log_scales, torch.sigmoid(r.opacity_logits), r.base_colors()
        )
        assert torch.allclose(dens, want_d, atol=1e-5), (dens - want_d).abs().max()
        assert torch.allclose(colsum, want_c, atol=1e-5)
    assert r.density(grid.float()).dtype == torch.float32


def test_color_uses_nearest_gaussian_where_no_weight():
    xyz = torch.tensor([[-0.3, 0.0, 0.0], [0.3, 0.0, 0.0]])
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    r = GaussianRenderer.from_points(xyz, rgb, GaussianConfig(init_scale=0.02))
    pts = torch.tensor([[-0.31, 0.0, 0.0], [0.29, 0.01, 0.0], [-0.9, 0.5, 0.0], [0.9, -0.5, 0.0]])
    c = r.color(pts)
    assert r.density(pts[2:]).tolist() == [0.0, 0.0]
    assert torch.allclose(c, torch.cat([rgb, rgb]), atol=1e-5)


def test_density_of_a_large_grid_is_fast_enough():
    import time

    r = model(5000)
    axis = torch.linspace(-0.6, 0.6, 64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    start = time.perf_counter()
    d = r.density(grid)
    assert time.perf_counter() - start < 20.0  # ~0.2 s on 2 idle cores
    assert float(d.max()) > 0.1


# ---------------------------------------------------------------------- densify / prune


def prepared(num: int = 40, **densify) -> tuple[GaussianRenderer, torch.optim.Adam]:
    cfg = GaussianConfig(num_init=num, densify=DensifyConfig(**densify))
    r = GaussianRenderer(cfg, generator=torch.Generator().manual_seed(0))
    opt = adam_for(r)
    out = r.render(cams(1, 16), torch.ones(3))
    out.rgb.mean().backward()
    opt.step()  # creates Adam state rows
    opt.zero_grad()
    return r, opt


def test_densify_clone_split_prune_counts_and_optimizer_rows():
    r, opt = prepared(40, grad_threshold=0.5, clone_max_scale=0.05, min_opacity=0.05)
    with torch.no_grad():
        r.log_scales[:10] = math.log(0.02)  # small -> clone
        r.log_scales[10:20] = math.log(0.1)  # big -> split
        r.log_scales[20:] = math.log(0.02)
        r.opacity_logits[30:35] = -6.0  # ~0.0025 -> prune
    s = r.strategy
    s.grad_accum[:20] = 2.0
    s.count[:20] = 2.0  # mean 1.0 >= 0.5
    s.count[20:] = 1.0  # mean 0
    s.grad_accum[30:35] = 5.0  # would densify, but pruning wins
    s.count[30:35] = 1.0
    old_means = r.means.detach().clone()
    old_avg = opt.state[r.means]["exp_avg"].clone()
    report = s.densify_and_prune(r, opt, step=99)
    assert (report.cloned, report.split, report.pruned) == (10, 10, 5)
    assert r.size == 40 - 5 - 10 + 10 + 20 == report.after
    kept = [i for i in range(40) if not (10 <= i < 20 or 30 <= i < 35)]
    assert torch.equal(r.means[: len(kept)], old_means[kept])
    assert torch.equal(r.means[len(kept) : len(kept) + 10], old_means[:10])  # clones
    children = r.log_scales[len(kept) + 10 :]
    assert torch.allclose(children, torch.full_like(children, math.log(0.1 / 1.6)))
    # Optimiser rows follow the Gaussians; new rows start with zero moments.
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for g in r.param_groups() for p in g.params}
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state[p]
            assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
    st = opt.state[r.means]
    assert torch.equal(st["exp_avg"][: len(kept)], old_avg[kept])
    assert torch.all(st["exp_avg"][len(kept) :] == 0)
    assert r.strategy.grad_accum.shape == (r.size,) and torch.all(r.strategy.count == 0)
    # The trainer's next steps run on the new tensors.
    out = r.render(cams(1, 16), torch.ones(3))
    out.rgb.mean().backward()
    opt.step()
    assert torch.isfinite(r.means).all()


def test_densify_respects_max_gaussians_and_is_deterministic():
    results = []
    for _ in range(2):
        r, opt = prepared(40, grad_threshold=0.5, clone_max_scale=0.0, max_gaussians=45)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            r.log_scales.fill_(math.log(0.05))
        r.strategy.grad_accum.copy_(torch.rand(40, generator=g) + 0.5)
        r.strategy.count.fill_(1.0)
        report = r.strategy.densify_and_prune(r, opt, step=7)
        assert report.split == 5 and r.size == 45
        results.append(r.means.detach().clone())
    assert torch.equal(results[0], results[1])


def test_after_backward_densifies_on_schedule():
    r, opt = prepared(40, start=0.0, stop=1.0, every=3, grad_threshold=0.0, max_gaussians=60)
    sizes = []
    for step in range(6):
        opt.zero_grad()
        out = r.render(cams(1, 16), torch.ones(3))
        (out.rgb.mean() + 1e-3 * out.alpha.mean()).backward()
        r.after_backward(out, step, step / 5, opt)
        opt.step()
        sizes.append(r.size)
    assert sizes[:2] == [40, 40] and sizes[2] > 40 and sizes[-1] <= 60
    assert r.last_densify is not None or sizes[5] == sizes[4]


def test_disabled_or_outside_window_does_nothing():
    r, opt = prepared(20, enabled=False, every=1, grad_threshold=0.0)
    out = r.render(cams(1, 16), torch.ones(3))
    out.rgb.mean().backward()
    r.after_backward(out, 0, 0.5, opt)
    assert r.size == 20 and r.last_densify is None


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_parameters_and_strategy():
    r, opt = prepared(30, grad_threshold=0.0, start=0.0, every=1, max_gaussians=50)
    out = r.render(cams(1, 16), torch.ones(3))
    out.rgb.mean().backward()
    r.after_backward(out, 0, 0.5, opt)  # densifies: size changes
    out = r.render(cams(1, 16), torch.ones(3))
    out.rgb.mean().backward()
    r.strategy.accumulate(out.aux, 16, 16)
    state = r.checkpoint_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = model(7, seed=9, densify=DensifyConfig(grad_threshold=0.0, start=0.0, every=1))
    fresh.load_checkpoint_state(loaded)
    assert fresh.size == r.size != 30
    for name, p in r.gaussian_params().items():
        assert torch.equal(getattr(fresh, name), p), name
    for key, value in r.strategy.state_dict().items():
        assert torch.equal(fresh.strategy.state_dict()[key], value), key
    assert torch.equal(
        fresh.render(cams(1, 16), torch.ones(3)).rgb, r.render(cams(1, 16), torch.ones(3)).rgb
    )
    with pytest.raises(ValueError):
        model(5, sh_degree=1).load_checkpoint_state(loaded)
