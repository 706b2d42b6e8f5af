"""The procedural world: geometry against the camera model, prompts, captions, the view cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dreamlab.cameras import evaluation_orbit
from dreamlab.prompts import view_direction_index
from dreamlab.types import orbit_cameras
from dreamlab.world import (
    COLOURS,
    COMPOSITES,
    PRIMITIVES,
    SHAPES,
    VOCABULARY,
    ObjectSpec,
    PromptFormatError,
    UnknownWordError,
    all_object_specs,
    benchmark_prompts,
    colourize,
    front_parts,
    has_front,
    parse_prompt,
    parse_prompt_with_view,
    part_albedos,
    render_ground_truth,
)
from dreamlab.world.dataset import (
    WorldCache,
    WorldDataConfig,
    build_world_cache,
    sample_batch,
    sample_batch_detailed,
)
from dreamlab.world.render import default_light_dir, pixel_directions, render_geometry
from dreamlab.world.sdf import get_object


def _cams(elev, azim, dist=2.4, fov=47.5, res=64):
    elev = torch.tensor(elev, dtype=torch.float32)
    n = elev.shape[0]
    return orbit_cameras(elev, torch.tensor(azim, dtype=torch.float32), torch.full((n,), dist),
                         torch.full((n,), fov), res, res)


def _project(cams, point):
    """Pixel (row, col) of a world point in every camera, by the documented convention."""
    p = torch.tensor(point, dtype=torch.float32)
    rows = []
    for i in range(len(cams)):
        c2w = cams.c2w[i]
        local = c2w[:3, :3].T @ (p - c2w[:3, 3])
        depth = -local[2]
        f = float(cams.focal[i])
        u = cams.width / 2 + f * local[0] / depth
        v = cams.height / 2 - f * local[1] / depth
        rows.append((int(v), int(u)))
    return rows


# ----------------------------------------------------------------------------- geometry


def test_sphere_silhouette_radius_matches_the_camera_model():
    radius = 0.42
    cams = _cams([0.0, 30.0, -10.0], [0.0, 77.0, -150.0], dist=2.3, fov=45.0, res=128)
    gt = render_ground_truth(ObjectSpec("sphere"), cams)
    f = float(cams.focal[0])
    expected = f * radius / math.sqrt(2.3**2 - radius**2)
    for i in range(3):
        measured = math.sqrt(float(gt.mask[i].sum()) / math.pi)
        assert measured == pytest.approx(expected, rel=0.01)
        rows, cols = torch.nonzero(gt.mask[i] > 0, as_tuple=True)
        assert rows.float().mean() + 0.5 == pytest.approx(64.0, abs=0.3)  # centred on the image
        assert cols.float().mean() + 0.5 == pytest.approx(64.0, abs=0.3)


def test_sphere_tracing_is_exact_to_1e_minus_3():
    radius = 0.42
    cams = _cams([20.0], [40.0], res=64)
    geo = render_geometry("sphere", cams)
    dirs = pixel_directions(cams)[0]  # [HW, 3]
    origin = cams.c2w[0, :3, 3]
    b = dirs @ origin
    disc = b * b - (origin @ origin - radius**2)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    forward = -cams.c2w[0, :3, 2]
    depth = (t * (dirs @ forward)).view(64, 64)
    hit = hit.view(64, 64)
    miss_dist = (origin - b[:, None] * dirs).norm(dim=-1).view(64, 64)  # closest approach
    clear = (miss_dist - radius).abs() > 1e-3
    assert torch.equal(geo.hit[0][clear], hit[clear])
    both = geo.hit[0] & hit
    assert both.sum() > 300
    assert (geo.depth[0][both] - depth[both]).abs().max() < 1e-3


def test_cube_faces_have_axis_aligned_normals_and_lambert_shading():
    cams = _cams([25.0], [35.0], res=96)
    gt = render_ground_truth(ObjectSpec("cube", "red"), cams)
    light = default_light_dir()
    for point, axis in (((0.0, 0.0, 0.3), 2), ((0.3, 0.0, 0.0), 0), ((0.0, 0.3, 0.0), 1)):
        (row, col), = _project(cams, point)
        n = gt.normal[0, row, col]
        expected = torch.zeros(3)
        expected[axis] = 1.0
        assert torch.allclose(n, expected, atol=1e-3), (point, n)
        shading = 0.3 + 0.7 * max(0.0, float(light[axis]))
        assert float(gt.shading[0, row, col]) == pytest.approx(shading, abs=1e-3)
        assert torch.allclose(gt.rgb[0, row, col], torch.tensor(COLOURS["red"]) * shading, atol=1e-3)
        assert int(gt.part[0, row, col]) == 0
    assert torch.all(gt.rgb[0, 0, 0] == 1.0) and int(gt.part[0, 0, 0]) == -1  # white background


def test_torus_hole_is_visible_from_above():
    cams = _cams([90.0], [0.0], res=64)
    gt = render_ground_truth(ObjectSpec("torus"), cams)
    assert gt.mask[0, 30:34, 30:34].sum() == 0  # the hole
    for point in ((0.33, 0.14, 0.0), (-0.33, 0.14, 0.0), (0.0, 0.14, 0.33), (0.0, 0.14, -0.33)):
        (row, col), = _project(cams, point)
        assert gt.mask[0, row, col] == 1.0, point


def test_objects_fit_their_bounding_ball_and_the_frame():
    g = torch.linspace(-0.6, 0.6, 61)
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    points = torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=1)
    for shape in SHAPES:
        obj = get_object(shape)
        inside = obj.sdf_points(points) < 0
        assert inside.sum() > 1000, shape
        reach = points[inside].norm(dim=1).max()
        assert reach <= obj.bound_radius <= 0.57, (shape, float(reach))
        centre = (points[inside].min(0).values + points[inside].max(0).values) / 2
        assert centre.abs().max() < 0.12, (shape, centre)  # the carrot nose shifts the snowman


def test_colourize_reproduces_the_render_and_supersampling_averages():
    spec = ObjectSpec("house", "blue")
    cams = evaluation_orbit(16, num_azimuths=2)
    gt = render_ground_truth(spec, cams)
    assert torch.allclose(colourize(gt.shading, gt.part, spec), gt.rgb, atol=1e-6)
    geo = render_geometry("house", cams, supersample=2)
    hi = colourize(geo.shading, geo.part, spec)
    gt2 = render_ground_truth(spec, cams, supersample=2)
    assert torch.allclose(gt2.rgb, hi.view(2, 16, 2, 16, 2, 3).mean((2, 4)), atol=1e-6)
    assert 0 < float(gt2.mask.sum()) and ((gt2.mask > 0) & (gt2.mask < 1)).any()  # coverage


@pytest.mark.parametrize("shape", COMPOSITES)
def test_front_features_visible_from_the_front_only(shape):
    cams = evaluation_orbit(32, num_azimuths=4, elevations_deg=(15.0,))  # azimuths 0, 90, 180, 270
    gt = render_ground_truth(ObjectSpec(shape), cams, supersample=2)
    feature = torch.isin(gt.part, torch.tensor(front_parts(shape))).sum(dim=(1, 2))
    assert feature[0] >= 6, (shape, feature.tolist())
    assert feature[2] == 0, (shape, feature.tolist())


def test_feature_colours_avoid_the_body_colour():
    door = part_albedos(ObjectSpec("house"))[2]
    brown_door = part_albedos(ObjectSpec("house", "brown"))[2]
    assert not torch.equal(door, brown_door)
    assert torch.dist(brown_door, torch.tensor(COLOURS["brown"])) > 0.35
    assert part_albedos(ObjectSpec("cube")).tolist() == [list(COLOURS["grey"])]


# ----------------------------------------------------------------------------- words


def test_catalog_sizes_and_vocabulary():
    assert len(COLOURS) >= 8 and len(PRIMITIVES) >= 8 and len(COMPOSITES) >= 4
    assert {"red", "orange", "yellow", "green", "blue", "purple"} <= set(COLOURS)
    assert {"sphere", "cube", "cylinder", "cone", "torus"} <= set(PRIMITIVES)
    assert all(has_front(s) for s in COMPOSITES) and not any(has_front(s) for s in PRIMITIVES)
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    for prompt in benchmark_prompts():
        parse_prompt(prompt)
        assert all(w in VOCABULARY for w in prompt.replace(",", " , ").split())
    assert len(all_object_specs()) == len(SHAPES) * (len(COLOURS) + 1)


def test_parse_prompt_accepts_the_grammar():
    assert parse_prompt("a red cube") == ObjectSpec("cube", "red")
    assert parse_prompt("  A  Red   CUBE ") == ObjectSpec("cube", "red")
    assert parse_prompt("an orange torus.") == ObjectSpec("torus", "orange")
    assert parse_prompt("a cube") == ObjectSpec("cube", None)
    assert parse_prompt("a snowman") == ObjectSpec("snowman", None)
    assert parse_prompt("a blue house") == ObjectSpec("house", "blue")
    assert parse_prompt("gray mug") == ObjectSpec("mug", "grey")
    assert parse_prompt_with_view("a red cube, front view") == (ObjectSpec("cube", "red"), "front")
    assert parse_prompt_with_view("a head back view") == (ObjectSpec("head", None), "back")
    assert parse_prompt_with_view("a mug,overhead view") == (ObjectSpec("mug", None), "overhead")


def test_parse_prompt_refuses_unknown_words_with_the_vocabulary():
    with pytest.raises(UnknownWordError) as info:
        parse_prompt("a fluffy red dragon")
    message = str(info.value)
    assert "'fluffy'" in message and "'dragon'" in message
    for word in (*COLOURS, *PRIMITIVES, *COMPOSITES, "front", "overhead"):
        assert word in message
    assert "--prior sd21-base" in message and "Stable Diffusion" in message
    for bad in ("a red blue cube", "a cube sphere", "red", "a cube, front", ""):
        with pytest.raises(PromptFormatError):
            parse_prompt(bad)


# ----------------------------------------------------------------------------- data


def _tiny_config(**kw) -> WorldDataConfig:
    base = dict(resolution=8, supersample=1, num_views=48, seed=3)
    base.update(kw)
    return WorldDataConfig(**base)


def _fixed_cache(elevations, azimuths, shape="cube") -> WorldCache:
    n = len(elevations)
    return WorldCache(
        shape_index=torch.full((n,), SHAPES.index(shape)),
        part=torch.zeros(n, 8, 8, dtype=torch.int8),
        shading=torch.full((n, 8, 8), 255, dtype=torch.uint8),
        elevation_deg=torch.tensor(elevations, dtype=torch.float32),
        azimuth_deg=torch.tensor(azimuths, dtype=torch.float32),
        distance=torch.full((n,), 2.4),
        fov_y_deg=torch.full((n,), 47.5),
        light_dir=torch.zeros(n, 3),
        resolution=8,
        supersample=1,
    )


def test_captions_carry_the_view_word_of_their_camera():
    cache = _fixed_cache([10.0, 10.0, 10.0, 10.0, 70.0, 30.0], [0.0, 90.0, 180.0, -100.0, 0.0, 44.0])
    expected = ["front", "side", "back", "side", "overhead", "front"]
    cfg = _tiny_config(view_word_probability=1.0)
    batch = sample_batch_detailed(cache, cfg, 64, torch.Generator().manual_seed(0))
    for cap, row in zip(batch.captions, batch.index.tolist()):
        assert cap.endswith(f", {expected[row]} view"), (cap, row)
    truth = view_direction_index(cache.elevation_deg, cache.azimuth_deg)
    assert torch.equal(batch.view, truth[batch.index])
    _, captions = sample_batch(cache, _tiny_config(view_word_probability=0.0), 32, torch.Generator())
    assert not any("view" in c for c in captions)


def test_objects_with_a_front_name_unusual_views_more_often():
    """fronted_view_word_probability: a house's front views never carry the word at (0, 1), its
    side and back views always do, and a cube keeps view_word_probability."""
    elevations, azimuths = [10.0, 10.0, 10.0, 20.0], [0.0, 90.0, 180.0, -30.0]
    cfg = _tiny_config(view_word_probability=0.0, fronted_view_word_probability=(0.0, 1.0))
    house = sample_batch_detailed(_fixed_cache(elevations, azimuths, "house"), cfg, 64, torch.Generator().manual_seed(0))
    for cap, row in zip(house.captions, house.index.tolist()):
        if azimuths[row] in (0.0, -30.0):
            assert "view" not in cap, cap
        else:
            assert cap.endswith(", side view" if azimuths[row] == 90.0 else ", back view"), cap
    cube = sample_batch(_fixed_cache(elevations, azimuths, "cube"), cfg, 64, torch.Generator().manual_seed(0))[1]
    assert not any("view" in c for c in cube)
    # equal rates are the plain knob: same random draws, same captions
    cache = _fixed_cache(elevations, azimuths, "snowman")
    same = sample_batch(cache, _tiny_config(fronted_view_word_probability=(0.5, 0.5)), 64, torch.Generator().manual_seed(2))
    plain = sample_batch(cache, _tiny_config(fronted_view_word_probability=None), 64, torch.Generator().manual_seed(2))
    assert same[1] == plain[1] and torch.equal(same[0], plain[0])
    assert sum("view" in c for c in plain[1]) not in (0, 64)
    with pytest.raises(ValueError, match="fronted_view_word_probability"):
        _tiny_config(fronted_view_word_probability=(0.3, 1.2)).validate()


def test_cache_is_deterministic_and_round_trips(tmp_path):
    cfg = _tiny_config()
    a = build_world_cache(cfg)
    b = build_world_cache(cfg)
    assert torch.equal(a.part, b.part) and torch.equal(a.shading, b.shading)
    assert torch.equal(a.azimuth_deg, b.azimuth_deg) and torch.equal(a.shape_index, b.shape_index)
    assert a.part.dtype == torch.int8 and a.shading.dtype == torch.uint8
    a.save(tmp_path / "cache.pt")
    c = WorldCache.load(tmp_path / "cache.pt")
    tensors = ("shape_index", "part", "shading", "elevation_deg", "azimuth_deg", "distance",
               "fov_y_deg", "light_dir")
    for name in tensors:
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    c.check_compatible(cfg)
    with pytest.raises(ValueError, match="seed"):
        c.check_compatible(_tiny_config(seed=4))
    with pytest.raises(ValueError, match="another version"):
        dataclasses.replace(c, world="0" * 12).check_compatible(cfg)
    assert cfg.cache_key() == _tiny_config().cache_key() != _tiny_config(seed=4).cache_key()
    assert cfg.cache_key() == _tiny_config(view_word_probability=0.9).cache_key()  # batch-time knob
    x1, c1 = sample_batch(a, cfg, 8, torch.Generator().manual_seed(5))
    x2, c2 = sample_batch(c, cfg, 8, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and c1 == c2
    assert build_world_cache(_tiny_config(seed=4)).azimuth_deg.ne(a.azimuth_deg).any()


def test_batches_match_their_captions():
    cfg = _tiny_config(resolution=16, supersample=2, num_views=60, view_word_probability=0.5)
    cache = build_world_cache(cfg)
    counts = torch.bincount(cache.shape_index, minlength=len(SHAPES))
    assert counts[len(PRIMITIVES):].sum() == round(60 * cfg.composite_fraction)
    batch = sample_batch_detailed(cache, cfg, 48, torch.Generator().manual_seed(1))
    assert batch.images.shape == (48, 3, 16, 16)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert torch.all(batch.images[:, :, 0, 0] == 1.0)  # white background in the corner
    for image, cap, spec in zip(batch.images, batch.captions, batch.specs):
        assert parse_prompt(cap) == spec
        if spec.colour in ("red", "green", "blue") and spec.shape in PRIMITIVES:
            channel = ("red", "green", "blue").index(spec.colour)
            fg = image[:, image.min(0).values < 0.99]
            assert fg.shape[1] > 0 and int(fg.mean(1).argmax()) == channel, cap


def test_front_bias_puts_composite_views_in_the_front_sector():
    cache = build_world_cache(_tiny_config(resolution=4, num_views=400, front_bias=1.0))
    composite = cache.shape_index >= len(PRIMITIVES)
    assert cache.azimuth_deg[composite].abs().max() < 45.0
    assert cache.azimuth_deg[~composite].abs().max() > 90.0
    assert (cache.elevation_deg >= -10).all() and (cache.elevation_deg <= 45).all()
