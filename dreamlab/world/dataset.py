"""Training data of the builtin prior: a cache of rendered views, and captioned batches from it.

The cache holds, per view, the colour-free render (part ids and Lambert shading at the traced,
supersampled resolution) of one (shape, camera, light) triple, drawn once from
``WorldDataConfig.seed``. Colours are drawn per batch by :func:`sample_batch`, which recolours
the cached geometry, averages the supersamples and writes the caption exactly as generation-time
prompts look: ``"a red cube"``, ``"a snowman"``, ``"a blue house"`` plus, with probability
``view_word_probability``, ``", {view} view"`` where the view word follows
``dreamlab.prompts.view_direction_index`` — the same rule view-dependent prompting applies at
generation time.

The bias knobs (front bias, view-word and colour-word rates, light jitter) are recorded in the
builtin prior's model card; docs/world.md explains each and why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dreamlab.cameras import CameraSamplerConfig
from dreamlab.prompts import PromptConfig, view_direction_index
from dreamlab.types import VIEW_NAMES, Cameras, orbit_cameras, wrap_azimuth
from dreamlab.world.catalog import (
    COLOURS,
    COMPOSITES,
    MAX_PARTS,
    PRIMITIVES,
    SHAPES,
    ObjectSpec,
    caption,
    has_front,
)
from dreamlab.world.render import (
    RENDER_THREADS,
    torch_threads,
    camera_relative_light,
    colourize,
    light_from_angles,
    part_albedos,
    pool,
    render_geometry,
)

CACHE_FORMAT = 1


def world_version() -> str:
    """A hash of the world's geometry, colours and renderer sources: caches built by another
    version are refused by :meth:`WorldCache.check_compatible` and get another :meth:`cache_key`."""
    global _WORLD_VERSION
    if _WORLD_VERSION is None:
        here = Path(__file__).resolve().parent
        digest = hashlib.sha256()
        for name in ("catalog.py", "sdf.py", "render.py"):
            digest.update((here / name).read_bytes())
        _WORLD_VERSION = digest.hexdigest()[:12]
    return _WORLD_VERSION


_WORLD_VERSION: str | None = None
_CAMERAS = CameraSamplerConfig()
_PROMPTS = PromptConfig()
_GEOMETRY_FIELDS = (
    "resolution",
    "supersample",
    "num_views",
    "composite_fraction",
    "front_bias",
    "front_sector_deg",
    "elevation_deg",
    "distance",
    "fov_y_deg",
    "light_frame",
    "light_azimuth_deg",
    "light_elevation_deg",
    "ambient",
    "seed",
)
"""The fields that decide the cached renders (the others act per batch)."""


@dataclass
class WorldDataConfig:
    """What the builtin prior is trained on: the world's views and its deliberate biases."""

    resolution: int = 32
    """Image side in pixels (the prior's resolution)."""
    supersample: int = 2
    """Rays per pixel side: views are traced at k x resolution and averaged (anti-aliasing)."""
    num_views: int = 24000
    """Size of the cache: (shape, camera, light) triples rendered once."""
    composite_fraction: float = 0.5
    """Share of the cache given to the composites (objects with a front), split evenly among them;
    the rest is split evenly among the primitives. The shipped v6 weights use 0.5 (v5 and earlier
    0.4): more views of the composites, whose view words are the hard part to learn."""
    front_bias: float = 0.6
    """For objects with a front: the fraction of views drawn from the front sector
    (|azimuth| < front_sector_deg); the rest are uniform over the full circle, so the front sector
    gets front_bias + (1 - front_bias) * front_sector_deg / 180 of the views (0.7 by default).
    Real image priors are front-biased (most photos show fronts); a world meant to show the Janus
    problem must copy that. 0 = no bias. Primitives are always uniform."""
    front_sector_deg: float = 45.0
    """Half-width of the front sector used by front_bias (= the "front" view word's wedge)."""
    view_word_probability: float = 0.5
    """Probability that a caption ends with its view phrase (", front view", ...). Real captions
    rarely say where the camera is; 1.0 gives an exact view word on every image."""
    fronted_view_word_probability: tuple[float, float] | None = (0.3, 0.9)
    """For objects with a front: (probability for a view whose word is "front", probability for
    any other view), replacing view_word_probability for them; primitives keep
    view_word_probability. Real captions name the view mostly when it is not the usual one ("the
    back of a house"), rarely when it is the front everyone photographs. None = every view of every
    object uses view_word_probability (the v4 weights' data). With the default front bias,
    (0.3, 0.9) keeps the share of captioned views of these objects near one half while side and
    back views carry their word 1.8 times as often; uncaptioned views become more front-heavy
    (94 % instead of 70 %). v5 and the shipped v6 weights use (0.3, 0.9): v5's SDS results show the
    front on the back less often than v4's (docs/builtin-prior.md)."""
    view_word_noise: float = 0.0
    """Probability that a carried view word is replaced by another of front/side/back (real view
    words are unreliable)."""
    colour_word_probability_primitives: float = 0.9
    """Probability that a primitive gets a random colour and its colour word; otherwise it is grey
    and captioned without a colour ("a cube"), which is what an uncoloured prompt means."""
    colour_word_probability_composites: float = 0.5
    """Probability that a composite's body gets a random colour and its colour word ("a red house");
    otherwise it keeps its default colours ("a house")."""
    elevation_deg: tuple[float, float] = _CAMERAS.elevation_deg
    """Camera elevation range (uniform), the SDS trainer's CameraSamplerConfig default."""
    distance: tuple[float, float] = _CAMERAS.distance
    """Camera distance range (uniform), the SDS trainer's default."""
    fov_y_deg: tuple[float, float] = _CAMERAS.fov_y_deg
    """Vertical field of view range (uniform), the SDS trainer's default."""
    light_frame: Literal["camera", "world"] = "camera"
    """Frame of the light angles below. "camera": relative to each camera (azimuth 0, elevation 0
    = a head-light), so every view is lit from the camera side like a product photo and lighting
    gives away nothing about the view. "world": orbit angles in world space (azimuth 0 = the
    front), a fixed key light that a 3-D result can bake exactly, but back views are darker."""
    light_azimuth_deg: tuple[float, float] = (-60.0, 60.0)
    """Light azimuth range (uniform, per view) in light_frame."""
    light_elevation_deg: tuple[float, float] = (10.0, 60.0)
    """Light elevation range (uniform, per view) in light_frame."""
    ambient: float = 0.3
    """Ambient term of the Lambert shading (the ground-truth renderer's default)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Background colour of the training images (SDS renders on white: they must agree)."""
    front_threshold: float = _PROMPTS.front_threshold
    """View-word rule: azimuth half-width of "front" (dreamlab.prompts.PromptConfig default)."""
    back_threshold: float = _PROMPTS.back_threshold
    """View-word rule: azimuth half-width of "back"."""
    overhead_threshold: float = _PROMPTS.overhead_threshold
    """View-word rule: elevation above which a view is "overhead" (never reached with the default
    elevations, as at generation time)."""
    seed: int = 0
    """Seed of the cache (shapes, cameras, lights): the same seed gives the same cache."""

    def validate(self) -> None:
        if self.resolution < 4 or self.supersample < 1 or self.num_views < 1:
            raise ValueError("resolution must be >= 4, supersample >= 1 and num_views >= 1")
        for name in (
            "composite_fraction",
            "front_bias",
            "view_word_probability",
            "view_word_noise",
            "colour_word_probability_primitives",
            "colour_word_probability_composites",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.fronted_view_word_probability is not None:
            pair = tuple(self.fronted_view_word_probability)
            if len(pair) != 2 or not all(0.0 <= float(v) <= 1.0 for v in pair):
                raise ValueError(
                    "fronted_view_word_probability must be (front views, other views) with both in "
                    f"[0, 1], got {self.fronted_view_word_probability}"
                )
        if not 0.0 < self.front_sector_deg <= 180.0:
            raise ValueError(f"front_sector_deg must lie in (0, 180], got {self.front_sector_deg}")
        ranges = ("elevation_deg", "distance", "fov_y_deg", "light_azimuth_deg", "light_elevation_deg")
        for name in ranges:
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        if self.distance[0] <= 0.6:
            raise ValueError(f"cameras must stay outside the objects (> 0.6), got {self.distance}")
        if self.light_frame not in ("camera", "world"):
            raise ValueError(f"light_frame must be 'camera' or 'world', got {self.light_frame!r}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient must lie in [0, 1], got {self.ambient}")

    def cache_key(self) -> str:
        """A short hash of the fields that decide the cached renders (for cache file names)."""
        fields = {name: getattr(self, name) for name in _GEOMETRY_FIELDS}
        header = {"format": CACHE_FORMAT, "world": world_version()}
        text = json.dumps({**header, **fields}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class WorldCache:
    """Colour-free renders of the world's views (see the module docstring)."""

    shape_index: Tensor  # [N] long, index into SHAPES
    part: Tensor  # [N, kH, kW] int8, -1 = background
    shading: Tensor  # [N, kH, kW] uint8, shading * 255 (0 on background)
    elevation_deg: Tensor  # [N] float32
    azimuth_deg: Tensor  # [N] float32, in (-180, 180]
    distance: Tensor  # [N] float32
    fov_y_deg: Tensor  # [N] float32
    light_dir: Tensor  # [N, 3] float32, world direction towards the light
    resolution: int
    supersample: int
    config: dict = field(default_factory=dict)
    """asdict of the WorldDataConfig that built the cache."""
    shapes: tuple[str, ...] = SHAPES
    world: str = field(default_factory=world_version)
    """:func:`world_version` of the code that rendered the cache."""

    def __len__(self) -> int:
        return int(self.shape_index.shape[0])

    def cameras(self, index: Tensor | None = None):
        """The cached views' cameras (dreamlab.types.Cameras at the output resolution)."""
        index = torch.arange(len(self)) if index is None else index
        return orbit_cameras(
            self.elevation_deg[index],
            self.azimuth_deg[index],
            self.distance[index],
            self.fov_y_deg[index],
            self.resolution,
            self.resolution,
        )

    def check_compatible(self, cfg: WorldDataConfig) -> None:
        """Raises ValueError if ``cfg`` (or this dreamlab's world) differs from the cached renders."""
        if self.world != world_version():
            raise ValueError(
                f"the world cache was rendered by another version of dreamlab.world ({self.world}, "
                f"now {world_version()}); rebuild it"
            )
        built = self.config
        wrong = [
            name
            for name in _GEOMETRY_FIELDS
            if name in built and _norm(built[name]) != _norm(getattr(cfg, name))
        ]
        if wrong:
            details = ", ".join(f"{n}: cache {built[n]!r} vs config {getattr(cfg, n)!r}" for n in wrong)
            raise ValueError(f"the world cache was built with other settings ({details}); rebuild it")

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "format": CACHE_FORMAT,
                "shape_index": self.shape_index,
                "part": self.part,
                "shading": self.shading,
                "elevation_deg": self.elevation_deg,
                "azimuth_deg": self.azimuth_deg,
                "distance": self.distance,
                "fov_y_deg": self.fov_y_deg,
                "light_dir": self.light_dir,
                "resolution": self.resolution,
                "supersample": self.supersample,
                "config": json.dumps(self.config, default=list),
                "shapes": list(self.shapes),
                "world": self.world,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> WorldCache:
        """Loads a cache written by :meth:`save` (tensors only; safe ``weights_only`` loading)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not a dreamlab world cache (format {CACHE_FORMAT})")
        shapes = tuple(data["shapes"])
        if shapes != SHAPES:
            raise ValueError(f"{path} was built for shapes {shapes}, not {SHAPES}; rebuild it")
        return cls(
            shape_index=data["shape_index"],
            part=data["part"],
            shading=data["shading"],
            elevation_deg=data["elevation_deg"],
            azimuth_deg=data["azimuth_deg"],
            distance=data["distance"],
            fov_y_deg=data["fov_y_deg"],
            light_dir=data["light_dir"],
            resolution=int(data["resolution"]),
            supersample=int(data["supersample"]),
            config=json.loads(data["config"]),
            shapes=shapes,
            world=str(data.get("world", "")),
        )


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_lights(cfg: WorldDataConfig, cams: Cameras, generator: torch.Generator) -> Tensor:
    """[N, 3] world directions towards one light per camera, drawn as the training data draws
    them: azimuth then elevation, uniform in ``cfg``'s ranges, in ``cfg.light_frame``."""
    n = len(cams)
    azimuth = _uniform(*cfg.light_azimuth_deg, n, generator)
    elevation = _uniform(*cfg.light_elevation_deg, n, generator)
    if cfg.light_frame == "camera":
        return camera_relative_light(cams, azimuth, elevation)
    return light_from_angles(azimuth, elevation)


def _has_front_mask(shape_index: Tensor) -> Tensor:
    """Per entry of ``shape_index`` (indices into SHAPES): whether that object has a front."""
    return torch.tensor([has_front(s) for s in SHAPES])[shape_index]


def _shape_counts(cfg: WorldDataConfig) -> list[int]:
    """Views per shape (SHAPES order): composite_fraction for the composites, split evenly."""
    n_comp = round(cfg.num_views * cfg.composite_fraction)
    n_prim = cfg.num_views - n_comp
    counts = []
    for group, total in ((PRIMITIVES, n_prim), (COMPOSITES, n_comp)):
        base, extra = divmod(total, len(group))
        counts += [base + (1 if i < extra else 0) for i in range(len(group))]
    return counts


def build_world_cache(
    cfg: WorldDataConfig, progress_callback: Callable[[int, int], None] | None = None
) -> WorldCache:
    """Renders ``cfg.num_views`` colour-free views, deterministically from ``cfg.seed``.

    ``progress_callback(done, total)`` is called after every rendered chunk. Takes about 1 ms per
    view at 32 px with supersample 2 on 2 CPU cores (docs/world.md).
    """
    cfg.validate()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.num_views
    counts = _shape_counts(cfg)
    shape_index = torch.repeat_interleave(torch.arange(len(SHAPES)), torch.tensor(counts))
    shape_index = shape_index[torch.randperm(n, generator=gen)]

    elevation = _uniform(*cfg.elevation_deg, n, gen)
    distance = _uniform(*cfg.distance, n, gen)
    fov = _uniform(*cfg.fov_y_deg, n, gen)
    azimuth = _uniform(-180.0, 180.0, n, gen)
    front_azimuth = _uniform(-cfg.front_sector_deg, cfg.front_sector_deg, n, gen)
    fronted = _has_front_mask(shape_index)
    biased = fronted & (torch.rand(n, generator=gen) < cfg.front_bias)
    azimuth = wrap_azimuth(torch.where(biased, front_azimuth, azimuth))

    res, k = cfg.resolution, cfg.supersample
    cams_all = orbit_cameras(elevation, azimuth, distance, fov, res, res)
    light = sample_lights(cfg, cams_all, gen)  # the next draws from gen, as before

    part = torch.full((n, res * k, res * k), -1, dtype=torch.int8)
    shading = torch.zeros((n, res * k, res * k), dtype=torch.uint8)
    chunk = max(1, (1 << 21) // (res * k) ** 2)
    done = 0
    for s, shape in enumerate(SHAPES):
        rows = torch.nonzero(shape_index == s).squeeze(1)
        for start in range(0, rows.numel(), chunk):
            sel = rows[start : start + chunk]
            geo = render_geometry(shape, cams_all[sel], light[sel], cfg.ambient, k)
            part[sel] = geo.part.to(torch.int8)
            shading[sel] = (geo.shading * 255.0).round().clamp(0, 255).to(torch.uint8)
            done += sel.numel()
            if progress_callback is not None:
                progress_callback(done, n)
    return WorldCache(
        shape_index=shape_index,
        part=part,
        shading=shading,
        elevation_deg=elevation,
        azimuth_deg=azimuth,
        distance=distance,
        fov_y_deg=fov,
        light_dir=light,
        resolution=res,
        supersample=k,
        config=asdict(cfg),
    )


_ALBEDO_TABLE: Tensor | None = None


def albedo_table() -> Tensor:
    """[len(SHAPES), 1 + len(COLOURS), MAX_PARTS, 3]: part albedos of every shape with no colour
    word (column 0) and with each colour word (columns 1..)."""
    global _ALBEDO_TABLE
    if _ALBEDO_TABLE is None:
        table = torch.zeros(len(SHAPES), 1 + len(COLOURS), MAX_PARTS, 3)
        for s, shape in enumerate(SHAPES):
            for c, colour in enumerate((None, *COLOURS)):
                rows = part_albedos(ObjectSpec(shape, colour))
                table[s, c, : rows.shape[0]] = rows
        _ALBEDO_TABLE = table
    return _ALBEDO_TABLE


@dataclass
class WorldBatch:
    """A captioned training batch and what it was drawn from."""

    images: Tensor  # [B, 3, H, W] in [0, 1], composited on cfg.background
    captions: list[str]
    specs: list[ObjectSpec]
    view: Tensor  # [B] long: true view word index (VIEW_NAMES) of each image's camera
    captioned_view: Tensor  # [B] long: view word index in the caption, -1 if none
    index: Tensor  # [B] long: rows of the cache


def render_cached_views(cache: WorldCache, index: Tensor, albedo: Tensor, background) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] of cache rows ``index`` painted with per-part ``albedo``
    [B, MAX_PARTS, 3], composited on ``background``."""
    part = cache.part[index].long()
    shading = cache.shading[index].float() * (1.0 / 255.0)
    rgb = colourize(shading, part, albedo, background)  # [B, kH, kW, 3]
    return pool(rgb, cache.supersample).permute(0, 3, 1, 2).contiguous()


def load_or_build_world_cache(cfg: WorldDataConfig, work_dir: str | Path, progress=None) -> WorldCache:
    """The view cache of ``cfg`` kept in ``work_dir`` (rendered and saved atomically when absent)."""
    from dreamlab.export.atomic import atomic_write

    path = Path(work_dir) / f"world-cache-{cfg.cache_key()}.pt"
    if path.is_file():
        cache = WorldCache.load(path)
        cache.check_compatible(cfg)
        return cache
    cache = build_world_cache(cfg, progress_callback=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        cache.save(tmp)
    return cache


def sample_batch_detailed(
    cache: WorldCache,
    cfg: WorldDataConfig,
    batch_size: int,
    generator: torch.Generator,
    threads: int | None = RENDER_THREADS,
) -> WorldBatch:
    """Like :func:`sample_batch`, also returning the objects, view words and cache rows.

    Runs with ``threads`` torch threads (default ``render.RENDER_THREADS`` = 1): small ops,
    measured ~7 ms per batch of 32 vs ~95 ms with 2 threads when another process was busy on
    the 2-core machine. A training loop that calls it every step passes None: switching the
    thread count every step costs more than it saves."""
    with torch_threads(threads):
        return _sample_batch_detailed(cache, cfg, batch_size, generator)


def _sample_batch_detailed(
    cache: WorldCache, cfg: WorldDataConfig, batch_size: int, generator: torch.Generator
) -> WorldBatch:
    if cfg.resolution != cache.resolution or cfg.supersample != cache.supersample:
        raise ValueError(
            f"the world cache holds {cache.resolution} px views (supersample {cache.supersample}), "
            f"the config asks for {cfg.resolution} px (supersample {cfg.supersample}); rebuild it"
        )
    b = int(batch_size)
    index = torch.randint(0, len(cache), (b,), generator=generator)
    shape = cache.shape_index[index]
    composite = shape >= len(PRIMITIVES)
    p_colour = torch.where(
        composite,
        torch.tensor(cfg.colour_word_probability_composites),
        torch.tensor(cfg.colour_word_probability_primitives),
    )
    coloured = torch.rand(b, generator=generator) < p_colour
    colour = torch.randint(0, len(COLOURS), (b,), generator=generator)
    column = torch.where(coloured, colour + 1, torch.zeros_like(colour))
    albedo = albedo_table()[shape, column]  # [B, MAX_PARTS, 3]

    images = render_cached_views(cache, index, albedo, cfg.background)

    view = view_direction_index(
        cache.elevation_deg[index],
        cache.azimuth_deg[index],
        cfg.front_threshold,
        cfg.back_threshold,
        cfg.overhead_threshold,
    )
    p_view_word = torch.full((b,), float(cfg.view_word_probability))
    if cfg.fronted_view_word_probability is not None:
        p_front, p_other = (float(v) for v in cfg.fronted_view_word_probability)
        p_fronted = torch.where(view == VIEW_NAMES.index("front"), p_front, p_other)
        fronted = _has_front_mask(shape)
        p_view_word = torch.where(fronted, p_fronted, p_view_word)
    carry = torch.rand(b, generator=generator) < p_view_word
    noisy = torch.rand(b, generator=generator) < cfg.view_word_noise
    shift = torch.randint(1, 3, (b,), generator=generator)  # to one of the two other horizontal words
    horizontal = torch.tensor([VIEW_NAMES.index(v) for v in ("front", "side", "back")])
    position = torch.zeros(len(VIEW_NAMES), dtype=torch.long)
    position[horizontal] = torch.arange(3)
    wrong = horizontal[(position[view] + shift) % 3]
    said = torch.where(noisy, wrong, view)
    captioned = torch.where(carry, said, torch.full_like(view, -1))

    names = list(COLOURS)
    specs, captions = [], []
    for i in range(b):
        spec = ObjectSpec(SHAPES[int(shape[i])], names[int(colour[i])] if bool(coloured[i]) else None)
        specs.append(spec)
        v = int(captioned[i])
        captions.append(caption(spec, VIEW_NAMES[v] if v >= 0 else None))
    return WorldBatch(images, captions, specs, view, captioned, index)


def sample_batch(
    cache: WorldCache,
    cfg: WorldDataConfig,
    batch_size: int,
    generator: torch.Generator,
    threads: int | None = RENDER_THREADS,
) -> tuple[Tensor, list[str]]:
    """A random training batch: images ``[B, 3, H, W]`` in [0, 1] and their captions.

    Colours are drawn here (colour-word rates of ``cfg``); captions read "a red cube",
    "a snowman", "a blue house", with ", {view} view" appended with probability
    ``cfg.view_word_probability`` (the word from ``dreamlab.prompts.view_direction_index`` of the
    image's camera, with cfg's thresholds = PromptConfig's defaults). All randomness comes from
    ``generator``.
    """
    batch = sample_batch_detailed(cache, cfg, batch_size, generator, threads)
    return batch.images, batch.captions
