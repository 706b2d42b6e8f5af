"""The builtin offline prior: tokenizer, save/load through the prior interface, shipped weights."""

from __future__ import annotations

import pytest
import torch

from dreamlab.priors import PriorLoadError, load_prior
from dreamlab.priors.builtin import ASSET_DIR, BuiltinPrior, WordTokenizer
from dreamlab.world.catalog import VOCABULARY, UnknownWordError


def test_tokenizer_encodes_known_prompts():
    tok = WordTokenizer(VOCABULARY, 12)
    ids = tok(["a red cube", "a red cube, front view", ""])
    assert ids.shape == (3, 12)
    assert ids[0, 0] == 1 and ids[0, 4] == 2  # BOS a red cube EOS
    assert ids[2, :2].tolist() == [1, 2] and (ids[2, 2:] == 0).all()
    assert not torch.equal(ids[0], ids[1])
    # captions write "an" before vowels; users may not: both spellings are one token
    assert torch.equal(tok(["an orange cube"]), tok(["a orange cube"]))


@pytest.mark.parametrize("prompt", ["a red dragon", "a red cube!", "a purple teapot on a table"])
def test_unknown_words_are_a_clear_error(prompt):
    tok = WordTokenizer(VOCABULARY, 12)
    with pytest.raises(UnknownWordError) as info:
        tok([prompt])
    message = str(info.value)
    assert "sphere" in message and "red" in message  # lists the known words
    assert "--prior sd21-base" in message  # and where open vocabulary lives


def test_random_prior_round_trips_through_load_prior(tmp_path):
    prior = BuiltinPrior.random_init(seed=3)
    prior.save(tmp_path / "p", half=False)
    again = load_prior(tmp_path / "p")
    assert isinstance(again, BuiltinPrior)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 500])
    emb = again.encode_prompt(["a red cube", ""])
    assert emb.shape[0] == 2 and emb.ndim == 3
    assert torch.allclose(prior.predict_eps(x, t, prior.encode_prompt(["a red cube", ""])),
                          again.predict_eps(x, t, emb), atol=1e-5)
    assert all(not p.requires_grad for p in again.parameters())


def test_pixel_space_encode_decode():
    prior = BuiltinPrior.random_init()
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    x = prior.encode_images(rgb)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    x.sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    back = prior.decode_latents(prior.encode_images(torch.full((1, 3, 32, 32), 0.25)))
    assert torch.allclose(back, torch.full_like(back, 0.25), atol=1e-6)


def test_damaged_or_missing_prior_folder(tmp_path):
    with pytest.raises(PriorLoadError, match="builtin_prior.json"):
        BuiltinPrior.from_pretrained(tmp_path)
    BuiltinPrior.random_init().save(tmp_path / "p")
    (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(PriorLoadError, match="damaged"):
        load_prior(tmp_path / "p")
