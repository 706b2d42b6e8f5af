"""The frozen diffusion prior interface every guidance method talks to.

A prior wraps a frozen text-conditioned diffusion model. It holds no loss logic: it encodes
prompts, maps images to and from the space the model denoises (VAE latents, or the pixels
themselves for a pixel-space prior), predicts noise, and exposes its diffusers scheduler.
"""

from __future__ import annotations

import abc

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

    def parameters(self):  # noqa: D401 - iterate the frozen weights (tests check none need grad)
        """All weights of the frozen networks."""
        return iter(())
