"""Instant-NGP multiresolution hash encoding (Müller et al. 2022): the pure-PyTorch twin and the
backend switch.

Why hand-written: the reference implementation of the encoding, tiny-cuda-nn, is a CUDA-only
extension (it neither builds nor runs without a GPU), and dreamlab must train and test on CPU.
:class:`HashEncoding` is the *reference twin*: plain tensor ops, any device, any float dtype
(float64 for ``gradcheck``). On CUDA, :func:`make_hash_encoding` can instead build
:class:`~dreamlab.renderers.nerf.tcnn_backend.TcnnHashEncoding` (tiny-cuda-nn's ``HashGrid``)
when ``tinycudann`` is installed; :func:`select_backend` decides, and ``tinycudann`` is imported
lazily, only for a CUDA device, never on CPU. The two backends share the interface
(``forward``, ``output_dim``, ``active_levels`` / ``update_step``, ``level_mask``, ``params``) but
not the parameter layout: tiny-cuda-nn places grid vertices differently (``scale = N_min b^l - 1``,
positions offset by 0.5) from the paper's formulas used here, so a table written by one backend
cannot be loaded into the other.

The encoding (paper, Sec. 3, Eqs. 2-4):

* ``L`` levels, ``F`` features per level, a table of at most ``T = 2**log2_T`` entries per level.
* Level ``l`` has resolution ``N_l = floor(N_min * b**l)`` with the growth factor
  ``b = exp((ln N_max - ln N_min) / (L - 1))``; its grid has ``N_l + 1`` vertices per axis and
  an input ``x in [0, 1]^3`` is scaled to ``x * N_l``.
* A level whose dense grid fits, ``(N_l + 1)**3 <= T``, indexes its table densely
  (``i + j (N_l+1) + k (N_l+1)**2``, table of exactly ``(N_l+1)**3`` rows); a finer level uses
  the spatial hash ``(i * 1 xor j * 2654435761 xor k * 805459861) mod T``. The products are done in
  int64 (no overflow: ``N_l * 2.7e9 << 2**63``); since ``T`` is a power of two, ``mod T`` of the
  int64 result equals tiny-cuda-nn's uint32 wrap-around result.
* The 8 corner features are blended trilinearly; the levels' outputs are concatenated
  (level-major: ``[level0 f0..fF-1, level1 ...]``), giving ``L * F`` features.
* Inputs are clamped to ``[0, 1]`` (no gradient outside).
* Table entries start uniform in ``[-1e-4, 1e-4]`` (paper, Sec. 4).

Progressive unlocking (coarse-to-fine, as in threestudio's ``ProgressiveBandHashGrid`` and
Neuralangelo): only the first ``active_levels`` levels contribute, finer levels output zeros
(and so receive no gradient). :class:`LevelSchedule` maps a training step to that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dreamlab.renderers.nerf.backends import resolve_cuda_backend

ENCODING_BACKENDS = ("auto", "torch", "tcnn")
"""Backends that :func:`select_backend` accepts."""

TCNN_INSTALL = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
"""How tiny-cuda-nn's PyTorch bindings are installed (they compile against the local CUDA toolkit)."""

PRIMES = (1, 2654435761, 805459861)
"""Instant-NGP's per-axis hash primes (the first is 1 for cache coherence)."""


