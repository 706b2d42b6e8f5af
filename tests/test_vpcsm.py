"""VPCSM and image prompts: the image file checks, the builtin prior's adapter, Stable Diffusion's
IP-Adapter loading, VPCSM's exact update rule, and the CLI's --image-prompt."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.guidance import GUIDANCES, VPCSMConfig
from dreamlab.guidance.csm import csm_weighting
from dreamlab.image_prompt import ImagePromptError, load_image_prompt
from dreamlab.priors.builtin import BuiltinPrior, BuiltinPriorConfig
from dreamlab.priors.image_adapter import ImageAdapterConfig, ImagePromptAdapter
from dreamlab.priors.stable_diffusion import PriorLoadError, StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_ip_adapter_folder, make_tiny_sd_folder
from dreamlab.prompts import PromptConfig

try:
    from guidance_fixtures import StubPrior, make_cams, stub_embeds
except ImportError:  # tests/ imported as a package
    from tests.guidance_fixtures import StubPrior, make_cams, stub_embeds  # type: ignore[no-redef]


# ----------------------------------------------------------------------------- image files


def _save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode=mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)
    return path


def test_rgba_image_is_composited_on_white_and_padded_to_square(tmp_path):
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red where opaque
    rgba[5:15, 10:30, 3] = 255
    image = load_image_prompt(_save(tmp_path / "a.png", rgba))
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert torch.allclose(image[:, 20, 20], torch.tensor([1.0, 0.0, 0.0]))  # opaque red
    assert torch.allclose(image[:, 12, 2], torch.ones(3))  # transparent -> white
    assert torch.allclose(image[:, 0, 0], torch.ones(3))  # padding -> white


@pytest.mark.parametrize("kind", ["grey", "palette", "jpeg", "grey16"])
def test_common_image_kinds_load(tmp_path, kind):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    if kind == "grey":
        path = _save(tmp_path / "g.png", rgb[..., 0])
    elif kind == "palette":
        path = tmp_path / "p.png"
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "jpeg":
        path = _save(tmp_path / "j.jpg", rgb)
    else:
        path = tmp_path / "g16.png"
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 256)).save(path)
    image = load_image_prompt(path)
    assert image.shape == (3, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: d, "is not a file"),
        (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "cannot read"),
        (lambda d: _save(d / "tiny.png", np.zeros((8, 8, 3), np.uint8)), "at least 16"),
        (lambda d: _save(d / "strip.png", np.zeros((16, 100, 3), np.uint8)), "aspect ratio"),
        (lambda d: _save(d / "clear.png", np.zeros((32, 32, 4), np.uint8)), "fully transparent"),
    ],
)
def test_unusable_images_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(ImagePromptError, match=message) as err:
        load_image_prompt(make(tmp_path))
    assert "\n" not in str(err.value)


def test_animated_gif_is_refused(tmp_path):
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImagePromptError, match="animated"):
        load_image_prompt(tmp_path / "anim.gif")


# ----------------------------------------------------------------------------- builtin adapter


@pytest.fixture(scope="module")
def small_builtin():
    cfg = BuiltinPriorConfig(block_out_channels=(16, 32, 32, 32))
    prior = BuiltinPrior.random_init(seed=0, cfg=cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        adapter = ImagePromptAdapter(ImageAdapterConfig(embed_dim=16, channels=(8, 8, 8)), prior.unet)
        for proc in adapter.processors:  # random image weights so the image visibly matters
            torch.nn.init.normal_(proc.to_v_ip[0].weight, std=0.5)
    prior.attach_image_adapter(adapter)
    return prior


def _inputs(prior, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.tensor([700, 150][:batch])
    e = prior.encode_prompt(["a red cube", "a snowman"][:batch])
    return x, t, e


def test_builtin_adapter_scale_zero_is_the_text_prior_and_the_unet_is_restored(small_builtin):
    prior = small_builtin
    x, t, e = _inputs(prior)
    text_only = prior.predict_eps(x, t, e)
    image = prior.encode_image_prompt(torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)))
    assert image.shape == (2, 16)
    torch.testing.assert_close(prior.predict_eps_with_image(x, t, e, image, scale=0.0), text_only, rtol=0, atol=0)
    with_image = prior.predict_eps_with_image(x, t, e, image, scale=1.0)
    assert (with_image - text_only).abs().max() > 1e-3
    torch.testing.assert_close(prior.predict_eps(x, t, e), text_only, rtol=0, atol=0)  # processors restored
    with pytest.raises(RuntimeError):  # an error inside the call still restores the U-Net
        prior.predict_eps_with_image(x, t, e[..., :10], image, scale=1.0)  # wrong text width
    torch.testing.assert_close(prior.predict_eps(x, t, e), text_only, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one image embedding per row"):
        prior.predict_eps_with_image(x, t, e, image[:1].expand(3, -1))


def test_builtin_adapter_saves_and_loads_with_the_prior(small_builtin, tmp_path):
    prior = small_builtin
    prior.save(tmp_path / "prior")
    prior.image_adapter.save(tmp_path / "prior" / "image-adapter")
    loaded = BuiltinPrior.from_pretrained(tmp_path / "prior")
    assert loaded.supports_image_prompt
    x, t, e = _inputs(prior)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = prior.predict_eps_with_image(x, t, e, prior.encode_image_prompt(image).expand(2, -1))
    b = loaded.predict_eps_with_image(x, t, e, loaded.encode_image_prompt(image).expand(2, -1))
    torch.testing.assert_close(a, b, atol=0.05, rtol=0)  # fp16 storage
    (tmp_path / "prior" / "image-adapter" / "adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(PriorLoadError, match="image-prompt adapter .* is damaged"):
        BuiltinPrior.from_pretrained(tmp_path / "prior")


def test_prior_without_adapter_says_how_to_get_one():
    prior = BuiltinPrior.random_init(seed=0, cfg=BuiltinPriorConfig(block_out_channels=(16, 32, 32, 32)))
    assert not prior.supports_image_prompt
    with pytest.raises(ValueError, match="train-image-adapter"):
        VPCSMConfig(image_prompt="unused.png").build(prior, image=torch.rand(3, 32, 32))


def test_adapter_training_moves_the_adapter_only_and_resumes(tmp_path, small_builtin):
    from dreamlab.priors.train_image_adapter import ImageAdapterTrainConfig, ImageAdapterTrainer
    from dreamlab.world.dataset import WorldDataConfig, build_world_cache

    data = WorldDataConfig(num_views=48)
    cache = build_world_cache(data)
    prior = BuiltinPrior.random_init(seed=0, cfg=BuiltinPriorConfig(block_out_channels=(16, 32, 32, 32)))
    frozen = [p.detach().clone() for p in prior.unet.parameters()]
    cfg = ImageAdapterTrainConfig(steps=4, batch_size=4, checkpoint_every=2, data=data,
                                  adapter=ImageAdapterConfig(embed_dim=16, channels=(8, 8, 8)))
    straight = ImageAdapterTrainer(cfg, tmp_path / "a", prior, cache=cache)
    start = {k: v.clone() for k, v in straight.adapter.state_dict().items()}
    reports = list(straight)
    assert len(reports) == 4 and all(np.isfinite(r.loss) for r in reports)
    assert any(not torch.equal(start[k], v) for k, v in straight.adapter.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(frozen, prior.unet.parameters()))
    half = ImageAdapterTrainer(cfg, tmp_path / "b", prior, cache=cache)
    for report in half:
        if report.step == 2:
            break
    resumed = ImageAdapterTrainer(cfg, tmp_path / "b", prior, cache=cache)
    assert resumed.resume() is not None and resumed.step == 2
    list(resumed)
    for key, value in straight.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[key], value, rtol=0, atol=0)
    folder = straight.export(tmp_path / "prior")
    assert ImagePromptAdapter.is_adapter_folder(folder) and (folder / "model_card.md").is_file()


# ----------------------------------------------------------------------------- Stable Diffusion IP-Adapter


@pytest.fixture(scope="module")
def sd_with_ip(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_ip")
    prior = StableDiffusionPrior.from_pretrained(make_tiny_sd_folder(root / "sd"), device="cpu")
    make_tiny_ip_adapter_folder(root / "ip", prior.unet)
    prior.load_ip_adapter(root / "ip")
    return prior, root


def test_sd_ip_adapter_loads_from_the_published_layout(sd_with_ip):
    prior, _ = sd_with_ip
    assert prior.supports_image_prompt
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([600, 90])
    e = prior.encode_prompt(["a photo of a corgi", "a cat"])
    image = prior.encode_image_prompt(torch.rand(2, 3, 50, 50, generator=g))
    base = prior.predict_eps(x, t, e)
    torch.testing.assert_close(prior.predict_eps_with_image(x, t, e, image, 0.0), base, rtol=0, atol=0)
    assert (prior.predict_eps_with_image(x, t, e, image, 1.0) - base).abs().max() > 1e-4
    assert all(not p.requires_grad for p in prior.parameters())


def test_sd_ip_adapter_errors_are_one_line(sd_with_ip, tmp_path):
    prior, root = sd_with_ip
    with pytest.raises(PriorLoadError, match="has no models/ip-adapter_sd15.safetensors"):
        prior.load_ip_adapter(tmp_path)
    with pytest.raises(PriorLoadError, match="could not load the IP-Adapter from 'h94/IP-Adapter'"):
        prior.load_ip_adapter("h94/IP-Adapter")  # offline: HF_HUB_OFFLINE=1
    other = StableDiffusionPrior.from_pretrained(make_tiny_sd_folder(tmp_path / "sd"), device="cpu")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(root / "ip" / "models" / "ip-adapter_sd15.safetensors"))
    del weights["ip_adapter.3.to_k_ip.weight"]
    (tmp_path / "bad" / "models").mkdir(parents=True)
    save_file(weights, str(tmp_path / "bad" / "models" / "ip-adapter_sd15.safetensors"))
    import shutil

    shutil.copytree(root / "ip" / "models" / "image_encoder", tmp_path / "bad" / "models" / "image_encoder")
    with pytest.raises(PriorLoadError, match="do not fit this U-Net"):
        other.load_ip_adapter(tmp_path / "bad")


def test_vpcsm_loads_the_ip_adapter_named_in_its_config(tmp_path, sd_with_ip):
    _, root = sd_with_ip
    prior = StableDiffusionPrior.from_pretrained(make_tiny_sd_folder(tmp_path / "sd"), device="cpu")
    with pytest.raises(ValueError, match="no image-prompt adapter"):
        VPCSMConfig(image_prompt="x.png").build(prior, image=torch.rand(3, 32, 32))
    guidance = VPCSMConfig(image_prompt="x.png", ip_adapter=str(root / "ip")).build(prior, image=torch.rand(3, 32, 32))
    assert prior.supports_image_prompt and guidance.image_embeds.shape == (1, 16)


# ----------------------------------------------------------------------------- exact update rule


class StubImagePrior(StubPrior):
    """StubPrior plus an image path: embedding = per-channel mean of the image; with the image,
    ε̂ += scale · d · mean(embedding) (per row)."""

    d = 0.7

    @property
    def supports_image_prompt(self) -> bool:
        return True

    def encode_image_prompt(self, rgb):
        return rgb.float().mean(dim=(2, 3))

    def predict_eps_with_image(self, x_t, t, embeds, image_embeds, scale=1.0):
        self.calls.append((x_t.detach().clone(), t.detach().clone(), embeds.detach().clone(), image_embeds.clone(), scale))
        return self.eps_formula(x_t, t, embeds) + scale * self.d * image_embeds.mean(dim=1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("s, s_img, lam_end", [(7.5, None, 0.0), (5.0, 2.0, 1.0), (0.0, 3.0, 0.5)])
@pytest.mark.parametrize("noising", ["random", "ddim_inversion"])
def test_vpcsm_exact_update_rule(s, s_img, lam_end, noising):
    from dreamlab.schedules import Constant

    prior = StubImagePrior()
    embeds = stub_embeds(prior, "a red cube", negative="ugly")
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    cfg = VPCSMConfig(
        image_prompt="unused.png", guidance_scale=s, image_guidance_scale=s_img, image_prompt_scale=0.8,
        negative_mix=Constant(lam_end), noising=noising, inversion_steps=2, weighting="sds", grad_normalize=False,
    )
    guidance = cfg.build(prior, PromptConfig(view_dependent="none"), image=image)
    cams = make_cams(2)
    x = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(4)).requires_grad_()
    out = guidance(x, cams, embeds, 0.4, torch.Generator().manual_seed(5))
    aux = out.aux
    x_t, t = aux.x_t, out.timesteps

    def f(e):
        return prior.eps_formula(x_t, t, e.unsqueeze(0).expand(2, -1, -1))

    img_term = 0.8 * StubImagePrior.d * image.mean(dim=(1, 2)).mean()
    u_text = lam_end * f(embeds.negative) + (1 - lam_end) * f(embeds.null)
    eps_c_img = f(embeds.plain) + img_term
    eps_u_img = u_text + img_term
    si = s if s_img is None else s_img
    w = csm_weighting("sds", prior.alphas_cumprod, t).view(-1, 1, 1, 1)
    expected = w * (s * (eps_c_img - eps_u_img) + si * (eps_u_img - u_text))
    torch.testing.assert_close(aux.grad, expected, rtol=0, atol=1e-6)
    out.loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    image_rows = [c for c in prior.calls if len(c) == 5]
    assert len(image_rows) == 1  # every branch in one batched call


def test_vpcsm_registered_with_cli_options_and_needs_an_image():
    assert GUIDANCES["vpcsm"] is VPCSMConfig
    with pytest.raises(ValueError, match="--image-prompt PATH"):
        VPCSMConfig().validate()
    with pytest.raises(ValueError, match="image_prompt_scale"):
        VPCSMConfig(image_prompt="a.png", image_prompt_scale=float("nan")).validate()
    from dreamlab.config import make_run_config

    with pytest.raises(ValueError, match="vpcsm only"):
        make_run_config("a red cube", guidance="sds", image_prompt="a.png", device="cpu")
    cfg = make_run_config("a red cube", guidance="vpcsm", image_prompt="a.png", device="cpu")
    assert cfg.guidance.image_prompt == "a.png" and cfg.guidance.guidance_scale == 7.5  # builtin preset


def test_cli_image_prompt_errors(tmp_path, capsys):
    from dreamlab.cli import main

    code = main(["generate", "a red cube", "--guidance", "sds", "--image-prompt", str(tmp_path / "x.png"),
                 "--out", str(tmp_path)])
    assert code != 0 and "vpcsm only" in capsys.readouterr().err
    code = main(["generate", "a red cube", "--guidance", "vpcsm", "--image-prompt", str(tmp_path / "x.png"),
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and "Traceback" not in err
    code = main(["generate", "a red cube", "--guidance", "vpcsm", "--out", str(tmp_path)])
    assert code != 0 and "--image-prompt PATH" in capsys.readouterr().err
