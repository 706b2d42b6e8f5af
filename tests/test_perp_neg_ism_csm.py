"""Perp-Neg as an option of ISM / TSM (LucidDreamer's form) and CSM (CSD's ``a_p·PerpNeg`` term):
LucidDreamer's weight functions against hand values, the exact update rules recomputed by hand
from a closed-form stub prior (U-Net calls and embeddings included), behaviour with the option
off, validation, JSON round trip and CLI options."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from guidance_fixtures import StubPrior, capture_latents, stub_embeds

from dreamlab.guidance.common import LucidPerpNegWeights, PerpNegWeights, TimestepSchedule
from dreamlab.guidance.csm import CSMConfig
from dreamlab.guidance.ism import ISMConfig
from dreamlab.guidance.tsm import TSMConfig
from dreamlab.prompts import PromptConfig, embeds_for_cameras
from dreamlab.schedules import Constant, Linear
from dreamlab.types import VIEW_NAMES, orbit_cameras, wrap_azimuth

T = 1000
TOL = dict(rtol=1e-6, atol=1e-6)
FRONT, SIDE, BACK, OVERHEAD = (VIEW_NAMES.index(v) for v in ("front", "side", "back", "overhead"))


class PatternStubPrior(StubPrior):
    """StubPrior plus a prompt-dependent spatial pattern, so that ε_y − ε_∅ of different prompts
    are not parallel (with the plain StubPrior every perpendicular component would vanish)."""

    def __init__(self) -> None:
        super().__init__(a=0.05)
        self.pattern = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))

    def eps_formula(self, x_t, t, embeds):
        v = embeds.float().mean(dim=1)  # [N, 6]
        pattern = self.pattern.to(v.dtype)
        return super().eps_formula(x_t, t, embeds) + self.weight * 0.02 * torch.einsum("nk,kchw->nchw", v, pattern)


@pytest.fixture
def prior():
    return PatternStubPrior()


@pytest.fixture
def embeds(prior):
    return stub_embeds(prior, negative="blurry")  # negative ≠ "" so the roles are tested


# (elevation, azimuth), dreamlab convention (0 = front). Chosen to hit every branch of
# LucidDreamer's weights: r > 0.8 and r < 0.2 cut-offs on both halves, and |φ| = 90 exactly.
CAMERAS = {
    "front": (10.0, 10.0),  # r = 0.89: front weight cut (r > 0.8)
    "front_side": (5.0, -60.0),  # r = 0.33: both weights active
    "near_side": (0.0, 80.0),  # r = 0.11: side weight cut (r < 0.2)
    "minus_90": (0.0, -90.0),  # LucidDreamer's front half (r = 0); dreamlab's back half (r = 1)
    "plus_90": (0.0, 90.0),
    "side_back": (15.0, 130.0),  # back half, r = 0.56
    "back": (0.0, 180.0),  # r = 0
    "high": (75.0, 40.0),  # LucidDreamer has no overhead view: a plain front-half camera
}


def _cams(names):
    elev = torch.tensor([CAMERAS[n][0] for n in names])
    azim = torch.tensor([CAMERAS[n][1] for n in names])
    n = len(names)
    return orbit_cameras(elev, azim, torch.full((n,), 2.5), torch.full((n,), 45.0), 8, 8)


def _rgb(batch, seed=5):
    return torch.rand(batch, 8, 8, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _lucid(azimuth, embeds, neg_w=-2.0, front_decay=2.0, side_decay=10.0):
    """LucidDreamer ``get_pos_neg_text_embeddings`` for one camera, in python floats:
    (positive, [negatives], [weights]) with LucidDreamer's own ordering."""
    E = embeds.by_view
    azimuth = float(wrap_azimuth(torch.tensor(azimuth)))
    if -90 <= azimuth < 90:
        r = 1 - azimuth / 90 if azimuth >= 0 else 1 + azimuth / 90
        pos = r * E[FRONT] + (1 - r) * E[SIDE]
        w_front = 0.0 if r > 0.8 else math.exp(-r * front_decay) * neg_w
        w_side = 0.0 if r < 0.2 else math.exp(-(1 - r) * side_decay) * neg_w
        return pos, [E[FRONT], E[SIDE]], [w_front, w_side]
    r = 1 - (azimuth - 90) / 90 if azimuth >= 0 else 1 + (azimuth + 90) / 90
    pos = r * E[SIDE] + (1 - r) * E[BACK]
    w_side = 0.0 if r > 0.8 else math.exp(-r * side_decay) * neg_w / 2
    return pos, [E[SIDE], E[FRONT]], [w_side, neg_w]


