"""The builtin offline prior: tokenizer, save/load through the prior interface, shipped weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

from dreamlab.priors import PriorLoadError, load_prior
from dreamlab.priors.builtin import ASSET_DIR, BuiltinPrior, WordTokenizer
from dreamlab.world.catalog import VOCABULARY, UnknownWordError


def test_tokenizer_encodes_known_prompts():
    tok = WordTokenizer(VOCABULARY, 12)
    ids = tok(["a red cube", "a red cube, front view", ""])
    assert ids.shape == (3, 12)
    assert ids[0, 0] == 1 and ids[0, 4] == 2  # BOS a red cube EOS
    assert ids[2, :2].tolist() == [1, 2] and (ids[2, 2:] == 0).all()
    assert not torch.equal(ids[0], ids[1])
    # captions write "an" before vowels; users may not: both spellings are one token
    assert torch.equal(tok(["an orange cube"]), tok(["a orange cube"]))


@pytest.mark.parametrize("prompt", ["a red dragon", "a red cube!", "a purple teapot on a table"])
def test_unknown_words_are_a_clear_error(prompt):
    tok = WordTokenizer(VOCABULARY, 12)
    with pytest.raises(UnknownWordError) as info:
        tok([prompt])
    message = str(info.value)
    assert "sphere" in message and "red" in message  # lists the known words
    assert "--prior sd21-base" in message  # and where open vocabulary lives


def test_random_prior_round_trips_through_load_prior(tmp_path):
    prior = BuiltinPrior.random_init(seed=3)
    prior.save(tmp_path / "p", half=False)
    again = load_prior(tmp_path / "p")
    assert isinstance(again, BuiltinPrior)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 500])
    emb = again.encode_prompt(["a red cube", ""])
    assert emb.shape[0] == 2 and emb.ndim == 3
    assert torch.allclose(prior.predict_eps(x, t, prior.encode_prompt(["a red cube", ""])),
                          again.predict_eps(x, t, emb), atol=1e-5)
    assert all(not p.requires_grad for p in again.parameters())


def test_pixel_space_encode_decode():
    prior = BuiltinPrior.random_init()
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    x = prior.encode_images(rgb)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    x.sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    back = prior.decode_latents(prior.encode_images(torch.full((1, 3, 32, 32), 0.25)))
    assert torch.allclose(back, torch.full_like(back, 0.25), atol=1e-6)


def test_damaged_or_missing_prior_folder(tmp_path):
    with pytest.raises(PriorLoadError, match="builtin_prior.json"):
        BuiltinPrior.from_pretrained(tmp_path)
    BuiltinPrior.random_init().save(tmp_path / "p")
    (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(PriorLoadError, match="damaged"):
        load_prior(tmp_path / "p")


# ----------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def shipped():
    return load_prior("builtin")


def test_shipped_weights_load_through_the_prior_interface(shipped):
    assert isinstance(shipped, BuiltinPrior)
    assert BuiltinPrior.is_builtin_folder(ASSET_DIR)
    size = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024
    assert (ASSET_DIR / "model_card.md").is_file()


def test_shipped_prior_conditions_on_text(shipped):
    """CFG works: the conditional prediction differs from the unconditional one, and more for
    different prompts than for the same prompt twice."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 3, 32, 32), 1.0)  # white image
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([500])
    abar = shipped.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    emb = shipped.encode_prompt(["a red cube", "a blue sphere", ""])
    eps = shipped.predict_eps(x_t.repeat(3, 1, 1, 1), t.repeat(3), emb)
    assert torch.isfinite(eps).all()
    red, blue, null = eps
    assert (red - null).abs().mean() > 1e-3
    # the guided direction for "a red cube" raises red relative to blue in the predicted image
    x0_red = (x_t[0] - (1 - abar[0]).sqrt() * (null + 7.5 * (red - null))) / abar[0].sqrt()
    x0_blue = (x_t[0] - (1 - abar[0]).sqrt() * (null + 7.5 * (blue - null))) / abar[0].sqrt()
    assert (x0_red[0] - x0_red[2]).mean() > (x0_blue[0] - x0_blue[2]).mean()


