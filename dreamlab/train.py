"""The training loop: a generator of StepReports that the CLI, UI, batch runner and tests consume.

One step: sample cameras and backgrounds -> render -> guidance loss (+ renderer regularisers)
-> backward -> non-finite guard -> densify/prune hook -> Adam step with scheduled learning rates.
All randomness comes from one seeded CPU ``torch.Generator`` whose state is checkpointed, so a
run resumed from a checkpoint continues bit-exactly. Cancelling is simply to stop iterating.

Particles (VSD/ESD ``num_particles`` N > 1, ProlificDreamer's ``--n_particles``): the trainer
holds N independent 3D models, each initialised from the same generator in turn. Every step
each particle draws its own cameras and backgrounds and is rendered; the guidance is called
ONCE on all N·V renders, so the shared LoRA trains on every particle's renders; the guidance
loss (a mean over the N·V views) is multiplied by N, so each particle's renders get exactly the
gradient of a one-particle run, loss_scale · g / V. Regularisers and densification act per
particle; one Adam holds every particle's parameter groups (per-parameter state, so it is N
independent Adams). ``renderer`` is particle 0 (what previews, benchmarks and single-asset
exports use). With N = 1 everything is as before, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dreamlab.cameras import evaluation_orbit, sample_orbit_cameras
from dreamlab.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dreamlab.config import RunConfig, config_to_json, fingerprint_matches, training_fingerprint
from dreamlab.priors import load_prior
from dreamlab.priors.base import Prior
from dreamlab.prompts import build_prompt_embeds
from dreamlab.renderers.base import Renderer
from dreamlab.renderers.gaussians.model import GaussianConfig, GaussianRenderer
from dreamlab.renderers.nerf.model import NeRFConfig, NeRFRenderer
from dreamlab.types import Cameras, StepReport

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU. Raises ValueError for an unusable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available: use --device cpu")
    return device


def prior_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """fp16 for the frozen prior on GPU when ``half_precision`` is set, else fp32."""
    return torch.float16 if (device.type == "cuda" and cfg.half_precision) else torch.float32


def build_renderer(cfg: RunConfig, generator: torch.Generator, device: torch.device) -> Renderer:
    """Builds the (freshly initialised) representation named by ``cfg.renderer``."""
    if isinstance(cfg.renderer, GaussianConfig):
        if cfg.renderer.init_from:
            from dreamlab.renderers.gaussians.from_density import (
                gaussians_from_renderer,
                load_renderer_from_checkpoint,
            )

            source = load_renderer_from_checkpoint(cfg.renderer.init_from)
            return gaussians_from_renderer(
                source, cfg.renderer, generator,
                resolution=cfg.renderer.init_grid_resolution,
                surface_fraction=cfg.renderer.init_surface_fraction,
            ).to(device)
        return GaussianRenderer(cfg.renderer, generator=generator).to(device)
    if isinstance(cfg.renderer, NeRFConfig):
        return NeRFRenderer(cfg.renderer, generator=generator, device=device)
    raise TypeError(f"unknown renderer config {type(cfg.renderer).__name__}")


def num_particles(cfg: RunConfig) -> int:
    """How many 3D models the run trains: the guidance's ``num_particles`` (VSD, ESD), else 1."""
    return int(getattr(cfg.guidance, "num_particles", 1))


def build_optimizer(renderer: Renderer | list[Renderer], cfg: RunConfig) -> torch.optim.Adam:
    """One Adam over the parameter groups of ``renderer`` (or of every particle, in order; their
    groups share names and learning-rate schedules)."""
    renderers = renderer if isinstance(renderer, list) else [renderer]
    groups = [
        {"params": group.params, "lr": group.lr(0.0), "name": group.name}
        for r in renderers
        for group in r.param_groups()
    ]
    return torch.optim.Adam(groups, betas=cfg.train.adam_betas, eps=cfg.train.adam_eps)


def cat_cameras(cams: list[Cameras]) -> Cameras:
    """The cameras of ``cams`` (all of one image size) as one batch, in order."""
    if len(cams) == 1:
        return cams[0]
    first = cams[0]
    assert all((c.width, c.height) == (first.width, first.height) for c in cams), "one image size"
    return Cameras(
        torch.cat([c.c2w for c in cams]),
        torch.cat([c.fov_y for c in cams]),
        first.width,
        first.height,
        torch.cat([c.elevation_deg for c in cams]),
        torch.cat([c.azimuth_deg for c in cams]),
        torch.cat([c.distance for c in cams]),
    )


