"""RunConfig: one generation run, composed of the component configs, plus presets and JSON I/O.

Configs are stdlib dataclasses with attribute docstrings (shown as CLI help). A run writes its
full config as ``config.json`` beside its outputs; ``config_from_json`` reads it back exactly, so
a run can be re-run or resumed from it. Schedules and other union-typed fields are written with a
``"__type__"`` tag.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dreamlab import schedules
from dreamlab.cameras import CameraSamplerConfig
from dreamlab.export import ExportConfig, VideoConfig
from dreamlab.guidance import BUILTIN_PRIOR_GUIDANCE_PRESETS, GUIDANCES, GuidanceConfig
from dreamlab.guidance.sds import SDSConfig
from dreamlab.prompts import PromptConfig
from dreamlab.renderers.gaussians.model import GaussianConfig
from dreamlab.renderers.nerf.model import NeRFConfig

MAX_PROMPT_CHARS = 1000
"""Longer prompts are refused: text encoders read 77 tokens, the rest would be silently lost."""

CPU_FRIENDLY_VIDEO = VideoConfig(num_frames=72, resolution=256, fps=24)
"""Default turntable: 3 s at 256 px renders in seconds on a CPU (pass a bigger one on a GPU)."""

BUILTIN_PRIOR = "builtin"
"""Name of dreamlab's own offline prior (closed vocabulary; weights in assets/builtin-prior)."""

DEFAULT_PRIOR = BUILTIN_PRIOR
"""Works offline out of the box; Stable Diffusion priors are a --prior away."""


@dataclass
class BackgroundConfig:
    """Backgrounds composited behind the renders during training."""

    mode: Literal["white", "black", "random", "white-or-black"] = "white-or-black"
    """white / black: always that colour; random: a random solid colour per view;
    white-or-black: white, or black with probability ``black_probability`` (DreamGaussian)."""
    black_probability: float = 0.5
    """With mode white-or-black: probability of a black background for a view."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 500
    """Optimisation steps (DreamGaussian uses 500)."""
    seed: int = 0
    """Seeds every random choice of the run; same seed and config give the same result."""
    resolution: schedules.Piecewise = field(
        default_factory=lambda: schedules.Piecewise((64.0, 128.0), (0.5,))
    )
    """Render resolution (pixels, square) as a function of progress."""
    cameras: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas (threestudio uses 0.9, 0.99)."""
    adam_eps: float = 1e-15
    """Adam epsilon (3DGS / threestudio use 1e-15)."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    preview_every: int = 50
    """Attach a preview render to the step report every N steps (0: never)."""
    preview_resolution: int = 128
    """Resolution of the preview renders."""


@dataclass
class RunConfig:
    """Everything that defines one generation run."""

    prompt: str
    """The text prompt."""
    prior: str = DEFAULT_PRIOR
    """Diffusion prior: a short name (see ``dreamlab.priors.PRIORS``), a hub id, or a local diffusers folder."""
    guidance: GuidanceConfig = field(default_factory=SDSConfig)
    """Score-distillation rule and its settings."""
    renderer: GaussianConfig | NeRFConfig = field(default_factory=GaussianConfig)
    """3D representation and its settings (Gaussian splats or a hash-grid NeRF)."""
    prompt_processing: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=lambda: ExportConfig(video=CPU_FRIENDLY_VIDEO))
    """Mesh extraction, texture bake and video settings."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N."""
    half_precision: bool = True
    """Run the frozen prior in fp16 on GPU (always fp32 on CPU)."""

    def validate(self) -> None:
        """Raises ValueError with a one-line, actionable message for impossible settings."""
        validate_prompt(self.prompt)
        if self.train.steps < 1:
            raise ValueError(f"--steps must be a positive number of steps, got {self.train.steps}")
        if self.train.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.train.checkpoint_every}")
        if self.train.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.train.keep_checkpoints}")
        for value in self.train.resolution.values:
            if not 8 <= value <= 4096 or value != int(value):
                raise ValueError(f"render resolutions must be whole numbers in [8, 4096], got {value}")
        if not 0.0 <= self.train.background.black_probability <= 1.0:
            raise ValueError("background black_probability must lie in [0, 1]")
        self.train.cameras.validate()
        for component in (self.guidance, self.renderer, self.export):
            check = getattr(component, "validate", None)
            if check is not None:
                check()


