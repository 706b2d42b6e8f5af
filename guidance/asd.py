"""ASD — Asynchronous Score Distillation (ScaleDreamer; Ma et al., ECCV 2024, arXiv 2407.02040).

Update rule (descent gradient on the model-space image x, e.g. the SD latent):

    t ~ U{t_min..t_max} per view,  ε ~ N(0, I)
    Δ  = floor( u · clamp(plus_ratio · (t − t_min), 0, T − 1 − t) ),  u ~ U(0, 1)
         (plus_random = False: no u factor)
    t⁺ = clamp(t + Δ, 1, T − 1)
    x_t = α_t x + σ_t ε,   x_{t⁺} = α_{t⁺} x + σ_{t⁺} ε                    (the SAME ε)
    ε̂  = ε_φ(x_t; ∅, t) + s (ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))        (CFG convention A, s = 7.5)
    g  = w(t) (ε̂ − ε_φ(x_{t⁺}; y_view, t⁺)),   w(t) = 1 − ᾱ_t  ("sds")

t_min above is the schedule's current lower end (threestudio's ``min_step``). The SDS target ε
is replaced by the frozen prior's own *conditional, no-CFG* prediction at the slightly noisier
timestep t⁺ with the same noise: a LoRA-free stand-in for VSD's score of the renders. The
prior's weights are untouched. All three predictions come from one batched ``predict_eps``
call ``[x_t; x_t; x_{t⁺}]`` with embeddings ``[y_view; ∅; y_view]``. g is ``nan_to_num``'d,
optionally clamped, and applied through the surrogate loss (∂loss/∂x = loss_scale · g / B).

Reference code: theEricMa/ScaleDreamer ``threestudio/models/guidance/
stable_diffusion_asd_guidance.py`` (the second, effective ``get_t_plus``; ``__call__``;
``get_eps``) and ``configs/single-prompt_benchmark/asd_sd_nerf.yaml``; docs/guidance-spec.md §6.

Perp-Neg (Armandpour et al. 2023, arXiv 2304.04968; threestudio's version, spec §1.2) is an
option, ``perp_neg=True``: y_view becomes threestudio's azimuth-interpolated positive
embedding y_pos in BOTH predictions (ScaleDreamer feeds the Perp-Neg positive to the t⁺
prediction too), and the first prediction becomes

    ε̂ = ε_∅ + s (e_pos + Σ_i λ w_i perp(e_i, e_pos)),
    e_pos = ε_φ(x_t; y_pos, t) − ε_∅,   e_i = ε_φ(x_t; neg_i, t) − ε_∅

with threestudio's weights w_i ≤ 0 and λ = ``perp_neg_scale`` = −``guidance_perp_neg``
(ScaleDreamer multiplies the weights by ``-1 * guidance_perp_neg``). One batched call over
``[y_pos; ∅; neg_1; neg_2; y_pos]`` at ``[t; t; t; t; t⁺]``, each view's negatives at its own
x_t (ScaleDreamer, like threestudio issue #456, mixes the views' x_t when B > 1). The official
``asd_sd_nerf.yaml`` turns it on (``use_perp_neg: true``, ``guidance_perp_neg: -0.5``, i.e.
``perp_neg=True, perp_neg_scale=0.5``); dreamlab keeps it off by default (the class default
``guidance_perp_neg: 0``), so ``perp_neg=True`` alone reproduces the official config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    PerpNegWeights,
    TimestepSchedule,
    Weighting,
    alpha_sigma,
    check_renders,
    clip_gradient,
    combine_guided_eps,
    guided_eps_batch,
    guidance_output,
    sample_noise,
    validate_common_fields,
    weighting,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Linear, Schedule
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds


def asynchronous_timesteps(
    t: Tensor, min_step: int, plus_ratio: float, u: Tensor | None, num_train_timesteps: int
) -> Tensor:
    """ScaleDreamer's shifted timesteps t⁺ [B] (long, on ``t``'s device).

    Δ = floor(u · clamp(plus_ratio · (t − min_step), 0, T − 1 − t)) (no ``u`` factor when
    ``u`` is None), t⁺ = clamp(t + Δ, 1, T − 1). Computed in float64 with a 1e-6 guard before
    the floor (as ``percent_to_step``), so 0.1 · 50 gives 5, not 4.

    Args:
        t: [B] integer timesteps of the main prediction.
        min_step: the current lower end of the timestep range (threestudio ``min_step``).
        plus_ratio: Δ is at most this fraction of t − min_step.
        u: [B] uniform draws in [0, 1) on ``t``'s device (``plus_random``), or None.
    """
    top = num_train_timesteps - 1
    t64 = t.to(torch.float64)
    delta = (plus_ratio * (t64 - min_step)).clamp(min=0.0)
    delta = torch.minimum(delta, top - t64)
    if u is not None:
        delta = delta * u.to(torch.float64)
    delta = torch.floor(delta + 1e-6).to(torch.long)
    return (t + delta).clamp(1, top)


@dataclass
class ASDConfig:
    """Asynchronous Score Distillation (ScaleDreamer). The loss is a mean over the B views: its
    gradient w.r.t. each view's latent is ``loss_scale · w(t)(ε̂_cfg(x_t) − ε_y(x_{t⁺}, t⁺)) / B``.

    Defaults: ScaleDreamer ``asd_sd_nerf.yaml`` (SD-2.1-base, 25k steps). That config also sets
    ``prompt_processor.front_threshold/back_threshold: 30`` (PromptConfig's thresholds) and
    Perp-Neg with ``guidance_perp_neg: -0.5``, which is off here unless ``perp_neg=True``
    (``perp_neg_scale`` already defaults to the official 0.5; see the module docstring).

    Suggested for the builtin 32x32 pixel prior: ``guidance_scale=7.5`` (as SDS there) and the
    other defaults unchanged; ASD's default s already is 7.5 (ScaleDreamer is convention A).
    """

    guidance_scale: float = 7.5
    """CFG scale of the first prediction, convention A (ε_∅ + s(ε_y − ε_∅)). 7.5 =
    ScaleDreamer ``guidance_scale: 7.5`` (its code is convention A, unchanged here)."""
    timesteps: TimestepSchedule = field(
        default_factory=lambda: TimestepSchedule(t_min=Linear(0.5, 0.02), t_max=Linear(0.98, 0.5))
    )
    """Range of t; default t_min 0.5 → 0.02 and t_max 0.98 → 0.5 linearly over the run
    (``min_step_percent: [0, 0.5, 0.02, 25000]``, ``max_step_percent: [0, 0.98, 0.5, 25000]``
    with ``max_steps: 25000``)."""
    plus_ratio: float = 0.1
    """t⁺ − t is at most plus_ratio · (t − t_min) (ScaleDreamer ``plus_ratio: 0.1``)."""
    plus_random: bool = True
    """Multiply the shift by u ~ U(0, 1) per view (``asd_sd_nerf.yaml`` ``plus_random: true``;
    the class default is false)."""
    weighting: Weighting = "sds"
    """w(t): "sds" (1 − ᾱ_t, ScaleDreamer default), "uniform" (1), "fantasia3d"."""
    view_dependent: ViewMode | None = None
    """View words in the conditional prompt (both the CFG and the t⁺ prediction); None = the
    run's PromptConfig.view_dependent (ScaleDreamer: threestudio's discrete views)."""
    grad_clip: Schedule | None = None
    """Element-wise clamp of g to ±c(progress); None disables it (ScaleDreamer ``grad_clip: None``)."""
    loss_scale: float = 1.0
    """Multiplies the loss (ScaleDreamer ``lambda_asd: 1``)."""
    perp_neg: bool = False
    """Perp-Neg (threestudio ``use_perp_neg``): the interpolated front/side/back positive
    embedding in both predictions, and the other views' prompts subtracted perpendicularly in
    the CFG one. Off by default (ScaleDreamer's class default ``guidance_perp_neg: 0``);
    ``asd_sd_nerf.yaml`` turns it on. Needs view_dependent != "none"."""
    perp_neg_scale: float = 0.5
    """Multiplies threestudio's (negative) Perp-Neg weights: −guidance_perp_neg, 0.5 =
    ``asd_sd_nerf.yaml`` ``guidance_perp_neg: -0.5``. Used only with perp_neg."""
    perp_neg_weights: PerpNegWeights = field(default_factory=PerpNegWeights)
    """Perp-Neg's decay functions f(r) = a·exp(−b·r) + c (threestudio ``perp_neg_f_*`` defaults,
    unchanged in ScaleDreamer)."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not (math.isfinite(self.plus_ratio) and self.plus_ratio >= 0.0):
            raise ValueError(f"plus_ratio must be finite and >= 0, got {self.plus_ratio}")
        validate_common_fields(self)

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> ASD:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return ASD(self, prior, prompt or PromptConfig())


