"""Tiny random Stable-Diffusion-shaped models for tests (no downloads, a few MB, ~1 s to build).

``make_tiny_sd_folder(path)`` writes a folder in the exact layout that
``StableDiffusionPipeline.save_pretrained`` produces for a real checkpoint (``model_index.json``
plus ``tokenizer/ text_encoder/ vae/ unet/ scheduler/``), so tests load it back through the same
``StableDiffusionPrior.from_pretrained`` path users take with a hub id or a downloaded folder.
The weights are random: the model predicts noise-shaped garbage, which is all the plumbing tests
need. The CLI end-to-end tests use this module, so its API is kept stable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Words that get whole-word tokens; any other text still tokenizes through byte-level pieces.
TEST_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "view", "front", "side", "back",
    "overhead", "photo", "dslr", "zoomed", "out", "cat", "dog", "corgi", "hamburger", "chair",
    "cube", "red", "blue", "green", "wooden", "low", "quality", "blurry", "ugly", "high",
    "detailed", "render", "model", "sphere", "teapot", "robot", "car", "tree", "house",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab(words: tuple[str, ...] = TEST_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary: every byte (alone and word-final) plus whole ``words``.

    Returns ``(vocab, merges)`` for ``CLIPTokenizer(vocab=..., merges=...)`` (passing files to
    ``vocab_file=``/``merges_file=`` silently builds a 2-token vocabulary in transformers 5).
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    alphabet = list(_bytes_to_unicode().values())
    for ch in alphabet:
        add(ch)
    for ch in alphabet:
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merge the first two pieces of the word's current segmentation until it is one token;
        # a new merge has the last rank, so earlier words keep their segmentation.
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
    add("<|startoftext|>")
    add("<|endoftext|>")
    return vocab, merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segments ``word`` like a BPE tokenizer: apply the lowest-ranked adjacent merge until none."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best = min((r for r, _ in pairs if r is not None), default=None)
        if best is None:
            break
        merged: list[str] = []
        i = 0
        while i < len(pieces):
            if i + 1 < len(pieces) and ranks.get((pieces[i], pieces[i + 1])) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def make_tiny_unet(sample_size: int, channels: int):
    """A tiny random ``UNet2DConditionModel`` (cross-attention width 32, like the tiny CLIP).

    ``channels`` is 4 for an SD-style latent UNet, 3 for a pixel-space one. Uses the global
    torch RNG: seed it (or fork it) before calling.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_tiny_sd_components(
    prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8, max_length: int = 77
):
    """Random tiny (tokenizer, text_encoder, vae, unet, scheduler), SD-shaped, in fp32 on CPU.

    Args:
        prediction_type: "epsilon" (SD 1.5 / 2.1-base) or "v_prediction" (SD 2.1 768).
        seed: torch seed for the random weights.
        sample_size: UNet latent size; images are ``sample_size * 2`` pixels (one VAE downsample).
        max_length: tokenizer/text-encoder context length (77 like CLIP).
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    vocab, merges = tiny_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=max_length,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                projection_dim=32,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=sample_size * 2,
            scaling_factor=0.18215,
        )
        unet = make_tiny_unet(sample_size=sample_size, channels=4)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def make_tiny_sd_folder(
    path: str | os.PathLike, prediction_type: str = "epsilon", seed: int = 0
) -> Path:
    """Saves a tiny random SD pipeline (diffusers layout) to ``path`` and returns the path.

    The folder loads with ``StableDiffusionPrior.from_pretrained(path)`` and with diffusers'
    own ``StableDiffusionPipeline.from_pretrained(path)``, offline.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    tokenizer, text_encoder, vae, unet, scheduler = make_tiny_sd_components(prediction_type, seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_ip_adapter_folder(
    path: str | os.PathLike, unet, seed: int = 0, weight_name: str = "ip-adapter_sd15.safetensors"
) -> Path:
    """Writes a random IP-Adapter for ``unet`` in the ``h94/IP-Adapter`` layout and returns ``path``:
    ``models/{weight_name}`` (flat ``image_proj.*`` / ``ip_adapter.{2k+1}.to_{k,v}_ip.weight``
    keys, as the published files) and a tiny ``CLIPVisionModelWithProjection`` in
    ``models/image_encoder/``. Loads with ``StableDiffusionPrior.load_ip_adapter(path)``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    cross = int(unet.config.cross_attention_dim)
    embed_dim, tokens = 16, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, projection_dim=embed_dim)
        )
        state = {
            "image_proj.proj.weight": torch.randn(tokens * cross, embed_dim) * 0.1,
            "image_proj.proj.bias": torch.zeros(tokens * cross),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
        key = 1
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                attn = unet.get_submodule(name[: -len(".processor")])
                hidden = attn.to_k.out_features
                state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
                state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
                key += 2
    (path / "models").mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "models" / weight_name))
    vision.save_pretrained(path / "models" / "image_encoder", safe_serialization=True)
    return path
