"""Benchmarks: the DDIM sampler, the metric functions on hand-made cases, and both benches end to
end on a one-prompt subset with tiny settings (random-weight builtin prior, CPU, seconds)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from dreamlab.bench.metrics import (
    PSNR_CAP_DB,
    delta_e,
    feature_projection,
    foreground_colour_error,
    janus_scores,
    masked_psnr,
    mean_texture_colour,
    mesh_topology,
    nearest_reference,
    silhouette_iou,
    srgb_to_lab,
)
from dreamlab.priors.base import Prior
from dreamlab.priors.sampling import ddim_sample, is_pixel_prior

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These workloads are tiny: one intra-op thread is as fast, and on a shared 2-core machine
    it avoids OpenMP oversubscription (measured: 12 s instead of minutes under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_builtin(seed: int = 0):
    from dreamlab.priors.builtin import BuiltinPrior, BuiltinPriorConfig

    cfg = BuiltinPriorConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, text_width=32)
    return BuiltinPrior.random_init(seed, cfg)


@pytest.fixture(scope="module")
def tiny_prior():
    return _tiny_builtin()


class StubPixelPrior(Prior):
    """A 3-channel prior whose ε̂ is a fixed function of (x_t, t, embeds): tests the sampler's
    CFG arithmetic without any network."""

    def __init__(self) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.image_size, self.latent_channels = 8, 3
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.seen_embeds: list[torch.Tensor] = []

    def encode_prompt(self, texts):
        return torch.stack([torch.full((2, 4), float(len(t))) for t in texts])

    def encode_images(self, rgb):
        return rgb * 2 - 1

    def decode_latents(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)

    def predict_eps(self, x_t, t, embeds):
        self.seen_embeds.append(embeds)
        return 0.3 * x_t + 0.01 * embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- sampler


def test_ddim_sample_shape_range_and_determinism(tiny_prior):
    prompts = ["a red cube", "a snowman, back view"]
    run = lambda seed, **kw: ddim_sample(
        tiny_prior, prompts, torch.Generator().manual_seed(seed), num_steps=4, **kw
    )
    a = run(0)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    stochastic = run(0, eta=1.0)
    assert torch.equal(stochastic, run(0, eta=1.0)) and not torch.equal(stochastic, a)
    assert is_pixel_prior(tiny_prior)


def test_ddim_cfg_convention():
    prior = StubPixelPrior()
    gen = lambda: torch.Generator().manual_seed(3)
    base = ddim_sample(prior, ["ab"], gen(), num_steps=3, guidance_scale=1.0, negative_prompt="")
    # s = 1 is the conditional prediction alone: the negative prompt cannot matter.
    other_negative = ddim_sample(
        prior, ["ab"], gen(), num_steps=3, guidance_scale=1.0, negative_prompt="xyz"
    )
    assert torch.allclose(base, other_negative, atol=1e-6)
    # s = 0 is the "unconditional" (negative) prediction alone: the prompt cannot matter.
    u1 = ddim_sample(prior, ["ab"], gen(), num_steps=3, guidance_scale=0.0)
    u2 = ddim_sample(prior, ["abcdefgh"], gen(), num_steps=3, guidance_scale=0.0)
    assert torch.allclose(u1, u2, atol=1e-6)
    # Each step makes one batched call: negative half first, then the prompts.
    prior.seen_embeds.clear()
    ddim_sample(prior, ["ab", "abc"], gen(), num_steps=2, negative_prompt="n")
    assert len(prior.seen_embeds) == 2 and prior.seen_embeds[0][:, 0, 0].tolist() == [
        1.0,
        1.0,
        2.0,
        3.0,
    ]


def test_ddim_early_stop_returns_the_clipped_x0_prediction():
    """stop_at_t at or above the first timestep: one step, returning x̂0 = (x − √(1−ᾱ) ε) / √ᾱ."""
    prior = StubPixelPrior()
    generator = torch.Generator().manual_seed(5)
    out = ddim_sample(prior, ["ab"], generator, num_steps=4, guidance_scale=1.0, stop_at_t=1000)
    assert len(prior.seen_embeds) == 1  # one UNet call, then stop
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    t = 750  # DDIM's first of 4 timesteps over 1000 ("leading" spacing)
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    eps = prior.predict_eps(x, torch.tensor([t]), prior.encode_prompt(["ab"]))
    x0 = ((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)
    assert torch.allclose(out, prior.decode_latents(x0), atol=1e-6)
    # stop_at_t=0 runs all 4 steps
    prior.seen_embeds.clear()
    ddim_sample(prior, ["ab"], torch.Generator().manual_seed(5), num_steps=4, stop_at_t=0)
    assert len(prior.seen_embeds) == 4


def test_ddim_view_guidance_adds_w_times_prompt_minus_base():
    """ε̂ = ε_∅ + s(ε_y − ε_∅) + w(ε_y − ε_base), checked on one DDIM step's x̂0 (no clipping:
    the stub's x̂0 stays inside [−1, 1] only by luck, so compare before the clamp)."""
    prior = StubPixelPrior()
    s, w, t = 1.25, 3.0, 750
    out = ddim_sample(
        prior,
        ["abcd"],
        torch.Generator().manual_seed(2),
        num_steps=4,
        guidance_scale=s,
        clip_x0=False,
        stop_at_t=1000,
        base_prompts=["ab"],
        view_guidance_scale=w,
    )
    assert len(prior.seen_embeds) == 1 and prior.seen_embeds[0].shape[0] == 3  # ∅, y, base
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    tt = torch.tensor([t])
    e_u, e_y, e_b = (prior.predict_eps(x, tt, prior.encode_prompt([p])) for p in ("", "abcd", "ab"))
    eps = e_u + s * (e_y - e_u) + w * (e_y - e_b)
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    assert torch.allclose(out, prior.decode_latents(x0), atol=1e-6)
    # a base equal to the prompt changes nothing; w = 0 runs two branches only
    gen = lambda: torch.Generator().manual_seed(4)
    plain = ddim_sample(prior, ["abc"], gen(), num_steps=3)
    same = ddim_sample(
        prior, ["abc"], gen(), num_steps=3, base_prompts=["abc"], view_guidance_scale=2.0
    )
    assert torch.allclose(plain, same, atol=1e-6)
    prior.seen_embeds.clear()
    ddim_sample(prior, ["abc"], gen(), num_steps=2, base_prompts=["a"], view_guidance_scale=0.0)
    assert all(e.shape[0] == 2 for e in prior.seen_embeds)
    with pytest.raises(ValueError, match="base prompt"):
        ddim_sample(prior, ["abc"], gen(), num_steps=2, view_guidance_scale=1.0)
    with pytest.raises(ValueError, match="view_guidance_scale"):
        ddim_sample(prior, ["abc"], gen(), base_prompts=["a"], view_guidance_scale=-1.0)


