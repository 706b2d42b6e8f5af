"""Densify / prune strategy for 3D Gaussians under score distillation (3DGS's ADC, made explicit).

3DGS's adaptive density control (Kerbl et al. 2023, §5.2), with DreamGaussian's settings as the
reference point for score distillation: during a window of training progress, the view-space
(NDC) positional gradient norm of every Gaussian is accumulated over the views that see it;
every ``every`` steps Gaussians whose mean gradient exceeds a threshold are cloned (small ones)
or split into two samples drawn from themselves with scales / 1.6 (big ones), and Gaussians that
are almost transparent or too big (in the world or on screen) are pruned, never exceeding
``max_gaussians``. All state is explicit tensors (``state_dict``), the only randomness is a
generator seeded from (seed, step), so a resumed run densifies bit-exactly like an uninterrupted
one. The optimiser's rows (Adam's ``exp_avg`` / ``exp_avg_sq``) follow the Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dreamlab.renderers.gaussians.rasterize import quat_to_rotmat

if TYPE_CHECKING:  # pragma: no cover
    from dreamlab.renderers.gaussians.model import GaussianRenderer
    from dreamlab.renderers.gaussians.rasterize import RasterAux


@dataclass
class DensifyConfig:
    """When and how Gaussians are cloned, split and pruned (progress fractions are of the run)."""

    enabled: bool = True
    """Turn densification and pruning on or off."""
    start: float = 0.1
    """Progress at which gradient statistics start to accumulate."""
    stop: float = 0.7
    """Progress after which the Gaussian count stays fixed."""
    every: int = 100
    """Densify / prune every this many steps inside [start, stop]."""
    grad_threshold: float = 0.01
    """Mean view-space gradient norm (NDC units, as in 3DGS) above which a Gaussian is densified.
    3DGS uses 2e-4 for photometric losses; DreamGaussian uses 0.01 for SDS-sized gradients."""
    clone_max_scale: float = 0.02
    """Gaussians with a largest scale (world units) up to this are cloned, bigger ones split."""
    split_factor: float = 1.6
    """Scales of the two children of a split are the parent's divided by this (3DGS)."""
    min_opacity: float = 0.01
    """Prune Gaussians less opaque than this."""
    max_world_scale: float = 0.2
    """Prune Gaussians whose largest scale (world units) exceeds this (the object has radius ~0.5)."""
    max_screen_fraction: float = 0.5
    """Prune Gaussians whose 3-sigma screen radius exceeded this fraction of the image height."""
    max_gaussians: int = 50_000
    """Hard cap on the number of Gaussians; densification picks the largest gradients first."""
    seed: int = 0
    """Seed of the split samples (combined with the step)."""

    def validate(self) -> None:
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(
                f"densify window must satisfy 0 <= start <= stop <= 1, got {self.start}, {self.stop}"
            )
        if self.every < 1:
            raise ValueError(f"densify every must be >= 1 step, got {self.every}")
        if self.max_gaussians < 1:
            raise ValueError(f"max_gaussians must be >= 1, got {self.max_gaussians}")
        if self.split_factor <= 1.0:
            raise ValueError(f"split_factor must exceed 1, got {self.split_factor}")


@dataclass
class DensifyReport:
    """What one densify / prune pass did."""

    cloned: int
    split: int
    pruned: int
    before: int
    after: int


