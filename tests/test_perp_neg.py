"""Perp-Neg (threestudio's version, spec §1.2) as an option of SDS and ASD: the pure helpers
against hand computation, the per-camera embeddings and weights, the full SDS / ASD update
rules recomputed by hand from a closed-form stub prior, and behaviour (perp_neg=False is the
old SDS bit for bit, one batched prior call, determinism, validation, JSON round trip)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from guidance_fixtures import StubPrior, capture_latents, stub_embeds

from dreamlab.guidance.asd import ASDConfig
from dreamlab.guidance.common import (
    PerpNegWeights,
    TimestepSchedule,
    cfg_combine,
    perp_neg_combine,
    perpendicular_component,
    sample_noise,
    shifted_exponential_decay,
    surrogate_loss,
    weighting,
)
from dreamlab.guidance.sds import SDSConfig
from dreamlab.prompts import PromptConfig, embeds_for_cameras, perp_neg_embeds_for_cameras
from dreamlab.schedules import Constant, Linear
from dreamlab.types import VIEW_NAMES, orbit_cameras

T = 1000
TOL = dict(rtol=0, atol=1e-6)
FRONT, SIDE, BACK, OVERHEAD = (VIEW_NAMES.index(v) for v in ("front", "side", "back", "overhead"))

# threestudio defaults (a, b, c) of f(r) = a exp(-b r) + c
F_SB, F_FSB, F_FS = (1.0, 0.5, -0.606), (1.0, 0.5, 0.967), (4.0, 0.5, -2.426)


class PatternStubPrior(StubPrior):
    """StubPrior plus a term that makes ε̂ depend on the text embedding through a fixed spatial
    pattern, so that ε_y − ε_∅ of different prompts are NOT parallel (with the plain StubPrior
    they are constant images, and every perpendicular component would vanish)."""

    def __init__(self) -> None:
        # small coefficients keep |ε̂| (CFG-amplified) ~ 0.5, so float32 rounding stays well
        # below the 1e-6 tolerance of the exact-rule tests
        super().__init__(a=0.05)
        self.pattern = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def eps_formula(self, x_t, t, embeds):
        v = embeds.float().mean(dim=1)  # [N, 6]
        return super().eps_formula(x_t, t, embeds) + self.weight * 0.02 * torch.einsum(
            "nk,kchw->nchw", v, self.pattern
        )


@pytest.fixture
def prior():
    return PatternStubPrior()


@pytest.fixture
def embeds(prior):
    return stub_embeds(prior, negative="blurry")


# (elevation, azimuth) in dreamlab's convention: azimuth 0 looks at the front.
CAMERAS = {
    "front": (10.0, 20.0),
    "front_side": (5.0, -60.0),
    "side": (0.0, -100.0),
    "back": (15.0, 165.0),
    "overhead": (75.0, 40.0),
}


def _cams(names):
    elev = torch.tensor([CAMERAS[n][0] for n in names])
    azim = torch.tensor([CAMERAS[n][1] for n in names])
    n = len(names)
    return orbit_cameras(elev, azim, torch.full((n,), 2.5), torch.full((n,), 45.0), 16, 16)


def _rgb(batch, seed=5, res=16):
    return torch.rand(batch, res, res, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _decay(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def _hand_perp_neg(elevation, azimuth, embeds, scale=1.0):
    """Per camera (python floats): positive, [neg1, neg2], [w1, w2] by spec §1.2."""
    E = embeds.by_view
    if elevation > 60.0:
        return E[OVERHEAD], [embeds.negative, embeds.negative], [0.0, 0.0]
    phi = abs(azimuth)
    if phi < 90.0:
        r = 1.0 - phi / 90.0
        pos = r * E[FRONT] + (1.0 - r) * E[SIDE]
        return pos, [E[FRONT], E[SIDE]], [-scale * _decay(F_FS, r), -scale * _decay(F_FS, 1.0 - r)]
    r = 2.0 - phi / 90.0
    pos = r * E[SIDE] + (1.0 - r) * E[BACK]
    return pos, [E[SIDE], E[FRONT]], [-scale * _decay(F_SB, r), -scale * _decay(F_FSB, r)]


def _hand_perp(a, b):
    """perp(a, b) for ONE sample [C, h, w]."""
    return a - (a * b).sum() / max(float((b * b).sum()), 1e-6) * b


# ------------------------------------------------------------------------------ pure helpers


def test_perpendicular_component():
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # parallel vectors: 0 (per sample, different factors)
    par = torch.stack([3.0 * y[0], -2.0 * y[1]])
    torch.testing.assert_close(perpendicular_component(par, y), torch.zeros_like(y), rtol=0, atol=1e-6)
    # orthogonal vectors: unchanged
    flat = y.flatten(1)
    z = torch.randn(2, 48, generator=torch.Generator().manual_seed(1))
    z = z - ((z * flat).sum(1, keepdim=True) / (flat * flat).sum(1, keepdim=True)) * flat
    z = z.view_as(y)
    torch.testing.assert_close(perpendicular_component(z, y), z, rtol=0, atol=1e-6)
    # general: the result is orthogonal to y and x − result is parallel to y (hand formula)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    p = perpendicular_component(x, y)
    for i in range(2):
        torch.testing.assert_close(p[i], _hand_perp(x[i], y[i]), rtol=0, atol=1e-6)
        assert abs(float((p[i] * y[i]).sum())) < 1e-4
    # a zero reference direction: the 1e-6 floor keeps x unchanged (no NaN)
    torch.testing.assert_close(perpendicular_component(x, torch.zeros_like(x)), x)


def test_decay_weights_at_spec_points():
    w = PerpNegWeights()
    assert (w.f_sb, w.f_fsb, w.f_fs, w.f_sf) == (F_SB, F_FSB, F_FS, F_FS)
    r = torch.tensor([0.0, 0.5, 1.0])
    expected = {
        "f_fs": [1.574, 4.0 * math.exp(-0.25) - 2.426, 4.0 * math.exp(-0.5) - 2.426],
        "f_sb": [0.394, math.exp(-0.25) - 0.606, math.exp(-0.5) - 0.606],
        "f_fsb": [1.967, math.exp(-0.25) + 0.967, math.exp(-0.5) + 0.967],
    }
    numbers = {  # the same, written out
        "f_fs": [1.574, 0.6892031, 0.0001226],
        "f_sb": [0.394, 0.1728008, 0.0005307],
        "f_fsb": [1.967, 1.7458008, 1.5735307],
    }
    for name, values in expected.items():
        got = shifted_exponential_decay(*getattr(w, name), r)
        torch.testing.assert_close(got, torch.tensor(values), rtol=0, atol=1e-6)
        torch.testing.assert_close(got, torch.tensor(numbers[name]), rtol=0, atol=1e-6)
    # f_fs(1) = 0 (up to threestudio's 3-digit constant)
    assert abs(float(shifted_exponential_decay(*w.f_fs, torch.tensor(1.0)))) < 2e-4

    # negative_weights: front half [−f_fs(r), −f_sf(1 − r)], back half [−f_sb(r), −f_fsb(r)]
    r = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5, 0.0])
    front_half = torch.tensor([True, True, True, False, False, False])
    got = w.negative_weights(r, front_half)
    want = torch.tensor(
        [
            [-0.0001226, -1.574],
            [-0.6892031, -0.6892031],
            [-1.574, -0.0001226],
            [-0.0005307, -1.5735307],
            [-0.1728008, -1.7458008],
            [-0.394, -1.967],
        ]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got <= 0).all()


def test_perp_neg_combine_by_hand():
    g = torch.Generator().manual_seed(4)
    unc, pos = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    negs = torch.randn(3, 2, 2, 5, 5, generator=g)
    weights = torch.tensor([[-1.5, -0.2], [0.0, -0.7], [0.0, 0.0]])
    got = perp_neg_combine(unc, pos, negs, weights, 7.5)
    for b in range(3):
        e_pos = pos[b] - unc[b]
        acc = sum(weights[b, i] * _hand_perp(negs[b, i] - unc[b], e_pos) for i in range(2))
        torch.testing.assert_close(got[b], unc[b] + 7.5 * (e_pos + acc), rtol=0, atol=1e-5)
    # zero weights: plain CFG (convention A) with the positive as the condition
    torch.testing.assert_close(got[2], cfg_combine(unc[2], pos[2], 7.5), rtol=0, atol=1e-6)


def test_perp_neg_weights_validate():
    PerpNegWeights().validate()
    for bad in [PerpNegWeights(f_sb=(1.0, 0.5)), PerpNegWeights(f_fs=(4.0, float("nan"), 0.0))]:
        with pytest.raises(ValueError):
            bad.validate()


# ------------------------------------------------------------------------------ per-camera embeddings


@pytest.mark.parametrize(
    "elev, azim, pos_views, neg_views, weights",
    [
        # pure front: r = 1
        (0.0, 0.0, {FRONT: 1.0}, (FRONT, SIDE), (-0.0001226, -1.574)),
        # halfway front/side: r = 0.5
        (0.0, 45.0, {FRONT: 0.5, SIDE: 0.5}, (FRONT, SIDE), (-0.6892031, -0.6892031)),
        (0.0, -45.0, {FRONT: 0.5, SIDE: 0.5}, (FRONT, SIDE), (-0.6892031, -0.6892031)),
        # |φ| = 90 belongs to the side/back half (threestudio |φ| < 90): r = 1
        (0.0, 90.0, {SIDE: 1.0}, (SIDE, FRONT), (-0.0005307, -1.5735307)),
        (0.0, -90.0, {SIDE: 1.0}, (SIDE, FRONT), (-0.0005307, -1.5735307)),
        # halfway side/back: r = 0.5
        (0.0, -135.0, {SIDE: 0.5, BACK: 0.5}, (SIDE, FRONT), (-0.1728008, -1.7458008)),
        # pure back: r = 0 (also 180 and -180 wrap alike)
        (0.0, 180.0, {BACK: 1.0}, (SIDE, FRONT), (-0.394, -1.967)),
        (0.0, -180.0, {BACK: 1.0}, (SIDE, FRONT), (-0.394, -1.967)),
        # 350° wraps to −10°: front half, r = 8/9
        (0.0, 350.0, {FRONT: 8 / 9, SIDE: 1 / 9}, (FRONT, SIDE), None),
        # overhead (elevation > 60): E(overhead), negatives = negative prompt, weights 0
        (61.0, 170.0, {OVERHEAD: 1.0}, None, (0.0, 0.0)),
        # exactly 60 is not overhead (strict, as view_direction_index)
        (60.0, 0.0, {FRONT: 1.0}, (FRONT, SIDE), (-0.0001226, -1.574)),
    ],
)
def test_perp_neg_embeds_for_cameras(prior, embeds, elev, azim, pos_views, neg_views, weights):
    cams = orbit_cameras(torch.tensor([elev]), torch.tensor([azim]), torch.tensor([2.5]),
                         torch.tensor([45.0]), 16, 16)
    pos, uncond, negs, w = perp_neg_embeds_for_cameras(embeds, cams, PerpNegWeights())
    E = embeds.by_view
    want_pos = sum(c * E[v] for v, c in pos_views.items())
    torch.testing.assert_close(pos[0], want_pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond[0], embeds.negative)
    assert negs.shape == (1, 2, *E.shape[1:]) and w.shape == (1, 2)
    if neg_views is None:
        assert torch.equal(negs[0, 0], embeds.negative) and torch.equal(negs[0, 1], embeds.negative)
    else:
        assert torch.equal(negs[0, 0], E[neg_views[0]]) and torch.equal(negs[0, 1], E[neg_views[1]])
    if weights is None:
        weights = (-_decay(F_FS, 8 / 9), -_decay(F_FS, 1 / 9))
    torch.testing.assert_close(w[0], torch.tensor(weights), rtol=0, atol=1e-6)
    # the PromptConfig method uses its overhead threshold
    high = PromptConfig(overhead_threshold=80.0)
    *_, w80 = high.perp_neg_embeds_for_cameras(embeds, cams, PerpNegWeights())
    if elev > 60.0:
        assert (w80 != 0).all()


def test_perp_neg_embeds_match_hand_for_a_batch(prior, embeds):
    names = list(CAMERAS)
    pos, uncond, negs, w = perp_neg_embeds_for_cameras(embeds, _cams(names), PerpNegWeights())
    for b, name in enumerate(names):
        hp, hn, hw = _hand_perp_neg(*CAMERAS[name], embeds)
        torch.testing.assert_close(pos[b], hp, rtol=0, atol=1e-6)
        torch.testing.assert_close(negs[b], torch.stack(hn), rtol=0, atol=0)
        torch.testing.assert_close(w[b], torch.tensor(hw), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ SDS + Perp-Neg


CAMERA_SETS = [["front"], ["side"], ["back"], ["overhead"], ["front_side"], list(CAMERAS)]


def _hand_eps_pred(prior, x_t, t, embeds, names, scale, neg_scale):
    """ε̂ of Perp-Neg recomputed per view from the prior's closed form (spec §1.2), in float64."""
    rows = []
    for b, name in enumerate(names):
        hp, hn, hw = _hand_perp_neg(*CAMERAS[name], embeds, scale=neg_scale)
        xb, tb = x_t[b : b + 1].double(), t[b : b + 1]
        eps_u = prior.eps_formula(xb, tb, embeds.negative[None].double())[0]
        e_pos = prior.eps_formula(xb, tb, hp[None].double())[0] - eps_u
        acc = torch.zeros_like(e_pos)
        for wi, ni in zip(hw, hn):
            e_i = prior.eps_formula(xb, tb, ni[None].double())[0] - eps_u
            acc = acc + wi * _hand_perp(e_i, e_pos)
        rows.append(eps_u + scale * (e_pos + acc))
    return torch.stack(rows).float()