def test_ddim_other_view_negation_subtracts_u_times_mean_other_minus_base():
    """ε̂ = ε_∅ + s(ε_y − ε_∅) + w(ε_y − ε_base) − u·mean_k(ε_other_k − ε_base), on one step's
    x̂0 for a batch of two prompts (each with its own two other-view prompts)."""
    prior = StubPixelPrior()
    s, w, u, t = 1.25, 2.0, 1.5, 750
    prompts, bases = ["abcd", "abcde"], ["ab", "abc"]
    others = [["abcdef", "a"], ["abcdefg", "abcdefgh"]]
    out = ddim_sample(
        prior,
        prompts,
        torch.Generator().manual_seed(2),
        num_steps=4,
        guidance_scale=s,
        clip_x0=False,
        stop_at_t=1000,
        base_prompts=bases,
        view_guidance_scale=w,
        other_view_prompts=others,
        other_view_scale=u,
    )
    assert len(prior.seen_embeds) == 1 and prior.seen_embeds[0].shape[0] == 2 * 5  # ∅, y, base, 2 others
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    for b in range(2):
        xb, tt = x[b : b + 1], torch.tensor([t])
        e = {p: prior.predict_eps(xb, tt, prior.encode_prompt([p])) for p in ["", prompts[b], bases[b], *others[b]]}
        e_u, e_y, e_b = e[""], e[prompts[b]], e[bases[b]]
        negation = ((e[others[b][0]] - e_b) + (e[others[b][1]] - e_b)) / 2
        eps = e_u + s * (e_y - e_u) + w * (e_y - e_b) - u * negation
        x0 = (xb - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        assert torch.allclose(out[b : b + 1], prior.decode_latents(x0), atol=1e-6)
    # other views equal to the base change nothing
    gen = lambda: torch.Generator().manual_seed(4)
    plain = ddim_sample(prior, ["abc"], gen(), num_steps=3)
    same = ddim_sample(
        prior, ["abc"], gen(), num_steps=3, base_prompts=["ab"], other_view_prompts=[["ab", "ab"]], other_view_scale=2.0
    )
    assert torch.allclose(plain, same, atol=1e-6)
    with pytest.raises(ValueError, match="base prompt"):
        ddim_sample(prior, ["abc"], gen(), other_view_prompts=[["a"]], other_view_scale=1.0)
    with pytest.raises(ValueError, match="other-view prompts"):
        ddim_sample(prior, ["abc"], gen(), base_prompts=["a"], other_view_scale=1.0)
    with pytest.raises(ValueError, match="same number"):
        ddim_sample(prior, ["abc", "ab"], gen(), base_prompts=["a", "a"], other_view_prompts=[["a"], []], other_view_scale=1.0)
    with pytest.raises(ValueError, match="other_view_scale"):
        ddim_sample(prior, ["abc"], gen(), base_prompts=["a"], other_view_prompts=[["a"]], other_view_scale=-1.0)


def test_ddim_refuses_bad_arguments(tiny_prior):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError):
        ddim_sample(tiny_prior, "a red cube", gen)
    for kwargs in ({"num_steps": 0}, {"guidance_scale": -1.0}, {"eta": 2.0}, {"stop_at_t": -1}):
        with pytest.raises(ValueError):
            ddim_sample(tiny_prior, ["a red cube"], gen, **kwargs)


