"""Shared pieces for the guidance tests: a prior whose ε-prediction is a known closed form.

``StubPrior`` is a pixel-space prior (3 channels, 8 x 8, the builtin prior's noise schedule)
whose ``predict_eps`` is an explicit formula of (x_t, t, embeds) and which records every call,
so a test can recompute a method's update rule by hand and compare to 1e-6. Its single frozen
parameter lets contract tests check that no gradient ever reaches the prior's weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
from dreamlab.priors.base import Prior
from dreamlab.prompts import build_prompt_embeds
from dreamlab.types import Cameras, PromptEmbeds


class StubPrior(Prior):
    """Pixel space, image_size 8; ε̂(x_t, t, e) = a·x_t + b·mean(e) + c·t/1000 (per sample)."""

    latent_channels = 3

    def __init__(self, a: float = 0.3, b: float = 0.05, c: float = 0.02, image_size: int = 8) -> None:
        from diffusers import DDPMScheduler

        self.image_size = image_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                       beta_start=1e-4, beta_end=0.02)
        self.a, self.b, self.c = a, b, c
        self.weight = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # frozen
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def eps_formula(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """The closed form, for tests to recompute expectations."""
        e = embeds.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return self.weight * (self.a * x_t + self.b * e + self.c * t.float().view(-1, 1, 1, 1) / 1000.0)

    def encode_prompt(self, texts: list[str]) -> Tensor:
        # Deterministic per text: 4 tokens x 6 dims from a hash-seeded generator.
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(text)) % (2**31))
            rows.append(torch.randn(4, 6, generator=g))
        return torch.stack(rows)

    def encode_images(self, rgb: Tensor) -> Tensor:
        if rgb.shape[-1] != self.image_size:
            rgb = F.interpolate(rgb, size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False)
        return rgb * 2.0 - 1.0

    def decode_latents(self, latents: Tensor) -> Tensor:
        return ((latents + 1.0) * 0.5).clamp(0.0, 1.0)

    def predict_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        self.calls.append((x_t.detach().clone(), t.detach().clone(), embeds.detach().clone()))
        return self.eps_formula(x_t, t, embeds)

    def parameters(self):
        yield self.weight


def stub_embeds(prior: Prior, prompt: str = "a red cube", negative: str = "") -> PromptEmbeds:
    return build_prompt_embeds(prior, prompt, negative_prompt=negative)


def make_cams(batch: int, seed: int = 0, resolution: int = 16) -> Cameras:
    return sample_orbit_cameras(CameraSamplerConfig(batch_size=batch), resolution,
                                torch.Generator().manual_seed(seed))


def capture_latents(prior: Prior, monkeypatch) -> list[Tensor]:
    """Makes ``prior.encode_images`` keep its outputs (with ``retain_grad``) in the returned list."""
    store: list[Tensor] = []
    original = prior.encode_images

    def encode_images(rgb: Tensor) -> Tensor:
        latents = original(rgb)
        if latents.requires_grad:
            latents.retain_grad()
        store.append(latents)
        return latents

    monkeypatch.setattr(prior, "encode_images", encode_images)
    return store
