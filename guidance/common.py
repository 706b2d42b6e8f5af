"""Pure helpers shared by every score-distillation method (see docs/guidance-spec.md §0).

* **CFG convention.** All of dreamlab uses convention A (diffusers):
  ``ε_cfg = ε_∅ + s (ε_y − ε_∅)``. threestudio's SDS code uses convention B,
  ``ε_y + s (ε_y − ε_∅)``, which is convention A with ``s + 1``: its ``guidance_scale: 100``
  is 101 here. Convert every default copied from a convention-B codebase (threestudio SDS,
  Consistent3D/CDS).
* **Randomness.** Timesteps and noise are drawn on the CPU from the ``torch.Generator`` the
  trainer passes in, then moved to the device, so a resumed run draws the same numbers.
* **Surrogate loss.** A hand-made gradient g is applied through
  ``0.5 · Σ (x − stopgrad(x − g))² / B`` whose gradient is exactly ``g / B`` (threestudio).
* **Shared recipe pieces.** ``GuidanceBase`` (cfg, prior, prompt, view mode), ``check_renders``
  (the input asserts), ``clip_gradient`` (optional element-wise clamp) and ``guidance_output``
  (surrogate loss and ``GuidanceOutput``) hold the start and end most methods share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from dreamlab.schedules import Constant, Schedule
from dreamlab.types import GuidanceOutput

if TYPE_CHECKING:
    from dreamlab.priors.base import Prior
    from dreamlab.prompts import PromptConfig, ViewMode
    from dreamlab.types import Cameras

Weighting = Literal["sds", "uniform", "fantasia3d"]
WEIGHTINGS: tuple[str, ...] = ("sds", "uniform", "fantasia3d")


def percent_to_step(percent: float, num_train_timesteps: int) -> int:
    """threestudio's ``int(T * pct)`` (with a 1e-6 guard against 0.29 * 1000 = 289.99…), in [0, T-1]."""
    return min(num_train_timesteps - 1, max(0, math.floor(num_train_timesteps * percent + 1e-6)))


def sample_timesteps(
    generator: torch.Generator, batch: int, t_min: float, t_max: float, num_train_timesteps: int
) -> Tensor:
    """Integer timesteps [B] (CPU, long) uniform on {int(T t_min), …, int(T t_max)}, both ends included.

    Args:
        generator: CPU generator all randomness comes from.
        batch: number of timesteps (threestudio draws one per view).
        t_min, t_max: range as fractions of ``num_train_timesteps`` (e.g. 0.02, 0.98 -> 20..980).
    """
    lo = percent_to_step(t_min, num_train_timesteps)
    hi = percent_to_step(t_max, num_train_timesteps)
    if hi < lo:
        raise ValueError(f"timestep range is empty: t_min {t_min} > t_max {t_max}")
    return torch.randint(lo, hi + 1, (batch,), generator=generator, dtype=torch.long)


