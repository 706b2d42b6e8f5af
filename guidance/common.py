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
* **CFG and Perp-Neg predictions.** ``GuidanceBase.text_conditioning`` gives a call's per-view
  embeddings (the view prompt, or with a config's ``perp_neg`` the Perp-Neg positive, negatives
  and weights, threestudio's ``PerpNegWeights`` or LucidDreamer's ``LucidPerpNegWeights``);
  ``predict_eps_guided`` (or ``guided_eps_batch`` + ``combine_guided_eps`` when a method adds
  rows to the same U-Net call) turns it into ε̂; ``perp_neg_residual`` is the bare negative term
  (CSM adds it to its classifier score). SDS, ASD, ISM/TSM and CSM share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from dreamlab.schedules import Constant, Schedule
from dreamlab.types import GuidanceOutput

if TYPE_CHECKING:
    from dreamlab.priors.base import Prior
    from dreamlab.prompts import PromptConfig, ViewMode
    from dreamlab.types import Cameras, PromptEmbeds

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
        if getattr(cfg, "perp_neg", False) and self.view_mode == "none":
            raise ValueError('perp_neg needs view-dependent prompts, but the view mode is "none"')
        if getattr(cfg, "view_guidance_scale", 0.0) > 0 and self.view_mode == "none":
            raise ValueError('view_guidance_scale needs view-dependent prompts, but the view mode is "none"')

    def text_conditioning(self, embeds: PromptEmbeds, cams: Cameras) -> TextConditioning:
        """The per-view text embeddings of this call (see ``TextConditioning``).

        Without Perp-Neg (no ``perp_neg`` field, or False): cond = the prompt with this
        guidance's view words, uncond = the negative prompt. With Perp-Neg: cond = the
        azimuth-interpolated positive, two negatives per view and their weights
        ``cfg.perp_neg_scale · w_i`` from ``cfg.perp_neg_weights`` (threestudio's
        ``PerpNegWeights``, whose overhead views use E(overhead) and weight 0, or LucidDreamer's
        ``LucidPerpNegWeights``, which has no overhead view), on the prior's device.
        """
        from dreamlab.prompts import perp_neg_embeds_for_cameras

        device = self.prior.device
        cfg = self.cfg
        if not getattr(cfg, "perp_neg", False):
            cond, uncond = self.prompt.embeds_for_cameras(embeds, cams, self.view_mode)
            return TextConditioning(cond.to(device), uncond.to(device))
        weights = cfg.perp_neg_weights
        threshold = self.prompt.overhead_threshold if weights.overhead_view else math.inf
        cond, uncond, negs, neg_weights = perp_neg_embeds_for_cameras(
            embeds, cams, weights, overhead_threshold=threshold
        )
        return TextConditioning(
            cond.to(device),
            uncond.to(device),
            negs.to(device),
            float(cfg.perp_neg_scale) * neg_weights.to(device),
        )


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

    overhead_view: ClassVar[bool] = True
    """threestudio has an overhead view: above the prompt's overhead threshold the positive is
    E(overhead) and both weights are 0."""

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


