"""CSM — Classifier Score Matching (TV-3DG; Yang et al., 2024, arXiv 2410.21299), text-only,
built on CSD — Classifier Score Distillation (Yu et al., 2023, arXiv 2310.19415).

Update rule (descent gradient on the model-space image x, e.g. the SD latent):

    t ~ U{t_min..t_max} per view
    x_t = DDIMInvert(x → t; ε_φ(·; "", ·), η = 0)      noising="ddim_inversion" (TV-3DG, default)
        = α_t x + σ_t ε,  ε ~ N(0, I)                    noising="random"         (CSD)
    g   = w(t) · s · [ ε_φ(x_t; y_view, t) − λ(p) ε_φ(x_t; neg, t) − (1 − λ(p)) ε_φ(x_t; "", t) ]
    g  ← g / (‖g‖₂ + 1e−8)   (global norm over the whole batch; grad_normalize, CSD default)

i.e. only the classifier (CFG-direction) term of SDS, ε̂ − ε = [ε_∅ − ε] + s[ε_y − ε_∅], is kept:
no random-noise target. The unconditional branch is a mix of the negative prompt ("neg",
``embeds.negative``) and the true null text ("", ``embeds.null``), λ annealed 0 → 1 over the
first half of the run (CSD ``uncond_scale: [0, -0.0, -1, 5000]``, ``null_scale: [0, -1, 0.0,
5000]`` of 10k steps): it starts as pure CSD ε_y − ε_"" and ends as ε_y − ε_neg. The CSD paper's
negative-prompt form w[ω1(ε_y − ε_∅) − ω2(ε_neg − ε_∅)] is the same with s = ω1, λ = ω2/ω1.
g is ``nan_to_num``'d, optionally clamped (before normalisation, as CSD), and applied through
the surrogate loss 0.5 Σ (x − sg(x − g))² / B, so ∂loss/∂x = loss_scale · g / B.

DDIM inversion (deterministic; TV-3DG "removes the difference term and uses deterministic noise
addition"): per view, the grid τ_k = ⌊k·t / N⌋, k = 0..N (N = ``inversion_steps``), starts
from the clean x at τ_0 (α = 1, σ = 0) and takes N η = 0 steps
x_{τ_{k+1}} = α_{τ_{k+1}} (x_{τ_k} − σ_{τ_k} e_k)/α_{τ_k} + σ_{τ_{k+1}} e_k with
e_k = ε_φ(x_{τ_k}; "", τ_k) (one batched call per step, no CFG, as ISM's inversion).

Reference code: CVMI-Lab/Classifier-Score-Distillation
``threestudio/models/guidance/deep_floyd_simple_guidance.py`` (``__call__``, ``update_step``) and
``configs/csd-if.yaml``; ``stable_diffusion_triple_guidance.py`` / ``csd-sd-refine.yaml`` for
the SD refine stage. TV-3DG (``yjhboy/TV-3DG``) released no code: its CSM form (classifier term
at a DDIM-inverted x_t), the inversion grid and step count, w(t) and the scales are
**UNVERIFIED** reconstructions (docs/guidance-spec.md §4.2) and are all config fields here.

Optional Perp-Neg term (``perp_neg=True``; CSD's ``a_p·PerpNeg``, spec §4.1: ``use_perp_neg``
with ``perpneg_scale: 3`` in ``csd-if.yaml``, off in ``csd-if-object.yaml``). The conditional
branch takes threestudio's Perp-Neg positive y_pos (azimuth-interpolated, E(overhead) above the
overhead threshold) instead of y_view, and a perpendicular negative term is added:

    g = w(t) · ( s [ ε_φ(x_t; y_pos) − λ(p) ε_φ(x_t; neg) − (1 − λ(p)) ε_φ(x_t; "") ]
                 + s κ Σ_i w_i perp(e_i, e_pos) )
    e_pos = ε_φ(x_t; y_pos) − ε_φ(x_t; neg),   e_i = ε_φ(x_t; neg_i) − ε_φ(x_t; neg)
    perp(a, b) = a − ⟨a,b⟩/max(‖b‖², 1e−6) b          (per view, over all pixels and channels)

with threestudio's weights w_i ≤ 0 (``PerpNegWeights``; negatives [front, side] on the front
half, [side, front] on the back half, 0 for overhead views) and κ = ``perp_neg_scale``. CSD's
coefficients are independent numbers (cond 1, uncond, null, perpneg 3); dreamlab writes them as
s·(1, −λ, −(1 − λ), κ), so with CSD's s = 1, κ = 3 is ``csd-if.yaml`` exactly. e_pos and e_i use
the negative prompt (CSD's ``uncond``) whatever λ is. The extra rows (y_pos unless already
evaluated, neg, neg_1, neg_2) join the same batched call; each view's negatives are evaluated at
its own x_t (CSD, like threestudio issue #456, mixes the views' x_t when B > 1).

Not implemented: CSD's ``noise_scale`` term (0 in every shipped config; it re-adds the
difference term CSM removes).

Extension point for VPCSM (visual-prompt CSM, TV-3DG): :meth:`CSM.branches` decides which
ε-predictions enter g and with which weights; :meth:`CSM.predict_branches` evaluates them in
one batched call; :meth:`CSM.noisy_latents` builds x_t. A subclass overrides these (e.g. adds an
image-conditioned branch and passes image features to the prior) and reuses the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    PerpNegWeights,
    TimestepSchedule,
    WEIGHTINGS,
    alpha_sigma,
    check_renders,
    clip_gradient,
    ddim_step,
    guidance_output,
    perp_neg_residual,
    sample_noise,
    weighting,
    validate_common_fields,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Linear, Schedule
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds

CSMWeighting = Literal["sds", "uniform", "fantasia3d", "ism"]
CSM_WEIGHTINGS: tuple[str, ...] = (*WEIGHTINGS, "ism")
Noising = Literal["ddim_inversion", "random"]
NOISINGS: tuple[str, ...] = ("ddim_inversion", "random")


def csm_weighting(name: str, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """w(t) [B]: the shared weightings of ``common.weighting`` plus "ism" = σ_t/α_t =
    sqrt((1 − ᾱ_t)/ᾱ_t) (LucidDreamer's weight; TV-3DG's code base descends from it)."""
    if name == "ism":
        abar = alphas_cumprod[t.to(alphas_cumprod.device)].float()
        return ((1.0 - abar) / abar).sqrt()
    return weighting(name, alphas_cumprod, t)  # type: ignore[arg-type]


def inversion_grid(t: Tensor, steps: int) -> Tensor:
    """DDIM-inversion timesteps [steps + 1, B] (long): τ_k = ⌊k·t / steps⌋, so τ_0 = 0, τ_N = t."""
    k = torch.arange(steps + 1, device=t.device, dtype=torch.long).view(-1, 1)
    return torch.div(k * t.view(1, -1), steps, rounding_mode="floor")


@dataclass
class CSMConfig:
    """Classifier Score Matching (TV-3DG CSM, text-only) / Classifier Score Distillation (CSD).

    Defaults: CSD's verified NeRF-stage code (``csd-if.yaml``: uniform w, global normalisation,
    negative-prompt anneal, t_max 0.98 → 0.5 at half-way) with TV-3DG's deterministic
    DDIM-inverted x_t (UNVERIFIED form, see the module docstring). Pure CSD as in the paper's
    code: ``noising="random"``. CSD's SD refine stage (``csd-sd-refine.yaml``):
    ``noising="random", weighting="sds", grad_normalize=False,
    negative_mix=Linear(1.0, 0.5), timesteps=TimestepSchedule(t_max=Constant(0.5))``. CSD's
    configs also set ``PromptConfig.negative_prompt = "oversaturated color, ugly, tiling, low
    quality, noisy"``; with the default empty negative prompt λ has no effect.

    Suggested for the builtin 32x32 pixel prior (not measured): ``guidance_scale=7.5``,
    ``grad_normalize=False``, ``weighting="sds"`` (then g is exactly the classifier part of the
    builtin SDS preset's gradient), and ``inversion_steps=2`` or ``noising="random"`` to keep the
    CPU cost near SDS's (the inversion costs N extra U-Net calls per step).
    """

    guidance_scale: float = 1.0
    """s: scale of the classifier direction (CSD ``cond_scale: 1``). With grad_normalize it only
    matters through grad_clip; without, s = 7.5 gives SDS's classifier term at CFG 7.5."""
    negative_mix: Schedule = field(default_factory=lambda: Linear(0.0, 1.0, 0.0, 0.5))
    """λ(progress): the unconditional branch is λ·negative prompt + (1 − λ)·"" (CSD
    ``uncond_scale: [0, -0.0, -1, 5000]``, ``null_scale: [0, -1, 0.0, 5000]`` of 10k steps:
    0 → 1 over the first half). Any real λ is allowed (paper: λ = ω2/ω1)."""
    noising: Noising = "ddim_inversion"
    """How x_t is made: "ddim_inversion" (TV-3DG CSM: deterministic, no noise drawn; UNVERIFIED
    details) or "random" (CSD: x_t = α_t x + σ_t ε, fresh ε per view)."""
    inversion_steps: int = 5
    """N DDIM-inversion steps from the clean x to t on the grid ⌊k·t/N⌋ (UNVERIFIED: TV-3DG's
    count is unpublished; 5 matches ISM's xs_inv_steps / stride 200 over 0..980)."""
    timesteps: TimestepSchedule = field(
        default_factory=lambda: TimestepSchedule(t_max=Linear(0.98, 0.5, 0.5, 0.5))
    )
    """Range of t per view; default U{20..980}, then U{20..500} from half-way (``csd-if.yaml``
    ``max_step_percent: [5000, 0.98, 0.5, 5001]`` with 10k steps)."""
    weighting: CSMWeighting = "uniform"
    """w(t): "uniform" (1, ``csd-if.yaml``), "sds" (1 − ᾱ_t, CSD SD refine), "fantasia3d",
    "ism" (σ_t/α_t, LucidDreamer)."""
    grad_normalize: bool = True
    """g ← g / (‖g‖₂ + 1e−8) over the whole batch tensor (CSD ``grad_normalize``, default True;
    False in ``csd-sd-refine.yaml``)."""
    view_dependent: ViewMode | None = None
    """View words in the conditional prompt; None = the run's PromptConfig.view_dependent. The
    negative and null prompts are never view-dependent (CSD)."""
    grad_clip: Schedule | None = None
    """Element-wise clamp of g to ±c(progress) before normalisation; None disables it (CSD)."""
    loss_scale: float = 1.0
    """Multiplies the loss (CSD ``lambda_sds: 1``)."""
    perp_neg: bool = False
    """CSD's Perp-Neg term (``use_perp_neg``), default off (as ``csd-if-object.yaml``;
    ``csd-if.yaml`` turns it on): the conditional branch takes the azimuth-interpolated
    front/side/back positive and s·κ·Σ_i w_i perp(e_i, e_pos) is added to the score (module
    docstring). Needs view_dependent != "none"."""
    perp_neg_scale: float = 3.0
    """κ, CSD's ``perpneg_scale`` relative to the classifier scale s (the term is s·κ·PerpNeg;
    ``csd-if.yaml``: perpneg_scale 3 with cond_scale 1). Used only with perp_neg."""
    perp_neg_weights: PerpNegWeights = field(default_factory=PerpNegWeights)
    """Perp-Neg's decay functions f(r) = a·exp(−b·r) + c (threestudio ``perp_neg_f_*`` defaults,
    unchanged in CSD)."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0.0):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        if self.noising not in NOISINGS:
            raise ValueError(f"noising must be one of {NOISINGS}, got {self.noising!r}")
        if isinstance(self.inversion_steps, bool) or not isinstance(self.inversion_steps, int) or self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be an integer >= 1, got {self.inversion_steps!r}")
        validate_common_fields(self, CSM_WEIGHTINGS)
        for progress in (0.0, 0.5, 1.0):
            if not math.isfinite(self.negative_mix(progress)):
                raise ValueError(f"negative_mix must stay finite, got {self.negative_mix(progress)} at progress {progress}")

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> CSM:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return CSM(self, prior, prompt or PromptConfig())


@dataclass
class CSMBranch:
    """One ε-prediction entering g: ``weight · ε_φ(x_t; embeds, t)``."""

    name: str  # "cond", "negative", "null" (a subclass may add e.g. "image")
    embeds: Tensor  # [B, L, D] text embeddings for the B views
    weight: float  # coefficient a_k in g = w(t) Σ_k a_k ε_k
    image: bool = False  # evaluated with the image prompt (VPCSM); text-only otherwise


def _same_row(branch: CSMBranch, embeds: Tensor, image: bool) -> bool:
    """True when ``branch`` is evaluated exactly as (``embeds``, with or without the image)."""
    return branch.image == image and branch.embeds.shape == embeds.shape and torch.equal(branch.embeds, embeds)


def merge_branches(branches: list[CSMBranch]) -> list[CSMBranch]:
    """Drops zero-weight branches and merges branches with identical embeddings (weights add;
    names joined by "+"), e.g. negative and null when the negative prompt is "" (the default):
    the same g with fewer U-Net rows."""
    merged: list[CSMBranch] = []
    for branch in branches:
        for i, kept in enumerate(merged):
            if _same_row(kept, branch.embeds, branch.image):
                merged[i] = CSMBranch(f"{kept.name}+{branch.name}", kept.embeds, kept.weight + branch.weight, kept.image)
                break
        else:
            merged.append(branch)
    return [b for b in merged if b.weight != 0.0]


def find_or_add_row(branches: list[CSMBranch], name: str, embeds: Tensor) -> int:
    """Index of the branch evaluated with exactly ``embeds``; appends a zero-weight branch
    ``name`` (evaluated, but not part of Σ a_k ε_k) when there is none."""
    for i, branch in enumerate(branches):
        if _same_row(branch, embeds, False):
            return i
    branches.append(CSMBranch(name, embeds, 0.0))
    return len(branches) - 1


@dataclass
class CSMAux:
    """Detached intermediates of one CSM call (tests and diagnostics)."""

    noise: Tensor | None  # [B, C, h, w] ε (noising="random"), None for DDIM inversion
    x_t: Tensor  # [B, C, h, w] the noisy latents the branches were evaluated at
    inversion_timesteps: Tensor | None  # [N + 1, B] the inversion grid τ_k, None for "random"
    branch_names: tuple[str, ...]  # the evaluated branches (non-zero, merged; then any rows
    #                                only Perp-Neg needs, "perp_*"), in call order
    branch_weights: tuple[float, ...]  # their coefficients a_k (0 for the Perp-Neg-only rows)
    branch_eps: Tensor  # [K, B, C, h, w] their ε-predictions
    weights: Tensor  # [B] w(t)
    grad: Tensor  # [B, C, h, w] g after nan_to_num, clipping and normalisation
    neg_weights: Tensor | None = None  # [B, 2] Perp-Neg weights κ·w_i (None without Perp-Neg)
    perp_neg: Tensor | None = None  # [B, C, h, w] s κ Σ_i w_i perp(e_i, e_pos), before w(t)


class CSM(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    cfg: CSMConfig

    # ------------------------------------------------------------------ overridable parts

    def branches(self, embeds: PromptEmbeds, cams: Cameras, progress: float) -> list[CSMBranch]:
        """Which ε-predictions enter g and their weights, g = w(t) Σ a_k ε_k (the caller drops
        zero weights and merges identical embeddings, :func:`merge_branches`).

        Text CSM/CSD: cond (view-dependent prompt, or the Perp-Neg positive with perp_neg) +s,
        negative prompt −s·λ, null "" −s·(1 − λ). VPCSM overrides this (and
        :meth:`predict_branches`) to add visual-prompt branches.
        """
        s = float(self.cfg.guidance_scale)
        lam = float(self.cfg.negative_mix(progress))
        text = self.text_conditioning(embeds, cams)
        cond, negative = text.cond, text.uncond
        null = embeds.null.unsqueeze(0).expand(len(cams), -1, -1).to(self.prior.device)
        return [
            CSMBranch("cond", cond, s),
            CSMBranch("negative", negative, -s * lam),
            CSMBranch("null", null, -s * (1.0 - lam)),
        ]

    def predict_branches(self, x_t: Tensor, t: Tensor, branches: list[CSMBranch]) -> Tensor:
        """ε-predictions [K, B, C, h, w] of the K branches at (x_t, t), one batched U-Net call."""
        prior = self.prior
        k = len(branches)
        eps = prior.predict_eps(
            torch.cat([x_t] * k),
            torch.cat([t] * k),
            torch.cat([b.embeds.to(prior.device) for b in branches]),
        )
        return eps.view(k, *x_t.shape)

    def noisy_latents(
        self, x: Tensor, t: Tensor, embeds: PromptEmbeds, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(x_t, ε or None, inversion grid or None) for clean latents ``x`` [B, C, h, w] (detached).

        "random": ε drawn from ``generator`` (after t). "ddim_inversion": deterministic, draws
        nothing; N batched calls ε_φ(x_τ; "", τ) along the grid of :func:`inversion_grid`.
        """
        prior, cfg = self.prior, self.cfg
        alphas_cumprod = prior.alphas_cumprod
        if cfg.noising == "random":
            noise = sample_noise(tuple(x.shape), generator, x.device)
            alpha, sigma = alpha_sigma(alphas_cumprod, t)
            return alpha * x + sigma * noise, noise, None
        grid = inversion_grid(t, cfg.inversion_steps)  # [N + 1, B]
        null = embeds.null.unsqueeze(0).expand(x.shape[0], -1, -1).to(prior.device)
        x_tau = x
        alpha_from = torch.ones(x.shape[0], 1, 1, 1, device=x.device)  # the clean end: α = 1, σ = 0
        sigma_from = torch.zeros_like(alpha_from)
        for k in range(cfg.inversion_steps):
            e = prior.predict_eps(x_tau, grid[k], null)
            alpha_to, sigma_to = alpha_sigma(alphas_cumprod, grid[k + 1])
            x_tau = ddim_step(x_tau, e, alpha_from, sigma_from, alpha_to, sigma_to)
            alpha_from, sigma_from = alpha_to, sigma_to
        return x_tau, None, grid

    # ------------------------------------------------------------------ the recipe

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """CSM loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)

        # 1. Encode the renders into the space the prior denoises (differentiable).
        latents = prior.encode_images(rgb.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 2. Sample t per view from the caller's CPU generator (then ε, for noising="random").
        t = cfg.timesteps(progress, batch, prior.num_train_timesteps, generator).to(prior.device)

        with torch.no_grad():
            # 3. x_t: DDIM inversion with the null text (TV-3DG) or forward noising (CSD).
            x_t, noise, grid = self.noisy_latents(latents.detach(), t, embeds, generator)

            # 4. The classifier branches at (x_t, t) (plus, with Perp-Neg, the rows its term
            #    needs and the branches lack, at weight 0): one batched U-Net call.
            branches = merge_branches(self.branches(embeds, cams, progress))
            text, rows = None, None
            if cfg.perp_neg:
                text = self.text_conditioning(embeds, cams)
                rows = [
                    find_or_add_row(branches, name, e)
                    for name, e in [("perp_pos", text.cond), ("perp_uncond", text.uncond)]
                    + [(f"perp_neg_{i + 1}", n) for i, n in enumerate(text.negs.unbind(1))]
                ]
            if branches:
                branch_eps = self.predict_branches(x_t, t, branches)
                score = sum(b.weight * e for b, e in zip(branches, branch_eps) if b.weight != 0.0)
                if not torch.is_tensor(score):  # only zero-weight (Perp-Neg) rows
                    score = torch.zeros_like(x_t)
            else:
                branch_eps = x_t.new_zeros((0, *x_t.shape))
                score = torch.zeros_like(x_t)
            perp = None
            if text is not None:
                eps_pos, eps_uncond, *eps_negs = (branch_eps[i] for i in rows)
                residual = perp_neg_residual(eps_uncond, eps_pos, torch.stack(eps_negs, dim=1), text.neg_weights)
                perp = float(cfg.guidance_scale) * residual
                score = score + perp

            # 5. g = w(t) Σ a_k ε_k, made finite, optionally clamped, then globally normalised.
            w = csm_weighting(cfg.weighting, prior.alphas_cumprod, t)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * score)
            grad = clip_gradient(grad, cfg.grad_clip, progress)
            if cfg.grad_normalize:
                grad = grad / (grad.norm() + 1e-8)

        # 6. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        return guidance_output(
            latents, grad, batch, t, cfg.loss_scale,
            aux=CSMAux(
                noise=noise,
                x_t=x_t,
                inversion_timesteps=grid,
                branch_names=tuple(b.name for b in branches),
                branch_weights=tuple(b.weight for b in branches),
                branch_eps=branch_eps,
                weights=w,
                grad=grad,
                neg_weights=None if text is None else text.neg_weights,
                perp_neg=perp,
            ),
        )