@dataclass(frozen=True)
class TimestepSchedule:
    """Which diffusion timesteps a guidance samples, as a function of training progress.

    * ``kind="uniform"``: t ~ U{T·t_min(p), …, T·t_max(p)} per view. Constant schedules give
      threestudio's fixed range; e.g. ``t_max=Linear(0.98, 0.5, 0.0, 0.5)`` anneals it
      (ProlificDreamer/ISM style); ``t_min = t_max = SqrtAnneal(0.98, 0.02)`` is HiFA's
      deterministic square-root anneal.
    * ``kind="anneal"``: DreamGaussian's deterministic t = round((1 − p)·T), clipped to
      [T·t_min(p), T·t_max(p)], shared by the batch (no randomness drawn).
    """

    kind: Literal["uniform", "anneal"] = "uniform"
    """"uniform" (random in a range) or "anneal" (DreamGaussian's deterministic decreasing t)."""
    t_min: Schedule = field(default_factory=lambda: Constant(0.02))
    """Lower end of the range, as a fraction of the training timesteps, vs. progress."""
    t_max: Schedule = field(default_factory=lambda: Constant(0.98))
    """Upper end of the range, as a fraction of the training timesteps, vs. progress."""

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "anneal"):
            raise ValueError(f"timestep schedule kind must be 'uniform' or 'anneal', got {self.kind!r}")

    def bounds(self, progress: float, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive integer range (lo, hi) of the timesteps allowed at ``progress``."""
        lo = percent_to_step(self.t_min(progress), num_train_timesteps)
        hi = percent_to_step(self.t_max(progress), num_train_timesteps)
        if hi < lo:
            raise ValueError(f"timestep range is empty at progress {progress}: {lo} > {hi}")
        return lo, hi

    def __call__(
        self, progress: float, batch: int, num_train_timesteps: int, generator: torch.Generator
    ) -> Tensor:
        """Timesteps [B] (CPU, long) for this step."""
        if self.kind == "anneal":
            lo, hi = self.bounds(progress, num_train_timesteps)
            t = min(hi, max(lo, round((1.0 - progress) * num_train_timesteps)))
            return torch.full((batch,), t, dtype=torch.long)
        return sample_timesteps(
            generator, batch, self.t_min(progress), self.t_max(progress), num_train_timesteps
        )


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the CPU from ``generator`` (fp32), then moved to ``device``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, convention A (diffusers): ε_∅ + s (ε_y − ε_∅)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def threestudio_scale_to_dreamlab(scale_b: float) -> float:
    """Converts a convention-B guidance scale (threestudio SDS, CDS) to convention A: s + 1."""
    return scale_b + 1.0


def weighting(name: Weighting, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """Per-sample weight w(t) [B] (fp32, on ``alphas_cumprod``'s device).

    "sds": 1 − ᾱ_t = σ_t² (DreamFusion / threestudio default); "uniform": 1;
    "fantasia3d": sqrt(ᾱ_t)·(1 − ᾱ_t) (threestudio's ``weighting_strategy: fantasia3d``).
    """
    abar = alphas_cumprod[t.to(alphas_cumprod.device)].float()
    if name == "sds":
        return 1.0 - abar
    if name == "uniform":
        return torch.ones_like(abar)
    if name == "fantasia3d":
        return abar.sqrt() * (1.0 - abar)
    raise ValueError(f"unknown weighting {name!r}; choose one of {WEIGHTINGS}")


def surrogate_loss(x: Tensor, grad: Tensor, batch: int) -> Tensor:
    """Scalar whose gradient w.r.t. ``x`` is exactly ``grad / batch``.

    ``0.5 · Σ (x − stopgrad(x − grad))² / batch`` (threestudio's reparameterisation). Its value
    is ``0.5 ‖grad‖² / batch``, useful only for logging.
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / batch


def check_renders(rgb: Tensor, cams: Cameras) -> int:
    """Asserts that ``rgb`` is [B, H, W, 3] and that there is one camera per render; returns B."""
    assert rgb.ndim == 4 and rgb.shape[-1] == 3, f"want rgb [B, H, W, 3], got {tuple(rgb.shape)}"
    batch = rgb.shape[0]
    assert len(cams) == batch, (len(cams), batch)
    return batch


def clip_gradient(grad: Tensor, grad_clip: Schedule | None, progress: float) -> Tensor:
    """``grad`` clamped element-wise to ±grad_clip(progress); unchanged when ``grad_clip`` is None."""
    if grad_clip is None:
        return grad
    clip = float(grad_clip(progress))
    return grad.clamp(-clip, clip)


def guidance_output(
    latents: Tensor, grad: Tensor, batch: int, t: Tensor, loss_scale: float, aux: Any
) -> GuidanceOutput:
    """The method's result: loss ``loss_scale · surrogate_loss(latents, grad, batch)`` (gradient
    ``loss_scale · grad / batch`` w.r.t. ``latents``), the timesteps ``t`` on the CPU, ‖grad‖ and
    the method's ``aux``."""
    loss = loss_scale * surrogate_loss(latents, grad, batch)
    return GuidanceOutput(loss=loss, timesteps=t.detach().cpu(), grad_norm=grad.norm(), aux=aux)


class GuidanceBase:
    """Holds what every guidance keeps: its config, the prior, the run's prompt settings and the
    view mode (``cfg.view_dependent``, or the prompt's when that is None). Methods subclass it
    and add their own state in their ``__init__`` after ``super().__init__``."""

    def __init__(self, cfg: Any, prior: Prior, prompt: PromptConfig) -> None:
        self.cfg = cfg
        self.prior = prior
        self.prompt = prompt
        self.view_mode: ViewMode = cfg.view_dependent or prompt.view_dependent


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) shaped [B, 1, 1, 1] for broadcasting over images."""
    abar = alphas_cumprod[t.to(alphas_cumprod.device)].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1.0 - abar).sqrt()


def predict_eps_cfg(
    prior, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(ε̂_cfg, ε_y, ε_∅) for noisy inputs ``x_t`` [B, C, h, w] at timesteps ``t`` [B], in one
    batched ``predict_eps`` call (conditional half first). CFG convention A. No gradient is
    tracked: call it inside ``torch.no_grad()`` or on detached inputs.

    Args:
        prior: a ``dreamlab.priors.base.Prior``.
        cond, uncond: per-view text embeddings [B, L, D] (e.g. from ``PromptConfig.embeds_for_cameras``).
        scale: CFG scale s; ε̂_cfg = ε_∅ + s (ε_y − ε_∅).
    """
    eps = prior.predict_eps(
        torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]).to(prior.device)
    )
    eps_cond, eps_uncond = eps.chunk(2)
    return cfg_combine(eps_uncond, eps_cond, scale), eps_cond, eps_uncond


def predict_x0(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The clean-sample estimate x̂_0 = (x_t − σ_t ε̂) / α_t (Tweedie's formula for ε-prediction)."""
    return (x_t - sigma * eps) / alpha


def ddim_step(
    x_from: Tensor, eps: Tensor, alpha_from: Tensor, sigma_from: Tensor, alpha_to: Tensor, sigma_to: Tensor
) -> Tensor:
    """Deterministic DDIM (η = 0) move of ``x_from`` at one noise level to another with noise
    estimate ``eps``: x_to = α_to x̂_0 + σ_to ε, x̂_0 = (x_from − σ_from ε) / α_from.

    Works in both directions: towards less noise (sampling) and towards more noise (DDIM
    inversion, as in ISM/TSM/CSM). α, σ are [B, 1, 1, 1] (``alpha_sigma``); for the clean end
    (t = −1 in LucidDreamer's code) pass α = 1, σ = 0.
    """
    return alpha_to * predict_x0(x_from, eps, alpha_from, sigma_from) + sigma_to * eps


# ------------------------------------------------------------------------------ Perp-Neg

DecayTriple = tuple[float, float, float]
"""(a, b, c) of a shifted exponential decay f(r) = a·exp(−b·r) + c."""


def shifted_exponential_decay(a: float, b: float, c: float, r: Tensor) -> Tensor:
    """f(r) = a·exp(−b·r) + c (threestudio ``shifted_expotional_decay``), elementwise."""
    return a * torch.exp(-b * r) + c


@dataclass(frozen=True)
class PerpNegWeights:
    """The decay functions that weight Perp-Neg's negative prompts (spec §1.2, threestudio
    ``prompt_processor.perp_neg_f_*``); each is (a, b, c) of f(r) = a·exp(−b·r) + c.

    With r the interpolation coefficient of the camera (1 = pure front / pure side, see
    ``dreamlab.prompts.perp_neg_embeds_for_cameras``), the weights of the two negatives are
    ``[−f_fs(r), −f_sf(1 − r)]`` (negatives [front, side]) when |φ| < 90°, and
    ``[−f_sb(r), −f_fsb(r)]`` (negatives [side, front]) otherwise; 0 for overhead views.
    """

    f_sb: DecayTriple = (1.0, 0.5, -0.606)
    """Side-negative weight on the side↔back half, of r = 2 − |φ|/90 (threestudio
    ``perp_neg_f_sb``); f_sb(1) ≈ 0.0005, so a pure side view hardly negates "side"."""
    f_fsb: DecayTriple = (1.0, 0.5, 0.967)
    """Front-negative weight on the side↔back half, of r (threestudio ``perp_neg_f_fsb``):
    1.967 at the back, 1.574 at the side."""
    f_fs: DecayTriple = (4.0, 0.5, -2.426)
    """Front-negative weight on the front↔side half, of r = 1 − |φ|/90 (threestudio
    ``perp_neg_f_fs``); f_fs(1) ≈ 0 (a pure front view does not negate "front")."""
    f_sf: DecayTriple = (4.0, 0.5, -2.426)
    """Side-negative weight on the front↔side half, of 1 − r (threestudio ``perp_neg_f_sf``)."""

    def validate(self) -> None:
        """Raises ValueError unless every function is three finite numbers."""
        for name in ("f_sb", "f_fsb", "f_fs", "f_sf"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ValueError(f"perp-neg {name} must be three finite numbers (a, b, c), got {value!r}")

    def negative_weights(self, r: Tensor, front_half: Tensor) -> Tensor:
        """Weights [B, 2] (≤ 0 with the defaults) of the two negatives of each camera.

        Args:
            r: [B] interpolation coefficient (1 − |φ|/90 on the front half, 2 − |φ|/90 on
                the back half).
            front_half: [B] bool, |φ| < 90°: negatives (front, side); else (side, front).
        """
        r = r.float()
        f = shifted_exponential_decay
        front = torch.stack([-f(*self.f_fs, r), -f(*self.f_sf, 1.0 - r)], dim=-1)
        back = torch.stack([-f(*self.f_sb, r), -f(*self.f_fsb, r)], dim=-1)
        return torch.where(front_half.unsqueeze(-1), front, back)


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """Part of ``x`` orthogonal to ``y``, per sample over all non-batch dims [B, ...]:
    x − (⟨x, y⟩ / max(‖y‖², 1e−6)) y (threestudio ``perpendicular_component``)."""
    dims = tuple(range(1, x.ndim))
    coeff = (x * y).sum(dim=dims) / (y * y).sum(dim=dims).clamp(min=1e-6)
    return x - coeff.view(-1, *[1] * (x.ndim - 1)) * y


def perp_neg_combine(
    eps_uncond: Tensor, eps_pos: Tensor, eps_negs: Tensor, neg_weights: Tensor, scale: float
) -> Tensor:
    """Perp-Neg guidance, CFG convention A (threestudio's Perp-Neg path, spec §1.2):

        e_pos = ε_pos − ε_∅,  e_i = ε_neg_i − ε_∅
        ε̂ = ε_∅ + s (e_pos + Σ_i w_i perp(e_i, e_pos))

    Args:
        eps_uncond, eps_pos: [B, C, h, w] predictions with the negative prompt (∅) and the
            Perp-Neg positive embedding.
        eps_negs: [B, K, C, h, w] predictions with the K negative embeddings of each sample.
        neg_weights: [B, K] weights w_i (≤ 0 with threestudio's defaults; 0 for overhead).
        scale: CFG scale s.
    """
    e_pos = eps_pos - eps_uncond
    accum = torch.zeros_like(e_pos)
    for i in range(eps_negs.shape[1]):
        w_i = neg_weights[:, i].to(e_pos).view(-1, *[1] * (e_pos.ndim - 1))
        accum = accum + w_i * perpendicular_component(eps_negs[:, i] - eps_uncond, e_pos)
    return eps_uncond + scale * (e_pos + accum)


def validate_common_fields(cfg) -> None:
    """The checks every SDS-like config shares: ``weighting``, ``view_dependent``, ``loss_scale``,
    a non-empty ``timesteps`` range and a positive ``grad_clip`` at progress 0, 0.5 and 1, and
    (when the config has them) the Perp-Neg fields. Raises ValueError with a one-line message."""
    from dreamlab.prompts import VIEW_MODES

    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    if cfg.view_dependent is not None and cfg.view_dependent not in VIEW_MODES:
        raise ValueError(f"view_dependent must be one of {VIEW_MODES} or None, got {cfg.view_dependent!r}")
    if not math.isfinite(cfg.loss_scale):
        raise ValueError(f"loss_scale must be finite, got {cfg.loss_scale}")
    if hasattr(cfg, "perp_neg"):
        if not math.isfinite(cfg.perp_neg_scale):
            raise ValueError(f"perp_neg_scale must be finite, got {cfg.perp_neg_scale}")
        if cfg.perp_neg and cfg.view_dependent == "none":
            raise ValueError('perp_neg needs view-dependent prompts: view_dependent cannot be "none"')
        cfg.perp_neg_weights.validate()
    for progress in (0.0, 0.5, 1.0):
        cfg.timesteps.bounds(progress, 1000)  # raises if the range is empty
        if cfg.grad_clip is not None and not cfg.grad_clip(progress) > 0.0:
            raise ValueError(f"grad_clip must stay > 0, got {cfg.grad_clip(progress)} at progress {progress}")
