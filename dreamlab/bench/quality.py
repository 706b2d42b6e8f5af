"""Quality benchmark: generate 3D objects of the procedural world and compare them with the truth.

For each prompt × seed: build the run config (``make_run_config``, the prior's preset, CPU),
train with one prior loaded once and shared by every run, time it, then render the result on a
fixed evaluation orbit (8 azimuths × elevations 0° and 30°, the training cameras' middle distance
and fov, white background) and the world's ground truth on the SAME cameras with the world's fixed
light. Per-view metrics averaged over the views: silhouette IoU, masked PSNR, foreground colour
error (ΔE*ab) and, for objects with a front, the Janus score and front-feature score. With
``export_mesh`` the mesh is extracted and textured like ``dreamlab generate`` does, timed, and its
topology (Euler characteristic, genus: a torus must have one hole) and mean texture colour are
checked. Exact definitions: docs/metrics.md.

Writes ``quality.md`` (a row per prompt and seed, then means), ``quality.csv`` and
``quality.png`` (per run: a row of result renders above the ground-truth row, every view).
Deterministic: the same arguments give the same numbers (timings aside).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dreamlab.bench.metrics import (
    delta_e,
    foreground_colour_error,
    janus_scores,
    masked_psnr,
    mean_texture_colour,
    mesh_topology,
    saturation_excess,
    silhouette_iou,
)
from dreamlab.bench.report import fmt, grid_png, machine, markdown_table, to_uint8, write_csv
from dreamlab.cameras import CameraSamplerConfig, evaluation_orbit
from dreamlab.export.atomic import atomic_write_text
from dreamlab.priors.base import Prior
from dreamlab.types import Cameras

log = logging.getLogger(__name__)

EVAL_AZIMUTHS = 8
"""Evaluation azimuths, every 45° from 0° (the front)."""
EVAL_ELEVATIONS: tuple[float, ...] = (0.0, 30.0)
"""Evaluation elevations in degrees."""
GT_SUPERSAMPLE = 2
"""Ground-truth renders take supersample² samples per pixel (anti-aliased like the splats)."""

EXPECTED_GENUS: dict[str, int] = {"torus": 1, "mug": 1}
"""Handles of each shape's true surface (torus: the hole; mug: the handle); others have none."""


def expected_genus(shape: str) -> int:
    return EXPECTED_GENUS.get(shape, 0)


def evaluation_cameras(resolution: int) -> Cameras:
    """The fixed evaluation orbit: 8 azimuths × (0°, 30°), middle of the training distance/fov."""
    cams = CameraSamplerConfig()
    return evaluation_orbit(
        resolution,
        num_azimuths=EVAL_AZIMUTHS,
        elevations_deg=EVAL_ELEVATIONS,
        distance=0.5 * sum(cams.distance),
        fov_y_deg=0.5 * sum(cams.fov_y_deg),
    )


EVAL_LIGHT_DEG = (0.0, 35.0)
"""Evaluation light, relative to each camera (azimuth, elevation): the centre of the training
data's light distribution (``WorldDataConfig``: azimuth ±60°, elevation 10–60°, camera frame).
A result bakes the lighting the prior saw into its colours, so its renders are compared with
ground truth lit the way the prior's images were lit."""


def render_truth(spec, cams: Cameras):
    """The world's ground truth on ``cams``: white background, camera-relative light, supersampled."""
    from dreamlab.world.render import camera_relative_light, render_ground_truth

    light = camera_relative_light(cams, *EVAL_LIGHT_DEG)
    return render_ground_truth(
        spec, cams, light_dir=light, background=(1.0, 1.0, 1.0), supersample=GT_SUPERSAMPLE
    )


REFERENCE_VIEW = (15.0, 0.0)
"""(elevation, azimuth) in degrees of VPCSM's reference image in the benchmark: the front view a
user would photograph, from the evaluation orbit's distance and field of view."""


