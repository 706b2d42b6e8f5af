"""CSM (classifier score matching / CSD) and CDS (consistency distillation sampling): exact update
rules against hand computations with StubPrior, determinism, timesteps, CDS's persistent noise."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dreamlab.guidance.cds import CDS, CDSConfig
from dreamlab.guidance.common import TimestepSchedule, weighting
from dreamlab.guidance.csm import CSM, CSMBranch, CSMConfig, inversion_grid
from dreamlab.prompts import PromptConfig, embeds_for_cameras
from dreamlab.schedules import Constant, Linear, SqrtAnneal
from guidance_fixtures import StubPrior, capture_latents, make_cams, stub_embeds

T = 1000


@pytest.fixture
def prior():
    return StubPrior()


@pytest.fixture
def embeds(prior):
    return stub_embeds(prior, negative="blurry, low quality")


def _rgb(batch: int, seed: int = 5, size: int = 12) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _abar(prior, t):
    return prior.alphas_cumprod[t].double().view(-1, 1, 1, 1)


# ============================================================================== CSM


@pytest.mark.parametrize("weighting_name", ["uniform", "sds", "ism"])
@pytest.mark.parametrize("normalize", [False, True])
def test_csm_random_noising_exact_update_rule(prior, embeds, monkeypatch, weighting_name, normalize):
    latents_store = capture_latents(prior, monkeypatch)
    cfg = CSMConfig(
        noising="random", guidance_scale=2.5, negative_mix=Constant(0.3), weighting=weighting_name,
        grad_normalize=normalize, loss_scale=2.0,
    )
    batch, progress, seed = 3, 0.4, 11
    cams = make_cams(batch)
    out = cfg.build(prior)(_rgb(batch), cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    # One batched U-Net call: [cond; negative; null] at the same x_t and t.
    assert len(prior.calls) == 1
    x_in, t_in, emb_in = prior.calls[0]
    cond, negative = embeds_for_cameras(embeds, cams, "discrete")
    null = embeds.null.expand(batch, -1, -1)
    torch.testing.assert_close(emb_in, torch.cat([cond, negative, null]), rtol=0, atol=0)
    assert out.aux.branch_names == ("cond", "negative", "null")

    # t first, then ε, from the passed generator.
    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    latents = latents_store[0]
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(out.timesteps, t) and torch.equal(t_in, torch.cat([t, t, t]))
    assert torch.equal(out.aux.noise, noise)

    abar = _abar(prior, t)
    x = latents.detach().double()
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(x_in.double(), torch.cat([x_t] * 3), rtol=0, atol=1e-6)
    eps = {name: prior.eps_formula(x_t, t, e.double()) for name, e in
           (("c", cond), ("n", negative), ("0", null))}
    score = 2.5 * (eps["c"] - 0.3 * eps["n"] - 0.7 * eps["0"])
    if weighting_name == "ism":
        w = ((1 - abar) / abar).sqrt()
    else:
        w = weighting(weighting_name, prior.alphas_cumprod, t).double().view(-1, 1, 1, 1)
    expected = w * score
    if normalize:
        expected = expected / (expected.norm() + 1e-8)
        assert abs(out.grad_norm.item() - 1.0) < 1e-5
    torch.testing.assert_close(out.aux.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents.grad.double(), 2.0 * expected / batch, rtol=1e-5, atol=1e-6)


def test_csm_ddim_inversion_exact_update_rule(prior, embeds, monkeypatch):
    latents_store = capture_latents(prior, monkeypatch)
    steps = 3
    cfg = CSMConfig(noising="ddim_inversion", inversion_steps=steps, guidance_scale=4.0,
                    negative_mix=Constant(1.0), weighting="sds", grad_normalize=False)
    batch, progress, seed = 2, 0.2, 3
    cams = make_cams(batch, seed=1)
    gen = torch.Generator().manual_seed(seed)
    out = cfg.build(prior)(_rgb(batch), cams, embeds, progress, gen)
    out.loss.backward()

    # t is the only random draw: the inversion is deterministic.
    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    assert torch.equal(out.timesteps, t)
    assert torch.equal(gen.get_state(), g.get_state())
    assert out.aux.noise is None

    # N inversion calls with the null text on the grid ⌊k t / N⌋, then one branch call.
    assert len(prior.calls) == steps + 1
    x = latents_store[0].detach().double()
    x_tau, a_from, s_from = x, torch.ones(batch, 1, 1, 1, dtype=torch.float64), torch.zeros(batch, 1, 1, 1, dtype=torch.float64)
    null = embeds.null.expand(batch, -1, -1)
    for k in range(steps):
        tau = (k * t) // steps
        tau_next = ((k + 1) * t) // steps
        x_in, t_in, emb_in = prior.calls[k]
        assert torch.equal(t_in, tau) and torch.equal(emb_in, null)
        torch.testing.assert_close(x_in.double(), x_tau, rtol=0, atol=1e-6)
        e = prior.eps_formula(x_tau, tau, null.double())
        abar = _abar(prior, tau_next)
        x0 = (x_tau - s_from * e) / a_from
        x_tau = abar.sqrt() * x0 + (1 - abar).sqrt() * e
        a_from, s_from = abar.sqrt(), (1 - abar).sqrt()
    assert torch.equal(out.aux.inversion_timesteps, inversion_grid(t, steps))
    assert torch.equal(out.aux.inversion_timesteps[-1], t)
    torch.testing.assert_close(out.aux.x_t.double(), x_tau, rtol=0, atol=1e-6)

    # λ = 1: the null branch has weight 0 and is not evaluated.
    x_in, t_in, emb_in = prior.calls[-1]
    cond, negative = embeds_for_cameras(embeds, cams, "discrete")
    assert out.aux.branch_names == ("cond", "negative")
    assert torch.equal(emb_in, torch.cat([cond, negative])) and torch.equal(t_in, torch.cat([t, t]))
    w = weighting("sds", prior.alphas_cumprod, t).double().view(-1, 1, 1, 1)
    expected = w * 4.0 * (prior.eps_formula(x_tau, t, cond.double()) - prior.eps_formula(x_tau, t, negative.double()))
    torch.testing.assert_close(out.aux.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents_store[0].grad.double(), expected / batch, rtol=1e-5, atol=1e-6)


def test_inversion_grid():
    t = torch.tensor([980, 7, 0])
    grid = inversion_grid(t, 5)
    assert grid.shape == (6, 3)
    assert grid[:, 0].tolist() == [0, 196, 392, 588, 784, 980]
    assert grid[:, 1].tolist() == [0, 1, 2, 4, 5, 7]
    assert grid[:, 2].tolist() == [0] * 6


def test_csm_negative_mix_anneal_and_branch_merging(prior, embeds):
    """Default λ: 0 at the start (cond − null), 1 from half-way (cond − negative), both between;
    with an empty negative prompt the negative and null branches are one U-Net row."""
    cams = make_cams(2)
    cfg = CSMConfig(noising="random", guidance_scale=2.0)
    guidance = cfg.build(prior)
    expected = {0.0: ("cond", "null"), 0.25: ("cond", "negative", "null"), 0.75: ("cond", "negative")}
    for progress, names in expected.items():
        prior.calls.clear()
        out = guidance(_rgb(2), cams, embeds, progress, torch.Generator().manual_seed(0))
        assert out.aux.branch_names == names
        assert prior.calls[0][0].shape[0] == 2 * len(names)
    assert out.aux.branch_weights == (2.0, -2.0)
    out = guidance(_rgb(2), cams, embeds, 0.25, torch.Generator().manual_seed(0))
    assert out.aux.branch_weights == pytest.approx((2.0, -2.0 * 0.5, -2.0 * 0.5))

    empty_negative = stub_embeds(prior, negative="")
    prior.calls.clear()
    out = guidance(_rgb(2), cams, empty_negative, 0.25, torch.Generator().manual_seed(0))
    assert out.aux.branch_names == ("cond", "negative+null")
    assert out.aux.branch_weights == pytest.approx((2.0, -2.0))
    assert prior.calls[0][0].shape[0] == 4


def test_csm_branches_are_overridable(prior, embeds):
    """The hook a visual-prompt variant uses: an extra branch enters the same batched call and g."""

    class ExtraBranchCSM(CSM):
        def branches(self, embeds, cams, progress):
            return super().branches(embeds, cams, progress) + [
                CSMBranch("extra", embeds.plain.expand(len(cams), -1, -1), 0.5)
            ]

    cfg = CSMConfig(noising="random", negative_mix=Constant(1.0), grad_normalize=False)
    cams = make_cams(2)
    out = ExtraBranchCSM(cfg, prior, PromptConfig())(
        _rgb(2), cams, embeds, 0.5, torch.Generator().manual_seed(0)
    )
    assert out.aux.branch_names == ("cond", "negative", "extra")
    assert prior.calls[-1][0].shape[0] == 6
    eps = out.aux.branch_eps
    torch.testing.assert_close(out.aux.grad, eps[0] - eps[1] + 0.5 * eps[2])


@pytest.mark.parametrize("noising", ["ddim_inversion", "random"])
def test_csm_deterministic_timesteps_and_no_prior_grad(prior, embeds, noising):
    cfg = CSMConfig(noising=noising, inversion_steps=2)
    guidance = cfg.build(prior)
    prior.weight.requires_grad_(True)
    cams = make_cams(4)

    def run(seed, progress=0.3):
        rgb = _rgb(4)
        out = guidance(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    assert prior.weight.grad is None
    assert torch.isfinite(out.loss) and grad.abs().sum() > 0
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    assert not torch.equal(run(8)[1], grad)
    for progress in (0.0, 0.5, 1.0):
        lo, hi = cfg.timesteps.bounds(progress, T)
        t = guidance(_rgb(64), make_cams(64), embeds, progress, torch.Generator().manual_seed(1)).timesteps
        assert t.dtype == torch.long and t.shape == (64,)
        assert lo <= t.min().item() and t.max().item() <= hi
    assert CSMConfig().timesteps.bounds(0.0, T) == (20, 980)
    assert CSMConfig().timesteps.bounds(0.5, T) == (20, 500)


def test_csm_grad_clip_before_normalisation(prior, embeds):
    cfg = CSMConfig(noising="random", guidance_scale=50.0, grad_normalize=False, grad_clip=Constant(1e-3))
    out = cfg.build(prior)(_rgb(2), make_cams(2), embeds, 0.0, torch.Generator())
    assert out.aux.grad.abs().max() <= 1e-3 + 1e-9


def test_csm_config_validate():
    CSMConfig().validate()
    CSMConfig(noising="random", weighting="ism", grad_clip=Linear(0.5, 2.0)).validate()
    bad = [
        CSMConfig(guidance_scale=-1.0),
        CSMConfig(guidance_scale=math.inf),
        CSMConfig(noising="sde"),
        CSMConfig(inversion_steps=0),
        CSMConfig(inversion_steps=2.5),
        CSMConfig(weighting="sdss"),
        CSMConfig(view_dependent="sometimes"),
        CSMConfig(grad_clip=Constant(0.0)),
        CSMConfig(negative_mix=Constant(math.nan)),
        CSMConfig(loss_scale=math.inf),
        CSMConfig(timesteps=TimestepSchedule(t_min=Constant(0.9), t_max=Constant(0.5))),
    ]
    for cfg in bad:
        with pytest.raises(ValueError):
            cfg.validate()
    json.dumps(dataclasses.asdict(CSMConfig()))


# ============================================================================== CDS


def _cds_expected(prior, x, noise, t, t_n, cond, uncond, scale, w):
    """Consistent3D's VE-form computation (spec §9), in float64, with recon_std_rescale = 0."""
    abar_t, abar_n = _abar(prior, t), _abar(prior, t_n)
    sig_t, sig_n = ((1 - abar_t) / abar_t).sqrt(), ((1 - abar_n) / abar_n).sqrt()

    def cfg_b(x_in, tt):  # convention B with scale − 1 == convention A with scale
        e_y, e_0 = prior.eps_formula(x_in, tt, cond.double()), prior.eps_formula(x_in, tt, uncond.double())
        return e_y + (scale - 1.0) * (e_y - e_0), e_y

    z_t = x + sig_t * noise
    x_t = z_t / (1 + sig_t**2).sqrt()
    eps_t, eps_t_y = cfg_b(x_t, t)
    z_n = z_t + (sig_n - sig_t) * eps_t
    x_n = z_n / (1 + sig_n**2).sqrt()
    eps_n, _ = cfg_b(x_n, t_n)
    return x_t, x_n, eps_t, eps_t_y, eps_n, w * (eps_t - eps_n), (z_t, sig_t, sig_n)


