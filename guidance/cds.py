"""CDS — Consistency Distillation Sampling (Consistent3D; Wu et al., CVPR 2024, arXiv 2401.09050).

Update rule (descent gradient on the model-space image x, e.g. the SD latent):

    ε*   fixed noise, drawn once and reused for every view and step (share_noise)
    t_n  = clamp(T·t_next(p), T·t_min, T·t_max − gap)       t_next(p) = 0.7 − 0.6·sqrt(p)
    t    = clamp(t_n + Δ, T·t_min, T·t_max),  Δ ~ U{gap .. gap + P − 1} per view   (so t > t_n)
    x_t  = α_t x + σ_t ε*                                     (= z_t / sqrt(1 + σ̃_t²), z_t = x + σ̃_t ε*)
    ε̂_t  = ε_φ(x_t; ∅, t) + s(p)(ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))          (CFG convention A)
    x_n  = α_n (x_t − σ_t ε̂_t)/α_t + σ_n ε̂_t                 (one deterministic DDIM/PF-ODE step)
    ε̂_n  = the same CFG prediction at (x_n, t_n)
    g    = w(t) (ε̂_t − ε̂_n)

In words: SDS whose random-noise target ε is replaced by the CFG prediction at the adjacent,
less noisy point of the deterministic ODE trajectory through the fixed-noise sample. With
``recon_std_rescale`` r > 0 (0 by default) ε̂_t is replaced by ε̃_t in the ODE step, where
x̂_0 = (x_t − σ_t ε̂_t)/α_t is rescaled toward the no-CFG x̂_0's per-sample std
(x̂_0' = r·x̂_0·std(x̂_0^y)/std(x̂_0) + (1 − r)·x̂_0, ε̃_t = (x_t − α_t x̂_0')/σ_t), and
g = w(t)[(ε̃_t − ε̂_n) + (σ̃_t/(σ̃_n + 1e−9))(ε̂_t − ε̃_t)], σ̃ = σ/α (the code's
``grad_latents`` with its sign flipped: Consistent3D's loss is 0.5‖z − sg(z + G)‖²/B). g is
``nan_to_num``'d, clamped element-wise to ±grad_clip(p) and applied through the surrogate loss
0.5 Σ (x − sg(x − g))² / B, so ∂loss/∂x = loss_scale · g / B.

The persistent noise ε* (shape [C, h, w], one image shared by all views, as the reference's
``self.noise = torch.randn(4, 64, 64)`` repeated over the batch) is drawn from the run's CPU
generator the first time it is needed (after that step's Δ draws) and is part of
``state_dict()`` / ``load_state_dict()``, so a resumed run is bit-exact. With
``share_noise=False`` fresh per-view noise is drawn every step instead (the reference's
``randn_like`` path; nothing persists).

Reference code: sail-sg/Consistent3D @9118a5c,
``threestudio/models/guidance/stable_diffusion_guidance.py`` (``configure``: ``self.noise``
l. 163; ``compute_grad_consistency`` l. 309-421, with ε* l. 320-323, x_t l. 339-341, the ODE
step l. 357-359, ``grad_latents`` and the loss l. 394-400; ``get_rescaled_sample`` l. 440-450;
``__call__``'s (t, t_n) draw l. 575-580; ``update_step`` / ``anneal_t`` l. 884-917),
``threestudio/systems/consistency.py`` (the guidance, hence ε*, is built once in ``on_fit_start``)
and ``configs/consistency-*.yaml``; docs/guidance-spec.md §9. Checked line by line against that
snapshot: same noise rule, x_t, ODE step, target, sign, weighting, clamping and (t, t_n) draw.
Consistent3D forks threestudio's SDS code, so its CFG scale is convention B: 100 → 50 there
is 101 → 51 here. The one deliberate difference: the reference keeps ε* as a plain attribute,
so a resumed run redraws it; here it is saved.

A property of the method (the reference computes the same g): g vanishes where the Euler step
from x_t leaves ε̂ unchanged, not where x is data. For data N(μ, s² I) and exact ε̂ (CFG 1),
g = c·(x + σ̃_t ε* − μ) with c > 0, so descent sends x to μ − σ̃_t ε*, off the data along −ε*
(test_cds_fixed_point_on_gaussian_data_is_shifted_by_the_fixed_noise; the 2-D toy's drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    WEIGHTINGS,
    alpha_sigma,
    check_renders,
    clip_gradient,
    ddim_step,
    guidance_output,
    percent_to_step,
    predict_eps_cfg,
    predict_x0,
    sample_noise,
    weighting,
    validate_common_fields,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Constant, Linear, Schedule, SqrtAnneal
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds

CDSWeighting = Literal["sds", "uniform", "fantasia3d", "mix"]
CDS_WEIGHTINGS: tuple[str, ...] = (*WEIGHTINGS, "mix")


def cds_weighting(name: str, alphas_cumprod: Tensor, t: Tensor, progress: float) -> Tensor:
    """w(t) [B]: the shared weightings plus Consistent3D's "mix" (uniform for the first half of
    the run, 1 − ᾱ_t from progress 0.5 on; the reference's ``cur_training_ratio >= 0.5``)."""
    if name == "mix":
        name = "sds" if progress >= 0.5 else "uniform"
    return weighting(name, alphas_cumprod, t)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CDSTimestepRange:
    """The timesteps a :class:`CDSConfig` uses at a given progress (a view of its fields, not a
    config itself). ``bounds`` matches ``TimestepSchedule.bounds`` for the reported (noisier) t."""

    cfg: CDSConfig

    def steps(self, num_train_timesteps: int) -> tuple[int, int, int, int]:
        """(lo, hi, gap, width) in integer timesteps: the clamp range, end_gap and perturb width."""
        cfg, T = self.cfg, num_train_timesteps
        lo, hi = percent_to_step(cfg.t_min, T), percent_to_step(cfg.t_max, T)
        return lo, hi, percent_to_step(cfg.end_gap, T), percent_to_step(cfg.perturb_factor, T)

    def t_next(self, progress: float, num_train_timesteps: int) -> int:
        """t_n = clamp(int(T·t_next(p)), lo, hi − gap) (the less noisy end of the ODE step)."""
        lo, hi, gap, _ = self.steps(num_train_timesteps)
        raw = percent_to_step(self.cfg.t_next(progress), num_train_timesteps)
        return min(max(raw, lo), hi - gap)

    def bounds(self, progress: float, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive range (lo, hi) of the sampled t at ``progress``."""
        lo, hi, gap, width = self.steps(num_train_timesteps)
        t_n = self.t_next(progress, num_train_timesteps)
        return min(max(t_n + gap, lo), hi), min(max(t_n + gap + width - 1, lo), hi)

    def __call__(
        self, progress: float, batch: int, num_train_timesteps: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """(t, t_n), both [B] CPU long: Δ ~ U{gap .. gap + width − 1} per view from ``generator``."""
        lo, hi, gap, width = self.steps(num_train_timesteps)
        t_n = torch.full((batch,), self.t_next(progress, num_train_timesteps), dtype=torch.long)
        delta = torch.randint(gap, gap + width, (batch,), generator=generator, dtype=torch.long)
        return (t_n + delta).clamp(lo, hi), t_n


def _as_schedule(value: Any) -> Any:
    """Numbers become ``Constant`` (so ``dataclasses.replace(cfg, guidance_scale=7.5)`` works)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    return value


@dataclass
class CDSConfig:
    """Consistency Distillation Sampling (Consistent3D). The loss is a mean over the B views: its
    gradient w.r.t. each view's latent is ``loss_scale · w(t)(ε̂_t − ε̂_n) / B``.

    Defaults: Consistent3D's coarse NeRF stage (``consistency-coarse.yaml``: 3000 steps, 8 views,
    SD-2.1-base), converted to convention A. Refine stage: ``guidance_scale=Linear(101, 31)``,
    ``t_next=SqrtAnneal(0.3, 0.02)``, ``t_min=0.02, t_max=0.5, perturb_factor=0.1``,
    ``weighting="sds"``; texture stage: ``Constant(51)``, ``SqrtAnneal(0.5, 0.02)``,
    ``t_min=0.02``, ``perturb_factor=0.1``, ``weighting="sds"`` (spec §9 table).

    Suggested for the builtin 32x32 pixel prior (not measured): ``guidance_scale=7.5`` (as SDS
    there; a plain number is accepted and becomes ``Constant``), other defaults unchanged.
    """

    guidance_scale: Schedule = field(default_factory=lambda: Linear(101.0, 51.0))
    """CFG scale s(progress), convention A, for both predictions. Default 101 → 51 linearly =
    Consistent3D ``guidance_scale: [0, 100., 50., 3000]`` in convention B (+1). A number means
    a constant scale."""
    t_next: Schedule = field(default_factory=lambda: SqrtAnneal(0.7, 0.1))
    """t_n / T vs progress, the less noisy end of the ODE step: 0.7 → 0.1 by square root
    (``cur_steps: [0, 700, 100, 3000]`` with ``perturb_indices: sqrt``; Linear for none)."""
    end_gap: float = 0.1
    """Smallest t − t_n as a fraction of T (``end_gap: 100``)."""
    perturb_factor: float = 0.2
    """Width of the random gap: t − t_n ~ U{gap .. gap + T·perturb_factor − 1}
    (``perturb_factor: 200``)."""
    t_min: float = 0.1
    """Lower clamp of t_n and t, fraction of T (``min_sigma_percent: 0.1``)."""
    t_max: float = 0.98
    """Upper clamp of t (t_n ≤ t_max − end_gap), fraction of T (``max_sigma_percent: 0.98``)."""
    weighting: CDSWeighting = "uniform"
    """w(t): "uniform" (coarse stage), "sds" (1 − ᾱ_t; refine and texture stages),
    "fantasia3d", "mix" (uniform, then 1 − ᾱ_t from half-way)."""
    share_noise: bool = True
    """One persistent noise image for every view and step (``share_noise: true``); False draws
    fresh per-view noise every step (nothing persists)."""
    recon_std_rescale: float = 0.0
    """r: rescale the CFG x̂_0 toward the no-CFG x̂_0's std before the ODE step
    (``recon_std_rescale: 0.0``, i.e. off)."""
    view_dependent: ViewMode | None = None
    """View words in the conditional prompt; None = the run's PromptConfig.view_dependent."""
    grad_clip: Schedule | None = field(default_factory=lambda: Linear(2.0, 8.0))
    """Element-wise clamp of g to ±c(progress): 2 → 8 linearly (``grad_clip: [0, 2.0, 8.0, 3000]``);
    None disables it."""
    loss_scale: float = 1.0
    """Multiplies the loss (``lambda_sds: 1``)."""

    def __post_init__(self) -> None:
        self.guidance_scale = _as_schedule(self.guidance_scale)
        self.t_next = _as_schedule(self.t_next)
        if self.grad_clip is not None:
            self.grad_clip = _as_schedule(self.grad_clip)

    @property
    def timesteps(self) -> CDSTimestepRange:
        """The (t, t_n) sampler and the range of t at a progress (``.bounds(progress, T)``)."""
        return CDSTimestepRange(self)

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        T = 1000
        if not (math.isfinite(self.recon_std_rescale) and 0.0 <= self.recon_std_rescale <= 1.0):
            raise ValueError(f"recon_std_rescale must lie in [0, 1], got {self.recon_std_rescale}")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min {self.t_min}, t_max {self.t_max}")
        lo, hi, gap, width = self.timesteps.steps(T)
        if gap < 1:
            raise ValueError(f"end_gap must be at least one timestep (>= {1 / T}), got {self.end_gap}")
        if width < 1:
            raise ValueError(f"perturb_factor must be at least one timestep (>= {1 / T}), got {self.perturb_factor}")
        if hi - gap < lo:
            raise ValueError(
                f"t_max - end_gap must be >= t_min so that t_n has room, got {self.t_max} - {self.end_gap} < {self.t_min}"
            )
        for progress in (0.0, 0.5, 1.0):
            if not self.guidance_scale(progress) >= 0.0:
                raise ValueError(f"guidance_scale must stay >= 0, got {self.guidance_scale(progress)} at progress {progress}")
            if not math.isfinite(self.t_next(progress)):
                raise ValueError(f"t_next must stay finite, got {self.t_next(progress)} at progress {progress}")
        validate_common_fields(self, CDS_WEIGHTINGS)  # after the range checks: bounds() needs them

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> CDS:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return CDS(self, prior, prompt or PromptConfig())


@dataclass
class CDSAux:
    """Detached intermediates of one CDS call (tests and diagnostics)."""

    noise: Tensor  # [B, C, h, w] ε* used for every view (the persistent noise, expanded)
    t_next: Tensor  # [B] t_n (long, prior's device)
    x_t: Tensor  # [B, C, h, w] α_t x + σ_t ε*
    x_next: Tensor  # [B, C, h, w] x_n, one DDIM step from x_t to t_n
    eps_t: Tensor  # [B, C, h, w] ε̂_t (CFG) at (x_t, t)
    eps_ode: Tensor  # [B, C, h, w] ε̃_t used for the ODE step (= ε̂_t unless recon_std_rescale > 0)
    eps_next: Tensor  # [B, C, h, w] ε̂_n (CFG) at (x_n, t_n)
    weights: Tensor  # [B] w(t)
    grad: Tensor  # [B, C, h, w] g after nan_to_num and clipping


class CDS(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``.

    Holds the persistent noise ε* (``self.noise``, [C, h, w] or None before the first step);
    ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """

    def __init__(self, cfg: CDSConfig, prior: Prior, prompt: PromptConfig) -> None:
        super().__init__(cfg, prior, prompt)
        self.noise: Tensor | None = None

    def state_dict(self) -> dict:
        """{"noise": the persistent ε* on the CPU, or None if not drawn yet}."""
        return {"noise": None if self.noise is None else self.noise.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores the persistent noise saved by :meth:`state_dict`."""
        noise = state.get("noise")
        self.noise = None if noise is None else noise.to(device=self.prior.device, dtype=torch.float32).clone()

    def fixed_noise(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
        """The persistent ε* [C, h, w], drawn from ``generator`` the first time it is needed."""
        if self.noise is None:
            self.noise = sample_noise(shape, generator, device)
        elif tuple(self.noise.shape) != shape:
            raise ValueError(
                f"CDS's persistent noise has shape {tuple(self.noise.shape)} but the prior now "
                f"gives latents of shape {shape}: the noise is fixed for the whole run"
            )
        return self.noise.to(device)

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """CDS loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)

        # 1. Encode the renders into the space the prior denoises (differentiable).
        latents = prior.encode_images(rgb.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 2. t_n from the square-root anneal; t = t_n + Δ with Δ from the caller's CPU generator;
        #    then the noise: the persistent ε* (drawn on first use) or fresh per-view noise.
        t, t_next = cfg.timesteps(progress, batch, prior.num_train_timesteps, generator)
        t, t_next = t.to(prior.device), t_next.to(prior.device)
        if cfg.share_noise:
            noise = self.fixed_noise(tuple(latents.shape[1:]), generator, latents.device)
            noise = noise.unsqueeze(0).expand_as(latents)
        else:
            noise = sample_noise(tuple(latents.shape), generator, latents.device)

        # 3. Per-view text embeddings: cond = prompt with view words, uncond = negative prompt.
        cond, uncond = self.prompt.embeds_for_cameras(embeds, cams, self.view_mode)
        scale = float(cfg.guidance_scale(progress))

        alphas_cumprod = prior.alphas_cumprod
        alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
        alpha_n, sigma_n = alpha_sigma(alphas_cumprod, t_next)
        with torch.no_grad():
            # 4. CFG prediction at x_t (one batched call).
            x_t = alpha_t * latents.detach() + sigma_t * noise
            eps_t, eps_t_cond, _ = predict_eps_cfg(prior, x_t, t, cond, uncond, scale)

            # 5. One deterministic ODE (DDIM, η = 0) step t → t_n, optionally std-rescaled x̂_0.
            eps_ode = eps_t
            if cfg.recon_std_rescale > 0.0:
                x0 = predict_x0(x_t, eps_t, alpha_t, sigma_t)
                x0_cond = predict_x0(x_t, eps_t_cond, alpha_t, sigma_t)
                factor = (x0_cond.std(dim=(1, 2, 3), keepdim=True) + 1e-8) / (x0.std(dim=(1, 2, 3), keepdim=True) + 1e-8)
                r = cfg.recon_std_rescale
                x0 = r * x0 * factor + (1.0 - r) * x0
                eps_ode = (x_t - alpha_t * x0) / sigma_t
            x_next = ddim_step(x_t, eps_ode, alpha_t, sigma_t, alpha_n, sigma_n)

            # 6. CFG prediction at the neighbour (x_n, t_n) (one batched call).
            eps_next, _, _ = predict_eps_cfg(prior, x_next, t_next, cond, uncond, scale)

            # 7. g = w(t)(ε̃_t − ε̂_n) [+ σ̃ ratio term when rescaling], finite, clamped.
            w = cds_weighting(cfg.weighting, alphas_cumprod, t, progress)
            diff = eps_ode - eps_next
            if cfg.recon_std_rescale > 0.0:
                ratio = (sigma_t / alpha_t) / (sigma_n / alpha_n + 1e-9)
                diff = diff + ratio * (eps_t - eps_ode)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * diff)
            grad = clip_gradient(grad, cfg.grad_clip, progress)

        # 8. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        return guidance_output(
            latents, grad, batch, t, cfg.loss_scale,
            aux=CDSAux(
                noise=noise,
                t_next=t_next,
                x_t=x_t,
                x_next=x_next,
                eps_t=eps_t,
                eps_ode=eps_ode,
                eps_next=eps_next,
                weights=w,
                grad=grad,
            ),
        )