# ----------------------------------------------------------------------------- image metrics


def test_iou_cases():
    a = torch.zeros(3, 8, 8)
    a[:, 2:6, 2:6] = 1.0
    b = torch.zeros(3, 8, 8)
    b[:, 6:, 6:] = 1.0
    assert silhouette_iou(a, a).tolist() == [1.0, 1.0, 1.0]
    assert silhouette_iou(a, b).tolist() == [0.0, 0.0, 0.0]
    assert silhouette_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0
    half = torch.zeros(1, 8, 8)
    half[:, 2:6, 2:4] = 0.9  # alpha in [B, H, W, 1] layout works too
    assert silhouette_iou(half[..., None], a[:1]).item() == pytest.approx(0.5)


def test_psnr_cases():
    rgb = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, 8)
    assert masked_psnr(rgb, rgb, mask, mask).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    off = (rgb + 0.1).clamp(0, 1)
    ref = rgb.clone()
    ref[..., :] = 0.5
    shifted = ref + 0.1  # MSE 0.01 everywhere -> 20 dB
    assert masked_psnr(shifted, ref, mask, mask)[0].item() == pytest.approx(20.0, abs=1e-4)
    # Only the union of the masks counts: errors outside it are ignored.
    small = torch.zeros(2, 8, 8)
    small[:, :2, :2] = 1.0
    noisy = shifted.clone()
    noisy[:, 4:, 4:] = 0.0
    assert masked_psnr(noisy, ref, small, small)[0].item() == pytest.approx(20.0, abs=1e-4)
    assert torch.isfinite(masked_psnr(off, rgb, mask, mask)).all()