def _progress(step: int, total: int) -> float:
    """Progress in [0, 1] of the step about to be taken (0-based ``step``)."""
    return 0.0 if total <= 1 else min(1.0, step / (total - 1))


class Trainer:
    """Owns the prior, the representation(s), the guidance and the optimiser of one run.

    Iterate it to train; each iteration takes one step and yields its StepReport. ``renderers``
    holds the N particles (one unless the guidance asks for more, see the module docstring);
    ``renderer`` is the first.
    """

    def __init__(
        self,
        cfg: RunConfig,
        prior: Prior | None = None,
        run_dir: Path | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)
        if prior is None:
            prior = load_prior(cfg.prior, device=self.device, dtype=prior_dtype(cfg, self.device))
        self.prior = prior
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
        self.renderers = [
            build_renderer(cfg, self.generator, self.device) for _ in range(num_particles(cfg))
        ]
        self.guidance = cfg.guidance.build(prior, cfg.prompt_processing)
        self.embeds = build_prompt_embeds(
            prior, cfg.prompt.strip(), cfg.prompt_processing.negative_prompt
        )
        self.optimizer = build_optimizer(self.renderers, cfg)
        self.step = 0
        self._schedules = {g.name: g.lr for r in self.renderers for g in r.param_groups()}
        self._preview_cams = evaluation_orbit(cfg.train.preview_resolution, num_azimuths=1)

    @property
    def renderer(self) -> Renderer:
        """The (first) particle: the run's model for previews, benchmarks and the main export."""
        return self.renderers[0]

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self) -> Path:
        assert self.run_dir is not None, "a run_dir is needed for checkpoints"
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        """Writes a checkpoint of the current step (atomically) and prunes old ones."""
        state = {
            "step": self.step,
            "config_json": config_to_json(self.cfg),
            "fingerprint": training_fingerprint(self.cfg),
            "renderer_type": type(self.renderer).__name__,
            "renderer": self.renderer.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "guidance": self.guidance_state(),
        }
        if len(self.renderers) > 1:  # particles 1..N-1 (particle 0 is "renderer", as ever)
            state["particles"] = [r.checkpoint_state() for r in self.renderers[1:]]
        path = self.checkpoint_dir() / f"step_{self.step:07d}.pt"
        save_checkpoint(state, path)
        prune_checkpoints(self.checkpoint_dir(), keep=self.cfg.train.keep_checkpoints)
        return path

    def guidance_state(self) -> dict:
        getter = getattr(self.guidance, "state_dict", None)
        return getter() if callable(getter) else {}

    def resume(self, path: Path | None = None) -> Path | None:
        """Restores the newest checkpoint (or ``path``). Returns the file used, None if none exists.

        Raises CheckpointError if the checkpoint is unreadable or belongs to a different run.
        """
        if path is None:
            if self.run_dir is None:
                return None
            path = find_latest_checkpoint(self.checkpoint_dir())
            if path is None:
                return None
        state = load_checkpoint(path)
        if not fingerprint_matches(state["fingerprint"], self.cfg):
            raise CheckpointError(
                f"{path} was written by a run with different settings (prompt, seed, steps, "
                "guidance or renderer); resume with the same settings, or use another --out"
            )
        extra = state.get("particles", [])
        if len(extra) != len(self.renderers) - 1:
            raise CheckpointError(
                f"{path} holds {len(extra) + 1} particle(s), this run has {len(self.renderers)}"
            )
        self.renderer.load_checkpoint_state(state["renderer"])
        for renderer, particle_state in zip(self.renderers[1:], extra):
            renderer.load_checkpoint_state(particle_state)
        self.optimizer = build_optimizer(self.renderers, self.cfg)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        setter = getattr(self.guidance, "load_state_dict", None)
        if callable(setter) and state.get("guidance"):
            setter(state["guidance"])
        self.step = int(state["step"])
        return path

    # ------------------------------------------------------------------ the loop

    def _backgrounds(self, batch: int) -> torch.Tensor:  # [B, 3]
        mode = self.cfg.train.background.mode
        if mode == "white":
            bg = torch.ones(batch, 3)
        elif mode == "black":
            bg = torch.zeros(batch, 3)
        elif mode == "random":
            bg = torch.rand(batch, 3, generator=self.generator)
        else:  # white-or-black
            black = torch.rand(batch, generator=self.generator) < self.cfg.train.background.black_probability
            bg = torch.where(black[:, None], torch.zeros(batch, 3), torch.ones(batch, 3))
        return bg.to(self.device)

    def _set_learning_rates(self, progress: float) -> None:
        for group in self.optimizer.param_groups:
            schedule = self._schedules.get(group["name"])
            if schedule is not None:
                group["lr"] = schedule(progress)

    def _grads_finite(self) -> bool:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return False
        return True

    def train_step(self) -> StepReport:
        cfg = self.cfg
        total = cfg.train.steps
        started = time.perf_counter()
        progress = _progress(self.step, total)
        resolution = int(cfg.train.resolution(progress))
        particles = len(self.renderers)
        views = []  # per particle: its cameras and backgrounds, drawn in particle order
        for _ in range(particles):
            cams = sample_orbit_cameras(cfg.train.cameras, resolution, self.generator).to(self.device)
            views.append((cams, self._backgrounds(len(cams))))

        self.optimizer.zero_grad(set_to_none=True)
        for renderer in self.renderers:
            renderer.begin_step(self.step, progress)
        outs = [r.render(cams, background) for r, (cams, background) in zip(self.renderers, views)]
        if particles == 1:
            rgb, cams = outs[0].rgb, views[0][0]
        else:  # one guidance call on every particle's renders (the shared LoRA sees them all)
            rgb, cams = torch.cat([o.rgb for o in outs]), cat_cameras([c for c, _ in views])
        guided = self.guidance(rgb, cams, self.embeds, progress, self.generator)
        # The guidance loss is a mean over all N·V views: × N gives each particle's renders the
        # gradient of a one-particle run.
        loss = guided.loss if particles == 1 else particles * guided.loss
        for renderer, out in zip(self.renderers, outs):
            loss = loss + renderer.regularizers(out, progress)

        message = None
        skipped = not bool(torch.isfinite(loss))
        if not skipped:
            loss.backward()
            skipped = not self._grads_finite()
        if skipped:
            message = f"step {self.step + 1}: non-finite loss or gradient, update skipped"
            log.warning(message)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for renderer, out in zip(self.renderers, outs):
                renderer.after_backward(out, self.step, progress, self.optimizer)
            self._set_learning_rates(progress)
            snapshot = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
            self.optimizer.step()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if not all(bool(torch.isfinite(p).all()) for p in params):
                with torch.no_grad():
                    for p, old in zip(params, snapshot):
                        p.copy_(old)
                skipped = True
                message = f"step {self.step + 1}: update produced non-finite parameters, reverted"
                log.warning(message)
        self.step += 1

        report = StepReport(
            step=self.step,
            total_steps=total,
            loss=float(loss.detach()) if math.isfinite(float(loss.detach())) else float("nan"),
            skipped=skipped,
            num_gaussians=sum(r.size for r in self.renderers),
            resolution=resolution,
            seconds=time.perf_counter() - started,
            timesteps=[int(t) for t in guided.timesteps.flatten().tolist()],
            message=message,
        )
        every = cfg.train.checkpoint_every
        if self.run_dir is not None and (self.step == total or (every and self.step % every == 0)):
            report.checkpoint = str(self.save())
        pe = cfg.train.preview_every
        if pe and (self.step % pe == 0 or self.step == total):
            report.preview = self.preview()
        return report

    @torch.no_grad()
    def preview(self) -> torch.Tensor:  # [H, W, 3]
        """Front view of particle 0 on white."""
        bg = torch.ones(1, 3, device=self.device)
        return self.renderer.render(self._preview_cams.to(self.device), bg).rgb[0].cpu()

    def __iter__(self) -> Iterator[StepReport]:
        while self.step < self.cfg.train.steps:
            yield self.train_step()


def train(cfg: RunConfig, prior: Prior | None = None, run_dir: Path | None = None) -> Iterator[StepReport]:
    """Trains from scratch and yields one StepReport per step (see Trainer for resuming)."""
    yield from Trainer(cfg, prior=prior, run_dir=run_dir)
