"""ISM — Interval Score Matching (LucidDreamer; Liang et al., 2023, arXiv 2311.11284:
"LucidDreamer: Towards High-Fidelity Text-to-3D Generation via Interval Score Matching").

Update rule (descent gradient on the model-space image x_0, e.g. the SD latent), with one
timestep t per step shared by the B views (LucidDreamer), Δt(p) the annealed interval, the
inversion stride δ_S and at most n inversion steps:

    t ~ U{t_min(p)..t_max(p)},  s = max(t − Δt(p), 0),  ε = N(0, I) + 0.1·N(0, I)[1, C, 1, 1]
    x_{τ_0} = α_{τ_0} x_0 + σ_{τ_0} ε,   τ_0 = max(s − n δ_S, 0)
    x_s     = DDIM inversion of x_{τ_0} from τ_0 to s with ε_φ(·; ∅_inv, τ_k),
              τ_{k+1} = min(τ_k + δ_S, s)                    (η = 0, ∅_inv = "" = embeds.null)
    x_t     = α_t x̂_0(x_s) + σ_t ε_s,   ε_s = ε_φ(x_s; ∅_inv, s)     (one more inversion step)
    ε̂_t     = ε_φ(x_t; ∅, t) + s_cfg (ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))   (CFG convention A,
              ∅ = the negative prompt)
    g = w(t) (ε̂_t − ε_s),   w(t) = σ_t / α_t = sqrt((1 − ᾱ_t) / ᾱ_t)

DDIM step: x_to = α_to (x_from − σ_from e) / α_from + σ_to e (``common.ddim_step``). No gradient
flows through the U-Net. g is ``nan_to_num``'d and applied through the surrogate loss, so
∂loss/∂x_0 = loss_scale · g / B. The renders of a step are horizontally flipped together with
probability 0.5 before encoding (LucidDreamer's augmentation).

Randomness, all from the caller's CPU generator, in this order: t (one draw), the flip (one
uniform, only when ``hflip_prob > 0``), ε [B, C, h, w], the offset noise [1, C, 1, 1].

Reference code: EnVision-Research/LucidDreamer ``guidance/sd_utils.py``
(``StableDiffusion.add_noise_with_cfg``, ``train_step``), ``guidance/sd_step.py`` (``ddim_step``
with a negative Δ), ``arguments/__init__.py`` (``GuidanceParams``), ``configs/*.yaml`` and
``train.py``; see docs/guidance-spec.md §5.1.

Deliberate differences from that code:

* dreamlab uses the sampled integer t directly as the noise-schedule index; LucidDreamer's
  DDIM grid maps index i to timestep i + 1 (``steps_offset``), so its t lies in [21, 980] where
  dreamlab's default lies in [20, 980], and its floor for s and τ_0 is 1 where dreamlab's is 0.
* When τ_0 = s (t ≤ Δt and no room below), LucidDreamer makes one U-Net call whose DDIM step goes
  from s to s (a no-op); dreamlab skips that call. Every step still lands on s, then on t.
* Not ported: depth-as-latent (``as_latent_ratio``; a guidance only sees the RGB render),
  ControlNet, ``fix_noise`` (off by default), ``xs_eta`` > 0 (stochastic inversion; 0 in every
  config).

Optional Perp-Neg (``perp_neg=True``; LucidDreamer ``train_step_perpneg`` with
``train.py:get_pos_neg_text_embeddings``, ``guidance/perpneg_utils.py``; spec §1.2, LucidDreamer
variant). Everything up to x_t and the target ε_φ(x_s; ∅_inv, s) is unchanged (the inversion
keeps the empty prompt, or its reverse CFG with the negative prompt); only the CFG prediction at
(x_t, t) becomes

    y_pos = r E(front) + (1 − r) E(side)   (|φ| < 90°, r = 1 − |φ|/90; negatives [front, side])
          = r E(side) + (1 − r) E(back)    (otherwise, r = 2 − |φ|/90; negatives [side, front])
    e_pos = ε_φ(x_t; y_pos, t) − ε_φ(x_t; ∅, t),   e_i = ε_φ(x_t; neg_i, t) − ε_φ(x_t; ∅, t)
    ε̂_t = ε_φ(x_t; ∅, t) + s_cfg (e_pos + Σ_i λ w_i perp(e_i, e_pos))
    perp(a, b) = a − ⟨a,b⟩/max(‖b‖², 1e−6) b          (per view, over all pixels and channels)

with LucidDreamer's weights (``LucidPerpNegWeights``, n = −2): front half
[n e^{−2r} (0 if r > 0.8), n e^{−10(1−r)} (0 if r < 0.2)], back half [n e^{−10r}/2 (0 if r > 0.8), n],
λ = ``perp_neg_scale`` (1 = LucidDreamer). No overhead view (LucidDreamer has none). One
batched call ``[y_pos; ∅; neg_1; neg_2]`` (blocks of B) at (x_t, t). LucidDreamer skips a
negative whose |w_i| ≤ 1e−4; dreamlab adds it (its weights never fall in (0, 1e−4] with λ = 1).

The inversion helpers ``ddim_move`` and ``ddim_invert`` below are pure functions that TSM
(``tsm.py``) reuses; ``TSM`` also subclasses ``ISM`` and only swaps the matching target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    LucidPerpNegWeights,
    PerpNegWeights,
    TimestepSchedule,
    alpha_sigma,
    check_renders,
    ddim_step,
    guidance_output,
    predict_eps_cfg,
    predict_eps_guided,
    sample_noise,
    validate_common_fields,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Constant, Linear, Schedule
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds

EpsFn = Callable[[Tensor, int], Tensor]
"""ε-estimate used along an inversion: ``(x [B, C, h, w] at timestep τ, τ) -> ε [B, C, h, w]``."""


# ------------------------------------------------------------------------------ pure helpers


def ddim_move(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t_from: int, t_to: int) -> Tensor:
    """Deterministic DDIM (η = 0) move of ``x`` [B, C, h, w] from integer timestep ``t_from`` to
    ``t_to`` (either direction) with noise estimate ``eps``; all views share the two timesteps."""
    device = alphas_cumprod.device
    alpha_from, sigma_from = alpha_sigma(alphas_cumprod, torch.tensor([t_from], device=device))
    alpha_to, sigma_to = alpha_sigma(alphas_cumprod, torch.tensor([t_to], device=device))
    return ddim_step(x, eps, alpha_from, sigma_from, alpha_to, sigma_to)


def inversion_grid(t_from: int, t_to: int, stride: int) -> list[int]:
    """Timesteps visited by a DDIM inversion from ``t_from`` up to ``t_to`` in steps of at most
    ``stride``: ``[t_from, t_from + stride, …, t_to]`` (the last step is shortened to land on
    ``t_to``; ``[t_from]`` alone when they are equal)."""
    if stride < 1:
        raise ValueError(f"inversion stride must be >= 1, got {stride}")
    if t_to < t_from:
        raise ValueError(f"DDIM inversion goes up in noise: {t_from} > {t_to}")
    grid = [t_from]
    while grid[-1] < t_to:
        grid.append(min(grid[-1] + stride, t_to))
    return grid


def ddim_invert(
    eps_fn: EpsFn, x: Tensor, alphas_cumprod: Tensor, t_from: int, t_to: int, stride: int
) -> Tensor:
    """DDIM inversion (LucidDreamer's ``add_noise_with_cfg``, η = 0): moves ``x`` from timestep
    ``t_from`` up to ``t_to`` along ``inversion_grid(t_from, t_to, stride)``, calling
    ``eps_fn(x, τ)`` once at every visited τ except the last (none when ``t_from == t_to``).
    Call it under ``torch.no_grad()``."""
    grid = inversion_grid(t_from, t_to, stride)
    for tau, tau_next in zip(grid, grid[1:]):
        x = ddim_move(x, eps_fn(x, tau), alphas_cumprod, tau, tau_next)
    return x


def interval_at(delta_t: Schedule, progress: float) -> int:
    """The integer interval Δt at ``progress``: ``int(Δt(p))`` like LucidDreamer (a 1e-6 guard
    keeps 80 + 20 · 0.35 = 86.99999… at 87)."""
    return int(math.floor(float(delta_t(progress)) + 1e-6))


# ------------------------------------------------------------------------------ config


def _default_timesteps() -> TimestepSchedule:
    return TimestepSchedule(t_min=Constant(0.02), t_max=Linear(0.98, 0.5, 0.0, 0.3))


@dataclass
class ISMConfig:
    """Interval Score Matching (LucidDreamer). One timestep per step shared by the views; the
    noisy point is made by DDIM inversion with the empty prompt, and the target is the model's
    own ε at the earlier point s = t − Δt of that trajectory. Gradient w.r.t. each view's latent:
    ``loss_scale · (σ_t/α_t)(ε̂_cfg(x_t) − ε_∅(x_s, s)) / B``.

    Builtin prior (32 x 32 pixel space): guidance_scale 7.5 (the default, as for SDS there) and
    the other defaults; not yet measured on it. Δt, δ_S are in training timesteps and need no
    change for a 1000-step schedule.
    """

    guidance_scale: float = 7.5
    """CFG scale, convention A (ε_∅ + s(ε_y − ε_∅)); LucidDreamer's ``guidance_scale`` 7.5 (its
    code is convention A already)."""
    timesteps: TimestepSchedule = field(default_factory=_default_timesteps)
    """Range of t (one t per step, shared by the views). Default t ~ U{20..980} annealed to
    U{20..500} over the first 30% of the run: LucidDreamer's ``t_range [0.02, 0.5]``,
    ``max_t_range 0.98``, ``warmup_iter`` 1500 of 5000 iterations (its index range [20, 979] ->
    [20, 499] is timesteps [21, 980] -> [21, 500] after its ``steps_offset`` of 1)."""
    delta_t: Schedule = field(default_factory=lambda: Linear(100.0, 80.0, 0.0, 0.3))
    """Interval Δt between s and t, in timesteps (int() of the schedule): LucidDreamer's
    ``delta_t_start`` 100 annealed to ``delta_t`` 80 over ``warmup_iter`` (1500 of 5000
    iterations); Constant(80) is ``annealing_intervals: false``. The paper's text may quote
    δ_T = 50 [UNVERIFIED]; the code's values are used."""
    xs_delta_t: int | None = 200
    """Stride δ_S of the DDIM inversion from near x_0 to x_s, in timesteps (LucidDreamer
    ``xs_delta_t`` 200); None = the current Δt."""
    xs_inv_steps: int | None = 5
    """Most inversion steps n from τ_0 = max(s − n·δ_S, 0) to s (LucidDreamer ``xs_inv_steps`` 5,
    so by default the inversion always starts at t = 0); None = start at 0, ceil(s/δ_S) steps."""
    denoise_guidance_scale: float = 1.0
    """CFG of the inversion's ε: 1 = plain ε_φ(x; "") (LucidDreamer default); > 1 = its
    "reverse CFG" ε_"" + s_d(ε_neg − ε_""), one batched call per step."""
    noise_offset: float = 0.1
    """Offset noise: ε = N(0, I) + noise_offset · N(0, I) of shape [1, C, 1, 1], the second draw
    shared by all views and pixels (LucidDreamer's hard-coded 0.1)."""
    hflip_prob: float = 0.5
    """Probability of flipping the whole batch of renders horizontally before encoding
    (LucidDreamer's ``RandomHorizontalFlip(p=0.5)``); 0 disables it and draws nothing."""
    view_dependent: ViewMode | None = "interpolated"
    """View words in the conditional prompt: LucidDreamer blends front/side/back embeddings by
    azimuth ("interpolated"); None = the run's PromptConfig.view_dependent."""
    loss_scale: float = 0.4
    """Multiplies the loss. LucidDreamer applies ``lambda_guidance`` 0.1 · g per view without
    dreamlab's 1/B, with ``C_batch_size`` 4 views: 0.1 · 4 = 0.4 gives the same step at B = 4."""
    perp_neg: bool = False
    """Perp-Neg in LucidDreamer's form (its ``train_step_perpneg``; spec §1.2 LucidDreamer
    variant), default off as in LucidDreamer's shipped configs (``perpneg: false``; its argument
    default is on): only the CFG prediction at
    (x_t, t) changes, to ε̂_t = ε_∅ + s (e_pos + Σ_i λ w_i perp(e_i, e_pos)) with the
    azimuth-interpolated positive (no overhead view) and the two pure view prompts it blends as
    negatives; the inversion and the matching target ε_φ(x_s; "", s) stay as they are. Needs
    view_dependent != "none"."""
    perp_neg_scale: float = 1.0
    """λ, multiplies the Perp-Neg weights: 1 = LucidDreamer's own weights (``negative_w`` −2,
    ``front_decay_factor`` 2, ``side_decay_factor`` 10, in ``perp_neg_weights``). Used only with
    perp_neg."""
    perp_neg_weights: LucidPerpNegWeights | PerpNegWeights = field(default_factory=LucidPerpNegWeights)
    """Perp-Neg weight functions: LucidDreamer's (default; no overhead view), or threestudio's
    ``PerpNegWeights`` (with its overhead view)."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not self.denoise_guidance_scale >= 1.0:
            raise ValueError(
                "denoise_guidance_scale must be >= 1 (1 = plain unconditional inversion), "
                f"got {self.denoise_guidance_scale}"
            )
        for name in ("xs_delta_t", "xs_inv_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, got {value!r}")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0.0):
            raise ValueError(f"noise_offset must be finite and >= 0, got {self.noise_offset}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must lie in [0, 1], got {self.hflip_prob}")
        validate_common_fields(self)
        for progress in (0.0, 0.5, 1.0):
            value = float(self.delta_t(progress))
            if not (math.isfinite(value) and interval_at(self.delta_t, progress) >= 1):
                raise ValueError(
                    f"delta_t must stay >= 1 timestep, got {value} at progress {progress}"
                )

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> ISM:
        """The guidance object for ``prior``; ``prompt`` supplies view thresholds / default mode."""
        return ISM(self, prior, prompt or PromptConfig())


@dataclass
class ISMAux:
    """Detached intermediates of one ISM call (tests and diagnostics)."""

    t: int  # timestep of the prediction (shared by the views)
    s: int  # start of the interval, max(t − Δt, 0)
    delta_t: int  # Δt used this step
    start: int  # τ_0, where the inversion began
    flipped: bool  # whether the renders were flipped horizontally
    noise: Tensor  # [B, C, h, w] ε (with its offset) used to noise x_0 to τ_0
    x_s: Tensor  # [B, C, h, w] inverted latent at s
    x_t: Tensor  # [B, C, h, w] inverted latent at t (input of the CFG prediction)
    eps_s: Tensor  # [B, C, h, w] ε_φ(x_s; ∅_inv, s)
    target: Tensor  # [B, C, h, w] what ε̂ is matched to (ISM: eps_s)
    eps_pred: Tensor  # [B, C, h, w] ε̂ after CFG at (x_t, t)
    weights: Tensor  # [B] w(t) = σ_t / α_t
    grad: Tensor  # [B, C, h, w] g = w(t)(ε̂ − target) after nan_to_num
    neg_weights: Tensor | None  # [B, 2] Perp-Neg weights λ·w_i applied (None without Perp-Neg)


# ------------------------------------------------------------------------------ guidance


class ISM(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``."""

    aux_type: type = ISMAux
    cfg: ISMConfig

    def _inversion_eps(self, null: Tensor, negative: Tensor) -> EpsFn:
        """ε used by the inversion: ε_φ(x; "", τ), or the reverse CFG ε_"" + s_d(ε_neg − ε_"")."""
        prior, scale = self.prior, self.cfg.denoise_guidance_scale

        def eps_fn(x: Tensor, tau: int) -> Tensor:
            t = torch.full((x.shape[0],), tau, dtype=torch.long, device=prior.device)
            if scale <= 1.0:
                return prior.predict_eps(x, t, null)
            return predict_eps_cfg(prior, x, t, negative, null, scale)[0]

        return eps_fn

    def _target(
        self, x_s: Tensor, eps_s: Tensor, s: int, t: int, eps_fn: EpsFn
    ) -> tuple[Tensor, dict]:
        """What ε̂(x_t) is matched to, and extra aux fields. ISM: ε_φ(x_s; ∅_inv, s)."""
        return eps_s, {}

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """ISM loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)
        num_t = prior.num_train_timesteps
        alphas_cumprod = prior.alphas_cumprod

        # 1. One t for the whole batch; the interval Δt(p), s = t − Δt, inversion start τ_0.
        t = int(cfg.timesteps(progress, 1, num_t, generator)[0])
        delta_t = interval_at(cfg.delta_t, progress)
        s = max(t - delta_t, 0)
        stride = cfg.xs_delta_t if cfg.xs_delta_t is not None else delta_t
        start = 0 if cfg.xs_inv_steps is None else max(s - stride * cfg.xs_inv_steps, 0)

        # 2. Random horizontal flip of the batch, then encode (differentiable).
        flipped = cfg.hflip_prob > 0.0 and float(torch.rand((), generator=generator)) < cfg.hflip_prob
        images = rgb.flip(2) if flipped else rgb
        latents = prior.encode_images(images.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 3. ε with offset noise (the offset is shared by all views and pixels).
        shape = tuple(latents.shape)
        noise = sample_noise(shape, generator, latents.device)
        noise = noise + cfg.noise_offset * sample_noise((1, shape[1], 1, 1), generator, latents.device)

        # 4. Embeddings: cond = prompt with view words, uncond = negative prompt (CFG),
        #    null = "" (inversion); with Perp-Neg, cond = the interpolated positive plus two
        #    weighted negatives per view (the CFG prediction only).
        text = self.text_conditioning(embeds, cams)
        null = embeds.null.unsqueeze(0).expand(batch, -1, -1).to(prior.device)
        eps_fn = self._inversion_eps(null, text.uncond)

        with torch.no_grad():
            # 5. DDIM-invert x_0 -> x_s (noised to τ_0 first), then one more step s -> t.
            start_t = torch.tensor([start], device=alphas_cumprod.device)
            alpha0, sigma0 = alpha_sigma(alphas_cumprod, start_t)
            x_start = alpha0 * latents.detach() + sigma0 * noise
            x_s = ddim_invert(eps_fn, x_start, alphas_cumprod, start, s, stride)
            eps_s = eps_fn(x_s, s)
            x_t = ddim_move(x_s, eps_s, alphas_cumprod, s, t)

            # 6. The target ε̂ is matched to (ISM: ε_s; TSM: ε at μ on a second path).
            target, extra = self._target(x_s, eps_s, s, t, eps_fn)

            # 7. ε̂ with CFG (or Perp-Neg) at (x_t, t), one batched call [cond; uncond
            #    (; 1st negatives; 2nd negatives)].
            t_batch = torch.full((batch,), t, dtype=torch.long, device=prior.device)
            eps_pred = predict_eps_guided(prior, x_t, t_batch, text, cfg.guidance_scale)[0]

            # 8. g = (σ_t / α_t)(ε̂ − target), made finite.
            alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t_batch)
            w = (sigma_t / alpha_t).view(-1)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (eps_pred - target))

        # 9. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        aux = self.aux_type(
            t=t, s=s, delta_t=delta_t, start=start, flipped=flipped, noise=noise, x_s=x_s, x_t=x_t,
            eps_s=eps_s, target=target, eps_pred=eps_pred, weights=w, grad=grad,
            neg_weights=text.neg_weights, **extra,
        )
        timesteps = torch.full((batch,), t, dtype=torch.long)
        return guidance_output(latents, grad, batch, timesteps, cfg.loss_scale, aux)