def write_reference_image(spec, path: str | Path, resolution: int = 64) -> Path:
    """Writes the exact front render of ``spec`` (white background) as a PNG, atomically: the
    image prompt VPCSM gets in the benchmark (the issue: "the reference image is a ground-truth
    render of an object")."""
    import io

    from PIL import Image

    from dreamlab.export.atomic import atomic_write_bytes
    from dreamlab.types import orbit_cameras

    sampler = CameraSamplerConfig()
    cams = orbit_cameras(
        torch.tensor([REFERENCE_VIEW[0]]), torch.tensor([REFERENCE_VIEW[1]]),
        torch.tensor([0.5 * sum(sampler.distance)]), torch.tensor([0.5 * sum(sampler.fov_y_deg)]),
        resolution, resolution,
    )
    rgb = render_truth(spec, cams).rgb[0]
    buffer = io.BytesIO()
    Image.fromarray((rgb.clamp(0, 1) * 255.0).round().byte().numpy()).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------- render metrics


@dataclass
class RenderEvaluation:
    """Image metrics of one result against the truth (means over the evaluation views)."""

    iou: float
    psnr: float
    colour_error: float  # mean ΔE*ab over pixels foreground in both (NaN if never any)
    janus: float | None  # objects with a front only
    front_feature: float | None  # objects with a front only
    saturation: float = float("nan")  # mean HSV saturation excess over the truth (metrics.md)
    per_view_iou: list[float] = field(default_factory=list)
    result_rgb: Tensor | None = field(default=None, repr=False)  # [V, H, W, 3]
    gt_rgb: Tensor | None = field(default=None, repr=False)  # [V, H, W, 3]


def _nanmean(values: Tensor) -> float:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else float("nan")


def front_feature_mask(gt, shape: str) -> Tensor:
    """[V, H, W] bool: pixels where the truth shows one of the shape's front-only parts."""
    from dreamlab.world.catalog import front_parts

    ids = torch.tensor(front_parts(shape), dtype=torch.long)
    return torch.isin(gt.part.cpu(), ids)


def evaluate_images(
    result_rgb: Tensor, result_alpha: Tensor, gt, cams: Cameras, shape: str
) -> RenderEvaluation:
    """Metrics of result renders against ground truth rendered on the same cameras.

    Args:
        result_rgb: [V, H, W, 3] result over a white background.
        result_alpha: [V, H, W] or [V, H, W, 1] accumulated opacity.
        gt: the world's GroundTruth for ``cams`` (rgb, mask, part).
        cams: the V cameras (their azimuths/elevations pick the Janus views).
        shape: the object's shape word; objects with a front also get the Janus and
            front-feature scores.
    """
    from dreamlab.world.catalog import has_front

    result_rgb = result_rgb.detach().float().cpu()
    result_alpha = result_alpha.detach().float().cpu()
    gt_rgb, gt_mask = gt.rgb.float().cpu(), gt.mask.float().cpu()
    assert result_rgb.shape == gt_rgb.shape, (result_rgb.shape, gt_rgb.shape)
    iou = silhouette_iou(result_alpha, gt_mask)
    psnr = masked_psnr(result_rgb, gt_rgb, result_alpha, gt_mask)
    colour = foreground_colour_error(result_rgb, gt_rgb, result_alpha, gt_mask)
    saturation = saturation_excess(result_rgb, gt_rgb, result_alpha, gt_mask)
    janus = front = None
    if has_front(shape):
        janus, front = janus_scores(
            result_rgb,
            gt_rgb,
            front_feature_mask(gt, shape),
            cams.azimuth_deg.cpu(),
            cams.elevation_deg.cpu(),
        )
    return RenderEvaluation(
        iou=float(iou.mean()),
        psnr=float(psnr.mean()),
        colour_error=_nanmean(colour),
        janus=janus,
        front_feature=front,
        saturation=_nanmean(saturation),
        per_view_iou=[float(v) for v in iou],
        result_rgb=result_rgb,
        gt_rgb=gt_rgb,
    )


@torch.no_grad()
def evaluate_renderer(renderer, spec, resolution: int = 64, gt=None) -> RenderEvaluation:
    """Renders ``renderer`` (anything with ``render(cams, background)``) and the truth of
    ``spec`` on :func:`evaluation_cameras` and compares them."""
    cams = evaluation_cameras(resolution)
    gt = gt if gt is not None else render_truth(spec, cams)
    device = _device_of(renderer)
    out = renderer.render(cams.to(device), torch.ones(len(cams), 3, device=device))
    return evaluate_images(out.rgb, out.alpha, gt, cams, spec.shape)


