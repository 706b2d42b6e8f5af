"""ISM (LucidDreamer) and TSM (Dreamer XL): exact update rules against a hand computation with
StubPrior (inversion path, U-Net call order and embeddings included), determinism, timesteps,
TSM's pixel-wise clip, config validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from guidance_fixtures import StubPrior, capture_latents, make_cams, stub_embeds

from dreamlab.guidance.common import TimestepSchedule
from dreamlab.guidance.ism import ISMConfig, interval_at, inversion_grid
from dreamlab.guidance.tsm import TSMConfig, pixelwise_clip, trajectory_midpoint
from dreamlab.priors import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_folder
from dreamlab.prompts import build_prompt_embeds, embeds_for_cameras
from dreamlab.schedules import Constant, Linear

T = 1000
PINNED_T = TimestepSchedule(t_min=Constant(0.7), t_max=Constant(0.7))  # t = 700 (still one draw)
PROGRESS = 0.15  # Δt = int(100 − 20 · 0.15/0.3) = 90 -> s = 610


@pytest.fixture
def prior():
    return StubPrior()


@pytest.fixture
def embeds(prior):
    return stub_embeds(prior, negative="blurry")  # negative ≠ null, so their roles are tested


# ------------------------------------------------------------------------------ hand computation


def _ab(prior, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    abar = prior.alphas_cumprod[torch.tensor([t])].view(-1, 1, 1, 1)
    return abar.sqrt(), (1.0 - abar).sqrt()


def _ddim(prior, x, eps, t_from: int, t_to: int):
    a_f, s_f = _ab(prior, t_from)
    a_t, s_t = _ab(prior, t_to)
    return a_t * ((x - s_f * eps) / a_f) + s_t * eps


def _tvec(t: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long)


class Expected:
    """ISM/TSM recomputed from StubPrior.eps_formula, with the U-Net calls it implies."""

    def __init__(self, prior, cfg, latents, noise, cond, neg, null, t, s, start, stride, mu=None):
        f = prior.eps_formula
        batch = latents.shape[0]
        self.calls = []  # (x, t [n], embeds [n, L, D]) in order

        def eps_inv(x, tau):
            tv = _tvec(tau, batch)
            if cfg.denoise_guidance_scale <= 1.0:
                self.calls.append((x, tv, null))
                return f(x, tv, null)
            self.calls.append((torch.cat([x, x]), torch.cat([tv, tv]), torch.cat([neg, null])))
            e_null, e_neg = f(x, tv, null), f(x, tv, neg)
            return e_null + cfg.denoise_guidance_scale * (e_neg - e_null)

        a0, s0 = _ab(prior, start)
        x = a0 * latents + s0 * noise
        tau = start
        while tau < s:
            nxt = min(tau + stride, s)
            x = _ddim(prior, x, eps_inv(x, tau), tau, nxt)
            tau = nxt
        self.x_s = x
        self.eps_s = eps_inv(x, s)
        self.x_t = _ddim(prior, x, self.eps_s, s, t)
        self.target = self.eps_s
        if mu is not None and mu != s:
            self.x_mu = _ddim(prior, x, self.eps_s, s, mu)
            self.target = eps_inv(self.x_mu, mu)
        tv = _tvec(t, batch)
        self.calls.append((torch.cat([self.x_t, self.x_t]), torch.cat([tv, tv]), torch.cat([cond, neg])))
        e_c, e_u = f(self.x_t, tv, cond), f(self.x_t, tv, neg)
        self.eps_pred = e_u + cfg.guidance_scale * (e_c - e_u)
        abar = prior.alphas_cumprod[tv].view(-1, 1, 1, 1)
        self.w = ((1.0 - abar) / abar).sqrt()
        self.grad = self.w * (self.eps_pred - self.target)


def _run_exact(prior, embeds, monkeypatch, cfg, batch=3, seed=11):
    store = capture_latents(prior, monkeypatch)
    cams = make_cams(batch, seed=3)
    rgb = torch.rand(batch, 8, 8, 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
    prior.calls.clear()
    out = cfg.build(prior)(rgb, cams, embeds, PROGRESS, torch.Generator().manual_seed(seed))
    out.loss.backward()
    latents = store[0]

    # Randomness, in order: t, the flip (only when hflip_prob > 0), ε, the offset [1, C, 1, 1].
    g = torch.Generator().manual_seed(seed)
    t = int(cfg.timesteps(PROGRESS, 1, T, g)[0])
    flipped = cfg.hflip_prob > 0 and float(torch.rand((), generator=g)) < cfg.hflip_prob
    noise = torch.randn(latents.shape, generator=g)
    noise = noise + cfg.noise_offset * torch.randn((1, latents.shape[1], 1, 1), generator=g)
    assert out.aux.flipped == flipped
    torch.testing.assert_close(out.aux.noise, noise, rtol=0, atol=0)
    image = rgb.detach().flip(2) if flipped else rgb.detach()
    torch.testing.assert_close(latents.detach(), image.permute(0, 3, 1, 2) * 2 - 1, rtol=0, atol=0)

    delta = int(80 + 20 * (1 - PROGRESS / 0.3))
    s = max(t - delta, 0)
    stride = cfg.xs_delta_t if cfg.xs_delta_t is not None else delta
    start = 0 if cfg.xs_inv_steps is None else max(s - stride * cfg.xs_inv_steps, 0)
    assert (out.aux.t, out.aux.delta_t, out.aux.s, out.aux.start) == (t, delta, s, start)
    assert torch.equal(out.timesteps, _tvec(t, batch))

    cond, neg = embeds_for_cameras(embeds, cams, "interpolated")  # LucidDreamer's default mode
    null = embeds.null.expand(batch, -1, -1)
    mu = trajectory_midpoint(s, t, cfg.gamma) if isinstance(cfg, TSMConfig) else None
    exp = Expected(prior, cfg, latents.detach(), noise, cond, neg, null, t, s, start, stride, mu)
    return out, rgb, latents, exp, (t, s, start, stride, mu, flipped)


def _check_calls(prior, exp):
    assert len(prior.calls) == len(exp.calls)
    for (x, t, e), (x_exp, t_exp, e_exp) in zip(prior.calls, exp.calls):
        assert torch.equal(t, t_exp)
        torch.testing.assert_close(e, e_exp, rtol=0, atol=0)
        torch.testing.assert_close(x, x_exp, rtol=1e-6, atol=1e-6)


def _check_grad(out, rgb, latents, exp, cfg, flipped, clip=None):
    batch = latents.shape[0]
    torch.testing.assert_close(out.aux.target, exp.target, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.eps_pred, exp.eps_pred, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.weights, exp.w.view(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.grad, exp.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(latents.grad, cfg.loss_scale * exp.grad / batch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.grad_norm, exp.grad.norm(), rtol=1e-6, atol=1e-6)
    # Through the pixel-space encode (x = 2 rgb − 1) and the flip back to the render.
    to_rgb = 2.0 * latents.grad.permute(0, 2, 3, 1)
    to_rgb = to_rgb.flip(2) if flipped else to_rgb
    if clip is not None:  # TSM: each pixel scaled so that its largest channel is at most `clip`
        to_rgb = to_rgb * torch.clamp(clip / to_rgb.abs().amax(dim=-1, keepdim=True), max=1.0)
        assert (2.0 * latents.grad).abs().max() > clip  # the clip did bind somewhere
    torch.testing.assert_close(rgb.grad, to_rgb, rtol=1e-6, atol=1e-7)
    assert exp.grad.abs().max() > 1e-2  # the check is not vacuous


# ------------------------------------------------------------------------------ exact rules

EXACT_CASES = {
    # name: (xs_delta_t, xs_inv_steps, denoise_guidance_scale, hflip_prob, expected inversion grid)
    "defaults_from_zero": (200, 5, 1.0, 0.0, [0, 200, 400, 600]),
    "short_inversion_flipped": (150, 2, 1.0, 1.0, [310, 460]),
    "stride_dt_reverse_cfg": (None, None, 2.0, 0.0, [0, 90, 180, 270, 360, 450, 540]),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_ism_exact_update_rule(prior, embeds, monkeypatch, case):
    xs_delta_t, xs_inv_steps, dgs, hflip, grid = EXACT_CASES[case]
    cfg = ISMConfig(timesteps=PINNED_T, xs_delta_t=xs_delta_t, xs_inv_steps=xs_inv_steps,
                    denoise_guidance_scale=dgs, hflip_prob=hflip, loss_scale=2.0)
    cfg.validate()
    out, rgb, latents, exp, (t, s, start, stride, _, flipped) = _run_exact(prior, embeds, monkeypatch, cfg)
    assert (t, s) == (700, 610) and flipped == (hflip == 1.0)

    # U-Net calls: one per inversion step (with "" / reverse CFG [neg; ""]), ε_s at s with "",
    # then one batched CFG call [cond; negative] at t.
    per_inv = 2 if dgs > 1 else 1
    assert [int(c[1][0]) for c in prior.calls] == grid + [610, 700]
    assert [c[1].shape[0] for c in prior.calls] == [3 * per_inv] * (len(grid) + 1) + [6]
    _check_calls(prior, exp)
    torch.testing.assert_close(out.aux.x_s, exp.x_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.x_t, exp.x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.eps_s, out.aux.target, rtol=0, atol=0)  # ISM's target
    _check_grad(out, rgb, latents, exp, cfg, flipped)


def test_ism_interval_reaches_zero(prior, embeds, monkeypatch):
    """t ≤ Δt: s = 0 = τ_0, no inversion call; ε_s at 0, then CFG at t."""
    cfg = ISMConfig(timesteps=TimestepSchedule(t_min=Constant(0.05), t_max=Constant(0.05)), hflip_prob=0.0)
    out, rgb, latents, exp, (t, s, start, _, _, _) = _run_exact(prior, embeds, monkeypatch, cfg)
    assert (t, s, start) == (50, 0, 0)
    assert [int(c[1][0]) for c in prior.calls] == [0, 50]
    _check_calls(prior, exp)
    _check_grad(out, rgb, latents, exp, cfg, False)


@pytest.mark.parametrize("xs_inv_steps", [5, 2])
def test_tsm_exact_update_rule(prior, embeds, monkeypatch, xs_inv_steps):
    cfg = TSMConfig(timesteps=PINNED_T, xs_inv_steps=xs_inv_steps, hflip_prob=0.0, loss_scale=3.0)
    cfg.validate()
    out, rgb, latents, exp, (t, s, start, stride, mu, _) = _run_exact(prior, embeds, monkeypatch, cfg)
    assert mu == round(610 + 90 * math.sqrt(1 - 0.09)) == 696 == out.aux.mu
    grid = inversion_grid(start, s, stride)[:-1]
    assert grid == ([0, 200, 400, 600] if xs_inv_steps == 5 else [210, 410])
    # Calls: inversion steps, ε_s at s, ε_μ at μ (both with ""), CFG [cond; negative] at t.
    assert [int(c[1][0]) for c in prior.calls] == grid + [610, 696, 700]
    _check_calls(prior, exp)
    torch.testing.assert_close(out.aux.x_mu, exp.x_mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux.eps_mu, out.aux.target, rtol=0, atol=0)
    assert (out.aux.eps_mu - out.aux.eps_s).abs().max() > 1e-4  # path B's target is not ISM's
    _check_grad(out, rgb, latents, exp, cfg, False, clip=cfg.clip_value)


def test_tsm_gamma_limits(prior, embeds, monkeypatch):
    """γ = 1 is ISM bit for bit; γ = 0 puts μ at t, so the target is ε_""(x_t, t)."""
    common = dict(timesteps=PINNED_T, hflip_prob=0.5)
    rgb = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    cams = make_cams(2)

    def run(cfg):
        prior.calls.clear()
        out = cfg.build(prior)(rgb, cams, embeds, PROGRESS, torch.Generator().manual_seed(4))
        return out, list(prior.calls)

    ism, ism_calls = run(ISMConfig(**common))
    tsm1, tsm1_calls = run(TSMConfig(gamma=1.0, clip_value=None, **common))
    assert tsm1.aux.mu == tsm1.aux.s == 610
    assert torch.equal(ism.aux.grad, tsm1.aux.grad) and torch.equal(ism.loss, tsm1.loss)
    assert len(ism_calls) == len(tsm1_calls)

    tsm0, calls0 = run(TSMConfig(gamma=0.0, **common))
    assert tsm0.aux.mu == 700
    torch.testing.assert_close(tsm0.aux.x_mu, tsm0.aux.x_t, rtol=0, atol=0)
    null = embeds.null.expand(2, -1, -1)
    torch.testing.assert_close(tsm0.aux.target, prior.eps_formula(tsm0.aux.x_t, _tvec(700, 2), null))
    assert torch.equal(calls0[-2][2], null)


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("config_type", [ISMConfig, TSMConfig])
def test_determinism_under_seed(prior, embeds, config_type):
    guidance = config_type().build(prior)
    cams = make_cams(2)

    def run(seed):
        rgb = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(9)).requires_grad_()
        out = guidance(rgb, cams, embeds, 0.2, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    assert torch.equal(out.timesteps, out2.timesteps)
    assert torch.isfinite(out.loss) and grad.abs().sum() > 0
    out3, _ = run(8)
    assert not torch.equal(out.loss, out3.loss)


def test_default_timestep_range_and_interval():
    cfg = ISMConfig()
    assert [cfg.timesteps.bounds(p, T) for p in (0.0, 0.15, 0.3, 0.5, 1.0)] == [
        (20, 980), (20, 740), (20, 500), (20, 500), (20, 500)
    ]
    assert [interval_at(cfg.delta_t, p) for p in (0.0, 0.15, 0.3, 1.0)] == [100, 90, 80, 80]
    assert interval_at(Linear(100.0, 80.0, 0.0, 0.3), 0.195) == 87  # int(80 + 20 · 0.35), no 86


@pytest.mark.parametrize("config_type", [ISMConfig, TSMConfig])
@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_timesteps_inside_schedule(prior, embeds, config_type, progress):
    cfg = config_type()
    guidance = cfg.build(prior)
    lo, hi = cfg.timesteps.bounds(progress, T)
    delta = {0.0: 100, 0.5: 80, 1.0: 80}[progress]
    rgb, cams = torch.rand(2, 8, 8, 3), make_cams(2)
    seen = set()
    for seed in range(12):
        prior.calls.clear()
        out = guidance(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
        t = out.aux.t
        assert out.timesteps.dtype == torch.long and out.timesteps.shape == (2,)
        assert (out.timesteps == t).all() and lo <= t <= hi
        assert out.aux.delta_t == delta and out.aux.s == max(t - delta, 0)
        call_t = [int(c[1][0]) for c in prior.calls]
        assert all(0 <= u <= out.aux.s for u in call_t[:-2 if config_type is ISMConfig else -3])
        assert call_t[-1] == t and 0 <= min(call_t) and max(call_t) <= t
        if config_type is TSMConfig:
            assert out.aux.s <= out.aux.mu <= t and call_t[-2] == out.aux.mu
        seen.add(t)
    assert len(seen) > 1


@pytest.mark.parametrize("config_type", [ISMConfig, TSMConfig])
def test_no_gradient_to_prior_weights(prior, embeds, config_type):
    prior.weight.requires_grad_(True)  # would collect a gradient if the U-Net output were differentiated
    rgb = torch.rand(2, 8, 8, 3, requires_grad=True)
    out = config_type().build(prior)(rgb, make_cams(2), embeds, 0.5, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert prior.weight.grad is None
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_works_with_a_latent_prior(tmp_path):
    """4-channel VAE latents (tiny SD): offset noise is [1, 4, 1, 1], shared by views and pixels."""
    sd = StableDiffusionPrior.from_pretrained(make_tiny_sd_folder(tmp_path), device="cpu")
    embeds = build_prompt_embeds(sd, "a corgi")
    rgb = torch.rand(2, 24, 24, 3, requires_grad=True)
    guidance = TSMConfig(noise_offset=100.0).build(sd)
    out = guidance(rgb, make_cams(2), embeds, 0.3, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux.grad.shape[1] == 4
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.parameters())
    per_channel = out.aux.noise.mean(dim=(0, 2, 3))  # dominated by the shared offset
    assert per_channel.abs().min() > 1.0


# ------------------------------------------------------------------------------ TSM pixel-wise clip


def test_pixelwise_clip_helper():
    grad = torch.tensor([[[[0.2, -0.1, 0.05], [0.01, 0.02, -0.03], [0.0, 0.0, 0.0]]]])  # [1, 1, 3, 3]
    clipped = pixelwise_clip(grad, 0.1)
    torch.testing.assert_close(clipped[0, 0, 0], torch.tensor([0.1, -0.05, 0.025]))
    torch.testing.assert_close(clipped[0, 0, 1:], grad[0, 0, 1:], rtol=0, atol=0)
    channels_first = pixelwise_clip(grad.permute(0, 3, 1, 2), 0.1, dim=1)
    torch.testing.assert_close(channels_first.permute(0, 2, 3, 1), clipped)


def test_tsm_pixelwise_clip_reaches_rgb(prior, embeds):
    """The hook rescales the *total* gradient at the render (guidance + other terms) per pixel."""
    cams = make_cams(2)
    extra_weight = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(2))

    def grad_at_rgb(clip_value):
        rgb = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(3)).requires_grad_()
        cfg = TSMConfig(clip_value=clip_value, loss_scale=5.0)
        out = cfg.build(prior)(rgb, cams, embeds, 0.4, torch.Generator().manual_seed(6))
        (out.loss + 0.01 * (extra_weight * rgb).sum()).backward()  # e.g. a TV term on the render
        return rgb.grad

    raw = grad_at_rgb(None)
    peak = raw.abs().amax(dim=-1)  # [B, H, W] largest channel magnitude per pixel
    clip = float(peak.median())
    clipped = grad_at_rgb(clip)
    expected = raw * torch.clamp(clip / peak, max=1.0).unsqueeze(-1)
    torch.testing.assert_close(clipped, expected, rtol=1e-5, atol=1e-8)
    assert clipped.abs().amax(dim=-1).max() <= clip * (1 + 1e-5)
    assert (peak > clip * 1.01).sum() > 10  # many pixels were clipped ...
    assert torch.equal(clipped[peak <= clip], raw[peak <= clip])  # ... the others untouched
    # The clip is applied to the sum: clipping the guidance part alone would give another result.
    guidance_only = raw - 0.01 * extra_weight
    alt = guidance_only * torch.clamp(clip / guidance_only.abs().amax(-1), max=1.0).unsqueeze(-1)
    assert not torch.allclose(clipped, alt + 0.01 * extra_weight, atol=1e-6)


def test_tsm_without_grad_registers_nothing(prior, embeds):
    rgb = torch.rand(2, 8, 8, 3)  # no requires_grad: no hook, no error
    out = TSMConfig().build(prior)(rgb, make_cams(2), embeds, 0.4, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------ config


def test_inversion_grid():
    assert inversion_grid(0, 610, 200) == [0, 200, 400, 600, 610]
    assert inversion_grid(310, 610, 150) == [310, 460, 610]
    assert inversion_grid(5, 5, 200) == [5]
    with pytest.raises(ValueError):
        inversion_grid(0, 10, 0)
    with pytest.raises(ValueError):
        inversion_grid(10, 0, 5)


def test_trajectory_midpoint():
    assert trajectory_midpoint(610, 700, 0.3) == 696
    assert trajectory_midpoint(610, 700, 1.0) == 610
    assert trajectory_midpoint(610, 700, 0.0) == 700


def test_config_validate():
    ISMConfig().validate()
    TSMConfig().validate()
    ISMConfig(xs_delta_t=None, xs_inv_steps=None, denoise_guidance_scale=3.0, hflip_prob=0.0,
              noise_offset=0.0, view_dependent=None, delta_t=Constant(80.0)).validate()
    TSMConfig(gamma=0.0, clip_value=None).validate()
    TSMConfig(gamma=1.0).validate()
    bad = [
        ISMConfig(guidance_scale=-1.0),
        ISMConfig(denoise_guidance_scale=0.5),
        ISMConfig(xs_delta_t=0),
        ISMConfig(xs_delta_t=2.5),
        ISMConfig(xs_inv_steps=0),
        ISMConfig(noise_offset=-0.1),
        ISMConfig(noise_offset=float("nan")),
        ISMConfig(hflip_prob=1.5),
        ISMConfig(view_dependent="sometimes"),
        ISMConfig(loss_scale=float("inf")),
        ISMConfig(timesteps=TimestepSchedule(t_min=Constant(0.9), t_max=Constant(0.5))),
        ISMConfig(delta_t=Constant(0.5)),
        ISMConfig(delta_t=Linear(100.0, 0.0)),
        TSMConfig(guidance_scale=-1.0),
        TSMConfig(gamma=1.5),
        TSMConfig(gamma=-0.1),
        TSMConfig(clip_value=0.0),
        TSMConfig(clip_value=-1.0),
        TSMConfig(clip_value=float("nan")),
    ]
    for cfg in bad:
        with pytest.raises(ValueError):
            cfg.validate()


def test_configs_are_json_friendly():
    from dreamlab.config import to_jsonable

    for cfg in (ISMConfig(), TSMConfig()):
        text = json.dumps(to_jsonable(cfg))
        assert '"Linear"' in text
        assert dataclasses.asdict(cfg)["delta_t"] == {"start": 100.0, "end": 80.0, "begin": 0.0, "finish": 0.3}
    assert dataclasses.asdict(TSMConfig())["clip_value"] == 0.05