def test_colour_metrics():
    white = srgb_to_lab(torch.ones(3))
    assert white.tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    red, green = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    assert delta_e(red, red).item() == 0.0 and delta_e(red, green).item() > 100
    rgb = torch.zeros(1, 4, 4, 3)
    rgb[..., 0] = 1.0
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1.0
    assert foreground_colour_error(rgb, rgb, mask, mask).item() == 0.0
    other = rgb.clone()
    other[:, 2:] = 0.0  # differs only outside the overlap
    assert foreground_colour_error(other, rgb, mask, mask).item() == 0.0
    assert math.isnan(foreground_colour_error(rgb, rgb, mask, torch.zeros(1, 4, 4)).item())


def test_feature_projection_is_zero_at_truth_and_one_at_alternative():
    g = torch.Generator().manual_seed(0)
    truth, alt = torch.rand(6, 6, 3, generator=g), torch.rand(6, 6, 3, generator=g)
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[1:4, 2:5] = True
    assert feature_projection(truth, truth, alt, region) == pytest.approx(0.0)
    assert feature_projection(alt, truth, alt, region) == pytest.approx(1.0)
    assert feature_projection(0.5 * (truth + alt), truth, alt, region) == pytest.approx(0.5)
    assert math.isnan(feature_projection(alt, truth, truth, region))


def test_nearest_reference_finds_the_copy():
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(5, 3, 8, 8, generator=g)
    samples = refs[[3, 1]] + 0.01 * torch.rand(2, 3, 8, 8, generator=g)
    index, dist = nearest_reference(samples, refs)
    assert index.tolist() == [3, 1] and (dist < 1e-3).all()
    allowed = torch.ones(2, 5, dtype=torch.bool)
    allowed[0, 3] = False
    index, _ = nearest_reference(samples, refs, candidates=allowed)
    assert index[0] != 3 and index[1] == 1


# ----------------------------------------------------------------------------- mesh metrics


def test_mesh_topology_counts_holes():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=2)
    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.3)
    assert mesh_topology(sphere.vertices, sphere.faces) == (1, 2, 0.0)
    assert mesh_topology(torus.vertices, torus.faces) == (1, 0, 1.0)
    two = trimesh.util.concatenate([sphere, sphere.copy().apply_translation([3, 0, 0])])
    assert mesh_topology(two.vertices, two.faces) == (2, 4, 0.0)
    # UV seams duplicate vertices: merged before counting.
    split = sphere.faces.copy()
    verts = np.concatenate([sphere.vertices, sphere.vertices[split[:5].ravel()]])
    split[:5] = len(sphere.vertices) + np.arange(15).reshape(5, 3)
    assert mesh_topology(verts, split)[2] == 0.0


def test_mean_texture_colour_weights_by_area():
    texture = np.zeros((4, 4, 3), dtype=np.uint8)
    texture[:, :2] = (255, 0, 0)  # left half red, right half black
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [3, 0, 0], [0, 3, 0]], float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    uvs = np.array([[0.1, 0.1]] * 3 + [[0.9, 0.9]] * 3)  # small face red, big face (9x) black
    rgb = mean_texture_colour(uvs, faces, vertices, texture)
    assert rgb.tolist() == pytest.approx([0.1, 0.0, 0.0])


@pytest.mark.parametrize("shape", ["torus", "mug", "capsule"])
def test_expected_genus_matches_the_world(shape):
    """The genus table the quality bench checks against is the topology of the world's SDF."""
    from dreamlab.bench.quality import expected_genus
    from dreamlab.export import MeshExportConfig, extract_mesh
    from dreamlab.world.sdf import get_object

    obj = get_object(shape)
    cfg = MeshExportConfig(
        resolution=64,
        threshold=0.5,
        solidify=False,  # the exact SDF's own topology, not the export's clean-up
        min_component_fraction=0.0,
        min_component_volume_fraction=0.0,
        faces=10**6,
        tighten_bbox=False,
        bbox_min=(-0.75,) * 3,
        bbox_max=(0.75,) * 3,
    )
    extracted = extract_mesh(lambda p: torch.sigmoid(-obj.sdf_points(p) / 0.01), None, cfg)
    _, _, genus = mesh_topology(extracted.mesh.vertices, extracted.mesh.faces)
    assert genus == expected_genus(shape)