def _device_of(renderer) -> torch.device:
    for tensor in getattr(renderer, "parameters", lambda: iter(()))():
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- mesh checks


@dataclass
class MeshEvaluation:
    """The exported mesh: timing, topology and colour."""

    seconds: float
    components: int | None = None
    euler: int | None = None
    genus: float | None = None
    expected_genus: int | None = None
    faces: int | None = None
    texture_rgb: tuple[float, float, float] | None = None  # area-weighted mean base colour
    colour_delta_e: float | None = None  # ΔE*ab of texture_rgb vs the prompt's lit colour
    colour_match: str | None = None  # palette colour whose lit colour is nearest texture_rgb
    error: str | None = None  # why there is no mesh (e.g. nothing above the threshold)

    @property
    def genus_ok(self) -> bool | None:
        if self.genus is None or self.expected_genus is None or math.isnan(self.genus):
            return None
        return self.genus == self.expected_genus


def effective_colour(spec) -> str | None:
    """The palette colour of a spec's body: its colour word, grey for a bare primitive, None for
    a composite with its own default colours."""
    from dreamlab.world.catalog import DEFAULT_PRIMITIVE_COLOUR, has_front

    if spec.colour is not None:
        return spec.colour
    return None if has_front(spec.shape) else DEFAULT_PRIMITIVE_COLOUR


def mean_body_shading(gt) -> float:
    """Mean shading factor over the truth's body pixels (part 0) of every view: what the light
    multiplies an albedo by, on average, in the views the result is judged on."""
    shading = gt.shading.float()
    if shading.ndim == 4:
        shading = shading.mean(-1)
    body = gt.part == 0
    return float(shading[body].mean()) if bool(body.any()) else 1.0


def colour_check(texture_rgb: np.ndarray, spec, shading: float) -> tuple[float | None, str | None]:
    """(ΔE*ab of the mean texture colour vs the prompt colour's lit albedo, nearest lit palette
    colour). Lit colour = albedo × mean body shading of the truth (the light is baked into what
    SDS learns, so comparing with the bare albedo would punish every result). (None, None) for a
    composite with default colours."""
    from dreamlab.world.catalog import COLOURS

    colour = effective_colour(spec)
    if colour is None:
        return None, None
    tex = torch.tensor(np.asarray(texture_rgb, dtype=np.float32))
    names = list(COLOURS)
    lit = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) * shading
    distances = delta_e(tex.expand(len(names), 3), lit)
    return float(distances[names.index(colour)]), names[int(distances.argmin())]


def evaluate_mesh(renderer, spec, export_cfg, gt) -> MeshEvaluation:
    """Extracts and textures the mesh (``dreamlab.export.textured_mesh``) and checks it."""
    from dreamlab.export import textured_mesh

    started = time.perf_counter()
    try:
        extracted, textured = textured_mesh(renderer, export_cfg)
    except ValueError as err:  # nothing to mesh
        return MeshEvaluation(
            seconds=time.perf_counter() - started,
            error=str(err).splitlines()[0],
            expected_genus=expected_genus(spec.shape),
        )
    seconds = time.perf_counter() - started
    components, chi, genus = mesh_topology(extracted.mesh.vertices, extracted.mesh.faces)
    rgb = mean_texture_colour(textured.uvs, textured.faces, textured.vertices, textured.texture)
    delta, match = colour_check(rgb, spec, mean_body_shading(gt))
    return MeshEvaluation(
        seconds=seconds,
        components=components,
        euler=chi,
        genus=genus,
        expected_genus=expected_genus(spec.shape),
        faces=len(extracted.mesh.faces),
        texture_rgb=tuple(float(c) for c in rgb),
        colour_delta_e=delta,
        colour_match=match,
    )


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class QualityRow:
    """One generated object (prompt × seed)."""

    prompt: str
    seed: int
    steps: int
    iou: float
    psnr: float
    colour_error: float
    janus: float | None
    front_feature: float | None
    train_seconds: float
    mesh: MeshEvaluation | None
    saturation: float
    evaluation: RenderEvaluation = field(repr=False)


