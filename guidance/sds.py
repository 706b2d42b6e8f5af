"""SDS — Score Distillation Sampling (DreamFusion; Poole et al., 2022, arXiv 2209.14988).

Update rule (descent gradient on the model-space image x, e.g. the SD latent):

    t ~ U{t_min..t_max},  ε ~ N(0, I),  x_t = α_t x + σ_t ε
    ε̂_cfg = ε_φ(x_t; ∅, t) + s (ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))      (CFG convention A)
    g = w(t) (ε̂_cfg − ε),   w(t) = 1 − ᾱ_t  ("sds")

No gradient flows through the U-Net. g is ``nan_to_num``'d and optionally clamped element-wise
(Debiased SDS score clipping, Hong et al. 2023, arXiv 2303.15413), then applied through the
surrogate loss 0.5 Σ (x − sg(x − g))² / B, so ∂loss/∂x = loss_scale · g / B. Reference code:
threestudio ``models/guidance/stable_diffusion_guidance.py`` (``compute_grad_sds``); see
docs/guidance-spec.md §1.

Optional Perp-Neg (Armandpour, Sadeghian, Zheng, Sadeghian, Zhou, 2023, arXiv 2304.04968;
``perp_neg=True``, threestudio ``prompt_processor.use_perp_neg``, spec §1.2). The conditional
prompt becomes threestudio's azimuth-interpolated positive embedding y_pos (E(overhead) above
the overhead threshold), and the two pure view prompts it blends between ([front, side] on the
front half, [side, front] on the back half) are negatives with weights w_i ≤ 0 that decay with
the distance of the camera from that view (``dreamlab.prompts.perp_neg_embeds_for_cameras``):

    e_pos = ε_φ(x_t; y_pos, t) − ε_φ(x_t; ∅, t),   e_i = ε_φ(x_t; neg_i, t) − ε_φ(x_t; ∅, t)
    ε̂ = ε_φ(x_t; ∅, t) + s (e_pos + Σ_i λ w_i perp(e_i, e_pos))
    perp(a, b) = a − ⟨a,b⟩/max(‖b‖², 1e−6) b          (per view, over all pixels and channels)
    g = w(t) (ε̂ − ε)

(convention A, λ = ``perp_neg_scale``), from one batched ``predict_eps`` call over
``[y_pos; ∅; neg_1; neg_2]`` (blocks of B). Each view's negatives are evaluated at its own
x_t and t; threestudio interleaves the negative embeddings per view but repeats x_t and t in
blocks, so for B > 1 it evaluates negatives at another view's x_t (its open issue #456); dreamlab
does not reproduce that. Reference: threestudio ``compute_grad_sds`` (Perp-Neg branch),
``prompt_processors/base.py`` (``get_text_embeddings_perp_neg``), ``utils/ops.py``
(``perpendicular_component``, ``shifted_expotional_decay``).

Optional view guidance (``view_guidance_scale`` w > 0; dreamlab's own option, not from a 3D
paper: composable classifier-free guidance, Liu, Li, Du, Torralba, Tenenbaum 2022, arXiv
2206.01714, applied to the view phrase). A second, unbatched ``predict_eps`` call with the
prompt as typed (no view words, y_plain) adds a term for what the view phrase alone says:

    ε̂ ← ε̂ + w (ε_φ(x_t; y_view, t) − ε_φ(x_t; y_plain, t))

(y_view is the Perp-Neg positive when Perp-Neg is on). It strengthens the view words without
raising the scale s of the whole prompt.
"""

from __future__ import annotations

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
    guidance_output,
    predict_eps_guided,
    sample_noise,
    validate_common_fields,
    weighting,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Schedule
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds


