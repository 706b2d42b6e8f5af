"""The interface every 3D representation implements (Gaussian splats, hash-grid NeRF).

The trainer, exporters and UI only use these verbs, so a new representation plugs in
without special cases.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dreamlab.schedules import Schedule
from dreamlab.types import Cameras, RenderOutput


@dataclass
class ParamGroup:
    """One optimiser parameter group: a name, its tensors and its learning-rate schedule."""

    name: str
    params: list[Tensor]
    lr: Schedule


class Renderer(nn.Module, abc.ABC):
    """A differentiable 3D representation centred near the origin (see dreamlab.types conventions)."""

    @abc.abstractmethod
    def render(self, cams: Cameras, background: Tensor) -> RenderOutput:
        """Renders every camera.

        Args:
            cams: B cameras (all of one image size).
            background: [B, 3] or [3] RGB in [0, 1] composited behind the object.
        """

    @abc.abstractmethod
    def param_groups(self) -> list[ParamGroup]:
        """Trainable tensors, grouped by learning rate."""

    def begin_step(self, step: int, progress: float) -> None:
        """Hook run before a training step's renders (e.g. progress-dependent shading); no-op."""

    def regularizers(self, out: RenderOutput, progress: float) -> Tensor:
        """Extra scalar loss terms for this step (already weighted); zero by default."""
        return out.rgb.new_zeros(())

    def after_backward(
        self, out: RenderOutput, step: int, progress: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Hook run after backward and before the optimiser step (densify / prune / bookkeeping).

        A renderer that changes its parameter tensors must update ``optimizer``'s param groups
        and state to match.
        """

    @abc.abstractmethod
    def density(self, xyz: Tensor) -> Tensor:
        """Volume density (opacity-like, >= 0) at world points [N, 3] -> [N]. No gradient needed."""

    @abc.abstractmethod
    def color(self, xyz: Tensor) -> Tensor:
        """View-independent albedo-like RGB in [0, 1] at world points [N, 3] -> [N, 3]."""

    @abc.abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: tensors and plain Python values only."""

    @abc.abstractmethod
    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Inverse of checkpoint_state (may resize parameters)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of primitives (Gaussians, or hash-grid parameters for a NeRF), for progress logs."""