@dataclass
class QualityMeans:
    """Means over the rows (Janus / front feature over rows of objects with a front)."""

    iou: float
    psnr: float
    colour_error: float
    janus: float | None
    front_feature: float | None
    train_seconds: float
    export_seconds: float | None
    saturation: float
    genus_ok: float | None  # fraction of meshed rows whose genus is the expected one


@dataclass
class QualityBenchResult:
    rows: list[QualityRow]
    means: QualityMeans
    markdown: Path
    csv: Path
    png: Path


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


def _load_prior(prior: str | Prior) -> tuple[Prior, str, str]:
    """(prior, name recorded in the configs, name whose preset applies)."""
    from dreamlab.priors import load_prior
    from dreamlab.priors.builtin import BuiltinPrior

    if isinstance(prior, Prior):
        loaded, name = prior, "builtin" if isinstance(prior, BuiltinPrior) else type(prior).__name__
    else:
        loaded, name = load_prior(prior, device="cpu"), str(prior)
    preset = "builtin" if isinstance(loaded, BuiltinPrior) else name
    return loaded, name, preset


def run_quality_bench(
    prompts: Sequence[str] | None = None,
    guidance: str = "sds",
    renderer: str = "gaussians",
    steps: int | None = None,
    seeds: Sequence[int] = (0,),
    prior: str | Prior = "builtin",
    out_dir: Path | str = Path("bench-results/quality"),
    eval_resolution: int = 64,
    export_mesh: bool = True,
    export_cfg=None,
    guidance_options=None,
    renderer_options=None,
) -> QualityBenchResult:
    """Generates every prompt × seed on the CPU and scores it against the world (module docstring).

    Args:
        prompts: builtin-world prompts (default ``benchmark_prompts()``); every prompt is parsed
            before anything trains (UnknownWordError / PromptFormatError, both ValueErrors).
        guidance, renderer: names from ``GUIDANCES`` / ``RENDERERS``.
        steps: optimisation steps (None: the prior's preset).
        seeds: one run per seed and prompt.
        prior: a prior name or folder (loaded once), or a loaded Prior. A builtin prior (by name,
            folder or object) gets the builtin preset (white background, 64 px, CFG 7.5).
        out_dir: where quality.md / .csv / .png go (created).
        eval_resolution: pixels of the evaluation renders.
        export_mesh: extract and texture the mesh and check it (timed as export seconds).
        export_cfg: export settings for the mesh check (default: the run config's, i.e. what
            ``dreamlab generate`` would export).
        renderer_options: the renderer's ``--<renderer>.<field>`` options (``--nerf.*``), or None.
        guidance_options: the method's ``--<guidance>.<field>`` options (``guidance/options.py``),
            applied on top of the builtin preset; None for the preset as is.
    """
    from dreamlab.config import make_run_config
    from dreamlab.train import Trainer
    from dreamlab.world.catalog import benchmark_prompts, parse_prompt

    prompts = [p.strip() for p in (benchmark_prompts() if prompts is None else prompts)]
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ValueError("no prompts to benchmark")
    if not seeds:
        raise ValueError("no seeds: give at least one")
    if eval_resolution < 8:
        raise ValueError(f"eval resolution must be >= 8 pixels, got {eval_resolution}")
    specs = [parse_prompt(p) for p in prompts]
    # Settings errors (unknown guidance, bad steps) surface before the prior loads. VPCSM's image
    # prompt is each object's exact front render (write_reference_image).
    needs_image = guidance == "vpcsm"
    checked = make_run_config(
        prompts[0],
        prior="builtin",
        guidance=guidance,
        renderer=renderer,
        steps=steps,
        seed=seeds[0],
        device="cpu",
        image_prompt="reference.png" if needs_image else None,
    )
    chosen_options = {}
    if guidance_options is not None:
        from dreamlab.guidance.options import apply_options

        apply_options(checked.guidance, guidance_options).validate()
        chosen_options = {f.name: getattr(guidance_options, f.name) for f in fields(guidance_options)
                          if getattr(guidance_options, f.name) is not None}
    loaded, prior_name, preset = _load_prior(prior)
    loaded.encode_prompt(prompts)  # words the prior does not know fail before training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cams = evaluation_cameras(eval_resolution)

    rows: list[QualityRow] = []
    for prompt, spec in zip(prompts, specs):
        gt = render_truth(spec, cams)
        reference = None
        if needs_image:
            reference = write_reference_image(spec, out / "image-prompts" / f"{spec.shape}-{spec.colour or 'plain'}.png")
        for seed in seeds:
            cfg = make_run_config(
                prompt,
                prior=preset,
                guidance=guidance,
                renderer=renderer,
                steps=steps,
                seed=seed,
                device="cpu",
                image_prompt=None if reference is None else str(reference),
            )
            if guidance_options is not None:
                from dreamlab.guidance.options import apply_options

                cfg.guidance = apply_options(cfg.guidance, guidance_options)
                cfg.validate()
            if renderer_options is not None:
                from dreamlab.guidance.options import apply_options

                cfg.renderer = apply_options(cfg.renderer, renderer_options)
                cfg.validate()
            cfg.prior = prior_name
            cfg.train.preview_every = 0  # previews cost time and change nothing
            started = time.perf_counter()
            trainer = Trainer(cfg, prior=loaded)
            for _ in trainer:
                pass
            train_seconds = time.perf_counter() - started
            evaluation = evaluate_renderer(trainer.renderer, spec, eval_resolution, gt=gt)
            mesh = None
            if export_mesh:
                mesh = evaluate_mesh(trainer.renderer, spec, export_cfg or cfg.export, gt)
            rows.append(
                QualityRow(
                    prompt=prompt,
                    seed=seed,
                    steps=cfg.train.steps,
                    iou=evaluation.iou,
                    psnr=evaluation.psnr,
                    colour_error=evaluation.colour_error,
                    janus=evaluation.janus,
                    front_feature=evaluation.front_feature,
                    train_seconds=train_seconds,
                    mesh=mesh,
                    saturation=evaluation.saturation,
                    evaluation=evaluation,
                )
            )
            log.info(
                "quality bench: %s seed %d: IoU %.3f, %.1f s",
                prompt,
                seed,
                evaluation.iou,
                train_seconds,
            )

    meshed = [r.mesh for r in rows if r.mesh is not None]
    genus_checks = [m.genus_ok for m in meshed if m.genus_ok is not None]
    means = QualityMeans(
        iou=_mean([r.iou for r in rows]),
        psnr=_mean([r.psnr for r in rows]),
        colour_error=_mean([r.colour_error for r in rows]) or float("nan"),
        janus=_mean([r.janus for r in rows]),
        front_feature=_mean([r.front_feature for r in rows]),
        train_seconds=_mean([r.train_seconds for r in rows]),
        export_seconds=_mean([m.seconds for m in meshed]),
        genus_ok=(sum(genus_checks) / len(genus_checks)) if genus_checks else None,
        saturation=_nan_if_none(_mean([r.saturation for r in rows])),
    )
    result = QualityBenchResult(
        rows=rows,
        means=means,
        markdown=out / "quality.md",
        csv=out / "quality.csv",
        png=out / "quality.png",
    )
    settings = (
        f"guidance {guidance}"
        + "".join(f", {guidance}.{k} {v}" for k, v in chosen_options.items())
        + f", renderer {renderer}, prior {prior_name}, steps "
        f"{rows[0].steps if steps is None else steps}, seeds {seeds}, "
        f"evaluation {eval_resolution} px, "
        f"{EVAL_AZIMUTHS} azimuths × elevations {list(EVAL_ELEVATIONS)}"
    )
    _write_markdown(result, settings)
    _write_csv(result)
    _write_png(result)
    return result


