"""Training of the builtin prior on renders of the procedural world (``dreamlab prior train-builtin``).

Standard DDPM ε-prediction training of a small pixel-space UNet and text encoder, with
condition dropout (empty caption) for classifier-free guidance and an EMA of the weights. The
world's views are rendered once into a cache (geometry + shading + part ids; colours are drawn
per batch), then batches are drawn from it. Everything is seeded; checkpoints are atomic and a
run resumes from the newest one. The trainer is a generator of reports, like the 3D trainer.
It trains on the CPU or a CUDA GPU (``device``); batches, noise and timesteps are always drawn on
the CPU from the seeded generator, so a run sees the same data on either.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamlab.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dreamlab.export.atomic import atomic_write_text
from dreamlab.priors.builtin import (
    ASSET_DIR,
    BuiltinPrior,
    BuiltinPriorConfig,
    WordTokenizer,
    build_networks,
    unet_eps,
)
from dreamlab.world.dataset import (
    WorldBatch,
    WorldCache,
    WorldDataConfig,
    load_or_build_world_cache,
    sample_batch_detailed,
)


PRIOR_CHECKPOINT_KEYS = ("step", "unet", "text_encoder", "ema_unet", "ema_text", "optimizer", "generator")


@dataclass
class BuiltinTrainConfig:
    """How the builtin prior is trained."""

    steps: int = 6500
    """Optimisation steps (the shipped weights: 6,500; 54 minutes on 2 idle CPU cores)."""
    batch_size: int = 32
    learning_rate: float = 6e-4
    """AdamW peak learning rate (linear warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    """Exponential moving average of the weights; the EMA weights are what ships."""
    condition_dropout: float = 0.1
    """Probability of training on the empty caption (enables classifier-free guidance)."""
    min_snr_gamma: float | None = 5.0
    """Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): each sample's ε loss is scaled by min(SNR(t), γ) / SNR(t), which stops the
    easy low-noise steps from dominating and speeds convergence at the high-noise steps where shape
    and layout are decided. None = plain ε-MSE."""
    view_caption_loss_weight: float = 3.0
    """Loss weight of a sample whose caption carries a view word for an object with a front
    ("a snowman, back view"); every other sample weighs 1, and the batch loss is the weighted
    mean. The weight depends on the caption alone, so for every caption the optimum is still that
    caption's conditional mean (the data's front bias, which Janus needs, is untouched): it only
    spends more of each step on the view words, which the v2 weights (weight 1) had not learned
    (samples followed "back view" about as often as chance; docs/builtin-prior.md). v4 and v5
    used 2 (prompt and view accuracy both rose over weight 1, where 4 lost prompt accuracy on v2's
    data); the shipped v6 weights use 3, with composite_fraction 0.5."""
    precision: str = "auto"
    """Arithmetic of the forward and backward passes: "fp32", "bf16" (bfloat16 autocast; weights,
    optimiser state, EMA and loss stay fp32) or "auto" (bf16 where the device runs it natively: a
    CPU with AVX512-BF16 or AMX, or a GPU with bf16; fp32 elsewhere, where bf16 is emulated and
    slow). On the AMD EPYC a bf16 step ran 1.15x faster (0.497 vs 0.574 s, docs/benchmarks.md) and
    the default run took 56.9 instead of 61.8 min; a prior trained so (the v8 trial) matched the
    fp32-trained v6 in view and prompt accuracy and SDS quality (docs/builtin-prior.md)."""
    seed: int = 0
    checkpoint_every: int = 250
    data: WorldDataConfig = field(default_factory=WorldDataConfig)
    model: BuiltinPriorConfig = field(default_factory=BuiltinPriorConfig)

    def validate(self) -> None:
        validate_training_schedule(self)
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError("condition_dropout must lie in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must lie in [0, 1)")
        if not self.view_caption_loss_weight > 0.0:
            raise ValueError("view_caption_loss_weight must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.data.validate()


def validate_training_schedule(cfg) -> None:
    """Checks the fields every denoiser trainer's config has (this one and the image adapter's):
    steps, batch size, learning rate and the min-SNR-γ weighting."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch size must be >= 1")
    if not cfg.learning_rate > 0:
        raise ValueError("learning_rate must be > 0")
    if cfg.min_snr_gamma is not None and not cfg.min_snr_gamma > 0.0:
        raise ValueError("min_snr_gamma must be > 0 (or None for plain ε-MSE)")


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); elsewhere it is emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where ``device`` runs bfloat16 natively, else "fp32"; others unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_supported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (one line), or None when it can."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16: use --precision fp32"
    return None


def describe_device(device: torch.device) -> str:
    """Where training ran, for the model card: the GPU's name, or the CPU cores this process may use."""
    if device.type == "cuda":
        return f"a {torch.cuda.get_device_name(device)} GPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return f"a {cores}-core CPU"


@dataclass
class PriorTrainReport:
    step: int
    total_steps: int
    loss: float
    """The (weighted) training loss of this step's batch."""
    seconds: float
    checkpoint: str | None = None


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample weights min(SNR, γ) / SNR of the ε-prediction loss, SNR = ᾱ / (1 − ᾱ); ones when γ is None."""
    if gamma is None:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def caption_loss_weights(batch: WorldBatch, dropped: torch.Tensor, view_weight: float) -> torch.Tensor:
    """Per-sample loss weights [B]: ``view_weight`` where the caption the model sees (not dropped
    for classifier-free guidance) names a view of an object with a front, else 1."""
    from dreamlab.world.catalog import has_front

    fronted = torch.tensor([has_front(spec.shape) for spec in batch.specs])
    viewed = fronted & (batch.captioned_view >= 0) & ~dropped
    return torch.where(viewed, torch.tensor(float(view_weight)), torch.tensor(1.0))


def noised(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
           device: torch.device | None = None):
    """(ε, ᾱ_t [B, 1, 1, 1], x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε) with ε drawn from the CPU ``generator``
    (so a seed gives the same noise on any device), all three on ``device`` (default: x0's)."""
    noise = torch.randn(x0.shape, generator=generator)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    if device is not None:
        noise, abar, x0 = noise.to(device), abar.to(device), x0.to(device)
    return noise, abar, abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def lr_factor(step: int, cfg) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``cfg.warmup_steps``, then cosine
    decay to 10% at ``cfg.steps`` (any config with those two fields)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CheckpointedTraining:
    """Atomic checkpoints and resume for a training loop holding ``work_dir``, ``step``,
    ``generator`` and ``last_loss``: subclasses name their sub-folder, required keys and the
    objects with a ``state_dict`` (modules, optimiser) to save."""

    checkpoint_subdir: str
    checkpoint_keys: tuple[str, ...]

    def modules_to_checkpoint(self) -> dict:
        raise NotImplementedError

    def _checkpoint_dir(self) -> Path:
        return self.work_dir / self.checkpoint_subdir

    def save_checkpoint(self) -> Path:
        state = {name: module.state_dict() for name, module in self.modules_to_checkpoint().items()}
        state.update(step=self.step, generator=self.generator.get_state(), last_loss=self.last_loss)
        path = self._checkpoint_dir() / f"step_{self.step:07d}.pt"
        save_checkpoint(state, path)
        prune_checkpoints(self._checkpoint_dir(), keep=2)
        return path

    def resume(self) -> Path | None:
        """Restores the newest checkpoint; None when there is none. CheckpointError if unusable."""
        path = find_latest_checkpoint(self._checkpoint_dir())
        if path is None:
            return None
        state = load_checkpoint(path, required=self.checkpoint_keys)
        for name, module in self.modules_to_checkpoint().items():
            module.load_state_dict(state[name])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.last_loss = float(state.get("last_loss", float("nan")))
        return path


class BuiltinPriorTrainer(CheckpointedTraining):
    """Iterate to train; ``export(folder)`` writes the EMA weights as a loadable prior."""

    def __init__(self, cfg: BuiltinTrainConfig, work_dir: Path, cache: WorldCache | None = None,
                 progress=None, device: torch.device | str = "cpu") -> None:
        from dreamlab.world.catalog import VOCABULARY

        cfg.validate()
        self.device = torch.device(device)
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        self.cfg = cfg
        if (reason := autocast_supported(cfg.precision, self.device)) is not None:
            raise ValueError(reason)
        self.work_dir = Path(work_dir)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.tokenizer = WordTokenizer(VOCABULARY, cfg.model.max_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.text_encoder, self.unet, self.scheduler = build_networks(cfg.model, self.tokenizer.vocab_size)
        self.text_encoder.to(self.device)
        # channels-last convolutions: 0.51 vs 0.69 s per step on 2 CPU cores (oneDNN), same numbers.
        self.unet.to(self.device, memory_format=torch.channels_last)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.cache = cache if cache is not None else self._load_or_build_cache(progress)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.step = 0
        self.last_loss = float("nan")

    def _load_or_build_cache(self, progress) -> WorldCache:
        return load_or_build_world_cache(self.cfg.data, self.work_dir, progress)

    # ------------------------------------------------------------------ checkpoints

    checkpoint_subdir = "checkpoints"
    checkpoint_keys = PRIOR_CHECKPOINT_KEYS

    def modules_to_checkpoint(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "ema_unet": self.ema_unet,
                "ema_text": self.ema_text, "optimizer": self.optimizer}

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> PriorTrainReport:
        cfg = self.cfg
        started = time.perf_counter()
        batch = sample_batch_detailed(self.cache, cfg.data, cfg.batch_size, self.generator, threads=None)
        images = batch.images
        drop = torch.rand(len(batch.captions), generator=self.generator) < cfg.condition_dropout
        captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist())]
        weights = caption_loss_weights(batch, drop, cfg.view_caption_loss_weight)
        x0 = images * 2.0 - 1.0
        t = torch.randint(0, cfg.model.num_train_timesteps, (len(captions),), generator=self.generator)
        noise, abar, x_t = noised(self.alphas_cumprod, x0, t, self.generator, self.device)
        t, weights = t.to(self.device), weights.to(self.device)

        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step, cfg)
        self.unet.train()
        self.text_encoder.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            hidden = self.text_encoder(input_ids=self.tokenizer(captions).to(self.device)).last_hidden_state
            pred = unet_eps(self.unet, cfg.model, x_t, t, hidden)
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        per_sample = per_sample * min_snr_weights(abar.flatten(), cfg.min_snr_gamma)
        loss = (per_sample * weights).sum() / weights.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
                ema_params = list(ema.parameters())
                torch._foreach_lerp_(ema_params, [p.detach() for p in live.parameters()], 1.0 - cfg.ema_decay)
        self.step += 1
        self.last_loss = float(loss.detach())
        report = PriorTrainReport(self.step, cfg.steps, self.last_loss, time.perf_counter() - started)
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
            report.checkpoint = str(self.save_checkpoint())
        return report

    def __iter__(self) -> Iterator[PriorTrainReport]:
        while self.step < self.cfg.steps:
            yield self.train_step()

    def ema_prior(self) -> BuiltinPrior:
        """The EMA weights as a prior on the CPU (copies; training can go on)."""
        return BuiltinPrior(self.cfg.model, self.tokenizer, copy.deepcopy(self.ema_text),
                            copy.deepcopy(self.ema_unet), self.scheduler)

    def export(self, folder: Path = ASSET_DIR, training_seconds: float | None = None) -> Path:
        folder = Path(folder)
        self.ema_prior().save(folder)
        atomic_write_text(
            folder / "model_card.md",
            model_card(self.cfg, self.step, self.last_loss, training_seconds, describe_device(self.device)),
        )
        return folder


def model_card(
    cfg: BuiltinTrainConfig, trained_steps: int, final_loss: float, training_seconds: float | None,
    trained_on: str,
) -> str:
    """The model card written beside the weights (quality numbers: docs/builtin-prior.md)."""
    from dataclasses import asdict

    data = asdict(cfg.data)
    model = asdict(cfg.model)
    minutes = f"{training_seconds / 60:.1f} minutes" if training_seconds else "unknown time"
    lines = [
        "# dreamlab builtin prior",
        "",
        "A small pixel-space text-to-image diffusion model (diffusers UNet2DConditionModel +",
        "transformers CLIPTextModel, DDPM ε-prediction) trained by `dreamlab prior train-builtin`",
        "on renders of dreamlab's procedural world (`dreamlab.world`). Closed vocabulary; offline.",
        "",
        "## Training",
        f"- {trained_steps} of {cfg.steps} scheduled steps, batch {cfg.batch_size}, AdamW lr "
        f"{cfg.learning_rate} (warm-up {cfg.warmup_steps}, cosine to 10% over the scheduled steps), "
        f"weight decay {cfg.weight_decay}, EMA {cfg.ema_decay}",
        f"- condition dropout {cfg.condition_dropout} (classifier-free guidance), seed {cfg.seed}, "
        f"arithmetic {cfg.precision}",
        f"- loss: ε-MSE" + (f" with min-SNR-γ weighting, γ = {cfg.min_snr_gamma}" if cfg.min_snr_gamma else "")
        + f"; captions with a view word of an object with a front weigh {cfg.view_caption_loss_weight}",
        f"- last training loss {final_loss:.4f} (one batch; noisy); {minutes} on {trained_on}",
        "",
        "## Data (the world's bias knobs)",
        *[f"- {k}: {v}" for k, v in data.items()],
        "",
        "## Architecture",
        *[f"- {k}: {v}" for k, v in model.items()],
        "",
        "Measured quality (prompt and view accuracy of samples, SDS 3D quality): docs/builtin-prior.md.",
        "",
    ]
    return "\n".join(lines)