@pytest.mark.parametrize("names", CAMERA_SETS, ids=["+".join(n) for n in CAMERA_SETS])
def test_sds_perp_neg_exact_update_rule(prior, embeds, monkeypatch, names):
    latents_store = capture_latents(prior, monkeypatch)
    cfg = SDSConfig(guidance_scale=7.5, perp_neg=True, loss_scale=2.0)
    batch, progress, seed = len(names), 0.4, 21
    cams = _cams(names)
    rgb = _rgb(batch)
    out = cfg.build(prior)(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    latents = latents_store[0]
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.aux.noise, noise, rtol=0, atol=0)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise

    # ONE batched call: [pos; ∅; 1st negatives; 2nd negatives], all at (x_t, t).
    assert len(prior.calls) == 1
    x_in, t_in, e_in = prior.calls[0]
    torch.testing.assert_close(x_in, x_t.repeat(4, 1, 1, 1), rtol=0, atol=0)
    assert torch.equal(t_in, t.repeat(4))
    hands = [_hand_perp_neg(*CAMERAS[n], embeds) for n in names]
    want_e = torch.cat(
        [torch.stack([h[0] for h in hands]), embeds.negative.expand(batch, -1, -1),
         torch.stack([h[1][0] for h in hands]), torch.stack([h[1][1] for h in hands])]
    )
    torch.testing.assert_close(e_in, want_e, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.aux.neg_weights, torch.tensor([h[2] for h in hands]), rtol=0, atol=1e-6)

    eps_hat = _hand_eps_pred(prior, x_t, t, embeds, names, 7.5, 1.0)
    w = (1 - abar)
    expected = w * (eps_hat - noise)
    torch.testing.assert_close(out.aux.eps_pred, eps_hat, **TOL)
    torch.testing.assert_close(out.aux.grad, expected, **TOL)
    torch.testing.assert_close(latents.grad, 2.0 * expected / batch, **TOL)
    torch.testing.assert_close(out.grad_norm, expected.norm())
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0

    # The perpendicular negatives really act (except overhead, whose weights are 0):
    # compare with plain CFG on the same positive embedding.
    plain = torch.stack([
        cfg_combine(prior.eps_formula(x_t[b:b + 1], t[b:b + 1], embeds.negative[None])[0],
                    prior.eps_formula(x_t[b:b + 1], t[b:b + 1], hands[b][0][None])[0], 7.5)
        for b in range(batch)
    ])
    for b, name in enumerate(names):
        diff = (out.aux.eps_pred[b] - plain[b]).abs().max()
        assert (diff < 1e-5) if name == "overhead" else (diff > 1e-3), (name, diff)