@dataclass(frozen=True)
class LucidPerpNegWeights:
    """LucidDreamer's Perp-Neg weights (spec §1.2 "LucidDreamer variant"; LucidDreamer
    ``train.py:get_pos_neg_text_embeddings`` with ``GuidanceParams`` ``negative_w``,
    ``front_decay_factor``, ``side_decay_factor``).

    r is as for ``PerpNegWeights`` (1 − |φ|/90 on the front half, 2 − |φ|/90 on the back half)
    and the negatives are the same views, with n = ``negative_w``:

    * front half, negatives [front, side]: ``[n·exp(−front_decay·r)`` (0 if r > 0.8),
      ``n·exp(−side_decay·(1 − r))`` (0 if r < 0.2)``]``;
    * back half, negatives [side, front]: ``[n·exp(−side_decay·r)/2`` (0 if r > 0.8), ``n]``.

    LucidDreamer has no overhead view (``overhead_view`` False): every camera gets the
    interpolated positive. At |φ| = 90° both halves give the same weighted negatives (front n,
    side 0), so the half that φ = −90° belongs to does not matter.
    """

    negative_w: float = -2.0
    """n, the weight of a fully active negative (LucidDreamer ``negative_w`` −2)."""
    front_decay: float = 2.0
    """Decay rate of the front negative on the front half (LucidDreamer ``front_decay_factor`` 2)."""
    side_decay: float = 10.0
    """Decay rate of the side negative (LucidDreamer ``side_decay_factor`` 10)."""

    overhead_view: ClassVar[bool] = False
    """LucidDreamer has no overhead view: the positive is always the interpolated embedding."""

    def validate(self) -> None:
        """Raises ValueError unless every field is a finite number."""
        for name in ("negative_w", "front_decay", "side_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"perp-neg {name} must be a finite number, got {value!r}")

    def negative_weights(self, r: Tensor, front_half: Tensor) -> Tensor:
        """Weights [B, 2] of the two negatives of each camera (same arguments as
        ``PerpNegWeights.negative_weights``)."""
        r = r.float()
        n = float(self.negative_w)
        zero = torch.zeros_like(r)
        front = torch.stack(
            [
                torch.where(r > 0.8, zero, n * torch.exp(-self.front_decay * r)),
                torch.where(r < 0.2, zero, n * torch.exp(-self.side_decay * (1.0 - r))),
            ],
            dim=-1,
        )
        back = torch.stack(
            [torch.where(r > 0.8, zero, n * torch.exp(-self.side_decay * r) / 2.0), torch.full_like(r, n)],
            dim=-1,
        )
        return torch.where(front_half.unsqueeze(-1), front, back)


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """Part of ``x`` orthogonal to ``y``, per sample over all non-batch dims [B, ...]:
    x − (⟨x, y⟩ / max(‖y‖², 1e−6)) y (threestudio ``perpendicular_component``)."""
    dims = tuple(range(1, x.ndim))
    coeff = (x * y).sum(dim=dims) / (y * y).sum(dim=dims).clamp(min=1e-6)
    return x - coeff.view(-1, *[1] * (x.ndim - 1)) * y


def perp_neg_residual(eps_uncond: Tensor, eps_pos: Tensor, eps_negs: Tensor, neg_weights: Tensor) -> Tensor:
    """Perp-Neg's negative term Σ_i w_i perp(e_i, e_pos), with e_pos = ε_pos − ε_∅ and
    e_i = ε_neg_i − ε_∅ (spec §1.2; the same in threestudio, LucidDreamer and CSD).

    Args:
        eps_uncond, eps_pos: [B, C, h, w] predictions with the negative prompt (∅) and the
            Perp-Neg positive embedding.
        eps_negs: [B, K, C, h, w] predictions with the K negative embeddings of each sample.
        neg_weights: [B, K] weights w_i (≤ 0 for the shipped weight functions).
    """
    e_pos = eps_pos - eps_uncond
    accum = torch.zeros_like(e_pos)
    for i in range(eps_negs.shape[1]):
        w_i = neg_weights[:, i].to(e_pos).view(-1, *[1] * (e_pos.ndim - 1))
        accum = accum + w_i * perpendicular_component(eps_negs[:, i] - eps_uncond, e_pos)
    return accum


def perp_neg_combine(
    eps_uncond: Tensor, eps_pos: Tensor, eps_negs: Tensor, neg_weights: Tensor, scale: float
) -> Tensor:
    """Perp-Neg guidance, CFG convention A (threestudio's Perp-Neg path, spec §1.2):

        e_pos = ε_pos − ε_∅,  e_i = ε_neg_i − ε_∅
        ε̂ = ε_∅ + s (e_pos + Σ_i w_i perp(e_i, e_pos))

    Arguments as ``perp_neg_residual``, plus the CFG scale s.
    """
    e_pos = eps_pos - eps_uncond
    return eps_uncond + scale * (e_pos + perp_neg_residual(eps_uncond, eps_pos, eps_negs, neg_weights))


@dataclass
class TextConditioning:
    """Per-view text embeddings of one guidance call (``GuidanceBase.text_conditioning``).

    Without Perp-Neg ``negs`` and ``neg_weights`` are None and the predicted ε̂ is plain CFG;
    with Perp-Neg ``cond`` is the Perp-Neg positive and ε̂ is ``perp_neg_combine``.
    """

    cond: Tensor  # [B, L, D] conditional: the prompt with view words, or the Perp-Neg positive
    uncond: Tensor  # [B, L, D] the negative prompt (CFG's unconditional branch)
    negs: Tensor | None = None  # [B, K, L, D] Perp-Neg negatives of each view
    neg_weights: Tensor | None = None  # [B, K] their weights, perp_neg_scale already applied

    @property
    def num_blocks(self) -> int:
        """Blocks of B rows in the batched prediction: cond, uncond and the K negatives."""
        return 2 + (0 if self.negs is None else self.negs.shape[1])

    def embeddings(self) -> Tensor:
        """[num_blocks · B, L, D]: blocks [cond; uncond; 1st negatives; …; K-th negatives]."""
        negs = [] if self.negs is None else list(self.negs.unbind(1))
        return torch.cat([self.cond, self.uncond, *negs])


def guided_eps_batch(x_t: Tensor, t: Tensor, text: TextConditioning) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs (x, t, embeds) of ONE batched ``predict_eps`` call evaluating ``text``'s blocks,
    each view at its own x_t [B, C, h, w] and t [B] (threestudio interleaves the Perp-Neg
    negatives per view but repeats x_t in blocks, its issue #456; dreamlab does not)."""
    blocks = text.num_blocks
    return x_t.repeat(blocks, 1, 1, 1), t.repeat(blocks), text.embeddings()


def combine_guided_eps(eps: Tensor, text: TextConditioning, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(ε̂, ε_cond, ε_∅) from the output ``eps`` of the ``guided_eps_batch`` call: CFG
    convention A, ε̂ = ε_∅ + s (ε_cond − ε_∅), or Perp-Neg (``perp_neg_combine``)."""
    eps_cond, eps_uncond, *eps_negs = eps.chunk(text.num_blocks)
    if text.negs is None:
        return cfg_combine(eps_uncond, eps_cond, scale), eps_cond, eps_uncond
    eps_pred = perp_neg_combine(eps_uncond, eps_cond, torch.stack(eps_negs, dim=1), text.neg_weights, scale)
    return eps_pred, eps_cond, eps_uncond


def predict_eps_guided(
    prior, x_t: Tensor, t: Tensor, text: TextConditioning, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(ε̂, ε_cond, ε_∅) at (x_t, t) for ``text``, CFG or Perp-Neg, in one batched
    ``predict_eps`` call. No gradient is tracked: call it inside ``torch.no_grad()``."""
    x, tt, emb = guided_eps_batch(x_t, t, text)
    return combine_guided_eps(prior.predict_eps(x, tt, emb.to(prior.device)), text, scale)


def validate_perp_neg_fields(cfg) -> None:
    """Checks of the Perp-Neg fields (``perp_neg``, ``perp_neg_scale``, ``perp_neg_weights``) a
    config has; nothing when it has none. Raises ValueError with a one-line message."""
    if not hasattr(cfg, "perp_neg"):
        return
    if not math.isfinite(cfg.perp_neg_scale):
        raise ValueError(f"perp_neg_scale must be finite, got {cfg.perp_neg_scale}")
    if cfg.perp_neg and cfg.view_dependent == "none":
        raise ValueError('perp_neg needs view-dependent prompts: view_dependent cannot be "none"')
    cfg.perp_neg_weights.validate()


def validate_common_fields(cfg, weightings: tuple[str, ...] = WEIGHTINGS) -> None:
    """The checks guidance configs share, each for the fields the config has: ``weighting`` (one
    of ``weightings``), ``view_dependent``, ``loss_scale``, the Perp-Neg fields, a non-empty
    ``timesteps`` range and a positive ``grad_clip`` at progress 0, 0.5 and 1. Raises ValueError
    with a one-line message."""
    from dreamlab.prompts import VIEW_MODES

    if hasattr(cfg, "weighting") and cfg.weighting not in weightings:
        raise ValueError(f"weighting must be one of {weightings}, got {cfg.weighting!r}")
    if cfg.view_dependent is not None and cfg.view_dependent not in VIEW_MODES:
        raise ValueError(f"view_dependent must be one of {VIEW_MODES} or None, got {cfg.view_dependent!r}")
    if not math.isfinite(cfg.loss_scale):
        raise ValueError(f"loss_scale must be finite, got {cfg.loss_scale}")
    validate_perp_neg_fields(cfg)
    grad_clip = getattr(cfg, "grad_clip", None)
    for progress in (0.0, 0.5, 1.0):
        cfg.timesteps.bounds(progress, 1000)  # raises if the range is empty
        if grad_clip is not None and not grad_clip(progress) > 0.0:
            raise ValueError(f"grad_clip must stay > 0, got {grad_clip(progress)} at progress {progress}")