def make_run_config(
    prompt: str,
    prior: str | None = None,
    guidance: str = "sds",
    renderer: str = "gaussians",
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    gaussians: int | None = None,
    resolution: int | None = None,
    negative_prompt: str = "",
    checkpoint_every: int = 100,
    device: str = "auto",
    image_prompt: str | None = None,
    rasterizer: str | None = None,
    init_from: str | None = None,
) -> RunConfig:
    """A validated RunConfig: the preset for the chosen prior, then the given overrides.

    Presets are short diffs in Python (``_apply_prior_preset``). Raises ValueError with a
    one-line message for unknown names or impossible settings.
    """
    from dreamlab.renderers import RENDERERS

    prior = prior or DEFAULT_PRIOR
    if guidance not in GUIDANCES:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of: {', '.join(GUIDANCES)}")
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r}; choose one of: {', '.join(RENDERERS)}")
    cfg = RunConfig(
        prompt=prompt,
        prior=prior,
        guidance=GUIDANCES[guidance](),
        renderer=RENDERERS[renderer](),
        prompt_processing=PromptConfig(negative_prompt=negative_prompt),
        train=TrainConfig(seed=seed, checkpoint_every=checkpoint_every),
        device=device,
    )
    _apply_prior_preset(cfg)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be a positive number of steps, got {steps}")
        cfg.train.steps = steps
    if guidance_scale is not None:
        if guidance_scale < 0:
            raise ValueError(f"--guidance-scale must be >= 0, got {guidance_scale}")
        if not hasattr(cfg.guidance, "guidance_scale"):
            raise ValueError(
                f"--guidance-scale does not apply to {guidance}: it has no single CFG scale; "
                f"see `dreamlab generate --guidance {guidance} --help` for its weights"
            )
        cfg.guidance = dataclasses.replace(cfg.guidance, guidance_scale=guidance_scale)
    if image_prompt is not None:
        if not hasattr(cfg.guidance, "image_prompt"):
            raise ValueError(f"--image-prompt applies to --guidance vpcsm only, not {guidance}")
        cfg.guidance = dataclasses.replace(cfg.guidance, image_prompt=str(image_prompt))
    if gaussians is not None:
        if not isinstance(cfg.renderer, GaussianConfig):
            raise ValueError(f"--gaussians applies to the gaussians renderer, not {renderer!r}")
        if gaussians < 1:
            raise ValueError(f"--gaussians must be >= 1, got {gaussians}")
        cfg.renderer = dataclasses.replace(cfg.renderer, num_init=gaussians)
    if init_from is not None:
        if not isinstance(cfg.renderer, GaussianConfig):
            raise ValueError(f"--init-from applies to the gaussians renderer, not {renderer!r}")
        source = Path(init_from).expanduser()
        if not source.exists():
            raise ValueError(f"--init-from {init_from}: no such run folder or checkpoint file")
        cfg.renderer = dataclasses.replace(cfg.renderer, init_from=str(source.resolve()))
    if rasterizer is not None:
        from dreamlab.renderers.gaussians.rasterize import BACKENDS

        if rasterizer not in BACKENDS:
            raise ValueError(
                f"unknown --rasterizer {rasterizer!r}; choose one of: {', '.join(BACKENDS)}"
            )
        if not hasattr(cfg.renderer, "backend"):
            raise ValueError(f"--rasterizer does not apply to the {renderer!r} renderer")
        cfg.renderer = dataclasses.replace(cfg.renderer, backend=rasterizer)
    if resolution is not None:
        if not 8 <= resolution <= 4096:
            raise ValueError(f"--resolution must lie in [8, 4096] pixels, got {resolution}")
        cfg.train.resolution = schedules.Piecewise((float(resolution),), ())
    cfg.validate()
    return cfg


