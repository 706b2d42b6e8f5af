"""Guidance helpers (timesteps, CFG, weightings, surrogate loss) and SDS's exact update rule."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
from dreamlab.guidance import GUIDANCES
from dreamlab.guidance.common import (
    TimestepSchedule,
    cfg_combine,
    sample_timesteps,
    surrogate_loss,
    threestudio_scale_to_dreamlab,
    weighting,
)
from dreamlab.guidance.sds import SDSConfig
from dreamlab.priors import StableDiffusionPrior
from dreamlab.priors.base import Prior
from dreamlab.priors.testing import make_tiny_sd_components, make_tiny_sd_folder, make_tiny_unet
from dreamlab.prompts import PromptConfig, build_prompt_embeds, embeds_for_cameras
from dreamlab.schedules import Constant, Linear, SqrtAnneal

T = 1000


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    folder = make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))
    return StableDiffusionPrior.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def embeds(prior):
    return build_prompt_embeds(prior, "a photo of a corgi", negative_prompt="blurry")


def _cams(batch: int, seed: int = 0):
    return sample_orbit_cameras(
        CameraSamplerConfig(batch_size=batch), 32, torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------ helpers


def test_sample_timesteps_inclusive_range():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(g, 20000, 0.02, 0.98, T)
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min().item() == 20 and t.max().item() == 980
    t = sample_timesteps(g, 50, 0.5, 0.5, T)
    assert (t == 500).all()
    assert sample_timesteps(g, 10, 0.0, 1.0, T).max() <= T - 1
    with pytest.raises(ValueError):
        sample_timesteps(g, 1, 0.6, 0.5, T)


SCHEDULES = {
    "fixed": TimestepSchedule(),
    "annealed_max": TimestepSchedule(t_max=Linear(0.98, 0.5, 0.0, 0.5)),
    "annealed_both": TimestepSchedule(t_min=Linear(0.5, 0.02), t_max=Linear(0.98, 0.5)),
    "hifa_sqrt": TimestepSchedule(t_min=SqrtAnneal(0.98, 0.02), t_max=SqrtAnneal(0.98, 0.02)),
    "dreamgaussian": TimestepSchedule(kind="anneal"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_timesteps_stay_inside_schedule(name, progress):
    schedule = SCHEDULES[name]
    lo, hi = schedule.bounds(progress, T)
    t = schedule(progress, 500, T, torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and t.shape == (500,)
    assert lo <= t.min().item() and t.max().item() <= hi


def test_timestep_schedule_values():
    assert SCHEDULES["fixed"].bounds(0.3, T) == (20, 980)
    assert SCHEDULES["annealed_max"].bounds(0.0, T) == (20, 980)
    assert SCHEDULES["annealed_max"].bounds(1.0, T) == (20, 500)
    dg = SCHEDULES["dreamgaussian"]
    g = torch.Generator().manual_seed(0)
    assert dg(0.0, 2, T, g).tolist() == [980, 980]  # round(1000) clipped to 980
    assert dg(0.5, 1, T, g).tolist() == [500]
    assert dg(0.7, 1, T, g).tolist() == [300]
    assert dg(1.0, 1, T, g).tolist() == [20]
    state = g.get_state()
    dg(0.3, 4, T, g)
    assert torch.equal(state, g.get_state())  # deterministic kind draws nothing
    hifa = SCHEDULES["hifa_sqrt"]
    assert hifa(0.25, 3, T, g).tolist() == [500, 500, 500]  # 0.98 - 0.96 * 0.5
    with pytest.raises(ValueError):
        TimestepSchedule(kind="cosine")


def test_cfg_combine_convention_a():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg_combine(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))
    torch.testing.assert_close(cfg_combine(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 0.0), uncond)
    # threestudio convention B: cond + s (cond - uncond) == convention A with s + 1
    s_b = 100.0
    torch.testing.assert_close(
        cond + s_b * (cond - uncond), cfg_combine(uncond, cond, threestudio_scale_to_dreamlab(s_b))
    )
    assert SDSConfig().guidance_scale == threestudio_scale_to_dreamlab(100.0)


def test_weightings(prior):
    abar = prior.alphas_cumprod
    t = torch.tensor([20, 500, 980])
    a = abar[t]
    torch.testing.assert_close(weighting("sds", abar, t), 1 - a)
    torch.testing.assert_close(weighting("uniform", abar, t), torch.ones(3))
    torch.testing.assert_close(weighting("fantasia3d", abar, t), a.sqrt() * (1 - a))
    with pytest.raises(ValueError):
        weighting("nope", abar, t)


def test_surrogate_loss_gradient():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    g = torch.randn(3, 4, 5, 5)
    loss = surrogate_loss(x, g, 3)
    loss.backward()
    torch.testing.assert_close(x.grad, g / 3, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, 0.5 * g.square().sum() / 3)


# ------------------------------------------------------------------------------ SDS


def _stub_predict(prior, monkeypatch, calls):
    """Replaces predict_eps by a known function of (x_t, t, embeds) and records the inputs."""

    def predict_eps(x_t, t, emb):
        calls.append((x_t.clone(), t.clone(), emb.clone()))
        return 0.3 * x_t + 0.01 * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-4 * t.view(-1, 1, 1, 1)

    monkeypatch.setattr(prior, "predict_eps", predict_eps)
    return predict_eps


def _capture_latents(prior, monkeypatch, store):
    original = prior.encode_images

    def encode_images(rgb):
        latents = original(rgb)
        latents.retain_grad()
        store.append(latents)
        return latents

    monkeypatch.setattr(prior, "encode_images", encode_images)


@pytest.mark.parametrize("weighting_name", ["sds", "uniform", "fantasia3d"])
def test_sds_exact_update_rule(prior, embeds, monkeypatch, weighting_name):
    calls, latents_store = [], []
    stub = _stub_predict(prior, monkeypatch, calls)
    _capture_latents(prior, monkeypatch, latents_store)
    cfg = SDSConfig(guidance_scale=7.5, weighting=weighting_name, loss_scale=2.0)
    sds = cfg.build(prior)
    batch, progress, seed = 3, 0.4, 123
    cams = _cams(batch)
    rgb = torch.rand(batch, 20, 20, 3, requires_grad=True)
    out = sds(rgb, cams, embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    # The one U-Net call is batched [cond; uncond].
    assert len(calls) == 1
    x_t_in, t_in, emb_in = calls[0]
    assert x_t_in.shape[0] == 2 * batch
    cond, uncond = embeds_for_cameras(embeds, cams, "discrete")
    torch.testing.assert_close(emb_in, torch.cat([cond, uncond]))

    # t and ε come from the passed generator: t first, then ε.
    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    latents = latents_store[0]
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(out.timesteps, t) and torch.equal(t_in[:batch], t)
    torch.testing.assert_close(out.aux.noise, noise, rtol=0, atol=0)

    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    torch.testing.assert_close(x_t_in[:batch], x_t)
    eps_cond = stub(x_t, t, cond)
    eps_uncond = stub(x_t, t, uncond)
    eps_hat = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    w = weighting(weighting_name, prior.alphas_cumprod, t).view(-1, 1, 1, 1)
    expected_g = w * (eps_hat - noise)
    torch.testing.assert_close(out.aux.grad, expected_g)
    torch.testing.assert_close(latents.grad, 2.0 * expected_g / batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad_norm, expected_g.norm())
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_sds_view_guidance_exact_update_rule(prior, embeds, monkeypatch):
    """ε̂ = ε_∅ + s(ε_view − ε_∅) + w(ε_view − ε_plain), the plain prompt in a second call."""
    calls = []
    stub = _stub_predict(prior, monkeypatch, calls)
    cfg = SDSConfig(guidance_scale=2.0, view_guidance_scale=3.0)
    batch, progress, seed = 3, 0.3, 7
    cams = _cams(batch, seed=2)
    out = cfg.build(prior)(torch.rand(batch, 16, 16, 3), cams, embeds, progress, torch.Generator().manual_seed(seed))
    assert len(calls) == 2
    cond, uncond = embeds_for_cameras(embeds, cams, "discrete")
    x_t, t = calls[1][0], calls[1][1]
    torch.testing.assert_close(calls[1][2], embeds.plain.expand(batch, -1, -1))
    torch.testing.assert_close(x_t, calls[0][0][:batch])
    e_c, e_u, e_p = stub(x_t, t, cond), stub(x_t, t, uncond), stub(x_t, t, embeds.plain.expand(batch, -1, -1))
    torch.testing.assert_close(out.aux.eps_pred, e_u + 2.0 * (e_c - e_u) + 3.0 * (e_c - e_p))
    torch.testing.assert_close(out.aux.eps_plain, e_p)
    # w = 0 is plain SDS: one call, the same gradient
    calls.clear()
    again = SDSConfig(guidance_scale=2.0).build(prior)(
        torch.rand(batch, 16, 16, 3), cams, embeds, progress, torch.Generator().manual_seed(seed)
    )
    assert len(calls) == 1 and again.aux.eps_plain is None
    with pytest.raises(ValueError, match="view_guidance_scale"):
        SDSConfig(view_guidance_scale=-1.0).validate()
    with pytest.raises(ValueError, match="view-dependent"):
        SDSConfig(view_guidance_scale=1.0, view_dependent="none").build(prior)


def test_sds_grad_clip(prior, embeds, monkeypatch):
    _stub_predict(prior, monkeypatch, [])
    cfg = SDSConfig(guidance_scale=50.0, weighting="uniform", grad_clip=Constant(1e-3))
    out = cfg.build(prior)(torch.rand(2, 16, 16, 3), _cams(2), embeds, 0.0, torch.Generator())
    assert out.aux.grad.abs().max() <= 1e-3 + 1e-9


def test_sds_view_mode_from_prompt_config(prior, embeds, monkeypatch):
    calls = []
    _stub_predict(prior, monkeypatch, calls)
    cams = _cams(2)
    SDSConfig().build(prior, PromptConfig(view_dependent="none"))(
        torch.rand(2, 16, 16, 3), cams, embeds, 0.5, torch.Generator()
    )
    assert torch.equal(calls[-1][2][:2], embeds.plain.expand(2, -1, -1))
    SDSConfig(view_dependent="interpolated").build(prior, PromptConfig(view_dependent="none"))(
        torch.rand(2, 16, 16, 3), cams, embeds, 0.5, torch.Generator()
    )
    torch.testing.assert_close(calls[-1][2][:2], embeds_for_cameras(embeds, cams, "interpolated")[0])


# ------------------------------------------------------------------------------ contract


@pytest.fixture(scope="module")
def image_prompt_prior(tmp_path_factory):
    """The tiny SD prior (same weights as ``prior``) with a tiny IP-Adapter, and a reference PNG."""
    from PIL import Image

    from dreamlab.priors.testing import make_tiny_ip_adapter_folder

    root = tmp_path_factory.mktemp("tiny_sd_ip")
    loaded = StableDiffusionPrior.from_pretrained(make_tiny_sd_folder(root / "sd"), device="cpu")
    loaded.load_ip_adapter(make_tiny_ip_adapter_folder(root / "ip", loaded.unet))
    png = root / "reference.png"
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(png)
    return loaded, str(png)


@pytest.mark.parametrize("name", list(GUIDANCES))
def test_guidance_contract(prior, embeds, image_prompt_prior, name):
    cfg = GUIDANCES[name]()
    if name == "vpcsm":  # needs a reference image and a prior with an image-prompt path
        prior, png = image_prompt_prior
        cfg = dataclasses.replace(cfg, image_prompt=png)
    assert dataclasses.is_dataclass(cfg)
    cams = _cams(2)

    def run(seed):
        guidance = cfg.build(prior)  # fresh: VSD/ESD train their LoRA inside every call
        rgb = torch.rand(2, 24, 24, 3, generator=torch.Generator().manual_seed(99)).requires_grad_()
        out = guidance(rgb, cams, embeds, 0.3, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad

    out, grad = run(7)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())
    lo, hi = cfg.timesteps.bounds(0.3, T)
    assert out.timesteps.shape == (2,) and lo <= out.timesteps.min() and out.timesteps.max() <= hi
    out2, grad2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    out3, grad3 = run(8)
    assert not torch.equal(grad, grad3)  # (a normalised gradient may keep the same loss value)


# ------------------------------------------------------------------------------ pixel prior


class TinyPixelPrior(Prior):
    """A pixel-space prior: the UNet denoises [-1, 1] RGB directly (3 channels, no VAE)."""

    def __init__(self, seed: int = 0):
        tokenizer, text_encoder, _, _, scheduler = make_tiny_sd_components(seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = make_tiny_unet(sample_size=16, channels=3)
        self.unet = unet.eval().requires_grad_(False)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.image_size, self.latent_channels = 16, 3
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode_prompt(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            return self.text_encoder(ids.input_ids)[0]

    def encode_images(self, rgb):
        rgb = F.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False, antialias=False)
        return rgb * 2.0 - 1.0

    def decode_latents(self, latents):
        return (latents * 0.5 + 0.5).clamp(0, 1)

    def predict_eps(self, x_t, t, embeds):
        return self.unet(x_t, t, encoder_hidden_states=embeds).sample.float()

    def parameters(self):
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()


def test_pixel_space_prior_through_sds():
    prior = TinyPixelPrior()
    embeds = build_prompt_embeds(prior, "a red cube")
    rgb = torch.rand(2, 24, 24, 3, requires_grad=True)
    out = SDSConfig(guidance_scale=7.5).build(prior)(
        rgb, _cams(2), embeds, 0.5, torch.Generator().manual_seed(0)
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux.grad.shape == (2, 3, 16, 16)
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())


def test_sds_config_validate():
    SDSConfig().validate()
    SDSConfig(grad_clip=Linear(0.5, 2.0), timesteps=TimestepSchedule(t_max=Linear(0.98, 0.5))).validate()
    bad = [
        SDSConfig(guidance_scale=-1.0),
        SDSConfig(weighting="sdss"),
        SDSConfig(view_dependent="sometimes"),
        SDSConfig(grad_clip=Constant(0.0)),
        SDSConfig(timesteps=TimestepSchedule(t_min=Constant(0.9), t_max=Constant(0.5))),
    ]
    for cfg in bad:
        with pytest.raises(ValueError):
            cfg.validate()
    assert dataclasses.asdict(SDSConfig())["timesteps"]["t_min"] == {"value": 0.02}
