"""Behaviour of the guidance methods on a prior whose score is known in closed form.

``dreamlab.priors.toy.GaussianMixturePrior`` is a 2-D Gaussian-mixture "diffusion model" (target:
4 separated modes at (±0.5, ±0.5), std 0.08, weights 0.4/0.3/0.2/0.1; unconditional: one broad
Gaussian) with an exact ε̂. Particles stand in for 3D models: N points, "rendered" to constant
images, optimised with Adam by each guidance exactly as the trainer calls it
(``guidance(rgb, cams, embeds, progress, generator)``, ``loss.backward()``, step). Each particle
is rendered ``K`` times per step (like several views of one object), so the per-particle update
averages K draws of (t, ε).

Two camera settings:

* **A, independent particles** (ProlificDreamer's particles): fresh random cameras every step,
  unrelated to the particle. The VSD LoRA then learns the score of the whole particle cloud.
* **B, views of one object** (the ESD paper's setting): particle i is always seen from its own
  fixed camera, so q(x | c) is a point mass and a camera-conditioned LoRA can learn it; 8
  particles, so the camera MLP can tell them apart within the budget.

What is measured (``dreamlab.priors.toy.particle_metrics``) and what reproduces; every threshold
was checked on 3 seeds while writing this file (ranges below are over those seeds; exact samples
of the target score: 4 modes, occupancy TV ≈ 0.05, kNN entropy ≈ −1.1 to −1.3 nats, sliced
Wasserstein-2 (SWD) ≈ 0.09-0.12). ``bench/plot_guidance_toy.py`` runs every method.

* SDS at its paper CFG (101): mode collapse. 2 of 4 modes occupied (86-91 % on the heaviest),
  kNN entropy ≈ −3.4, SWD ≈ 0.48-0.49. Reproduces.
* VSD at CFG 1 (setting A): all 4 modes occupied with roughly the mixture weights (TV
  0.06-0.12), SWD 0.10-0.14, ~4x below SDS. Reproduces ProlificDreamer's claim. Its particles
  are over-dispersed within modes (spread ratio ≈ 2-2.7: the rank-4 LoRA's estimation error).
  At VSD's default CFG 7.5 the particles collapse within modes (the CFG-tilted target is sharper).
* ESD vs VSD (setting B, CFG 1): VSD's camera-conditioned LoRA learns the per-view point masses
  and VSD degenerates towards SDS (2 modes, nearest-neighbour distance 0.06, kNN entropy ≈ −2.2,
  near the mixture mean); ESD with λ = 0.5 keeps more diversity (3 modes, NN distance
  0.14-0.21, entropy −1.25 to +0.1). Reproduces the ESD paper's claim, but only once the LoRA
  has learnt the views (after 600 steps the two are still indistinguishable). In setting A the
  cameras carry no information and ESD ≈ VSD, as the theory says (not asserted).
* ISM: converges onto mode centres (3 of 4 modes), each mode collapsed to a point. Reproduces
  "converges"; it is mode seeking, not covering.
* ASD (CFG 7.5): converges and stays bounded, but collapses like SDS at CFG 7.5 near the
  mixture mean (distance to the nearest mode does not decrease); VSD-like coverage
  (ScaleDreamer's motivation) does NOT reproduce in this toy.
* CDS: finite and bounded, but it does NOT converge to the data here: with its shared fixed
  noise ε* the particles drift together to a point ~1-4 units away, along −ε* (the fixed-noise
  bias), at its paper CFG 101 → 51 and at CFG 1 alike (fresh noise, ``share_noise=False``, drifts
  too at high CFG). Asserted: finiteness, a bound, and the drift along −ε* at CFG 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import math

import pytest
import torch

from dreamlab.guidance.asd import ASDConfig
from dreamlab.guidance.cds import CDSConfig
from dreamlab.guidance.esd import ESDConfig
from dreamlab.guidance.ism import ISMConfig
from dreamlab.guidance.sds import SDSConfig
from dreamlab.guidance.vsd import VSDConfig
from dreamlab.priors.toy import (
    TOY_LORA_TARGETS,
    GaussianMixturePrior,
    mixture_eps,
    particle_metrics,
    render_particles,
    run_particles,
)
from dreamlab.prompts import PromptConfig, build_prompt_embeds
from dreamlab.schedules import Constant

from guidance_fixtures import make_cams

LORA = {"lora_target_modules": TOY_LORA_TARGETS, "lora_lr": 1e-2}  # paper lr 1e-4 is for 25k steps
LR = 0.01  # Adam lr on the particles, pixel units (cosine-decayed to 2%)


@functools.cache
def toy_prior() -> GaussianMixturePrior:
    return GaussianMixturePrior()


@functools.cache
def reference() -> torch.Tensor:
    return toy_prior().target.sample(4096, torch.Generator().manual_seed(1))


# name -> (config, camera setting, particles N, views K, steps)
RUNS = {
    "sds": (lambda: SDSConfig(), "A", 64, 8, 500),
    "vsd": (lambda: VSDConfig(guidance_scale=1.0, **LORA), "A", 64, 8, 500),
    # The camera-conditioned LoRA needs ~700+ steps of a 512-render batch to learn the 8 views'
    # point masses (at 600 steps VSD has not collapsed yet and the two are indistinguishable).
    "vsd_views": (lambda: VSDConfig(guidance_scale=1.0, **LORA), "B", 8, 64, 800),
    "esd_views": (
        lambda: ESDConfig(guidance_scale=1.0, entropy_weight=Constant(0.5), **LORA), "B", 8, 64, 800
    ),
    "ism": (lambda: ISMConfig(), "A", 32, 8, 400),
    "asd": (lambda: ASDConfig(), "A", 32, 8, 400),
    "cds": (lambda: CDSConfig(), "A", 32, 8, 400),
    "cds_s1": (lambda: CDSConfig(guidance_scale=1.0), "A", 32, 8, 400),
}


@functools.cache
def toy_run(name: str, seed: int = 0):
    """(guidance, init [N, 2], final [N, 2], history, metrics of init, metrics of final)."""
    make_cfg, setting, n, k, steps = RUNS[name]
    prior = toy_prior()
    embeds = build_prompt_embeds(prior, "four blobs")
    init = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + seed)) * 0.2
    if setting == "A":
        def cams_for_step(step):
            return make_cams(n * k, seed=1000 * seed + step)
    else:
        fixed = make_cams(n, seed=77 + seed)[torch.arange(n).repeat_interleave(k)]

        def cams_for_step(step):
            return fixed
    guidance = make_cfg().build(prior, PromptConfig())
    final, history = run_particles(
        guidance, prior, init, cams_for_step, embeds, steps, LR, views=k, seed=seed,
        history_every=steps // 10,
    )
    metrics = [particle_metrics(points, prior, reference()) for points in (init, final)]
    return guidance, init, final, history, metrics[0], metrics[1]


def exact_sample_metrics(n: int) -> dict[str, float]:
    samples = toy_prior().target.sample(n, torch.Generator().manual_seed(2))
    return particle_metrics(samples, toy_prior(), reference())


def assert_converged_and_bounded(name: str, bound: float) -> dict[str, float]:
    _, _, final, history, _, m = toy_run(name)
    assert torch.isfinite(final).all(), name
    assert m["max_abs"] < bound, (name, m["max_abs"])
    last_move = (history[-1] - history[-2]).norm(dim=1).max().item()  # over the last 10% of steps
    assert last_move < 0.05, (name, last_move)
    return m


# ---------------------------------------------------------------------------- the toy prior itself


def test_toy_eps_is_exact_score_of_the_noised_mixture():
    """ε̂ = −σ_t ∇ log p_t(x_t), p_t = Σ π_k N(α_t μ_k, (α_t² s_k² + σ_t²) I), checked by autograd
    on the log-density; the conditional prompt selects the target, "" the broad Gaussian."""
    prior = toy_prior()
    emb = prior.encode_prompt(["four blobs", "four blobs, side view", ""])
    assert emb[:, 0].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 20, 100, 250, 400, 500, 700, 900, 980, 999])
    abar = prior.scheduler.alphas_cumprod.double()[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    for row, mix in ((emb[0], prior.target), (emb[2], prior.broad)):
        means, stds, log_w = mix.tensors()
        xr = x.clone().requires_grad_(True)
        var = alpha[:, None] ** 2 * stds[None] ** 2 + sigma[:, None] ** 2
        diff = xr[:, None, :] - alpha[:, None, None] * means[None]
        log_n = -torch.log(2 * math.pi * var) - diff.square().sum(-1) / (2 * var)
        logp = torch.logsumexp(log_w + log_n, dim=-1)
        (score,) = torch.autograd.grad(logp.sum(), xr)
        expected = (-sigma[:, None] * score).float()
        got = prior.predict_eps(x.float().view(12, 2, 1, 1), t, row.expand(12, 1, 2)).view(12, 2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Far from every mode at t = 0 the log-sum-exp keeps it finite.
    far = prior.predict_eps(torch.full((1, 2, 1, 1), 50.0), torch.tensor([0]), emb[:1])
    assert torch.isfinite(far).all()
    # Linear in the embedding: a blend of the two rows blends the two ε.
    xb, tb = x[:2].float().view(2, 2, 1, 1), t[5:7]
    mixed = prior.predict_eps(xb, tb, (0.25 * emb[0] + 0.75 * emb[2]).expand(2, 1, 2))
    parts = [prior.predict_eps(xb, tb, e.expand(2, 1, 2)) for e in (emb[0], emb[2])]
    torch.testing.assert_close(mixed, 0.25 * parts[0] + 0.75 * parts[1])
    # mixture_eps is what the prior uses.
    means, stds, log_w = prior.target.tensors()
    direct = mixture_eps(x, alpha, sigma, means, stds, log_w).float()
    via_prior = prior.predict_eps(x.float().view(12, 2, 1, 1), t, emb[0].expand(12, 1, 2))
    torch.testing.assert_close(direct, via_prior.view(12, 2), atol=1e-6, rtol=1e-6)


def test_toy_encode_decode_and_frozen_unet_is_exact():
    prior = toy_prior()
    pixels = torch.tensor([[0.25, 0.75], [0.5, 0.1]])
    rgb = render_particles(pixels, size=5).permute(0, 3, 1, 2)  # [2, 3, 5, 5]
    latents = prior.encode_images(rgb)
    assert latents.shape == (2, 2, 1, 1)
    torch.testing.assert_close(latents.view(2, 2), 2 * pixels - 1)
    decoded = prior.decode_latents(latents)
    assert decoded.shape == (2, 3, prior.image_size, prior.image_size)
    torch.testing.assert_close(decoded[:, :2, 0, 0], pixels)
    assert (decoded[:, 2] == 0).all()

    x = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 50, 300, 600, 900, 999])
    emb = prior.encode_prompt(["a", "a", "a", "", "", ""])
    eps = prior.predict_eps(x, t, emb)
    unet_eps = prior.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(unet_eps, eps, atol=1e-6, rtol=0)
    extra = torch.randn(6, prior.unet.time_embedding.linear_2.out_features)
    copy_eps = prior.predict_eps_with_unet(prior.unet, x, t, emb, extra)
    torch.testing.assert_close(copy_eps, eps, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in prior.parameters())


def test_toy_unet_takes_a_peft_lora_and_the_extra_embedding_reaches_it():
    """VSD's LoRA copy of prior.unet: LoRA layers on every target, gradients reach the LoRA and
    the extra (camera) embedding once the zero-initialised output has moved; the prior is
    untouched."""
    prior = GaussianMixturePrior()
    guidance = VSDConfig(guidance_scale=1.0, **LORA).build(prior, PromptConfig())
    names = {name.split(".lora_")[0] for name in guidance.lora_params}
    assert names == set(TOY_LORA_TARGETS)
    before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    embeds = build_prompt_embeds(prior, "four blobs")
    pixels = torch.rand(16, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        out = guidance(render_particles(pixels), make_cams(16, seed=step), embeds, 0.1, gen)
        out.loss.backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert any(p.abs().sum() > 0 for n, p in guidance.lora_params.items() if "fc_out.lora_B" in n)
    extra = torch.zeros(4, prior.unet.time_embedding.linear_2.out_features, requires_grad=True)
    x = torch.randn(4, 2, 1, 1)
    eps = prior.predict_eps_with_unet(guidance.unet, x, torch.tensor([10, 200, 500, 900]),
                                      prior.encode_prompt(["a"] * 4), extra)
    eps.sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    after = prior.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_toy_run_is_deterministic_under_a_seed():
    prior = toy_prior()
    embeds = build_prompt_embeds(prior, "four blobs")
    init = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 0.2
    finals = [
        run_particles(
            SDSConfig(guidance_scale=7.5).build(prior), prior, init,
            lambda s: make_cams(16, seed=s), embeds, 20, LR, views=2, seed=5,
        )[0]
        for _ in range(2)
    ]
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], init)


# ---------------------------------------------------------------------------- the paper claims


def test_sds_high_cfg_collapses_the_particles():
    """SDS at CFG 101: the particles collapse onto ≤ 2 of the 4 modes (most on the heaviest), with
    an entropy far below the target's; their distribution is far from the target (sliced W2)."""
    _, _, final, _, _, m = toy_run("sds")
    truth = exact_sample_metrics(64)
    assert torch.isfinite(final).all()
    assert m["modes_occupied"] <= 2, m
    assert m["occupancy_tv"] > 0.4, m  # mass piled on the heavy mode(s)
    assert m["knn_entropy"] < truth["knn_entropy"] - 1.5, (m["knn_entropy"], truth["knn_entropy"])
    assert m["swd"] > 0.4 > 2.0 * truth["swd"], (m, truth)


