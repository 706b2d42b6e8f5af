"""The NeRF field: hash encoding + small MLPs for density and albedo, normals from the density.

Density follows threestudio's ``ImplicitVolume`` geometry (its config fields
``density_activation``, ``density_bias``, ``density_blob_scale``, ``density_blob_std``):

* a pre-activation *density blob* added at every point so that training starts from a soft
  ball at the origin instead of empty space (DreamFusion, Poole et al. 2022, App. A: "we add an
  initial spatial density bias"):

  - ``"blob_magic3d"``:     ``bias(x) = scale * (1 - ||x|| / radius)`` (threestudio's default,
    positive inside the ball of ``radius``, negative outside, so the exterior starts empty);
  - ``"blob_dreamfusion"``: ``bias(x) = scale * exp(-||x||^2 / (2 radius^2))``;
  - ``"none"``.

* the activation ``sigma = softplus(raw + bias)`` (threestudio's default) or
  ``sigma = trunc_exp(raw + bias)``: ``exp`` whose backward clamps its argument at 15, from
  torch-ngp / Instant-NGP, so large pre-activations cannot blow the gradient up.

Albedo is ``sigmoid`` of a second head. Both heads read the same hash features (the density head
is a one-hidden-layer MLP as in threestudio's "VanillaMLP" with 64 neurons).

The hash encoding comes from :func:`~dreamlab.renderers.nerf.hash_encoding.make_hash_encoding`:
``encoding_backend="torch"`` (default, the pure-PyTorch twin, any device), ``"tcnn"``
(tiny-cuda-nn, CUDA only) or ``"auto"`` (tcnn on a CUDA ``device`` where it is installed, else
torch). The MLPs are plain ``torch.nn`` on every backend.

Normals are ``-grad sigma / ||grad sigma||``: autograd (``"analytic"``) or central finite
differences with step ``eps`` (``"finite_difference"``, threestudio's alternative, smoother on a
hash grid whose analytic gradient is piecewise constant per cell).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamlab.renderers.nerf.hash_encoding import LevelSchedule, make_hash_encoding


class _TruncExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """``exp(x)`` whose gradient uses ``exp(min(x, 15))``."""
    return _TruncExp.apply(x)


DensityActivation = Literal["softplus", "trunc_exp", "exp"]
DensityBias = Literal["blob_magic3d", "blob_dreamfusion", "none"]


def density_activation(raw: Tensor, kind: str) -> Tensor:
    if kind == "softplus":
        return F.softplus(raw)
    if kind == "trunc_exp":
        return trunc_exp(raw)
    if kind == "exp":
        return torch.exp(raw)
    raise ValueError(f"unknown density activation {kind!r}")


def density_blob(xyz: Tensor, kind: str, scale: float, radius: float) -> Tensor:
    """Pre-activation density bias ``[N]`` at world points ``[N, 3]`` (see module docstring)."""
    if kind == "none":
        return xyz.new_zeros(xyz.shape[0])
    r2 = (xyz * xyz).sum(-1)
    if kind == "blob_magic3d":
        return scale * (1.0 - r2.clamp_min(1e-20).sqrt() / radius)
    if kind == "blob_dreamfusion":
        return scale * torch.exp(-0.5 * r2 / radius**2)
    raise ValueError(f"unknown density bias {kind!r}")


def _mlp(n_in: int, hidden: int, layers: int, n_out: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


class NeRFField(nn.Module):
    """Density and albedo at world points in the scene box ``[-bound, bound]^3``.

    Args:
        encoding_backend: ``"torch" | "tcnn" | "auto"`` (see
            :func:`~dreamlab.renderers.nerf.hash_encoding.select_backend`); the resolved name is
            kept in ``self.encoding_backend`` (record it in checkpoints: the two backends' tables
            are laid out differently).
        device: where the field is built; ``None`` leaves it on CPU (move it with ``.to``). The
            backend is resolved for this device, so ``"tcnn"`` / ``"auto"`` need it to be CUDA.
        generator: seeds the hash table and the MLPs (the torch backend's draws are the same
            whatever ``device`` is).
    """

    def __init__(
        self,
        bound: float = 1.0,
        num_levels: int = 16,
        features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 2048,
        level_schedule: LevelSchedule | None = None,
        hidden: int = 64,
        hidden_layers: int = 1,
        activation: DensityActivation = "softplus",
        blob: DensityBias = "blob_magic3d",
        blob_scale: float = 10.0,
        blob_radius: float = 0.5,
        generator: torch.Generator | None = None,
        encoding_backend: str = "torch",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        self.bound = float(bound)
        self.activation = activation
        self.blob = blob
        self.blob_scale = float(blob_scale)
        self.blob_radius = float(blob_radius)
        self.encoding = make_hash_encoding(
            encoding_backend,
            "cpu" if device is None else device,
            num_levels=num_levels,
            features_per_level=features_per_level,
            log2_hashmap_size=log2_hashmap_size,
            base_resolution=base_resolution,
            max_resolution=max_resolution,
            schedule=level_schedule,
            generator=generator,
        )
        self.encoding_backend: str = self.encoding.backend
        n = self.encoding.output_dim
        # seeded init of the MLPs (torch's default init draws from the global RNG)
        fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            self.density_mlp = _mlp(n, hidden, hidden_layers, 1)
            self.albedo_mlp = _mlp(n, hidden, hidden_layers, 3)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Where the field's MLPs (and encoding) live."""
        return self.density_mlp[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The MLPs' dtype: what points should be cast to (the tcnn table may be float16)."""
        return self.density_mlp[0].weight.dtype

    def features(self, xyz: Tensor) -> Tensor:
        return self.encoding((xyz / self.bound + 1.0) * 0.5)

    def raw_density(self, xyz: Tensor, feats: Tensor | None = None) -> Tensor:
        """Pre-activation density ``[N]`` (blob included)."""
        if feats is None:
            feats = self.features(xyz)
        raw = self.density_mlp(feats)[:, 0]
        return raw + density_blob(xyz, self.blob, self.blob_scale, self.blob_radius).to(raw)

    def density(self, xyz: Tensor) -> Tensor:
        """``sigma >= 0`` ``[N]`` at world points ``[N, 3]``."""
        return density_activation(self.raw_density(xyz), self.activation)

    def albedo(self, xyz: Tensor, feats: Tensor | None = None) -> Tensor:
        if feats is None:
            feats = self.features(xyz)
        return torch.sigmoid(self.albedo_mlp(feats))

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        """``(sigma [N], albedo [N, 3])`` sharing one encoding pass."""
        feats = self.features(xyz)
        sigma = density_activation(self.raw_density(xyz, feats), self.activation)
        return sigma, self.albedo(xyz, feats)

    def normals(
        self,
        xyz: Tensor,
        method: Literal["analytic", "finite_difference"] = "finite_difference",
        eps: float = 1e-2,
        create_graph: bool = False,
    ) -> Tensor:
        """Unit normals ``-grad sigma / ||grad sigma||`` ``[N, 3]``."""
        if method == "analytic":
            with torch.enable_grad():
                x = xyz.detach().requires_grad_(True)
                sigma = self.density(x)
                (grad,) = torch.autograd.grad(sigma.sum(), x, create_graph=create_graph)
        elif method == "finite_difference":
            offsets = torch.eye(3, dtype=xyz.dtype, device=xyz.device) * eps  # [3, 3]
            pts = torch.cat([xyz[:, None] + offsets, xyz[:, None] - offsets], 1)  # [N, 6, 3]
            s = self.density(pts.reshape(-1, 3)).reshape(-1, 6)
            grad = (s[:, :3] - s[:, 3:]) / (2.0 * eps)
            if not create_graph:
                grad = grad.detach()
        else:
            raise ValueError(f"unknown normal method {method!r}")
        return F.normalize(-grad, dim=-1, eps=1e-12)
