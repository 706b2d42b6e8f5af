"""dreamlab's builtin offline prior: a small pixel-space text-to-image diffusion model.

Trained in-repo (``dreamlab prior train-builtin``, see ``dreamlab/priors/train_builtin.py``) on
renders of the procedural world in ``dreamlab.world``; its weights ship in ``assets/builtin-prior``.
It knows a closed vocabulary ("a red cube", "a snowman, back view", ...), runs offline on a
CPU, and plugs into the same Prior interface as Stable Diffusion: model space = pixels in [-1, 1].

Components, all from libraries: a word-level tokenizer over the world's vocabulary (unknown
words are an error, not silently dropped), a small ``transformers.CLIPTextModel``, a small
``diffusers.UNet2DConditionModel`` on RGB images, and diffusers' DDPM/DDIM schedulers.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import dreamlab.assets

from dreamlab.priors.base import Prior, add_to_time_embedding
from dreamlab.priors.image_adapter import ADAPTER_DIR, ImagePromptAdapter
from dreamlab.priors.stable_diffusion import PriorLoadError
from dreamlab.world.catalog import UnknownWordError

TOKEN_ALIASES = {"an": "a", "gray": "grey"}
"""Spellings the tokenizer folds together (the world's captions write "an" before vowels)."""

ASSET_DIR = Path(dreamlab.assets.__file__).resolve().parent / "builtin-prior"
"""Where the shipped weights live (package data of ``dreamlab.assets``, the top-level assets/)."""

MARKER_FILE = "builtin_prior.json"
PAD, BOS, EOS = 0, 1, 2
_WORD = re.compile(r"[a-z]+|,")


@dataclass
class BuiltinPriorConfig:
    """Architecture of the builtin prior (recorded in the model card and builtin_prior.json)."""

    image_size: int = 32
    """Training and sampling resolution in pixels (32 chosen by measurement: docs/builtin-prior.md)."""
    block_out_channels: tuple[int, ...] = (32, 64, 64, 128)
    """UNet channels per resolution level (32, 16, 8, 4 px)."""
    layers_per_block: int = 1
    """ResNet blocks per level (1: 4.5 M parameters, 0.57 s per batch of 32 on 2 cores; 2 costs 1.5x)."""
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    """Cross-attention to the text at each level (only where it is cheap: 8x8 and 4x4)."""
    text_width: int = 64
    """Width of the text encoder and of the UNet's cross-attention."""
    text_layers: int = 2
    max_tokens: int = 12
    pooled_text_conditioning: bool = True
    """Also feed the mean of the text encoder's token states into every ResNet block (added to the
    timestep embedding, diffusers ``class_embed_type="projection"``), so the prompt steers all
    resolutions and not only the cross-attention levels. Weights saved before this option existed
    load with it off."""
    """Context length: BOS + words + EOS, padded."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


class WordTokenizer:
    """Maps prompts over a closed vocabulary to token ids; unknown words raise UnknownWordError."""

    def __init__(self, vocabulary: tuple[str, ...], max_tokens: int) -> None:
        self.vocabulary = tuple(vocabulary)
        self.max_tokens = max_tokens
        self._ids = {word: index + 3 for index, word in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 3

    def words(self, text: str) -> list[str]:
        return [TOKEN_ALIASES.get(w, w) for w in _WORD.findall(text.lower())]

    def check(self, text: str) -> None:
        """Raises UnknownWordError naming the unknown words and listing the known ones."""
        stripped = re.sub(r"[a-z]+|,|\s", "", text.lower())
        unknown = [w for w in self.words(text) if w not in self._ids]
        stripped = re.sub(r"\.$", "", stripped)  # a trailing full stop is harmless
        if stripped:
            unknown.append(stripped)
        if unknown:
            known = ", ".join(w for w in self.vocabulary if w != ",")
            raise UnknownWordError(
                f"the builtin prior does not know {', '.join(repr(w) for w in unknown)}; it knows only: "
                f"{known}. For open-vocabulary prompts use a Stable Diffusion prior "
                "(--prior sd21-base, or a local diffusers folder)"
            )
        if len(self.words(text)) + 2 > self.max_tokens:
            raise UnknownWordError(
                f"the prompt is too long for the builtin prior (at most {self.max_tokens - 2} words)"
            )

    def __call__(self, texts: list[str]) -> Tensor:  # [N, max_tokens] long
        rows = []
        for text in texts:
            self.check(text)
            ids = [BOS] + [self._ids[w] for w in self.words(text)] + [EOS]
            rows.append(ids + [PAD] * (self.max_tokens - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def build_networks(cfg: BuiltinPriorConfig, vocab_size: int):
    """Fresh (randomly initialised) text encoder, UNet and DDPM scheduler for ``cfg``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_tokens,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
        class_embed_type="projection" if cfg.pooled_text_conditioning else None,
        projection_class_embeddings_input_dim=cfg.text_width if cfg.pooled_text_conditioning else None,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )
    return text_encoder, unet, scheduler


