"""The frozen diffusion prior interface every guidance method talks to.

A prior wraps a frozen text-conditioned diffusion model. It holds no loss logic: it encodes
prompts, maps images to and from the space the model denoises (VAE latents, or the pixels
themselves for a pixel-space prior), predicts noise, and exposes its diffusers scheduler.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class Prior(abc.ABC):
    """Frozen diffusion model. Subclasses: StableDiffusionPrior (latent), pixel-space priors."""

    #: Resolution (pixels, square) of the images the model was trained on; renders are resized to it.
    image_size: int
    #: Channels of the space the model denoises (4 for SD latents, 3 for a pixel-space model).
    latent_channels: int
    #: diffusers scheduler (DDPM/DDIM family) carrying the training noise schedule.
    scheduler: object
    device: torch.device
    dtype: torch.dtype  # dtype the denoiser runs in (fp16 on GPU when asked, else fp32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> Tensor:  # [T] float32 on self.device
        return self.scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)

    @abc.abstractmethod
    def encode_prompt(self, texts: list[str]) -> Tensor:
        """Text embeddings [N, L, D] for N strings (no gradient)."""

    @abc.abstractmethod
    def encode_images(self, rgb: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> model space [B, C, h, w], differentiable.

        Resizes to ``image_size`` first. Identity (after resize and [-1, 1] scaling) for a
        pixel-space prior.
        """

    @abc.abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Model space [B, C, h, w] -> images [B, 3, image_size, image_size] in [0, 1]."""

    @abc.abstractmethod
    def predict_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """Noise prediction ε̂(x_t; y, t) in fp32, whatever the model's own parameterisation.

        Args:
            x_t: [B, C, h, w] noisy model-space input.
            t: [B] integer timesteps.
            embeds: [B, L, D] text embeddings.
        """

    def predict_eps_with_unet(
        self, unet, x_t: Tensor, t: Tensor, embeds: Tensor, extra_class_emb: Tensor | None = None
    ) -> Tensor:
        """``predict_eps`` run through ``unet`` instead of the frozen denoiser.

        Priors that implement it expose their frozen diffusers U-Net as ``self.unet``, and
        ``unet`` is a trainable copy of it (e.g. VSD's LoRA U-Net); the
        input/output conversions (dtype, v-prediction → ε, pooled-text conditioning) are exactly
        those of ``predict_eps``. Gradients flow (no ``no_grad``), so a caller can train the copy.

        Args:
            unet: a diffusers ``UNet2DConditionModel`` shaped like ``self.unet``.
            x_t, t, embeds: as in ``predict_eps``.
            extra_class_emb: optional [B, D] vector added to the U-Net's timestep embedding,
                D = the time-embedding width. diffusers sums the time and class embeddings
                before use, so this equals adding it to the class embedding (threestudio's
                camera embedding for VSD) and composes with an existing one (the builtin prior's
                pooled text); see ``add_to_time_embedding``.
        Raises:
            NotImplementedError: the prior has no diffusers U-Net to copy.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot run a copy of its denoiser (no predict_eps_with_unet); "
            "methods that train a LoRA on the prior (VSD, ESD) need a Stable Diffusion or the builtin prior"
        )

    # ------------------------------------------------------------------ image prompts (VPCSM)

    #: ImagePromptAdapter (dreamlab.priors.image_adapter) when the prior has an image-prompt path.
    image_adapter = None

    @property
    def supports_image_prompt(self) -> bool:
        """True when the prior carries an image-prompt adapter (IP-Adapter style)."""
        return self.image_adapter is not None

    def image_prompt_help(self) -> str:
        """Why this prior cannot take an image prompt, and what to do about it."""
        return (
            f"{type(self).__name__} has no image-prompt adapter; VPCSM needs the builtin prior with its "
            "adapter (`dreamlab prior train-image-adapter`) or a Stable Diffusion prior loaded with an "
            "IP-Adapter (`--vpcsm.ip-adapter h94/IP-Adapter` or a local folder in that layout)"
        )

    def encode_image_prompt(self, rgb: Tensor) -> Tensor:
        """Reference images [N, 3, H, W] in [0, 1] -> image embeddings [N, E] (no gradient).
        The all-zero embedding means "no image" (IP-Adapter's unconditional convention)."""
        if self.image_adapter is None:
            raise NotImplementedError(self.image_prompt_help())
        with torch.no_grad():
            return self.image_adapter.embed(rgb.to(self.device)).float()

    def predict_eps_with_image(
        self, x_t: Tensor, t: Tensor, embeds: Tensor, image_embeds: Tensor, scale: float = 1.0
    ) -> Tensor:
        """``predict_eps`` with the image prompt entering every cross-attention through decoupled
        attention, ``h = Attn(Q, K_txt, V_txt) + scale · Attn(Q, K_img, V_img)``.

        Args:
            x_t, t, embeds: as in ``predict_eps``.
            image_embeds: [B, E] per-row image embeddings from ``encode_image_prompt`` (zeros for
                rows without the image).
            scale: λ_ip of the decoupled attention (IP-Adapter's ``scale``; 0 ignores the image).
        """
        adapter = self.image_adapter
        if adapter is None:
            raise NotImplementedError(self.image_prompt_help())
        check_image_rows(x_t, image_embeds)
        adapter.set_scale(scale)
        with adapter.attached(self.unet):
            tokens = adapter.tokens(image_embeds.to(self.device, self.dtype))
            return self._eps_with_image_tokens(x_t, t, embeds, tokens)

    def _eps_with_image_tokens(self, x_t: Tensor, t: Tensor, embeds: Tensor, tokens: Tensor) -> Tensor:
        """``predict_eps`` with ``encoder_hidden_states = (text, [tokens])`` (adapter attached)."""
        raise NotImplementedError(self.image_prompt_help())

    def parameters(self):  # noqa: D401 - iterate the frozen weights (tests check none need grad)
        """All weights of the frozen networks."""
        return iter(())


def check_image_rows(x_t: Tensor, image_embeds: Tensor) -> None:
    """Raises ValueError unless ``image_embeds`` is [B, E] for the B rows of ``x_t`` (diffusers'
    IP-Adapter attention would otherwise silently reshape the tokens across rows)."""
    if image_embeds.ndim != 2 or image_embeds.shape[0] != x_t.shape[0]:
        raise ValueError(
            f"predict_eps_with_image needs one image embedding per row: got {tuple(image_embeds.shape)} "
            f"for {x_t.shape[0]} rows"
        )


@contextmanager
def add_to_time_embedding(unet, extra: Tensor | None) -> Iterator[None]:
    """Within the block, ``unet.time_embedding``'s output gets ``extra`` [B, D] added.

    diffusers' ``UNet2DConditionModel`` computes ``emb = time_embedding(t) + class_embedding(c)``
    (then ``+ aug_emb``) before any non-linearity, so this is the same as adding ``extra`` to the
    class embedding, whether the U-Net has one or not. The hook is removed on exit. ``None`` does
    nothing. Raises ValueError for U-Nets that concatenate the class embedding instead.
    """
    if extra is None:
        yield
        return
    if getattr(unet.config, "class_embeddings_concat", False):
        raise ValueError("cannot add an embedding to a U-Net with class_embeddings_concat=True")

    def hook(module, inputs, output):
        assert output.shape == extra.shape, (tuple(output.shape), tuple(extra.shape))
        return output + extra.to(output.dtype)

    handle = unet.time_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