@dataclass(frozen=True)
class LevelSchedule:
    """How many levels are active at a training step: ``start + step // every``, at most ``L``.

    ``every = 0`` disables progressive unlocking (all levels from step 0).
    """

    start: int = 4
    every: int = 0

    def active_levels(self, step: int, num_levels: int) -> int:
        if self.every <= 0:
            return num_levels
        return max(1, min(num_levels, self.start + max(0, step) // self.every))


def growth_factor(num_levels: int, base_resolution: int, max_resolution: int) -> float:
    """``b = exp((ln N_max - ln N_min) / (L - 1))`` (1.0 for a single level)."""
    if num_levels <= 1:
        return 1.0
    return math.exp((math.log(max_resolution) - math.log(base_resolution)) / (num_levels - 1))


def level_resolutions(num_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """``N_l = floor(N_min * b**l)`` for every level (a tiny epsilon guards float round-down)."""
    b = growth_factor(num_levels, base_resolution, max_resolution)
    return [math.floor(base_resolution * b**level + 1e-9) for level in range(num_levels)]


def level_mask(
    active_levels: int,
    num_levels: int,
    features_per_level: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[L * F]`` 0/1 mask over level-major features: ones for the first ``active_levels`` levels.

    Shared by both encodings; tiny-cuda-nn has no native level masking, so
    :class:`~dreamlab.renderers.nerf.tcnn_backend.TcnnHashEncoding` multiplies its output by it.
    ``active_levels`` is clipped to ``[0, num_levels]``.
    """
    if num_levels < 1 or features_per_level < 1:
        raise ValueError("num_levels and features_per_level must be >= 1")
    n = max(0, min(int(active_levels), num_levels))
    mask = torch.zeros(num_levels, features_per_level, dtype=dtype, device=device)
    mask[:n] = 1.0
    return mask.reshape(-1)


_tcnn_problem_cache: list[str | None] = []


def _tcnn_problem() -> str | None:
    """None when ``import tinycudann`` works (tried once per process, only for a CUDA device)."""
    if not _tcnn_problem_cache:
        try:
            import tinycudann  # noqa: F401

            _tcnn_problem_cache.append(None)
        except Exception as exc:  # noqa: BLE001 - ImportError, or its EnvironmentError without CUDA
            _tcnn_problem_cache.append(
                f"tinycudann cannot be imported ({type(exc).__name__}: {exc}); install it with "
                f"'{TCNN_INSTALL}' (needs a CUDA device and the CUDA toolkit)"
            )
    return _tcnn_problem_cache[0]


def select_backend(backend: str, device: torch.device | str) -> str:
    """The one place that picks a hash-encoding backend. Logs the choice once per (request, device).

    * ``"torch"``: :class:`HashEncoding`, on any device.
    * ``"tcnn"``: tiny-cuda-nn's ``HashGrid``; needs a CUDA device and an importable ``tinycudann``.
    * ``"auto"``: ``"tcnn"`` on a CUDA device where ``tinycudann`` imports, else ``"torch"``.

    Nothing is imported for a non-CUDA device.

    Returns:
        ``"torch"`` or ``"tcnn"``.
    Raises:
        ValueError: unknown name, or ``"tcnn"`` on a non-CUDA device or without ``tinycudann``
            (the message says what to install or use instead).
    """
    return resolve_cuda_backend(
        backend,
        device,
        kind="hash-encoding",
        choices=ENCODING_BACKENDS,
        library="tcnn",
        library_label="'tcnn' (tiny-cuda-nn)",
        package="tiny-cuda-nn",
        owner="field",
        install=TCNN_INSTALL,
        problem=_tcnn_problem,
        log_label="nerf hash encoding",
    )


def check_encoding_shape(
    num_levels: int,
    features_per_level: int,
    log2_hashmap_size: int,
    base_resolution: int,
    max_resolution: int,
) -> None:
    """ValueError unless the encoding's sizes make sense (shared by both backends)."""
    if num_levels < 1 or features_per_level < 1:
        raise ValueError("num_levels and features_per_level must be >= 1")
    if not 1 <= log2_hashmap_size <= 30:
        raise ValueError(f"log2_hashmap_size must lie in [1, 30], got {log2_hashmap_size}")
    if base_resolution < 1 or max_resolution < base_resolution:
        raise ValueError("need 1 <= base_resolution <= max_resolution")


class HashEncoding(nn.Module):
    """Multiresolution hash encoding ``[N, 3] in [0, 1]^3 -> [N, L * F]`` (the torch backend).

    ``backend`` is kept for compatibility and must be ``"auto"`` or ``"torch"``: this class *is* the
    torch backend; :func:`make_hash_encoding` chooses between backends.
    """

    backend = "torch"

    def __init__(
        self,
        num_levels: int = 16,
        features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 2048,
        init_scale: float = 1e-4,
        schedule: LevelSchedule | None = None,
        backend: Literal["auto", "torch"] = "auto",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_encoding_shape(
            num_levels, features_per_level, log2_hashmap_size, base_resolution, max_resolution
        )
        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.hashmap_size = 2**log2_hashmap_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"HashEncoding is the pure-PyTorch backend; got backend={backend!r}. "
                "Use make_hash_encoding(backend, device, ...) to get tiny-cuda-nn's encoding"
            )
        self.schedule = schedule if schedule is not None else LevelSchedule()
        self.backend_request = backend
        self.resolutions = level_resolutions(num_levels, base_resolution, max_resolution)
        self.hashed: list[bool] = []
        sizes: list[int] = []
        for res in self.resolutions:
            dense = (res + 1) ** 3
            self.hashed.append(dense > self.hashmap_size)
            sizes.append(min(dense, self.hashmap_size))
        self.level_sizes = sizes
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        table = torch.rand(self.offsets[-1], features_per_level, generator=generator) * 2 - 1
        self.table = nn.Parameter((table * init_scale).to(dtype))  # [sum of level sizes, F]
        self.active_levels = self.schedule.active_levels(0, num_levels)
        # corner offsets (bit 0: x, bit 1: y, bit 2: z)
        corners = torch.tensor([[(c >> a) & 1 for a in range(3)] for c in range(8)])
        self.register_buffer("_corners", corners, persistent=False)  # [8, 3] int64

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    @property
    def params(self) -> nn.Parameter:
        """The trainable table (same name as tiny-cuda-nn's parameter vector, for param groups)."""
        return self.table

    def update_step(self, step: int) -> None:
        """Sets ``active_levels`` from the schedule for training step ``step``."""
        self.active_levels = self.schedule.active_levels(step, self.num_levels)

    def level_mask(self, active_levels: int | None = None) -> Tensor:
        """``[L * F]`` 0/1 mask: ones for the features of the first ``active_levels`` levels."""
        n = self.active_levels if active_levels is None else active_levels
        return level_mask(
            n, self.num_levels, self.features_per_level, self.table.dtype, self.table.device
        )

    def level_indices(self, level: int, corner_coords: Tensor) -> Tensor:
        """Table rows (global, offsets included) of integer grid vertices ``[..., 3]``."""
        res1 = self.resolutions[level] + 1
        if self.hashed[level]:
            idx = (
                (corner_coords[..., 0] * PRIMES[0])
                ^ (corner_coords[..., 1] * PRIMES[1])
                ^ (corner_coords[..., 2] * PRIMES[2])
            ) & (self.hashmap_size - 1)
        else:
            idx = corner_coords[..., 0] + res1 * (
                corner_coords[..., 1] + res1 * corner_coords[..., 2]
            )
        return idx + self.offsets[level]

    def forward(self, x: Tensor, active_levels: int | None = None) -> Tensor:
        """Encodes ``x`` ``[N, 3]`` (in ``[0, 1]^3``, clamped) into ``[N, L * F]``.

        Args:
            active_levels: levels that contribute (default ``self.active_levels``); the rest
                output zeros.
        """
        assert x.ndim == 2 and x.shape[1] == 3, x.shape
        n_active = self.active_levels if active_levels is None else active_levels
        x = x.to(self.table.dtype).clamp(0.0, 1.0)
        corners = self._corners.to(x.device)
        outs = []
        for level, res in enumerate(self.resolutions):
            if level >= n_active:
                outs.append(x.new_zeros(x.shape[0], self.features_per_level))
                continue
            pos = x * res
            base = pos.detach().floor().clamp(0, res - 1)
            frac = pos - base  # [N, 3], in [0, 1]
            coords = base.long()[:, None, :] + corners[None]  # [N, 8, 3]
            idx = self.level_indices(level, coords)  # [N, 8]
            # weight of corner c: prod over axes of frac (bit set) or 1 - frac (bit clear)
            w = torch.where(corners[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
            # index_select, not self.table[idx]: its backward (index_add) is deterministic on a
            # multi-threaded CPU, advanced indexing's (index_put accumulate) is not (resume tests)
            feats = self.table.index_select(0, idx.reshape(-1)).reshape(x.shape[0], 8, self.features_per_level)
            outs.append((w[..., None] * feats).sum(1))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"levels={self.num_levels}, F={self.features_per_level}, T=2^{self.log2_hashmap_size}, "
            f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, "
            f"params={self.table.numel()}"
        )


def make_hash_encoding(
    backend: str = "torch",
    device: torch.device | str = "cpu",
    *,
    num_levels: int = 16,
    features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    max_resolution: int = 2048,
    init_scale: float = 1e-4,
    schedule: LevelSchedule | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Builds the hash encoding that :func:`select_backend` picks for ``backend`` on ``device``.

    ``"torch"``: a :class:`HashEncoding` built exactly as ``HashEncoding(..., generator=generator)``
    (same random draws, so bit-identical), then moved to ``device``. ``"tcnn"``: a
    :class:`~dreamlab.renderers.nerf.tcnn_backend.TcnnHashEncoding` on ``device`` (its table drawn
    from ``generator`` too, but laid out differently). Both expose ``forward``, ``output_dim``,
    ``active_levels``, ``update_step``, ``level_mask``, ``params`` and ``backend``.
    """
    chosen = select_backend(backend, device)
    args = (num_levels, features_per_level, log2_hashmap_size, base_resolution, max_resolution)
    if chosen == "tcnn":
        from dreamlab.renderers.nerf.tcnn_backend import TcnnHashEncoding

        return TcnnHashEncoding(
            *args,
            init_scale=init_scale,
            schedule=schedule,
            dtype=dtype,
            generator=generator,
            device=device,
        )
    enc = HashEncoding(
        *args,
        init_scale=init_scale,
        schedule=schedule,
        backend="torch",
        dtype=dtype,
        generator=generator,
    )
    return enc.to(device)
