"""Hash-grid NeRF backend (dreamlab.renderers.nerf): encoding, field, volume rendering, model."""

from __future__ import annotations

import math

import pytest
import torch

from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
from dreamlab.renderers.base import Renderer
from dreamlab.renderers.nerf import NeRFConfig, NeRFRenderer
from dreamlab.renderers.nerf.field import NeRFField, density_blob, trunc_exp
from dreamlab.renderers.nerf.hash_encoding import (
    HashEncoding,
    LevelSchedule,
    growth_factor,
    level_resolutions,
    select_backend,
)
from dreamlab.renderers.nerf.render import (
    OccupancyGrid,
    camera_rays,
    ray_box,
    render_cameras,
    render_rays,
)
from dreamlab.types import orbit_cameras

# ------------------------------------------------------------------ hash encoding


def plain_encoding(enc: HashEncoding, x: torch.Tensor) -> torch.Tensor:
    """The encoding written out literally: per point, per level, per corner, explicit hash."""
    table = enc.table.detach()
    T = 2**enc.log2_hashmap_size
    b = math.exp(
        (math.log(enc.max_resolution) - math.log(enc.base_resolution)) / (enc.num_levels - 1)
    )
    out = torch.zeros(x.shape[0], enc.num_levels * enc.features_per_level, dtype=table.dtype)
    offset = 0
    for level in range(enc.num_levels):
        res = math.floor(enc.base_resolution * b**level + 1e-9)
        side = res + 1
        hashed = side**3 > T
        size = T if hashed else side**3
        for n in range(x.shape[0]):
            p = [min(max(float(v), 0.0), 1.0) * res for v in x[n]]
            lo = [min(math.floor(v), res - 1) for v in p]
            fr = [p[a] - lo[a] for a in range(3)]
            acc = torch.zeros(enc.features_per_level, dtype=table.dtype)
            for dx in (0, 1):
                for dy in (0, 1):
                    for dz in (0, 1):
                        i, j, k = lo[0] + dx, lo[1] + dy, lo[2] + dz
                        if hashed:
                            row = ((i * 1) ^ (j * 2654435761) ^ (k * 805459861)) % T
                        else:
                            row = i + j * side + k * side * side
                        w = (fr[0] if dx else 1 - fr[0]) * (fr[1] if dy else 1 - fr[1])
                        w *= fr[2] if dz else 1 - fr[2]
                        acc += w * table[offset + row]
            out[n, level * enc.features_per_level : (level + 1) * enc.features_per_level] = acc
        offset += size
    return out


def test_resolutions_follow_growth_factor():
    b = growth_factor(16, 16, 2048)
    assert b == pytest.approx(math.exp((math.log(2048) - math.log(16)) / 15))
    res = level_resolutions(16, 16, 2048)
    assert res[0] == 16 and res[-1] == 2048 and res == sorted(res)