def test_trained_prior_carries_knowledge(shipped):
    """The same short seed-fixed SDS run reaches a clearly better silhouette with the shipped
    prior than with an untrained one."""
    from dreamlab.bench.quality import evaluate_renderer
    from dreamlab.config import make_run_config
    from dreamlab.train import Trainer
    from dreamlab.world.catalog import parse_prompt

    prompt = "a red cube"
    scores = {}
    for name, prior in (("trained", shipped), ("untrained", BuiltinPrior.random_init(seed=0))):
        cfg = make_run_config(prompt, prior="builtin", steps=200, gaussians=1000, device="cpu")
        cfg.train.preview_every = 0
        trainer = Trainer(cfg, prior=prior)
        for _ in trainer:
            pass
        scores[name] = evaluate_renderer(trainer.renderer, parse_prompt(prompt)).iou
    assert scores["trained"] > scores["untrained"] + 0.15, scores
    assert scores["trained"] > 0.6, scores


def test_bench_commands_run_on_a_one_prompt_subset(shipped, tmp_path, capsys):
    from dreamlab.cli import main

    prior_out, quality_out = tmp_path / "prior", tmp_path / "quality"
    assert main(["bench", "prior", "--prompts", "a red cube", "--samples", "2", "--steps", "4",
                 "--out", str(prior_out), "--device", "cpu"]) == 0
    for name in ("prior_bench.md", "prior_bench.csv", "prior_bench.png"):
        assert (prior_out / name).stat().st_size > 0, name
    assert main(["bench", "quality", "--prompts", "a snowman", "--steps", "5",
                 "--out", str(quality_out), "--no-mesh"]) == 0
    for name in ("quality.md", "quality.csv", "quality.png"):
        assert (quality_out / name).stat().st_size > 0, name
    table = (quality_out / "quality.md").read_text()
    assert "a snowman" in table and "IoU" in table