# ----------------------------------------------------------------------------- world-based metrics


@pytest.fixture(scope="module")
def snowman_truth():
    from dreamlab.bench.quality import evaluation_cameras, render_truth
    from dreamlab.world.catalog import ObjectSpec

    cams = evaluation_cameras(32)
    return cams, render_truth(ObjectSpec("snowman"), cams)


def _views_at(cams, azimuth: float) -> list[int]:
    """For each camera, the index of the camera at ``azimuth`` and the same elevation."""
    out = []
    for e in cams.elevation_deg.tolist():
        (k,) = [
            i
            for i, (a, e2) in enumerate(zip(cams.azimuth_deg.tolist(), cams.elevation_deg.tolist()))
            if abs(((a - azimuth + 180) % 360) - 180) < 1e-3 and e2 == e
        ]
        out.append(k)
    return out


def test_janus_score_on_ground_truth_renders(snowman_truth):
    from dreamlab.bench.quality import front_feature_mask

    cams, gt = snowman_truth
    feature = front_feature_mask(gt, "snowman")
    az, el = cams.azimuth_deg, cams.elevation_deg
    janus, front = janus_scores(gt.rgb, gt.rgb, feature, az, el)  # a perfect reproduction
    assert janus == pytest.approx(0.0, abs=1e-6) and front == pytest.approx(1.0)
    face_everywhere = gt.rgb[_views_at(cams, 0.0)]  # every camera sees the front render
    janus, front = janus_scores(face_everywhere, gt.rgb, feature, az, el)
    assert janus == pytest.approx(1.0) and front == pytest.approx(1.0)
    no_face = gt.rgb[_views_at(cams, 180.0)]  # every camera sees the back: no front features
    janus, front = janus_scores(no_face, gt.rgb, feature, az, el)
    assert front == pytest.approx(0.0) and janus < 0.3


class FixedRenders(torch.nn.Module):
    """A fake renderer that returns given images (ground-truth renders) for the cameras."""

    def __init__(self, rgb, mask):
        super().__init__()
        self.rgb, self.mask = rgb, mask

    def render(self, cams, background):
        from dreamlab.types import RenderOutput

        assert len(cams) == self.rgb.shape[0]
        return RenderOutput(
            rgb=self.rgb, alpha=self.mask[..., None], depth=torch.zeros_like(self.mask[..., None])
        )


def test_evaluate_renderer_on_a_perfect_and_a_janus_result(snowman_truth):
    from dreamlab.bench.quality import evaluate_renderer
    from dreamlab.world.catalog import ObjectSpec

    cams, gt = snowman_truth
    perfect = evaluate_renderer(FixedRenders(gt.rgb, gt.mask), ObjectSpec("snowman"), 32, gt=gt)
    assert perfect.iou == 1.0 and perfect.psnr == PSNR_CAP_DB and perfect.colour_error == 0.0
    assert perfect.janus == pytest.approx(0.0, abs=1e-6) and perfect.front_feature == pytest.approx(
        1.0
    )
    front = _views_at(cams, 0.0)
    janus = evaluate_renderer(
        FixedRenders(gt.rgb[front], gt.mask[front]), ObjectSpec("snowman"), 32, gt=gt
    )
    assert janus.janus == pytest.approx(1.0) and janus.iou < 1.0
    assert evaluate_renderer(FixedRenders(gt.rgb, gt.mask), ObjectSpec("cube", "red"), 32).iou < 0.9


SMALL_RING = {
    "reference_azimuths": 8,
    "reference_elevations": (0.0, 30.0),
    "reference_distances": (2.4,),
}
"""A coarser reference ring than the default, to keep the tests fast."""


def _small_refs():
    from dreamlab.bench.prior_quality import reference_set

    return reference_set(32, 16, (15.0,), (2.4,))


