"""Per-method command-line options: schedule expressions, help text, and what overrides what."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from dreamlab.cli import _parse, build_run_config, guidance_from_argv, main
from dreamlab.guidance import BUILTIN_PRIOR_GUIDANCE_PRESETS, GUIDANCES
from dreamlab.guidance.options import field_docs, format_schedule, options_type, parse_schedule
from dreamlab.guidance.sds import SDSConfig
from dreamlab.schedules import Constant, Exponential, Linear, SqrtAnneal


@pytest.mark.parametrize(
    "text, schedule",
    [
        ("0.5", Constant(0.5)),
        ("linear:0.98,0.5", Linear(0.98, 0.5)),
        ("linear:0.98,0.5,0.1,0.6", Linear(0.98, 0.5, 0.1, 0.6)),
        ("sqrt:0.98,0.02", SqrtAnneal(0.98, 0.02)),
        ("exp:0.001,1e-05", Exponential(1e-3, 1e-5)),
    ],
)
def test_schedule_expressions_round_trip(text, schedule):
    assert parse_schedule(text) == schedule
    assert parse_schedule(format_schedule(schedule)) == schedule


@pytest.mark.parametrize("bad", ["", "fast", "linear:1", "sqrt:1,2,3", "exp:0,1", "linear:a,b"])
def test_bad_schedule_expressions_name_the_syntax(bad):
    with pytest.raises(ValueError, match="linear:START,END"):
        parse_schedule(bad)


@pytest.mark.parametrize("name", list(GUIDANCES))
def test_every_method_gets_documented_options(name):
    options = options_type(name, GUIDANCES[name])
    docs = field_docs(GUIDANCES[name])
    assert options.__dataclass_fields__, name
    for field_name in options.__dataclass_fields__:
        base = field_name.rsplit("_t_", 1)[0].removesuffix("_kind")
        assert docs.get(base), f"{name}.{base} has no docstring (it is the option's help text)"


def test_options_override_the_preset_only_where_given():
    argv = ["generate", "a red cube", "--sds.weighting", "uniform", "--sds.timesteps-t-max", "linear:0.98,0.5",
            "--sds.grad-clip", "linear:0.5,2"]
    cfg = build_run_config(_parse(argv))
    assert cfg.guidance.weighting == "uniform"
    assert cfg.guidance.timesteps.t_max == Linear(0.98, 0.5)
    assert cfg.guidance.grad_clip == Linear(0.5, 2.0)
    preset = BUILTIN_PRIOR_GUIDANCE_PRESETS["sds"]["guidance_scale"]
    assert cfg.guidance.guidance_scale == preset  # the builtin prior's preset, untouched
    plain = build_run_config(_parse(["generate", "a red cube"]))
    assert plain.guidance.weighting == SDSConfig().weighting and plain.guidance.grad_clip is None
    assert build_run_config(_parse(argv + ["--sds.guidance-scale", "20"])).guidance.guidance_scale == 20.0


def test_guidance_name_is_read_before_parsing():
    assert guidance_from_argv(["a cube"]) == "sds"
    assert guidance_from_argv(["a cube", "--guidance", "sds"]) == "sds"
    assert guidance_from_argv(["--guidance=sds", "a cube"]) == "sds"


def test_bad_option_values_are_one_line_errors(capsys):
    assert main(["generate", "a red cube", "--sds.timesteps-t-max", "soon"]) == 2
    err = capsys.readouterr().err
    assert "dreamlab: error:" in err and "linear:START,END" in err and "Traceback" not in err
    assert main(["generate", "a red cube", "--sds.timesteps-t-min", "0.9", "--sds.timesteps-t-max", "0.5"]) == 2
    assert "timestep range is empty" in capsys.readouterr().err


def test_method_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--guidance", "sds", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--sds.weighting" in out and "paper default" in out and "fantasia3d" in out


# ------------------------------------------------------------------ renderer options (--nerf.*)


def test_nerf_options_override_the_preset_only_where_given():
    from dreamlab.config import BUILTIN_PRIOR_NERF_PRESET
    from dreamlab.renderers.nerf import NeRFConfig

    argv = ["generate", "a red cube", "--renderer", "nerf", "--nerf.num-samples", "16",
            "--nerf.shading", "random", "--nerf.lr-encoding", "linear:0.01,0.001"]
    cfg = build_run_config(_parse(argv))
    assert isinstance(cfg.renderer, NeRFConfig)
    assert cfg.renderer.num_samples == 16 and cfg.renderer.shading == "random"
    assert cfg.renderer.lr_encoding == Linear(0.01, 0.001)
    # untouched fields keep the builtin prior's NeRF preset
    assert cfg.renderer.log2_hashmap_size == BUILTIN_PRIOR_NERF_PRESET["log2_hashmap_size"]
    plain = build_run_config(_parse(["generate", "a red cube", "--renderer", "nerf"]))
    assert plain.renderer.num_samples == BUILTIN_PRIOR_NERF_PRESET["num_samples"]
    assert plain.renderer.shading == NeRFConfig().shading


def test_renderer_options_and_flags_are_checked(capsys, tmp_path):
    assert main(["generate", "a red cube", "--renderer", "nerf", "--nerf.lambda-orientation", "-1",
                 "--out", str(tmp_path)]) == 2
    assert "lambda_orientation" in capsys.readouterr().err
    assert main(["generate", "a red cube", "--renderer", "nerf", "--gaussians", "10", "--out", str(tmp_path)]) == 2
    assert "--gaussians applies to the gaussians renderer" in capsys.readouterr().err
    assert main(["generate", "a red cube", "--renderer", "nerf", "--init-from", str(tmp_path),
                 "--out", str(tmp_path)]) == 2
    assert "--init-from applies to the gaussians renderer" in capsys.readouterr().err
    assert main(["generate", "a red cube", "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no such run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the gaussians renderer has no --nerf.* options
        main(["generate", "a red cube", "--nerf.num-samples", "8"])
    assert list(tmp_path.iterdir()) == []


def test_nerf_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--renderer", "nerf", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--nerf.shading" in out and "--nerf.num-samples" in out and "--sds.weighting" in out