def test_vsd_particles_cover_the_target():
    """VSD at CFG 1 (the target's own score), independent particles: every mode is occupied with
    roughly the mixture weights, and the sliced Wasserstein distance to the target is a fraction
    of SDS's (an exact 64-point sample scores ≈ 0.1)."""
    _, _, final, _, _, m = toy_run("vsd")
    sds = toy_run("sds")[5]
    assert torch.isfinite(final).all()
    assert m["modes_occupied"] == 4, m
    assert m["occupancy_tv"] < 0.2, m
    for k, w in enumerate((0.4, 0.3, 0.2, 0.1)):
        assert abs(m[f"occupancy_{k}"] - w) < 0.12, (k, m)
    assert m["swd"] < 0.2, m
    assert m["swd"] < 0.4 * sds["swd"], (m["swd"], sds["swd"])
    assert m["knn_entropy"] > sds["knn_entropy"] + 2.0, (m["knn_entropy"], sds["knn_entropy"])


def test_esd_keeps_more_diversity_than_vsd_when_cameras_identify_views():
    """Views of one object (each particle has its own fixed camera): VSD's camera-conditioned
    LoRA learns each view's point mass and VSD collapses; ESD (λ = 0.5) mixes in the
    camera-marginal score and keeps more diversity. Measures: kNN (Kozachenko-Leonenko)
    entropy of the 8 views, mean nearest-neighbour distance, modes occupied."""
    vsd = toy_run("vsd_views")[5]
    esd = toy_run("esd_views")[5]
    for m in (vsd, esd):
        assert math.isfinite(m["max_abs"]) and m["max_abs"] < 1.0, m
    assert vsd["modes_occupied"] <= 2, vsd
    assert esd["modes_occupied"] > vsd["modes_occupied"], (esd, vsd)
    assert esd["knn_entropy"] > vsd["knn_entropy"] + 0.5, (esd["knn_entropy"], vsd["knn_entropy"])
    assert esd["nn_dist"] > 1.5 * vsd["nn_dist"], (esd["nn_dist"], vsd["nn_dist"])


