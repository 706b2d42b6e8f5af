"""TSM — Trajectory Score Matching (Dreamer XL; Miao et al., 2024, arXiv 2405.11252).

TSM is ISM (``ism.py``) with a second path on the same DDIM-inversion trajectory. Up to x_s
everything is ISM's: one t per step, s = max(t − Δt(p), 0), offset noise, the multi-step
inversion with the empty prompt, the random horizontal flip. Then, from the same x_s:

    ε_s = ε_φ(x_s; ∅_inv, s)
    path A:  x_t = α_t x̂_0(x_s) + σ_t ε_s                      (DDIM inversion step s -> t)
    path B:  μ = round(s + (t − s) sqrt(1 − γ²)),  x_μ = α_μ x̂_0(x_s) + σ_μ ε_s,
             ε_μ = ε_φ(x_μ; ∅_inv, μ)
    ε̂_t = ε_φ(x_t; ∅, t) + s_cfg (ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))   (convention A)
    g = w(t) (ε̂_t − ε_μ),   w(t) = σ_t / α_t

γ = 1 gives μ = s, i.e. ISM (bit-identical here); γ = 0 gives μ = t, a CSD-like target ε_∅(x_t).
∂loss/∂x_0 = loss_scale · g / B through the surrogate loss.

**Pixel-wise gradient clipping.** When ``rgb`` requires grad, a backward hook is registered on
it that rescales each pixel's RGB gradient vector so its largest channel magnitude is at most
``clip_value``, keeping its direction: ∂L/∂rgb ← ∂L/∂rgb · min_c min(1, c_v / |∂L/∂rgb_c|). The
hook sees the *total* gradient reaching the render, i.e. this guidance plus every other loss
term the trainer adds on the same render (Dreamer XL clips guidance + TV together).

Reference code: xingy038/Dreamer-XL ``guidance/sd_utils.py`` (``train_step``), ``train.py``
(``_hook`` on ``images``, ~lines 345–370), ``arguments/__init__.py`` (``gamma`` 0.3,
``clip_value`` 0.05); see docs/guidance-spec.md §5.2.

Deliberate differences from that code:

* Dreamer XL computes ε_φ(x_s; ∅_inv, s) twice (once per path) and also runs the discarded
  step μ -> t; dreamlab calls the U-Net once for ε_s and skips the μ -> t step (same values).
  The U-Net calls are: the inversion steps, ε_s, ε_μ (skipped when μ = s), the CFG call.
* Dreamer XL moves x_s towards μ with a stride of ``xs_delta_t``, which lands on μ only when
  δ_S ≥ μ − s (always true for its defaults); dreamlab always lands on μ (the paper's rule).
* μ is rounded with Python's round() in float64 (Dreamer XL: torch.round in float32); they
  can differ only on exact .5 ties.
* Not ported: the depth-gradient clip (``clip_depth_value``; depth-as-latent is not ported in
  ISM either), SDXL's pooled embeddings and time ids (the prior interface handles conditioning).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dreamlab.guidance.ism import ISM, EpsFn, ISMAux, ISMConfig, ddim_move
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds


def trajectory_midpoint(s: int, t: int, gamma: float) -> int:
    """μ = round(s + (t − s) sqrt(1 − γ²)), in [s, t] for γ in [0, 1] (Dreamer XL)."""
    return int(round(s + (t - s) * math.sqrt(1.0 - gamma * gamma)))


def pixelwise_clip(grad: Tensor, clip_value: float, dim: int = -1) -> Tensor:
    """Dreamer XL's pixel-wise clip of an image gradient: every pixel's channel vector (along
    ``dim``) is scaled by min_c min(1, clip_value / |grad_c|), so its largest channel magnitude is
    at most ``clip_value`` and its direction is kept. Pixels with a zero gradient are unchanged."""
    scale = (clip_value / grad.abs()).clamp(max=1.0)
    return grad * scale.amin(dim=dim, keepdim=True)


@dataclass
class TSMConfig(ISMConfig):
    """Trajectory Score Matching (Dreamer XL): ISM's settings (same defaults; Dreamer XL's
    configs use ``warmup_iter`` 750 of 2500 iterations, the same 30% of the run as
    LucidDreamer's 1500 of 5000) plus γ and the pixel-wise gradient clip on the render.
    Gradient w.r.t. each view's latent: ``loss_scale · (σ_t/α_t)(ε̂_cfg(x_t) − ε_∅(x_μ, μ)) / B``.

    Builtin prior (32 x 32 pixel space): guidance_scale 7.5 (the default) and the other
    defaults; not yet measured on it. ``clip_value`` acts on the gradient of the rendered image,
    whose size per pixel depends on the render resolution and ``loss_scale``; 0.05 is Dreamer
    XL's value for 1024 px renders and SDXL, unmeasured at the builtin preset's 64 px.
    """

    gamma: float = 0.3
    """γ: μ = s + (t − s)·sqrt(1 − γ²) (Dreamer XL ``gamma`` 0.3, μ ≈ s + 0.954(t − s)); 1 = ISM,
    0 = target ε_∅(x_t)."""
    clip_value: float | None = 0.05
    """Pixel-wise clip of the gradient reaching the rendered image: each pixel's largest channel
    magnitude ≤ clip_value, direction kept (Dreamer XL ``clip_value`` 0.05); None disables it."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        super().validate()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        clip = self.clip_value
        if clip is not None and not (math.isfinite(clip) and clip > 0.0):
            raise ValueError(f"clip_value must be > 0 (or None to disable it), got {clip}")

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> TSM:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return TSM(self, prior, prompt or PromptConfig())


@dataclass
class TSMAux(ISMAux):
    """Detached intermediates of one TSM call: ISM's (``target`` is ε_μ) plus path B."""

    mu: int  # μ, the point of path B whose ε is the target
    x_mu: Tensor  # [B, C, h, w] x_μ = DDIM step of x_s from s to μ with ε_s
    eps_mu: Tensor  # [B, C, h, w] ε_φ(x_μ; ∅_inv, μ)


class TSM(ISM):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    aux_type: type = TSMAux
    cfg: TSMConfig

    def _target(
        self, x_s: Tensor, eps_s: Tensor, s: int, t: int, eps_fn: EpsFn
    ) -> tuple[Tensor, dict]:
        """Path B: x_s -> x_μ with ε_s, target ε_φ(x_μ; ∅_inv, μ) (ε_s itself when μ = s)."""
        mu = trajectory_midpoint(s, t, self.cfg.gamma)
        if mu == s:
            x_mu, eps_mu = x_s, eps_s
        else:
            x_mu = ddim_move(x_s, eps_s, self.prior.alphas_cumprod, s, mu)
            eps_mu = eps_fn(x_mu, mu)
        return eps_mu, {"mu": mu, "x_mu": x_mu, "eps_mu": eps_mu}

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """TSM loss for renders ``rgb`` [B, H, W, 3]; registers the pixel-wise clip on ``rgb``."""
        out = super().__call__(rgb, cams, embeds, progress, generator)
        if self.cfg.clip_value is not None and rgb.requires_grad:
            clip = float(self.cfg.clip_value)
            rgb.register_hook(functools.partial(pixelwise_clip, clip_value=clip, dim=-1))
        return out