def test_encoding_matches_plain_computation():
    g = torch.Generator().manual_seed(1)
    # levels 8..64 with T = 2^12: coarse levels dense, fine ones hashed
    enc = HashEncoding(4, 3, 12, 8, 64, init_scale=1.0, dtype=torch.float64, generator=g)
    assert enc.hashed[0] is False and enc.hashed[-1] is True
    x = torch.rand(40, 3, generator=g, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # the box faces
    x[1] = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x[2] = torch.tensor([-0.2, 1.3, 0.25], dtype=torch.float64)  # clamped
    got = enc(x)
    want = plain_encoding(enc, x)
    assert got.shape == (40, 12)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_encoding_float32_matches_float64():
    g = torch.Generator().manual_seed(2)
    enc = HashEncoding(6, 2, 14, 4, 256, init_scale=1.0, generator=g)
    x = torch.rand(100, 3, generator=g)
    want = plain_encoding(enc, x.double()).float()
    torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


def test_encoding_gradcheck():
    g = torch.Generator().manual_seed(3)
    enc = HashEncoding(3, 2, 6, 2, 9, init_scale=1.0, dtype=torch.float64, generator=g)
    assert any(enc.hashed) and not all(enc.hashed)
    # keep points away from cell faces (the encoding is only piecewise smooth in x)
    x = (0.05 + 0.9 * torch.rand(6, 3, generator=g, dtype=torch.float64)).requires_grad_()
    table = enc.table.detach().clone().requires_grad_()

    def f(xx, tt):
        return _encode_with_table(enc, xx, tt)

    assert torch.autograd.gradcheck(f, (x, table), atol=1e-6)


def _encode_with_table(enc: HashEncoding, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    saved = enc.table
    try:
        del enc._parameters["table"]
        enc.table = table
        return enc(x)
    finally:
        del enc.table
        enc.table = saved


def test_level_mask_zeroes_and_blocks_gradient():
    g = torch.Generator().manual_seed(4)
    enc = HashEncoding(4, 2, 10, 4, 32, init_scale=1.0, generator=g)
    x = torch.rand(20, 3, generator=g)
    full = enc(x, active_levels=4)
    part = enc(x, active_levels=2)
    torch.testing.assert_close(part[:, :4], full[:, :4])
    assert torch.all(part[:, 4:] == 0)
    torch.testing.assert_close(full * enc.level_mask(2), part)
    part.sum().backward()
    grad = enc.table.grad
    assert grad[enc.offsets[2] :].abs().sum() == 0 and grad[: enc.offsets[2]].abs().sum() > 0


def test_level_schedule():
    enc = HashEncoding(8, 2, 10, 4, 64, schedule=LevelSchedule(start=2, every=100))
    assert enc.active_levels == 2
    enc.update_step(250)
    assert enc.active_levels == 4
    enc.update_step(10_000)
    assert enc.active_levels == 8
    assert LevelSchedule(every=0).active_levels(0, 8) == 8


def test_backend_switch_never_touches_tcnn_on_cpu():
    assert select_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError):
        select_backend("tcnn", torch.device("cpu"))
    with pytest.raises(ValueError):
        select_backend("nope", torch.device("cpu"))


# ------------------------------------------------------------------ field


def small_field(**kw) -> NeRFField:
    args = {
        "num_levels": 4,
        "features_per_level": 2,
        "log2_hashmap_size": 12,
        "base_resolution": 4,
        "max_resolution": 32,
        "hidden": 16,
    }
    args.update(kw)
    return NeRFField(**args)


def test_trunc_exp_forward_and_clamped_gradient():
    x = torch.tensor([0.0, 1.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([0.0, 1.0, 15.0])))


def test_density_blob_shapes_initial_density():
    xyz = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.9, 0.0]])
    torch.testing.assert_close(
        density_blob(xyz, "blob_magic3d", 10.0, 0.5), torch.tensor([10.0, 5.0, -8.0])
    )
    torch.testing.assert_close(
        density_blob(xyz, "blob_dreamfusion", 5.0, 0.2)[:2],
        torch.tensor([5.0, 5.0 * math.exp(-0.5 * 0.0625 / 0.04)]),
    )
    field = small_field()
    with torch.no_grad():
        inside, outside = field.density(xyz[:1]), field.density(xyz[2:])
    assert inside.item() > 5.0 and outside.item() < 1e-2  # a soft ball at the origin
    sigma, albedo = field(torch.rand(10, 3) * 2 - 1)
    assert sigma.shape == (10,) and albedo.shape == (10, 3)
    assert (sigma >= 0).all() and ((albedo > 0) & (albedo < 1)).all()


