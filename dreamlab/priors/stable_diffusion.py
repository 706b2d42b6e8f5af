"""Stable Diffusion 1.5 / 2.1-base / 2.1 as a frozen latent-space prior, over diffusers.

The components are diffusers' / transformers' own classes (CLIPTokenizer, CLIPTextModel,
AutoencoderKL, UNet2DConditionModel) and a diffusers DDIM scheduler that carries the training
noise schedule read from the checkpoint's ``scheduler/`` config; nothing here re-implements a
noise schedule. ε- and v-prediction checkpoints are both supported: ``predict_eps`` always
returns ε̂, converting v with ε = σ_t x_t + α_t v.

``StableDiffusionPrior.from_pretrained`` is the user path (a hub id, or a local folder in the
diffusers layout); ``from_components`` is the test seam for tiny random models.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamlab.priors.base import Prior, add_to_time_embedding

#: Subfolders a diffusers Stable Diffusion folder must contain (next to model_index.json).
REQUIRED_SUBFOLDERS: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


class PriorLoadError(RuntimeError):
    """A diffusion prior could not be loaded; the message says what is missing and what to do."""


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Cast only when needed: diffusers warns on every .to(dtype) of a model.
    module = module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype)
    return module


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and "\\" not in name
        and not name.endswith((".safetensors", ".ckpt", ".bin"))
    )


def check_diffusers_folder(path: Path) -> None:
    """Raises PriorLoadError unless ``path`` is a diffusers Stable Diffusion folder."""
    if not path.is_dir():
        raise PriorLoadError(
            f"prior path '{path}' is not a folder: pass a diffusers Stable Diffusion folder "
            f"(model_index.json + {'/ '.join(REQUIRED_SUBFOLDERS)}/) or a hub id such as "
            "'stabilityai/stable-diffusion-2-1-base' (hub downloads need network access)."
        )
    missing = [name for name in ("model_index.json",) if not (path / name).is_file()]
    missing += [f"{sub}/" for sub in REQUIRED_SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise PriorLoadError(
            f"'{path}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
            "Pass a folder written by StableDiffusionPipeline.save_pretrained (or a hub snapshot "
            "downloaded with `huggingface-cli download <id>`), or a hub id such as "
            "'stabilityai/stable-diffusion-2-1-base' (hub downloads need network access; "
            "single-file .ckpt/.safetensors checkpoints are not supported)."
        )


def _clip_normalisation(source: str, subfolder: str, local_files_only: bool) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) from the encoder's ``preprocessor_config.json`` when it ships one,
    else OpenAI CLIP's (what the h94 image encoders were trained with)."""
    import json

    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    config = Path(source).expanduser() / subfolder / "preprocessor_config.json"
    if not config.is_file() and not Path(source).expanduser().exists():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(source, f"{subfolder}/preprocessor_config.json", local_files_only=local_files_only))
        except Exception:  # noqa: BLE001 - no preprocessor config: CLIP's defaults
            config = Path("/nonexistent")
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return list(data.get("image_mean", OPENAI_CLIP_MEAN)), list(data.get("image_std", OPENAI_CLIP_STD))
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def _read_ip_adapter_weights(file: Path) -> dict[str, dict[str, Tensor]]:
    """IP-Adapter weights -> ``{"image_proj": {...}, "ip_adapter": {...}}`` (a ``.safetensors``
    file stores them flat as ``image_proj.<key>`` / ``ip_adapter.<key>``; a ``.bin`` nested)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in load_file(str(file)).items():
            head, _, rest = key.partition(".")
            if head in state:
                state[head][rest] = value
        return state
    loaded = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or "image_proj" not in loaded or "ip_adapter" not in loaded:
        raise ValueError(f"{file.name} is not an IP-Adapter checkpoint (no image_proj / ip_adapter)")
    return loaded


class StableDiffusionPrior(Prior):
    """Frozen Stable Diffusion (latent space, 4 channels) exposing the Prior interface."""

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, device, dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.text_encoder = _to(text_encoder, self.device, dtype)
        self.vae = _to(vae, self.device, dtype)
        self.unet = _to(unet, self.device, dtype)
        self.scheduler = scheduler
        for module in (self.text_encoder, self.vae, self.unet):
            module.eval()
            module.requires_grad_(False)
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise PriorLoadError(
                f"scheduler prediction_type {prediction_type!r} is not supported "
                "(need 'epsilon' or 'v_prediction')"
            )
        self.prediction_type: str = prediction_type
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor: float = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.unet.config.in_channels)
        self.image_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self._prompt_cache: dict[str, Tensor] = {}
        self._alphas_cumprod = scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)
        self.image_adapter = None  # ImagePromptAdapter after load_ip_adapter (VPCSM)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_components(
        cls,
        tokenizer,
        text_encoder,
        vae,
        unet,
        scheduler,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> StableDiffusionPrior:
        """Wraps already-built components (the test seam for tiny random models)."""
        device = torch.device(device)
        return cls(tokenizer, text_encoder, vae, unet, scheduler, device, dtype or _default_dtype(device))

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
    ) -> StableDiffusionPrior:
        """Loads a hub id (``owner/name``) or a local diffusers folder.

        Args:
            id_or_path: hub id such as "stabilityai/stable-diffusion-2-1-base", or a folder with
                model_index.json + tokenizer/ text_encoder/ vae/ unet/ scheduler/.
            device: where the networks run.
            dtype: weights dtype; default fp16 on CUDA, fp32 otherwise.
            local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        Raises:
            PriorLoadError: the folder is not a diffusers SD model, or the hub id could not be
                fetched (offline, unknown id, gated repo).
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device)
        dtype = dtype or _default_dtype(device)
        source = str(id_or_path)
        path = Path(source).expanduser()
        if path.exists() or not _looks_like_hub_id(source):
            check_diffusers_folder(path)
            source, local_files_only = str(path), True
        kwargs = {"local_files_only": local_files_only}
        # Without accelerate diffusers would warn on every model; ask for the plain path then.
        low_mem = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
        try:
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
            # transformers renamed torch_dtype -> dtype in v5; cast afterwards to support both.
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, **low_mem, **kwargs
            )
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, **low_mem, **kwargs
            )
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        except PriorLoadError:
            raise
        except (OSError, ValueError) as err:
            where = "local folder" if Path(source).exists() else "hub id"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PriorLoadError(
                f"could not load Stable Diffusion from {where} '{source}' ({first_line}). "
                "Hub downloads need network access (and HF_HUB_OFFLINE unset); offline, pass a "
                "local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ "
                "scheduler/) instead."
            ) from err
        return cls(tokenizer, text_encoder, vae, unet, scheduler, device, dtype)

    def load_ip_adapter(
        self,
        source: str | os.PathLike,
        weight_name: str = "ip-adapter_sd15.safetensors",
        subfolder: str = "models",
        image_encoder_subfolder: str = "models/image_encoder",
        local_files_only: bool = False,
    ) -> None:
        """Gives the prior an image-prompt path: a published IP-Adapter (Ye et al., 2023).

        Args:
            source: a hub repo in the ``h94/IP-Adapter`` layout, or a local folder with the same
                layout: ``{subfolder}/{weight_name}`` (``.safetensors`` or ``.bin``) and a
                ``CLIPVisionModelWithProjection`` in ``{image_encoder_subfolder}/``.
            weight_name, subfolder, image_encoder_subfolder: where the files are inside ``source``.
            local_files_only: never touch the network.
        Raises:
            PriorLoadError: files missing or unreadable, offline hub access, or weights that do
                not fit this U-Net.
        """
        from transformers import CLIPVisionModelWithProjection

        from dreamlab.priors.image_adapter import CLIPImageEmbedder, ImagePromptAdapter

        where = Path(str(source)).expanduser()
        try:
            if where.exists():
                weights = where / subfolder / weight_name
                if not weights.is_file():
                    raise PriorLoadError(f"IP-Adapter folder {where} has no {subfolder}/{weight_name}")
                encoder_source, local_files_only = str(where), True
            else:
                from huggingface_hub import hf_hub_download

                weights = Path(hf_hub_download(str(source), f"{subfolder}/{weight_name}", local_files_only=local_files_only))
                encoder_source = str(source)
            state = _read_ip_adapter_weights(weights)
            vision = CLIPVisionModelWithProjection.from_pretrained(
                encoder_source, subfolder=image_encoder_subfolder, local_files_only=local_files_only
            )
            mean, std = _clip_normalisation(encoder_source, image_encoder_subfolder, local_files_only)
            encoder = CLIPImageEmbedder(_to(vision, self.device, self.dtype), mean, std)
            adapter = ImagePromptAdapter.from_ip_adapter_weights(self.unet, state, encoder)
        except PriorLoadError:
            raise
        except (OSError, ValueError, KeyError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PriorLoadError(
                f"could not load the IP-Adapter from '{source}' ({first_line}); offline, pass a local folder "
                f"with {subfolder}/{weight_name} and {image_encoder_subfolder}/"
            ) from None
        self.image_adapter = adapter.to(self.device).eval().requires_grad_(False)
        # The projection and processors run in the U-Net's dtype; the encoder already does.
        self.image_adapter.projection.to(self.dtype)
        self.image_adapter.processors.to(self.dtype)

    # ----------------------------------------------------------------------------- Prior API
    @property
    def alphas_cumprod(self) -> Tensor:  # [T] float32 on self.device
        return self._alphas_cumprod

    def parameters(self):
        """All frozen weights (text encoder, VAE, UNet, and the IP-Adapter when loaded)."""
        for module in (self.text_encoder, self.vae, self.unet):
            yield from module.parameters()
        if self.image_adapter is not None:
            yield from self.image_adapter.parameters()

    def _eps_with_image_tokens(self, x_t: Tensor, t: Tensor, embeds: Tensor, tokens: Tensor) -> Tensor:
        return self._unet_eps(self.unet, x_t, t, embeds, image_tokens=tokens)

    @torch.no_grad()
    def encode_prompt(self, texts: list[str]) -> Tensor:
        """CLIP last hidden states [N, L, D] (fp32), cached per text in memory."""
        assert isinstance(texts, (list, tuple)), "encode_prompt takes a list of strings"
        todo = [text for text in dict.fromkeys(texts) if text not in self._prompt_cache]
        if todo:
            tokens = self.tokenizer(
                todo,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
            for text, emb in zip(todo, hidden.float()):
                self._prompt_cache[text] = emb
        return torch.stack([self._prompt_cache[text] for text in texts])

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled VAE latents [B, 4, h, w] fp32 (differentiable).

        Bilinear resize without antialiasing (keeps a simple gradient), then [-1, 1], then the
        posterior mean (deterministic) times the VAE scaling factor.
        """
        assert rgb.ndim == 4 and rgb.shape[1] == 3, f"want [B, 3, H, W], got {tuple(rgb.shape)}"
        size = self.image_size
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, (size, size), mode="bilinear", align_corners=False, antialias=False)
        x = (rgb * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.scaling_factor
        return latents.float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, image_size, image_size] in [0, 1], fp32."""
        z = (latents / self.scaling_factor).to(device=self.device, dtype=self.dtype)
        image = self.vae.decode(z).sample.float()
        return (image * 0.5 + 0.5).clamp(0.0, 1.0)

    def predict_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """ε̂(x_t; y, t) [B, C, h, w] in fp32 (v-prediction converted: ε = σ_t x_t + α_t v)."""
        return self._unet_eps(self.unet, x_t, t, embeds)

    def predict_eps_with_unet(
        self, unet, x_t: Tensor, t: Tensor, embeds: Tensor, extra_class_emb: Tensor | None = None
    ) -> Tensor:
        """``predict_eps`` through ``unet`` (a trainable copy of ``self.unet``); see ``Prior``."""
        with add_to_time_embedding(unet, extra_class_emb):
            return self._unet_eps(unet, x_t, t, embeds)

    def _unet_eps(self, unet, x_t: Tensor, t: Tensor, embeds: Tensor, image_tokens: Tensor | None = None) -> Tensor:
        assert x_t.shape[0] == t.shape[0] == embeds.shape[0], (x_t.shape, t.shape, embeds.shape)
        t = t.to(self.device).long()
        states = embeds.to(device=self.device, dtype=self.dtype)
        if image_tokens is not None:  # decoupled cross-attention (IP-Adapter processors attached)
            states = (states, [image_tokens.to(device=self.device, dtype=self.dtype)])
        out = unet(
            x_t.to(device=self.device, dtype=self.dtype),
            t,
            encoder_hidden_states=states,
        ).sample.float()
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = (1.0 - abar).sqrt() * x_t.float() + abar.sqrt() * out
        return out