def test_sds_perp_neg_overhead_equals_discrete_sds(prior, embeds):
    """Overhead: Perp-Neg weights are 0 and the positive is E(overhead) = the discrete prompt."""
    cams = _cams(["overhead", "overhead"])
    a = SDSConfig(guidance_scale=7.5, perp_neg=True).build(prior)(
        _rgb(2), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    b = SDSConfig(guidance_scale=7.5, view_dependent="discrete").build(prior)(
        _rgb(2), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.aux.grad, b.aux.grad, **TOL)


def test_sds_perp_neg_scale(prior, embeds):
    """perp_neg_scale multiplies the weights; 0 is plain CFG on the interpolated positive."""
    names = ["front", "side", "back"]
    cams = _cams(names)
    out = SDSConfig(guidance_scale=7.5, perp_neg=True, perp_neg_scale=0.5).build(prior)(
        _rgb(3), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        out.aux.neg_weights, torch.tensor([_hand_perp_neg(*CAMERAS[n], embeds, 0.5)[2] for n in names]),
        rtol=0, atol=1e-6)
    x_t, t, _ = prior.calls[-1]
    x_t, t = x_t[:3], t[:3]
    want = _hand_eps_pred(prior, x_t, t, embeds, names, 7.5, 0.5)
    torch.testing.assert_close(out.aux.eps_pred, want, **TOL)
    zero = SDSConfig(guidance_scale=7.5, perp_neg=True, perp_neg_scale=0.0).build(prior)(
        _rgb(3), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    pos = torch.stack([_hand_perp_neg(*CAMERAS[n], embeds)[0] for n in names])
    unc = embeds.negative.expand(3, -1, -1)
    want = cfg_combine(prior.eps_formula(x_t, t, unc), prior.eps_formula(x_t, t, pos), 7.5)
    torch.testing.assert_close(zero.aux.eps_pred, want, **TOL)


def _sds_before_perp_neg(cfg, prior, prompt, rgb, cams, embeds, progress, generator):
    """SDS.__call__ as it was before Perp-Neg existed (same ops, same order)."""
    batch = rgb.shape[0]
    latents = prior.encode_images(rgb.permute(0, 3, 1, 2))
    t = cfg.timesteps(progress, batch, prior.num_train_timesteps, generator).to(prior.device)
    noise = sample_noise(tuple(latents.shape), generator, latents.device)
    cond, uncond = prompt.embeds_for_cameras(embeds, cams, cfg.view_dependent or prompt.view_dependent)
    abar = prior.alphas_cumprod
    alpha = abar[t].float().view(-1, 1, 1, 1).sqrt()
    sigma = (1.0 - abar[t].float().view(-1, 1, 1, 1)).sqrt()
    with torch.no_grad():
        x_t = alpha * latents.detach() + sigma * noise
        eps = prior.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        eps_cond, eps_uncond = eps.chunk(2)
        eps_pred = cfg_combine(eps_uncond, eps_cond, cfg.guidance_scale)
        w = weighting(cfg.weighting, abar, t)
        grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (eps_pred - noise))
        if cfg.grad_clip is not None:
            clip = float(cfg.grad_clip(progress))
            grad = grad.clamp(-clip, clip)
    return cfg.loss_scale * surrogate_loss(latents, grad, batch), grad, eps_pred


@pytest.mark.parametrize("mode", ["discrete", "interpolated", "none"])
def test_sds_without_perp_neg_is_bit_identical(prior, embeds, mode):
    prompt = PromptConfig(view_dependent=mode)
    cams = _cams(list(CAMERAS))
    for cfg in [SDSConfig(guidance_scale=7.5, perp_neg=False), SDSConfig(grad_clip=Constant(0.05))]:
        assert cfg.perp_neg is False
        rgb_a, rgb_b = _rgb(5), _rgb(5)
        out = cfg.build(prior, prompt)(rgb_a, cams, embeds, 0.6, torch.Generator().manual_seed(9))
        out.loss.backward()
        assert len(prior.calls) == 1 and prior.calls[0][0].shape[0] == 10
        loss, grad, eps_pred = _sds_before_perp_neg(
            cfg, prior, prompt, rgb_b, cams, embeds, 0.6, torch.Generator().manual_seed(9))
        loss.backward()
        assert torch.equal(out.loss, loss) and torch.equal(out.aux.grad, grad)
        assert torch.equal(out.aux.eps_pred, eps_pred) and torch.equal(rgb_a.grad, rgb_b.grad)
        assert out.aux.neg_weights is None
        prior.calls.clear()


# ------------------------------------------------------------------------------ ASD + Perp-Neg


@pytest.mark.parametrize("names", [["front"], ["side"], ["back"], ["overhead"], list(CAMERAS)],
                         ids=["front", "side", "back", "overhead", "all"])
def test_asd_perp_neg_exact_update_rule(prior, embeds, monkeypatch, names):
    latents_store = capture_latents(prior, monkeypatch)
    cfg = ASDConfig(guidance_scale=7.5, plus_ratio=0.3, perp_neg=True, loss_scale=2.0)
    assert cfg.perp_neg_scale == 0.5  # ScaleDreamer guidance_perp_neg: -0.5
    batch, progress, seed = len(names), 0.4, 11
    cams = _cams(names)
    rgb = _rgb(batch)
    out = cfg.build(prior)(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    latents = latents_store[0]
    noise = torch.randn(latents.shape, generator=g)
    min_step = cfg.timesteps.bounds(progress, T)[0]
    cap = torch.minimum(0.3 * (t.double() - min_step), (T - 1 - t).double()).clamp(min=0)
    cap = cap * torch.rand(batch, generator=g).double()
    t_plus = (t + torch.floor(cap + 1e-6).long()).clamp(1, T - 1)
    assert torch.equal(out.timesteps, t) and torch.equal(out.aux.t_plus, t_plus)

    x0 = latents.detach()
    ab, abp = prior.alphas_cumprod[t].view(-1, 1, 1, 1), prior.alphas_cumprod[t_plus].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    x_plus = abp.sqrt() * x0 + (1 - abp).sqrt() * noise

    # ONE call: [pos; ∅; 1st neg; 2nd neg] at (x_t, t), then pos at (x_{t⁺}, t⁺).
    assert len(prior.calls) == 1
    x_in, t_in, e_in = prior.calls[0]
    torch.testing.assert_close(x_in, torch.cat([x_t, x_t, x_t, x_t, x_plus]), rtol=0, atol=0)
    assert torch.equal(t_in, torch.cat([t, t, t, t, t_plus]))
    hands = [_hand_perp_neg(*CAMERAS[n], embeds, scale=0.5) for n in names]
    pos = torch.stack([h[0] for h in hands])
    want_e = torch.cat([pos, embeds.negative.expand(batch, -1, -1), torch.stack([h[1][0] for h in hands]),
                        torch.stack([h[1][1] for h in hands]), pos])
    torch.testing.assert_close(e_in, want_e, rtol=0, atol=1e-6)

    eps_hat = _hand_eps_pred(prior, x_t, t, embeds, names, 7.5, 0.5)
    eps_plus = prior.eps_formula(x_plus, t_plus, pos)  # no CFG, Perp-Neg positive (ScaleDreamer)
    expected = (1 - ab) * (eps_hat - eps_plus)
    torch.testing.assert_close(out.aux.eps_plus, eps_plus, **TOL)
    torch.testing.assert_close(out.aux.grad, expected, **TOL)
    torch.testing.assert_close(latents.grad, 2.0 * expected / batch, **TOL)
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_asd_without_perp_neg_unchanged(prior, embeds):
    """Default ASD: three blocks [cond; uncond; cond] with the discrete view prompt, as before."""
    cams = _cams(list(CAMERAS))
    out = ASDConfig().build(prior)(_rgb(5), cams, embeds, 0.3, torch.Generator().manual_seed(2))
    _, _, e_in = prior.calls[0]
    cond, uncond = embeds_for_cameras(embeds, cams, "discrete")
    assert torch.equal(e_in, torch.cat([cond, uncond, cond])) and out.aux.neg_weights is None


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("make", [lambda: SDSConfig(perp_neg=True), lambda: ASDConfig(perp_neg=True)],
                         ids=["sds", "asd"])
def test_perp_neg_behaviour(embeds, make):
    prior = PatternStubPrior()
    prior.weight.requires_grad_(True)  # a prior weight that WOULD receive gradient if touched
    cfg = make()
    cfg.validate()
    guidance = cfg.build(prior)
    cams = _cams(list(CAMERAS))

    def run(seed, progress=0.3):
        rgb = _rgb(5, seed=99)
        out = guidance(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert prior.weight.grad is None
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    assert not torch.equal(out.loss, run(8)[0].loss)
    for progress in (0.0, 0.5, 1.0):
        lo, hi = cfg.timesteps.bounds(progress, T)
        o, _ = run(3, progress)
        assert lo <= o.timesteps.min() and o.timesteps.max() <= hi


def test_perp_neg_config_validation(prior):
    for cls in (SDSConfig, ASDConfig):
        cls(perp_neg=True).validate()
        cls(perp_neg=True, view_dependent="interpolated").validate()
        cls(view_dependent="none").validate()  # fine without Perp-Neg
        bad = [
            cls(perp_neg=True, view_dependent="none"),
            cls(perp_neg=True, perp_neg_scale=float("nan")),
            cls(perp_neg_weights=PerpNegWeights(f_fsb=(1.0, 0.5))),
        ]
        for cfg in bad:
            with pytest.raises(ValueError):
                cfg.validate()
        with pytest.raises(ValueError, match="view"):
            cls(perp_neg=True).build(prior, PromptConfig(view_dependent="none"))
        cls(perp_neg=True, view_dependent="discrete").build(prior, PromptConfig(view_dependent="none"))


def test_perp_neg_config_defaults_and_json():
    from dreamlab.config import _from_jsonable, _known_dataclasses, to_jsonable

    assert SDSConfig().perp_neg is False and SDSConfig().perp_neg_scale == 1.0
    assert ASDConfig().perp_neg is False and ASDConfig().perp_neg_scale == 0.5
    cfg = SDSConfig(perp_neg=True, perp_neg_weights=PerpNegWeights(f_sb=(2.0, 0.25, -1.0)),
                    timesteps=TimestepSchedule(t_max=Linear(0.98, 0.5)))
    text = json.dumps(to_jsonable(cfg))
    back = _from_jsonable(json.loads(text), SDSConfig, _known_dataclasses())
    assert back == cfg and isinstance(back.perp_neg_weights.f_sb, tuple)
    assert dataclasses.asdict(ASDConfig())["perp_neg_weights"]["f_fs"] == (4.0, 0.5, -2.426)


def test_perp_neg_cli_options():
    from dreamlab.guidance.options import options_type

    for name, cls in (("sds", SDSConfig), ("asd", ASDConfig)):
        fields = {f.name for f in dataclasses.fields(options_type(name, cls))}
        assert {"perp_neg", "perp_neg_scale"} <= fields