@pytest.mark.parametrize("weighting_name", ["uniform", "sds", "mix"])
def test_cds_exact_update_rule(prior, embeds, monkeypatch, weighting_name):
    latents_store = capture_latents(prior, monkeypatch)
    cfg = CDSConfig(guidance_scale=Linear(11.0, 5.0), weighting=weighting_name, grad_clip=None, loss_scale=3.0)
    batch, progress, seed = 3, 0.25, 21
    cams = make_cams(batch, seed=2)
    out = cfg.build(prior)(_rgb(batch), cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    # Draws: Δ per view, then the persistent noise [C, h, w] (first call), shared by all views.
    g = torch.Generator().manual_seed(seed)
    delta = torch.randint(100, 300, (batch,), generator=g)
    latents = latents_store[0]
    noise = torch.randn(latents.shape[1:], generator=g)
    # Consistent3D's anneal_t in timesteps: int(700 + (100 − 700)·sqrt(step / 3000)).
    t_n = torch.full((batch,), int(700 + (100 - 700) * math.sqrt(progress)))
    assert t_n[0].item() == 400
    t = (t_n + delta).clamp(100, 980)
    assert torch.equal(out.timesteps, t) and torch.equal(out.aux.t_next, t_n)
    assert torch.equal(out.aux.noise, noise.expand(batch, -1, -1, -1))

    # Two batched calls [cond; uncond]: at (x_t, t), then at (x_n, t_n).
    assert len(prior.calls) == 2
    cond, uncond = embeds_for_cameras(embeds, cams, "discrete")
    for (x_in, t_in, emb_in), tt in zip(prior.calls, (t, t_n)):
        assert x_in.shape[0] == 2 * batch and torch.equal(t_in, torch.cat([tt, tt]))
        assert torch.equal(emb_in, torch.cat([cond, uncond]))

    scale = 11.0 + (5.0 - 11.0) * progress  # 9.5, convention A
    abar_t = prior.alphas_cumprod[t].double()
    w = {"uniform": torch.ones(batch), "sds": 1 - abar_t, "mix": torch.ones(batch)}[weighting_name]
    x_t, x_n, eps_t, _, eps_n, expected, _ = _cds_expected(
        prior, latents.detach().double(), noise.double(), t, t_n, cond, uncond, scale, w.double().view(-1, 1, 1, 1)
    )
    torch.testing.assert_close(prior.calls[0][0][:batch].double(), x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prior.calls[1][0][:batch].double(), x_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.eps_t.double(), eps_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents.grad.double(), 3.0 * expected / batch, rtol=1e-5, atol=1e-6)
    # Consistent3D's own loss 0.5‖z − sg(z + G)‖²/B has gradient −G/B: g = −G (descent direction).
    torch.testing.assert_close(out.grad_norm.double(), expected.norm(), rtol=1e-5, atol=1e-6)


def test_cds_fixed_point_on_gaussian_data_is_shifted_by_the_fixed_noise():
    """A property of CDS itself (Consistent3D's code computes the same g), not of this port: for
    data N(μ, s² I) with the exact ε̂ (CFG 1), ε̂(z, σ̃) = σ̃ (z − μ)/(s² + σ̃²) in VE form, so
    g = w (ε̂_t − ε̂_n) = c (z_t − μ), z_t = x + σ̃_t ε*, with
    c = σ̃_t/(s² + σ̃_t²) − σ̃_n k/(s² + σ̃_n²) > 0, k = 1 + (σ̃_n − σ̃_t) σ̃_t/(s² + σ̃_t²).
    Descent drives z_t, not x, to the data mean: the zero of g is x = μ − σ̃_t ε*, which is the
    drift along −ε* that the toy particles show (tests/test_guidance_toy.py)."""
    from dreamlab.priors.toy import GaussianMixturePrior, render_particles
    from dreamlab.prompts import build_prompt_embeds

    mu, s = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.25
    toy = GaussianMixturePrior(means=(tuple(mu.tolist()),), stds=(s,), weights=(1.0,))
    # t_n = 400, t = t_n + end_gap = 500 for every view (perturb width of one timestep).
    cfg = CDSConfig(guidance_scale=1.0, t_next=Constant(0.4), perturb_factor=0.001, grad_clip=None)
    cfg.validate()
    guidance = cfg.build(toy, PromptConfig())
    eps_star = torch.tensor([0.8, -1.3], dtype=torch.float64)
    guidance.load_state_dict({"noise": eps_star.float().view(2, 1, 1)})

    abar = toy.alphas_cumprod.double()
    sig_t, sig_n = [((1 - abar[k]) / abar[k]).sqrt().item() for k in (500, 400)]
    offsets = torch.tensor([[0.0, 0.0], [0.5, 0.1], [-0.4, 0.7], [1.0, -1.0]], dtype=torch.float64)
    x = mu - sig_t * eps_star + offsets  # row 0 is the predicted fixed point
    rgb = render_particles(toy.to_pixels(x).float()).clone().requires_grad_()
    embeds = build_prompt_embeds(toy, "a blob")
    out = guidance(rgb, make_cams(4), embeds, 0.3, torch.Generator().manual_seed(0))
    assert (out.timesteps == 500).all() and (out.aux.t_next == 400).all()

    k = 1 + (sig_n - sig_t) * sig_t / (s**2 + sig_t**2)
    c = sig_t / (s**2 + sig_t**2) - sig_n * k / (s**2 + sig_n**2)
    assert c > 0
    z_t = x + sig_t * eps_star
    expected = c * (z_t - mu)  # uniform weighting
    torch.testing.assert_close(out.aux.grad.double().view(4, 2), expected, rtol=1e-4, atol=1e-8)
    assert out.aux.grad[0].abs().max() < 1e-7 < out.aux.grad[1:].abs().amax(dim=(1, 2, 3)).min()


def test_cds_mix_weighting_switches_at_half(prior, embeds):
    cfg = CDSConfig(weighting="mix", grad_clip=None)
    cams = make_cams(2)
    early = cfg.build(prior)(_rgb(2), cams, embeds, 0.49, torch.Generator().manual_seed(0))
    late = cfg.build(prior)(_rgb(2), cams, embeds, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(early.aux.weights, torch.ones(2))
    torch.testing.assert_close(late.aux.weights, 1 - prior.alphas_cumprod[late.timesteps])


def test_cds_recon_std_rescale_matches_reference(prior, embeds, monkeypatch):
    latents_store = capture_latents(prior, monkeypatch)
    r, scale = 0.7, 6.0
    cfg = CDSConfig(guidance_scale=scale, recon_std_rescale=r, grad_clip=None)
    batch, progress, seed = 2, 0.6, 4
    cams = make_cams(batch)
    out = cfg.build(prior)(_rgb(batch), cams, embeds, progress, torch.Generator().manual_seed(seed))
    cond, uncond = embeds_for_cameras(embeds, cams, "discrete")
    t, t_n = out.timesteps, out.aux.t_next
    x = latents_store[0].detach().double()
    noise = out.aux.noise.double()
    _, _, eps_t, eps_t_y, _, _, (z_t, sig_t, sig_n) = _cds_expected(prior, x, noise, t, t_n, cond, uncond, scale, 1.0)
    # get_rescaled_sample (VE form): x̂0 = z − σ̃ ε̂, std-rescaled toward the no-CFG x̂0.
    recon, recon_y = z_t - sig_t * eps_t, z_t - sig_t * eps_t_y
    factor = (recon_y.std((1, 2, 3), keepdim=True) + 1e-8) / (recon.std((1, 2, 3), keepdim=True) + 1e-8)
    recon = r * recon * factor + (1 - r) * recon
    pred_eps = (z_t - recon) / sig_t
    z_n = z_t + (sig_n - sig_t) * pred_eps
    x_n = z_n / (1 + sig_n**2).sqrt()
    e_y, e_0 = prior.eps_formula(x_n, t_n, cond.double()), prior.eps_formula(x_n, t_n, uncond.double())
    eps_n = e_y + (scale - 1) * (e_y - e_0)
    big_g = (sig_t / (sig_n + 1e-9)) * (pred_eps - eps_t) + (eps_n - pred_eps)  # uniform w
    torch.testing.assert_close(out.aux.x_next.double(), x_n, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aux.grad.double(), -big_g, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.aux.eps_ode, out.aux.eps_t)


def test_cds_noise_persists_and_is_drawn_once(prior, embeds):
    guidance = CDSConfig().build(prior)
    assert guidance.state_dict() == {"noise": None}
    cams = make_cams(3)
    first = guidance(_rgb(3), cams, embeds, 0.1, torch.Generator().manual_seed(1))
    noise = guidance.noise.clone()
    assert noise.shape == (3, 8, 8)
    assert all(torch.equal(first.aux.noise[b], noise) for b in range(3))  # one image for all views
    gen = torch.Generator().manual_seed(2)
    second = guidance(_rgb(2, seed=9), make_cams(2), embeds, 0.7, gen)
    assert torch.equal(second.aux.noise[0], noise) and torch.equal(guidance.noise, noise)
    # Later steps draw only the per-view Δ: nothing else from the generator.
    ref = torch.Generator().manual_seed(2)
    torch.randint(0, 1, (2,), generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_cds_state_dict_round_trip_is_bit_exact(prior, embeds):
    cfg = CDSConfig()
    cams = [make_cams(2, seed=s) for s in range(4)]

    def step(guidance, i, gen):
        rgb = _rgb(2, seed=30 + i)
        out = guidance(rgb, cams[i], embeds, i / 4, gen)
        out.loss.backward()
        return out.loss.detach(), rgb.grad

    gen = torch.Generator().manual_seed(0)
    original = cfg.build(prior)
    step(original, 0, gen)
    saved_state = original.state_dict()
    saved_gen = gen.get_state()
    reference = [step(original, i, gen) for i in (1, 2, 3)]

    resumed = cfg.build(prior)
    resumed.load_state_dict(saved_state)
    gen2 = torch.Generator().manual_seed(123)
    gen2.set_state(saved_gen)
    for i, (loss, grad) in zip((1, 2, 3), reference):
        loss2, grad2 = step(resumed, i, gen2)
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert torch.equal(resumed.noise, original.noise)

    # The saved state is a detached CPU copy, and a "not drawn yet" state restores as such.
    saved_state["noise"].add_(1.0)
    assert not torch.equal(resumed.noise, saved_state["noise"])
    fresh = cfg.build(prior)
    fresh.load_state_dict({"noise": None})
    assert fresh.noise is None


def test_cds_without_shared_noise(prior, embeds):
    guidance = CDSConfig(share_noise=False).build(prior)
    out = guidance(_rgb(2), make_cams(2), embeds, 0.3, torch.Generator().manual_seed(0))
    assert not torch.equal(out.aux.noise[0], out.aux.noise[1])
    assert guidance.state_dict() == {"noise": None}
    out2 = guidance(_rgb(2), make_cams(2), embeds, 0.3, torch.Generator().manual_seed(1))
    assert not torch.equal(out.aux.noise, out2.aux.noise)


def test_cds_timesteps_anneal_by_sqrt(prior, embeds):
    cfg = CDSConfig()
    rng = cfg.timesteps
    assert [rng.t_next(p, T) for p in (0.0, 0.25, 0.5, 1.0)] == [700, 400, 275, 100]
    assert rng.bounds(0.0, T) == (800, 980)  # 700 + 100 .. min(700 + 299, 980)
    assert rng.bounds(1.0, T) == (200, 399)
    guidance = cfg.build(prior)
    for progress in (0.0, 0.5, 1.0):
        lo, hi = rng.bounds(progress, T)
        out = guidance(_rgb(64), make_cams(64), embeds, progress, torch.Generator().manual_seed(3))
        t, t_n = out.timesteps, out.aux.t_next
        assert t.dtype == torch.long and t.shape == (64,)
        assert lo <= t.min().item() and t.max().item() <= hi
        assert (t_n == rng.t_next(progress, T)).all() and (t > t_n).all()
    # t_n is clamped to [t_min, t_max − end_gap].
    clamped = CDSConfig(t_next=SqrtAnneal(0.95, 0.0)).timesteps
    assert clamped.t_next(0.0, T) == 880 and clamped.t_next(1.0, T) == 100


def test_cds_deterministic_and_no_prior_grad(prior, embeds):
    prior.weight.requires_grad_(True)
    cams = make_cams(2)

    def run(seed):
        guidance = CDSConfig().build(prior)
        rgb = _rgb(2)
        out = guidance(rgb, cams, embeds, 0.3, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    assert prior.weight.grad is None and grad.abs().sum() > 0 and torch.isfinite(out.loss)
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    assert not torch.equal(run(8)[1], grad)


def test_cds_grad_clip(prior, embeds):
    out = CDSConfig(guidance_scale=100.0, grad_clip=Constant(1e-3)).build(prior)(
        _rgb(2), make_cams(2), embeds, 0.0, torch.Generator()
    )
    assert out.aux.grad.abs().max() <= 1e-3 + 1e-9
    default = CDSConfig()
    assert default.grad_clip(0.0) == 2.0 and default.grad_clip(1.0) == 8.0


def test_cds_config_defaults_and_validate():
    cfg = CDSConfig()
    cfg.validate()
    # Consistent3D's convention-B scale 100 → 50 is 101 → 51 in convention A.
    assert cfg.guidance_scale(0.0) == 101.0 and cfg.guidance_scale(1.0) == 51.0
    assert dataclasses.replace(cfg, guidance_scale=7.5).guidance_scale == Constant(7.5)
    json.dumps(dataclasses.asdict(cfg))
    bad = [
        CDSConfig(guidance_scale=-1.0),
        CDSConfig(weighting="sdss"),
        CDSConfig(view_dependent="sometimes"),
        CDSConfig(grad_clip=Constant(0.0)),
        CDSConfig(end_gap=0.0),
        CDSConfig(perturb_factor=0.0),
        CDSConfig(t_min=0.9, t_max=0.5),
        CDSConfig(t_min=0.5, t_max=0.55, end_gap=0.1),
        CDSConfig(recon_std_rescale=1.5),
        CDSConfig(t_next=Constant(math.nan)),
        CDSConfig(loss_scale=math.nan),
    ]
    for bad_cfg in bad:
        with pytest.raises(ValueError):
            bad_cfg.validate()


def test_cds_noise_shape_change_is_an_error(prior, embeds):
    guidance = CDSConfig().build(prior)
    guidance.load_state_dict({"noise": torch.zeros(3, 4, 4)})
    with pytest.raises(ValueError, match="persistent noise"):
        guidance(_rgb(1), make_cams(1), embeds, 0.0, torch.Generator())
