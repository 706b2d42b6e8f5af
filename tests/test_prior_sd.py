"""StableDiffusionPrior: loading through from_pretrained offline, shapes, v-prediction, freezing."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dreamlab.priors import PRIORS, PriorLoadError, StableDiffusionPrior, load_prior
from dreamlab.priors.testing import make_tiny_sd_components, make_tiny_sd_folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def prior(tiny_folder):
    return StableDiffusionPrior.from_pretrained(tiny_folder, device="cpu")


def test_folder_layout(tiny_folder):
    assert (tiny_folder / "model_index.json").is_file()
    for sub in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        assert (tiny_folder / sub).is_dir(), sub


def test_from_pretrained_offline_without_network(tiny_folder, no_network):
    prior = StableDiffusionPrior.from_pretrained(tiny_folder, device="cpu")
    assert prior.dtype == torch.float32
    assert prior.image_size == 16 and prior.latent_channels == 4
    assert prior.num_train_timesteps == 1000
    prior2 = load_prior(str(tiny_folder), device="cpu")
    assert isinstance(prior2, StableDiffusionPrior)


def test_shapes(prior):
    emb = prior.encode_prompt(["a photo of a corgi", "zzz unseen wörds!"])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    rgb = torch.rand(3, 3, 24, 24)
    latents = prior.encode_images(rgb)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    images = prior.decode_latents(latents)
    assert images.shape == (3, 3, 16, 16)
    assert images.min() >= 0.0 and images.max() <= 1.0
    t = torch.tensor([1, 500, 999])
    eps = prior.predict_eps(latents, t, emb[:1].expand(3, -1, -1))
    assert eps.shape == latents.shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()
    assert prior.alphas_cumprod.shape == (1000,)


def test_prompt_cache_and_tokenizer(prior):
    a = prior.encode_prompt(["a red chair"])
    b = prior.encode_prompt(["a red chair", "a blue chair"])
    assert torch.equal(a[0], b[0])
    assert not torch.equal(b[0], b[1])
    ids = prior.tokenizer("a red chair").input_ids
    assert len(ids) == 5  # bos, a, red, chair, eos: whole-word tokens, not a 2-token vocab


def test_encode_images_is_differentiable(prior):
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    prior.encode_images(rgb).square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())


def test_weights_frozen(prior):
    params = list(prior.parameters())
    assert len(params) > 0
    assert not any(p.requires_grad for p in params)
    assert not prior.unet.training and not prior.vae.training and not prior.text_encoder.training


class _StubUNet(torch.nn.Module):
    """Returns a fixed function of its inputs as the model output ("v")."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, sample_size=8)
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=torch.cos(x) + 0.001 * t.view(-1, 1, 1, 1).float())


def test_v_prediction_is_converted_to_eps():
    tok, te, vae, _, sched = make_tiny_sd_components(prediction_type="v_prediction")
    prior = StableDiffusionPrior.from_components(tok, te, vae, _StubUNet(), sched, "cpu")
    assert prior.prediction_type == "v_prediction"
    x_t = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    v = torch.cos(x_t) + 0.001 * t.view(-1, 1, 1, 1).float()
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    expected = (1 - abar).sqrt() * x_t + abar.sqrt() * v
    got = prior.predict_eps(x_t, t, torch.zeros(3, 77, 32))
    torch.testing.assert_close(got, expected)
    # epsilon models pass the output through unchanged
    tok, te, vae, _, sched = make_tiny_sd_components(prediction_type="epsilon")
    prior = StableDiffusionPrior.from_components(tok, te, vae, _StubUNet(), sched, "cpu")
    torch.testing.assert_close(prior.predict_eps(x_t, t, torch.zeros(3, 77, 32)), v)


def test_v_prediction_folder_round_trip(tmp_path):
    folder = make_tiny_sd_folder(tmp_path / "v", prediction_type="v_prediction")
    prior = StableDiffusionPrior.from_pretrained(folder)
    assert prior.prediction_type == "v_prediction"


def test_non_diffusers_folder_raises_readable_error(tmp_path, no_network):
    (tmp_path / "weights.safetensors").write_bytes(b"not a model")
    with pytest.raises(PriorLoadError) as info:
        StableDiffusionPrior.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model_index.json" in message and "unet/" in message and "network" in message
    assert "\n" not in message


def test_missing_path_and_unknown_names(tmp_path, no_network):
    with pytest.raises(PriorLoadError, match="not a folder"):
        load_prior(str(tmp_path / "nope" / "model"))
    with pytest.raises(PriorLoadError, match="unknown prior"):
        load_prior("sd99")
    with pytest.raises(PriorLoadError, match="network"):
        load_prior("dreamlab-tests/no-such-model", local_files_only=True)


def test_priors_table():
    assert set(PRIORS) >= {"sd15", "sd21-base", "sd21"}
    hub = {k: v for k, v in PRIORS.items() if k != "builtin"}
    assert all(value.count("/") == 1 for value in hub.values())  # owner/name hub ids
    assert PRIORS["builtin"].endswith("builtin-prior")  # the shipped folder