def test_ism_converges_onto_mode_centres():
    """ISM (deterministic DDIM inversion + interval target) is mode seeking: particles end on
    mode centres, each mode collapsed to (nearly) a point."""
    m = assert_converged_and_bounded("ism", bound=1.0)
    init = toy_run("ism")[4]
    assert m["mode_dist"] < 0.15 < init["mode_dist"], (m["mode_dist"], init["mode_dist"])
    assert m["modes_occupied"] >= 2, m
    assert m["spread_ratio"] < 0.2, m


def test_asd_converges_bounded_but_collapses():
    """ASD (CFG 7.5): converges, stays bounded, and collapses (low entropy) like SDS at CFG 7.5,
    near the mixture mean; it does not reach VSD's coverage of the target."""
    m = assert_converged_and_bounded("asd", bound=1.0)
    truth = exact_sample_metrics(32)
    assert m["knn_entropy"] < truth["knn_entropy"] - 1.5, (m, truth)
    assert m["swd"] > 2.0 * toy_run("vsd")[5]["swd"], m


def test_cds_stays_finite_but_its_shared_noise_biases_the_particles():
    """CDS keeps the particles finite and bounded, but does not bring them to the data here. Its
    noise ε* is fixed and shared (Consistent3D's share_noise), and g = w(ε̂_t − ε̂_n) vanishes
    where the ODE through x_t = α_t x + σ_t ε* is straight, which is biased by about −σ̃_t ε*
    (exactly x = −σ̃_t ε* for N(0, I) data): at CFG 1 all particles drift together along −ε*."""
    _, _, final, history, _, m = toy_run("cds")
    assert all(torch.isfinite(h).all() for h in history)
    assert m["max_abs"] < 5.0, m
    guidance, init, final1, history1, init1, m1 = toy_run("cds_s1")
    assert all(torch.isfinite(h).all() for h in history1)
    assert m1["max_abs"] < 5.0, m1
    drift = final1.mean(0) - init.mean(0)
    eps_star = guidance.noise.flatten().cpu()
    assert torch.nn.functional.cosine_similarity(drift, -eps_star, dim=0) > 0.5, (drift, eps_star)
    # moved together, collapsed
    assert m1["nn_dist"] < 0.5 * exact_sample_metrics(32)["nn_dist"], m1


@pytest.mark.parametrize("name", ["sds", "vsd", "ism", "asd", "cds"])
def test_toy_runs_never_produce_non_finite_particles(name):
    history = toy_run(name)[3]
    assert all(torch.isfinite(h).all() for h in history), name