@dataclass
class SDSConfig:
    """Score Distillation Sampling (DreamFusion). The loss is a mean over the B views: its
    gradient w.r.t. each view's latent is ``loss_scale · w(t)(ε̂ − ε) / B`` (threestudio)."""

    guidance_scale: float = 101.0
    """CFG scale, convention A (ε_∅ + s(ε_y − ε_∅)). 101 = threestudio's SDS default 100, which
    uses convention B (ε_y + s(ε_y − ε_∅)); DreamGaussian uses 100 in convention A. Small or
    weak priors (tiny test models, the builtin prior) usually want far less, e.g. 7.5–20."""
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    """Timestep sampling; default t ~ U{20..980} of 1000 for the whole run (threestudio)."""
    weighting: Weighting = "sds"
    """w(t): "sds" (1 − ᾱ_t, DreamFusion), "uniform" (1), "fantasia3d" (sqrt(ᾱ_t)(1 − ᾱ_t))."""
    view_dependent: ViewMode | None = None
    """View words in the conditional prompt; None = the run's PromptConfig.view_dependent."""
    grad_clip: Schedule | None = None
    """Element-wise clamp of g to ±c(progress) (D-SDS score debiasing, e.g. Linear(0.5, 2.0));
    None disables it (threestudio default)."""
    loss_scale: float = 1.0
    """Multiplies the loss (threestudio's lambda_sds)."""
    perp_neg: bool = False
    """Perp-Neg (threestudio ``use_perp_neg``, default off): the conditional prompt becomes the
    azimuth-interpolated front/side/back embedding, and the other views' prompts are subtracted
    perpendicularly to it with decaying weights. Replaces the view-dependent prompt (needs
    view_dependent != "none"). Note that threestudio's Perp-Neg branch is CFG convention A, so
    its guidance_scale 100 is 100 here (not 101)."""
    perp_neg_scale: float = 1.0
    """Multiplies Perp-Neg's negative weights (1 = threestudio; ScaleDreamer's
    ``guidance_perp_neg: g`` is perp_neg_scale = −g)."""
    perp_neg_weights: PerpNegWeights = field(default_factory=PerpNegWeights)
    """Perp-Neg's decay functions f(r) = a·exp(−b·r) + c (threestudio ``perp_neg_f_*`` defaults)."""
    view_guidance_scale: float = 0.0
    """w of a separate guidance term for the view phrase, ε̂ += w(ε_view − ε_plain) (composable
    CFG; dreamlab's own option, 0 = off). Costs one more U-Net pass per step."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not (0.0 <= self.view_guidance_scale < float("inf")):
            raise ValueError(f"view_guidance_scale must be a finite number >= 0, got {self.view_guidance_scale}")
        validate_common_fields(self)

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> SDS:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return SDS(self, prior, prompt or PromptConfig())


@dataclass
class SDSAux:
    """Detached intermediates of one SDS call (tests and diagnostics)."""

    noise: Tensor  # [B, C, h, w] ε added to the latents
    eps_pred: Tensor  # [B, C, h, w] ε̂ after CFG
    weights: Tensor  # [B] w(t)
    grad: Tensor  # [B, C, h, w] g = w(t)(ε̂ − ε) after nan_to_num and clipping
    neg_weights: Tensor | None = None  # [B, 2] Perp-Neg weights λ·w_i applied (None without Perp-Neg)
    eps_plain: Tensor | None = None  # [B, C, h, w] ε with the prompt as typed (view guidance only)


class SDS(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """SDS loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)

        # 1. Encode the renders into the space the prior denoises (differentiable).
        latents = prior.encode_images(rgb.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 2. Sample t and ε from the caller's CPU generator.
        t = cfg.timesteps(progress, batch, prior.num_train_timesteps, generator).to(prior.device)
        noise = sample_noise(tuple(latents.shape), generator, latents.device)

        # 3. Per-view text embeddings: cond = prompt with view words, uncond = negative prompt;
        #    with Perp-Neg: cond = interpolated positive, plus 2 weighted negatives per view.
        text = self.text_conditioning(embeds, cams)

        # 4. Noise the latents and predict ε̂ with CFG or Perp-Neg: one batched U-Net call
        #    [cond; ∅ (; 1st negatives; 2nd negatives)] on each view's own x_t, no gradient.
        alphas_cumprod = prior.alphas_cumprod
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        with torch.no_grad():
            x_t = alpha * latents.detach() + sigma * noise
            eps_pred, eps_cond, _ = predict_eps_guided(prior, x_t, t, text, cfg.guidance_scale)
            eps_plain = None
            if cfg.view_guidance_scale > 0:
                plain = embeds.plain.to(device=prior.device).expand(batch, -1, -1)
                eps_plain = prior.predict_eps(x_t, t, plain).float()
                eps_pred = eps_pred + cfg.view_guidance_scale * (eps_cond - eps_plain)

            # 5. g = w(t)(ε̂ − ε), made finite, optionally clamped (D-SDS).
            w = weighting(cfg.weighting, alphas_cumprod, t)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (eps_pred - noise))
            grad = clip_gradient(grad, cfg.grad_clip, progress)

        # 6. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        return guidance_output(
            latents, grad, batch, t, cfg.loss_scale,
            aux=SDSAux(
                noise=noise, eps_pred=eps_pred, weights=w, grad=grad, neg_weights=text.neg_weights, eps_plain=eps_plain
            ),
        )
