"""VSD (ProlificDreamer) and ESD (entropic score distillation): exact update rule with stubbed
ε-predictions, the LoRA step taken inside the call, determinism, resume, and both prior kinds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import dataclasses
import io

import pytest
import torch

from dreamlab.guidance.common import TimestepSchedule, weighting
from dreamlab.guidance.esd import ESD, ESDConfig
from dreamlab.guidance.vsd import VSD, VSDConfig
from dreamlab.priors import StableDiffusionPrior
from dreamlab.priors.builtin import BuiltinPrior, BuiltinPriorConfig
from dreamlab.priors.testing import make_tiny_sd_components, make_tiny_sd_folder
from dreamlab.prompts import build_prompt_embeds, embeds_for_cameras
from dreamlab.schedules import Constant, Linear

from guidance_fixtures import StubPrior, capture_latents, make_cams

T = 1000


@pytest.fixture(scope="module")
def sd_prior(tmp_path_factory):
    folder = make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd_vsd"))
    return StableDiffusionPrior.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def sd_embeds(sd_prior):
    return build_prompt_embeds(sd_prior, "a photo of a corgi", negative_prompt="blurry")


@pytest.fixture(scope="module")
def builtin_prior():
    return BuiltinPrior.random_init(cfg=BuiltinPriorConfig(block_out_channels=(16, 16, 32, 32), text_width=32))


@pytest.fixture(scope="module")
def builtin_embeds(builtin_prior):
    return build_prompt_embeds(builtin_prior, "a red cube", negative_prompt="a blue sphere")


def _setup(request, kind):
    prior = request.getfixturevalue(f"{kind}_prior")
    return prior, request.getfixturevalue(f"{kind}_embeds")


def _rgb(batch, size, seed=99):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _lora_snapshot(guidance):
    return {name: p.detach().clone() for name, p in guidance.lora_params.items()}


def _mlp_snapshot(guidance):
    return {k: v.detach().clone() for k, v in guidance.camera_mlp.state_dict().items()}


# ------------------------------------------------------------------------------ exact rule


def _pre_formula(x_t, t, emb):
    """Stubbed frozen-prior ε."""
    return 0.3 * x_t + 0.05 * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.02 * t.float().view(-1, 1, 1, 1) / T


def _lora_formula(x_t, t, emb, extra):
    """Stubbed LoRA-model ε; depends on the camera embedding so the camera MLP gets gradient."""
    out = -0.2 * x_t + 0.07 * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.01 * t.float().view(-1, 1, 1, 1) / T
    if extra is not None:
        out = out + 0.5 * extra.mean(dim=1).view(-1, 1, 1, 1)
    return out


def _stub(prior, monkeypatch):
    calls = {"pre": [], "lora": []}

    def predict_eps(x_t, t, emb):
        calls["pre"].append((x_t.detach().clone(), t.clone(), emb.detach().clone()))
        return _pre_formula(x_t, t, emb)

    def predict_eps_with_unet(unet, x_t, t, emb, extra_class_emb=None):
        assert unet is not prior.unet
        extra = None if extra_class_emb is None else extra_class_emb.detach().clone()
        calls["lora"].append((x_t.detach().clone(), t.clone(), emb.detach().clone(), extra, torch.is_grad_enabled()))
        # Like the real ε_ψ, the output depends on the LoRA weights (here with weight 0).
        lora = sum(p.sum() for name, p in unet.named_parameters() if "lora_B" in name)
        return _lora_formula(x_t, t, emb, extra_class_emb) + 0.0 * lora

    monkeypatch.setattr(prior, "predict_eps", predict_eps)
    monkeypatch.setattr(prior, "predict_eps_with_unet", predict_eps_with_unet)
    return calls


EXACT_CASES = {
    "vsd_default": VSDConfig(loss_scale=2.0),
    "vsd_lora_cfg_negative": VSDConfig(guidance_scale_lora=0.5, lora_uncond_prompt="negative", weighting="fantasia3d"),
    "vsd_no_camera": VSDConfig(camera_condition="none", guidance_scale=3.0),
    "esd": ESDConfig(entropy_weight=Constant(0.3)),
    "esd_annealed_forced_dropout": ESDConfig(entropy_weight=Linear(0.2, 0.8), camera_dropout=1.0, lora_n_timestamp_samples=2),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_update_rule(sd_prior, sd_embeds, monkeypatch, case):
    cfg = EXACT_CASES[case]
    calls = _stub(sd_prior, monkeypatch)
    latents_store = capture_latents(sd_prior, monkeypatch)
    guidance = cfg.build(sd_prior)
    assert isinstance(guidance, ESD if isinstance(cfg, ESDConfig) else VSD)
    mlp0 = copy.deepcopy(guidance.camera_mlp)  # camera MLP before this call's LoRA step
    batch, progress, seed = 3, 0.4, 321
    cams = make_cams(batch)
    rgb = _rgb(batch, 20)
    out = guidance(rgb, cams, sd_embeds, progress, torch.Generator().manual_seed(seed))
    out.loss.backward()

    # Draw order from the generator: t, ε, then the LoRA step's t', ε', dropout coin.
    n = cfg.lora_n_timestamp_samples
    latents = latents_store[0]
    g = torch.Generator().manual_seed(seed)
    t = cfg.timesteps(progress, batch, T, g)
    noise = torch.randn(latents.shape, generator=g)
    t2 = cfg.lora_timesteps(progress, batch * n, T, g)
    noise2 = torch.randn((batch * n, *latents.shape[1:]), generator=g)
    coin = torch.rand((), generator=g)
    assert torch.equal(out.timesteps, t) and torch.equal(out.aux.lora_timesteps, t2)
    assert torch.equal(out.aux.noise, noise)
    assert out.aux.camera_dropped == bool(coin < cfg.camera_dropout)

    # Frozen prior: one batched call [view-dependent cond; negative], CFG convention A.
    cond, uncond = embeds_for_cameras(sd_embeds, cams, "discrete")
    abar = sd_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    assert len(calls["pre"]) == 1
    torch.testing.assert_close(calls["pre"][0][2], torch.cat([cond, uncond]))
    e_c, e_u = _pre_formula(x_t, t, cond), _pre_formula(x_t, t, uncond)
    eps_pre = e_u + cfg.guidance_scale * (e_c - e_u)

    # LoRA model: plain prompt y with camera c; camera-free branch with ∅_c = MLP(0).
    plain = sd_embeds.plain.expand(batch, -1, -1)
    with torch.no_grad():
        cam = cams.c2w.reshape(batch, 16)
        extra_c = None if mlp0 is None else mlp0(cam)
        extra_0 = None if mlp0 is None else mlp0(torch.zeros_like(cam))
    eps_c = _lora_formula(x_t, t, plain, extra_c)
    if isinstance(cfg, ESDConfig):
        lam = cfg.entropy_weight(progress)
        eps_0 = _lora_formula(x_t, t, plain, extra_0)
        eps_est = lam * eps_0 + (1 - lam) * eps_c  # the paper's λ-mix form
        assert out.aux.lora_scale == pytest.approx(1 - lam)
    elif cfg.guidance_scale_lora == 1.0:
        eps_est = eps_c
    else:
        lora_uncond = plain if cfg.lora_uncond_prompt == "prompt" else uncond
        eps_0 = _lora_formula(x_t, t, lora_uncond, extra_0)
        eps_est = eps_0 + cfg.guidance_scale_lora * (eps_c - eps_0)
    x_in, t_in, emb_in, extra_in, grad_on = calls["lora"][0]
    assert not grad_on
    two = out.aux.lora_scale != 1.0
    assert x_in.shape[0] == (2 if two else 1) * batch
    torch.testing.assert_close(x_in[:batch], x_t, rtol=0, atol=1e-6)
    assert torch.equal(t_in[:batch], t)
    torch.testing.assert_close(emb_in[:batch], plain)
    if mlp0 is None:
        assert extra_in is None
    else:
        torch.testing.assert_close(extra_in[:batch], extra_c)
        if two:
            torch.testing.assert_close(extra_in[batch:], extra_0)

    w = weighting(cfg.weighting, sd_prior.alphas_cumprod, t).view(-1, 1, 1, 1)
    expected_g = w * (eps_pre - eps_est)
    torch.testing.assert_close(out.aux.eps_pretrain, eps_pre, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.aux.eps_lora, eps_est, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.aux.grad, expected_g, rtol=0, atol=1e-6)
    torch.testing.assert_close(latents.grad, cfg.loss_scale * expected_g / batch, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.grad_norm, expected_g.norm(), rtol=1e-5, atol=1e-6)
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0

    # LoRA training call: detached latents noised with (t', ε'), plain prompt, camera or ∅_c.
    assert len(calls["lora"]) == 2
    x2, t2_in, emb2, extra2, grad_on2 = calls["lora"][1]
    assert grad_on2
    abar2 = sd_prior.alphas_cumprod[t2].view(-1, 1, 1, 1)
    x0 = latents.detach().repeat(n, 1, 1, 1)
    torch.testing.assert_close(x2, abar2.sqrt() * x0 + (1 - abar2).sqrt() * noise2, rtol=0, atol=1e-6)
    assert torch.equal(t2_in, t2)
    torch.testing.assert_close(emb2, sd_embeds.plain.expand(batch * n, -1, -1))
    if mlp0 is None:
        assert extra2 is None
    else:
        expected_extra = (extra_0 if out.aux.camera_dropped else extra_c).repeat(n, 1)
        torch.testing.assert_close(extra2, expected_extra)
    expected_loss = (_lora_formula(x2, t2, emb2, extra2) - noise2).square().mean()
    torch.testing.assert_close(out.aux.lora_loss, expected_loss, rtol=1e-6, atol=1e-7)
    if mlp0 is not None:  # the stub depends on the camera embedding: the MLP took a step
        assert any(not torch.equal(a, b) for a, b in zip(mlp0.state_dict().values(), guidance.camera_mlp.state_dict().values()))


def test_camera_dropout_coin_follows_generator(sd_prior, sd_embeds, monkeypatch):
    _stub(sd_prior, monkeypatch)
    cams = make_cams(2)
    guidance = VSDConfig(camera_dropout=0.5).build(sd_prior)
    seen = set()
    for seed in range(16):
        out = guidance(_rgb(2, 16), cams, sd_embeds, 0.1, torch.Generator().manual_seed(seed))
        seen.add(out.aux.camera_dropped)
    assert seen == {True, False}
    for p, expected in ((0.0, False), (1.0, True)):
        out = VSDConfig(camera_dropout=p).build(sd_prior)(_rgb(2, 16), cams, sd_embeds, 0.1, torch.Generator())
        assert out.aux.camera_dropped is expected


# ------------------------------------------------------------------------------ LoRA training


@pytest.mark.parametrize("kind", ["sd", "builtin"])
def test_lora_and_camera_mlp_train_prior_untouched(request, kind):
    prior, embeds = _setup(request, kind)
    prior_before = [p.detach().clone() for p in prior.parameters()]
    guidance = VSDConfig().build(prior)
    lora0, mlp0 = _lora_snapshot(guidance), _mlp_snapshot(guidance)
    # peft "gaussian" init: A ~ N(0, 1/r²), B = 0, so the LoRA copy starts as the prior.
    assert all((v == 0).all() for k, v in lora0.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for k, v in lora0.items() if "lora_A" in k)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora0} == {"to_q", "to_k", "to_v", "0"}
    rgb = _rgb(2, prior.image_size + 4)
    out = guidance(rgb, make_cams(2), embeds, 0.3, torch.Generator().manual_seed(5))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux.lora_loss)
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())
    assert all(torch.equal(a, b) for a, b in zip(prior_before, prior.parameters()))
    assert all(p.grad is None for p in guidance.lora_params.values())  # freed after the step
    lora1, mlp1 = _lora_snapshot(guidance), _mlp_snapshot(guidance)
    assert all(not torch.equal(lora0[k], lora1[k]) for k in lora0 if "lora_B" in k)
    assert all(not torch.equal(mlp0[k], mlp1[k]) for k in mlp0)
    # The frozen prior's U-Net is not the trained copy and has no LoRA layers.
    assert guidance.unet is not prior.unet
    assert not any("lora_" in name for name, _ in prior.unet.named_parameters())


def test_non_finite_render_does_not_train_the_lora(sd_prior, sd_embeds, monkeypatch):
    _stub(sd_prior, monkeypatch)
    guidance = VSDConfig().build(sd_prior)
    lora0, mlp0 = _lora_snapshot(guidance), _mlp_snapshot(guidance)
    rgb = torch.full((2, 16, 16, 3), float("nan"))
    out = guidance(rgb, make_cams(2), sd_embeds, 0.5, torch.Generator().manual_seed(0))
    assert not torch.isfinite(out.aux.lora_loss)
    assert torch.isfinite(out.aux.grad).all()  # nan_to_num, like SDS
    lora1, mlp1 = _lora_snapshot(guidance), _mlp_snapshot(guidance)
    assert all(torch.equal(lora0[k], lora1[k]) for k in lora0)
    assert all(torch.equal(mlp0[k], mlp1[k]) for k in mlp0)


def test_first_lora_step_is_adamw_on_the_denoising_loss(sd_prior, sd_embeds):
    """Recomputes the LoRA loss with the real U-Net copy and checks AdamW's first step on B."""
    cfg = VSDConfig(camera_dropout=0.0)
    guidance = cfg.build(sd_prior)
    reference = cfg.build(sd_prior)  # same init (init_seed), stays at the pre-step weights
    cams, progress, seed = make_cams(2), 0.6, 11
    rgb = _rgb(2, 16)
    out = guidance(rgb, cams, sd_embeds, progress, torch.Generator().manual_seed(seed))

    latents = sd_prior.encode_images(rgb.detach().permute(0, 3, 1, 2))
    g = torch.Generator().manual_seed(seed)
    cfg.timesteps(progress, 2, T, g)
    torch.randn(latents.shape, generator=g)
    t2 = cfg.lora_timesteps(progress, 2, T, g)
    noise2 = torch.randn(latents.shape, generator=g)
    abar = sd_prior.alphas_cumprod[t2].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise2
    camera = reference.camera_mlp(cams.c2w.reshape(2, 16))
    eps = sd_prior.predict_eps_with_unet(reference.unet, x_t, t2, sd_embeds.plain.expand(2, -1, -1), camera)
    loss = (eps - noise2).square().mean()
    torch.testing.assert_close(out.aux.lora_loss, loss.detach(), rtol=1e-5, atol=1e-7)
    loss.backward()
    # AdamW, first step: p ← p (1 − lr·wd) − lr · ĝ / (|ĝ| + eps); B starts at 0.
    for name, p in reference.lora_params.items():
        if "lora_B" in name:
            grad = p.grad
            expected = -cfg.lora_lr * grad / (grad.abs() + cfg.lora_eps)
            torch.testing.assert_close(guidance.lora_params[name].detach(), expected, rtol=1e-5, atol=1e-9)


