"""VSD — Variational Score Distillation (ProlificDreamer; Zhengyi Wang, Cheng Lu, Yikai Wang,
Fan Bao, Chongxuan Li, Hang Su, Jun Zhu, 2023, arXiv 2305.16213).

Update rule (descent gradient on the model-space image x, e.g. the SD latent; docs/guidance-spec.md §2):

    t ~ U{t_min..t_max},  ε ~ N(0, I),  x_t = α_t x + σ_t ε
    ε_pre = ε_φ(x_t; ∅, t) + s (ε_φ(x_t; y_view, t) − ε_φ(x_t; ∅, t))         frozen prior, CFG convention A
    ε_est = ε_ψ(x_t; y, ∅_c, t) + s_ψ (ε_ψ(x_t; y, c, t) − ε_ψ(x_t; y, ∅_c, t))  LoRA model, camera CFG
    g = w(t) (ε_pre − ε_est),   w(t) = 1 − ᾱ_t

ε_ψ is a copy of the prior's U-Net with LoRA (rank 4, peft) on every attention projection
(q, k, v, out) plus a camera MLP ``TimestepEmbedding(16, D)`` whose output is added to the
U-Net's timestep embedding (threestudio sets it as the copy's ``class_embedding``; the builtin
prior's pooled-text class embedding is kept and the camera embedding added on top). The camera
condition c is the flattened 4x4 camera-to-world matrix; ∅_c is the zero 16-vector, still passed
through the MLP. The LoRA sees the view-independent prompt y; the frozen prior the view-dependent
pair. With the default s_ψ = 1 only ε_ψ(x_t; y, c) is evaluated (ε_est = ε_ψ(x_t; y, c) exactly).

After g is computed, the same call takes ONE optimiser step of ε_ψ (LoRA + camera MLP, AdamW
lr 1e-4, betas (0.9, 0.99), eps 1e-15) on its own denoising loss, on the detached latents:

    t' ~ U{0..999},  ε' ~ N(0, I),  x_t' = α_t' sg(x) + σ_t' ε'
    with probability 0.1 (one coin per call): c ← 0_cam
    L_ψ = mean ‖ε_ψ(x_t'; y, c, t') − ε'‖²      (v-prediction priors: mean ‖v̂ − v‖², v = α_t' ε' − σ_t' x)

so the trainer needs no change; the returned loss carries only the distillation gradient,
applied through the surrogate 0.5 Σ (x − sg(x − g))² / B. All randomness (t, ε, t', ε', the
dropout coin) is drawn from the caller's CPU generator; the LoRA, camera MLP, optimiser and
grad-scaler state round-trip through ``state_dict()`` / ``load_state_dict()`` so a resumed run
is bit-exact.

Particles: the paper optimises n particles θ_i (samples of μ(θ | y)) that all train one shared
ε_ψ, the score of the distribution of their renders (spec §2). ``num_particles`` N (default 1,
as ProlificDreamer's ``--n_particles``; threestudio supports only one) is read by the trainer
(``dreamlab.train``): it trains N independent 3D models, renders V views of each per step and
calls this guidance once with all N·V renders, so each particle gets the gradient above on its
own renders and the LoRA step below trains on every particle's renders. The guidance itself is
particle-agnostic (a batch is a batch). ProlificDreamer instead picks one random particle per
iteration (``set_idx()``), renders it, and trains the LoRA on that render; dreamlab updates all
particles every step, so N particles cost N times the rendering and U-Net work of one and need
no N-fold longer run (ProlificDreamer's README runs 4 particles for 4× the iterations).
Left out: ProlificDreamer's replay buffer of (latent, pose), its ``unet_bs=1`` subsampling, its
K > 1 LoRA steps per iteration and its LoRA learning-rate warm-up (threestudio has none of them).

Reference code: threestudio ``models/guidance/stable_diffusion_vsd_guidance.py``
(``compute_grad_vsd``, ``train_lora``), configs ``prolificdreamer*.yaml``; thu-ml/prolificdreamer
``nerf/sd.py``, ``nerf/utils.py``, ``lora_unet.py``. ESD (``dreamlab.guidance.esd``) extends this.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dreamlab.guidance.common import (
    GuidanceBase,
    TimestepSchedule,
    Weighting,
    alpha_sigma,
    cfg_combine,
    check_renders,
    predict_eps_cfg,
    sample_noise,
    surrogate_loss,
    weighting,
    validate_common_fields,
)
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig, ViewMode
from dreamlab.schedules import Constant, Piecewise
from dreamlab.types import Cameras, GuidanceOutput, PromptEmbeds

CameraCondition = Literal["extrinsics", "none"]
CAMERA_CONDITIONS: tuple[str, ...] = ("extrinsics", "none")
LoRAUncondPrompt = Literal["prompt", "negative"]
LORA_UNCOND_PROMPTS: tuple[str, ...] = ("prompt", "negative")
CAMERA_DIM = 16
"""Width of the camera condition: the flattened 4x4 camera-to-world matrix."""


def _vsd_timesteps() -> TimestepSchedule:
    # threestudio prolificdreamer.yaml: max_step_percent [5000, 0.98, 0.5, 5001] of 25000 steps.
    return TimestepSchedule(t_max=Piecewise((0.98, 0.5), (0.2,)))


def _lora_timesteps() -> TimestepSchedule:
    # threestudio train_lora: randint(0, 1000) -> {0..999}; ProlificDreamer: randint(0, 1000).
    return TimestepSchedule(t_min=Constant(0.0), t_max=Constant(1.0))


@dataclass
class LoRAScoreConfig:
    """Fields VSD and ESD share: the frozen prior's CFG branch, and the camera-conditioned LoRA
    score model ε_ψ trained on the renders inside every guidance call (docs/guidance-spec.md §2)."""

    guidance_scale: float = 7.5
    """CFG scale of the frozen prior, convention A (threestudio VSD and ProlificDreamer are
    already in convention A: 7.5)."""
    timesteps: TimestepSchedule = field(default_factory=_vsd_timesteps)
    """Distillation timesteps: t ~ U{20..980} until progress 0.2, then U{20..500} (threestudio:
    step 5000 of 25000; ProlificDreamer --t5_iters 5000)."""
    weighting: Weighting = "sds"
    """w(t): "sds" (1 − ᾱ_t, threestudio VSD), "uniform", "fantasia3d"."""
    view_dependent: ViewMode | None = None
    """View words in the frozen prior's conditional prompt; None = the run's
    PromptConfig.view_dependent. The LoRA always gets the plain prompt (threestudio)."""
    loss_scale: float = 1.0
    """Multiplies the distillation loss (threestudio's lambda_vsd: 1)."""
    lora_rank: int = 4
    """LoRA rank r (diffusers' LoRAAttnProcessor default, used by threestudio and ProlificDreamer).
    lora_alpha = r, so the LoRA update is B·A with no extra scale, as in LoRAAttnProcessor; A is
    initialised N(0, (1/r)²), B = 0 (peft init "gaussian" = LoRAAttnProcessor's init)."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """peft target module names: the q, k, v and output projections of every attention layer
    (self- and cross-attention), where LoRAAttnProcessor puts its LoRA layers."""
    lora_lr: float = 1e-4
    """AdamW learning rate of the LoRA and camera MLP (threestudio guidance lr; ProlificDreamer
    --unet_lr 1e-4)."""
    lora_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas (threestudio prolificdreamer.yaml)."""
    lora_eps: float = 1e-15
    """AdamW eps (threestudio prolificdreamer.yaml)."""
    lora_weight_decay: float = 0.01
    """AdamW weight decay: torch's AdamW default, which threestudio and ProlificDreamer inherit."""
    lora_timesteps: TimestepSchedule = field(default_factory=_lora_timesteps)
    """Timesteps of the LoRA's own denoising loss: U{0..999} (threestudio, ProlificDreamer)."""
    lora_n_timestamp_samples: int = 1
    """Copies of the batch, each with its own t' and ε', in one LoRA step (threestudio
    lora_n_timestamp_samples: 1)."""
    camera_condition: CameraCondition = "extrinsics"
    """Camera input of ε_ψ: "extrinsics" (flattened 4x4 camera-to-world, threestudio's default) or
    "none" (no camera MLP: ε_ψ(x_t; y))."""
    camera_dropout: float = 0.1
    """Probability that a LoRA training step sees the zero camera instead of c (one coin per call
    for the whole batch, like threestudio's lora_cfg_training=True and ProlificDreamer's
    uncond_p=0.1). It teaches ε_ψ(x_t; y, ∅_c), which the camera CFG / ESD's λ mix uses; 0 turns
    it off."""
    lora_uncond_prompt: LoRAUncondPrompt = "prompt"
    """Text of the camera-free branch ε_ψ(x_t; ·, ∅_c), used only when the LoRA's camera CFG scale
    is not 1 (ESD). "prompt" = the plain prompt y (spec §2/§3 and the ESD paper's
    ∇log q_t(x_t | y)); "negative" = the negative prompt, which is what threestudio's
    compute_grad_vsd actually feeds (its LoRA batch is [cond, uncond] text with [c, 0] cameras)."""
    num_particles: int = 1
    """Number of VSD particles N (ProlificDreamer --n_particles, default 1): the trainer trains N
    independent 3D models together, every step V views of each (the camera batch size), and
    the shared LoRA learns from all N·V renders. Costs N times one particle per step. Particle
    0 is exported into the run folder, particle k into its particle_k/ subfolder."""
    init_seed: int = 0
    """Seed of the LoRA A-matrices' and camera MLP's random initialisation (a forked CPU RNG, so
    building the guidance neither reads nor changes the global RNG)."""

    def validate(self) -> None:
        """Raises ValueError with a one-line message for impossible settings."""
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        validate_common_fields(self)
        if not (isinstance(self.lora_rank, int) and self.lora_rank >= 1):
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise ValueError(f"lora_target_modules must be non-empty module names, got {self.lora_target_modules!r}")
        if not (math.isfinite(self.lora_lr) and self.lora_lr > 0.0):
            raise ValueError(f"lora_lr must be > 0, got {self.lora_lr}")
        if len(self.lora_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.lora_betas):
            raise ValueError(f"lora_betas must be two numbers in [0, 1), got {self.lora_betas!r}")
        if not self.lora_eps > 0.0:
            raise ValueError(f"lora_eps must be > 0, got {self.lora_eps}")
        if not (math.isfinite(self.lora_weight_decay) and self.lora_weight_decay >= 0.0):
            raise ValueError(f"lora_weight_decay must be >= 0, got {self.lora_weight_decay}")
        if not (isinstance(self.lora_n_timestamp_samples, int) and self.lora_n_timestamp_samples >= 1):
            raise ValueError(f"lora_n_timestamp_samples must be an integer >= 1, got {self.lora_n_timestamp_samples!r}")
        if self.camera_condition not in CAMERA_CONDITIONS:
            raise ValueError(f"camera_condition must be one of {CAMERA_CONDITIONS}, got {self.camera_condition!r}")
        if not 0.0 <= self.camera_dropout <= 1.0:
            raise ValueError(f"camera_dropout must lie in [0, 1], got {self.camera_dropout}")
        if self.lora_uncond_prompt not in LORA_UNCOND_PROMPTS:
            raise ValueError(f"lora_uncond_prompt must be one of {LORA_UNCOND_PROMPTS}, got {self.lora_uncond_prompt!r}")
        if isinstance(self.num_particles, bool) or not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {self.num_particles!r}")
        if not isinstance(self.init_seed, int):
            raise ValueError(f"init_seed must be an integer, got {self.init_seed!r}")
        for progress in (0.0, 0.5, 1.0):
            self.lora_timesteps.bounds(progress, 1000)  # raises if the range is empty


@dataclass
class VSDConfig(LoRAScoreConfig):
    """Variational Score Distillation (ProlificDreamer; threestudio's VSD guidance). g =
    w(t)(ε̂_cfg − ε_ψ), with ε_ψ a camera-conditioned LoRA copy of the prior trained one step per
    call on the renders. The loss is a mean over the B views (gradient ``loss_scale · g / B``).

    Builtin prior (32 px pixel-space, 600-step runs): suggested, untested, ``guidance_scale=7.5``
    (as SDS; the prior preset already sets it) and ``lora_lr=1e-3``: ProlificDreamer's 1e-4 is
    tuned for 25k steps, and 600 steps give the LoRA little time to follow the renders.
    """

    guidance_scale_lora: float = 1.0
    """s_ψ: CFG scale between ε_ψ(x_t; y, c) and the camera-free ε_ψ(x_t; ·, ∅_c), convention A
    (threestudio guidance_scale_lora: 1.0, i.e. just ε_ψ(x_t; y, c); the official code has no
    CFG on the LoRA). s_ψ = 1 − λ gives ESD."""

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.guidance_scale_lora):
            raise ValueError(f"guidance_scale_lora must be finite, got {self.guidance_scale_lora}")

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> VSD:
        """The guidance object for ``prior`` (copies its U-Net and adds the LoRA)."""
        self.validate()
        return VSD(self, prior, prompt or PromptConfig())