def test_reference_set_equals_ground_truth_renders():
    from dreamlab.bench.prior_quality import REFERENCE_LIGHTS, reference_cameras
    from dreamlab.world.catalog import ObjectSpec
    from dreamlab.world.render import camera_relative_light, render_ground_truth

    refs = _small_refs()
    spec = ObjectSpec("house", "blue")
    k = refs.specs.index(spec)
    assert refs.canonical[k] == k
    mine = refs.images[refs.spec_index == k].float() / 255.0  # [cameras × lights, 3, S, S]
    ring = reference_cameras(32, 16, (15.0,), (2.4,))
    lights = len(REFERENCE_LIGHTS)
    assert len(mine) == len(ring) * lights
    # every ring camera under every reference light (light fastest): the exact renderer's image
    for j, (light_az, light_el) in enumerate(REFERENCE_LIGHTS):
        light = camera_relative_light(ring, light_az, light_el)
        truth = render_ground_truth(spec, ring, light, supersample=2).rgb.permute(0, 3, 1, 2)
        assert torch.allclose(mine[j::lights], truth, atol=0.5 / 255 + 1e-6)
    # "a cube" and "a grey cube" (and "a snowman" and "a white snowman") are one object.
    for alias, first in (
        (ObjectSpec("cube", "grey"), ObjectSpec("cube")),
        (ObjectSpec("snowman", "white"), ObjectSpec("snowman")),
    ):
        assert refs.canonical[refs.specs.index(alias)] == refs.specs.index(first)
    assert refs.num_objects == len(refs.features) // (len(ring) * lights) == 122


def test_reference_view_wedges_match_the_caption_rule():
    """A reference's view is the prompt code's wedge for its azimuth; boundaries belong to none."""
    from dreamlab.bench.prior_quality import reference_view
    from dreamlab.prompts import VIEW_NAMES, view_direction_index

    for azimuth in (0.0, 22.5, -30.0, 67.5, 90.0, -112.5, 157.5, 180.0, -157.5, 200.0):
        index = view_direction_index(torch.tensor([0.0]), torch.tensor([azimuth]))
        assert reference_view(azimuth) == VIEW_NAMES[int(index)]
    for boundary in (45.0, -45.0, 135.0, -135.0, 225.0):
        assert reference_view(boundary) is None


def test_ground_truth_renders_score_near_the_ceiling():
    """The scoring itself works: ground truth from random training cameras is mostly 'right'."""
    from dreamlab.bench.prior_quality import conditions_for, score_images, truth_samples

    refs = _small_refs()
    right = views = 0
    conditions = conditions_for(["a red cube", "a blue sphere", "a snowman"])
    for cond in conditions:
        scores = score_images(truth_samples(cond, 8, 32, seed=0), cond, refs)
        right += sum(s.right for s in scores)
        views += sum(bool(s.view_right) for s in scores)
    assert right >= 0.75 * 8 * len(conditions) and views >= 0.75 * 8 * 3


def test_right_among_prompts_only_competes_with_the_benchmark_prompts_objects():
    """A grey head asked as "a head": wrong against the whole world (the grey head is its own
    object), right when only the benchmark prompts' objects compete (the issue's definition);
    never less often right than the world-wide test."""
    from dreamlab.bench.prior_quality import conditions_for, score_images, truth_samples
    from dreamlab.world.catalog import parse_prompt

    refs = _small_refs()
    asked = conditions_for(["a head"], views=("front",))[0]
    grey = conditions_for(["a grey head"], views=("front",))[0]
    prompts = [refs.canonical[refs.specs.index(parse_prompt(p))] for p in ("a head", "a red cube")]
    scores = score_images(truth_samples(grey, 8, 32, seed=0), asked, refs, prompts)
    assert sum(s.right for s in scores) <= 2
    assert all(s.right_among_prompts for s in scores)
    for cond in conditions_for(["a snowman", "a yellow cone"]):
        for s in score_images(truth_samples(cond, 8, 32, seed=1), cond, refs, prompts):
            assert s.right_among_prompts or not s.right
    # without prompt objects the asked object competes alone
    assert all(
        s.right_among_prompts for s in score_images(truth_samples(grey, 2, 32, 0), asked, refs)
    )