BUILTIN_PRIOR_NERF_RESOLUTION = 32
"""NeRF render size with the builtin prior: the prior sees 32 px images, and volume rendering
costs per pixel (64 px renders are downsampled to 32 anyway; step times in docs/benchmarks.md)."""

BUILTIN_PRIOR_NERF_PRESET: dict[str, Any] = dict(
    log2_hashmap_size=16,
    max_resolution=256,
    num_levels=12,
    num_samples=48,
)
"""NeRF settings with the builtin prior on a CPU: 12 levels of at most 2^16 rows (1.2 M parameters
instead of the GPU recipe's 16 x 2^19 = 17 M, each updated by Adam every step), a finest level of
256 cells across the box (~8 per pixel of a 32 px render) and 48 samples per ray (step times
against samples per ray: docs/benchmarks.md)."""


BUILTIN_PRIOR_ELEVATION_DEG = (-10.0, 55.0)
"""Training camera elevations (degrees) with the builtin prior, above the usual (-10, 45). The
world's torus shows its hole only from above ~36 degrees (tube radius 0.14 over a hole radius
0.19), so at (-10, 45) few views saw through it and SDS left a pillar in it (mesh genus 2 / 4 at
seeds 0 / 1); at (-10, 55) both seeds give genus 1. The prior itself was trained at (-10, 45)
and extrapolates to the higher views; 60 cost the capsule 0.03 IoU (docs/builtin-prior.md,
"Training elevations"). Gaussians only: the NeRF's torus closes its hole at either range and lost
0.018 IoU at 55, so the NeRF keeps (-10, 45)."""


def _apply_prior_preset(cfg: RunConfig) -> None:
    """Per-prior defaults. The builtin prior saw white backgrounds and 32 px images in training,
    and likes a low CFG scale (per-method scales: ``BUILTIN_PRIOR_GUIDANCE_PRESETS``). Its world's
    objects fit in a ball of radius ~0.55 and are ~0.3 in half-width, so Gaussians start in a
    ball of radius 0.35 rather than DreamGaussian's 0.5, which left SDS results too wide (cube:
    IoU 0.725 -> 0.739 at CFG 7.5, docs/builtin-prior.md)."""
    from dreamlab.priors.builtin import BuiltinPrior

    if cfg.prior != BUILTIN_PRIOR and not BuiltinPrior.is_builtin_folder(cfg.prior):
        return
    preset = BUILTIN_PRIOR_GUIDANCE_PRESETS.get(guidance_name(cfg.guidance), {})
    if preset:
        cfg.guidance = dataclasses.replace(cfg.guidance, **preset)
    cfg.train.background = BackgroundConfig(mode="white")
    cfg.train.resolution = schedules.Piecewise((64.0,), ())
    cfg.train.steps = 600
    if isinstance(cfg.renderer, GaussianConfig):
        cfg.renderer = dataclasses.replace(cfg.renderer, num_init=2000, init_radius=0.35)
        cfg.train.cameras = dataclasses.replace(cfg.train.cameras, elevation_deg=BUILTIN_PRIOR_ELEVATION_DEG)
    if isinstance(cfg.renderer, NeRFConfig):
        cfg.renderer = dataclasses.replace(cfg.renderer, **BUILTIN_PRIOR_NERF_PRESET)
        cfg.train.resolution = schedules.Piecewise((float(BUILTIN_PRIOR_NERF_RESOLUTION),), ())