def test_v_prediction_lora_loss_is_the_v_loss():
    """With a v-prediction prior the LoRA trains on its own target v = α ε − σ x (threestudio)."""
    tok, te, vae, unet, sched = make_tiny_sd_components(prediction_type="v_prediction", seed=1)
    prior = StableDiffusionPrior.from_components(tok, te, vae, unet, sched, device="cpu")
    embeds = build_prompt_embeds(prior, "a red cube")
    cfg = VSDConfig(camera_dropout=0.0)
    guidance, reference = cfg.build(prior), cfg.build(prior)
    cams, seed = make_cams(2), 3
    rgb = _rgb(2, 16)
    out = guidance(rgb, cams, embeds, 0.5, torch.Generator().manual_seed(seed))
    latents = prior.encode_images(rgb.detach().permute(0, 3, 1, 2))
    g = torch.Generator().manual_seed(seed)
    cfg.timesteps(0.5, 2, T, g)
    torch.randn(latents.shape, generator=g)
    t2 = cfg.lora_timesteps(0.5, 2, T, g)
    noise2 = torch.randn(latents.shape, generator=g)
    abar = prior.alphas_cumprod[t2].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * latents + sigma * noise2
    extra = reference.camera_mlp(cams.c2w.reshape(2, 16))
    with torch.no_grad():
        # Raw v-prediction of the LoRA copy, with the camera embedding as its class embedding.
        reference.unet.class_embedding = _Constant(extra)
        v_hat = reference.unet(x_t, t2, encoder_hidden_states=embeds.plain.expand(2, -1, -1),
                               class_labels=torch.zeros(2)).sample
        reference.unet.class_embedding = None
    v = alpha * noise2 - sigma * latents
    torch.testing.assert_close(out.aux.lora_loss, (v_hat - v).square().mean(), rtol=1e-4, atol=1e-7)