def test_unknown_word_with_builtin_prior_is_a_one_line_error(shipped, tmp_path, capsys):
    from dreamlab.cli import main

    code = main(["generate", "a red dragon", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dreamlab: error: ")
    assert "dragon" in err[0] and "--prior sd21-base" in err[0]
    assert not any(tmp_path.iterdir())


def test_prior_training_resumes_and_refuses_a_corrupt_checkpoint(tmp_path):
    from dreamlab.checkpoint import CheckpointError
    from dreamlab.priors.train_builtin import BuiltinPriorTrainer, BuiltinTrainConfig
    from dreamlab.world.dataset import WorldDataConfig

    cfg = BuiltinTrainConfig(steps=2, batch_size=2, checkpoint_every=1,
                             data=WorldDataConfig(num_views=16))
    first = BuiltinPriorTrainer(cfg, tmp_path)
    list(first)
    again = BuiltinPriorTrainer(cfg, tmp_path)
    assert again.resume().name == "step_0000002.pt" and again.step == 2
    for a, b in zip(first.ema_unet.parameters(), again.ema_unet.parameters()):
        assert torch.equal(a, b)
    (tmp_path / "checkpoints" / "step_0000002.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(CheckpointError, match="corrupt"):
        BuiltinPriorTrainer(cfg, tmp_path).resume()


def test_bf16_training_computes_in_bfloat16_and_keeps_fp32_weights(tmp_path):
    """--precision bf16: the UNet's convolutions run in bfloat16, the weights stay fp32, and the
    first step's loss on the same batch agrees with fp32's to bf16's precision."""
    from dreamlab.priors.train_builtin import BuiltinPriorTrainer, BuiltinTrainConfig
    from dreamlab.world.dataset import WorldDataConfig, load_or_build_world_cache

    data = WorldDataConfig(num_views=16)
    cache = load_or_build_world_cache(data, tmp_path)
    losses, conv_dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = BuiltinTrainConfig(steps=3, batch_size=8, data=data, precision=precision)
        trainer = BuiltinPriorTrainer(cfg, tmp_path / precision, cache=cache)
        seen = []
        trainer.unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        losses[precision] = trainer.train_step().loss
        conv_dtypes[precision] = seen[0]
        assert all(p.dtype == torch.float32 for p in trainer.unet.parameters())
        assert all(p.dtype == torch.float32 for p in trainer.ema_unet.parameters())
    assert conv_dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_train_builtin_bf16_warns_on_a_cpu_without_native_bf16_and_records_it(tmp_path, capsys, monkeypatch):
    from dreamlab.cli import main
    from dreamlab.priors import train_builtin

    monkeypatch.setattr(train_builtin, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "out"
    code = main(["prior", "train-builtin", "--precision", "bf16", "--steps", "1", "--num-views", "16",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--quiet"])
    assert code == 0
    assert "no native bf16" in capsys.readouterr().err
    card = (out / "model_card.md").read_text()
    assert "arithmetic bf16" in card
    assert f"on a {len(os.sched_getaffinity(0))}-core CPU" in card


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(tmp_path, capsys, monkeypatch, native):
    """The default --precision auto trains in bf16 on a CPU with native bf16, in fp32 elsewhere
    (never the slow emulation), says which, and the model card records the arithmetic used."""
    from dreamlab.cli import main
    from dreamlab.priors import train_builtin

    monkeypatch.setattr(train_builtin, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"
    assert train_builtin.resolve_precision("auto", torch.device("cpu")) == expected
    assert train_builtin.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    out = tmp_path / "out"
    code = main(["prior", "train-builtin", "--steps", "1", "--num-views", "16", "--device", "cpu",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"dreamlab: training in {expected} on cpu" in err and "dreamlab: warning" not in err
    assert f"arithmetic {expected}" in (out / "model_card.md").read_text()


@pytest.mark.parametrize("command", ["train-builtin", "train-image-adapter"])
def test_training_commands_refuse_a_gpu_that_is_not_there(tmp_path, capsys, monkeypatch, command):
    """--device cuda without a CUDA GPU: one clear line and exit code 2, before any work is done."""
    from dreamlab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    code = main(["prior", command, "--device", "cuda", "--work-dir", str(work), "--quiet"])
    assert code == 2
    assert "no CUDA GPU is available: use --device cpu" in capsys.readouterr().err
    assert not work.exists()


def test_bf16_training_is_refused_on_a_gpu_without_bf16(monkeypatch):
    from dreamlab.priors.train_builtin import autocast_supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda")
    assert autocast_supported("bf16", gpu) == "this GPU (Tesla T4) has no bf16: use --precision fp32"
    assert autocast_supported("fp32", gpu) is None
    assert autocast_supported("bf16", torch.device("cpu")) is None


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"batch_size": 0}, {"learning_rate": 0.0}, {"min_snr_gamma": 0.0}, {"min_snr_gamma": -1.0}],
)
def test_both_trainer_configs_refuse_impossible_schedules(bad):
    """The prior's and the image adapter's trainers share the schedule checks (one message each)."""
    import dataclasses

    from dreamlab.priors.train_builtin import BuiltinTrainConfig
    from dreamlab.priors.train_image_adapter import ImageAdapterTrainConfig

    for config_type in (BuiltinTrainConfig, ImageAdapterTrainConfig):
        config_type().validate()
        with pytest.raises(ValueError, match="must be"):
            dataclasses.replace(config_type(), **bad).validate()


def test_train_builtin_refuses_impossible_caption_rates_before_rendering(tmp_path, capsys):
    from dreamlab.cli import main

    work = tmp_path / "work"
    code = main(["prior", "train-builtin", "--fronted-view-word-probability", "0.3", "1.5",
                 "--work-dir", str(work), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "fronted_view_word_probability must be (front views, other views)" in capsys.readouterr().err
    assert not work.exists() or not any(work.iterdir())
    code = main(["prior", "train-builtin", "--view-word-probability", "1.5",
                 "--work-dir", str(work), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "view_word_probability must lie in [0, 1]" in capsys.readouterr().err


def test_train_builtin_defaults_are_the_worlds():
    """The CLI's caption-rate default is the world's (the shipped recipe); None turns it off."""
    import tyro

    from dreamlab.cli import TrainBuiltinArgs
    from dreamlab.world.dataset import WorldDataConfig

    assert TrainBuiltinArgs().fronted_view_word_probability == WorldDataConfig().fronted_view_word_probability
    off = tyro.cli(TrainBuiltinArgs, args=["--fronted-view-word-probability", "None"])
    assert off.fronted_view_word_probability is None


def test_train_builtin_flags_reach_the_training_config():
    """Each data and loss flag of `dreamlab prior train-builtin` lands in the config the trainer gets;
    flags left out keep the world's and the trainer's defaults."""
    import tyro

    from dreamlab.cli import TrainBuiltinArgs, UserError, train_builtin_config
    from dreamlab.priors.train_builtin import BuiltinTrainConfig

    cfg = train_builtin_config(tyro.cli(TrainBuiltinArgs, args=[
        "--composite-fraction", "0.55", "--view-word-probability", "0.7", "--num-views", "300",
        "--view-caption-loss-weight", "2.5", "--steps", "12", "--seed", "4", "--precision", "bf16"]))
    assert (cfg.data.composite_fraction, cfg.data.view_word_probability, cfg.data.num_views) == (0.55, 0.7, 300)
    assert (cfg.view_caption_loss_weight, cfg.steps, cfg.seed, cfg.precision) == (2.5, 12, 4, "bf16")
    plain = train_builtin_config(TrainBuiltinArgs())
    assert plain.data == BuiltinTrainConfig().data
    assert plain.view_caption_loss_weight == BuiltinTrainConfig().view_caption_loss_weight
    assert plain.precision == BuiltinTrainConfig().precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        BuiltinTrainConfig(precision="fp16").validate()
    with pytest.raises(UserError, match="composite_fraction must lie in"):
        train_builtin_config(TrainBuiltinArgs(composite_fraction=-0.1))


def test_view_caption_loss_weight_applies_only_to_view_words_of_objects_with_a_front():
    from dreamlab.priors.train_builtin import BuiltinTrainConfig, caption_loss_weights
    from dreamlab.types import VIEW_NAMES
    from dreamlab.world.catalog import ObjectSpec
    from dreamlab.world.dataset import WorldBatch

    specs = [ObjectSpec("snowman", None), ObjectSpec("snowman", None), ObjectSpec("cube", "red"),
             ObjectSpec("house", "blue")]
    back = VIEW_NAMES.index("back")
    captioned = torch.tensor([back, -1, back, back])  # no view word on the second
    batch = WorldBatch(torch.zeros(4, 3, 8, 8), ["a snowman, back view", "a snowman", "a red cube, back view",
                                                 "a blue house, back view"], specs, captioned.clone(), captioned, torch.arange(4))
    dropped = torch.tensor([False, False, False, True])  # the house's caption is dropped for CFG
    weights = caption_loss_weights(batch, dropped, 4.0)
    assert weights.tolist() == [4.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="view_caption_loss_weight"):
        BuiltinTrainConfig(view_caption_loss_weight=0.0).validate()


def test_builtin_preset_trains_from_higher_elevations_than_other_priors():
    """The builtin preset's Gaussians see the torus's hole: training cameras reach 55° above
    the horizon; the NeRF and a Stable Diffusion prior keep the usual camera ranges."""
    from dreamlab.cameras import CameraSamplerConfig
    from dreamlab.config import BUILTIN_PRIOR_ELEVATION_DEG, make_run_config

    builtin = make_run_config("a torus", prior="builtin", device="cpu")
    assert builtin.train.cameras.elevation_deg == BUILTIN_PRIOR_ELEVATION_DEG == (-10.0, 55.0)
    assert builtin.train.cameras.azimuth_deg == CameraSamplerConfig().azimuth_deg
    nerf = make_run_config("a torus", prior="builtin", renderer="nerf", device="cpu")
    assert nerf.train.cameras.elevation_deg == CameraSamplerConfig().elevation_deg
    stable = make_run_config("a torus", prior="sd21-base", device="cpu")
    assert stable.train.cameras.elevation_deg == CameraSamplerConfig().elevation_deg


@pytest.mark.slow
def test_generated_torus_mesh_has_exactly_one_hole(shipped):
    """Issue 3's topology target on its hardest primitive: "a torus" at the default settings
    (builtin preset, seed 0) exports a single closed mesh of genus 1, neither filled nor split
    by a pillar in its hole (genus 2 before the preset's higher training elevations)."""
    from dreamlab.bench.quality import evaluate_mesh, evaluation_cameras, render_truth
    from dreamlab.config import make_run_config
    from dreamlab.train import Trainer
    from dreamlab.world.catalog import parse_prompt

    prompt = "a torus"
    cfg = make_run_config(prompt, prior="builtin", device="cpu", seed=0)
    cfg.train.preview_every = 0
    trainer = Trainer(cfg, prior=shipped)
    for _ in trainer:
        pass
    spec = parse_prompt(prompt)
    mesh = evaluate_mesh(trainer.renderer, spec, cfg.export, render_truth(spec, evaluation_cameras(64)))
    assert mesh.error is None, mesh.error
    assert mesh.components == 1 and mesh.expected_genus == 1
    assert mesh.genus == 1, f"torus mesh genus {mesh.genus}"