def test_field_init_is_seeded():
    a = small_field(generator=torch.Generator().manual_seed(5))
    b = small_field(generator=torch.Generator().manual_seed(5))
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_normals_point_outwards_of_the_blob():
    field = small_field(blob_scale=10.0, blob_radius=0.5)
    with torch.no_grad():
        for layer in (field.density_mlp[-1],):
            layer.weight.zero_()
            layer.bias.zero_()
    pts = torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.3, 0.0], [0.2, 0.2, 0.2]])
    want = torch.nn.functional.normalize(pts, dim=-1)
    for method in ("analytic", "finite_difference"):
        n = field.normals(pts, method=method)
        torch.testing.assert_close(n, want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ volume rendering


def front_rays(n: int = 16, dtype=torch.float64):
    """Parallel rays from z = 3 along -z, spread over x, y in (-0.9, 0.9)."""
    g = torch.Generator().manual_seed(7)
    xy = (torch.rand(n, 2, generator=g, dtype=dtype) * 2 - 1) * 0.9
    origins = torch.cat([xy, torch.full((n, 1), 3.0, dtype=dtype)], 1)
    dirs = torch.zeros(n, 3, dtype=dtype)
    dirs[:, 2] = -1.0
    return origins, dirs


def constant_field(sigma: float, color, where=None):
    def fn(x):
        inside = torch.ones(x.shape[0], dtype=torch.bool) if where is None else where(x)
        s = torch.where(inside, torch.full_like(x[:, 0], sigma), torch.zeros_like(x[:, 0]))
        c = torch.tensor(color, dtype=x.dtype).expand(x.shape[0], 3)
        return s, c

    return fn


def test_ray_box():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    t0, t1, hit = ray_box(o, d, 1.0)
    assert hit.tolist() == [True, False, True, False]
    torch.testing.assert_close(t0, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(t1, torch.tensor([4.0, 0.0, 1.0, 0.0]))


def test_empty_space_gives_background_exactly():
    o, d = front_rays()
    bg = torch.rand(16, 3, dtype=torch.float64)
    color, acc, dist, _ = render_rays(constant_field(0.0, [1.0, 0.0, 0.0]), o, d, bg, 32)
    assert torch.equal(color, bg) and torch.equal(acc, torch.zeros_like(acc))
    assert torch.equal(dist, torch.zeros_like(dist))


def test_opaque_slab_gives_its_colour_and_depth():
    o, d = front_rays()
    bg = torch.ones(16, 3, dtype=torch.float64)
    slab = constant_field(1e3, [0.2, 0.4, 0.6], where=lambda x: x[:, 2].abs() <= 0.5)
    g = torch.Generator().manual_seed(0)
    color, acc, dist, _ = render_rays(slab, o, d, bg, 64, generator=g)
    torch.testing.assert_close(
        color, torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64).expand(16, 3), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(acc, torch.ones_like(acc), atol=1e-3, rtol=0)
    assert ((dist - 2.5).abs() < 2.0 / 64 + 1e-3).all()  # front face within one interval


def test_homogeneous_medium_matches_beer_lambert():
    o, d = front_rays()
    bg = torch.zeros(16, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    color, acc, _, _ = render_rays(constant_field(0.7, [1.0, 1.0, 1.0]), o, d, bg, 17, generator=g)
    want = 1.0 - math.exp(-0.7 * 2.0)  # chord length 2 through the box
    torch.testing.assert_close(acc, torch.full_like(acc, want), atol=1e-12, rtol=0)
    torch.testing.assert_close(color[:, 0], acc)


def test_occupancy_grid_sampling_matches_dense():
    cube = lambda x: (x.abs() <= 0.5).all(-1)
    field = constant_field(3.0, [0.9, 0.1, 0.3], where=cube)
    grid = OccupancyGrid(resolution=16, update_every=4)
    assert grid.occupied.all()
    assert grid.maybe_update(0, lambda x: field(x)[0], torch.Generator().manual_seed(2))
    assert not grid.maybe_update(1, lambda x: field(x)[0])
    assert grid.occupied_fraction == pytest.approx(8**3 / 16**3)
    cams = orbit_cameras(
        torch.tensor([15.0, -10.0]),
        torch.tensor([30.0, 200.0]),
        torch.tensor([3.0, 3.0]),
        torch.tensor([40.0, 40.0]),
        12,
        10,
    )
    bg = torch.tensor([0.2, 0.3, 0.4])
    dense = render_cameras(field, cams, bg, 48)
    skip = render_cameras(field, cams, bg, 48, grid=grid)
    for a, b in zip(dense[:3], skip[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert skip[3].num_evaluated < 0.5 * dense[3].num_evaluated
    assert dense[1].max() > 0.5  # the cube is visible


def test_camera_rays_follow_the_projection_convention():
    cams = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([60.0]), torch.tensor([2.5]), torch.tensor([50.0]), 8, 6
    )
    o, d, cos = camera_rays(cams)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1, 6, 8))
    # project a point on the ray of pixel (row 1, col 5) back through w2c
    p = o[0, 1, 5] + 1.7 * d[0, 1, 5]
    pc = cams.w2c[0, :3, :3] @ p + cams.w2c[0, :3, 3]
    depth = -pc[2]
    f = cams.focal[0]
    torch.testing.assert_close(
        torch.stack([4 + f * pc[0] / depth, 3 - f * pc[1] / depth]),
        torch.tensor([5.5, 1.5]),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(depth, 1.7 * cos[0, 1, 5], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ renderer


def small_renderer(**kw) -> NeRFRenderer:
    cfg = NeRFConfig(
        num_levels=4,
        log2_hashmap_size=12,
        base_resolution=4,
        max_resolution=32,
        hidden=16,
        num_samples=24,
        grid_resolution=8,
        grid_update_every=2,
        **kw,
    )
    return NeRFRenderer(cfg, generator=torch.Generator().manual_seed(0))


def test_renderer_renders_a_batch_and_backpropagates():
    r = small_renderer(lambda_sparsity=0.1)
    assert isinstance(r, Renderer) and r.size == sum(p.numel() for p in r.parameters())
    cams = sample_orbit_cameras(
        CameraSamplerConfig(batch_size=3), 12, torch.Generator().manual_seed(1)
    )
    opt = torch.optim.Adam([{"params": g.params, "lr": g.lr(0.0)} for g in r.param_groups()])
    out = r.render(cams, torch.tensor([1.0, 1.0, 1.0]))
    assert out.rgb.shape == (3, 12, 12, 3) and out.alpha.shape == out.depth.shape == (3, 12, 12, 1)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1
    # the initial blob is visible in the centre, the corners show the background
    assert out.alpha[:, 6, 6, 0].min() > 0.9 and out.alpha[:, 0, 0, 0].max() < 0.05
    assert (out.depth[:, 6, 6, 0] > 1.5).all() and (out.depth[:, 6, 6, 0] < 2.6).all()
    loss = ((out.rgb - 0.3) ** 2).mean() + r.regularizers(out, 0.0)
    loss.backward()
    for g in r.param_groups():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.params), g.name
    before = r.grid.num_updates.item()
    r.after_backward(out, 0, 0.0, opt)
    opt.step()
    assert r.grid.num_updates.item() == before + 1 and 0 < r.grid.occupied_fraction < 1


def test_renderer_fields_and_checkpoint_round_trip():
    r = small_renderer(level_every=5, level_start=2)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9], [2.0, 0.0, 0.0]])
    d, c = r.density(pts), r.color(pts)
    assert d.shape == (3,) and c.shape == (3, 3) and d[0] > d[1] > d[2] == 0
    cams = sample_orbit_cameras(
        CameraSamplerConfig(batch_size=1), 8, torch.Generator().manual_seed(2)
    )
    out = r.render(cams, torch.zeros(3))
    r.after_backward(out, 9, 0.0, torch.optim.SGD(r.parameters(), lr=0.0))
    assert r.field.encoding.active_levels == 4
    state = r.checkpoint_state()
    r2 = small_renderer()
    r2.load_checkpoint_state(state)
    assert r2.field.encoding.active_levels == 4
    torch.testing.assert_close(r2.grid.density_ema, r.grid.density_ema)
    a, b = r.render(cams, torch.zeros(3)), r2.render(cams, torch.zeros(3))  # stratified: same RNG
    torch.testing.assert_close(a.rgb, b.rgb)
    with torch.no_grad():  # eval renders are deterministic (interval midpoints)
        torch.testing.assert_close(
            r.render(cams, torch.zeros(3)).rgb, r.render(cams, torch.zeros(3)).rgb
        )


