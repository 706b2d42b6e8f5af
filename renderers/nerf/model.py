"""A hash-grid NeRF (Instant-NGP encoding, DreamFusion-style density blob) as a dreamlab Renderer.

Pieces: :class:`~dreamlab.renderers.nerf.field.NeRFField` (hash encoding + density / albedo MLPs),
:func:`~dreamlab.renderers.nerf.render.render_cameras` (volume rendering in the box
``[-bound, bound]^3``) and :class:`~dreamlab.renderers.nerf.render.OccupancyGrid` (empty-space
skipping, refreshed in :meth:`NeRFRenderer.after_backward`).

Shading (DreamFusion, Poole et al. 2022, Sec. 3.1; threestudio's ``DiffuseWithPointLightMaterial``
defaults): each sample's colour is

* ``albedo``: the albedo ``a``;
* ``lambertian``: ``a * (ambient + diffuse * max(0, n . l))`` with ``n`` the field normal at the
  sample and ``l`` the unit vector to a point light;
* ``textureless``: the same with ``a = 1`` (white), which shows geometry only;
* ``random``: per training step, albedo with probability ``1 - lambertian_probability`` (always
  before ``shading_start`` progress), else lit, and then textureless with probability
  ``textureless_probability``. Renders without gradients (previews, export, benchmarks) use albedo.

The point light is drawn per training step near the camera, as DreamFusion does: its direction is
the camera position plus Gaussian noise (std ``light_jitter`` times the camera distance),
normalised; its distance is ``light_distance`` times the camera distance.

Backgrounds: ``given`` composites over the trainer's background (white / black / random colour,
``TrainConfig.background``); ``mlp`` learns DreamFusion's small environment MLP of the view
direction (Fourier features, one hidden layer, sigmoid) and uses it while training; renders
without gradients composite over the given background so exports and previews stay clean.

Regularisers (weights 0 = off): ``lambda_sparsity`` mean accumulated alpha (DreamFusion's opacity
penalty); ``lambda_opaque`` the binary entropy of the accumulated alpha (threestudio's
``lambda_opaque``: alpha pushed to 0 or 1); ``lambda_orientation`` Ref-NeRF's orientation loss
``sum_i w_i max(0, n_i . d)^2`` (normals facing away from the camera are penalised), averaged over
rays. Normals are central finite differences of the density (``NeRFField.normals``), which costs
six extra density evaluations per sample: shading and the orientation loss are off by default on
CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dreamlab.renderers.base import ParamGroup, Renderer
from dreamlab.renderers.nerf.field import NeRFField
from dreamlab.renderers.nerf.hash_encoding import LevelSchedule
from dreamlab.renderers.nerf.nerfacc_backend import (
    NerfaccGrid,
    PackedVolumeAux,
    render_cameras_nerfacc,
    resolve_sampler_backend,
    step_size_for,
)
from dreamlab.renderers.nerf.render import OccupancyGrid, VolumeAux, camera_rays, render_cameras
from dreamlab.schedules import Constant, Schedule
from dreamlab.types import Cameras, RenderOutput


@dataclass
class NeRFConfig:
    """Hash-grid NeRF: encoding, MLPs, density initialisation, sampling and learning rates."""

    bound: float = 1.0
    """The scene box is ``[-bound, bound]^3``."""
    num_levels: int = 16
    """Hash-encoding levels L (Instant-NGP / threestudio: 16)."""
    features_per_level: int = 2
    """Features per level F."""
    log2_hashmap_size: int = 19
    """Table size per level ``T = 2**log2_hashmap_size``."""
    base_resolution: int = 16
    """Coarsest grid resolution N_min."""
    max_resolution: int = 2048
    """Finest grid resolution N_max."""
    level_start: int = 4
    """Progressive unlocking: levels active at step 0 (with ``level_every > 0``)."""
    level_every: int = 0
    """Progressive unlocking: one more level every this many steps (0: all levels from the start)."""
    hidden: int = 64
    """Neurons per hidden layer of the density and albedo MLPs."""
    hidden_layers: int = 1
    """Hidden layers of each MLP."""
    density_activation: Literal["softplus", "trunc_exp", "exp"] = "softplus"
    """sigma = activation(raw + blob)."""
    density_blob: Literal["blob_magic3d", "blob_dreamfusion", "none"] = "blob_magic3d"
    """Initial density bias (see dreamlab.renderers.nerf.field)."""
    blob_scale: float = 10.0
    """Blob strength (pre-activation density at the origin)."""
    blob_radius: float = 0.5
    """Blob radius (magic3d: zero crossing; dreamfusion: Gaussian std)."""
    num_samples: int = 64
    """Samples per ray (stratified while training)."""
    near_plane: float = 0.01
    """Samples closer than this to the camera are skipped."""
    occupancy_grid: bool = True
    """Skip empty space with a coarse density grid."""
    grid_resolution: int = 32
    """Occupancy-grid cells per axis."""
    grid_threshold: float = 0.01
    """A cell is occupied when its density EMA exceeds min(this, mean EMA)."""
    grid_decay: float = 0.95
    """Per-update decay of the density EMA."""
    grid_update_every: int = 16
    """Steps between occupancy-grid refreshes."""
    shading: Literal["albedo", "lambertian", "textureless", "random"] = "albedo"
    """Training-time shading (see the module docstring); albedo needs no normals (fastest)."""
    lambertian_probability: float = 0.75
    """With shading=random: probability of a lit (lambertian or textureless) step."""
    textureless_probability: float = 0.5
    """With shading=random: probability that a lit step is textureless."""
    shading_start: float = 0.0
    """With shading=random: training progress (0..1) before which every step uses albedo."""
    ambient: float = 0.1
    """Ambient light intensity (threestudio: 0.1)."""
    diffuse: float = 0.9
    """Point-light intensity (threestudio: 0.9)."""
    light_distance: tuple[float, float] = (0.8, 1.5)
    """Point-light distance range, in camera distances (threestudio: 0.8-1.5)."""
    light_jitter: float = 1.0
    """Std of the noise added to the camera direction to place the light, in camera distances."""
    normal_eps: float = 0.01
    """Finite-difference step for normals (world units)."""
    background: Literal["given", "mlp"] = "given"
    """given: the trainer's background; mlp: a learned environment MLP of the view direction."""
    background_frequencies: int = 4
    """Fourier frequency bands of the environment MLP's direction input."""
    lr_background: Schedule = field(default_factory=lambda: Constant(1e-3))
    """Learning rate of the environment MLP."""
    lambda_sparsity: float = 0.0
    """Weight of the mean accumulated alpha (DreamFusion's opacity penalty), 0: off."""
    lambda_opaque: float = 0.0
    """Weight of the binary entropy of the accumulated alpha, 0: off."""
    lambda_orientation: float = 0.0
    """Weight of Ref-NeRF's orientation loss (needs normals: 6 extra density evaluations), 0: off."""
    encoding_backend: Literal["auto", "torch", "tcnn"] = "auto"
    """Hash encoding: auto (tiny-cuda-nn on CUDA when installed, else the pure-PyTorch twin),
    torch, tcnn. Chosen when the renderer is built; checkpoints are not portable across them."""
    sampler_backend: Literal["auto", "torch", "nerfacc"] = "auto"
    """Ray marching: auto (nerfacc's occupancy-grid estimator on CUDA when installed, else
    dreamlab's torch sampler), torch, nerfacc (marches with step 2*bound/num_samples)."""
    lr_encoding: Schedule = field(default_factory=lambda: Constant(1e-2))
    """Learning rate of the hash tables (threestudio's DreamFusion recipe: 1e-2)."""
    lr_mlp: Schedule = field(default_factory=lambda: Constant(1e-3))
    """Learning rate of the MLPs (threestudio: 1e-3)."""

    def validate(self) -> None:
        if self.bound <= 0:
            raise ValueError(f"bound must be positive, got {self.bound}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_levels < 1 or self.features_per_level < 1:
            raise ValueError("num_levels and features_per_level must be >= 1")
        if not 1 <= self.base_resolution <= self.max_resolution:
            raise ValueError("need 1 <= base_resolution <= max_resolution")
        if self.grid_resolution < 1:
            raise ValueError(f"grid_resolution must be >= 1, got {self.grid_resolution}")
        for name in ("lambda_sparsity", "lambda_opaque", "lambda_orientation", "ambient", "diffuse"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"nerf {name} must be >= 0, got {getattr(self, name)}")
        for name in ("lambertian_probability", "textureless_probability", "shading_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"nerf {name} must lie in [0, 1], got {getattr(self, name)}")
        low, high = self.light_distance
        if not 0 < low <= high:
            raise ValueError(f"nerf light_distance must be (low, high) with 0 < low <= high, got {self.light_distance}")
        if self.normal_eps <= 0 or self.light_jitter < 0:
            raise ValueError("nerf normal_eps must be > 0 and light_jitter >= 0")
        if self.background_frequencies < 0:
            raise ValueError("nerf background_frequencies must be >= 0")


class EnvironmentMLP(nn.Module):
    """DreamFusion's background: RGB of the view direction (Fourier features -> MLP -> sigmoid)."""

    def __init__(self, frequencies: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.frequencies = int(frequencies)
        n_in = 3 + 6 * self.frequencies
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward(self, dirs: Tensor) -> Tensor:
        feats = [dirs]
        for k in range(self.frequencies):
            feats += [torch.sin((2.0**k) * math.pi * dirs), torch.cos((2.0**k) * math.pi * dirs)]
        return torch.sigmoid(self.mlp(torch.cat(feats, -1)))


@dataclass
class ShadingAux:
    """Per-step shading choice and the normals of the evaluated samples (for regularisers)."""

    mode: str  # albedo / lambertian / textureless
    lights: Tensor | None  # [B, 3] world light positions, when lit
    orientation: Tensor | None  # Ref-NeRF orientation loss (mean over rays), when normals exist


class NeRFRenderer(Renderer):
    """Density + albedo hash-grid field rendered by volume rendering."""

    def __init__(
        self,
        cfg: NeRFConfig | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """Builds the field on ``device`` (the GPU backends are chosen for it, so build there
        rather than moving a CPU-built renderer)."""
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else NeRFConfig()
        cfg.validate()
        device = torch.device(device)
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        self.field = NeRFField(
            bound=cfg.bound,
            num_levels=cfg.num_levels,
            features_per_level=cfg.features_per_level,
            log2_hashmap_size=cfg.log2_hashmap_size,
            base_resolution=cfg.base_resolution,
            max_resolution=cfg.max_resolution,
            level_schedule=LevelSchedule(cfg.level_start, cfg.level_every),
            hidden=cfg.hidden,
            hidden_layers=cfg.hidden_layers,
            activation=cfg.density_activation,
            blob=cfg.density_blob,
            blob_scale=cfg.blob_scale,
            blob_radius=cfg.blob_radius,
            generator=generator,
            encoding_backend=cfg.encoding_backend,
            device=device,
        )
        self.sampler_backend = resolve_sampler_backend(cfg.sampler_backend, device)
        self.grid: OccupancyGrid | NerfaccGrid | None
        if self.sampler_backend == "nerfacc":  # nerfacc always marches through a grid
            every = cfg.grid_update_every if cfg.occupancy_grid else 0
            self.grid = NerfaccGrid(
                cfg.grid_resolution, cfg.bound, cfg.grid_threshold, cfg.grid_decay, every,
                device=device,
            )
        elif cfg.occupancy_grid:
            self.grid = OccupancyGrid(
                cfg.grid_resolution, cfg.bound, cfg.grid_threshold, cfg.grid_decay,
                cfg.grid_update_every,
            ).to(device)
        else:
            self.grid = None
        # stratified-sampling / grid-jitter / light randomness, saved in checkpoints
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.sample_generator = torch.Generator(device="cpu").manual_seed(seed)
        self.environment = None
        if cfg.background == "mlp":
            fork = torch.random.fork_rng(devices=[])
            with fork:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                self.environment = EnvironmentMLP(cfg.background_frequencies).to(device)
        self.progress = 0.0

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> list[ParamGroup]:
        mlp = list(self.field.density_mlp.parameters()) + list(self.field.albedo_mlp.parameters())
        groups = [
            ParamGroup("encoding", [self.field.encoding.params], self.cfg.lr_encoding),
            ParamGroup("mlp", mlp, self.cfg.lr_mlp),
        ]
        if self.environment is not None:
            groups.append(
                ParamGroup("background", list(self.environment.parameters()), self.cfg.lr_background)
            )
        return groups

    def begin_step(self, step: int, progress: float) -> None:
        self.progress = float(progress)

    def _shading_mode(self) -> str:
        """This training step's shading (draws from the sample generator for ``random``)."""
        cfg = self.cfg
        if cfg.shading != "random":
            return cfg.shading
        u = torch.rand(2, generator=self.sample_generator)
        if self.progress < cfg.shading_start or float(u[0]) >= cfg.lambertian_probability:
            return "albedo"
        return "textureless" if float(u[1]) < cfg.textureless_probability else "lambertian"

    def _light_positions(self, cams: Cameras) -> Tensor:
        """[B, 3] point lights near each camera (see the module docstring)."""
        cfg = self.cfg
        centres = cams.c2w[:, :3, 3]
        dist = centres.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        noise = torch.randn(centres.shape, generator=self.sample_generator).to(centres)
        direction = torch.nn.functional.normalize(centres + cfg.light_jitter * dist * noise, dim=-1)
        low, high = cfg.light_distance
        scale = low + (high - low) * torch.rand(len(cams), 1, generator=self.sample_generator)
        return direction * dist * scale.to(centres)

    def render(self, cams: Cameras, background: Tensor) -> RenderOutput:
        """Renders every camera (stratified samples while training with gradients enabled)."""
        device, dtype = self.field.device, self.field.dtype
        cams = cams.to(device)
        if cams.c2w.dtype != dtype:
            cams = Cameras(
                cams.c2w.to(dtype),
                cams.fov_y.to(dtype),
                cams.width,
                cams.height,
                cams.elevation_deg,
                cams.azimuth_deg,
                cams.distance,
            )
        cfg = self.cfg
        training = self.training and torch.is_grad_enabled()
        mode = self._shading_mode() if training else "albedo"
        need_normals = training and (mode != "albedo" or cfg.lambda_orientation > 0)
        lights = self._light_positions(cams) if mode != "albedo" else None
        background = background.to(device=device, dtype=dtype)
        if training and self.environment is not None:
            background = self.environment(camera_rays(cams)[1])  # [B, H, W, 3]
        generator = self.sample_generator if training else None
        if not need_normals:
            rgb, alpha, depth, aux = self._volume_render(self.field, cams, background, generator)
            aux.shading = ShadingAux(mode, lights, None)
            return RenderOutput(rgb=rgb.clamp(0.0, 1.0), alpha=alpha, depth=depth, aux=aux)

        # Normals needed: one volume render per camera, so that each has its own light.
        if background.ndim == 1:
            background = background.expand(len(cams), 3)
        images, alphas, depths, auxes, orientation = [], [], [], [], []
        for b in range(len(cams)):
            cam = cams[b : b + 1]
            light = None if lights is None else lights[b]
            normals: list[Tensor] = []
            rgb, alpha, depth, aux = self._volume_render(
                self._shaded_field(mode, light, normals), cam, background[b : b + 1], generator
            )
            ray_index, weights = _evaluated_samples(aux)
            dirs = camera_rays(cam)[1].reshape(-1, 3)[ray_index]
            facing = (normals[0] * dirs).sum(-1).clamp_min(0.0) ** 2  # [M]
            rays = cam.height * cam.width
            per_ray = weights.new_zeros(rays).index_add(0, ray_index, weights * facing)
            orientation.append(per_ray.mean())
            images.append(rgb), alphas.append(alpha), depths.append(depth), auxes.append(aux)
        out_aux = auxes[0] if len(auxes) == 1 else _concat_aux(auxes, cams.height * cams.width)
        out_aux.shading = ShadingAux(mode, lights, torch.stack(orientation).mean())
        return RenderOutput(
            rgb=torch.cat(images).clamp(0.0, 1.0),
            alpha=torch.cat(alphas),
            depth=torch.cat(depths),
            aux=out_aux,
        )

    def _volume_render(self, field_fn, cams: Cameras, background: Tensor, generator):
        """Volume rendering with the configured sampler (torch fixed intervals, or nerfacc)."""
        cfg = self.cfg
        if self.sampler_backend == "nerfacc":
            return render_cameras_nerfacc(
                field_fn, cams, background, self.grid, step_size_for(cfg.num_samples, cfg.bound),
                bound=cfg.bound, near=cfg.near_plane, generator=generator,
                density_fn=self.field.density,
            )
        return render_cameras(
            field_fn, cams, background, num_samples=cfg.num_samples, bound=cfg.bound,
            near=cfg.near_plane, grid=self.grid, generator=generator,
        )

    def _shaded_field(self, mode: str, light: Tensor | None, normals_out: list[Tensor]):
        """A field function ``pts -> (sigma, shaded rgb)`` that also records the normals."""
        cfg = self.cfg

        def field_fn(pts: Tensor) -> tuple[Tensor, Tensor]:
            sigma, albedo = self.field(pts)
            normals = self.field.normals(pts, "finite_difference", cfg.normal_eps, create_graph=True)
            normals_out.append(normals)
            if mode == "albedo":
                return sigma, albedo
            to_light = torch.nn.functional.normalize(light - pts, dim=-1)
            lit = cfg.ambient + cfg.diffuse * (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)
            base = albedo if mode == "lambertian" else torch.ones_like(albedo)
            return sigma, base * lit

        return field_fn

    def regularizers(self, out: RenderOutput, progress: float) -> Tensor:
        cfg = self.cfg
        loss = out.rgb.new_zeros(())
        if cfg.lambda_sparsity > 0:
            loss = loss + cfg.lambda_sparsity * out.alpha.mean()
        if cfg.lambda_opaque > 0:
            a = out.alpha.clamp(1e-5, 1.0 - 1e-5)
            entropy = -(a * torch.log(a) + (1.0 - a) * torch.log(1.0 - a))
            loss = loss + cfg.lambda_opaque * entropy.mean()
        shading = getattr(out.aux, "shading", None)
        if cfg.lambda_orientation > 0 and shading is not None and shading.orientation is not None:
            loss = loss + cfg.lambda_orientation * shading.orientation
        return loss

    def after_backward(
        self, out: RenderOutput, step: int, progress: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Advances the level schedule and refreshes the occupancy grid on its schedule."""
        self.field.encoding.update_step(step + 1)
        if self.grid is not None:
            self.grid.maybe_update(step, self.field.density, self.sample_generator)

    @torch.no_grad()
    def _chunked(self, fn, xyz: Tensor, chunk: int = 65536) -> Tensor:
        pts = xyz.to(device=self.field.device, dtype=self.field.dtype)
        out = torch.cat([fn(pts[s : s + chunk]) for s in range(0, max(len(pts), 1), chunk)])
        return out[: len(pts)].to(dtype=xyz.dtype, device=xyz.device)

    def density(self, xyz: Tensor) -> Tensor:
        """sigma ``[N]`` at world points ``[N, 3]`` (0 outside the scene box)."""
        inside = (xyz.abs() <= self.cfg.bound).all(-1)
        return self._chunked(self.field.density, xyz) * inside.to(xyz.dtype)

    def color(self, xyz: Tensor) -> Tensor:
        """Albedo ``[N, 3]`` at world points ``[N, 3]``."""
        return self._chunked(self.field.albedo, xyz)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "active_levels": int(self.field.encoding.active_levels),
            "sample_generator": self.sample_generator.get_state(),
            "encoding_backend": self.field.encoding_backend,
            "sampler_backend": self.sampler_backend,
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("encoding_backend", self.field.encoding_backend),
            ("sampler_backend", self.sampler_backend),
        ):
            theirs = state.get(key, "torch")
            if theirs != mine:
                raise ValueError(
                    f"this NeRF checkpoint was written with the {theirs!r} {key.replace('_', ' ')} "
                    f"and this renderer uses {mine!r}; their parameters are not interchangeable: "
                    f"resume on a machine where {key.split('_')[0]} backend {theirs!r} is available "
                    f"(or set --nerf.{key.replace('_', '-')} {theirs})"
                )
        self.load_state_dict(state["state_dict"])
        self.field.encoding.active_levels = int(state["active_levels"])
        self.sample_generator.set_state(state["sample_generator"])


def _evaluated_samples(aux: VolumeAux | PackedVolumeAux) -> tuple[Tensor, Tensor]:
    """(ray index ``[M]``, compositing weight ``[M]``) of the evaluated samples, in the order the
    field saw them (both samplers evaluate in ray-major order)."""
    if isinstance(aux, PackedVolumeAux):
        return aux.ray_indices, aux.weights
    return aux.sample_mask.nonzero()[:, 0], aux.weights[aux.sample_mask]


def _concat_aux(auxes: list, rays_per_camera: int):
    """One aux for per-camera renders (ray indices of camera b shifted by b * H * W)."""
    if isinstance(auxes[0], PackedVolumeAux):
        return PackedVolumeAux(
            torch.cat([a.weights for a in auxes]),
            torch.cat([a.t for a in auxes]),
            torch.cat([a.t_starts for a in auxes]),
            torch.cat([a.t_ends for a in auxes]),
            torch.cat([a.ray_indices + b * rays_per_camera for b, a in enumerate(auxes)]),
            torch.cat([a.points for a in auxes]),
            sum(a.num_rays for a in auxes),
            sum(a.num_evaluated for a in auxes),
            sum(a.num_samples for a in auxes),
            sum(a.num_density_queries for a in auxes),
        )
    return VolumeAux(
        torch.cat([a.weights for a in auxes]),
        torch.cat([a.t for a in auxes]),
        torch.cat([a.points for a in auxes]),
        torch.cat([a.sample_mask for a in auxes]),
        sum(a.num_evaluated for a in auxes),
        sum(a.num_samples for a in auxes),
    )


__all__ = ["NeRFConfig", "NeRFRenderer", "VolumeAux"]
