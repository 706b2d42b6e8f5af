"""tiny-cuda-nn's multiresolution hash grid behind :class:`HashEncoding`'s interface (CUDA only).

Built by :func:`~dreamlab.renderers.nerf.hash_encoding.make_hash_encoding` when
:func:`~dreamlab.renderers.nerf.hash_encoding.select_backend` resolves to ``"tcnn"``: a CUDA
device and an importable ``tinycudann``. This module imports nothing from tiny-cuda-nn at import
time; ``tinycudann`` is imported in :class:`TcnnHashEncoding`'s constructor, which refuses a
non-CUDA device first (tiny-cuda-nn's bindings raise on import where there is no CUDA).

What matches the torch twin: the hyper-parameters (``L`` levels, ``F`` features per level, tables
of ``2**log2_hashmap_size`` entries, ``N_min``, the same growth factor
``b = exp((ln N_max - ln N_min) / (L - 1))`` passed as tiny-cuda-nn's ``per_level_scale``),
trilinear interpolation, the level-major output layout ``[N, L * F]`` (returned as float32),
inputs clamped to ``[0, 1]^3``, the table drawn uniformly from ``[-init_scale, init_scale]`` with
the caller's generator, and progressive unlocking (``active_levels`` / ``update_step``).

What differs, inside tiny-cuda-nn's kernels:

* vertex placement: level ``l`` uses ``scale = N_min * b**l - 1`` and positions ``x * scale + 0.5``
  (so ``N_min`` counts vertices, not cells, and levels are staggered by half a cell), against the
  paper's ``x * floor(N_min * b**l)`` in the twin; the dense/hashed split and the per-level table
  sizes (padded) follow from that. The parameters are therefore **not interchangeable** with the
  twin's table: a checkpoint must record which backend wrote it (``encoding.backend``), and the
  parameter vector's length depends on the tiny-cuda-nn version;
* no native level masking: locked levels are computed and then multiplied by
  :func:`~dreamlab.renderers.nerf.hash_encoding.level_mask` (zero output, zero gradient);
* ``float64`` is not supported (parameters are float32 or float16, inputs are cast to float32).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dreamlab.renderers.nerf.hash_encoding import (
    LevelSchedule,
    _tcnn_problem,
    check_encoding_shape,
    growth_factor,
    level_mask,
)

TCNN_FEATURES_PER_LEVEL = (1, 2, 4, 8)
"""Feature counts per level that tiny-cuda-nn's grid encoding is compiled for."""


def tcnn_config(
    num_levels: int,
    features_per_level: int,
    log2_hashmap_size: int,
    base_resolution: int,
    max_resolution: int,
) -> dict:
    """tiny-cuda-nn's ``HashGrid`` encoding config with the twin's growth factor."""
    return {
        "otype": "HashGrid",
        "n_levels": int(num_levels),
        "n_features_per_level": int(features_per_level),
        "log2_hashmap_size": int(log2_hashmap_size),
        "base_resolution": int(base_resolution),
        "per_level_scale": float(growth_factor(num_levels, base_resolution, max_resolution)),
        "interpolation": "Linear",
    }


