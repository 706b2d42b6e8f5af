"""VPCSM — Visual-Prompt Classifier Score Matching (TV-3DG; Yang et al., 2024, arXiv 2410.21299).

CSM (``guidance/csm.py``) with a reference image I entering the frozen denoiser through
IP-Adapter decoupled cross-attention (``Prior.predict_eps_with_image``; λ_ip =
``image_prompt_scale``). Update rule (descent gradient on the model-space image x):

    t ~ U{t_min..t_max} per view
    x_t = DDIMInvert(x → t; ε_φ(·; "", ·), η = 0)           (as CSM; no image in the inversion)
    ε_u(·) = λ(p) ε_φ(x_t; neg, ·) + (1 − λ(p)) ε_φ(x_t; "", ·)   (CSM's unconditional text mix)
    g = w(t) · [ s   (ε_φ(x_t; y_view, I) − ε_u(I))
               + s_I (ε_u(I) − ε_u(∅)) ]
    g ← g / (‖g‖₂ + 1e−8) with grad_normalize

with s = ``guidance_scale`` and s_I = ``image_guidance_scale`` (None: s_I = s, which collapses g
to the joint form w·s·(ε(y, I) − ε(∅, ∅))). "∅" for the image is the all-zero image embedding
(IP-Adapter's unconditional convention). Every branch is one row of a single batched U-Net call,
rows without the image carrying zero image embeddings; zero-weight branches are dropped and
identical (text, image) rows merged.

**UNVERIFIED** (docs/guidance-spec.md §4.2): TV-3DG released no code. The abstract says VPCSM adds
the visual prompt "through attention fusion plus sampling guidance"; the attention fusion is
IP-Adapter's decoupled attention (``tencent-ailab/IP-Adapter``
``ip_adapter/attention_processor.py``), the "sampling guidance" is reconstructed as the two-term
(text, image) guidance above, whose scales, t-range, inversion steps and λ_ip are unpublished and
exposed as config fields. Everything else is CSM's.

The image prompt comes from ``image_prompt`` (a file path, validated by
:func:`dreamlab.image_prompt.load_image_prompt`) or, from Python, ``image`` ([3, H, W] in
[0, 1]). Priors: the builtin prior with its trained adapter (``dreamlab prior
train-image-adapter``), or Stable Diffusion loaded with an IP-Adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dreamlab.guidance.csm import CSM, CSMBranch, CSMConfig
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig
from dreamlab.types import Cameras, PromptEmbeds


@dataclass
class VPCSMConfig(CSMConfig):
    """Visual-prompt CSM (TV-3DG VPCSM): CSM's fields, plus the image prompt and its scales.

    Defaults are CSM's (UNVERIFIED reconstruction, see the module docstring) with the image
    entering every cross-attention at λ_ip = 1 (IP-Adapter's default) and the joint
    text+image guidance (s_I = s).
    """

    image_prompt: str | None = None
    """Path of the reference image (PNG, JPEG, WebP...; RGB, greyscale, palette or with alpha,
    which is composited on white; padded to a square). Required: ``--image-prompt PATH``."""
    image_guidance_scale: float | None = None
    """s_I: scale of the image direction ε_u(I) − ε_u(∅); None = guidance_scale (joint guidance
    s·(ε(y, I) − ε(∅, ∅)))."""
    image_prompt_scale: float = 1.0
    """λ_ip: weight of the decoupled image attention in every cross-attention (IP-Adapter
    ``scale``, default 1.0; 0 ignores the image)."""
    ip_adapter: str | None = None
    """Stable Diffusion priors only: the IP-Adapter to load, a hub repo or local folder in the
    h94/IP-Adapter layout (e.g. "h94/IP-Adapter" for SD 1.5). The builtin prior uses its own
    trained adapter and ignores this."""
    ip_adapter_weight: str = "models/ip-adapter_sd15.safetensors"
    """With ip_adapter: the weights file inside it; the CLIP image encoder is read from
    ``image_encoder/`` beside that file."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        super().validate()
        if self.image_prompt is None or not str(self.image_prompt).strip():
            raise ValueError("vpcsm needs a reference image: pass --image-prompt PATH")
        if self.image_guidance_scale is not None and not (
            math.isfinite(self.image_guidance_scale) and self.image_guidance_scale >= 0.0
        ):
            raise ValueError(f"image_guidance_scale must be finite and >= 0, got {self.image_guidance_scale}")
        if not self.ip_adapter_weight.strip() or self.ip_adapter_weight.endswith("/"):
            raise ValueError(f"ip_adapter_weight must name a weights file, got {self.ip_adapter_weight!r}")
        if not (math.isfinite(self.image_prompt_scale) and self.image_prompt_scale >= 0.0):
            raise ValueError(f"image_prompt_scale must be finite and >= 0, got {self.image_prompt_scale}")

    def build(self, prior: Prior, prompt: PromptConfig | None = None, image: Tensor | None = None) -> VPCSM:
        """The guidance object for ``prior``. The image is read from ``image_prompt`` unless
        ``image`` ([3, H, W] in [0, 1]) is given. Raises ValueError (ImagePromptError) for an
        unusable image, or when the prior has no image-prompt path."""
        return VPCSM(self, prior, prompt or PromptConfig(), image=image)


class VPCSM(CSM):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    cfg: VPCSMConfig

    def __init__(self, cfg: VPCSMConfig, prior: Prior, prompt: PromptConfig, image: Tensor | None = None) -> None:
        super().__init__(cfg, prior, prompt)
        if cfg.ip_adapter is not None and not prior.supports_image_prompt and hasattr(prior, "load_ip_adapter"):
            folder, _, name = cfg.ip_adapter_weight.rpartition("/")
            prior.load_ip_adapter(
                cfg.ip_adapter, weight_name=name, subfolder=folder,
                image_encoder_subfolder=f"{folder}/image_encoder" if folder else "image_encoder",
            )
        if not prior.supports_image_prompt:
            raise ValueError(prior.image_prompt_help())
        if image is None:
            from dreamlab.image_prompt import load_image_prompt

            image = load_image_prompt(str(cfg.image_prompt))
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"the image prompt must be [3, H, W], got {tuple(image.shape)}")
        self.image = image.float().clamp(0.0, 1.0)
        self.image_embeds = prior.encode_image_prompt(self.image[None].to(prior.device))  # [1, E]

    def branches(self, embeds: PromptEmbeds, cams: Cameras, progress: float) -> list[CSMBranch]:
        """(y, I) +s; each unconditional text row μ·ε(u) (μ = λ for the negative prompt, 1 − λ for
        "") with the image at μ(s_I − s) and without it at −μ·s_I (module docstring)."""
        s = float(self.cfg.guidance_scale)
        s_img = s if self.cfg.image_guidance_scale is None else float(self.cfg.image_guidance_scale)
        lam = float(self.cfg.negative_mix(progress))
        cond, negative, null = super().branches(embeds, cams, progress)  # text CSM's rows
        out = [CSMBranch("cond+image", cond.embeds, s, image=True)]
        for row, mix in ((negative, lam), (null, 1.0 - lam)):
            out.append(CSMBranch(row.name + "+image", row.embeds, mix * (s_img - s), image=True))
            out.append(CSMBranch(row.name, row.embeds, -mix * s_img, image=False))
        return out

    def predict_branches(self, x_t: Tensor, t: Tensor, branches: list[CSMBranch]) -> Tensor:
        """ε-predictions [K, B, C, h, w]: one batched call, image rows with the image embedding,
        the others with zeros."""
        if not any(b.image for b in branches):
            return super().predict_branches(x_t, t, branches)
        prior = self.prior
        k, batch = len(branches), x_t.shape[0]
        image = self.image_embeds.to(prior.device)
        rows = torch.cat([
            (image if b.image else torch.zeros_like(image)).expand(batch, -1) for b in branches
        ])
        eps = prior.predict_eps_with_image(
            torch.cat([x_t] * k),
            torch.cat([t] * k),
            torch.cat([b.embeds.to(prior.device) for b in branches]),
            rows,
            scale=float(self.cfg.image_prompt_scale),
        )
        return eps.view(k, *x_t.shape)