# ----------------------------------------------------------------------------- benches end to end


def test_prior_bench_writes_table_csv_and_picture(tiny_prior, tmp_path):
    from dreamlab.bench.prior_quality import run_prior_bench

    kw = {"samples_per": 2, "steps": 4, **SMALL_RING}
    result = run_prior_bench(tiny_prior, ["a snowman"], out_dir=tmp_path, **kw)
    assert [(r.prompt, r.view) for r in result.rows] == [
        ("a snowman", v) for v in ("front", "side", "back")
    ]
    assert len(result.samples) == 6 and result.images.shape == (6, 3, 32, 32)
    assert 0.0 <= result.accuracy <= 1.0 and result.view_accuracy is not None
    assert result.ceiling_accuracy is not None and result.ceiling_accuracy > 0.5
    # one prompt: only its own object competes "among the prompts"
    assert result.accuracy_among_prompts == 1.0 and result.ceiling_accuracy_among_prompts == 1.0
    text = result.markdown.read_text()
    assert "right among prompts" in text
    assert "a snowman" in text and "**all**" in text
    with result.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["text"] == "a snowman, front view"
    assert result.png.stat().st_size > 1000
    again = run_prior_bench(tiny_prior, ["a snowman"], out_dir=tmp_path / "again", **kw)
    assert torch.equal(again.images, result.images)
    assert [s.score for s in again.samples] == [s.score for s in result.samples]


def test_quality_bench_writes_table_csv_and_picture(tmp_path):
    from dreamlab.bench.quality import run_quality_bench
    from dreamlab.export import ExportConfig, MeshExportConfig, TextureConfig

    folder = tmp_path / "prior"
    _tiny_builtin(1).save(folder)
    small = ExportConfig(
        mesh=MeshExportConfig(resolution=32, coarse_resolution=16), texture=TextureConfig(size=64)
    )
    result = run_quality_bench(
        ["a snowman"],
        steps=5,
        prior=str(folder),
        out_dir=tmp_path / "q",
        eval_resolution=32,
        export_cfg=small,
    )
    (row,) = result.rows
    assert row.steps == 5 and 0.0 <= row.iou <= 1.0 and row.janus is not None
    assert row.mesh is not None and row.mesh.seconds > 0 and row.mesh.expected_genus == 0
    text = result.markdown.read_text()
    assert "a snowman" in text and "**mean**" in text
    with result.csv.open() as handle:
        assert len(list(csv.DictReader(handle))) == 1
    assert result.png.stat().st_size > 1000
    again = run_quality_bench(
        ["a snowman"],
        steps=5,
        prior=str(folder),
        out_dir=tmp_path / "q2",
        eval_resolution=32,
        export_mesh=False,
    )
    (row2,) = again.rows
    assert (row2.iou, row2.psnr, row2.janus) == (row.iou, row.psnr, row.janus) and row2.mesh is None


# ----------------------------------------------------------------------------- command line


def test_cli_refuses_unknown_words_before_loading_anything(tmp_path):
    from dreamlab.bench.cli import BenchPriorArgs, BenchQualityArgs, bench_prior, bench_quality

    with pytest.raises(ValueError, match="dragon"):
        bench_prior(BenchPriorArgs(prior="no-such-prior", prompts=("a red dragon",), out=tmp_path))
    with pytest.raises(ValueError, match="dragon"):
        bench_quality(BenchQualityArgs(prior="no-such-prior", prompts=("a dragon",), out=tmp_path))
    with pytest.raises(ValueError, match="samples"):
        bench_prior(BenchPriorArgs(prior="no-such-prior", prompts=("a cube",), samples=0))