def _decay(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def _threestudio(elevation, azimuth, embeds, overhead_threshold=60.0):
    """threestudio ``get_text_embeddings_perp_neg`` for one camera (spec §1.2)."""
    E, f = embeds.by_view, PerpNegWeights()
    if elevation > overhead_threshold:
        return E[OVERHEAD], [embeds.negative, embeds.negative], [0.0, 0.0]
    phi = abs(float(wrap_azimuth(torch.tensor(azimuth))))
    if phi < 90.0:
        r = 1.0 - phi / 90.0
        return r * E[FRONT] + (1 - r) * E[SIDE], [E[FRONT], E[SIDE]], [-_decay(f.f_fs, r), -_decay(f.f_sf, 1 - r)]
    r = 2.0 - phi / 90.0
    return r * E[SIDE] + (1 - r) * E[BACK], [E[SIDE], E[FRONT]], [-_decay(f.f_sb, r), -_decay(f.f_fsb, r)]


def _perp(a, b):
    """perp(a, b) for ONE sample."""
    return a - (a * b).sum() / max(float((b * b).sum()), 1e-6) * b


def _hand_perp_neg_eps(prior, x_t, t, uncond, hands, scale, neg_scale):
    """ε̂ = ε_∅ + s (e_pos + Σ λ w_i perp(e_i, e_pos)) per view, float64 (LucidDreamer
    ``weighted_perpendicular_aggregator`` / threestudio's Perp-Neg branch)."""
    rows = []
    for b, (pos, negs, ws) in enumerate(hands):
        xb, tb = x_t[b : b + 1].double(), t[b : b + 1]
        eps_u = prior.eps_formula(xb, tb, uncond[None].double())[0]
        e_pos = prior.eps_formula(xb, tb, pos[None].double())[0] - eps_u
        acc = torch.zeros_like(e_pos)
        for w, n in zip(ws, negs):
            acc = acc + neg_scale * w * _perp(prior.eps_formula(xb, tb, n[None].double())[0] - eps_u, e_pos)
        rows.append(eps_u + scale * (e_pos + acc))
    return torch.stack(rows)


# ------------------------------------------------------------------------------ LucidDreamer weights


def test_lucid_weights_by_hand():
    w = LucidPerpNegWeights()
    assert (w.negative_w, w.front_decay, w.side_decay) == (-2.0, 2.0, 10.0)
    assert w.overhead_view is False and PerpNegWeights.overhead_view is True
    # (the cut-offs are strict; values straddle them rather than sit on them, where float32
    # rounding of r decides)
    r = torch.tensor([1.0, 0.81, 0.79, 0.5, 0.21, 0.19, 0.0, 1.0, 0.81, 0.79, 0.5, 0.0])
    front_half = torch.tensor([True] * 7 + [False] * 5)
    got = w.negative_weights(r, front_half)
    want = []
    for ri, fh in zip(r.tolist(), front_half.tolist()):
        if fh:
            want.append([0.0 if ri > 0.8 else -2 * math.exp(-2 * ri), 0.0 if ri < 0.2 else -2 * math.exp(-10 * (1 - ri))])
        else:
            want.append([0.0 if ri > 0.8 else -math.exp(-10 * ri), -2.0])
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    # spot values: r = 0.5 front half, r = 0.5 and 0 back half
    torch.testing.assert_close(got[3], torch.tensor([-2 * math.exp(-1.0), -2 * math.exp(-5.0)]))
    torch.testing.assert_close(got[10], torch.tensor([-math.exp(-5.0), -2.0]))
    torch.testing.assert_close(got[11], torch.tensor([-1.0, -2.0]))
    # both halves agree at |φ| = 90°: front half r = 0 is (front −2, side 0); back half r = 1 is (side 0, front −2)
    assert got[6].tolist() == [-2.0, 0.0] and got[7].tolist() == [0.0, -2.0]
    scaled = LucidPerpNegWeights(negative_w=-1.0, front_decay=1.0, side_decay=4.0).negative_weights(
        torch.tensor([0.5]), torch.tensor([True]))
    torch.testing.assert_close(scaled, torch.tensor([[-math.exp(-0.5), -math.exp(-2.0)]]))


def test_lucid_weights_validate():
    LucidPerpNegWeights().validate()
    for bad in [LucidPerpNegWeights(negative_w=float("nan")), LucidPerpNegWeights(side_decay=float("inf")),
                LucidPerpNegWeights(front_decay="2")]:
        with pytest.raises(ValueError):
            bad.validate()


# ------------------------------------------------------------------------------ ISM / TSM


def _ab(prior, t):
    abar = prior.alphas_cumprod[torch.tensor([t])].double().view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def _ddim(prior, x, eps, t_from, t_to):
    (a_f, s_f), (a_t, s_t) = _ab(prior, t_from), _ab(prior, t_to)
    return a_t * (x - s_f * eps) / a_f + s_t * eps


T_PIN = 300
PROGRESS = 0.15  # Δt = int(100 − 20 · 0.5) = 90 -> s = 210; inversion grid 0 -> 200 -> 210
PINNED = TimestepSchedule(t_min=Constant(T_PIN / T), t_max=Constant(T_PIN / T))
ISM_SETS = [["front_side"], ["minus_90"], list(CAMERAS)]


@pytest.mark.parametrize("hflip", [0.0, 1.0])
@pytest.mark.parametrize("names", ISM_SETS, ids=["+".join(n) if len(n) < 3 else "all" for n in ISM_SETS])
def test_ism_perp_neg_exact_update_rule(prior, embeds, monkeypatch, names, hflip):
    store = capture_latents(prior, monkeypatch)
    cfg = ISMConfig(timesteps=PINNED, perp_neg=True, hflip_prob=hflip, loss_scale=2.0)
    cfg.validate()
    assert cfg.perp_neg_scale == 1.0 and cfg.perp_neg_weights == LucidPerpNegWeights()
    batch, seed = len(names), 13
    cams, rgb = _cams(names), _rgb(len(names))
    out = cfg.build(prior)(rgb, cams, embeds, PROGRESS, torch.Generator().manual_seed(seed))
    out.loss.backward()
    latents = store[0]

    # Randomness as without Perp-Neg: t, the flip, ε, the offset.
    g = torch.Generator().manual_seed(seed)
    t = int(cfg.timesteps(PROGRESS, 1, T, g)[0])
    flipped = hflip > 0 and float(torch.rand((), generator=g)) < hflip
    noise = torch.randn(latents.shape, generator=g) + 0.1 * torch.randn((1, 3, 1, 1), generator=g)
    image = rgb.detach().flip(2) if flipped else rgb.detach()
    x0 = (image.permute(0, 3, 1, 2) * 2 - 1).double()
    assert (out.aux.t, out.aux.s, out.aux.flipped) == (T_PIN, 210, flipped) and t == T_PIN

    # The inversion (empty prompt) and the target are ISM's, untouched by Perp-Neg.
    null = embeds.null.expand(batch, -1, -1).double()
    f = prior.eps_formula
    a0, s0 = _ab(prior, 0)
    x = a0 * x0 + s0 * noise.double()
    x = _ddim(prior, x, f(x, torch.full((batch,), 0), null), 0, 200)
    x_s = _ddim(prior, x, f(x, torch.full((batch,), 200), null), 200, 210)
    eps_s = f(x_s, torch.full((batch,), 210), null)
    x_t = _ddim(prior, x_s, eps_s, 210, T_PIN)
    torch.testing.assert_close(out.aux.x_s.double(), x_s, **TOL)
    torch.testing.assert_close(out.aux.target.double(), eps_s, **TOL)
    torch.testing.assert_close(out.aux.x_t.double(), x_t, **TOL)

    # U-Net calls: inversion at 0 and 200 and ε_s at 210 with "", then ONE Perp-Neg call
    # [y_pos; ∅; 1st negatives; 2nd negatives] at (x_t, t).
    assert [int(c[1][0]) for c in prior.calls] == [0, 200, 210, T_PIN]
    assert all(torch.equal(c[2], embeds.null.expand(batch, -1, -1)) for c in prior.calls[:3])
    x_in, t_in, e_in = prior.calls[-1]
    assert torch.equal(t_in, torch.full((4 * batch,), T_PIN))
    torch.testing.assert_close(x_in.double(), x_t.repeat(4, 1, 1, 1), **TOL)
    hands = [_lucid(CAMERAS[n][1], embeds) for n in names]
    pos_in, unc_in, neg1_in, neg2_in = e_in.chunk(4)
    torch.testing.assert_close(pos_in, torch.stack([h[0] for h in hands]), rtol=0, atol=1e-6)
    assert torch.equal(unc_in, embeds.negative.expand(batch, -1, -1))
    # (negative, weight) pairs per view, as a set (φ = −90° orders them differently, same ε̂)
    for b, (_, negs, ws) in enumerate(hands):
        got = {(int(torch.argmin(torch.stack([(n - e).abs().sum() for e in embeds.by_view]))), round(float(w), 6))
               for n, w in ((neg1_in[b], out.aux.neg_weights[b, 0]), (neg2_in[b], out.aux.neg_weights[b, 1]))}
        want = {(int(torch.argmin(torch.stack([(n - e).abs().sum() for e in embeds.by_view]))), round(w, 6))
                for n, w in zip(negs, ws)}
        assert got == want, (names[b], got, want)

    # ε̂_t = ε_∅ + s (e_pos + Σ w_i perp(e_i, e_pos));  g = (σ_t/α_t)(ε̂_t − ε_φ(x_s; "", s)).
    tv = torch.full((batch,), T_PIN)
    eps_hat = _hand_perp_neg_eps(prior, x_t, tv, embeds.negative, hands, 7.5, 1.0)
    a_t, s_t = _ab(prior, T_PIN)
    grad = (s_t / a_t) * (eps_hat - eps_s)
    torch.testing.assert_close(out.aux.eps_pred.double(), eps_hat, **TOL)
    torch.testing.assert_close(out.aux.grad.double(), grad, **TOL)
    torch.testing.assert_close(latents.grad.double(), 2.0 * grad / batch, **TOL)
    to_rgb = 2.0 * latents.grad.permute(0, 2, 3, 1)
    torch.testing.assert_close(rgb.grad, to_rgb.flip(2) if flipped else to_rgb, rtol=1e-6, atol=1e-7)

    # The negatives really act where a weight is non-zero (compare with plain CFG on y_pos).
    plain = torch.stack([
        f(x_t[b:b + 1], tv[b:b + 1], embeds.negative[None].double())[0]
        + 7.5 * (f(x_t[b:b + 1], tv[b:b + 1], hands[b][0][None].double())[0]
                 - f(x_t[b:b + 1], tv[b:b + 1], embeds.negative[None].double())[0])
        for b in range(batch)
    ])
    for b in range(batch):
        assert (eps_hat[b] - plain[b]).abs().max() > 1e-3, names[b]


def test_ism_perp_neg_scale_and_threestudio_weights(prior, embeds):
    """perp_neg_scale multiplies LucidDreamer's weights; 0 is plain CFG on the interpolated
    positive = ISM's default "interpolated" view prompt. threestudio's weights can be chosen too
    (with its overhead view)."""
    names = ["front_side", "side_back", "high"]
    cams = _cams(names)

    def run(cfg):
        prior.calls.clear()
        return cfg.build(prior)(_rgb(3), cams, embeds, PROGRESS, torch.Generator().manual_seed(4))

    half = run(ISMConfig(timesteps=PINNED, perp_neg=True, perp_neg_scale=0.5, hflip_prob=0.0))
    hands = [_lucid(CAMERAS[n][1], embeds) for n in names]
    want_w = torch.tensor([[0.5 * w for w in h[2]] for h in hands])
    # dreamlab's order equals LucidDreamer's away from φ = −90°
    torch.testing.assert_close(half.aux.neg_weights, want_w, rtol=0, atol=1e-6)
    x_t = half.aux.x_t
    tv = torch.full((3,), T_PIN)
    torch.testing.assert_close(half.aux.eps_pred.double(),
                               _hand_perp_neg_eps(prior, x_t, tv, embeds.negative, hands, 7.5, 0.5), **TOL)

    zero = run(ISMConfig(timesteps=PINNED, perp_neg=True, perp_neg_scale=0.0, hflip_prob=0.0))
    plain = run(ISMConfig(timesteps=PINNED, hflip_prob=0.0))
    assert plain.aux.neg_weights is None
    torch.testing.assert_close(zero.aux.eps_pred, plain.aux.eps_pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(zero.aux.grad, plain.aux.grad, rtol=0, atol=1e-6)

    ts = run(ISMConfig(timesteps=PINNED, perp_neg=True, perp_neg_weights=PerpNegWeights(), hflip_prob=0.0))
    th = [_threestudio(*CAMERAS[n], embeds) for n in names]
    torch.testing.assert_close(ts.aux.neg_weights, torch.tensor([h[2] for h in th]), rtol=0, atol=1e-6)
    _, _, e_in = prior.calls[-1]
    assert torch.equal(e_in[2], embeds.by_view[OVERHEAD])  # the elevation-75 camera is overhead
    torch.testing.assert_close(ts.aux.eps_pred.double(),
                               _hand_perp_neg_eps(prior, ts.aux.x_t, tv, embeds.negative, th, 7.5, 1.0), **TOL)


def test_tsm_perp_neg_changes_only_the_prediction(prior, embeds):
    """TSM inherits the option: same inversion, same target ε_φ(x_μ; "", μ), Perp-Neg ε̂ at x_t."""
    names = list(CAMERAS)
    cams, batch = _cams(names), len(names)
    cfg = TSMConfig(timesteps=PINNED, perp_neg=True, hflip_prob=0.0, loss_scale=3.0, clip_value=None)
    cfg.validate()
    prior.calls.clear()
    rgb = _rgb(batch)
    out = cfg.build(prior)(rgb, cams, embeds, PROGRESS, torch.Generator().manual_seed(8))
    calls = list(prior.calls)
    prior.calls.clear()
    base = dataclasses.replace(cfg, perp_neg=False).build(prior)(
        _rgb(batch), cams, embeds, PROGRESS, torch.Generator().manual_seed(8))
    assert out.aux.mu == base.aux.mu and out.aux.mu not in (out.aux.s, out.aux.t)
    assert torch.equal(out.aux.x_t, base.aux.x_t) and torch.equal(out.aux.target, base.aux.target)
    assert len(calls) == len(prior.calls) and calls[-1][0].shape[0] == 4 * batch
    for (xa, ta, ea), (xb, tb, eb) in zip(calls[:-1], prior.calls[:-1]):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and torch.equal(ea, eb)
    hands = [_lucid(CAMERAS[n][1], embeds) for n in names]
    tv = torch.full((batch,), T_PIN)
    eps_hat = _hand_perp_neg_eps(prior, out.aux.x_t, tv, embeds.negative, hands, 7.5, 1.0)
    a_t, s_t = _ab(prior, T_PIN)
    torch.testing.assert_close(out.aux.eps_pred.double(), eps_hat, **TOL)
    torch.testing.assert_close(out.aux.grad.double(), (s_t / a_t) * (eps_hat - out.aux.target.double()), **TOL)


def test_ism_without_perp_neg_unchanged(prior, embeds):
    """perp_neg=False (the default): the last call is ISM's [cond; negative] as before."""
    assert ISMConfig().perp_neg is False and TSMConfig().perp_neg is False
    cams = _cams(list(CAMERAS))
    out = ISMConfig(timesteps=PINNED).build(prior)(_rgb(8), cams, embeds, PROGRESS, torch.Generator().manual_seed(2))
    _, _, e_in = prior.calls[-1]
    cond, uncond = embeds_for_cameras(embeds, cams, "interpolated")
    assert torch.equal(e_in, torch.cat([cond, uncond])) and out.aux.neg_weights is None


# ------------------------------------------------------------------------------ CSM


CSM_SETS = [["front_side"], ["high"], list(CAMERAS)]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("progress, lam", [(0.2, 0.4), (0.0, 0.0), (0.8, 1.0)])
@pytest.mark.parametrize("names", CSM_SETS, ids=["front_side", "overhead", "all"])
def test_csm_perp_neg_exact_update_rule(prior, embeds, monkeypatch, names, progress, lam, normalize):
    store = capture_latents(prior, monkeypatch)
    cfg = CSMConfig(noising="random", guidance_scale=2.0, perp_neg=True, weighting="sds",
                    grad_normalize=normalize, loss_scale=2.0)
    cfg.validate()
    assert cfg.perp_neg_scale == 3.0  # csd-if.yaml perpneg_scale
    assert cfg.negative_mix(progress) == pytest.approx(lam)
    batch, seed = len(names), 17
    cams, rgb = _cams(names), _rgb(len(names))
    out = cfg.build(prior)(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()
    latents = store[0]

    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(out.timesteps, t) and torch.equal(out.aux.noise, noise)
    abar = prior.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach().double() + (1 - abar).sqrt() * noise.double()

    # ONE call: the non-zero classifier branches, then the rows only Perp-Neg needs (weight 0).
    hands = [_threestudio(*CAMERAS[n], embeds) for n in names]
    pos = torch.stack([h[0] for h in hands])
    negative = embeds.negative.expand(batch, -1, -1)
    null = embeds.null.expand(batch, -1, -1)
    negs = [torch.stack([h[1][i] for h in hands]) for i in range(2)]
    want_rows = [("cond", pos, 2.0)]
    if lam != 0.0:
        want_rows.append(("negative", negative, -2.0 * lam))
    if lam != 1.0:
        want_rows.append(("null", null, -2.0 * (1 - lam)))
    for name, e in [("perp_uncond", negative), ("perp_neg_1", negs[0]), ("perp_neg_2", negs[1])]:
        if not any(torch.equal(e, r[1]) for r in want_rows):  # rows already evaluated are reused
            want_rows.append((name, e, 0.0))
    if names == ["high"]:  # overhead: both negatives are the negative prompt itself
        assert len(want_rows) == (3 if 0.0 < lam < 1.0 else 2 + (lam == 0.0))
    assert out.aux.branch_names == tuple(r[0] for r in want_rows)
    assert out.aux.branch_weights == pytest.approx(tuple(r[2] for r in want_rows))
    assert len(prior.calls) == 1
    x_in, t_in, e_in = prior.calls[0]
    k = len(want_rows)
    assert torch.equal(t_in, t.repeat(k))
    torch.testing.assert_close(x_in.double(), x_t.repeat(k, 1, 1, 1), **TOL)
    torch.testing.assert_close(e_in, torch.cat([r[1] for r in want_rows]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.aux.neg_weights, 3.0 * torch.tensor([h[2] for h in hands]), rtol=0, atol=1e-6)

    # g = w(t) (s [ε_pos − λ ε_neg − (1 − λ) ε_""] + s κ Σ_i w_i perp(e_i, e_pos)), e_· against ε_neg.
    f = prior.eps_formula
    e_pos, e_neg, e_null = f(x_t, t, pos.double()), f(x_t, t, negative.double()), f(x_t, t, null.double())
    perp = torch.stack([
        sum(3.0 * w * _perp(f(x_t[b:b + 1], t[b:b + 1], n[None].double())[0] - e_neg[b], e_pos[b] - e_neg[b])
            for w, n in zip(hands[b][2], hands[b][1]))
        for b in range(batch)
    ])
    score = 2.0 * (e_pos - lam * e_neg - (1 - lam) * e_null) + 2.0 * perp
    grad = (1 - abar) * score
    if normalize:
        grad = grad / (grad.norm() + 1e-8)
    torch.testing.assert_close(out.aux.perp_neg.double(), 2.0 * perp, **TOL)
    torch.testing.assert_close(out.aux.grad.double(), grad, **TOL)
    torch.testing.assert_close(latents.grad.double(), 2.0 * grad / batch, **TOL)
    if names == ["high"]:  # overhead: weights 0, no perpendicular term
        assert out.aux.perp_neg.abs().max() == 0
    else:
        assert out.aux.perp_neg.abs().max() > 1e-3


def test_csm_perp_neg_with_ddim_inversion_and_zero_scale(prior, embeds):
    """The term uses whatever x_t CSM made (its default DDIM inversion); κ = 0 leaves CSD with the
    Perp-Neg positive as the conditional branch."""
    names = list(CAMERAS)
    cams = _cams(names)
    cfg = CSMConfig(perp_neg=True, guidance_scale=1.5, grad_normalize=False)
    out = cfg.build(prior)(_rgb(8), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    x_t, t = out.aux.x_t.double(), out.timesteps
    assert out.aux.inversion_timesteps is not None
    hands = [_threestudio(*CAMERAS[n], embeds) for n in names]
    pos = torch.stack([h[0] for h in hands]).double()
    f = prior.eps_formula
    e_neg = f(x_t, t, embeds.negative.expand(8, -1, -1).double())
    e_null = f(x_t, t, embeds.null.expand(8, -1, -1).double())
    e_pos = f(x_t, t, pos)
    lam = float(cfg.negative_mix(0.3))
    perp = torch.stack([
        sum(3.0 * w * _perp(f(x_t[b:b + 1], t[b:b + 1], n[None].double())[0] - e_neg[b], e_pos[b] - e_neg[b])
            for w, n in zip(hands[b][2], hands[b][1]))
        for b in range(8)
    ])
    torch.testing.assert_close(out.aux.grad.double(), 1.5 * (e_pos - lam * e_neg - (1 - lam) * e_null + perp), **TOL)

    zero = dataclasses.replace(cfg, perp_neg_scale=0.0).build(prior)(
        _rgb(8), cams, embeds, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(zero.aux.grad.double(), 1.5 * (e_pos - lam * e_neg - (1 - lam) * e_null), **TOL)


def test_csm_without_perp_neg_unchanged(prior, embeds):
    cams = _cams(list(CAMERAS))
    out = CSMConfig(noising="random").build(prior)(_rgb(8), cams, embeds, 0.2, torch.Generator().manual_seed(2))
    assert out.aux.branch_names == ("cond", "negative", "null")
    assert out.aux.neg_weights is None and out.aux.perp_neg is None
    cond, _ = embeds_for_cameras(embeds, cams, "discrete")
    assert torch.equal(prior.calls[0][2].chunk(3)[0], cond)


# ------------------------------------------------------------------------------ behaviour, validation


@pytest.mark.parametrize("cls", [ISMConfig, TSMConfig, CSMConfig])
def test_perp_neg_validation(prior, cls):
    cls(perp_neg=True).validate()
    cls(view_dependent="none").validate()  # fine without Perp-Neg
    for bad in [
        cls(perp_neg=True, view_dependent="none"),
        cls(perp_neg=True, perp_neg_scale=float("nan")),
        cls(perp_neg_weights=PerpNegWeights(f_sb=(1.0, 0.5))),
        cls(perp_neg_weights=LucidPerpNegWeights(negative_w=float("inf"))),
    ]:
        with pytest.raises(ValueError):
            bad.validate()
    with pytest.raises(ValueError, match='perp_neg needs view-dependent prompts.*"none"'):
        cls(perp_neg=True, view_dependent="none").validate()
    # the run's view mode "none" (config None = take the run's) is refused when building
    with pytest.raises(ValueError, match="view"):
        cls(perp_neg=True, view_dependent=None).build(prior, PromptConfig(view_dependent="none"))
    cls(perp_neg=True, view_dependent="interpolated").build(prior, PromptConfig(view_dependent="none"))


@pytest.mark.parametrize("make", [lambda: ISMConfig(perp_neg=True), lambda: TSMConfig(perp_neg=True),
                                  lambda: CSMConfig(perp_neg=True)], ids=["ism", "tsm", "csm"])
def test_perp_neg_behaviour(embeds, make):
    prior = PatternStubPrior()
    prior.weight.requires_grad_(True)  # would receive gradient if anything touched the prior
    guidance = make().build(prior)
    cams = _cams(list(CAMERAS))

    def run(seed):
        rgb = _rgb(8, seed=99)
        out = guidance(rgb, cams, embeds, 0.3, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and prior.weight.grad is None
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)


def test_perp_neg_defaults_json_and_cli():
    from dreamlab.config import _from_jsonable, _known_dataclasses, to_jsonable
    from dreamlab.guidance.options import field_docs, options_type

    assert ISMConfig().perp_neg is False and ISMConfig().perp_neg_scale == 1.0
    assert CSMConfig().perp_neg is False and CSMConfig().perp_neg_scale == 3.0
    assert isinstance(ISMConfig().perp_neg_weights, LucidPerpNegWeights)
    assert isinstance(CSMConfig().perp_neg_weights, PerpNegWeights)
    known = _known_dataclasses()
    assert "LucidPerpNegWeights" in known
    for cfg in [ISMConfig(perp_neg=True, perp_neg_weights=LucidPerpNegWeights(negative_w=-1.5)),
                TSMConfig(perp_neg=True, perp_neg_weights=PerpNegWeights(f_sb=(2.0, 0.25, -1.0))),
                CSMConfig(perp_neg=True, perp_neg_scale=2.0, negative_mix=Linear(0.0, 1.0))]:
        back = _from_jsonable(json.loads(json.dumps(to_jsonable(cfg))), type(cfg), known)
        assert back == cfg and type(back.perp_neg_weights) is type(cfg.perp_neg_weights)
    for name, cls in (("ism", ISMConfig), ("tsm", TSMConfig), ("csm", CSMConfig)):
        fields = {f.name for f in dataclasses.fields(options_type(name, cls))}
        assert {"perp_neg", "perp_neg_scale"} <= fields
        docs = field_docs(cls)
        assert docs["perp_neg"] and docs["perp_neg_scale"] and docs["perp_neg_weights"]
    assert "LucidDreamer" in field_docs(ISMConfig)["perp_neg"]
    assert "3" in field_docs(CSMConfig)["perp_neg_scale"] and "csd-if" in field_docs(CSMConfig)["perp_neg_scale"]