class BuiltinPrior(Prior):
    """The builtin pixel-space prior. Frozen; see the module docstring."""

    latent_channels = 3

    def __init__(
        self,
        cfg: BuiltinPriorConfig,
        tokenizer: WordTokenizer,
        text_encoder,
        unet,
        scheduler,
        device: torch.device | str = "cpu",
    ) -> None:
        from diffusers import DDIMScheduler

        self.cfg = cfg
        self.image_size = cfg.image_size
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.unet.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN)
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self._cache: dict[str, Tensor] = {}
        self.image_adapter = None  # ImagePromptAdapter, loaded with the weights when shipped

    def attach_image_adapter(self, adapter) -> None:
        """Gives the prior an image-prompt path (a :class:`~dreamlab.priors.image_adapter.ImagePromptAdapter`
        built for this prior's U-Net), frozen."""
        self.image_adapter = adapter.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ construction / I/O

    @classmethod
    def random_init(cls, seed: int = 0, cfg: BuiltinPriorConfig | None = None,
                    device: torch.device | str = "cpu") -> BuiltinPrior:
        """An untrained prior (tests, and the baseline that proves training carries knowledge)."""
        from dreamlab.world.catalog import VOCABULARY

        cfg = cfg or BuiltinPriorConfig()
        tokenizer = WordTokenizer(VOCABULARY, cfg.max_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder, unet, scheduler = build_networks(cfg, tokenizer.vocab_size)
        return cls(cfg, tokenizer, text_encoder, unet, scheduler, device)

    def save(self, folder: Path | str, half: bool = True) -> None:
        """Writes the prior as safetensors + JSON (weights in fp16 when ``half``: ~half the size)."""
        from dreamlab.export.atomic import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if half else torch.float32
        for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            module = copy.deepcopy(module).to(dtype)
            for param in module.parameters():  # safetensors stores contiguous tensors only
                param.data = param.data.contiguous()
            module.save_pretrained(folder / name, safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {
            "kind": "dreamlab-builtin-prior",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.cfg).items()},
            "vocabulary": list(self.tokenizer.vocabulary),
        }
        atomic_write_text(folder / MARKER_FILE, json.dumps(meta, indent=2))

    @classmethod
    def is_builtin_folder(cls, folder: Path | str) -> bool:
        return (Path(folder) / MARKER_FILE).is_file()

    @classmethod
    def from_pretrained(cls, folder: Path | str = ASSET_DIR, device: torch.device | str = "cpu") -> BuiltinPrior:
        """Loads a saved builtin prior. Raises PriorLoadError with a one-line reason."""
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel
        from transformers.utils import logging as transformers_logging

        folder = Path(folder)
        marker = folder / MARKER_FILE
        if not marker.is_file():
            raise PriorLoadError(
                f"{folder} holds no builtin prior ({MARKER_FILE} missing); train one with "
                "`dreamlab prior train-builtin` or reinstall dreamlab to restore assets/builtin-prior"
            )
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
            raw = dict(meta["config"])
            raw.setdefault("pooled_text_conditioning", False)  # weights from before the option
            cfg = BuiltinPriorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
            tokenizer = WordTokenizer(tuple(meta["vocabulary"]), cfg.max_tokens)
            # Quiet loading: no accelerate hint, no weight-loading bar (dreamlab shows its own).
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).float()
            transformers_logging.disable_progress_bar()
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").float()
            scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        except Exception as err:  # noqa: BLE001 - any broken file means the prior is unusable
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise PriorLoadError(f"the builtin prior in {folder} is damaged ({first}); reinstall or retrain it") from None
        prior = cls(cfg, tokenizer, text_encoder, unet, scheduler, device)
        adapter_dir = folder / ADAPTER_DIR
        if ImagePromptAdapter.is_adapter_folder(adapter_dir):
            try:
                prior.attach_image_adapter(ImagePromptAdapter.load(adapter_dir, prior.unet))
            except ValueError as err:
                raise PriorLoadError(str(err)) from None
        return prior

    # ------------------------------------------------------------------ Prior interface

    def parameters(self):
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()
        if self.image_adapter is not None:
            yield from self.image_adapter.parameters()

    def image_prompt_help(self) -> str:
        return (
            "this builtin prior has no image-prompt adapter; train one with `dreamlab prior "
            "train-image-adapter` (it is saved next to the prior's weights), or use a Stable "
            "Diffusion prior with an IP-Adapter"
        )

    def encode_prompt(self, texts: list[str]) -> Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with torch.no_grad():
                ids = self.tokenizer(missing).to(self.device)
                hidden = self.text_encoder(input_ids=ids).last_hidden_state.float()
            for text, row in zip(missing, hidden):
                self._cache[text] = row
        return torch.stack([self._cache[t] for t in texts])

    def encode_images(self, rgb: Tensor) -> Tensor:
        if rgb.shape[-1] != self.image_size or rgb.shape[-2] != self.image_size:
            rgb = F.interpolate(rgb, size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False, antialias=True)
        return rgb.float() * 2.0 - 1.0

    def decode_latents(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)

    def _eps_with_image_tokens(self, x_t: Tensor, t: Tensor, embeds: Tensor, tokens: Tensor) -> Tensor:
        return unet_eps(self.unet, self.cfg, x_t.to(self.device, self.dtype), t.to(self.device),
                        embeds.to(self.device, self.dtype), image_tokens=tokens).float()

    def predict_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        return unet_eps(self.unet, self.cfg, x_t.to(self.device, self.dtype), t.to(self.device),
                        embeds.to(self.device, self.dtype)).float()

    def predict_eps_with_unet(
        self, unet, x_t: Tensor, t: Tensor, embeds: Tensor, extra_class_emb: Tensor | None = None
    ) -> Tensor:
        """``predict_eps`` through ``unet`` (a trainable copy of ``self.unet``); see ``Prior``.
        ``extra_class_emb`` is added on top of the pooled-text class embedding, if any."""
        with add_to_time_embedding(unet, extra_class_emb):
            return unet_eps(unet, self.cfg, x_t.to(self.device, self.dtype), t.to(self.device),
                            embeds.to(self.device, self.dtype)).float()


def unet_eps(
    unet, cfg: BuiltinPriorConfig, x_t: Tensor, t: Tensor, hidden: Tensor, image_tokens: Tensor | None = None
) -> Tensor:
    """The UNet's ε for token states ``hidden`` [B, T, W]; shared by training and inference so
    both condition the same way (cross-attention, plus the pooled text when configured).
    ``image_tokens`` [B, K, W]: image-prompt tokens for decoupled cross-attention (the U-Net must
    carry IP-Adapter processors, :meth:`ImagePromptAdapter.attached`)."""
    pooled = hidden.mean(dim=1) if cfg.pooled_text_conditioning else None
    states = hidden if image_tokens is None else (hidden, [image_tokens])
    return unet(x_t, t, encoder_hidden_states=states, class_labels=pooled).sample