def replace_rows(
    optimizer: torch.optim.Optimizer | None,
    old: nn.Parameter,
    new_data: Tensor,
    keep: Tensor,
    num_new: int,
) -> nn.Parameter:
    """A new Parameter ``new_data`` = cat(old[keep], num_new new rows), swapped into ``optimizer``.

    Optimiser state tensors shaped like the parameter (Adam's moments) keep the rows ``keep`` and
    get zero rows for the new ones; scalar state (Adam's step) is kept. The gradient follows the
    same rule, so an optimiser step right after still updates the surviving rows.
    """
    new = nn.Parameter(new_data.detach().clone(), requires_grad=old.requires_grad)

    def rows(value: Tensor) -> Tensor:
        tail = torch.zeros(num_new, *value.shape[1:], dtype=value.dtype, device=value.device)
        return torch.cat([value.index_select(0, keep), tail], dim=0)

    if old.grad is not None:
        new.grad = rows(old.grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
        state = optimizer.state.pop(old, None)
        if state is not None:
            optimizer.state[new] = {
                key: rows(value) if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }
    return new


class DensifyStrategy:
    """Accumulates screen-space statistics and densifies / prunes a GaussianRenderer."""

    def __init__(self, cfg: DensifyConfig, num_gaussians: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.reset(num_gaussians, device)

    def reset(self, num_gaussians: int, device: torch.device | str = "cpu") -> None:
        """Zeroes the statistics for ``num_gaussians`` Gaussians."""
        self.grad_accum = torch.zeros(num_gaussians, dtype=torch.float32, device=device)  # [N]
        self.count = torch.zeros(num_gaussians, dtype=torch.float32, device=device)  # [N]
        self.max_radius = torch.zeros(num_gaussians, dtype=torch.float32, device=device)  # [N]

    def in_window(self, progress: float) -> bool:
        return self.cfg.enabled and self.cfg.start <= progress <= self.cfg.stop

    @torch.no_grad()
    def accumulate(self, aux: RasterAux, width: int, height: int) -> None:
        """Adds one render's view-space gradient norms and screen radii (call after backward)."""
        grad = aux.means2d.grad
        if grad is None or grad.shape[1] != self.grad_accum.shape[0]:
            return
        # Pixel -> NDC gradients (x_ndc spans the width in 2 units), as 3DGS's threshold expects.
        scale = torch.tensor([0.5 * width, 0.5 * height], dtype=grad.dtype, device=grad.device)
        norms = (grad * scale).norm(dim=-1)  # [B, N]
        vis = aux.visible.to(norms.dtype)
        self.grad_accum += (norms * vis).sum(0).to(self.grad_accum)
        self.count += vis.sum(0).to(self.count)
        radius = (aux.radii / height).amax(0).to(self.max_radius)
        torch.maximum(self.max_radius, radius, out=self.max_radius)

    def step(
        self,
        model: GaussianRenderer,
        aux: RasterAux | None,
        step: int,
        progress: float,
        optimizer: torch.optim.Optimizer | None,
        width: int,
        height: int,
    ) -> DensifyReport | None:
        """Per-step hook: accumulate in the window, densify / prune every ``every`` steps."""
        if not self.in_window(progress) or aux is None:
            return None
        self.accumulate(aux, width, height)
        if (step + 1) % self.cfg.every != 0:
            return None
        return self.densify_and_prune(model, optimizer, step)

    @torch.no_grad()
    def densify_and_prune(
        self, model: GaussianRenderer, optimizer: torch.optim.Optimizer | None, step: int
    ) -> DensifyReport:
        """Clones, splits and prunes ``model`` in place (and ``optimizer``'s rows); resets stats."""
        cfg = self.cfg
        n = model.size
        device = model.means.device
        avg = self.grad_accum / self.count.clamp_min(1.0)
        max_scale = torch.exp(model.log_scales).amax(1)
        opacity = torch.sigmoid(model.opacity_logits)
        prune = (
            (opacity < cfg.min_opacity)
            | (max_scale > cfg.max_world_scale)
            | (self.max_radius > cfg.max_screen_fraction)
        )
        candidates = ((avg >= cfg.grad_threshold) & ~prune).nonzero().squeeze(1)
        survivors = n - int(prune.sum())
        if survivors > cfg.max_gaussians:  # over the cap (e.g. a lowered cap): drop the faintest
            alive = (~prune).nonzero().squeeze(1)
            order = torch.argsort(opacity[alive], descending=True, stable=True)
            prune[alive[order[cfg.max_gaussians :]]] = True
            candidates = candidates[~prune[candidates]]
            survivors = cfg.max_gaussians
        budget = max(0, cfg.max_gaussians - survivors)  # each clone or split adds one Gaussian
        if candidates.numel() > budget:
            order = torch.argsort(avg[candidates], descending=True, stable=True)
            candidates = torch.sort(candidates[order[:budget]]).values
        small = max_scale[candidates] <= cfg.clone_max_scale
        clone_idx = candidates[small]
        split_idx = candidates[~small]

        removed = prune.clone()
        removed[split_idx] = True
        keep = (~removed).nonzero().squeeze(1)
        gen = torch.Generator(device="cpu").manual_seed(
            (cfg.seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)
        )
        k = split_idx.numel()
        noise = torch.randn(2, k, 3, generator=gen, dtype=torch.float32).to(device)
        params = model.gaussian_params()
        parent = split_idx.repeat(2)  # children 0..k-1 then k..2k-1
        new_values: dict[str, Tensor] = {}
        for name, p in params.items():
            extra = [p.data[clone_idx], p.data[parent]]
            if name == "means" and k > 0:
                rot = quat_to_rotmat(model.quats.data[split_idx])  # [k, 3, 3]
                std = torch.exp(model.log_scales.data[split_idx])  # [k, 3]
                offset = torch.einsum("kij,skj->ski", rot, noise.to(rot.dtype) * std[None])
                extra[1] = (p.data[split_idx][None] + offset).reshape(2 * k, 3)
            elif name == "log_scales" and k > 0:
                extra[1] = p.data[parent] - math.log(cfg.split_factor)
            new_values[name] = torch.cat([p.data[keep], *extra], dim=0)
        num_new = clone_idx.numel() + 2 * k
        for name, p in params.items():
            model.set_gaussian_param(
                name, replace_rows(optimizer, p, new_values[name], keep, num_new)
            )
        self.reset(model.size, self.grad_accum.device)
        return DensifyReport(
            cloned=int(clone_idx.numel()),
            split=int(k),
            pruned=int(prune.sum()),
            before=n,
            after=model.size,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_accum": self.grad_accum.detach().cpu().clone(),
            "count": self.count.detach().cpu().clone(),
            "max_radius": self.max_radius.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.grad_accum = state["grad_accum"].to(device=device, dtype=torch.float32).clone()
        self.count = state["count"].to(device=device, dtype=torch.float32).clone()
        self.max_radius = state["max_radius"].to(device=device, dtype=torch.float32).clone()