class TcnnHashEncoding(nn.Module):
    """Multiresolution hash encoding ``[N, 3] in [0, 1]^3 -> [N, L * F]`` through tiny-cuda-nn.

    Same constructor arguments and attributes as
    :class:`~dreamlab.renderers.nerf.hash_encoding.HashEncoding`, plus ``device`` (must be CUDA).
    ``dtype`` is tiny-cuda-nn's parameter precision (``torch.float32`` or ``torch.float16``); the
    output is float32 either way. ``params`` is tiny-cuda-nn's flat parameter vector (give it its
    own learning rate like the twin's ``table``).
    """

    backend = "tcnn"

    def __init__(
        self,
        num_levels: int = 16,
        features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 2048,
        init_scale: float = 1e-4,
        schedule: LevelSchedule | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cuda",
    ) -> None:
        super().__init__()
        check_encoding_shape(
            num_levels, features_per_level, log2_hashmap_size, base_resolution, max_resolution
        )
        if features_per_level not in TCNN_FEATURES_PER_LEVEL:
            raise ValueError(
                f"tiny-cuda-nn's hash grid takes features_per_level in {TCNN_FEATURES_PER_LEVEL}, "
                f"got {features_per_level}; use the 'torch' backend for other values"
            )
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"tiny-cuda-nn parameters are float32 or float16, got {dtype}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(
                f"TcnnHashEncoding needs a CUDA device, got {device.type!r}: use the 'torch' "
                "backend (HashEncoding) here"
            )
        problem = _tcnn_problem()  # one import attempt per process, one message
        if problem is not None:
            raise ValueError(f"{problem}, or use the 'torch' backend")
        import tinycudann as tcnn

        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.hashmap_size = 2**log2_hashmap_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.schedule = schedule if schedule is not None else LevelSchedule()
        self.per_level_scale = growth_factor(num_levels, base_resolution, max_resolution)
        # tiny-cuda-nn's per-level scale and vertices per axis (for extra_repr / diagnostics)
        self.grid_scales = [
            base_resolution * self.per_level_scale**level - 1.0 for level in range(num_levels)
        ]
        self.resolutions = [math.ceil(s) + 1 for s in self.grid_scales]
        self.config = tcnn_config(
            num_levels, features_per_level, log2_hashmap_size, base_resolution, max_resolution
        )
        with torch.cuda.device(device):
            self.encoding = tcnn.Encoding(3, self.config, dtype=dtype)
        if int(self.encoding.n_output_dims) != self.output_dim:
            raise RuntimeError(
                f"tiny-cuda-nn's encoding has {self.encoding.n_output_dims} outputs, "
                f"expected L * F = {self.output_dim}"
            )
        # Seeded initialisation under dreamlab's control (tiny-cuda-nn's own uses its seed).
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        params = self.encoding.params
        init = torch.rand(params.shape, generator=generator, dtype=torch.float32) * 2 - 1
        with torch.no_grad():
            params.copy_((init * init_scale).to(device=params.device, dtype=params.dtype))
        self.active_levels = self.schedule.active_levels(0, num_levels)

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    @property
    def params(self) -> nn.Parameter:
        """tiny-cuda-nn's flat parameter vector (all levels' tables)."""
        return self.encoding.params

    def update_step(self, step: int) -> None:
        """Sets ``active_levels`` from the schedule for training step ``step``."""
        self.active_levels = self.schedule.active_levels(step, self.num_levels)

    def level_mask(self, active_levels: int | None = None) -> Tensor:
        """``[L * F]`` float32 0/1 mask: ones for the features of the first ``active_levels``."""
        n = self.active_levels if active_levels is None else active_levels
        return level_mask(
            n, self.num_levels, self.features_per_level, torch.float32, self.params.device
        )

    def forward(self, x: Tensor, active_levels: int | None = None) -> Tensor:
        """Encodes ``x`` ``[N, 3]`` (in ``[0, 1]^3``, clamped) into float32 ``[N, L * F]``.

        Args:
            active_levels: levels that contribute (default ``self.active_levels``); the rest
                output zeros (tiny-cuda-nn computes them; the mask zeroes value and gradient).
        """
        assert x.ndim == 2 and x.shape[1] == 3, x.shape
        n_active = self.active_levels if active_levels is None else active_levels
        if x.shape[0] == 0:  # tiny-cuda-nn pads batches to its granularity; skip empty ones
            return torch.zeros(0, self.output_dim, dtype=torch.float32, device=x.device)
        if x.device.type != "cuda":
            raise ValueError(
                f"TcnnHashEncoding got inputs on {x.device.type!r}; it runs on CUDA tensors only"
            )
        feats = self.encoding(x.float().clamp(0.0, 1.0).contiguous()).float()
        if n_active < self.num_levels:
            feats = feats * self.level_mask(n_active).to(feats.device)
        return feats

    def extra_repr(self) -> str:
        return (
            f"tiny-cuda-nn HashGrid, levels={self.num_levels}, F={self.features_per_level}, "
            f"T=2^{self.log2_hashmap_size}, N_min={self.base_resolution}, "
            f"per_level_scale={self.per_level_scale:.6g}, params={self.params.numel()}"
        )