def test_cli_args_parse_with_tyro_and_bench_prior_runs(tmp_path, capsys, monkeypatch):
    import tyro

    from dreamlab.bench import prior_quality

    small = _small_refs()
    monkeypatch.setattr(prior_quality, "reference_set", lambda *args: small)

    from dreamlab.bench.cli import BenchPriorArgs, BenchQualityArgs, bench_prior

    q = tyro.cli(
        BenchQualityArgs,
        args=["--prompts", "a red cube", "a torus", "--seeds", "0", "1", "--no-mesh"],
    )
    assert (
        q.prompts == ("a red cube", "a torus")
        and q.seeds == (0, 1)
        and q.no_mesh
        and q.steps is None
    )
    folder = tmp_path / "prior"
    _tiny_builtin(2).save(folder)
    args = tyro.cli(
        BenchPriorArgs,
        args=[
            "--prior",
            str(folder),
            "--prompts",
            "a red cube",
            "--samples",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
    )
    assert bench_prior(args) == 0
    printed = capsys.readouterr().out
    assert "a red cube" in printed and "prior_bench.png" in printed
    assert (tmp_path / "out" / "prior_bench.csv").is_file()


def test_bench_quality_takes_the_methods_own_options(tmp_path):
    from dreamlab.cli import main

    out = tmp_path / "q"
    base = ["bench", "quality", "--prompts", "a red cube", "--guidance", "sds", "--steps", "1"]
    tail = ["--no-mesh", "--out", str(out)]
    code = main(base + ["--sds.perp-neg", "True", "--sds.guidance-scale", "5"] + tail)
    assert code == 0
    settings = (out / "quality.md").read_text()
    assert "sds.perp_neg True" in settings and "sds.guidance_scale 5.0" in settings
    assert main(base + ["--sds.perp-neg-scale", "nan"] + tail) != 0


def test_saturation_excess_is_exact_on_flat_colours():
    from dreamlab.bench.metrics import hsv_saturation, saturation_excess

    assert hsv_saturation(
        torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4]])
    ).tolist() == [0.5, 0.0, 0.0]
    pred = torch.zeros(2, 4, 4, 3)
    pred[..., 0] = 1.0  # pure red: S = 1
    truth = torch.full((2, 4, 4, 3), 0.5)
    truth[..., 0] = 1.0  # pink: S = 0.5
    mask = torch.ones(2, 4, 4)
    gt_mask = mask.clone()
    gt_mask[1] = 0.0  # the second view has no overlap
    excess = saturation_excess(pred, truth, mask, gt_mask)
    assert excess[0].item() == pytest.approx(0.5) and torch.isnan(excess[1])
    assert saturation_excess(truth, pred, mask, mask)[0].item() == pytest.approx(-0.5)


def test_prior_bench_negates_the_other_views_only_when_asked(tmp_path):
    from dreamlab.bench.prior_quality import run_prior_bench

    prior = _tiny_builtin(2)
    kwargs = {"samples_per": 1, "steps": 2, "ceiling": False, "reference_azimuths": 4,
              "reference_elevations": (15.0,), "reference_distances": (2.4,)}
    plain = run_prior_bench(prior, ["a snowman", "a red cube"], out_dir=tmp_path / "a", **kwargs)
    negated = run_prior_bench(prior, ["a snowman", "a red cube"], out_dir=tmp_path / "b", other_view_scale=1.0, **kwargs)
    assert "other-view negation 1" in (tmp_path / "b" / "prior_bench.md").read_text()
    assert len(plain.rows) == len(negated.rows) == 4  # snowman front, side, back; the cube
    # the snowman's three view samples change; the cube (no front, no view words) does not
    assert not torch.allclose(plain.images[:3], negated.images[:3])
    assert torch.equal(plain.images[3:], negated.images[3:])
    with pytest.raises(ValueError, match="other-view scale"):
        run_prior_bench(prior, ["a snowman"], out_dir=tmp_path / "c", other_view_scale=-1.0, **kwargs)
    with pytest.raises(ValueError, match="two view words"):
        run_prior_bench(prior, ["a snowman"], views=("front",), out_dir=tmp_path / "d", other_view_scale=1.0, **kwargs)