def test_render_rays_gradcheck():
    o, d = front_rays(3)
    g = torch.Generator().manual_seed(9)
    sig = (torch.rand(3 * 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    col = torch.rand(3 * 6, 3, generator=g, dtype=torch.float64).requires_grad_()
    bg = torch.rand(3, 3, dtype=torch.float64, generator=g)

    def f(s, c):
        def field(x):  # samples come in ray-major order; rays all hit the box
            return s[: x.shape[0]], c[: x.shape[0]]

        color, acc, dist, _ = render_rays(field, o, d, bg, 6)
        return color, acc, dist

    assert torch.autograd.gradcheck(f, (sig, col))


@pytest.mark.gpu
def test_renderer_on_cuda_matches_cpu():
    r = small_renderer()
    cams = sample_orbit_cameras(
        CameraSamplerConfig(batch_size=2), 16, torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        r.grid.update(r.field.density)
        want = r.render(cams, torch.ones(3))
        r = r.to("cuda")
        got = r.render(cams.to("cuda"), torch.ones(3, device="cuda"))
    torch.testing.assert_close(got.rgb.cpu(), want.rgb, atol=1e-4, rtol=0)
    out = r.render(cams.to("cuda"), torch.ones(3, device="cuda"))
    out.rgb.mean().backward()
    assert r.field.encoding.table.grad.abs().sum() > 0
    assert r.density(torch.zeros(1, 3)).device.type == "cpu"


# ------------------------------------------------------------------ shading, backgrounds, regularisers


def front_camera(size: int = 16):
    one = torch.ones(1)
    return orbit_cameras(0.0 * one, 0.0 * one, 2.4 * one, 45.0 * one, size, size)


def test_lambertian_shading_follows_the_light():
    r = small_renderer(shading="lambertian", light_jitter=0.0, light_distance=(1.0, 1.0))
    cams = front_camera(16)
    front = r.render(cams, torch.ones(3))  # training mode, gradients on: shaded
    assert front.aux.shading.mode == "lambertian"
    torch.testing.assert_close(front.aux.shading.lights, cams.c2w[:, :3, 3])  # at the camera
    with torch.no_grad():
        albedo = r.render(cams, torch.ones(3))  # no gradients: albedo (exports, previews)
    assert albedo.aux.shading.mode == "albedo"
    # lit from behind, the visible side gets the ambient light only
    r._light_positions = lambda c: -c.c2w[:, :3, 3]
    behind = r.render(cams, torch.ones(3))
    a, lit, dark = albedo.rgb[0, 8, 8], front.rgb[0, 8, 8], behind.rgb[0, 8, 8]
    assert (lit > 0.6 * a).all() and (lit <= a + 1e-6).all()
    alpha = float(albedo.alpha[0, 8, 8])
    ambient_only = 0.1 * a * alpha + (1 - alpha)  # albedo * ambient over the white background
    assert (dark < ambient_only + 0.1 * a).all() and (dark < 0.5 * lit).all()
    front.rgb.mean().backward()  # the normals carry gradient back to the field
    assert r.field.encoding.table.grad.abs().sum() > 0


def test_textureless_shading_is_grey_and_random_respects_its_start():
    r = small_renderer(shading="textureless", light_jitter=0.0)
    out = r.render(front_camera(12), torch.ones(3))
    px = out.rgb[0, 6, 6]
    assert float(px.max() - px.min()) < 1e-5  # white albedo: grey, whatever the field's colour
    rand = small_renderer(shading="random", shading_start=0.5, lambertian_probability=1.0)
    rand.begin_step(0, 0.2)
    assert rand.render(front_camera(8), torch.ones(3)).aux.shading.mode == "albedo"
    rand.begin_step(10, 0.8)
    modes = {rand.render(front_camera(8), torch.ones(3)).aux.shading.mode for _ in range(12)}
    assert modes == {"lambertian", "textureless"}


def test_opaque_regulariser_is_the_binary_entropy_of_alpha():
    r = small_renderer(lambda_opaque=0.3)
    out = r.render(front_camera(10), torch.ones(3))
    a = out.alpha.clamp(1e-5, 1 - 1e-5)
    want = 0.3 * (-(a * a.log() + (1 - a) * (1 - a).log())).mean()
    torch.testing.assert_close(r.regularizers(out, 0.0), want)


def test_orientation_loss_penalises_normals_facing_away():
    r = small_renderer(lambda_orientation=1.0)
    out = r.render(front_camera(12), torch.ones(3))
    value = out.aux.shading.orientation
    # the initial blob's normals point outwards, towards the camera on the visible side
    assert 0.0 <= float(value) < 0.05
    # a hollow shell seen from outside: density grows outwards, so normals point inwards
    flipped = small_renderer(lambda_orientation=1.0, density_blob="none")
    with torch.no_grad():
        mlp = flipped.field.density_mlp[-1]
        mlp.weight.zero_(), mlp.bias.zero_()
    flipped.field.blob = "blob_magic3d"
    flipped.field.blob_scale = -10.0  # density rises with the radius
    flipped.field.blob_radius = 0.5
    out2 = flipped.render(front_camera(12), torch.ones(3))
    assert float(out2.aux.shading.orientation) > 10 * float(value) + 0.01
    r.regularizers(out, 0.0).backward()
    assert r.field.encoding.table.grad.abs().sum() > 0


def test_environment_background_while_training_only():
    r = small_renderer(background="mlp")
    assert "background" in [g.name for g in r.param_groups()]
    cams = front_camera(16)
    out = r.render(cams, torch.ones(3))
    corner = out.rgb[0, 0, 0]  # empty corner: the environment's colour, not white
    from dreamlab.renderers.nerf.render import camera_rays

    want = r.environment(camera_rays(cams)[1])[0, 0, 0]
    torch.testing.assert_close(corner, want.clamp(0, 1), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert torch.allclose(r.render(cams, torch.ones(3)).rgb[0, 0, 0], torch.ones(3))
    out.rgb.mean().backward()
    assert all(p.grad is not None for p in r.environment.parameters())


def test_shading_and_regulariser_settings_are_validated():
    for bad in (
        dict(lambda_orientation=-1.0),
        dict(lambertian_probability=1.5),
        dict(light_distance=(2.0, 1.0)),
        dict(normal_eps=0.0),
    ):
        with pytest.raises(ValueError):
            NeRFConfig(**bad).validate()


def test_checkpoint_from_another_backend_is_refused():
    r = small_renderer()
    state = r.checkpoint_state()
    state["encoding_backend"] = "tcnn"
    with pytest.raises(ValueError, match="not interchangeable"):
        small_renderer().load_checkpoint_state(state)