def _genus_cell(mesh: MeshEvaluation | None) -> str:
    if mesh is None:
        return "—"
    if mesh.error is not None:
        return "no mesh"
    g = mesh.genus
    text = str(int(g)) if g is not None and float(g).is_integer() else fmt(g, 1)
    return f"{text} ({'ok' if mesh.genus_ok else f'want {mesh.expected_genus}'})"


def _colour_cell(mesh: MeshEvaluation | None) -> str:
    if mesh is None or mesh.texture_rgb is None:
        return "—"
    hexcode = "#" + "".join(f"{round(c * 255):02x}" for c in mesh.texture_rgb)
    if mesh.colour_match is None:
        return hexcode
    return f"{hexcode} ≈ {mesh.colour_match} (ΔE {mesh.colour_delta_e:.0f})"


def summary_table(result: QualityBenchResult) -> str:
    """The per-run Markdown table with a means row (also printed by the CLI)."""
    header = [
        "prompt",
        "seed",
        "IoU",
        "PSNR (dB)",
        "colour ΔE",
        "saturation",
        "Janus",
        "front feature",
        "train s",
        "export s",
        "genus",
        "texture colour",
    ]
    body = []
    for r in result.rows:
        body.append(
            [
                r.prompt,
                r.seed,
                fmt(r.iou),
                fmt(r.psnr, 2),
                fmt(r.colour_error, 1),
                fmt(r.saturation, 3),
                fmt(r.janus),
                fmt(r.front_feature),
                fmt(r.train_seconds, 1),
                fmt(None if r.mesh is None else r.mesh.seconds, 1),
                _genus_cell(r.mesh),
                _colour_cell(r.mesh),
            ]
        )
    m = result.means
    body.append(
        [
            "**mean**",
            "",
            f"**{fmt(m.iou)}**",
            fmt(m.psnr, 2),
            fmt(m.colour_error, 1),
            fmt(m.saturation, 3),
            fmt(m.janus),
            fmt(m.front_feature),
            fmt(m.train_seconds, 1),
            fmt(m.export_seconds, 1),
            "—" if m.genus_ok is None else f"{fmt(m.genus_ok, 2)} ok",
            "",
        ]
    )
    return markdown_table(header, body)


