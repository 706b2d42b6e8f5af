"""Prior benchmark: does the 2D prior draw what the prompt asks for?

For every benchmark prompt (and, for objects with a front, every view word "front", "side",
"back") the prior draws ``samples_per`` images with DDIM (``dreamlab.priors.sampling``). Each
sample is matched to its nearest ground-truth render in a reference set holding EVERY object of
the world (``all_object_specs()``) seen from a ring of cameras under a grid of the training
data's lights, under a slightly blurred L2 pixel distance. The prompt is "right" when that
nearest reference is the asked object (shape AND colour); it is "right among the prompts" when
the nearest of the benchmark prompts' own references is (the issue's definition: "the nearest
ground-truth render among all prompts' renders"; the world-wide test is stricter, since a grey
head or a white snowman are not benchmark prompts). The view is right when, among the asked
object's own references, the nearest lies in the asked view's azimuth wedge (front |φ| < 45°,
back |φ| > 135°, side between: the caption rule). Exact definitions: docs/metrics.md.

The same scoring applied to ground-truth renders from random training-like cameras and lights
gives the **ceiling**: what a perfect prior would score (below 1: some objects look alike from some
angles at 32 px, e.g. a head and a white head from behind, where hair hides the skin).

Writes ``prior_bench.md`` (table per prompt + totals), ``prior_bench.csv`` (one row per sample)
and ``prior_bench.png`` (each sample beside its nearest reference; green frame = right).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dreamlab.bench.metrics import blurred_features, feature_distances, nearest_in
from dreamlab.bench.report import (
    fmt,
    framed,
    grid_png,
    machine,
    markdown_table,
    to_uint8,
    upscale,
    write_csv,
)
from dreamlab.cameras import CameraSamplerConfig
from dreamlab.export.atomic import atomic_write_text
from dreamlab.priors.base import Prior
from dreamlab.priors.sampling import ddim_sample
from dreamlab.types import Cameras, orbit_cameras

VIEWS: tuple[str, ...] = ("front", "side", "back")
"""View words asked of objects that have a front."""

VIEW_HALF_WIDTH_DEG = 45.0
"""Half-width of the front and back wedges (the prompt code's default thresholds): a reference at
azimuth φ shows the front if |φ| < 45°, the back if |φ| > 135°, a side otherwise; references
exactly on a wedge boundary (|φ| = 45° or 135°) belong to no view and are left out of the view
test."""


def reference_view(azimuth_deg: float) -> str | None:
    """'front' / 'side' / 'back' for a reference azimuth, None on a wedge boundary."""
    a = abs(_wrapped(azimuth_deg))
    edge = VIEW_HALF_WIDTH_DEG
    if a in (edge, 180.0 - edge):
        return None
    if a < edge:
        return "front"
    return "back" if a > 180.0 - edge else "side"


REFERENCE_AZIMUTHS = 16
"""Reference azimuths, evenly spaced from 0° (every 22.5°: includes 0, ±90 and 180)."""
REFERENCE_ELEVATIONS: tuple[float, ...] = (0.0, 15.0, 30.0)
"""Reference elevations in degrees."""
REFERENCE_DISTANCES: tuple[float, ...] = (2.25, 2.55)
"""Reference camera distances (the training range is 2.2-2.6: objects vary in size by ~17%)."""
REFERENCE_LIGHTS: tuple[tuple[float, float], ...] = (
    (-45.0, 20.0),
    (0.0, 20.0),
    (45.0, 20.0),
    (-45.0, 50.0),
    (0.0, 50.0),
    (45.0, 50.0),
)
"""Camera-relative lights (azimuth, elevation in degrees; ``camera_relative_light``) of the
reference renders: a grid over the training data's light range (azimuth ±60°, elevation 10–60°,
``WorldDataConfig``). A prior that draws its training distribution draws varied light, so the
references must too: with the single fixed light that SDS evaluation uses, ground-truth renders
under training lights scored only 71 % prompt / 49 % view accuracy (measured 2026-11-27)."""
BLUR_SIGMA = 1.0
"""Blur (pixels at the prior's resolution) applied to samples and references before the L2."""


def _middle_fov() -> float:
    """Middle of the training fov range (degrees): the fov of every reference render."""
    return 0.5 * sum(CameraSamplerConfig().fov_y_deg)


def spec_label(spec) -> str:
    """'red cube', 'snowman': the words of an ObjectSpec."""
    return " ".join(word for word in (spec.colour, spec.shape) if word)


def _wrapped(azimuth: float) -> float:
    a = (azimuth + 180.0) % 360.0 - 180.0
    return 180.0 if a == -180.0 else a


# ----------------------------------------------------------------------------- reference set


@dataclass
class ReferenceSet:
    """Ground-truth renders of every distinct object of the world from a ring of cameras."""

    images: Tensor  # [M, 3, S, S] uint8 (for pictures; distances use ``features``)
    features: Tensor  # [M, 3·S·S] float32 blurred, flattened images in [0, 1]
    spec_index: Tensor  # [M] long into ``specs`` (always a canonical spec)
    azimuth_deg: Tensor  # [M] in (-180, 180]
    elevation_deg: Tensor  # [M]
    distance: Tensor  # [M]
    lights: tuple[tuple[float, float], ...] = ()  # camera-relative (azimuth, elevation) per camera
    specs: list = field(default_factory=list)  # every ObjectSpec of the world
    canonical: list[int] = field(default_factory=list)  # spec -> first spec with identical renders

    @property
    def num_objects(self) -> int:
        return len(set(self.canonical))

    def image(self, index: int) -> Tensor:  # [3, S, S] float in [0, 1]
        return self.images[index].float() / 255.0


def reference_cameras(
    image_size: int,
    num_azimuths: int = REFERENCE_AZIMUTHS,
    elevations_deg: Sequence[float] = REFERENCE_ELEVATIONS,
    distances: Sequence[float] = REFERENCE_DISTANCES,
) -> Cameras:
    """The reference ring: azimuths from 0° × elevations × distances (azimuth fastest, then
    elevation, then distance), middle training fov, looking at the origin."""
    az = torch.arange(num_azimuths, dtype=torch.float32) * (360.0 / num_azimuths)
    grid = [(d, e, float(a)) for d in distances for e in elevations_deg for a in az]
    dist = torch.tensor([g[0] for g in grid], dtype=torch.float32)
    elev = torch.tensor([g[1] for g in grid], dtype=torch.float32)
    azim = torch.tensor([g[2] for g in grid], dtype=torch.float32)
    fov = torch.full_like(dist, _middle_fov())
    return orbit_cameras(elev, azim, dist, fov, image_size, image_size)


def reference_set(
    image_size: int = 32,
    num_azimuths: int = REFERENCE_AZIMUTHS,
    elevations_deg: Sequence[float] = REFERENCE_ELEVATIONS,
    distances: Sequence[float] = REFERENCE_DISTANCES,
    supersample: int = 2,
    lights: Sequence[tuple[float, float]] = REFERENCE_LIGHTS,
) -> ReferenceSet:
    """Renders (once per process and setting) every ``all_object_specs()`` object on the ring.

    White background, the world's ambient, each camera under every camera-relative light of
    ``lights`` (light fastest, then the ring's order), ``supersample``² rays per pixel: exactly
    ``render_ground_truth`` with ``camera_relative_light``, with each shape's geometry traced once
    and re-shaded per light and coloured per colour word. Objects whose renders are identical to
    an earlier object of the same shape ("a cube" and "a grey cube") are one object:
    ``canonical`` maps them to the first.
    """
    if num_azimuths < 4 or num_azimuths % 4:
        raise ValueError(
            f"reference azimuths must be a multiple of 4 (front, sides, back), got {num_azimuths}"
        )
    if not elevations_deg or not distances:
        raise ValueError("the reference ring needs at least one elevation and one distance")
    if not lights:
        raise ValueError("the reference set needs at least one light")
    key = (
        int(image_size),
        int(num_azimuths),
        tuple(float(e) for e in elevations_deg),
        tuple(float(d) for d in distances),
        int(supersample),
        tuple((float(a), float(e)) for a, e in lights),
    )
    return _reference_set(*key)


@functools.lru_cache(maxsize=2)
def _reference_set(
    image_size: int,
    num_azimuths: int,
    elevations_deg: tuple[float, ...],
    distances: tuple[float, ...],
    supersample: int,
    lights: tuple[tuple[float, float], ...],
) -> ReferenceSet:
    from dreamlab.world.catalog import all_object_specs
    from dreamlab.world.render import (
        camera_relative_light,
        colourize,
        lambert_shading,
        pool,
        render_geometry,
    )

    ambient = 0.3
    ring = reference_cameras(image_size, num_azimuths, elevations_deg, distances)
    per_camera = len(lights)
    # every ring camera once per light (light fastest)
    cams = ring[torch.arange(len(ring)).repeat_interleave(per_camera)]
    light_az = torch.tensor([a for a, _ in lights], dtype=torch.float32).repeat(len(ring))
    light_el = torch.tensor([e for _, e in lights], dtype=torch.float32).repeat(len(ring))
    light_dirs = camera_relative_light(cams, light_az, light_el)  # [V, 3]
    specs = list(all_object_specs())
    white = (1.0, 1.0, 1.0)
    images: list[Tensor] = []  # uint8 [V, 3, S, S] per canonical spec
    features: list[Tensor] = []  # float32 [V, 3·S·S] per canonical spec
    canonical: list[int] = []
    where: dict[int, int] = {}  # canonical spec -> its position in images / features
    geometry: dict[str, object] = {}
    for k, spec in enumerate(specs):
        if spec.shape not in geometry:
            geometry.clear()  # shape-major order: each shape's geometry is needed once
            geo = render_geometry(spec.shape, ring, None, ambient, supersample)
            # re-shade the traced normals under every light (the renderer's own shading rule)
            normal = geo.normal.repeat_interleave(per_camera, dim=0)  # [V, kS, kS, 3]
            lit = lambert_shading(normal, light_dirs[:, None, None, :], ambient)
            part = geo.part.repeat_interleave(per_camera, dim=0)
            shading = torch.where(part >= 0, lit, 0.0)
            geometry[spec.shape] = (shading, part)
        shading, part = geometry[spec.shape]
        rgb = pool(colourize(shading, part, spec, white), supersample)  # [V, S, S, 3]
        image = rgb.float().clamp(0, 1).permute(0, 3, 1, 2).contiguous()  # [V, 3, S, S]
        feature = blurred_features(image, BLUR_SIGMA)
        same = [
            j
            for j in where
            if specs[j].shape == spec.shape and torch.equal(features[where[j]], feature)
        ]
        canonical.append(same[0] if same else k)
        if not same:
            where[k] = len(images)
            images.append(torch.round(image * 255.0).to(torch.uint8))
            features.append(feature)
    keep = list(where)
    views = len(cams)
    return ReferenceSet(
        images=torch.cat(images),
        features=torch.cat(features),
        spec_index=torch.tensor(keep, dtype=torch.long).repeat_interleave(views),
        azimuth_deg=cams.azimuth_deg.repeat(len(keep)),
        elevation_deg=cams.elevation_deg.repeat(len(keep)),
        distance=cams.distance.repeat(len(keep)),
        lights=lights,
        specs=specs,
        canonical=canonical,
    )


# ----------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One thing asked of the prior: a benchmark prompt, optionally with a view word."""

    prompt: str  # the benchmark prompt, e.g. "a snowman"
    text: str  # what the prior is given, e.g. "a snowman, back view"
    spec: object  # the ObjectSpec the prompt names
    view: str | None  # "front" / "side" / "back", None for objects without a front


def conditions_for(prompts: Sequence[str], views: Sequence[str] = VIEWS) -> list[Condition]:
    """Parses every prompt (UnknownWordError, a ValueError, for words outside the world) and
    expands objects with a front into one condition per view word."""
    from dreamlab.prompts import view_prompt
    from dreamlab.world.catalog import has_front, parse_prompt

    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown view word(s) {bad}; choose from {list(VIEWS)}")
    out = []
    for prompt in prompts:
        prompt = prompt.strip()
        spec = parse_prompt(prompt)
        if has_front(spec.shape) and views:
            out.extend(Condition(prompt, view_prompt(prompt, v), spec, v) for v in views)
        else:
            out.append(Condition(prompt, prompt, spec, None))
    return out


def condition_seed(seed: int, text: str) -> int:
    """Seed of one condition's generator: independent of which other prompts are benchmarked."""
    return (int(seed) * 1_000_003 + zlib.crc32(text.encode("utf-8"))) % (2**63 - 1)


def truth_cameras(condition: Condition, n: int, image_size: int, generator: torch.Generator):
    """``n`` random cameras from the training distribution (``CameraSamplerConfig`` ranges) in
    the azimuth wedge of the condition's view word (threestudio's rule with 45° half-widths:
    front |φ| < 45°, back |φ| > 135°, side otherwise; anywhere for objects without a front)."""
    cfg = CameraSamplerConfig()

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    if condition.view is None:
        azimuth = uniform(-180.0, 180.0)
    elif condition.view == "front":
        azimuth = uniform(-45.0, 45.0)
    elif condition.view == "back":
        azimuth = 180.0 + uniform(-45.0, 45.0)
    else:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        azimuth = sign * uniform(45.0, 135.0)
    elevation = uniform(*cfg.elevation_deg)
    distance = uniform(*cfg.distance)
    fov = uniform(*cfg.fov_y_deg)
    return orbit_cameras(elevation, azimuth, distance, fov, image_size, image_size)


def truth_samples(condition: Condition, n: int, image_size: int, seed: int) -> Tensor:
    """[n, 3, S, S] ground-truth renders of the condition from :func:`truth_cameras` under
    lights drawn as the training data draws them (``WorldDataConfig``'s default light frame and
    ranges, those of the shipped prior): what a perfect prior could draw. Seeded from ``seed``
    and the condition's text."""
    from dreamlab.world.dataset import WorldDataConfig, sample_lights
    from dreamlab.world.render import render_ground_truth

    data = WorldDataConfig()
    generator = torch.Generator().manual_seed(condition_seed(seed, "truth:" + condition.text))
    cams = truth_cameras(condition, n, image_size, generator)
    light = sample_lights(data, cams, generator)
    gt = render_ground_truth(condition.spec, cams, light, ambient=data.ambient, supersample=2)
    return gt.rgb.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """How one image was matched."""

    reference: int  # index of the nearest image in the reference set
    distance: float  # blurred mean squared pixel distance to it
    right: bool  # nearest object == asked object (shape and colour)
    right_among_prompts: bool  # the same, among the benchmark prompts' objects only
    shape_right: bool
    colour_right: bool
    view: str | None  # view of the nearest same-object front/side/back reference (None: no front)
    view_right: bool | None


def _colour_of(refs: ReferenceSet, k: int) -> str | None:
    """Body colour word of spec ``k`` after aliasing (a bare primitive is grey; a composite's
    default colours are None)."""
    from dreamlab.world.catalog import DEFAULT_PRIMITIVE_COLOUR, has_front

    spec = refs.specs[refs.canonical[k]]
    if spec.colour is None and not has_front(spec.shape):
        return DEFAULT_PRIMITIVE_COLOUR
    return spec.colour


def score_images(
    images: Tensor,
    condition: Condition,
    refs: ReferenceSet,
    prompt_objects: Sequence[int] | None = None,
) -> list[Score]:
    """Matches each image [N, 3, S, S] against the reference set (see the module docstring).

    ``prompt_objects``: canonical spec indices of the benchmark prompts' objects, the candidates
    of ``right_among_prompts`` (default: the asked object alone, which makes it always true)."""
    # one distance matrix [N, M]; the three tests below pick their minimum over other candidates
    distances = feature_distances(blurred_features(images, BLUR_SIGMA), refs.features)
    index, dist = nearest_in(distances)
    asked = refs.canonical[refs.specs.index(condition.spec)]
    candidates = torch.tensor(sorted(set(prompt_objects or ()) | {asked}))
    pi, _ = nearest_in(distances, torch.isin(refs.spec_index, candidates))
    view_pred: list[str | None] = [None] * len(images)
    if condition.view is not None:
        ref_view = [reference_view(float(a)) for a in refs.azimuth_deg.tolist()]
        allowed = (refs.spec_index == asked) & torch.tensor([v is not None for v in ref_view])
        vi, _ = nearest_in(distances, allowed)
        view_pred = [ref_view[int(i)] for i in vi]
    out = []
    for k in range(len(images)):
        near = int(refs.spec_index[index[k]])
        out.append(
            Score(
                reference=int(index[k]),
                distance=float(dist[k]),
                right=near == asked,
                right_among_prompts=int(refs.spec_index[pi[k]]) == asked,
                shape_right=refs.specs[near].shape == condition.spec.shape,
                colour_right=_colour_of(refs, near) == _colour_of(refs, asked),
                view=view_pred[k],
                view_right=None if condition.view is None else view_pred[k] == condition.view,
            )
        )
    return out


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class PriorSample:
    """One sample of the prior and what it was matched to."""

    condition: int  # index into PriorBenchResult.conditions
    index: int  # sample number within its condition
    score: Score
    nearest: str  # label of the nearest reference's object
    nearest_azimuth: float
    nearest_elevation: float

    @property
    def right(self) -> bool:
        return self.score.right


@dataclass
class PriorBenchRow:
    """Aggregate of one condition's samples (and of its ground-truth ceiling images)."""

    prompt: str
    view: str | None
    samples: int
    right: int
    right_among_prompts: int
    shape_right: int
    colour_right: int
    view_right: int | None
    mean_distance: float
    ceiling_right: int | None = None  # same scoring on ground-truth renders (None: not run)
    ceiling_right_among_prompts: int | None = None
    ceiling_view_right: int | None = None


@dataclass
class PriorBenchResult:
    rows: list[PriorBenchRow]
    samples: list[PriorSample]
    conditions: list[Condition]
    accuracy: float  # fraction of all samples that are right (shape and colour)
    accuracy_among_prompts: float  # the same against the benchmark prompts' objects only
    shape_accuracy: float
    colour_accuracy: float
    view_accuracy: float | None  # over samples of objects with a front; None if there were none
    ceiling_accuracy: float | None  # accuracy of ground-truth renders (a perfect prior)
    ceiling_accuracy_among_prompts: float | None
    ceiling_view_accuracy: float | None
    seconds: float  # sampling time (reference rendering excluded)
    images: Tensor  # [N, 3, S, S] every sample, in sample order
    markdown: Path
    csv: Path
    png: Path


def _fraction(values: Sequence[bool]) -> float | None:
    return sum(bool(v) for v in values) / len(values) if values else None


def run_prior_bench(
    prior: Prior,
    prompts: Sequence[str] | None = None,
    views: Sequence[str] = VIEWS,
    samples_per: int = 8,
    steps: int = 50,
    guidance_scale: float = 1.25,
    seed: int = 0,
    out_dir: Path | str = Path("bench-results/prior"),
    clip_x0: bool = True,
    stop_at_t: int = 100,
    batch_size: int = 64,
    reference_azimuths: int = REFERENCE_AZIMUTHS,
    reference_elevations: Sequence[float] = REFERENCE_ELEVATIONS,
    reference_distances: Sequence[float] = REFERENCE_DISTANCES,
    ceiling: bool = True,
    view_guidance_scale: float = 1.0,
    other_view_scale: float = 0.0,
) -> PriorBenchResult:
    """Samples the prior for every prompt (× view word) and scores the samples (module docstring).

    Args:
        prior: the prior under test (its ``image_size`` sets the reference resolution).
        prompts: benchmark prompts (default ``benchmark_prompts()``); words outside the world
            raise UnknownWordError (a ValueError) before anything is sampled.
        views: view words asked of objects with a front.
        samples_per: samples per condition.
        steps: DDIM steps.
        guidance_scale: CFG scale.
        seed: base seed; each condition's generator is seeded from it and the condition's text.
        out_dir: where prior_bench.md / .csv / .png go (created).
        clip_x0: clip the predicted x0 to [-1, 1] while sampling (pixel priors).
        stop_at_t: the sampler returns its x̂0 prediction at the first timestep <= this.
        batch_size: images per DDIM batch (memory bound only; results do not depend on it).
        reference_azimuths: azimuths of the reference ring (a multiple of 4, from 0°).
        reference_elevations: elevations of the reference ring, degrees.
        reference_distances: camera distances of the reference ring.
        ceiling: also score ``samples_per`` ground-truth renders per condition (the ceiling).
        view_guidance_scale: w of the sampler's separate guidance term for the view phrase
            (``ddim_sample``; the base prompt is the benchmark prompt without it). 0 = off; 1 was
            measured best for view accuracy on the shipped v6 prior (docs/builtin-prior.md).
        other_view_scale: u of the sampler's negation of the other view words (``ddim_sample``:
            the other entries of ``views``, relative to the prompt without a view). 0 = off.
    """
    from dreamlab.prompts import view_prompt
    from dreamlab.world.catalog import benchmark_prompts

    if samples_per < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples_per}")
    if steps < 1:
        raise ValueError(f"DDIM steps must be >= 1, got {steps}")
    if view_guidance_scale < 0:
        raise ValueError(f"view guidance scale must be >= 0, got {view_guidance_scale}")
    if other_view_scale < 0:
        raise ValueError(f"other-view scale must be >= 0, got {other_view_scale}")
    if other_view_scale > 0 and len(views) < 2:
        raise ValueError("negating the other views needs at least two view words")
    prompts = list(benchmark_prompts() if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts to benchmark")
    if reference_azimuths < 4 or reference_azimuths % 4:
        raise ValueError(f"reference azimuths must be a multiple of 4, got {reference_azimuths}")
    conditions = conditions_for(prompts, views)
    prior.encode_prompt([c.text for c in conditions])  # unknown words fail here, before sampling
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = int(prior.image_size)

    started = time.perf_counter()
    per_condition: list[Tensor] = []
    for cond in conditions:
        generator = torch.Generator().manual_seed(condition_seed(seed, cond.text))
        negate = other_view_scale > 0 and cond.view is not None
        others = [view_prompt(cond.prompt, v) for v in views if v != cond.view] if negate else None
        chunks = []
        for lo in range(0, samples_per, batch_size):
            n = min(batch_size, samples_per - lo)
            texts = [cond.text] * n
            chunks.append(
                ddim_sample(
                    prior,
                    texts,
                    generator,
                    steps,
                    guidance_scale=guidance_scale,
                    clip_x0=clip_x0,
                    stop_at_t=stop_at_t,
                    base_prompts=[cond.prompt] * n,
                    view_guidance_scale=view_guidance_scale if cond.view is not None else 0.0,
                    other_view_prompts=[others] * n if negate else None,
                    other_view_scale=other_view_scale if negate else 0.0,
                )
            )
        per_condition.append(torch.cat(chunks))
    seconds = time.perf_counter() - started

    refs = reference_set(size, reference_azimuths, reference_elevations, reference_distances)
    prompt_objects = sorted({refs.canonical[refs.specs.index(c.spec)] for c in conditions})
    samples: list[PriorSample] = []
    rows: list[PriorBenchRow] = []
    truth_scores: list[Score] = []
    for c, (cond, images) in enumerate(zip(conditions, per_condition)):
        scores = score_images(images, cond, refs, prompt_objects)
        for k, s in enumerate(scores):
            near = refs.specs[int(refs.spec_index[s.reference])]
            samples.append(
                PriorSample(
                    condition=c,
                    index=k,
                    score=s,
                    nearest=spec_label(near),
                    nearest_azimuth=float(refs.azimuth_deg[s.reference]),
                    nearest_elevation=float(refs.elevation_deg[s.reference]),
                )
            )
        truth: list[Score] = []
        if ceiling:
            truth_images = truth_samples(cond, samples_per, size, seed)
            truth = score_images(truth_images, cond, refs, prompt_objects)
            truth_scores.extend(truth)
        rows.append(
            PriorBenchRow(
                prompt=cond.prompt,
                view=cond.view,
                samples=len(scores),
                right=sum(s.right for s in scores),
                right_among_prompts=sum(s.right_among_prompts for s in scores),
                shape_right=sum(s.shape_right for s in scores),
                colour_right=sum(s.colour_right for s in scores),
                view_right=None if cond.view is None else sum(bool(s.view_right) for s in scores),
                mean_distance=sum(s.distance for s in scores) / len(scores),
                ceiling_right=sum(s.right for s in truth) if ceiling else None,
                ceiling_right_among_prompts=(
                    sum(s.right_among_prompts for s in truth) if ceiling else None
                ),
                ceiling_view_right=(
                    sum(bool(s.view_right) for s in truth)
                    if ceiling and cond.view is not None
                    else None
                ),
            )
        )

    scores = [s.score for s in samples]
    result = PriorBenchResult(
        rows=rows,
        samples=samples,
        conditions=conditions,
        accuracy=_fraction([s.right for s in scores]) or 0.0,
        accuracy_among_prompts=_fraction([s.right_among_prompts for s in scores]) or 0.0,
        shape_accuracy=_fraction([s.shape_right for s in scores]) or 0.0,
        colour_accuracy=_fraction([s.colour_right for s in scores]) or 0.0,
        view_accuracy=_fraction([s.view_right for s in scores if s.view_right is not None]),
        ceiling_accuracy=_fraction([s.right for s in truth_scores]),
        ceiling_accuracy_among_prompts=_fraction([s.right_among_prompts for s in truth_scores]),
        ceiling_view_accuracy=_fraction(
            [s.view_right for s in truth_scores if s.view_right is not None]
        ),
        seconds=seconds,
        images=torch.cat(per_condition),
        markdown=out / "prior_bench.md",
        csv=out / "prior_bench.csv",
        png=out / "prior_bench.png",
    )
    settings = (
        f"samples per prompt {samples_per}, DDIM steps {steps}, CFG {guidance_scale}, "
        f"x0 clipping {'on' if clip_x0 else 'off'}, x̂0 returned at t <= {stop_at_t}, "
        f"view guidance {view_guidance_scale:g}, other-view negation {other_view_scale:g}, seed {seed}"
    )
    _write_markdown(result, settings, refs)
    _write_csv(result)
    _write_png(result, per_condition, refs)
    return result


# ----------------------------------------------------------------------------- outputs


def summary_table(result: PriorBenchResult) -> str:
    """The per-prompt Markdown table with a totals row (also printed by the CLI)."""
    header = [
        "prompt",
        "view",
        "samples",
        "right",
        "right among prompts",
        "shape right",
        "colour right",
        "view right",
        "mean distance",
        "ceiling right",
        "ceiling right among prompts",
        "ceiling view",
    ]
    body = []
    for r in result.rows:
        n = r.samples
        body.append(
            [
                r.prompt,
                r.view or "—",
                n,
                f"{r.right}/{n}",
                f"{r.right_among_prompts}/{n}",
                f"{r.shape_right}/{n}",
                f"{r.colour_right}/{n}",
                "—" if r.view_right is None else f"{r.view_right}/{n}",
                fmt(r.mean_distance, 4),
                "—" if r.ceiling_right is None else f"{r.ceiling_right}/{n}",
                (
                    "—"
                    if r.ceiling_right_among_prompts is None
                    else f"{r.ceiling_right_among_prompts}/{n}"
                ),
                "—" if r.ceiling_view_right is None else f"{r.ceiling_view_right}/{n}",
            ]
        )
    body.append(
        [
            "**all**",
            "",
            len(result.samples),
            f"**{fmt(result.accuracy)}**",
            f"**{fmt(result.accuracy_among_prompts)}**",
            fmt(result.shape_accuracy),
            fmt(result.colour_accuracy),
            fmt(result.view_accuracy),
            "",
            fmt(result.ceiling_accuracy),
            fmt(result.ceiling_accuracy_among_prompts),
            fmt(result.ceiling_view_accuracy),
        ]
    )
    return markdown_table(header, body)


def _write_markdown(result: PriorBenchResult, settings: str, refs: ReferenceSet) -> None:
    n_refs = len(refs.features)
    elevations = sorted({float(e) for e in refs.elevation_deg.tolist()})
    distances = sorted({round(float(d), 3) for d in refs.distance.tolist()})
    views = n_refs // refs.num_objects
    lights = max(1, len(refs.lights))
    azimuths = views // (len(elevations) * len(distances) * lights)
    text = "\n".join(
        [
            "# Prior benchmark",
            "",
            f"Machine: {machine()}.",
            f"Settings: {settings}. Sampling took {result.seconds:.1f} s.",
            (
                f"Reference set: {refs.num_objects} distinct objects × {views // lights} cameras "
                f"(azimuth every {360 / azimuths:g}°, elevations {elevations}, distances "
                f"{distances}) × {lights} camera-relative lights {list(refs.lights)}, "
                f"{n_refs} images; nearest by L2 after a {BLUR_SIGMA:g} px Gaussian blur. "
                "Metrics: docs/metrics.md."
            ),
            "",
            summary_table(result),
            "",
            (
                "Accuracies in the last row are fractions of all samples (view: of samples of "
                'objects with a front). "right": the nearest render of every object of the '
                'world is the asked object; "right among prompts": the nearest render of the '
                "benchmark prompts' objects is. The ceiling columns score ground-truth renders from "
                "random training cameras the same way: what a perfect prior would get."
            ),
            "",
            "![samples beside their nearest ground truth](prior_bench.png)",
            "",
        ]
    )
    atomic_write_text(result.markdown, text)


def _write_csv(result: PriorBenchResult) -> None:
    header = [
        "prompt",
        "text",
        "view",
        "sample",
        "nearest",
        "nearest_azimuth",
        "nearest_elevation",
        "distance",
        "right",
        "right_among_prompts",
        "shape_right",
        "colour_right",
        "nearest_view",
        "view_right",
    ]
    rows = []
    for sample in result.samples:
        c = result.conditions[sample.condition]
        s = sample.score
        rows.append(
            [
                c.prompt,
                c.text,
                c.view,
                sample.index,
                sample.nearest,
                sample.nearest_azimuth,
                sample.nearest_elevation,
                s.distance,
                int(s.right),
                int(s.right_among_prompts),
                int(s.shape_right),
                int(s.colour_right),
                s.view,
                None if s.view_right is None else int(s.view_right),
            ]
        )
    write_csv(result.csv, header, rows)


def _write_png(result: PriorBenchResult, per_condition: list[Tensor], refs: ReferenceSet) -> None:
    scale = max(1, 96 // int(per_condition[0].shape[-1]))
    rows, labels = [], []
    by_condition: dict[int, list[PriorSample]] = {}
    for s in result.samples:
        by_condition.setdefault(s.condition, []).append(s)
    for c, images in enumerate(per_condition):
        tiles = []
        for s, image in zip(by_condition[c], images):
            sample = framed(
                upscale(to_uint8(image), scale), (40, 170, 60) if s.right else (210, 40, 40)
            )
            tiles.append(sample)
            tiles.append(upscale(to_uint8(refs.image(s.score.reference)), scale))
        rows.append(tiles)
        labels.append(result.conditions[c].text)
    grid_png(result.png, rows, labels)