@dataclass
class VSDAux:
    """Detached intermediates of one VSD/ESD call (tests and diagnostics)."""

    noise: Tensor  # [B, C, h, w] ε added to the latents
    eps_pretrain: Tensor  # [B, C, h, w] ε_pre: the frozen prior's ε̂ after CFG
    eps_lora: Tensor  # [B, C, h, w] ε_est: the LoRA model's ε after its camera CFG (ESD: λ mix)
    weights: Tensor  # [B] w(t)
    grad: Tensor  # [B, C, h, w] g = w(t)(ε_pre − ε_est) after nan_to_num
    lora_scale: float  # s_ψ used for ε_est
    lora_loss: Tensor  # [] the LoRA's denoising loss of this call, before its optimiser step
    lora_timesteps: Tensor  # [B · lora_n_timestamp_samples] CPU long, t' of the LoRA step
    camera_dropped: bool  # whether the LoRA step trained on the zero camera


class VSD(GuidanceBase):
    """Callable guidance: ``(rgb, cams, embeds, progress, generator) -> GuidanceOutput``.

    Owns the trainable parts: ``unet`` (a deep copy of ``prior.unet`` with peft LoRA layers),
    ``camera_mlp`` (None for camera_condition "none") and their AdamW ``optimizer``. The prior
    itself is never modified and never receives gradient.
    """

    def __init__(self, cfg: LoRAScoreConfig, prior: Prior, prompt: PromptConfig) -> None:
        super().__init__(cfg, prior, prompt)
        base = getattr(prior, "unet", None)
        if base is None or type(prior).predict_eps_with_unet is Prior.predict_eps_with_unet:
            raise ValueError(
                f"{type(self).__name__} needs a prior with a diffusers U-Net to put a LoRA on "
                f"(prior.unet and predict_eps_with_unet); {type(prior).__name__} has none"
            )
        try:
            from peft import LoraConfig
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"{type(self).__name__} needs the 'peft' package (pip install peft)") from err
        from diffusers.models.embeddings import TimestepEmbedding

        device = next(base.parameters()).device
        time_dim = int(base.time_embedding.linear_2.out_features)
        with torch.random.fork_rng(devices=[]):  # LoRA and MLP are initialised on the CPU
            torch.manual_seed(cfg.init_seed)
            unet = copy.deepcopy(base).requires_grad_(False).eval()
            lora_config = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_rank,
                target_modules=list(cfg.lora_target_modules),
                init_lora_weights="gaussian",
                lora_dropout=0.0,
            )
            try:
                unet.add_adapter(lora_config)
            except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
                raise ValueError(
                    f"lora_target_modules {cfg.lora_target_modules} matched no layer of the U-Net ({err})"
                ) from None
            camera_mlp = None
            if cfg.camera_condition == "extrinsics":
                camera_mlp = TimestepEmbedding(CAMERA_DIM, time_dim).to(device)
        # LoRA weights train in fp32 even on an fp16 U-Net (peft casts activations to them).
        self.lora_params: dict[str, torch.nn.Parameter] = {}
        for name, param in unet.named_parameters():
            if "lora_" in name:
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                param.requires_grad_(True)
                self.lora_params[name] = param
        if not self.lora_params:
            raise ValueError(f"lora_target_modules {cfg.lora_target_modules} matched no layer of the U-Net")
        self.unet = unet
        self.camera_mlp = camera_mlp
        params = list(self.lora_params.values()) + (list(camera_mlp.parameters()) if camera_mlp else [])
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lora_lr,
            betas=tuple(cfg.lora_betas),
            eps=cfg.lora_eps,
            weight_decay=cfg.lora_weight_decay,
        )
        # fp16 U-Nets (SD on CUDA): scale the LoRA loss so activation gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device.type, enabled=next(base.parameters()).dtype == torch.float16)
        self.prediction_type = getattr(prior.scheduler.config, "prediction_type", "epsilon")

    # ------------------------------------------------------------------ method hooks

    def lora_scale(self, progress: float) -> float:
        """s_ψ, the CFG scale between ε_ψ(·, c) and ε_ψ(·, ∅_c) (VSD: guidance_scale_lora)."""
        return float(self.cfg.guidance_scale_lora)

    # ------------------------------------------------------------------ the LoRA model ε_ψ

    def camera_condition(self, cams: Cameras) -> Tensor | None:
        """The camera vector c [B, 16] (flattened camera-to-world), or None without a camera MLP."""
        if self.camera_mlp is None:
            return None
        return cams.c2w.reshape(len(cams), CAMERA_DIM).to(device=self.prior.device, dtype=torch.float32)

    def lora_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None) -> Tensor:
        """ε_ψ(x_t; embeds, camera, t) [B, C, h, w] fp32; ``camera`` [B, 16] goes through the
        camera MLP (a zero row is ∅_c), None = no camera embedding. Differentiable."""
        extra = None if camera is None else self.camera_mlp(camera)
        return self.prior.predict_eps_with_unet(self.unet, x_t, t, embeds, extra)

    def lora_eps_cfg(
        self, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, camera: Tensor | None, scale: float
    ) -> Tensor:
        """ε_est = ε_ψ(x_t; uncond, ∅_c) + s_ψ (ε_ψ(x_t; cond, c) − ε_ψ(x_t; uncond, ∅_c)), in one
        batched call; with s_ψ = 1 only ε_ψ(x_t; cond, c) is evaluated (and returned exactly)."""
        if scale == 1.0:
            return self.lora_eps(x_t, t, cond, camera)
        cams = None if camera is None else torch.cat([camera, torch.zeros_like(camera)])
        eps = self.lora_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]), cams)
        eps_cond, eps_uncond = eps.chunk(2)
        return cfg_combine(eps_uncond, eps_cond, scale)

    def train_lora(
        self, latents: Tensor, embeds: Tensor, camera: Tensor | None, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, bool]:
        """One optimiser step of ε_ψ on its denoising loss at the detached ``latents``.

        Draws t' [B·n], ε' and the camera-dropout coin (in that order) from ``generator``. No step
        is taken when the loss is not finite. Returns (loss before the step, t' on the CPU,
        whether the camera was dropped).
        """
        cfg, prior = self.cfg, self.prior
        n = cfg.lora_n_timestamp_samples
        x0 = latents.detach().repeat(n, 1, 1, 1)
        t = cfg.lora_timesteps(progress, x0.shape[0], prior.num_train_timesteps, generator)
        noise = sample_noise(tuple(x0.shape), generator, x0.device)
        dropped = bool(torch.rand((), generator=generator) < cfg.camera_dropout)
        if camera is not None:
            camera = (torch.zeros_like(camera) if dropped else camera).repeat(n, 1)
        t_dev = t.to(prior.device)
        alpha, sigma = alpha_sigma(prior.alphas_cumprod, t_dev)
        with torch.enable_grad():
            x_t = alpha * x0 + sigma * noise
            eps = self.lora_eps(x_t, t_dev, embeds.repeat(n, 1, 1), camera)
            residual = eps - noise
            if self.prediction_type == "v_prediction":
                residual = residual / alpha  # ε̂ − ε = α (v̂ − v): the model's own v-loss
            loss = residual.square().mean()
        if bool(torch.isfinite(loss)):  # a non-finite render must not poison the LoRA for good
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)  # with fp16 scaling: skipped if a gradient is inf/nan
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), t, dropped

    # ------------------------------------------------------------------ the guidance call

    def __call__(
        self,
        rgb: Tensor,
        cams: Cameras,
        embeds: PromptEmbeds,
        progress: float,
        generator: torch.Generator,
    ) -> GuidanceOutput:
        """VSD loss for renders ``rgb`` [B, H, W, 3] in [0, 1] seen from ``cams``; also takes one
        LoRA step."""
        cfg, prior = self.cfg, self.prior
        batch = check_renders(rgb, cams)

        # 1. Encode the renders into the space the prior denoises (differentiable).
        latents = prior.encode_images(rgb.permute(0, 3, 1, 2))  # [B, C, h, w] fp32

        # 2. Sample t and ε from the caller's CPU generator.
        t = cfg.timesteps(progress, batch, prior.num_train_timesteps, generator).to(prior.device)
        noise = sample_noise(tuple(latents.shape), generator, latents.device)

        # 3. Text: the frozen prior gets the view-dependent prompt and the negative prompt; the
        #    LoRA gets the plain prompt y (and, for its camera-free branch, y or the negative).
        cond, uncond = self.prompt.embeds_for_cameras(embeds, cams, self.view_mode)
        plain = embeds.plain.to(prior.device).unsqueeze(0).expand(batch, -1, -1)
        lora_uncond = plain if cfg.lora_uncond_prompt == "prompt" else uncond.to(prior.device)
        camera = self.camera_condition(cams)
        scale_lora = self.lora_scale(progress)

        # 4. Noise the latents; ε_pre (frozen prior, CFG) and ε_est (LoRA, camera CFG), no gradient.
        alphas_cumprod = prior.alphas_cumprod
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        with torch.no_grad():
            x_t = alpha * latents.detach() + sigma * noise
            eps_pretrain, _, _ = predict_eps_cfg(prior, x_t, t, cond, uncond, cfg.guidance_scale)
            eps_lora = self.lora_eps_cfg(x_t, t, plain, lora_uncond, camera, scale_lora)

            # 5. g = w(t)(ε_pre − ε_est), made finite.
            w = weighting(cfg.weighting, alphas_cumprod, t)
            grad = torch.nan_to_num(w.view(-1, 1, 1, 1) * (eps_pretrain - eps_lora))

        # 6. Surrogate loss whose gradient w.r.t. the latents is loss_scale · g / B.
        loss = cfg.loss_scale * surrogate_loss(latents, grad, batch)

        # 7. One LoRA + camera-MLP step on the detached latents (ε_est above used the old weights).
        lora_loss, lora_t, dropped = self.train_lora(latents, plain, camera, progress, generator)

        return GuidanceOutput(
            loss=loss,
            timesteps=t.detach().cpu(),
            grad_norm=grad.norm(),
            aux=VSDAux(
                noise=noise,
                eps_pretrain=eps_pretrain,
                eps_lora=eps_lora,
                weights=w,
                grad=grad,
                lora_scale=scale_lora,
                lora_loss=lora_loss,
                lora_timesteps=lora_t,
                camera_dropped=dropped,
            ),
        )

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Copies of the LoRA weights, camera MLP, optimiser and grad-scaler state (tensors and
        plain values only, so checkpoints load with ``weights_only=True``)."""
        return {
            "lora": {name: p.detach().clone() for name, p in self.lora_params.items()},
            "camera_mlp": (
                {k: v.detach().clone() for k, v in self.camera_mlp.state_dict().items()}
                if self.camera_mlp is not None
                else {}
            ),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned. Raises ValueError if the LoRA layout differs."""
        lora = state["lora"]
        if set(lora) != set(self.lora_params) or any(
            tuple(lora[name].shape) != tuple(p.shape) for name, p in self.lora_params.items()
        ):
            raise ValueError(
                f"guidance state does not match this {type(self).__name__}'s LoRA layers "
                f"({len(lora)} saved vs {len(self.lora_params)} here): same lora_rank/target modules?"
            )
        with torch.no_grad():
            for name, param in self.lora_params.items():
                param.copy_(lora[name])
        if self.camera_mlp is not None:
            self.camera_mlp.load_state_dict(state["camera_mlp"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