def _write_markdown(result: QualityBenchResult, settings: str) -> None:
    text = "\n".join(
        [
            "# Quality benchmark",
            "",
            f"Machine: {machine()}.",
            f"Settings: {settings}. Metrics: docs/metrics.md.",
            "",
            summary_table(result),
            "",
            (
                "Janus: 0 = no front features on the sides/back, 1 = the rear views look like the "
                "front; it means something only where the front feature formed (front feature well "
                "above 0)."
            ),
            "",
            "![per run: result row above ground-truth row, every evaluation view](quality.png)",
            "",
        ]
    )
    atomic_write_text(result.markdown, text)


def _write_csv(result: QualityBenchResult) -> None:
    header = [
        "prompt",
        "seed",
        "steps",
        "iou",
        "psnr_db",
        "colour_delta_e",
        "saturation_excess",
        "janus",
        "front_feature",
        "train_seconds",
        "export_seconds",
        "mesh_faces",
        "components",
        "euler",
        "genus",
        "expected_genus",
        "genus_ok",
        "texture_r",
        "texture_g",
        "texture_b",
        "texture_delta_e",
        "texture_colour_match",
        "mesh_error",
    ]
    rows = []
    for r in result.rows:
        m = r.mesh
        tex = m.texture_rgb if m is not None and m.texture_rgb is not None else (None, None, None)
        rows.append(
            [
                r.prompt,
                r.seed,
                r.steps,
                r.iou,
                r.psnr,
                r.colour_error,
                r.saturation,
                r.janus,
                r.front_feature,
                r.train_seconds,
                *(
                    (None,) * 6
                    if m is None
                    else (m.seconds, m.faces, m.components, m.euler, m.genus, m.expected_genus)
                ),
                None if m is None or m.genus_ok is None else int(m.genus_ok),
                *tex,
                None if m is None else m.colour_delta_e,
                None if m is None else m.colour_match,
                None if m is None else m.error,
            ]
        )
    write_csv(result.csv, header, rows)


def _write_png(result: QualityBenchResult) -> None:
    rows, labels = [], []
    for r in result.rows:
        ev = r.evaluation
        assert ev.result_rgb is not None and ev.gt_rgb is not None
        rows.append([to_uint8(img) for img in ev.result_rgb])
        labels.append(f"{r.prompt} (seed {r.seed})")
        rows.append([to_uint8(img) for img in ev.gt_rgb])
        labels.append("  ground truth")
    grid_png(result.png, rows, labels, gap=2)
