"""BSD — Balanced Score Distillation (PlacidDreamer; Huang et al., ACM MM 2024, arXiv 2407.13976).

BSD treats score distillation as a two-objective problem (a "classifier" direction c and a
"denoising/smoothing" direction d) and follows their min-norm convex combination, the
two-task MGDA closed form (Désidéri 2012; Sener & Koltun 2018), per sample b (vectors flattened
over C, h, w):

    t ~ U{t_min..t_max}, ONE t shared by the batch (LucidDreamer),  ε = n + offset · n₀,
        n ~ N(0, I) [B, C, h, w],  n₀ ~ N(0, I) [1, C, 1, 1] (offset noise, shared by the batch)
    x_t = α_t x + σ_t ε
    α*_b = clip( ⟨d_b − c_b, d_b⟩ / ‖d_b − c_b‖², 0, 1 )      (argmin_α ‖α c_b + (1 − α) d_b‖ on [0, 1])
    g_b  = w · (α*_b c_b + (1 − α*_b) d_b)

Standard variant (``variant="standard"``, PlacidDreamer ``train_step_BSD``, the default):

    c = 15 (ε_φ(x_t; y_view) − ε_φ(x_t; ∅)),   d = ε_φ(x_t; ∅),   w = sqrt(ᾱ_t)

Auto variant (``variant="auto"``, ``train_step_BSD_auto``, ``--auto_BSD true``):

    c = ε_φ(x_t; y_view) − ε_φ(x_t; ∅),   d = 1.25 (ε_φ(x_t; ∅) − ε),
    w = ‖ε_φ(x_t; ∅) − ε‖₂ · sqrt(1 − ᾱ_t) / 50      (‖·‖ the global norm over the whole batch)

∅ is the negative prompt (PlacidDreamer configs: "unrealistic, blurry, low quality."). The two
predictions come from one batched ``predict_eps`` call. Before encoding, the whole batch of
renders is flipped horizontally with probability 0.5 (LucidDreamer's augmentation; the gradient
flows back through the flip). g is ``nan_to_num``'d, optionally clamped, and applied through the
surrogate loss (∂loss/∂x = loss_scale · g / B).

Reference code: HansenHuang0823/PlacidDreamer ``guidance/sd_utils.py`` (``train_step_BSD``,
``train_step_BSD_auto``, ``augmentation``), ``train.py`` (``--auto_BSD``, ``--lambda_``),
``arguments/__init__.py`` and ``configs/*.yaml``; docs/guidance-spec.md §7.

Differences from the reference, by design:
* PlacidDreamer's README says the classifier : smoothing ratio is ``--lambda_`` (default 18),
  but its code ignores that argument and hard-codes 15; ``classifier_scale`` defaults to the
  code's 15.
* PlacidDreamer runs BSD on SD-2.1-base with a pre-trained DreamBooth LoRA (trained on its
  Latent-Plane multi-view images) loaded into the U-Net at scale 1.0. That is a property of the
  prior, not of the guidance: load such a fine-tuned model as the prior (``load_prior`` accepts a
  local diffusers folder). This guidance uses whatever prior it is given.
* The depth-as-latent branch (``as_latent_ratio``) and ControlNet need renderer outputs the
  guidance interface does not receive; they are not implemented.
* Timestep ``i`` is used as is; LucidDreamer's DDIM grid adds ``steps_offset`` (1 for SD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    TimestepSchedule,
    alpha_sigma,
    check_renders,
    clip_gradient,
    guidance_output,
    predict_eps_cfg,
    sample_noise,
    validate_common_fields,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Constant, Linear, Schedule
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds

BSDVariant = Literal["standard", "auto"]
BSD_VARIANTS: tuple[str, ...] = ("standard", "auto")

#: (classifier_scale, denoise_scale) of each variant in PlacidDreamer's code.
VARIANT_SCALES: dict[str, tuple[float, float]] = {"standard": (15.0, 1.0), "auto": (1.0, 1.25)}


def min_norm_coefficient(c: Tensor, d: Tensor) -> Tensor:
    """Per-sample α* [B] in [0, 1] minimising ‖α c_b + (1 − α) d_b‖₂ (two-task MGDA closed form).

    α* = clip(⟨d − c, d⟩ / ‖d − c‖², 0, 1), inner products over all but the first dimension.
    Where c_b = d_b every α gives the same point; α* is then 0 (no division by zero).
    """
    diff = (d - c).flatten(1)
    num = (diff * d.flatten(1)).sum(dim=1)
    den = diff.square().sum(dim=1)
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).clamp(0.0, 1.0)


@dataclass
class BSDConfig:
    """Balanced Score Distillation (PlacidDreamer). The loss is a mean over the B views: its
    gradient w.r.t. each view's latent is ``loss_scale · w · (α* c + (1 − α*) d) / B``.

    Defaults: PlacidDreamer ``configs/*.yaml`` and ``train.py`` (LucidDreamer base: 5000
    iterations, ``warmup_iter`` 1500, ``C_batch_size`` 4, ``lambda_guidance`` 0.1), standard
    variant. Those configs also set ``negative: "unrealistic, blurry, low quality."`` (set
    ``PromptConfig.negative_prompt``) and 4 views per step.

    Suggested for the builtin 32x32 pixel prior: ``variant="standard"`` with the defaults and
    an empty negative prompt (its vocabulary is closed). For ``variant="auto"`` the global
    norm in w grows with sqrt(B·C·h·w): the reference's /50 was set for 4 views of 4x64x64 SD
    latents, so with 4 views of 3x32x32 pixels use ``auto_weight_divisor`` ≈ 50·sqrt(12288 /
    65536) ≈ 22 to get the same step size.
    """

    variant: BSDVariant = "standard"
    """"standard" (c = 15(ε_y − ε_∅), d = ε_∅, w = sqrt(ᾱ_t); ``train_step_BSD``, default) or
    "auto" (c = ε_y − ε_∅, d = 1.25(ε_∅ − ε), w = ‖ε_∅ − ε‖ σ_t / 50; ``--auto_BSD true``)."""
    classifier_scale: float | None = None
    """Factor k_c of c = k_c (ε_y − ε_∅); None = the variant's code value (15 standard, 1 auto).
    The README's ``--lambda_ 18`` is never used by the code."""
    denoise_scale: float | None = None
    """Factor k_d of d (k_d ε_∅ standard, k_d (ε_∅ − ε) auto); None = the variant's code value
    (1 standard, 1.25 auto)."""
    auto_weight_divisor: float = 50.0
    """Auto variant only: w = ‖ε_∅ − ε‖₂ · sqrt(1 − ᾱ_t) / auto_weight_divisor (code: 50)."""
    timesteps: TimestepSchedule = field(
        default_factory=lambda: TimestepSchedule(
            t_min=Constant(0.02), t_max=Linear(0.979, 0.499, 0.0, 0.3)
        )
    )
    """Range of t. Default = LucidDreamer's ``randint(20, 500 + int(480 · warm))`` (upper end
    exclusive), warm = 1 − min(iter / 1500, 1): inclusive t ∈ {20..979} → {20..499} over the
    first 1500 of 5000 iterations (progress 0.3), exactly (``t_range [0.02, 0.5]``,
    ``max_t_range 0.98``, ``warmup_iter 1500``)."""
    per_view_timesteps: bool = False
    """False (reference): one t per step, shared by the batch; True: one t per view."""
    offset_noise: float = 0.1
    """ε = n + offset_noise · n₀ with n₀ ~ N(0, I) of shape [1, C, 1, 1] shared by the batch
    (LucidDreamer/PlacidDreamer: 0.1); 0 disables it."""
    flip_prob: float = 0.5
    """Probability of flipping the whole batch of renders horizontally before encoding
    (LucidDreamer's ``RandomHorizontalFlip(p=0.5)`` augmentation); 0 disables it."""
    view_dependent: ViewMode | None = "interpolated"
    """View words in the conditional prompt; PlacidDreamer blends front/side/back embeddings by
    azimuth ("interpolated", its default with ``perpneg: false``); None = the run's
    PromptConfig.view_dependent."""
    grad_clip: Schedule | None = None
    """Element-wise clamp of g to ±c(progress); None disables it (PlacidDreamer has none)."""
    loss_scale: float = 0.4
    """Multiplies the loss. 0.4 = ``lambda_guidance`` 0.1 × ``C_batch_size`` 4: PlacidDreamer's
    ``SpecifyGradient`` applies 0.1 · g to each view without dividing by B, dreamlab divides
    by B (docs/guidance.md), so with 4 views the per-view step is the same."""

    def scales(self) -> tuple[float, float]:
        """(classifier_scale, denoise_scale) after filling None with the variant's code value."""
        default_c, default_d = VARIANT_SCALES[self.variant]
        c = default_c if self.classifier_scale is None else self.classifier_scale
        d = default_d if self.denoise_scale is None else self.denoise_scale
        return float(c), float(d)

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if self.variant not in BSD_VARIANTS:
            raise ValueError(f"variant must be one of {BSD_VARIANTS}, got {self.variant!r}")
        for name in ("classifier_scale", "denoise_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be > 0 (or None for the variant's value), got {value}")
        if not (math.isfinite(self.auto_weight_divisor) and self.auto_weight_divisor > 0.0):
            raise ValueError(f"auto_weight_divisor must be > 0, got {self.auto_weight_divisor}")
        if not (math.isfinite(self.offset_noise) and self.offset_noise >= 0.0):
            raise ValueError(f"offset_noise must be >= 0, got {self.offset_noise}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
        validate_common_fields(self)

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> BSD:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return BSD(self, prior, prompt or PromptConfig())


@dataclass
class BSDAux:
    """Detached intermediates of one BSD call (tests and diagnostics)."""

    flipped: bool  # whether the batch was flipped horizontally before encoding
    noise: Tensor  # [B, C, h, w] ε (offset noise included)
    classifier: Tensor  # [B, C, h, w] c
    denoise: Tensor  # [B, C, h, w] d
    alpha_star: Tensor  # [B] min-norm coefficient α* in [0, 1]
    weights: Tensor  # [B] w
    grad: Tensor  # [B, C, h, w] g after nan_to_num and clipping (in the flipped frame if flipped)


class BSD(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    cfg: BSDConfig

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """BSD loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)
        k_c, k_d = cfg.scales()

        # 1. Flip augmentation (one coin for the batch, drawn only when flip_prob > 0), then
        #    encode into the space the prior denoises (differentiable, through the flip).
        image = rgb.permute(0, 3, 1, 2)
        flipped = False
        if cfg.flip_prob > 0.0:
            flipped = bool(torch.rand((), generator=generator).item() < cfg.flip_prob)
        if flipped:
            image = image.flip(-1)
        latents = prior.encode_images(image)  # [B, C, h, w] fp32

        # 2. Sample t (one per step unless per_view_timesteps), then n, then n₀ (offset > 0).
        n_t = batch if cfg.per_view_timesteps else 1
        t = cfg.timesteps(progress, n_t, prior.num_train_timesteps, generator).expand(batch).contiguous()
        t = t.to(prior.device)
        noise = sample_noise(tuple(latents.shape), generator, latents.device)
        if cfg.offset_noise > 0.0:
            offset = sample_noise((1, latents.shape[1], 1, 1), generator, latents.device)
            noise = noise + cfg.offset_noise * offset

        # 3. Per-view text embeddings: cond = prompt with view words, uncond = negative prompt.
        cond, uncond = self.prompt.embeds_for_cameras(embeds, cams, self.view_mode)

        # 4. Noise the latents and predict ε_y, ε_∅ (one batched U-Net call, no gradient).
        alphas_cumprod = prior.alphas_cumprod
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        with torch.no_grad():
            x_t = alpha * latents.detach() + sigma * noise
            _, eps_cond, eps_uncond = predict_eps_cfg(prior, x_t, t, cond, uncond, 1.0)

            # 5. The two directions and the weight of the chosen variant.
            classifier = k_c * (eps_cond - eps_uncond)
            if cfg.variant == "standard":
                denoise = k_d * eps_uncond
                w = alpha.view(-1)  # sqrt(ᾱ_t)
            else:
                denoise = k_d * (eps_uncond - noise)
                w = (eps_uncond - noise).norm() * sigma.view(-1) / cfg.auto_weight_divisor

            # 6. Per-sample min-norm point of the segment [d, c]; g = w (α* c + (1 − α*) d).
            alpha_star = min_norm_coefficient(classifier, denoise)
            a = alpha_star.view(-1, 1, 1, 1)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (a * classifier + (1.0 - a) * denoise))
            grad = clip_gradient(grad, cfg.grad_clip, progress)

        # 7. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        return guidance_output(
            latents, grad, batch, t, cfg.loss_scale,
            aux=BSDAux(
                flipped=flipped,
                noise=noise,
                classifier=classifier,
                denoise=denoise,
                alpha_star=alpha_star,
                weights=w,
                grad=grad,
            ),
        )