def validate_prompt(prompt: str) -> str:
    """Returns the stripped prompt, or raises ValueError saying what is wrong with it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('the prompt is empty: describe the object, e.g. dreamlab generate "a red cube"')
    text = prompt.strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed "
            "(text encoders read only the first 77 tokens): shorten it"
        )
    if "/" in text or "\\" in text:
        raise ValueError(
            "the prompt contains a path separator ('/' or '\\'), which dreamlab does not accept "
            "in prompts (they also name output folders): rephrase without it"
        )
    if any(ord(ch) < 32 for ch in text):
        raise ValueError("the prompt contains control characters (newlines, tabs, NUL): use plain text")
    return text


def guidance_name(cfg: GuidanceConfig) -> str:
    """The GUIDANCES key of a guidance config."""
    for name, config_type in GUIDANCES.items():
        if type(cfg) is config_type:
            return name
    raise KeyError(f"unregistered guidance config {type(cfg).__name__}")


# --------------------------------------------------------------------------- JSON round trip


def _known_dataclasses() -> dict[str, type]:
    """Every dataclass type a RunConfig may contain, by class name (for ``__type__`` tags)."""
    known: dict[str, type] = {}

    def visit(tp: Any) -> None:
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp.__name__ in known:
                return
            known[tp.__name__] = tp
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(RunConfig)
    for config_type in GUIDANCES.values():
        visit(config_type)
    return known


def to_jsonable(value: Any) -> Any:
    """Dataclasses -> dicts tagged with ``__type__``; tuples -> lists; Paths -> str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"__type__": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = to_jsonable(getattr(value, f.name))
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _from_jsonable(value: Any, hint: Any, known: dict[str, type]) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(value, dict) and "__type__" in value:
        cls = known.get(value["__type__"])
        if cls is None:
            raise ValueError(f"unknown config type {value['__type__']!r} in config file")
        hints = typing.get_type_hints(cls)
        kwargs = {
            name: _from_jsonable(v, hints[name], known)
            for name, v in value.items()
            if name != "__type__" and name in hints
        }
        return cls(**kwargs)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
        non_none = [a for a in typing.get_args(hint) if a is not type(None)]
        return _from_jsonable(value, non_none[0], known) if len(non_none) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(v, args[0], known) for v in value)
        return tuple(_from_jsonable(v, a, known) for v, a in zip(value, args))
    if origin is list and isinstance(value, list):
        (arg,) = typing.get_args(hint) or (Any,)
        return [_from_jsonable(v, arg, known) for v in value]
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value


def config_to_json(cfg: RunConfig) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=False)


def config_from_json(text: str) -> RunConfig:
    """Inverse of config_to_json. Raises ValueError on malformed input."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config is not valid JSON: {err}") from None
    cfg = _from_jsonable(data, RunConfig, _known_dataclasses())
    if not isinstance(cfg, RunConfig):
        raise ValueError("config file does not describe a dreamlab run")
    return cfg


def _same_settings(stored, current, default) -> bool:
    """Deep comparison of fingerprint data; a key ``stored`` lacks (a setting added to dreamlab
    after the checkpoint was written) matches when ``current`` holds that setting's default."""
    if isinstance(stored, dict) and isinstance(current, dict):
        default = default if isinstance(default, dict) else {}
        for key, value in current.items():
            if key in stored:
                if not _same_settings(stored[key], value, default.get(key)):
                    return False
            elif key not in default or value != default[key]:
                return False
        return all(key in current for key in stored)
    return stored == current


def fingerprint_matches(stored: str, cfg: RunConfig) -> bool:
    """True when a checkpoint's fingerprint ``stored`` is this run's (:func:`training_fingerprint`),
    tolerating settings added after the checkpoint was written as long as they are at their
    defaults here: a dreamlab upgrade that adds an option does not orphan existing runs."""
    current = training_fingerprint(cfg)
    if stored == current:
        return True
    try:
        old = json.loads(stored)
    except ValueError:
        return False
    defaults = RunConfig(
        prompt=cfg.prompt, guidance=type(cfg.guidance)(), renderer=type(cfg.renderer)(),
    )
    return _same_settings(old, json.loads(current), json.loads(training_fingerprint(defaults)))


def training_fingerprint(cfg: RunConfig) -> str:
    """JSON of everything that changes the optimisation (not export settings or device).

    A run may be resumed only with the same fingerprint, or it would not be the same run.
    """
    data = to_jsonable(cfg)
    for key in ("export", "device"):
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)