class _Constant(torch.nn.Module):
    """A class embedding that returns a fixed tensor (threestudio-style camera embedding stand-in)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, labels):
        return self.value


# ------------------------------------------------------------------------------ priors' new method


def test_sd_predict_eps_with_unet_matches_predict_eps_and_class_embedding(sd_prior):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    emb = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(sd_prior.predict_eps_with_unet(sd_prior.unet, x, t, emb), sd_prior.predict_eps(x, t, emb))
        unet = copy.deepcopy(sd_prior.unet)
        extra = torch.randn(2, unet.time_embedding.linear_2.out_features, generator=g)
        got = sd_prior.predict_eps_with_unet(unet, x, t, emb, extra)
        unet.class_embedding = _Constant(extra)  # threestudio: camera MLP as the class embedding
        want = unet(x, t, encoder_hidden_states=emb, class_labels=torch.zeros(2)).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, sd_prior.predict_eps(x, t, emb))
    assert not unet.time_embedding._forward_hooks  # the hook is removed again


def test_builtin_predict_eps_with_unet_adds_to_pooled_text(builtin_prior, builtin_embeds):
    assert builtin_prior.unet.class_embedding is not None  # pooled-text projection
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([5, 900])
    emb = builtin_embeds.by_view[:2]
    with torch.no_grad():
        assert torch.equal(builtin_prior.predict_eps_with_unet(builtin_prior.unet, x, t, emb),
                           builtin_prior.predict_eps(x, t, emb))
        unet = copy.deepcopy(builtin_prior.unet)
        extra = torch.randn(2, unet.time_embedding.linear_2.out_features, generator=g)
        got = builtin_prior.predict_eps_with_unet(unet, x, t, emb, extra)
        pooled_proj = unet.class_embedding
        unet.class_embedding = _AddTo(pooled_proj, extra)  # wrapped class embedding: text + camera
        want = unet(x, t, encoder_hidden_states=emb, class_labels=emb.mean(dim=1)).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # summation order differs
    assert (got - builtin_prior.predict_eps(x, t, emb)).abs().max() > 1e-3


class _AddTo(torch.nn.Module):
    def __init__(self, module, extra):
        super().__init__()
        self.module, self.extra = module, extra

    def forward(self, labels):
        return self.module(labels) + self.extra


def test_prior_without_unet_is_refused():
    with pytest.raises(ValueError, match="U-Net"):
        VSDConfig().build(StubPrior())


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("kind", ["sd", "builtin"])
def test_deterministic_under_seed(request, kind):
    prior, embeds = _setup(request, kind)
    cams = make_cams(2)

    def run(seed):
        guidance = ESDConfig().build(prior)
        rgb = _rgb(2, prior.image_size)
        out = guidance(rgb, cams, embeds, 0.3, torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb.grad, _lora_snapshot(guidance)

    out, grad, lora = run(7)
    out2, grad2, lora2 = run(7)
    assert torch.equal(out.loss, out2.loss) and torch.equal(grad, grad2)
    assert all(torch.equal(lora[k], lora2[k]) for k in lora)
    out3, _, lora3 = run(8)
    assert not torch.equal(out.loss, out3.loss)
    assert not all(torch.equal(lora[k], lora3[k]) for k in lora)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_timesteps_inside_schedule(sd_prior, sd_embeds, monkeypatch, progress):
    _stub(sd_prior, monkeypatch)
    cfg = VSDConfig()
    guidance = cfg.build(sd_prior)
    batch = 64
    out = guidance(_rgb(batch, 16), make_cams(batch), sd_embeds, progress, torch.Generator().manual_seed(2))
    lo, hi = cfg.timesteps.bounds(progress, T)
    assert (lo, hi) == ((20, 980) if progress < 0.2 else (20, 500))
    assert out.timesteps.shape == (batch,) and lo <= out.timesteps.min() and out.timesteps.max() <= hi
    lt = out.aux.lora_timesteps
    assert lt.shape == (batch,) and 0 <= lt.min() and lt.max() <= 999


@pytest.mark.parametrize("kind", ["sd", "builtin"])
def test_state_dict_round_trip_is_bit_exact(request, kind):
    prior, embeds = _setup(request, kind)
    cams = make_cams(2)
    size = prior.image_size
    first = ESDConfig().build(prior)
    first(_rgb(2, size, 1), cams, embeds, 0.1, torch.Generator().manual_seed(1)).loss.backward()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what the trainer's checkpoint holds
    rgb_a = _rgb(2, size, 2)
    out_a = first(rgb_a, cams, embeds, 0.2, torch.Generator().manual_seed(2))
    out_a.loss.backward()

    buffer.seek(0)
    resumed = ESDConfig().build(prior)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rgb_b = _rgb(2, size, 2)
    out_b = resumed(rgb_b, cams, embeds, 0.2, torch.Generator().manual_seed(2))
    out_b.loss.backward()
    assert torch.equal(out_a.loss, out_b.loss) and torch.equal(rgb_a.grad, rgb_b.grad)
    assert torch.equal(out_a.aux.lora_loss, out_b.aux.lora_loss)
    la, lb = _lora_snapshot(first), _lora_snapshot(resumed)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    ma, mb = _mlp_snapshot(first), _mlp_snapshot(resumed)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    # Without the state the second step differs (the LoRA really carries information).
    fresh = ESDConfig().build(prior)
    out_c = fresh(_rgb(2, size, 2), cams, embeds, 0.2, torch.Generator().manual_seed(2))
    assert not torch.equal(out_a.loss, out_c.loss)
    with pytest.raises(ValueError, match="LoRA"):
        VSDConfig(lora_rank=2).build(prior).load_state_dict(first.state_dict())


def test_esd_with_zero_lambda_is_vsd(sd_prior, sd_embeds):
    cams = make_cams(2)
    vsd = VSDConfig().build(sd_prior)
    esd = ESDConfig(entropy_weight=Constant(0.0)).build(sd_prior)
    for step, progress in enumerate((0.1, 0.7)):
        outs = []
        for guidance in (vsd, esd):
            rgb = _rgb(2, 16, step)
            out = guidance(rgb, cams, sd_embeds, progress, torch.Generator().manual_seed(step))
            out.loss.backward()
            outs.append((out, rgb.grad))
        (ov, gv), (oe, ge) = outs
        assert torch.equal(ov.loss, oe.loss) and torch.equal(gv, ge)
        assert torch.equal(ov.aux.eps_lora, oe.aux.eps_lora)
    lv, le = _lora_snapshot(vsd), _lora_snapshot(esd)
    assert all(torch.equal(lv[k], le[k]) for k in lv)
    # ... and λ > 0 changes the LoRA target.
    other = ESDConfig(entropy_weight=Constant(0.5)).build(sd_prior)
    out = other(_rgb(2, 16, 0), cams, sd_embeds, 0.1, torch.Generator().manual_seed(0))
    fresh_vsd = VSDConfig().build(sd_prior)(_rgb(2, 16, 0), cams, sd_embeds, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out.aux.eps_pretrain, fresh_vsd.aux.eps_pretrain)
    assert not torch.allclose(out.aux.eps_lora, fresh_vsd.aux.eps_lora)


def test_build_leaves_global_rng_alone_and_is_seeded(sd_prior):
    state = torch.random.get_rng_state()
    a, b = VSDConfig().build(sd_prior), VSDConfig().build(sd_prior)
    assert torch.equal(state, torch.random.get_rng_state())
    la, lb = _lora_snapshot(a), _lora_snapshot(b)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    lc = _lora_snapshot(VSDConfig(init_seed=1).build(sd_prior))
    assert not all(torch.equal(la[k], lc[k]) for k in la)
    assert VSDConfig(camera_condition="none").build(sd_prior).camera_mlp is None


# ------------------------------------------------------------------------------ config


def test_defaults_and_validate():
    cfg = VSDConfig()
    cfg.validate()
    assert cfg.guidance_scale == 7.5 and cfg.guidance_scale_lora == 1.0 and cfg.lora_rank == 4
    assert cfg.lora_lr == 1e-4 and cfg.lora_betas == (0.9, 0.99) and cfg.lora_eps == 1e-15
    assert cfg.camera_dropout == 0.1 and cfg.num_particles == 1 and cfg.weighting == "sds"
    assert cfg.timesteps.bounds(0.0, T) == (20, 980) and cfg.timesteps.bounds(0.2, T) == (20, 500)
    assert cfg.lora_timesteps.bounds(0.5, T) == (0, 999)
    esd = ESDConfig()
    esd.validate()
    assert esd.entropy_weight(0.3) == 0.5 and not hasattr(esd, "guidance_scale_lora")
    assert dataclasses.asdict(esd)["entropy_weight"] == {"value": 0.5}
    bad = [
        VSDConfig(guidance_scale=-1.0),
        VSDConfig(guidance_scale_lora=float("nan")),
        VSDConfig(weighting="sdss"),
        VSDConfig(view_dependent="sometimes"),
        VSDConfig(loss_scale=float("inf")),
        VSDConfig(lora_rank=0),
        VSDConfig(lora_target_modules=()),
        VSDConfig(lora_lr=0.0),
        VSDConfig(lora_betas=(0.9, 1.0)),
        VSDConfig(lora_eps=0.0),
        VSDConfig(lora_weight_decay=-0.1),
        VSDConfig(lora_n_timestamp_samples=0),
        VSDConfig(camera_condition="mvp"),
        VSDConfig(camera_dropout=1.5),
        VSDConfig(lora_uncond_prompt="null"),
        VSDConfig(num_particles=0),  # several particles are fine (tests/test_vsd_particles.py)
        VSDConfig(timesteps=TimestepSchedule(t_min=Constant(0.9), t_max=Constant(0.5))),
        VSDConfig(lora_timesteps=TimestepSchedule(t_min=Constant(0.9), t_max=Constant(0.5))),
        ESDConfig(entropy_weight=Constant(1.5)),
        ESDConfig(entropy_weight=Linear(0.5, -0.1)),
        ESDConfig(camera_condition="none"),
        ESDConfig(camera_dropout=0.0),
    ]
    for cfg in bad:
        with pytest.raises(ValueError):
            cfg.validate()
    ESDConfig(entropy_weight=Constant(0.0), camera_dropout=0.0).validate()  # = VSD without dropout
    with pytest.raises(ValueError):
        VSDConfig(num_particles=0).build(None)  # build validates first


def test_lora_targets_that_match_nothing_are_a_clear_error(builtin_prior):
    with pytest.raises(ValueError, match="matched no layer of the U-Net"):
        VSDConfig(lora_target_modules=("no_such_layer",)).build(builtin_prior)