@dataclass
class ASDAux:
    """Detached intermediates of one ASD call (tests and diagnostics)."""

    noise: Tensor  # [B, C, h, w] ε, shared by x_t and x_{t⁺}
    t_plus: Tensor  # [B] the shifted timesteps t⁺ (long, prior's device)
    eps_pred: Tensor  # [B, C, h, w] ε̂ after CFG at (x_t, t)
    eps_plus: Tensor  # [B, C, h, w] ε_φ(x_{t⁺}; y_view, t⁺), the target
    weights: Tensor  # [B] w(t)
    grad: Tensor  # [B, C, h, w] g after nan_to_num and clipping
    neg_weights: Tensor | None = None  # [B, 2] Perp-Neg weights λ·w_i applied (None without Perp-Neg)


class ASD(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """ASD loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)
        num_t = prior.num_train_timesteps

        # 1. Encode the renders into the space the prior denoises (differentiable).
        latents = prior.encode_images(rgb.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 2. Sample t, then ε, then (plus_random) u from the caller's CPU generator; t⁺ from t.
        t = cfg.timesteps(progress, batch, num_t, generator).to(prior.device)
        noise = sample_noise(tuple(latents.shape), generator, latents.device)
        u = None
        if cfg.plus_random:
            u = torch.rand(batch, generator=generator, dtype=torch.float32).to(prior.device)
        min_step, _ = cfg.timesteps.bounds(progress, num_t)
        t_plus = asynchronous_timesteps(t, min_step, cfg.plus_ratio, u, num_t)

        # 3. Per-view text embeddings: cond = prompt with view words, uncond = negative prompt;
        #    with Perp-Neg: cond = interpolated positive, plus 2 weighted negatives per view.
        text = self.text_conditioning(embeds, cams)

        # 4. Noise the latents at t and t⁺ with the same ε; one batched U-Net call, no gradient.
        alphas_cumprod = prior.alphas_cumprod
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        alpha_plus, sigma_plus = alpha_sigma(alphas_cumprod, t_plus)
        with torch.no_grad():
            x = latents.detach()
            x_t = alpha * x + sigma * noise
            x_plus = alpha_plus * x + sigma_plus * noise
            # Blocks of B: [y; ∅; (Perp-Neg: 1st negatives; 2nd negatives;) y at t⁺].
            x_in, t_in, emb = guided_eps_batch(x_t, t, text)
            eps = prior.predict_eps(
                torch.cat([x_in, x_plus]), torch.cat([t_in, t_plus]), torch.cat([emb, text.cond])
            )
            eps_pred = combine_guided_eps(eps[:-batch], text, cfg.guidance_scale)[0]
            eps_plus = eps[-batch:]

            # 5. g = w(t)(ε̂ − ε_y(x_{t⁺}, t⁺)), made finite, optionally clamped.
            w = weighting(cfg.weighting, alphas_cumprod, t)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (eps_pred - eps_plus))
            grad = clip_gradient(grad, cfg.grad_clip, progress)

        # 6. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        return guidance_output(
            latents, grad, batch, t, cfg.loss_scale,
            aux=ASDAux(
                noise=noise,
                t_plus=t_plus,
                eps_pred=eps_pred,
                eps_plus=eps_plus,
                weights=w,
                grad=grad,
                neg_weights=text.neg_weights,
            ),
        )
